"""Every ```python block of README.md runs, in order, in a fresh folder holding what the blocks expect: a tiny
text-conditioned LoFA checkpoint at runs/mini/hypernet/actions-text/lofa/ over a tiny Wan DiT base, with random
weights (the blocks are about the API, not the numbers)."""
import os
import re
from pathlib import Path

import pytest
import torch

import lofa

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder laid out like a run: runs/mini/base/actions/generator/ and the checkpoint that names it."""
    from test_diffusers_loading import text_checkpoint

    from lofa.models.video_dit import VideoDiTConfig, make_video_dit

    root = tmp_path_factory.mktemp("readme")
    torch.manual_seed(0)
    net = make_video_dit(VideoDiTConfig(num_layers=2, num_heads=2, head_dim=8, ffn_dim=32, text_dim=384))
    text_checkpoint(net, root / "runs/mini/base/actions/generator", root / "runs/mini/hypernet/actions-text/lofa",
                    max_length=32)
    return root


def test_the_readme_has_python_blocks_using_the_exports():
    assert len(BLOCKS) >= 3
    used = {name for name in lofa.__all__ if any(f"lofa.{name}" in block for block in BLOCKS)}
    assert {"LoFA", "load_lora", "save_lora", "response_map", "Run", "make_world"} <= used


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(workdir, monkeypatch, capsys, index):
    monkeypatch.chdir(workdir)
    exec(compile(BLOCKS[index], f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip()  # every block prints what it shows


def test_lofa_imports_lazily_and_exports_what_the_docstring_lists():
    import subprocess
    import sys

    code = "import sys, lofa; print(any(m.split('.')[0] in ('torch', 'diffusers') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(README.parent)}).stdout.strip() == "False"
    for name in lofa.__all__:
        assert getattr(lofa, name) is not None and name in dir(lofa)
        assert name == "__version__" or name in lofa.__doc__
    from lofa.hypernet.predictor import LoFA
    from lofa.lora.formats import load_lora

    assert lofa.LoFA is LoFA and lofa.load_lora is load_lora
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        lofa.nothing


def test_license_citation_and_data_match_what_the_package_says():
    import yaml

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = README.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    license_text = (root / "LICENSE").read_text()
    assert project["license"] == "Apache-2.0"
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    citation = yaml.safe_load((root / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["license"] == project["license"]
    assert citation["version"] == project["version"] == lofa.__version__
    paper = citation["preferred-citation"]
    assert paper["title"] == ("LoFA: Learning to Predict Personalized Priors for Fast Adaptation of Visual "
                              "Generative Models")
    assert paper["year"] == 2026 and "CVPR" in paper["conference"]["name"]
    # README's Layout: data/ holds data/pretrained/<scale>/<task>/ (the shipped models) and nothing else
    assert "data/pretrained/<scale>/<task>/" in README.read_text()
    assert {p.name for p in (root / "data").iterdir()} - {".gitkeep"} == {"pretrained"}
