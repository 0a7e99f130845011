"""LoFA's two-stage training recipe on a triplet dataset: Stage I on the response maps, then Stage II from it; and
the three hypernetworks of the paper's ablation (Table 4), each trained with Stage II's loop alone.

One recipe for the pipeline's settings (`lofa.run.Run.hypernet`, data: `lofa.hypernet.data.Triplets`) and for
a researcher's own zoo (`lofa.hypernet.imported`, data: `ZooTriplets`). `data` is anything with Triplets'
interface: spec, base, train_ids, conditions(split), map_density(tau), mean_factors(), batch_fn(...),
monitor_batches(n).

    stage1 = train_stage1(data, cfg, TrainConfig(), out / "stage1", device="cuda", seed=0)
    stage2 = train_stage2(data, stage1, Stage2TrainConfig(), out / "stage2", device="cuda", seed=0)
    stage2, stage1 = train_ablation("lightweight", data, cfg, Stage2TrainConfig(), out / "stage2", device="cuda",
                                    seed=0)   # stage1: None for the single-stage ablations

The ablations see what LoFA's Stage II sees: the same Stage2TrainConfig (steps, LoRAs per step, schedule, start,
reconstruction and diffusion terms), the same batches (stream hypernet.stage2), and initial weights from the seed
LoFA's Stage I is initialised from (stream hypernet.init):

- "no_response" (w/o response): one network trained from scratch to predict the LoRA directly: LoFA's Stage II
  architecture without the feature cross-attention (stage2_cross_after = []), no Stage I, no response map.
- "lightweight": Stage I and Stage II as in LoFA, trained jointly by Stage II's loss alone (`JointStages`): Stage II
  is guided by Stage I's implicit features; no response map is ever supervised (no BCE), Stage I's map decoder stays
  at its initialisation.
- "prompt_input": a single stage whose blocks read the condition tokens, with learned per-target queries in place of
  the weight tokens (HyperConfig.input_tokens = "condition", `PromptNet`); the base weights are never read.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from lofa import seeds
from lofa.errors import LofaError
from lofa.hypernet.config import HyperConfig
from lofa.hypernet.model import Backbone, JointStages, Stage1, Stage2
from lofa.hypernet.train import Stage1Objective, Stage2Monitor, Stage2Objective, Stage2TrainConfig, TrainConfig, fit

# The ablations `train_ablation` trains (the paper's Table 4).
ABLATIONS = ("no_response", "lightweight", "prompt_input")


def _set_condition_stats(backbone: Backbone, data) -> None:
    """The backbone's condition standardisation from the data's training conditions."""
    bank = data.conditions("train")
    train_rows = [bank.row[c] for c in data.train_ids]
    backbone.set_condition_stats(bank.tokens[train_rows], bank.mask[train_rows])


def train_stage1(data, cfg: HyperConfig, train: TrainConfig, out_dir: str | Path, *, device: str, seed: int,
                 progress: bool = True) -> Stage1:
    """Stage I trained (or resumed, or loaded when complete) in out_dir on the data's TRAIN cases; eval mode.

    Its condition normalisation comes from the training conditions, and with balanced BCE its decision threshold
    from the training maps' density (`Stage1.set_map_density`): the plain BCE's logit 0 is calibrated already.
    """
    torch.manual_seed(seeds.stream(seed, "hypernet.init"))
    stage1 = Stage1(cfg, data.spec)
    _set_condition_stats(stage1.backbone, data)
    if train.map_balance == "balanced":
        density = data.map_density(cfg.tau)
        if 0 < density < 1:
            stage1.set_map_density(density)
    fit(stage1, Stage1Objective(data.base, train, cfg.tau),
        data.batch_fn(train.batch_size, train.matrices_per_sample, seed=seed + train.seed), train, out_dir,
        device=device, progress=progress)
    return stage1.eval()


def _fit_stage2(data, model: torch.nn.Module, stage1: Stage1 | None, train: Stage2TrainConfig, out_dir: str | Path,
                *, device: str, seed: int, diffusion, monitor_cases: int, progress: bool) -> None:
    """Stage II's loop on `model` (a Stage2, or JointStages), attending to the frozen `stage1` when given."""
    objective = Stage2Objective(data.base, train, stage1, diffusion)
    monitor = Stage2Monitor(objective, data.monitor_batches(monitor_cases)) if monitor_cases else None
    batch_fn = data.batch_fn(train.batch_size, seed=seeds.stream(seed + train.seed, "hypernet.stage2"))
    fit(model, objective, batch_fn, train, out_dir, device=device, progress=progress, monitor=monitor)


def train_stage2(data, stage1: Stage1, train: Stage2TrainConfig, out_dir: str | Path, *, device: str, seed: int,
                 lora_head: str | None = None, diffusion=None, monitor_cases: int = 0,
                 progress: bool = True) -> Stage2:
    """Stage II initialised from `stage1` (its LoRA head from the mean training LoRA when train.start == "mean"),
    trained (or resumed, or loaded) in out_dir with the reconstruction term and, when `diffusion` is given, the
    flow-matching term through the frozen base; `monitor_cases` held-out and training cases' ΔW fidelity is
    followed in the history (0: none). lora_head: None keeps the config's head, or "shared" / "per_target"."""
    stage2 = Stage2.from_stage1(stage1, lora_head)
    if train.start == "mean":
        stage2.lora_head.set_start(data.mean_factors())
    _fit_stage2(data, stage2, stage1, train, out_dir, device=device, seed=seed, diffusion=diffusion,
                monitor_cases=monitor_cases, progress=progress)
    return stage2


def train_ablation(name: str, data, cfg: HyperConfig, train: Stage2TrainConfig, out_dir: str | Path, *,
                   device: str, seed: int, diffusion=None, monitor_cases: int = 0, progress: bool = True
                   ) -> tuple[Stage2, Stage1 | None]:
    """One of the paper's ablations (`ABLATIONS`, see the module docstring) trained (or resumed, or loaded) in out_dir
    with Stage II's loop, objective and batches -> (Stage II, Stage I or None), both in eval mode, for
    `save_pretrained(dir, stage2, stage1)` and the `LoFA` predictor. cfg is LoFA's; the ablation changes what it
    names. The arguments after out_dir are `train_stage2`'s."""
    if name not in ABLATIONS:
        raise LofaError(f"unknown ablation {name!r}; choose one of {', '.join(ABLATIONS)}")
    torch.manual_seed(seeds.stream(seed, "hypernet.init"))
    if name == "lightweight":
        stage1 = Stage1(cfg, data.spec)
        _set_condition_stats(stage1.backbone, data)
        stage2 = Stage2.from_stage1(stage1)
        model = JointStages(stage1, stage2)
    else:
        stage1 = None
        input_tokens = "condition" if name == "prompt_input" else cfg.input_tokens
        stage2 = model = Stage2(replace(cfg, stage2_cross_after=[], input_tokens=input_tokens), data.spec)
        _set_condition_stats(stage2.backbone, data)
        if name == "prompt_input":
            stage2.lora_head.set_units(data.base.rms)
    if train.start == "mean":
        stage2.lora_head.set_start(data.mean_factors())
    _fit_stage2(data, model, None, train, out_dir, device=device, seed=seed, diffusion=diffusion,
                monitor_cases=monitor_cases, progress=progress)
    return stage2.eval(), None if stage1 is None else stage1.eval()
