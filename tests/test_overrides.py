"""Overrides are validated when a Run is made, before anything is trained: an unknown config name, a misspelled
field and a value of the wrong type are each one LofaError line naming what is valid."""
import dataclasses
import importlib
import re

import pytest

from lofa import config
from lofa.config import OVERRIDABLE, SCALES, load_overrides, validate_overrides
from lofa.errors import LofaError
from lofa.run import Run
from lofa.reproduce import REPO_DIR


@pytest.mark.parametrize("overrides, message", [
    ({"LoraTrainConfg": {"steps": 3}}, "unknown config 'LoraTrainConfg'; valid names: BaseTrainConfig, EvalConfig"),
    ({"VideoDiTConfig": {"depth": 2}}, "unknown config 'VideoDiTConfig'"),  # a config no run reads from here
    ({"Stage2TrainConfig": {"stpes": 300}}, "Stage2TrainConfig has no field 'stpes'; valid fields: steps, lr,"),
    ({"world.actions": {"frame": 4}}, "ActionsConfig has no field 'frame'; valid fields: frames,"),
    ({"LoraTrainConfig": {"steps": "300"}}, "LoraTrainConfig.steps: '300' is not of type int"),
    ({"LoraTrainConfig": {"lr": "1e-3"}}, "LoraTrainConfig.lr: '1e-3' is not of type float"),  # YAML's 1e-3
    ({"LoraTrainConfig": {"include_ffn": 1}}, "LoraTrainConfig.include_ffn: 1 is not of type bool"),
    ({"TrainConfig": {"betas": [0.9]}}, "TrainConfig.betas: [0.9] is not of type tuple[float, float]"),
    ({"ZooConfig": {"max_cases": 2.5}}, "ZooConfig.max_cases: 2.5 is not of type int | None"),
    ({"ZooConfig": [1, 2]}, "overrides ZooConfig: give a mapping of field: value"),
    ({"LoraTrainConfig": {"task_overrides": {"faces": {"steps": 3}}}}, "unknown task 'faces'; valid tasks: actions"),
    ({"LoraTrainConfig": {"task_overrides": {"identities": {"stpes": 3}}}},
     "LoraTrainConfig.task_overrides.identities: LoraTrainConfig has no field 'stpes'"),
    ([1, 2], "overrides must map config names to {field: value}, not list"),
    ({"TripletConfig": {"t_mean": 0.0}}, "overrides TripletConfig: t_mean belongs to the base generator now; set it "
                                         "under BaseTrainConfig"),
    ({"LoraTrainConfig": {"task_overrides": {"styles": {"t_std": 1.0}}}}, "t_std belongs to the base generator now"),
])
def test_bad_overrides_fail_at_run_construction_in_one_line(tmp_path, overrides, message):
    with pytest.raises(LofaError) as info:
        Run("smoke", "cpu", 0, tmp_path / "run", overrides=overrides)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()  # nothing was written, let alone trained


def test_good_overrides_pass_and_reach_the_configs(tmp_path):
    from lofa.hypernet.train import TrainConfig
    from lofa.lora.train import LoraTrainConfig
    from lofa.lora.zoo import ZooConfig

    run = Run("smoke", "cpu", 0, tmp_path, overrides={
        "LoraTrainConfig": {"steps": 3, "lr": 1, "task_overrides": {"styles": {"rank": 2}}},  # an int for a float
        "ZooConfig": {"max_cases": None}, "TrainConfig": {"betas": [0.8, 0.9]}, "EvalConfig": None})
    assert run.config(LoraTrainConfig).steps == 3 and run.config(LoraTrainConfig).for_task("styles").rank == 2
    assert run.config(ZooConfig).max_cases is None and tuple(run.config(TrainConfig).betas) == (0.8, 0.9)


def test_an_overrides_file_is_validated_too(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("Stage2TrainConfig:\n  stpes: 300\n")
    with pytest.raises(LofaError, match="has no field 'stpes'"):
        Run("smoke", "cpu", 0, tmp_path / "run", overrides=typo)
    broken = tmp_path / "broken.yaml"
    broken.write_text("Stage2TrainConfig: {steps: [\n")
    with pytest.raises(LofaError, match=r"broken.yaml is not valid YAML \(line \d+\)"):
        load_overrides(broken)
    with pytest.raises(LofaError, match="overrides file .*missing.yaml not found"):
        load_overrides(tmp_path / "missing.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing overridden\n")
    assert load_overrides(empty) == {} and load_overrides(None) == {}


def test_lofa_train_with_a_misspelled_field_fails_before_training(tmp_path, capsys):
    from lofa.cli import main

    typo = tmp_path / "typo.yaml"
    typo.write_text("Stage2TrainConfig:\n  stpes: 300\n")
    assert main(["train", "--setting", "styles", "--scale", "smoke", "--device", "cpu",
                 "--run-root", str(tmp_path / "runs"), "--overrides", str(typo)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Stage2TrainConfig has no field 'stpes'; valid fields: steps" in err
    assert not (tmp_path / "runs").exists()


def test_every_config_a_run_reads_can_be_overridden():
    """Each class passed to `.config(...)` in lofa/ or the notebooks is in OVERRIDABLE (else its overrides would
    be refused), and every name there is a dataclass with scale presets."""
    sources = [p.read_text() for p in (REPO_DIR / "lofa").rglob("*.py")]
    sources += [p.read_text() for p in (REPO_DIR / "notebooks").glob("*.ipynb")]
    read = {name for text in sources for name in re.findall(r"\.config\((\w+)\)", text)}
    assert read and read <= set(OVERRIDABLE), sorted(read - set(OVERRIDABLE))
    for module, cls_name in OVERRIDABLE.values():
        cls = getattr(importlib.import_module(module), cls_name)
        assert dataclasses.is_dataclass(cls) and isinstance(getattr(cls, "PRESETS", None), dict), cls_name


@pytest.mark.parametrize("name", sorted(OVERRIDABLE))
def test_the_presets_themselves_pass_validation(name):
    """The type check refuses nothing the shipped presets use (tuples, ints for floats, None for optionals)."""
    module, cls_name = OVERRIDABLE[name]
    cls = getattr(importlib.import_module(module), cls_name)
    for scale in SCALES:
        fields = dataclasses.asdict(config.preset(cls, scale))
        validate_overrides({name: fields})
