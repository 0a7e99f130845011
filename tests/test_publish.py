"""Publishing a run (lofa.publish): figures and manifest copied, executed notebooks cleaned for reading."""
import base64
import io

import nbformat
import pytest
from PIL import Image

from lofa.errors import LofaError
from lofa.publish import MAX_IMAGE_PX, clean_notebook, publish


def _png(width, height):
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


def _executed_notebook():
    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {"start_time": "2026-12-07T01:00:00", "input_path": "/home/someone/nb.ipynb"}
    nb.metadata["lofa"] = {"outputs": ["figures/a.png"]}
    cell = nbformat.v4.new_code_cell("print(1)")
    cell.metadata["papermill"] = {"duration": 1.5, "start_time": "2026-12-07T01:00:01"}
    cell.metadata["execution"] = {"iopub.execute_input": "2026-12-07T01:00:01"}
    cell.metadata["tags"] = ["parameters"]
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text="bar  10%\rbar  50%\rbar 100%\ndone\n"),
                    nbformat.v4.new_output("display_data", data={"image/png": _png(3000, 1500), "text/plain": "fig"}),
                    nbformat.v4.new_output("display_data", data={"image/png": _png(400, 300)})]
    nb.cells = [cell]
    return nb


def test_a_clean_notebook_keeps_outputs_and_drops_what_changes_every_run():
    clean = clean_notebook(_executed_notebook())
    assert "papermill" not in clean.metadata and clean.metadata["lofa"] == {"outputs": ["figures/a.png"]}
    cell = clean.cells[0]
    assert set(cell.metadata) == {"tags"}
    assert cell.outputs[0]["text"] == "bar 100%\ndone\n"  # a progress bar at its last state
    wide = Image.open(io.BytesIO(base64.b64decode(cell.outputs[1]["data"]["image/png"])))
    assert wide.size == (MAX_IMAGE_PX, MAX_IMAGE_PX // 2) and cell.outputs[1]["data"]["text/plain"] == "fig"
    assert cell.outputs[2]["data"]["image/png"] == _png(400, 300)  # small images untouched
    nbformat.validate(clean)


def test_publish_copies_the_figures_and_the_cleaned_notebooks(tmp_path):
    run = tmp_path / "runs" / "smoke"
    (run / "figures").mkdir(parents=True)
    (run / "figures" / "manifest.json").write_text("{}")
    (run / "figures" / "t.csv").write_text("a\n1\n")
    (run / "notebooks").mkdir()
    nbformat.write(_executed_notebook(), run / "notebooks" / "00_x.ipynb")
    dest = tmp_path / "figures" / "smoke"
    (dest / "old").mkdir(parents=True)  # a previous publication is replaced whole
    assert publish("smoke", tmp_path / "runs", dest) == dest
    assert sorted(p.name for p in dest.iterdir()) == ["manifest.json", "notebooks", "t.csv"]
    published = nbformat.read(dest / "notebooks" / "00_x.ipynb", as_version=4)
    assert "papermill" not in published.metadata and published.cells[0].outputs[0]["text"] == "bar 100%\ndone\n"
    with pytest.raises(LofaError, match="nothing to publish"):
        publish("mini", tmp_path / "runs", tmp_path / "elsewhere")


def test_a_run_of_some_tasks_has_its_own_run_and_publication_folders(tmp_path, monkeypatch):
    from lofa import reproduce

    assert reproduce.task_label("all") == reproduce.task_label("actions,styles,identities") == "all"
    assert reproduce.task_label("identities,styles") == "styles+identities"
    assert reproduce.run_folder(tmp_path, "full") == tmp_path / "full"
    assert reproduce.run_folder(tmp_path, "full", "identities") == tmp_path / "full-identities"
    run = tmp_path / "runs" / "full-identities"
    (run / "figures").mkdir(parents=True)
    (run / "figures" / "manifest.json").write_text("{}")
    monkeypatch.setattr(reproduce, "REPO_DIR", tmp_path)
    assert publish("full", tmp_path / "runs", tasks="identities") == tmp_path / "figures" / "full" / "identities"
    assert (tmp_path / "figures" / "full" / "identities" / "manifest.json").is_file()
    with pytest.raises(LofaError, match="--tasks styles"):
        publish("full", tmp_path / "runs", tasks="styles")
