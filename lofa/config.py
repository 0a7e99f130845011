"""Scale presets for config dataclasses, with YAML / dict overrides.

Every config dataclass in lofa sits beside the module it configures (peft style) and carries a class attribute
`PRESETS: dict[str, dict]` mapping a scale name to the fields that differ from the dataclass defaults.
`preset(Cls, scale, overrides)` builds an instance. Nothing is hard-coded to the miniature: the `wan` / `paper`
presets carry real-scale values and users can override any field.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

from lofa.errors import LofaError

SCALES = ("smoke", "mini", "full", "wan", "paper")

T = TypeVar("T")


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
