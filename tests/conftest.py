import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Fuzzing (tests/test_fuzz.py): "ci" tries the same bounded inputs on every run; "explore" is a long random search
# (pytest --hypothesis-profile explore).
settings.register_profile("ci", max_examples=300, derandomize=True, database=None, deadline=None)
settings.register_profile("explore", max_examples=2000, deadline=None, database=None)
settings.load_profile("ci")

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Small, deterministic CPU work: tests share two cores with whatever else runs.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def make_notebook(tmp_path):
    """Write a notebook with a tagged parameters cell and the given code cells; return its path."""
    from nbformat.v4 import new_code_cell, new_notebook
    import nbformat

    def make(name, cells, outputs=(), depends=None, folder=tmp_path / "nbs",
             params='scale = "smoke"\ndevice = "cpu"\nseed = 0\nrun_dir = "x"'):
        folder.mkdir(parents=True, exist_ok=True)
        nb = new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.metadata["lofa"] = {"outputs": list(outputs), **({"depends": depends} if depends is not None else {})}
        p = new_code_cell(params)
        p.metadata["tags"] = ["parameters"]
        nb.cells = [p] + [new_code_cell(c) for c in cells]
        path = folder / f"{name}.ipynb"
        nbformat.write(nb, path)
        return path

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second intra-op thread only adds waiting, badly so on a busy machine (modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
