"""Rectified-flow (flow-matching) loss and Euler sampler, shared by base training, LoRA training, Stage II and
evaluation.

Convention (SD3 / Wan): x_t = (1 - t)·x0 + t·noise with t in [0, 1] (1 = pure noise); the model predicts the
velocity v = noise - x0. `gen` is any callable gen(x_t, t [N], context [N, L, D], context_mask [N, L]) -> v,
e.g. a `lofa.models.Generator` or a functional_call wrapper that plugs predicted LoRA weights into one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from lofa.errors import LofaError

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def randn(shape, generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    """Standard normal drawn on the generator's own device (so a CPU seed gives the same noise everywhere)."""
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source).to(device)


def sample_t(n: int, *, generator: torch.Generator | None = None, device="cpu", mode: str = "logit_normal",
             mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Training times t [n] in (0, 1): sigmoid(N(mean, std)) (SD3: mean 0, std 1; JiT's x0-prediction models use
    mean 0.8, std 0.8 in this convention, i.e. more training near pure noise), or uniform."""
    if mode == "logit_normal":
        return torch.sigmoid(mean + std * randn((n,), generator, device))
    if mode == "uniform":
        source = generator.device if generator is not None else device
        return torch.rand((n,), generator=generator, device=source).to(device)
    raise LofaError(f"unknown t sampling {mode!r}; use 'logit_normal' or 'uniform'")


T_MODES = ("logit_normal", "uniform")

# How a generator's forward passes compute: float32, or under bf16 autocast with float32 weights and latents
# (sampling here, per-case LoRA training in lofa.lora.train).
PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str, what: str = "precision") -> None:
    """LofaError unless `precision` is one of PRECISIONS; `what` names the setting in the message."""
    if precision not in PRECISIONS:
        raise LofaError(f"unknown {what} {precision!r}; use one of {', '.join(PRECISIONS)}")


@dataclass(frozen=True)
class TimeDistribution:
    """How diffusion training draws its times t in (0, 1): sigmoid(N(mean, std)) ("logit_normal") or U(0, 1).

    A property of a base generator: the distribution it was trained with, which `Generator` carries (and saves in
    its folder). LoRA training (`lofa.lora.train.CaseStream`) and Stage II's diffusion term
    (`lofa.hypernet.data.DiffusionLoss`) draw t from the base's own distribution, since a LoRA refines the base's
    own denoising task; with SD3's (0, 1) an x0-predicting base puts most of its velocity loss at t -> 0
    (weight 1 / t^2). The defaults are the from-scratch bases' (`BaseTrainConfig`); Wan's is logit-normal(0, 1)
    (`lofa.models.wan.T_DISTRIBUTION`).
    """

    mode: str = field(default="logit_normal", metadata={
        "help": "How training times t are drawn: 'logit_normal' (sigmoid of N(mean, std)) or 'uniform'."})
    # mean > 0 trains more near pure noise, which x0-prediction needs: with SD3's (0, 1) the first sampling steps
    # (t ≈ 1) produced patch noise that every later step kept
    mean: float = field(default=0.8, metadata={
        "help": "Mean of the normal draw inside logit-normal t sampling; larger trains more near pure noise (t = 1)."})
    std: float = field(default=0.8, metadata={"help": "Std of the normal draw inside logit-normal t sampling."})

    def __post_init__(self):
        if self.mode not in T_MODES:
            raise LofaError(f"unknown t sampling {self.mode!r}; use 'logit_normal' or 'uniform'")

    def sample(self, n: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        """Times t [n] in (0, 1) drawn from `generator` (`sample_t`)."""
        return sample_t(n, generator=generator, device=device, mode=self.mode, mean=self.mean, std=self.std)

    def record(self) -> dict:
        """{"t_sampling", "t_mean", "t_std"}: the distribution under the keys training recipes store it with
        (BaseTrainConfig's fields; a zoo's recipe and its LoRAs' metadata)."""
        return {"t_sampling": self.mode, "t_mean": self.mean, "t_std": self.std}

    @classmethod
    def from_record(cls, record: dict) -> "TimeDistribution":
        """Inverse of `record`: the distribution of a recipe holding t_sampling / t_mean / t_std (other keys are
        ignored), e.g. a BaseTrainConfig's `as_dict`."""
        return cls(mode=record["t_sampling"], mean=record["t_mean"], std=record["t_std"])

    def to_json(self) -> dict:
        """{"mode", "mean", "std"}, as a generator folder's lofa_generator.json stores it."""
        return asdict(self)


def flow_matching_loss(gen: VelocityFn, x0: torch.Tensor, context: torch.Tensor,
                       context_mask: torch.Tensor | None = None, *, generator: torch.Generator | None = None,
                       t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                       times: TimeDistribution | None = None, reduction: str = "mean") -> torch.Tensor:
    """MSE between gen's velocity and noise - x0 at x_t = (1 - t)·x0 + t·noise.

    x0: [N, ...] clean data; context [N, L, D]; t [N] and noise like x0 are drawn from `generator` when not given
    (t from `times`, which must then be given: the generator's `t_distribution`).
    reduction "mean" -> scalar, "none" -> per-sample loss [N] (for batched multi-LoRA training).
    """
    n = x0.shape[0]
    if t is None:
        if times is None:
            raise LofaError("flow_matching_loss draws t only from a given distribution; pass times= (the base "
                            "generator's t_distribution) or t=")
        t = times.sample(n, generator, x0.device)
    if noise is None:
        noise = randn(x0.shape, generator, x0.device)
    t_b = t.view(n, *([1] * (x0.ndim - 1))).to(x0.dtype)
    x_t = (1 - t_b) * x0 + t_b * noise
    v = gen(x_t, t, context, context_mask)
    per_sample = F.mse_loss(v.float(), (noise - x0).float(), reduction="none").flatten(1).mean(1)
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise LofaError(f"unknown reduction {reduction!r}; use 'mean' or 'none'")


def condition_dropout(context: torch.Tensor, context_mask: torch.Tensor, uncond_context: torch.Tensor,
                      uncond_mask: torch.Tensor, p: float, *, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each sample's context by the empty-prompt context with probability p (trains CFG's uncond branch).

    context [N, L, D], context_mask [N, L]; uncond_context [1, L, D], uncond_mask [1, L].
    """
    source = generator.device if generator is not None else context.device
    drop = (torch.rand((context.shape[0],), generator=generator, device=source) < p).to(context.device)
    context = torch.where(drop[:, None, None], uncond_context.to(context.dtype), context)
    context_mask = torch.where(drop[:, None], uncond_mask, context_mask)
    return context, context_mask


def _all_true(context: torch.Tensor) -> torch.Tensor:
    return torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)


@torch.no_grad()
def sample(gen: VelocityFn, context: torch.Tensor, context_mask: torch.Tensor | None, shape, *, steps: int = 20,
           guidance_scale: float = 1.0, uncond_context: torch.Tensor | None = None,
           uncond_mask: torch.Tensor | None = None, seed: int = 0, shift: float = 1.0,
           noise: torch.Tensor | None = None, precision: str = "fp32") -> torch.Tensor:
    """x0 [shape] in [-1, 1] by Euler integration of gen's velocity from t = 1 to 0.

    The t grid is diffusers' FlowMatchEulerDiscreteScheduler (with its `shift`; Wan uses 3-5, 1 = plain grid), and
    each step is that scheduler's `step`. shape: full sample shape [N, ...] with N = context.shape[0].
    Classifier-free guidance v = v_u + g·(v_c - v_u) with the empty-prompt context uncond_context [1 or N, L, D]
    when guidance_scale != 1. The initial noise comes from `seed` (drawn on the CPU) unless `noise` is given.
    precision "bf16" runs gen's forward passes under bf16 autocast; the latents, the guidance mix and the Euler
    update stay float32 ("fp32": everything float32).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    shape = tuple(shape)
    n = shape[0]
    if context.shape[0] != n:
        raise LofaError(f"sample shape {shape} has batch {n} but context has {context.shape[0]} rows; make them equal")
    device = context.device
    check_precision(precision, "sampling precision")
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")
    guided = guidance_scale != 1.0
    if guided and uncond_context is None:
        raise LofaError("guidance_scale != 1 needs uncond_context (the empty-prompt states); pass it or use 1.0")
    if context_mask is None:
        context_mask = _all_true(context)
    if guided:
        if uncond_mask is None:
            uncond_mask = _all_true(uncond_context)
        context = torch.cat([context, uncond_context.to(context.dtype).expand(n, -1, -1)])
        context_mask = torch.cat([context_mask, uncond_mask.expand(n, -1)])

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps, device=device)
    if noise is None:
        noise = randn(shape, torch.Generator().manual_seed(seed), device)
    x = noise.to(device)
    for timestep, sigma in zip(scheduler.timesteps, scheduler.sigmas[:-1]):
        if guided:
            t = sigma.expand(2 * n).float()
            with autocast:
                v_both = gen(torch.cat([x, x]), t, context, context_mask)
            v_cond, v_uncond = v_both.float().chunk(2)
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        else:
            with autocast:
                v = gen(x, sigma.expand(n).float(), context, context_mask)
            v = v.float()
        x = scheduler.step(v, timestep, x, return_dict=False)[0]
    return x.clamp(-1, 1)
