"""The shipped pretrained models (data/pretrained/): every file checked, loaded and sampled; a damaged file is a
one-line error; a run installs a matching folder instead of training and trains when the recipe differs."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from lofa.errors import LofaError
from lofa.models import pretrained

SHIPPED = sorted(p.parent for p in pretrained._DEFAULT_ROOT.glob("*/*/manifest.json"))


def test_the_mini_set_is_shipped_within_its_size_limits():
    assert {(p.parent.name, p.name) for p in SHIPPED} >= {("mini", t) for t in ("actions", "styles", "identities")}
    files = [f for f in pretrained._DEFAULT_ROOT.rglob("*") if f.is_file()]
    assert max(f.stat().st_size for f in files) <= 16 * 2**20
    assert sum(f.stat().st_size for f in files) <= 120 * 2**20


@pytest.mark.parametrize("where", SHIPPED, ids=lambda p: f"{p.parent.name}-{p.name}")
def test_shipped_folder_matches_its_manifest_loads_samples_and_is_what_the_preset_trains(where, tmp_path):
    from lofa.evaluate import GenerateConfig, generate
    from lofa.metrics.evaluators import EvalConfig, Evaluators, fingerprint
    from lofa.models.generator import Generator
    from lofa.models.train_base import BaseTrainConfig, record
    from lofa.pipeline import Run

    scale, task = where.parent.name, where.name
    manifest = pretrained.verify(scale, task)
    listed = {str(f.relative_to(where)) for f in where.rglob("*") if f.is_file()} - {pretrained.MANIFEST}
    assert set(manifest["files"]) == listed  # nothing unlisted rides along
    for key in ("coarse_acc_base", "fd_base_vs_renders", "fd_over_other_cases_floor", "exact_acc_base_heldout"):
        assert key in manifest["quality"]

    run = Run(scale, "cpu", manifest["seed"], tmp_path / "run")
    cfg = run.config(BaseTrainConfig).for_task(task)
    # the preset must still be the recipe that was shipped, or `make reproduce` would silently train
    assert manifest["base"]["config"] == record(cfg), f"re-run `{pretrained.remake_command(scale, task)}`"
    world = run.world(task)
    assert read_fingerprint(where) == fingerprint(world, run.config(EvalConfig), run.seed + 10_000)

    gen = Generator.load(where / "base" / "generator")
    assert all(torch.isfinite(p).all() for p in gen.parameters())
    assert sum(p.numel() for p in gen.parameters()) == manifest["base"]["parameters"]
    case = world.ids("train")[0]
    x = generate(gen, world, [case], None, [world.prompt(case, 0)], [7], cfg=GenerateConfig(steps=2),
                 progress=False)
    assert x.shape == (1, *world.shape) and torch.isfinite(x).all()
    evaluators = Evaluators.load(where / "evaluators", world)
    renders = world.render([case], seed=3)
    assert evaluators.score(renders, [case])["coarse_acc"].shape == (1,)


def read_fingerprint(where: Path) -> str:
    return json.loads((where / "evaluators" / "evaluators.json").read_text())["fingerprint"]


@pytest.fixture
def shipped_copy(tmp_path, monkeypatch):
    """A copy of the shipped mini styles folder under a temporary LOFA_PRETRAINED root."""
    root = tmp_path / "pretrained"
    shutil.copytree(pretrained._DEFAULT_ROOT / "mini" / "styles", root / "mini" / "styles")
    monkeypatch.setenv("LOFA_PRETRAINED", str(root))
    return root / "mini" / "styles"


@pytest.mark.parametrize("damage", ["altered", "truncated", "missing", "manifest"])
def test_a_damaged_shipped_file_is_one_line_naming_it_and_nothing_is_installed(shipped_copy, tmp_path, damage):
    from lofa.pipeline import Run

    weights = shipped_copy / "base" / "generator" / "diffusion_pytorch_model.safetensors"
    if damage == "altered":
        data = bytearray(weights.read_bytes())
        data[-100] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "missing":
        weights.unlink()
    else:
        (shipped_copy / pretrained.MANIFEST).write_text("{not json")
    run = Run("mini", "cpu", 0, tmp_path / "run")
    with pytest.raises(LofaError) as err:
        run.base("styles")
    message = str(err.value)
    assert "\n" not in message and "lofa pretrain --scale mini --task styles" in message
    named = shipped_copy / pretrained.MANIFEST if damage == "manifest" else weights
    assert str(named) in message
    assert not run.path("base", "styles").exists()


def test_the_cli_exits_2_on_a_damaged_shipped_file(tmp_path, monkeypatch, capsys):
    from lofa.cli import main

    root = tmp_path / "pretrained"
    shutil.copytree(pretrained._DEFAULT_ROOT / "mini" / "actions", root / "mini" / "actions")
    monkeypatch.setenv("LOFA_PRETRAINED", str(root))
    (root / "mini" / "actions" / "evaluators" / "referee.safetensors").write_bytes(b"")
    code = main(["train", "--setting", "actions-text", "--scale", "mini", "--device", "cpu", "--run-root",
                 str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "referee.safetensors" in err


def test_a_run_installs_matching_shipped_models_and_trains_when_the_recipe_differs(tmp_path, monkeypatch):
    """Smoke scale: `lofa pretrain` writes a folder; a fresh run loads it without training a step, and an override
    of the base recipe makes the run train instead."""
    import lofa.metrics.evaluators as evaluators_module
    import lofa.models.train_base as train_base_module
    from lofa.cli import main
    from lofa.pipeline import Run

    root = tmp_path / "pretrained"
    assert main(["pretrain", "--scale", "smoke", "--task", "styles", "--device", "cpu", "--run-root",
                 str(tmp_path / "made"), "--out", str(root / "smoke")]) == 0
    manifest = json.loads((root / "smoke" / "styles" / pretrained.MANIFEST).read_text())
    assert manifest["command"].startswith("lofa pretrain --scale smoke --task styles")
    monkeypatch.setenv("LOFA_PRETRAINED", str(root))

    def no_training(*args, **kwargs):
        raise AssertionError("trained although a matching shipped model exists")

    monkeypatch.setattr(train_base_module.Generator, "build", no_training)
    monkeypatch.setattr(evaluators_module, "GroundTruthPool", no_training)
    run = Run("smoke", "cpu", 0, tmp_path / "run")
    gen, ev = run.base("styles"), run.evaluators("styles")
    shipped = train_base_module.Generator.load(root / "smoke" / "styles" / "base" / "generator")
    for a, b in zip(gen.state_dict().values(), shipped.state_dict().values()):
        assert torch.equal(a, b)
    assert ev.meta["fingerprint"] == manifest["evaluators"]["fingerprint"]

    other = Run("smoke", "cpu", 0, tmp_path / "other", overrides={"BaseTrainConfig": {"steps": 21}})
    with pytest.raises(AssertionError, match="trained although"):
        other.base("styles")
