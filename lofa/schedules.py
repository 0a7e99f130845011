"""The learning-rate schedule of the package's main trainers: linear warm-up, then constant or cosine decay.

    lr(step) = base lr · lr_factor(step, ...)      (torch.optim.lr_scheduler.LambdaLR(optimizer, factor))

Base generators (`lofa.models.train_base`), the hypernetwork's stages and Text-to-LoRA (`lofa.hypernet.train`) and
per-case LoRAs (`lofa.lora.train`) all step it once per optimizer step. diffusers' `get_scheduler` has the same
warm-up and cosine shapes but no floor (`min_ratio`), which the base generators and the hypernetwork decay to.
The evaluators and condition encoders train under torch's one-cycle schedule instead (`lofa.optimise`).
"""
from __future__ import annotations

import math
from functools import partial

import torch

from lofa.errors import LofaError

DECAYS = ("constant", "cosine")


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, decay: str = "cosine",
              min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based).

    Steps 0 .. warmup_steps - 1 rise linearly to 1 ((step + 1) / warmup_steps); after them the factor stays 1
    ("constant") or follows a half cosine from 1 down to `min_ratio` at `total_steps` ("cosine"; it stays at
    `min_ratio` after).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    if decay == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    raise LofaError(f"unknown lr decay {decay!r}; use one of {', '.join(DECAYS)}")


def lr_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, decay: str = "cosine",
                 min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR of `optimizer` that follows `lr_factor` (a bad `decay` is refused here, before training)."""
    if decay not in DECAYS:
        raise LofaError(f"unknown lr decay {decay!r}; use one of {', '.join(DECAYS)}")
    factor = partial(lr_factor, warmup_steps=warmup_steps, total_steps=total_steps, decay=decay,
                     min_ratio=min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
