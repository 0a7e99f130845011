"""Scale presets for config dataclasses, with YAML / dict overrides.

Every config dataclass in lofa sits beside the module it configures (peft style) and carries a class attribute
`PRESETS: dict[str, dict]` mapping a scale name to the fields that differ from the dataclass defaults.
`preset(Cls, scale, overrides)` builds an instance. Nothing is hard-coded to the miniature: the `wan` / `paper`
presets carry real-scale values and users can override any field.
"""
from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

from lofa.errors import LofaError

SCALES = ("smoke", "mini", "full", "wan", "paper")

T = TypeVar("T")

# The paper's response threshold τ: an entry of a weight matrix responds to a LoRA when |ΔW| / |W| > τ (2 %). Every
# default τ in the package (response maps, Stage I targets, the CLI) is this one.
TAU = 0.02


def preset(cls: type[T], scale: str = "mini", overrides: dict | str | Path | None = None) -> T:
    """Instance of `cls` at `scale`, then `overrides` (a dict or a YAML file path) on top.

    Unknown field names are refused, so a typo in a YAML override fails loudly instead of being ignored.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    presets = getattr(cls, "PRESETS", {})
    fields = dict(presets.get(scale, {}))
    if overrides is not None:
        if isinstance(overrides, (str, Path)):
            import yaml

            overrides = yaml.safe_load(Path(overrides).read_text()) or {}
        fields.update(overrides)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; valid fields: {sorted(names)}")
    return cls(**fields)


def for_task(cfg: T, task: str) -> T:
    """`cfg` with `cfg.task_overrides[task]` applied; the result carries no task_overrides of its own.

    A config with a `task_overrides: {task: {field: value}}` field gives one world a recipe of its own (e.g. more
    LoRA steps for identities) while the preset stays one dataclass per scale. Unknown field names are refused.
    """
    fields = cfg.task_overrides.get(task, {})
    allowed = {f.name for f in dataclasses.fields(cfg)} - {"task_overrides"}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise LofaError(f"{type(cfg).__name__}.task_overrides[{task!r}] has unknown field(s) {unknown}; valid "
                        f"fields: {sorted(allowed)}")
    return dataclasses.replace(cfg, **fields, task_overrides={})


def as_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def as_record(cfg: Any) -> dict:
    """`as_dict(cfg)` as a run records it to recognise its artifacts (summary.json, fingerprints): without the
    fields the class lists in `RECORDED_IF_SET` while they hold their defaults. Those fields came after models were
    shipped under the old record; left out at their defaults, the shipped models still match."""
    record = as_dict(cfg)
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for name in getattr(type(cfg), "RECORDED_IF_SET", ()):
        if record[name] == defaults[name]:
            del record[name]
    return record


STORAGE_DTYPES = ("float32", "bfloat16", "float16")


def storage_dtype(name: str):
    """The torch dtype a `save_dtype` field names (one of STORAGE_DTYPES); anything else is a LofaError."""
    import torch

    if name not in STORAGE_DTYPES:
        raise LofaError(f"unknown save_dtype {name!r}; use one of {', '.join(STORAGE_DTYPES)}")
    return getattr(torch, name)


def resolve_device(device: str) -> str:
    """A --device choice (auto, cpu, cuda) -> "cpu" or "cuda": auto takes the GPU when torch sees one; asking for
    cuda without one is a one-line error."""
    if device not in ("auto", "cpu", "cuda"):
        raise LofaError(f"unknown device {device!r}; use auto, cpu or cuda")
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LofaError("--device cuda asked for but torch sees no CUDA GPU; use --device cpu or auto")
    return device


# ---------------------------------------------------------------- overrides files
# The config classes a pipeline run reads (`Run.config`, `Run.hypernet_config`, `Run.world`), by the name an
# overrides file gives them -> (module, class). A name outside this table would be read by nothing, so it is refused.
OVERRIDABLE = {
    "BaseTrainConfig": ("lofa.models.train_base", "BaseTrainConfig"),
    "EvalConfig": ("lofa.metrics.evaluators", "EvalConfig"),
    "LoraTrainConfig": ("lofa.lora.train", "LoraTrainConfig"),
    "ZooConfig": ("lofa.lora.zoo", "ZooConfig"),
    "TripletConfig": ("lofa.hypernet.data", "TripletConfig"),
    "HyperConfig": ("lofa.hypernet.config", "HyperConfig"),
    "TrainConfig": ("lofa.hypernet.train", "TrainConfig"),
    "Stage2TrainConfig": ("lofa.hypernet.train", "Stage2TrainConfig"),
    "TextToLoraConfig": ("lofa.baselines.text_to_lora", "TextToLoraConfig"),
    "HyperDreamBoothConfig": ("lofa.baselines.hyper_dreambooth", "HyperDreamBoothConfig"),
    "DiffLoraConfig": ("lofa.baselines.diff_lora", "DiffLoraConfig"),
    "GenerateConfig": ("lofa.evaluate", "GenerateConfig"),
    "ScoringConfig": ("lofa.evaluate", "ScoringConfig"),
    "world.actions": ("lofa.worlds.actions", "ActionsConfig"),
    "world.styles": ("lofa.worlds.styles", "StylesConfig"),
    "world.identities": ("lofa.worlds.identities", "IdentitiesConfig"),
}
TASKS = ("actions", "styles", "identities")  # the keys of a `task_overrides` field


def for_tasks(name: str, tasks: Sequence[str]) -> bool:
    """Whether the file `name` is one a run of `tasks` makes: a name holding a task's name ("01_styles_gallery.png",
    "07_fig4_actions_text.png") is that task's; any other is every run's."""
    return not any(task in Path(name).name and task not in tasks for task in TASKS)
# Fields LoraTrainConfig and TripletConfig once had that now live in BaseTrainConfig (the base generator's t
# distribution): an overrides file that still sets them there is told where they went.
MOVED_TO_BASE = ("t_sampling", "t_mean", "t_std")


def load_overrides(source: str | Path | dict | None) -> dict:
    """Overrides {config name: {field: value}} from a YAML file or a dict, validated (`validate_overrides`)."""
    if source is None:
        return {}
    if isinstance(source, (str, Path)):
        import yaml

        path = Path(source)
        if not path.is_file():
            raise LofaError(f"overrides file {path} not found; give a YAML file of {{ConfigClass: {{field: value}}}}")
        try:
            source = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            line = f" (line {where.line + 1})" if where is not None else ""
            raise LofaError(f"overrides file {path} is not valid YAML{line}; write {{ConfigClass: {{field: value}}}}") \
                from None
    validate_overrides(source)
    return source


def validate_overrides(overrides: Any) -> None:
    """Refuse, in one line naming what is valid, an overrides mapping with an unknown config name, an unknown
    field or a value of the wrong type, before anything is trained (a typo would otherwise surface only when its
    config is first read, minutes into a run, or never)."""
    if not isinstance(overrides, dict):
        raise LofaError(f"overrides must map config names to {{field: value}}, not {type(overrides).__name__}")
    for name, fields in overrides.items():
        if name not in OVERRIDABLE:
            raise LofaError(f"overrides name an unknown config {name!r}; valid names: {', '.join(OVERRIDABLE)}")
        module, cls_name = OVERRIDABLE[name]
        check_fields(f"overrides {name}", getattr(importlib.import_module(module), cls_name), fields)


def check_fields(where: str, cls: type, fields: Any, allow_task_overrides: bool = True,
                 task: str | None = None) -> None:
    """Refuse (LofaError, one line starting with `where`) a {field: value} mapping for the dataclass `cls` with an
    unknown field or a value whose type does not fit the field's annotation. None stands for no fields."""
    if fields is None:
        return  # `ZooConfig:` with nothing under it, as YAML reads an empty section
    if not isinstance(fields, dict):
        raise LofaError(f"{where}: give a mapping of field: value, not {fields!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls) if allow_task_overrides or f.name != "task_overrides"]
    for field, value in fields.items():
        if field in MOVED_TO_BASE and field not in valid:
            # LoRA training and Stage II read the t distribution the base generator was trained with
            raise LofaError(f"{where}: {field} belongs to the base generator now; set it under BaseTrainConfig "
                            "(LoRA training and Stage II draw t from the base's distribution)")
        if field not in valid:
            raise LofaError(f"{where}: {cls.__name__} has no field {field!r}; valid fields: "
                            f"{', '.join(valid)}")
        if not _conforms(value, hints[field]):
            raise LofaError(f"{where}.{field}: {value!r} is not of type {_type_name(hints[field])}")
        if field == "model_overrides":
            _check_model_overrides(f"{where}.model_overrides", value, task)
        if field == "task_overrides":
            for task_name, task_fields in value.items():
                if task_name not in TASKS:
                    raise LofaError(f"{where}.task_overrides: unknown task {task_name!r}; valid tasks: "
                                    f"{', '.join(TASKS)}")
                check_fields(f"{where}.task_overrides.{task_name}", cls, task_fields, allow_task_overrides=False,
                             task=task_name)


def _check_model_overrides(where: str, fields: dict, task: str | None) -> None:
    """BaseTrainConfig.model_overrides are fields of the task's generator config (VideoDiTConfig for video worlds,
    ImageUNetConfig for image worlds); without a task they apply to every task's base, so they must fit each."""
    from lofa.models.generator import GENERATOR_CONFIGS
    from lofa.models.train_base import KIND_BY_MODALITY
    from lofa.worlds import world_class

    tasks = TASKS if task is None else (task,)
    kinds = sorted({KIND_BY_MODALITY[world_class(t).modality] for t in tasks})
    for kind in kinds:
        check_fields(where, GENERATOR_CONFIGS[kind], fields, allow_task_overrides=False)


def _conforms(value: Any, hint: Any) -> bool:
    """Whether `value` (as YAML reads it) fits the annotation `hint`; annotations it cannot judge pass."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # YAML reads 1e-3 as a string (no dot before the e): refused here, not deep in training
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (list, tuple) or origin in (list, tuple):  # YAML has no tuples: a list stands for one
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and Ellipsis not in args:  # tuple[float, float]: that many, each its type
            return len(value) == len(args) and all(_conforms(v, a) for v, a in zip(value, args))
        item = args[0] if args else Any
        return all(_conforms(v, item) for v in value)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
