"""Every notebook in notebooks/ executed at scale `smoke` through the orchestrator; each declared output must
exist. Notebooks added later are picked up without changes here."""
import pytest

from lofa import reproduce


@pytest.mark.notebooks
def test_pipeline_runs_at_smoke_scale():
    results = reproduce.run("smoke", device="cpu", seed=0, progress=True)
    specs = reproduce.discover(reproduce.REPO_DIR / "notebooks")
    assert [r.name for r in results] == [s.name for s in specs]
    run_dir = reproduce.REPO_DIR / "runs" / "smoke"
    for spec in specs:
        for out in spec.outputs:
            assert (run_dir / out).exists(), f"{spec.name} did not produce {out}"
    # every figure and table a notebook writes is declared, so the manifest lists it (a table's .md twin goes with
    # its .csv)
    figures = run_dir / "figures"
    declared = {o[len("figures/"):] for spec in specs for o in spec.outputs if o.startswith("figures/")}
    written = {p.name for p in figures.iterdir() if p.name != "manifest.json"}
    twins = {n for n in written if n.endswith(".md") and n[:-3] + ".csv" in declared}
    assert written - twins <= declared, f"written but not declared: {sorted(written - twins - declared)}"


def test_notebooks_are_valid_nbformat_with_a_parameters_cell():
    """Every notebook validates (cell ids included: a missing id is a warning now, an error in future nbformat)
    and its first code cell is the papermill `parameters` cell."""
    import warnings

    import nbformat

    for path in sorted((reproduce.REPO_DIR / "notebooks").glob("*.ipynb")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            nb = nbformat.read(path, as_version=4)
            nbformat.validate(nb)
        first = next(c for c in nb.cells if c.cell_type == "code")
        assert "parameters" in first.metadata.get("tags", []), path.name
