"""Norm matching: a predicted LoRA rescaled, module by module, to the ΔW norm of the zoo's training LoRAs.

Why: a predictor trained to regress the zoo's LoRAs from their conditions (LoFA's Stage II, Text-to-LoRA, the
ridge LoRA) learns at best E[ΔW | condition]. Two LoRAs of one case trained on different renders agree only in part
(`lofa bench replicates`), so that expectation averages away the part of each LoRA its case does not determine, and
the prediction comes out several times smaller than any LoRA of the zoo: on held-out cases the ridge LoRA's ΔW has
about half the zoo's norm, LoFA's a quarter to a half. A LoRA that small barely moves the base model. Rescaling each
module's ΔW to the mean norm of the training LoRAs' ΔW of that module gives the prediction the strength of a LoRA
of the zoo while keeping its direction. The norms come from training LoRAs only, so the rule uses nothing of the
case it is applied to; evaluations report a norm-matched method beside the raw one, never in its place.

    ΔŴ_m  ←  ΔŴ_m · n_m / ‖ΔŴ_m‖_F,      n_m = mean over training LoRAs c of ‖ΔW_{c,m}‖_F

(B is scaled; A and alpha are kept, so the result is a standard LoRA of the same rank.)
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from lofa.errors import LofaError
from lofa.lora.formats import LoraFactor, LoraWeights

__all__ = ["delta_norm", "module_norms", "match_norms", "NORM_MATCHED"]

# the methods an evaluation also scores norm-matched, and the names their matched versions carry
NORM_MATCHED = {"LoFA": "LoFA, norm-matched", "Text-to-LoRA": "Text-to-LoRA, norm-matched",
                "ridge LoRA": "ridge LoRA, norm-matched"}


def delta_norm(factor: LoraFactor) -> float:
    """‖ΔW‖_F of one module, ΔW = (alpha / r) · B @ A, from the factors: ‖B A‖_F² = tr((BᵀB)(A Aᵀ)), so the dense
    [out, in] matrix is never formed. A [r, in], B [out, r]."""
    A, B = factor.A.to(torch.float64), factor.B.to(torch.float64)
    squared = torch.trace((B.T @ B) @ (A @ A.T)).clamp_min(0.0)
    return float(abs(factor.scale) * squared.sqrt())


def module_norms(loras: Iterable[LoraWeights]) -> dict[str, float]:
    """{module_name: mean ‖ΔW‖_F over `loras`}; every LoRA must hold the same modules."""
    totals: dict[str, float] = {}
    count = 0
    for lora in loras:
        if count and set(lora) != set(totals):
            raise LofaError("module_norms: the LoRAs hold different modules; pass LoRAs of one zoo")
        for name, factor in lora.items():
            totals[name] = totals.get(name, 0.0) + delta_norm(factor)
        count += 1
    if not count:
        raise LofaError("module_norms needs at least one LoRA; pass the zoo's training LoRAs")
    return {name: total / count for name, total in totals.items()}


def match_norms(lora: LoraWeights, norms: Mapping[str, float]) -> LoraWeights:
    """`lora` with each module's ΔW rescaled to norms[name] (`module_norms` of the training LoRAs); a module whose
    ΔW is exactly zero stays zero (it has no direction to keep). Returns new LoraFactors; `lora` is not changed."""
    missing = sorted(set(lora) - set(norms))
    if missing:
        raise LofaError(f"match_norms: no target norm for module {missing[0]}; compute the norms on LoRAs of the "
                        "same base and targets")
    out = {}
    for name, factor in lora.items():
        current = delta_norm(factor)
        gain = norms[name] / current if current > 0 else 0.0
        out[name] = LoraFactor(factor.A, factor.B * gain, factor.alpha)
    return out
