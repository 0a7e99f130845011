"""The training loop of the package's small auxiliary networks, which differ only in what they train and on which
loss: the evaluators' roles (`lofa.metrics.evaluators.fit`) and the condition encoders' contrastive pre-training
(`lofa.models.cond_encoders.train_condition_encoder`).

AdamW under a one-cycle schedule (10 % warm-up), optional gradient-norm clipping, and a non-finite check of the
loss and the gradient norm before every optimizer step. These networks train in minutes and keep no checkpoint;
the generators, the hypernetwork and the LoRAs have their own loops (resumable, or batched over many LoRAs).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lofa.faults import check_finite


def one_cycle(module: nn.Module, loss_fn: Callable[[int], torch.Tensor], steps: int, *, lr: float,
              weight_decay: float, clip: float | None, what: str, fix: str, desc: str,
              progress: bool = True) -> list[float]:
    """Train `module` for `steps` AdamW steps whose learning rate follows a one-cycle schedule peaking at `lr`.

    loss_fn(step) -> the 0-d loss of 0-based step `step` (it draws its own batch); clip: the gradient-norm clip, or
    None for none (the gradient norm is then only measured, for the check). A NaN or inf loss or gradient norm
    stops training with a LofaError "<what> loss ..." / "<what> gradient norm ..." naming the step and `fix`,
    before the optimizer step, so no weight gets it. The module trains in train mode and comes back in eval mode.
    Returns the loss of every step [steps].
    """
    params = list(module.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(steps, 1), pct_start=0.1)
    module.train()
    losses = []
    for step in (bar := tqdm(range(steps), desc=desc, leave=False, disable=not progress)):
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is None:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        # before the optimizer step, so no weight gets a NaN; a finite loss can still have an inf gradient
        check_finite(loss.detach(), f"{what} loss", step + 1, fix=fix)
        check_finite(grad_norm, f"{what} gradient norm", step + 1, fix=fix)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    module.eval()
    return losses
