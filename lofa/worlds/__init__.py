"""Procedural mini worlds, one per paper task; they stand in for MotionX, the stylization data and FFHQ.

    world = make_world("actions", scale="mini", seed=0)      # or "styles", "identities"
    world.cases[i]                 Case(id, name, attrs, coarse, split)
    world.ids("train" | "heldout") case ids; held-out cases are unseen combinations of seen components
    world.render(ids, seed)        videos [N, 3, T, H, W] / images [N, 3, H, W] in [-1, 1], appearance random per
                                   sample, deterministic given (ids, seed)
    world.condition(ids, seed)     actions: pose videos [N, 3, T, H, W]; styles: style reference images of other
                                   content [N, 3, H, W]; identities: reference faces [N, 3, H, W]
    world.prompt(id, v, split)     fine-grained prompt, v < world.n_prompts(split), split "train" | "eval"
    world.coarse_prompt(k, v)      category-level caption (what base models are trained on), any int v
    world.sample(ids, seed)        renders + captions that also name per-sample content / context
    world.describe()               pandas DataFrame of the cases
    world.shape                    (3, T, H, W) or (3, H, W)

The seed of make_world fixes the split (and the identities); render / condition seeds fix appearance only.
Each world's module docstring describes its case space, prompts and conditions.
"""
from __future__ import annotations

from pathlib import Path

from lofa.config import preset
from lofa.errors import LofaError
from lofa.worlds.actions import ActionsConfig, ActionsWorld
from lofa.worlds.world import Case, World
from lofa.worlds.identities import IdentitiesConfig, IdentitiesWorld
from lofa.worlds.styles import StylesConfig, StylesWorld

WORLD_TASKS = ("actions", "styles", "identities")
_WORLDS = {"actions": (ActionsWorld, ActionsConfig), "styles": (StylesWorld, StylesConfig),
           "identities": (IdentitiesWorld, IdentitiesConfig)}


def world_class(task: str) -> type[World]:
    """The World subclass of a paper task (its class attributes, e.g. `modality`, without building a world)."""
    if task not in _WORLDS:
        raise LofaError(f"unknown world task {task!r}; choose one of {', '.join(WORLD_TASKS)}")
    return _WORLDS[task][0]


def make_world(task: str, scale: str = "mini", seed: int = 0, overrides: dict | str | Path | None = None) -> World:
    """The world of a paper task at a scale preset ("smoke" | "mini" | "full"), config fields overridden by a dict
    or a YAML file."""
    if task not in _WORLDS:
        raise LofaError(f"unknown world task {task!r}; choose one of {', '.join(WORLD_TASKS)}")
    world_cls, cfg_cls = _WORLDS[task]
    return world_cls(preset(cfg_cls, scale, overrides), seed)


__all__ = ["WORLD_TASKS", "Case", "World", "make_world", "world_class", "ActionsWorld", "ActionsConfig", "StylesWorld",
           "StylesConfig", "IdentitiesWorld", "IdentitiesConfig"]
