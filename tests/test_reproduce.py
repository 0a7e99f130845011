"""The orchestrator: parameter injection, caching, upstream invalidation, failure and kernel-death reporting."""
import json
import shutil
from pathlib import Path

import pytest

from lofa import reproduce
from lofa.errors import LofaError

WRITE = """
from pathlib import Path
import json
out = Path(run_dir) / "figures"
out.mkdir(parents=True, exist_ok=True)
(out / "{name}.json").write_text(json.dumps({{"scale": scale, "device": device, "seed": seed, "run_dir": run_dir}}))
"""


def _two_step(make_notebook):
    make_notebook("01_first", [WRITE.format(name="first")], outputs=["figures/first.json"])
    make_notebook("02_second", [WRITE.format(name="second")], outputs=["figures/second.json"])


def test_parameters_are_injected_and_outputs_recorded(tmp_path, make_notebook):
    _two_step(make_notebook)
    res = reproduce.run("smoke", device="cpu", seed=7, run_root=tmp_path / "runs", nb_dir=tmp_path / "nbs",
                        progress=False)
    assert [r.status for r in res] == ["ran", "ran"]
    run_dir = tmp_path / "runs" / "smoke"
    got = json.loads((run_dir / "figures" / "first.json").read_text())
    assert got == {"scale": "smoke", "device": "cpu", "seed": 7, "run_dir": str(run_dir)}
    assert (run_dir / "notebooks" / "01_first.ipynb").exists()
    manifest = json.loads((run_dir / "figures" / "manifest.json").read_text())
    assert set(manifest) == {"first.json", "second.json"}
    entry = manifest["first.json"]
    assert entry["notebook"] == "01_first" and entry["scale"] == "smoke" and entry["seeds"] == {"seed": 7}
    assert entry["device"].startswith("cpu") and entry["wall_time_s"] > 0 and "torch" in entry["versions"]
    assert entry["git_commit"]


def test_cache_skips_unchanged_and_reruns_on_change(tmp_path, make_notebook):
    _two_step(make_notebook)
    kw = dict(device="cpu", run_root=tmp_path / "runs", nb_dir=tmp_path / "nbs", progress=False)
    reproduce.run("smoke", **kw)
    assert [r.status for r in reproduce.run("smoke", **kw)] == ["cached", "cached"]
    # a changed parameter invalidates everything
    assert [r.status for r in reproduce.run("smoke", seed=1, **kw)] == ["ran", "ran"]
    # a missing output reruns that step only
    (tmp_path / "runs" / "smoke" / "figures" / "second.json").unlink()
    assert [r.status for r in reproduce.run("smoke", seed=1, **kw)] == ["cached", "ran"]
    # an edited upstream notebook reruns it and everything downstream of it
    make_notebook("01_first", [WRITE.format(name="first"), "x = 1"], outputs=["figures/first.json"])
    assert [r.status for r in reproduce.run("smoke", seed=1, **kw)] == ["ran", "ran"]
    # --force reruns
    assert [r.status for r in reproduce.run("smoke", seed=1, force=True, **kw)] == ["ran", "ran"]


def test_a_run_of_some_tasks_expects_only_their_files_and_passes_the_selection(tmp_path, make_notebook):
    show = WRITE.format(name="first") + "\n(out / 'tasks.txt').write_text(tasks)\n(out / '01_styles_gallery.png').write_text('x')"
    make_notebook("01_first", [show], outputs=["figures/first.json", "figures/01_actions_gallery.png",
                                               "figures/01_styles_gallery.png"])
    spec = reproduce.discover(tmp_path / "nbs")[0]
    assert spec.outputs_for(("styles", "identities")) == ["figures/first.json", "figures/01_styles_gallery.png"]
    res = reproduce.run("smoke", device="cpu", run_root=tmp_path / "runs", nb_dir=tmp_path / "nbs", progress=False,
                        tasks="styles")
    assert [r.status for r in res] == ["ran"]  # the actions gallery is not expected of a styles run
    assert (tmp_path / "runs" / "smoke-styles" / "figures" / "tasks.txt").read_text() == "styles"
    with pytest.raises(LofaError, match="unknown task selection"):
        reproduce.run("smoke", device="cpu", run_root=tmp_path / "runs", nb_dir=tmp_path / "nbs", progress=False,
                      tasks="faces")


def test_only_selects_and_checks_upstream(tmp_path, make_notebook):
    _two_step(make_notebook)
    kw = dict(device="cpu", run_root=tmp_path / "runs", nb_dir=tmp_path / "nbs", progress=False)
    with pytest.raises(LofaError, match="needs the results of 01_first"):
        reproduce.run("smoke", only=["second"], **kw)
    assert [r.name for r in reproduce.run("smoke", only=["01"], **kw)] == ["01_first"]
    assert [r.status for r in reproduce.run("smoke", only=["02_second"], **kw)] == ["ran"]
    with pytest.raises(LofaError, match="matches no notebook"):
        reproduce.run("smoke", only=["nope"], **kw)


def test_failing_notebook_names_notebook_cell_and_error(tmp_path, make_notebook):
    make_notebook("01_ok", [WRITE.format(name="ok")], outputs=["figures/ok.json"])
    make_notebook("02_broken", ["a = 1", "raise ValueError('the fixture fails on purpose')"], outputs=["x"])
    make_notebook("03_never", [WRITE.format(name="never")], outputs=["figures/never.json"])
    with pytest.raises(reproduce.NotebookFailed) as info:
        reproduce.run("smoke", device="cpu", run_root=tmp_path / "runs", nb_dir=tmp_path / "nbs", progress=False)
    msg = str(info.value)
    assert "02_broken" in msg and "ValueError: the fixture fails on purpose" in msg and "cell 3" in msg
    assert "\n" not in msg  # one line, not a page of kernel trace
    assert not (tmp_path / "runs" / "smoke" / "figures" / "never.json").exists()


def test_missing_declared_output_is_an_error(tmp_path, make_notebook):
    make_notebook("01_lazy", ["x = 1"], outputs=["figures/promised.png"])
    with pytest.raises(reproduce.NotebookFailed, match="did not write its declared outputs: figures/promised.png"):
        reproduce.run("smoke", device="cpu", run_root=tmp_path / "runs", nb_dir=tmp_path / "nbs", progress=False)


def test_dead_kernel_is_reported_not_hung(tmp_path, make_notebook):
    make_notebook("01_dies", ["import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"], outputs=[])
    with pytest.raises(reproduce.NotebookFailed, match="kernel died"):
        reproduce.run("smoke", device="cpu", run_root=tmp_path / "runs", nb_dir=tmp_path / "nbs", progress=False)


def test_cli_reports_failure_in_one_line_with_exit_2(capsys):
    from lofa.cli import main

    with pytest.raises(SystemExit):
        main(["reproduce", "--scale", "nonsense"])
    capsys.readouterr()
    assert main(["reproduce", "--scale", "smoke", "--only", "does-not-exist", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lofa reproduce: error:") and "\n" not in err


def test_lofa_sources_follow_imports_transitively():
    files = {p.relative_to(reproduce.PACKAGE_DIR).as_posix() for p in
             reproduce.lofa_sources("from lofa.reproduce import run\nimport numpy")}
    assert {"__init__.py", "reproduce.py", "errors.py", "io.py"} <= files  # io and errors via reproduce's imports
    assert "cli.py" not in files


def test_every_pipeline_notebook_has_a_parameters_cell_and_declares_outputs():
    specs = reproduce.discover(reproduce.REPO_DIR / "notebooks")
    assert specs, "no notebooks"
    for spec in specs:
        cells = json.loads(spec.path.read_text())["cells"]
        tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert tagged, f"{spec.name} has no cell tagged 'parameters'"
        src = "".join(tagged[0]["source"])
        for p in ("scale", "device", "seed", "run_dir"):
            assert f"{p} =" in src, f"{spec.name}: parameters cell lacks {p}"
        assert spec.outputs, f"{spec.name} declares no outputs in metadata.lofa.outputs"
        assert not any(c.get("outputs") for c in cells if c["cell_type"] == "code"), f"{spec.name} has outputs"


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import os
    import stat

    from lofa.io import write_json

    write_json(tmp_path / "a.json", {"x": 1})
    mode = stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode)
    assert mode & stat.S_IRGRP and mode & stat.S_IROTH, oct(mode)
    assert not list(tmp_path.glob(".*.tmp"))


def test_cache_key_follows_lazily_exported_names():
    """lofa.models exports its names lazily; the cache key must still cover the modules behind them."""
    from lofa.reproduce import lofa_sources

    names = {p.relative_to(p.parents[1]).as_posix() for p in lofa_sources("from lofa.models import TextEncoder")}
    assert {"models/text.py", "models/generator.py"} <= names


# ---------------------------------------------------------------- a cache that cannot lie
# Step 01 makes an artifact (resuming: a finished one is only loaded, as Run's steps do) and a figure; step 02 reads
# the artifact, rewrites its index with the same bytes (as build_zoo rewrites a zoo's index) and writes a figure.
MAKE_ARTIFACT = """
from pathlib import Path
import json
run = Path(run_dir)
art = run / "zoo" / "a"
lora = art / "loras" / "x.bin"
if not ((art / "index.json").exists() and lora.exists() and lora.stat().st_size == 10):
    (art / "loras").mkdir(parents=True, exist_ok=True)
    (art / "loras" / "x.bin").write_bytes(b"0123456789")
    (art / "index.json").write_text(json.dumps({"n": 1}))
(run / "figures").mkdir(parents=True, exist_ok=True)
(run / "figures" / "first.json").write_text(json.dumps({"seed": seed}))
"""
READ_ARTIFACT = """
from pathlib import Path
import json
run = Path(run_dir)
n = json.loads((run / "zoo" / "a" / "index.json").read_text())["n"]
(run / "zoo" / "a" / "index.json").write_text(json.dumps({"n": n}))
(run / "figures" / "second.json").write_text(json.dumps({"n": n, "seed": seed}))
"""


@pytest.fixture
def artifact_steps(tmp_path, make_notebook):
    """The two steps above, run once; returns (run_dir, kwargs of reproduce.run)."""
    make_notebook("01_make", [MAKE_ARTIFACT], outputs=["figures/first.json"])
    make_notebook("02_read", [READ_ARTIFACT], outputs=["figures/second.json"])
    kw = dict(device="cpu", run_root=tmp_path / "runs", nb_dir=tmp_path / "nbs", progress=False)
    assert [r.status for r in reproduce.run("smoke", **kw)] == ["ran", "ran"]
    return tmp_path / "runs" / "smoke", kw


def _statuses(kw):
    return [(r.status, r.reason) for r in reproduce.run("smoke", **kw)]


def test_a_deleted_or_truncated_artifact_reruns_the_step_that_made_it(artifact_steps):
    run_dir, kw = artifact_steps
    records = {n: json.loads((run_dir / ".cache" / f"{n}.json").read_text()) for n in ("01_make", "02_read")}
    assert {"zoo/a/index.json", "zoo/a/loras/x.bin", "figures/first.json"} <= set(records["01_make"]["files"])
    assert "zoo/a/loras/x.bin" not in records["02_read"]["files"]  # it only read the artifact
    # 02 rewrote the index with the same bytes: nothing changed
    assert _statuses(kw) == [("cached", ""), ("cached", "")]
    shutil.rmtree(run_dir / "zoo")
    assert _statuses(kw) == [("ran", "zoo/a/index.json is missing"), ("cached", "")]
    assert (run_dir / "zoo" / "a" / "loras" / "x.bin").exists()
    (run_dir / "zoo" / "a" / "loras" / "x.bin").write_bytes(b"01234")  # a half-written file
    assert _statuses(kw) == [("ran", "zoo/a/loras/x.bin changed"), ("cached", "")]
    assert (run_dir / "zoo" / "a" / "loras" / "x.bin").read_bytes() == b"0123456789"
    # a file of the same size and other bytes is caught by its hash once its mtime moved
    (run_dir / "zoo" / "a" / "loras" / "x.bin").write_bytes(b"98765")
    assert _statuses(kw)[0] == ("ran", "zoo/a/loras/x.bin changed")


def test_a_notebook_rerun_by_hand_or_an_edited_manifest_is_noticed(artifact_steps):
    import papermill

    run_dir, kw = artifact_steps
    nb = Path(kw["nb_dir"]) / "01_make.ipynb"
    papermill.execute_notebook(str(nb), str(run_dir.parent / "by_hand.ipynb"), progress_bar=False,
                               parameters={"scale": "smoke", "device": "cpu", "seed": 5, "run_dir": str(run_dir)})
    assert _statuses(kw)[0] == ("ran", "figures/first.json changed")
    manifest_path = run_dir / "figures" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["first.json"]["sha256"] == reproduce.ledger.sha256(run_dir / "figures" / "first.json")
    manifest["second.json"]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    assert _statuses(kw) == [("cached", ""), ("ran", "the manifest does not describe figures/second.json as it is")]
    manifest_path.unlink()
    assert [s for s, _ in _statuses(kw)] == ["ran", "ran"]
    assert set(json.loads(manifest_path.read_text())) == {"first.json", "second.json"}


def test_records_of_an_older_format_claim_every_artifact_of_unknown_origin(artifact_steps):
    """A run folder from before step records (or artifacts made outside the orchestrator): every step without a
    record of its own claims the artifacts nobody is known to have written, so deleting one reruns each step
    that may have made it."""
    run_dir, kw = artifact_steps
    for name in ("01_make", "02_read"):
        (run_dir / ".cache" / f"{name}.json").write_text(json.dumps({"key": "old", "seconds": 1.0}))
    assert _statuses(kw) == [("ran", "it has no record"), ("ran", "it has no record")]
    records = {n: json.loads((run_dir / ".cache" / f"{n}.json").read_text()) for n in ("01_make", "02_read")}
    assert {"zoo/a/index.json", "zoo/a/loras/x.bin"} <= set(records["01_make"]["found"])
    assert "zoo/a/loras/x.bin" in records["02_read"]["found"]
    # 01 only loaded the artifact, yet it is claimed: deleting it reruns 01, which remakes it (and 02 accepts the
    # same bytes)
    shutil.rmtree(run_dir / "zoo")
    assert _statuses(kw) == [("ran", "zoo/a/index.json is missing"), ("cached", "")]
    assert (run_dir / "zoo" / "a" / "loras" / "x.bin").read_bytes() == b"0123456789"


def test_what_an_interrupted_attempt_finished_belongs_to_the_step_that_resumes(tmp_path, make_notebook):
    """The pending record keeps the snapshot from before the first attempt, so an artifact the interrupted attempt
    completed (and the resumed one only loads) is still claimed by the step."""
    from lofa import ledger

    make_notebook("01_make", [MAKE_ARTIFACT], outputs=["figures/first.json"])
    run_dir = tmp_path / "runs" / "smoke"
    (run_dir / ".cache").mkdir(parents=True)
    (run_dir / ".cache" / "01_make.json").write_text(json.dumps(ledger.begin(run_dir, "an older key", None)))
    (run_dir / "zoo" / "a" / "loras").mkdir(parents=True)  # what the interrupted attempt finished
    (run_dir / "zoo" / "a" / "loras" / "x.bin").write_bytes(b"0123456789")
    (run_dir / "zoo" / "a" / "index.json").write_text(json.dumps({"n": 1}))
    kw = dict(device="cpu", run_root=tmp_path / "runs", nb_dir=tmp_path / "nbs", progress=False)
    assert _statuses(kw) == [("ran", "it has not finished")]
    record = json.loads((run_dir / ".cache" / "01_make.json").read_text())
    assert "zoo/a/loras/x.bin" in record["files"] and record["found"] == []
    (run_dir / "zoo" / "a" / "loras" / "x.bin").unlink()
    assert _statuses(kw) == [("ran", "zoo/a/loras/x.bin is missing")]
