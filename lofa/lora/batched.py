"""Batched multi-LoRA training: G LoRAs in one forward/backward, each sample routed to its own LoRA.

Every target nn.Linear is wrapped by a `GroupedLoraLinear` holding G stacked adapters A [G, r, in], B [G, out, r]:
    y[n] = W x[n] + b + scale · B[g_n] (A[g_n] x[n])
with g_n the adapter of sample n. The batch is the G LoRAs' batches concatenated, the loss the sum of per-LoRA
means, each LoRA's gradient clipped on its own, and AdamW's per-element state keeps G independent optimizers, so
each LoRA ends at the weights `lofa.lora.train.train_lora` reaches alone (tests/test_lora_train.py). One big
batch replaces G small ones: on a GPU the small ones are launch-bound, so G LoRAs cost little more than one.

The same layer serves generation with many LoRAs at once (`multi_lora`): route samples to LoRAs and sample.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from typing import Iterator

import torch
from torch import nn

from lofa.errors import LofaError
from lofa.lora.formats import LoraFactor, LoraWeights
from lofa.lora.train import (DIVERGED_FIX, CaseStream, LoraTrainConfig, _dtype, check_lora, divergence, frozen,
                             train_steps)
from lofa.models.text import text_encoder


class GroupedLoraLinear(nn.Module):
    """An nn.Linear plus G LoRAs, sample n routed to LoRA index[n].

    base: the wrapped layer (frozen); lora_A [G, r, in]; lora_B [G, out, r]; scale: alpha / r.
    Input x [N, ..., in] with N the routed batch, or a multiple k·N of it (k stacked copies of the batch, as
    classifier-free guidance runs [cond; uncond]).
    """

    def __init__(self, base: nn.Linear, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(lora_A)
        self.lora_B = nn.Parameter(lora_B)
        self.scale = scale
        self.index: torch.Tensor | None = None
        self.sorted = False  # index == arange(G).repeat_interleave(N / G): no gather needed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.index is None:
            raise LofaError("grouped LoRA layer called before routing; call GroupedLora.route(index) first")
        n, routed = x.shape[0], len(self.index)
        h = x.reshape(n, -1, x.shape[-1])
        if n == routed and self.sorted:
            g = self.lora_A.shape[0]
            delta = (h.reshape(g, -1, h.shape[-1]) @ self.lora_A.mT) @ self.lora_B.mT
        else:
            if n % routed:
                raise LofaError(f"batch of {n} samples does not match the {routed} routed ones; route every sample")
            index = self.index.repeat(n // routed)
            delta = (h @ self.lora_A[index].mT) @ self.lora_B[index].mT
        return y + self.scale * delta.reshape(y.shape)


class GroupedLora:
    """The grouped layers installed in a network: routing, parameters, and each LoRA's factors."""

    def __init__(self, layers: dict[str, GroupedLoraLinear]):
        self.layers = layers

    @property
    def n_groups(self) -> int:
        return next(iter(self.layers.values())).lora_A.shape[0]

    def route(self, index: torch.Tensor) -> None:
        """index [N] long: the LoRA of each sample of the next forward passes."""
        index = torch.as_tensor(index, dtype=torch.long)
        if index.min() < 0 or index.max() >= self.n_groups:
            raise LofaError(f"LoRA index out of range [0, {self.n_groups}); got {index.min()}..{index.max()}")
        per = len(index) // self.n_groups
        is_sorted = len(index) % self.n_groups == 0 and torch.equal(
            index.cpu(), torch.arange(self.n_groups).repeat_interleave(per))
        device = next(iter(self.layers.values())).lora_A.device
        index = index.to(device)
        for layer in self.layers.values():
            layer.index, layer.sorted = index, is_sorted

    def parameters(self, train_a: bool = True) -> list[torch.Tensor]:
        """The stacked factors to train: every layer's A and B, or its B alone (A frozen) when not train_a."""
        for layer in self.layers.values():
            layer.lora_A.requires_grad_(train_a)
        return [p for layer in self.layers.values() for p in ((layer.lora_A, layer.lora_B) if train_a
                                                              else (layer.lora_B,))]

    def weights(self, g: int, alpha: float) -> LoraWeights:
        """LoRA g as {module_name: LoraFactor(A [r, in], B [out, r], alpha)}."""
        return {name: LoraFactor(layer.lora_A[g].detach().clone(), layer.lora_B[g].detach().clone(), float(alpha))
                for name, layer in self.layers.items()}


@contextlib.contextmanager
def grouped_lora(net: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float
                 ) -> Iterator[GroupedLora]:
    """Wrap each named nn.Linear of `net` in a GroupedLoraLinear for the block; the plain layers come back after.

    factors: {module_name: (A [G, r, in], B [G, out, r])}.
    """
    swapped = {}
    try:
        for name, (a, b) in factors.items():
            base = net.get_submodule(name)
            if not isinstance(base, nn.Linear):
                raise LofaError(f"{name!r} is a {type(base).__name__}, not a linear layer; grouped LoRA wraps "
                                f"nn.Linear targets only")
            parent, _, child = name.rpartition(".")
            owner = net.get_submodule(parent) if parent else net
            w = base.weight
            setattr(owner, child, GroupedLoraLinear(base, a.to(w.device, w.dtype), b.to(w.device, w.dtype), scale))
            swapped[name] = (owner, child, base)
        yield GroupedLora({name: getattr(owner, child) for name, (owner, child, _) in swapped.items()})
    finally:
        for owner, child, base in swapped.values():
            setattr(owner, child, base)


@contextlib.contextmanager
def multi_lora(gen, loras: list[LoraWeights]) -> Iterator[GroupedLora]:
    """Run `gen` with G LoRAs at once (e.g. sample every LoRA of a zoo in one batch); route samples, then call.

    LoRAs may differ in rank (padded with zeros) and in modules (absent ones contribute nothing); each LoRA's
    alpha / r is folded into its B.
    """
    net = getattr(gen, "net", gen)
    for weights in loras:
        check_lora(net, weights)
    names = list(dict.fromkeys(name for weights in loras for name in weights))
    rank = max(f.A.shape[0] for weights in loras for f in weights.values())
    factors = {}
    for name in names:
        out_f, in_f = net.get_submodule(name).weight.shape
        a, b = torch.zeros(len(loras), rank, in_f), torch.zeros(len(loras), out_f, rank)
        for g, weights in enumerate(loras):
            if name in weights:
                f = weights[name]
                r = f.A.shape[0]
                a[g, :r], b[g, :, :r] = f.A, f.B * (f.alpha / r)
        factors[name] = (a, b)
    with grouped_lora(net, factors, scale=1.0) as lora:
        yield lora


def _clip_per_lora(params: list[torch.Tensor], max_norm: float) -> None:
    """clip_grad_norm_ applied to each LoRA g on its own; params are stacks [G, ...]."""
    sq = sum(p.grad.pow(2).flatten(1).sum(1) for p in params)
    coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(coef.view(-1, *([1] * (p.ndim - 1))))


def train_lora_batch(gen, world, case_ids: list[int], cfg: LoraTrainConfig, seed: int = 0, device="cpu", *,
                     text=None, progress: bool = False, replicate: int = 0, new_renders: bool = False
                     ) -> list[tuple[LoraWeights, dict]]:
    """Train one LoRA per case in `case_ids`, all in one forward/backward per step; `gen` comes back unchanged.

    Same recipe, data and randomness per case as `train_lora`, so the same weights. Returns [(weights, metadata)]
    in case order; metadata's wall_time_s is this batch's wall time divided by its number of LoRAs.
    replicate > 0 trains on another draw of the training stream (same init; same renders unless `new_renders`): see
    lofa.bench.lora_replicates.

    A LoRA whose loss or factors go NaN or inf (`divergence`) is reported with a warning and retrained alone, in a
    group of one; the group's other LoRAs are kept as they are (each LoRA has its own samples, loss, gradient
    clipping and optimizer state, so a diverging one changes nothing of the others). A LoRA that diverges alone too
    raises a LofaError naming its case.
    """
    if not case_ids:
        return []
    cfg = cfg.for_task(world.task)
    text = text_encoder(text, device)
    start = time.perf_counter()
    streams = [CaseStream(world, text, c, cfg, seed, device, _dtype(gen), replicate, new_renders,
                          t_distribution=gen.t_distribution) for c in case_ids]
    targets = gen.lora_target_modules(cfg.include_ffn)
    shapes = {n: tuple(gen.net.get_submodule(n).weight.shape) for n in targets}
    inits = [s.init_factors(shapes) for s in streams]
    factors = {n: (torch.stack([i[n][0] for i in inits]), torch.stack([i[n][1] for i in inits])) for n in targets}
    with frozen(gen), grouped_lora(gen.net, factors, cfg.alpha / cfg.rank) as lora:
        lora.route(torch.arange(len(case_ids)).repeat_interleave(streams[0].samples_per_step))
        losses, prior_losses = train_steps(gen, streams, lora.parameters(cfg.train_a), cfg, _clip_per_lora,
                                           desc=f"{len(case_ids)} LoRAs", progress=progress)
        wall = (time.perf_counter() - start) / len(case_ids)
        results, diverged = [], []
        for g, s in enumerate(streams):
            g_prior = None if prior_losses is None else prior_losses[:, g]
            weights = lora.weights(g, cfg.alpha)
            results.append((weights, s.info(losses[:, g], g_prior, wall, "batched")))
            diverged.append(divergence(losses[:, g], g_prior, weights))
    # outside the grouped layers: a retrain installs its own
    for g, why in enumerate(diverged):
        if why is None:
            continue
        case_id = case_ids[g]
        if len(case_ids) == 1:
            raise LofaError(f"the LoRA of case {case_id} diverged (trained alone): {why}; {DIVERGED_FIX}")
        warnings.warn(f"the LoRA of case {case_id} diverged in a group of {len(case_ids)} ({why}); retraining it "
                      "alone")
        results[g] = train_lora_batch(gen, world, [case_id], cfg, seed, device, text=text, replicate=replicate,
                                      new_renders=new_renders)[0]
    return results
