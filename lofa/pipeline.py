"""The pipeline's artifacts, one cached step each, for the notebooks to call.

    run = Run(scale, device, seed, run_dir)          # the four parameters every notebook receives
    world = run.world("actions")                     # procedural, nothing stored
    gen = run.base("actions")                        # runs/<scale>/base/actions/      (notebook 02)
    ev = run.evaluators("actions")                   # runs/<scale>/evaluators/actions/ (notebook 02)
    enc = run.condition_encoder("actions")           # runs/<scale>/encoders/actions/  (pose / image encoders)
    zoo = run.zoo("actions")                         # runs/<scale>/zoo/actions/        (notebook 03)
    run.fig("02_base_samples.png")                   # runs/<scale>/figures/02_base_samples.png

Each step trains what is missing and loads what is complete (the step functions resume after an interruption),
so a notebook can ask for any upstream artifact. Configs are the scale's presets with optional overrides from a
YAML file whose top-level keys are config class names, e.g. `LoraTrainConfig: {steps: 300}`.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from lofa.config import preset
from lofa.errors import LofaError

TASKS = ("actions", "styles", "identities")
# The paper's four personalisation settings: (name, world task, condition kind).
SETTINGS = (("actions-text", "actions", "text"), ("actions-pose", "actions", "pose"),
            ("styles", "styles", "image"), ("identities", "identities", "image"))


class Run:
    """The artifacts of one pipeline run at one scale. Cheap to build; every artifact is loaded lazily."""

    def __init__(self, scale: str = "mini", device: str = "cpu", seed: int = 0, run_dir: str | Path | None = None,
                 overrides: str | Path | dict | None = None):
        self.scale, self.device, self.seed = scale, torch.device(device), seed
        self.dir = Path(run_dir) if run_dir else Path("runs") / scale
        if isinstance(overrides, (str, Path)):
            import yaml

            overrides = yaml.safe_load(Path(overrides).read_text()) or {}
        self.overrides = overrides or {}
        (self.dir / "figures").mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ configs and paths
    def config(self, cls):
        """`cls` at this run's scale, with this run's overrides for it."""
        return preset(cls, self.scale, self.overrides.get(cls.__name__))

    def fig(self, name: str) -> Path:
        return self.dir / "figures" / name

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    # ------------------------------------------------------------------ steps
    @functools.cache
    def world(self, task: str):
        from lofa.worlds import make_world

        _check_task(task)
        return make_world(task, "smoke" if self.scale == "smoke" else ("full" if self.scale == "full" else "mini"),
                          seed=self.seed, overrides=self.overrides.get(f"world.{task}"))

    @functools.cache
    def base(self, task: str, progress: bool = True):
        """The base generator of `task`, trained from scratch on coarse captions (issue: mini worlds)."""
        from lofa.models.train_base import BaseTrainConfig, train_base

        return train_base(self.world(task), self.config(BaseTrainConfig), self.path("base", task), self.device,
                          seed=self.seed, progress=progress)

    @functools.cache
    def evaluators(self, task: str):
        """Evaluators trained on ground-truth renders only, with their own seed stream (seed + 10_000)."""
        from lofa.metrics.evaluators import EvalConfig, train_evaluators

        return train_evaluators(self.world(task), self.config(EvalConfig), self.path("evaluators", task),
                                self.device, seed=self.seed + 10_000)

    @functools.cache
    def condition_encoder(self, task: str, progress: bool = True):
        """The pose (actions) or reference-image (styles, identities) encoder, contrastively pre-trained in the
        world on training cases; the paper's 3D-conv pose encoder / CLIP-ViT-L + MLP stand-in."""
        from lofa.io import write_json
        from lofa.models.cond_encoders import (encoder_for_world, load_condition_encoder, train_condition_encoder,
                                               world_pairs)

        out = self.path("encoders", task)
        if (out / "encoder.safetensors").exists() and (out / "summary.json").exists():
            return load_condition_encoder(out / "encoder.safetensors", self.device)
        world = self.world(task)
        enc = encoder_for_world(world, self.scale).to(self.device)
        steps = {"smoke": 20, "mini": 400}.get(self.scale, 2000)
        log = train_condition_encoder(enc, world_pairs(world), world.ids("train"), steps=steps, seed=self.seed,
                                      device=self.device, eval_ids=world.ids("heldout"), progress=progress)
        enc.save(out / "encoder.safetensors")
        write_json(out / "summary.json", log)
        return enc.eval()

    @functools.cache
    def zoo(self, task: str, progress: bool = True):
        """One LoRA per case — train and held-out cases: held-out LoRAs are the per-case baseline."""
        from lofa.lora.train import LoraTrainConfig
        from lofa.lora.zoo import build_zoo

        return build_zoo(self.world(task), self.base(task), self.config(LoraTrainConfig), self.path("zoo", task),
                         self.device, seed=self.seed, progress=progress)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise LofaError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
