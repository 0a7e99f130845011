"""Publishing a run: its figures, tables and manifest, and its executed notebooks, into `figures/<scale>/`.

`lofa reproduce --publish` copies `runs/<scale>/figures/` and, into its `notebooks/` folder, every notebook the
run executed, cleaned for reading on the repository page: outputs kept, the volatile metadata (papermill's
timings, paths and parameters record, execution timestamps) dropped, progress bars reduced to their last state,
and images wider than `MAX_IMAGE_PX` scaled down, so that the folder stays a few MB.

    publish("mini")                         # runs/mini/figures -> figures/mini (with figures/mini/notebooks/)
    clean = clean_notebook(nbformat.read(path, as_version=4))
"""
from __future__ import annotations

import base64
import io
import re
import shutil
from pathlib import Path

from lofa.errors import LofaError

MAX_IMAGE_PX = 900      # widest image kept in a published notebook (a figure's own file keeps its full size)
VOLATILE_KEYS = ("papermill", "execution")  # per-notebook and per-cell metadata that changes on every run
_LAST_STATE = re.compile(r"[^\n]*\r(?=[^\n])")  # a line's text up to its last carriage return (bars redraw)


def _last_states(text: str) -> str:
    """Stream text as a terminal shows it at the end: each line only after its last carriage return."""
    return _LAST_STATE.sub("", text.replace("\r\n", "\n"))


def _smaller_png(data: str, max_px: int) -> str:
    """A base64 PNG no wider than max_px (aspect kept); smaller ones unchanged."""
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data)))
    if image.width <= max_px:
        return data
    image = image.resize((max_px, max(1, round(image.height * max_px / image.width))), Image.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return base64.b64encode(out.getvalue()).decode("ascii")


def clean_notebook(nb, max_image_px: int = MAX_IMAGE_PX):
    """An executed notebook (nbformat node) as published: outputs kept, `VOLATILE_KEYS` metadata dropped from the
    notebook and its cells, stream outputs at their last state, PNG outputs at most max_image_px wide. Changes
    `nb` in place and returns it."""
    for key in VOLATILE_KEYS:
        nb.metadata.pop(key, None)
    for cell in nb.cells:
        for key in VOLATILE_KEYS:
            cell.metadata.pop(key, None)
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                output["text"] = _last_states(output["text"])
            data = output.get("data", {})
            if "image/png" in data:
                data["image/png"] = _smaller_png(data["image/png"], max_image_px)
    return nb


def publish(scale: str, run_root: str | Path = "runs", dest: str | Path | None = None,
            tasks: str | tuple[str, ...] = "all") -> Path:
    """Copy the figures folder (figures, tables, manifest) of the run of `tasks` at `scale` (`run_folder`) and its
    executed notebooks, cleaned (`clean_notebook`), to `figures/<scale>/` — `figures/<scale>/<task label>/` for a
    run of some tasks — (or dest) for committing; the old folder is replaced at once."""
    import nbformat

    from lofa.reproduce import REPO_DIR, run_folder, task_label

    run_dir = run_folder(run_root, scale, tasks)
    src = run_dir / "figures"
    label = task_label(tasks)
    if not (src / "manifest.json").exists():
        hint = "" if label == "all" else f" --tasks {label.replace('+', ',')}"
        raise LofaError(f"nothing to publish: {src} has no manifest; run `lofa reproduce --scale {scale}{hint}` "
                        f"first")
    dest = Path(dest) if dest else REPO_DIR / "figures" / scale / ("" if label == "all" else label)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    executed = sorted((run_dir / "notebooks").glob("*.ipynb"))
    if executed:
        (tmp / "notebooks").mkdir()
        for path in executed:
            nbformat.write(clean_notebook(nbformat.read(path, as_version=4)), tmp / "notebooks" / path.name)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest
