"""The paper's three quantities of a LoRA against its base weights, in one place: ΔW, the relative change and the
response map at τ.

    ΔW = (alpha / r) · B @ A                      delta_w(A, B, alpha / r)
    m  = |ΔW| / (|W| + eps)                       relative_change(ΔW, W)
    R  = m > τ   (the paper's τ = 2 %)            response_map(ΔW, W, tau=TAU)

Everything that needs them (the analysis of a zoo, the hypernetwork's losses and data, LoRA training and files)
imports them from here; τ itself is `lofa.config.TAU` (the command-line parser reads it without loading torch).
"""
from __future__ import annotations

import torch

from lofa.config import TAU

EPS = 1e-8  # keeps |W| = 0 entries finite in the relative change

__all__ = ["TAU", "EPS", "delta_w", "relative_change", "response_map"]


def delta_w(A: torch.Tensor, B: torch.Tensor, scale: float | torch.Tensor,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ΔW = scale · B @ A computed in `dtype` (never the factors' half precision unless asked).

    A [..., r, in], B [..., out, r] -> [..., out, in]; scale a number, or a tensor that broadcasts against the result
    (e.g. [N, 1, 1] for N stacked LoRAs of different alpha / r).
    """
    return scale * (B.to(dtype) @ A.to(dtype))


def relative_change(delta: torch.Tensor, w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """|ΔW| / (|W| + eps), elementwise, in float32 (or float64 if either input is). Any matching shapes."""
    dtype = torch.promote_types(torch.promote_types(delta.dtype, w.dtype), torch.float32)
    return delta.to(dtype).abs().div_(w.abs().to(dtype).add_(eps))  # abs() copies: the in-place ops are safe


def response_map(delta: torch.Tensor, w: torch.Tensor, tau: float = TAU, eps: float = EPS) -> torch.Tensor:
    """Binary response map R = relative_change > τ, bool, same shape as W."""
    return relative_change(delta, w, eps) > tau
