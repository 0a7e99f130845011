"""The shipped pretrained models (data/pretrained/): every file checked, loaded and sampled; a damaged file is a
one-line error; a run installs a matching folder instead of training and trains when the recipe differs."""
import json
import shutil
import sys
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
    from lofa.run import Run

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


@pytest.mark.parametrize("where", SHIPPED, ids=lambda p: f"{p.parent.name}-{p.name}")
def test_the_shipped_zoo_is_what_the_preset_trains_on_the_shipped_base_for_every_case(where, tmp_path):
    from lofa.lora.train import LoraTrainConfig
    from lofa.lora.zoo import INDEX, Zoo, same_zoo, zoo_header
    from lofa.models.generator import Generator
    from lofa.run import Run

    scale, task = where.parent.name, where.name
    if not (where / "zoo").exists():
        pytest.skip(f"no zoo shipped for {scale}/{task}")
    manifest = pretrained.verify(scale, task)
    run = Run(scale, "cpu", manifest["seed"], tmp_path / "run")
    world = run.world(task)
    gen = Generator.load(where / "base" / "generator")
    index = json.loads((where / "zoo" / INDEX).read_text())
    # the preset must still be the shipped zoo's recipe, or `make reproduce` would silently train the zoo on the CPU
    assert same_zoo(index, zoo_header(world, gen, run.config(LoraTrainConfig), run.seed)), \
        f"re-run `lofa pretrain --scale {scale} --task {task} --device cuda --part zoo`"
    zoo = Zoo(where / "zoo")
    assert zoo.case_ids() == [c.id for c in world.cases]  # every case, no cap
    assert {zoo[c]["split"] for c in zoo.case_ids()} == {"train", "heldout"}
    assert manifest["zoo"]["float16_max_relative_delta_error"] < 1e-3
    weights, meta = zoo.load(zoo.case_ids("heldout")[0])
    assert set(weights) == set(gen.lora_target_modules(zoo.config.include_ffn)) and meta["split"] == "heldout"
    assert all(f.A.dtype == torch.float32 and torch.isfinite(f.B).all() and f.B.any() for f in weights.values())


@pytest.mark.parametrize("where", SHIPPED, ids=lambda p: f"{p.parent.name}-{p.name}")
def test_the_zoo_header_computed_on_the_shipped_base_is_the_shipped_zoos_own(where, tmp_path):
    """The header `zoo_header` computes for the run's recipe on the shipped base equals the shipped index's on
    every key the index records (t_sampling / t_mean / t_std now come from the base generator), bar the fields
    that do not change a LoRA; keys the index lacks are fields added since, at their defaults. Otherwise a run
    would retrain the zoo instead of installing it."""
    from dataclasses import MISSING, fields

    from lofa.lora.train import LoraTrainConfig
    from lofa.lora.zoo import _FREE_FIELDS, INDEX, zoo_header
    from lofa.models.generator import Generator
    from lofa.run import Run

    scale, task = where.parent.name, where.name
    if not (where / "zoo").exists():
        pytest.skip(f"no zoo shipped for {scale}/{task}")
    run = Run(scale, "cpu", pretrained.verify(scale, task)["seed"], tmp_path / "run")
    gen = Generator.load(where / "base" / "generator")
    shipped = {k: v for k, v in json.loads((where / "zoo" / INDEX).read_text()).items() if k != "loras"}
    header = json.loads(json.dumps(zoo_header(run.world(task), gen, run.config(LoraTrainConfig), run.seed)))
    assert {k: v for k, v in header.items() if k != "config"} == {k: v for k, v in shipped.items() if k != "config"}
    recorded = {k: v for k, v in shipped["config"].items() if k not in _FREE_FIELDS}
    assert {k: header["config"][k] for k in recorded} == recorded
    assert {k: header["config"][k] for k in ("t_sampling", "t_mean", "t_std")} == gen.t_distribution.record()
    defaults = {f.name: f.default for f in fields(LoraTrainConfig) if f.default is not MISSING}
    added = {k: v for k, v in header["config"].items() if k not in shipped["config"]}
    assert added == {k: defaults[k] for k in added}


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
    from lofa.run import Run

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
    from lofa.run import Run

    root = tmp_path / "pretrained"
    # a GPU lease has no Jupyter: exporting must not import the notebook runner (it did once, after the training)
    monkeypatch.setitem(sys.modules, "jupyter_client", None)
    for module in ("lofa.kernel", "lofa.reproduce"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    assert main(["pretrain", "--scale", "smoke", "--task", "styles", "--device", "cpu", "--run-root",
                 str(tmp_path / "made"), "--out", str(root / "smoke"), "--workers", "2"]) == 0  # base ‖ evaluators
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


def test_a_run_installs_a_matching_shipped_zoo_and_trains_when_the_lora_recipe_differs(tmp_path, monkeypatch):
    """Smoke scale: `lofa pretrain --part zoo` adds the zoo to a shipped folder; a fresh run installs it (every
    case, the same factors up to float16) without training a LoRA, and another LoRA recipe trains instead."""
    import lofa.lora.zoo as zoo_module
    from lofa.cli import main
    from lofa.run import Run

    root = tmp_path / "pretrained"
    common = ["--scale", "smoke", "--task", "styles", "--device", "cpu", "--out", str(root / "smoke")]
    assert main(["pretrain", *common, "--run-root", str(tmp_path / "made")]) == 0
    monkeypatch.setenv("LOFA_PRETRAINED", str(root))
    assert main(["pretrain", *common, "--run-root", str(tmp_path / "made_zoo"), "--part", "zoo"]) == 0
    manifest = pretrained.verify("smoke", "styles")
    assert manifest["zoo"]["loras"] == len(Run("smoke", "cpu", 0, tmp_path / "x").world("styles").cases)
    assert any(name.startswith("zoo/loras/") for name in manifest["files"])
    trained = zoo_module.Zoo(tmp_path / "made_zoo" / "smoke" / "zoo" / "styles")

    def no_training(*args, **kwargs):
        raise AssertionError("trained although a matching shipped zoo exists")

    monkeypatch.setattr(zoo_module, "train_lora_batch", no_training)
    run = Run("smoke", "cpu", 0, tmp_path / "run")
    installed = run.zoos(("styles",))["styles"]
    assert installed.case_ids() == trained.case_ids()
    case = installed.case_ids()[0]
    for name, f in installed.load(case)[0].items():
        exact = trained.load(case)[0][name].delta_w
        assert (f.delta_w - exact).norm() / exact.norm() < 1e-3  # float16 factors
    other = Run("smoke", "cpu", 0, tmp_path / "other", overrides={"LoraTrainConfig": {"steps": 11}})
    with pytest.raises(AssertionError, match="trained although"):
        other.zoo("styles")
