"""LoFA's two-stage training recipe on a triplet dataset: Stage I on the response maps, then Stage II from it.

One recipe for the pipeline's settings (`lofa.pipeline.Run.hypernet`, data: `lofa.hypernet.data.Triplets`) and for
a researcher's own zoo (`lofa.hypernet.imported`, data: `ZooTriplets`). `data` is anything with Triplets'
interface: spec, base, train_ids, conditions(split), map_density(tau), mean_factors(), batch_fn(...),
monitor_batches(n).

    stage1 = train_stage1(data, cfg, TrainConfig(), out / "stage1", device="cuda", seed=0)
    stage2 = train_stage2(data, stage1, Stage2TrainConfig(), out / "stage2", device="cuda", seed=0)
"""
from __future__ import annotations

from pathlib import Path

import torch

from lofa import seeds
from lofa.hypernet.config import HyperConfig
from lofa.hypernet.model import Stage1, Stage2
from lofa.hypernet.train import Stage1Objective, Stage2Monitor, Stage2Objective, Stage2TrainConfig, TrainConfig, fit


def train_stage1(data, cfg: HyperConfig, train: TrainConfig, out_dir: str | Path, *, device: str, seed: int,
                 progress: bool = True) -> Stage1:
    """Stage I trained (or resumed, or loaded when complete) in out_dir on the data's TRAIN cases; eval mode.

    Its condition normalisation comes from the training conditions, and with balanced BCE its decision threshold
    from the training maps' density (`Stage1.set_map_density`): the plain BCE's logit 0 is calibrated already.
    """
    torch.manual_seed(seeds.stream(seed, "hypernet.init"))
    stage1 = Stage1(cfg, data.spec)
    bank = data.conditions("train")
    train_rows = [bank.row[c] for c in data.train_ids]
    stage1.backbone.set_condition_stats(bank.tokens[train_rows], bank.mask[train_rows])
    if train.map_balance == "balanced":
        density = data.map_density(cfg.tau)
        if 0 < density < 1:
            stage1.set_map_density(density)
    fit(stage1, Stage1Objective(data.base, train, cfg.tau),
        data.batch_fn(train.batch_size, train.matrices_per_sample, seed=seed + train.seed), train, out_dir,
        device=device, progress=progress)
    return stage1.eval()


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
    objective = Stage2Objective(data.base, train, stage1, diffusion)
    monitor = Stage2Monitor(objective, data.monitor_batches(monitor_cases)) if monitor_cases else None
    fit(stage2, objective, data.batch_fn(train.batch_size, seed=seeds.stream(seed + train.seed, "hypernet.stage2")),
        train, out_dir,
        device=device, progress=progress, monitor=monitor)
    return stage2
