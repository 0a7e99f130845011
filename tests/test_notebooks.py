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
