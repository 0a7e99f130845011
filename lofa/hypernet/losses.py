"""Losses and metrics of the two stages.

Stage I: class-balanced BCE between response-map logits and the true map R = 1[|ΔW| > τ·(|W| + eps)], with the
map's density, precision, recall, IoU and cosine. Stage II: L1 reconstruction (on ΔW, or on the factors A and B as
the paper writes it) plus λ × a flow-matching term that the caller supplies as a function of the predicted LoRA.

A LoRA here is {name: (A [N, r, in], B [N, out, r], alpha)} with alpha a float or a tensor [N];
ΔW = (alpha / r) · B @ A.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lofa.errors import LofaError
from lofa.response import delta_w

Factors = tuple[torch.Tensor, torch.Tensor, "float | torch.Tensor"]
DiffusionLossFn = Callable[[dict[str, Factors], object], torch.Tensor]


def lora_scale(alpha, rank: int, n: int, device) -> torch.Tensor:
    """alpha / r as a tensor [N]."""
    return (torch.as_tensor(alpha, dtype=torch.float32, device=device) / rank).expand(n)


def delta(factors: Factors) -> torch.Tensor:
    """ΔW [N, out, in] = (alpha / r) · B @ A, in float32."""
    A, B, alpha = factors
    return delta_w(A, B, lora_scale(alpha, A.shape[-2], A.shape[0], A.device)[:, None, None])


def balanced_bce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, balance: str = "balanced"
                 ) -> torch.Tensor:
    """BCE over the `valid` entries; "balanced" weighs the responding and the silent entries half each (the map is
    50-80 % silent, so an unweighted BCE is won by predicting silence), "none" is the plain mean."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    if balance == "none":
        return (bce * valid).sum() / valid.sum().clamp_min(1)
    if balance != "balanced":
        raise LofaError(f"unknown map balance {balance!r}; use 'balanced' or 'none'")
    pos, neg = (target & valid).float(), (~target & valid).float()
    terms = [(bce * w).sum() / w.sum() for w in (pos, neg) if w.sum() > 0]
    return torch.stack(terms).mean()


@torch.no_grad()
def map_metrics(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, float]:
    """Binary maps pred, target (same shape, bool) over `valid` -> density (true), pred_density, precision,
    recall, iou and cosine (of the 0/1 vectors, the paper's map fidelity measure)."""
    if valid is None:
        valid = torch.ones_like(target)
    p, t = pred & valid, target & valid
    n = valid.sum().clamp_min(1).float()
    tp = (p & t).sum().float()
    n_p, n_t = p.sum().float(), t.sum().float()
    union = (p | t).sum().float()
    return {
        "density": float(n_t / n),
        "pred_density": float(n_p / n),
        "precision": float(tp / n_p) if n_p > 0 else float("nan"),
        "recall": float(tp / n_t) if n_t > 0 else float("nan"),
        "iou": float(tp / union) if union > 0 else 1.0,
        "cosine": float(tp / (n_p * n_t).sqrt()) if n_p > 0 and n_t > 0 else float(n_p == n_t),
    }


def stage1_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, balance: str = "balanced",
                offset: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """logits, target, valid [..., out, in] -> (BCE, metrics of the map logit + offset > 0; `Stage1.map_offset`)."""
    loss = balanced_bce(logits, target, valid, balance)
    return loss, {"bce": float(loss.detach()), **map_metrics(logits.detach() + offset > 0, target, valid)}


def _delta_l1(a_p, b_p, s_p, a_t, b_t, s_t, w_rms):
    d_p = s_p[:, None, None] * (b_p.float() @ a_p.float())
    d_t = s_t[:, None, None] * (b_t.float() @ a_t.float())
    return (d_p - d_t).abs().mean() / w_rms


def delta_l1(pred: Factors, true: Factors, w_rms: torch.Tensor | float) -> torch.Tensor:
    """mean |ΔŴ - ΔW| / rms(W) for one target (rms(W) is what the tokenizer divides W by, so every layer weighs
    alike). Checkpointed: the [N, out, in] products are recomputed in backward instead of stored for 240 targets."""
    (a_p, b_p, al_p), (a_t, b_t, al_t) = pred, true
    n = a_p.shape[0]
    s_p = lora_scale(al_p, a_p.shape[-2], n, a_p.device)
    s_t = lora_scale(al_t, a_t.shape[-2], n, a_p.device)
    args = (a_p, b_p, s_p, a_t.to(a_p.device), b_t.to(a_p.device), s_t, w_rms)
    if torch.is_grad_enabled() and (a_p.requires_grad or b_p.requires_grad):
        return checkpoint(_delta_l1, *args, use_reentrant=False)
    return _delta_l1(*args)


def delta_mse(pred: Factors, true: Factors, w_rms: torch.Tensor | float) -> torch.Tensor:
    """mean (ΔŴ - ΔW)² / rms(W)² for one target, from the factors alone: with U = [s_p B̂, -s_t B] [N, out, 2r] and
    V = [Â; A] [N, 2r, in], ‖ΔŴ - ΔW‖²_F = ‖U V‖²_F = Σ (UᵀU) ⊙ (V Vᵀ), two [2r, 2r] Gram matrices, so the
    [N, out, in] difference is never formed (out·in·r work per LoRA becomes (out + in)·r²)."""
    (a_p, b_p, al_p), (a_t, b_t, al_t) = pred, true
    n, out_f, in_f = a_p.shape[0], b_p.shape[-2], a_p.shape[-1]
    s_p = lora_scale(al_p, a_p.shape[-2], n, a_p.device)[:, None, None]
    s_t = lora_scale(al_t, a_t.shape[-2], n, a_p.device)[:, None, None]
    u = torch.cat([s_p * b_p.float(), -s_t * b_t.to(a_p.device).float()], dim=-1)
    v = torch.cat([a_p.float(), a_t.to(a_p.device).float()], dim=-2)
    squared = ((u.transpose(-1, -2) @ u) * (v @ v.transpose(-1, -2))).sum(dim=(-1, -2)).clamp_min(0)
    return squared.mean() / (out_f * in_f) / w_rms ** 2


def delta_inner(a: Factors, b: Factors) -> torch.Tensor:
    """⟨ΔW_a, ΔW_b⟩_F per LoRA -> [N], from the factors alone: ⟨s_a B_a A_a, s_b B_b A_b⟩ = s_a s_b Σ (B_aᵀB_b) ⊙
    (A_a A_bᵀ), two [r_a, r_b] products instead of two [N, out, in] matrices."""
    (a_a, b_a, al_a), (a_b, b_b, al_b) = a, b
    n = a_a.shape[0]
    s_a = lora_scale(al_a, a_a.shape[-2], n, a_a.device)
    s_b = lora_scale(al_b, a_b.shape[-2], n, a_a.device)
    a_b, b_b = a_b.to(a_a.device).float(), b_b.to(a_a.device).float()
    gram = (b_a.float().transpose(-1, -2) @ b_b) * (a_a.float() @ a_b.transpose(-1, -2))
    return s_a * s_b * gram.sum(dim=(-1, -2))


@torch.no_grad()
def delta_fidelity(pred: Mapping[str, Factors], true: Mapping[str, Factors], w_rms: Mapping[str, torch.Tensor | float]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """How close predicted LoRAs are to the true ones, per LoRA over all their targets -> (cosine [N], magnitude
    ratio [N]): the cosine between the concatenated ΔŴ_t / rms(W_t) and ΔW_t / rms(W_t) (each layer weighed as the
    squared-error term weighs it), and ‖ΔŴ‖ / ‖ΔW‖ in the same units (1: the true size; a mean LoRA is smaller)."""
    missing = [k for k in pred if k not in true]
    if missing:
        raise LofaError(f"no ground-truth LoRA for {missing[0]!r}")
    cross, pp, tt = 0.0, 0.0, 0.0
    for k in pred:
        weight = 1.0 / torch.as_tensor(w_rms[k], dtype=torch.float32).to(pred[k][0].device) ** 2
        cross = cross + weight * delta_inner(pred[k], true[k])
        pp = pp + weight * delta_inner(pred[k], pred[k])
        tt = tt + weight * delta_inner(true[k], true[k])
    pp, tt = pp.clamp_min(0), tt.clamp_min(0)
    cosine = cross / (pp.sqrt() * tt.sqrt()).clamp_min(1e-30)
    return cosine, (pp / tt.clamp_min(1e-30)).sqrt()


def factor_l1(pred: Factors, true: Factors) -> torch.Tensor:
    """The paper's L1 on A and B, each scaled by sqrt(alpha / r) so both sides use one convention.

    A and B are not identifiable (B G, G⁻¹ A give the same ΔW for any invertible G), so this penalises correct
    LoRAs in another basis; it needs the predicted rank to equal the true one. Kept for the paper's comparison.
    """
    (a_p, b_p, al_p), (a_t, b_t, al_t) = pred, true
    if a_p.shape[-2] != a_t.shape[-2]:
        raise LofaError(f"factor L1 needs equal ranks, predicted {a_p.shape[-2]} vs true {a_t.shape[-2]}; "
                        "use recon='delta'")
    n = a_p.shape[0]
    s_p = lora_scale(al_p, a_p.shape[-2], n, a_p.device).sqrt()[:, None, None]
    s_t = lora_scale(al_t, a_t.shape[-2], n, a_p.device).sqrt()[:, None, None]
    a_t, b_t = a_t.to(a_p.device).float(), b_t.to(a_p.device).float()
    return (s_p * a_p.float() - s_t * a_t).abs().mean() + (s_p * b_p.float() - s_t * b_t).abs().mean()


# Stage II's reconstruction terms: "delta" the L1 on ΔW, "delta_mse" the squared error on ΔW, "factors" the
# paper's L1 on A and B.
RECON_TERMS = {"delta": delta_l1, "delta_mse": delta_mse, "factors": factor_l1}


def stage2_loss(pred: Mapping[str, Factors], true: Mapping[str, Factors], w_rms: Mapping[str, torch.Tensor], *,
                recon: str = "delta", lambda_recon: float = 1.0, lambda_diff: float = 0.0,
                diffusion_loss_fn: DiffusionLossFn | None = None, batch=None
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """λ_recon · mean over targets of the L1 term + λ_diff · diffusion_loss_fn(pred, batch).

    pred and true share names; w_rms {name: rms(W)}. `diffusion_loss_fn(pred, batch) -> scalar` is the caller's
    flow-matching loss of the frozen base generator with `pred` applied (e.g. through torch.func.functional_call);
    it receives exactly the factors returned here, so the prediction it scores is the one the L1 scores and
    inference uses.
    """
    if recon not in RECON_TERMS:
        raise LofaError(f"unknown recon {recon!r}; use one of {', '.join(RECON_TERMS)}")
    missing = [k for k in pred if k not in true]
    if missing:
        raise LofaError(f"no ground-truth LoRA for {missing[0]!r}")
    recon_fn = RECON_TERMS[recon]
    terms = [recon_fn(pred[k], true[k]) if recon == "factors" else recon_fn(pred[k], true[k], w_rms[k])
             for k in pred]
    l_recon = torch.stack(terms).mean()
    loss = lambda_recon * l_recon
    metrics = {"recon": float(l_recon.detach())}
    if lambda_diff:
        if diffusion_loss_fn is None:
            raise LofaError("lambda_diff > 0 needs a diffusion_loss_fn(pred_lora, batch) -> scalar")
        l_diff = diffusion_loss_fn(dict(pred), batch)
        loss = loss + lambda_diff * l_diff
        metrics["diffusion"] = float(l_diff.detach())
    metrics["loss"] = float(loss.detach())
    return loss, metrics
