"""Metric math: Fréchet distance, cosine scores, diversity, motion measures, accuracy, bootstrap intervals.

Pure functions of tensors / arrays; the learned feature networks live in `features.py` and `evaluators.py`.
Videos are [N, 3, T, H, W] in [-1, 1], images [N, 3, H, W] in [-1, 1].

Paper role -> definition here:
- FVD / FID: `frechet_distance` between Gaussian fits of evaluator features (float64 throughout).
- Dynamic degree (VBench): fraction of videos whose `motion_magnitude` exceeds a threshold calibrated on
  ground-truth renders (`calibrate_motion_threshold`).
- Motion smoothness (VBench): 1 - mean frame-interpolation error / 2, where the interpolation of frame t is the
  average of frames t-1 and t+1 (VBench uses a learned interpolator; ours is linear). 1 means every frame is the
  midpoint of its neighbours (static or constant-velocity change); shuffled frames score lower.
- Face Div: 100 x mean pairwise (1 - cosine) of label-free (SimCLR) appearance features among the samples of
  one case: 0 when a method returns the same face every time.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lofa.errors import LofaError


def _as_f64(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x.detach().cpu(), dtype=torch.float64)


def gaussian_stats(feats) -> tuple[torch.Tensor, torch.Tensor]:
    """feats [N, D] -> (mean [D], covariance [D, D]) in float64 (unbiased, N - 1 in the denominator)."""
    x = _as_f64(feats)
    if x.ndim != 2 or x.shape[0] < 2:
        raise LofaError(f"need features [N>=2, D] for a Fréchet distance, got shape {tuple(x.shape)}")
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def _sqrt_psd(s: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a PSD matrix (tiny negative eigenvalues from round-off clamped to 0)."""
    vals, vecs = torch.linalg.eigh((s + s.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}).

    tr((S1 S2)^{1/2}) = sum of sqrt(eig(S1^{1/2} S2 S1^{1/2})): that matrix is symmetric PSD, so eigh is exact
    where scipy's general sqrtm of S1 S2 can return complex round-off on singular covariances (N < D).
    """
    mu1, mu2, s1, s2 = (_as_f64(t) for t in (mu1, mu2, sigma1, sigma2))
    r1 = _sqrt_psd(s1)
    cross = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp_min(0).sqrt().sum()
    fd = (mu1 - mu2).square().sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross
    return float(fd.clamp_min(0))


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussian fits of two feature sets [Na, D] and [Nb, D] (the FVD / FID formula)."""
    return frechet_from_stats(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of [N, D] and [N, D] -> [N]."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def pairwise_diversity(emb: torch.Tensor) -> float:
    """Mean over unordered pairs of (1 - cosine) among embeddings [N, D]; 0 for identical samples."""
    if emb.shape[0] < 2:
        raise LofaError(f"diversity needs at least 2 samples of a case, got {emb.shape[0]}")
    e = F.normalize(emb.float(), dim=-1)
    sim = e @ e.T
    iu = torch.triu_indices(len(e), len(e), offset=1)
    return float((1 - sim[iu[0], iu[1]]).mean().clamp_min(0))


def group_diversity(emb: torch.Tensor, groups: Sequence[int]) -> dict[int, float]:
    """Face Div: {group: 100 x pairwise_diversity of its members} for every group with >= 2 members."""
    groups = np.asarray(groups)
    out = {}
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        if len(idx) >= 2:
            out[int(g)] = 100.0 * pairwise_diversity(emb[torch.as_tensor(idx)])
    if not out:
        raise LofaError("face diversity needs >= 2 samples of at least one case; generate several per case")
    return out


def _check_video(videos: torch.Tensor, min_frames: int) -> None:
    if videos.ndim != 5 or videos.shape[2] < min_frames:
        raise LofaError(f"expected videos [N, 3, T>={min_frames}, H, W], got shape {tuple(videos.shape)}")


def motion_magnitude(videos: torch.Tensor, pool: int = 2, top: float = 0.05) -> torch.Tensor:
    """A flow-free stand-in for VBench's RAFT magnitude: [N, 3, T, H, W] -> [N].

    Frames are channel-averaged and pooled `pool`x`pool` (so per-pixel sampling noise averages out, moving
    strokes do not); per consecutive frame pair take the mean of the top `top` fraction of |difference|
    (VBench likewise averages the top 5 % of flow magnitudes), then average over pairs.
    """
    _check_video(videos, 2)
    n, _, t, h, w = videos.shape
    x = videos.float().mean(1)  # [N, T, H, W]
    if pool > 1:
        x = F.avg_pool2d(x, pool)
    d = (x[:, 1:] - x[:, :-1]).abs().flatten(2)  # [N, T-1, P]
    k = max(1, int(round(top * d.shape[-1])))
    return d.topk(k, dim=-1).values.mean(-1).mean(-1)


def calibrate_motion_threshold(gt_motion: torch.Tensor, quantile: float = 0.1) -> float:
    """Dynamic-degree threshold = the `quantile` quantile of ground-truth motion magnitudes.

    So a sample counts as dynamic when it moves at least as much as the least-moving `quantile` of real clips;
    ground-truth renders then score about 1 - quantile on fresh seeds and static clips exactly 0.
    """
    return float(torch.quantile(gt_motion.double(), quantile))


def dynamic_degree(videos: torch.Tensor, threshold: float, pool: int = 2, top: float = 0.05) -> torch.Tensor:
    """Per-video 1.0 if motion_magnitude > threshold else 0.0 -> [N]; the mean is VBench's dynamic degree."""
    return (motion_magnitude(videos, pool, top) > threshold).float()


def motion_smoothness(videos: torch.Tensor) -> torch.Tensor:
    """[N, 3, T>=3, H, W] -> [N] in [0, 1]: 1 - mean |x_t - (x_{t-1} + x_{t+1}) / 2| / 2 over inner frames."""
    _check_video(videos, 3)
    x = videos.float()
    err = (x[:, :, 1:-1] - (x[:, :, :-2] + x[:, :, 2:]) / 2).abs()
    return 1 - err.flatten(1).mean(1) / 2


def top1(logits: torch.Tensor, labels) -> torch.Tensor:
    """Per-sample 1.0 where argmax(logits [N, C]) == labels [N], else 0.0 -> [N]."""
    return (logits.argmax(-1) == torch.as_tensor(labels, device=logits.device)).float()


def bootstrap_ci(values, n: int = 1000, seed: int = 0, alpha: float = 0.05,
                 stat: Callable[[np.ndarray], float] = np.mean) -> tuple[float, float, float]:
    """(stat(values), lower, upper): percentile bootstrap over samples, `n` resamples, (1 - alpha) interval.

    Not scipy.stats.bootstrap: its default interval is BCa and its resampling draws other indices from the same
    seed, so every published interval would move; this one is the plain percentile bootstrap, vectorised for the
    mean; `lofa.evaluate.paired_difference` resamples paired differences through it.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise LofaError(f"bootstrap_ci needs a non-empty 1-D array of per-sample values, got shape {v.shape}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(n, len(v)))
    boots = np.array([stat(v[i]) for i in idx]) if stat is not np.mean else v[idx].mean(1)
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return float(stat(v)), float(lo), float(hi)
