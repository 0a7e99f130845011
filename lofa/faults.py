"""A NaN or inf in a training loop as one line: what went non-finite, at which step, and where to resume from.

Every training loop but the LoRA trainers' (hypernetwork Stage I / II and Text-to-LoRA through
`lofa.hypernet.train.fit`, the base generator, the evaluators and condition encoders through
`lofa.optimise.one_cycle`) calls `check_finite` on its loss and gradient norm before the optimizer step, so a
non-finite value stops training before it reaches the weights and no checkpoint is written with it. The LoRA
trainers, whose checkpoints are finished LoRA files, check each LoRA once it is trained instead
(`lofa.lora.train.divergence`): the batched one retrains a diverged LoRA alone.
"""
from __future__ import annotations

import math
import os

import torch

from lofa.errors import LofaError


def check_finite(value: float | torch.Tensor, what: str, step: int,
                 checkpoint: tuple[int, str | os.PathLike] | None = None, fix: str = "lower the learning rate") -> None:
    """Raise LofaError when `value` (a loss or gradient norm: a float or a 0-d tensor) is NaN or inf.

    what: what `value` is, e.g. "Stage II loss"; step: the 1-based number of the step that produced it (the
    numbering of the loops' checkpoints and histories); checkpoint: (step, path) of the last complete checkpoint the
    loop resumes from, or None when it has written none (or keeps none); fix: what to change before starting over.
    """
    value = float(value)
    if math.isfinite(value):
        return
    if checkpoint is None:
        raise LofaError(f"{what} is {value} at step {step} and there is no checkpoint to resume from; {fix} and "
                        "rerun")
    good_step, path = checkpoint
    # Rerunning the same command resumes from the checkpoint (a one-off fault passes); a divergence the recipe
    # causes comes back, and then only a new run with another recipe helps: the checkpoint keeps the old one.
    raise LofaError(f"{what} is {value} at step {step}; the last good checkpoint is step {good_step} at {path}; "
                    f"rerun to resume from it, or {fix} and start over without it")
