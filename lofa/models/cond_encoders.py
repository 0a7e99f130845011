"""Condition encoders: user conditions -> tokens [N, K, Dc] for the hypernetwork's cross-attention.

The paper encodes pose sequences with a multi-layer 3D-conv encoder and reference images with CLIP-ViT-L + MLP.
No CLIP weights ship offline, so the image encoder is a small CNN; both are pre-trained contrastively (InfoNCE)
inside the worlds, where two different renders / conditions of the same case are positives.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lofa.config import preset
from lofa.errors import LofaError

PairsFn = Callable[[Sequence[int], int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class CondEncoderConfig:
    kind: str = "image"                      # "pose" (3D conv over [N, 3, T, H, W]) | "image" ([N, 3, H, W])
    channels: tuple[int, ...] = (32, 64, 128)
    dim: int = 128                           # Dc, token width
    grid: tuple[int, ...] = (4, 4)           # token grid (image: H, W; pose: T, H, W); K = prod(grid)
    proj_dim: int = 64                       # contrastive head width (not used by the hypernetwork)

    PRESETS = {
        "smoke": {"channels": (8, 16, 32), "dim": 32, "proj_dim": 16},
        "mini": {"channels": (16, 32, 64)},
        "full": {"channels": (64, 128, 256), "dim": 256, "proj_dim": 128},
    }

    def __post_init__(self):
        self.channels = tuple(self.channels)
        self.grid = tuple(self.grid)
        want = 3 if self.kind == "pose" else 2
        if self.kind not in ("pose", "image") or len(self.grid) != want:
            raise LofaError(f"condition encoder kind {self.kind!r} with grid {self.grid}: use kind 'pose' with a "
                            "(T, H, W) grid or kind 'image' with an (H, W) grid")

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)


class _CondEncoder(nn.Module):
    """Conv stack (spatial stride-2 stages) -> adaptive pool to `grid` -> linear to Dc + learned position embedding."""

    conv: type[nn.Module]
    pool: type[nn.Module]
    stride: int | tuple[int, ...]

    def __init__(self, config: CondEncoderConfig):
        super().__init__()
        self.config = config
        layers, c_in = [], 3
        for c in config.channels:
            layers += [self.conv(c_in, c, 3, stride=self.stride, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU(),
                       self.conv(c, c, 3, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU()]
            c_in = c
        self.features = nn.Sequential(*layers, self.pool(config.grid))
        self.to_tokens = nn.Linear(c_in, config.dim)
        self.pos = nn.Parameter(torch.randn(config.num_tokens, config.dim) * 0.02)
        self.head = nn.Sequential(nn.LayerNorm(config.dim), nn.Linear(config.dim, config.dim), nn.SiLU(),
                                  nn.Linear(config.dim, config.proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, 3, (T,) H, W] in [-1, 1] -> tokens [N, K, Dc]."""
        return self.to_tokens(self.features(x).flatten(2).transpose(1, 2)) + self.pos

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [N, K, Dc], mask [N, K] bool, all True: every token is real)."""
        tokens = self(x)
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm pooled embedding [N, proj_dim] for the contrastive objective."""
        return F.normalize(self.head(self(x).mean(1)), dim=-1)

    def save(self, path) -> None:
        from lofa.io import save_safetensors

        meta = {"lofa_cond_encoder": json.dumps(dataclasses.asdict(self.config))}
        save_safetensors(self.state_dict(), path, metadata=meta)


class PoseEncoder(_CondEncoder):
    """Multi-layer 3D conv over skeleton frames [N, 3, T, H, W] -> tokens [N, T'·H'·W', Dc]."""

    conv = nn.Conv3d
    pool = nn.AdaptiveAvgPool3d
    stride = (1, 2, 2)  # keep every frame until the pool: the motion is the condition


class ImageEncoder(_CondEncoder):
    """Small CNN over a reference image [N, 3, H, W] -> tokens [N, H'·W', Dc] (stands in for CLIP-ViT-L + MLP)."""

    conv = nn.Conv2d
    pool = nn.AdaptiveAvgPool2d
    stride = 2


def make_condition_encoder(config: CondEncoderConfig) -> _CondEncoder:
    return PoseEncoder(config) if config.kind == "pose" else ImageEncoder(config)


def load_condition_encoder(path, device="cpu") -> _CondEncoder:
    """Inverse of `encoder.save(path)` (weights + config in one safetensors file)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = (f.metadata() or {}).get("lofa_cond_encoder")
    if meta is None:
        raise LofaError(f"{path} is not a lofa condition encoder (no lofa_cond_encoder metadata); re-train it")
    encoder = make_condition_encoder(CondEncoderConfig(**json.loads(meta)))
    encoder.load_state_dict(load_file(str(path)))
    return encoder.to(device).eval()


def encoder_for_world(world, scale: str = "mini", overrides: dict | None = None) -> _CondEncoder:
    """PoseEncoder for the actions world (pose-sequence conditions), ImageEncoder for reference-image worlds."""
    kind = "pose" if world.task == "actions" else "image"
    fields = {"kind": kind, **({"grid": (4, 2, 2)} if kind == "pose" else {}), **(overrides or {})}
    return make_condition_encoder(preset(CondEncoderConfig, scale, fields))


def world_pairs(world) -> PairsFn:
    """pairs_fn for `train_condition_encoder`: (condition, render) of the same cases at independent seeds.

    A condition pairs with a render of its case: pose sequences [N, 3, T, H, W] with the rendered video (another
    seed's pose condition is nearly identical — a random encoder already retrieves it — while the render
    changes colours, size and place, so the encoder must keep the motion); reference images with one random
    frame (styles) or image (identities) of a render, so the encoder keeps the style / identity and drops
    content, pose and context.
    """
    def pairs(case_ids: Sequence[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = world.condition(case_ids, seed=2 * seed)
        b = world.render(case_ids, seed=2 * seed + 1)
        if a.ndim == 4 and b.ndim == 5:
            frames = torch.randint(b.shape[2], (b.shape[0],), generator=torch.Generator().manual_seed(seed))
            b = b[torch.arange(b.shape[0]), :, frames]
        return a, b

    return pairs


def info_nce(za: torch.Tensor, zb: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE over unit embeddings za, zb [N, P]; row i of za and zb are the positive pair."""
    logits = za @ zb.T / temperature
    labels = torch.arange(za.shape[0], device=za.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@torch.no_grad()
def retrieval_accuracy(encoder: _CondEncoder, pairs_fn: PairsFn, case_ids: Sequence[int], seed: int,
                       device="cpu") -> float:
    """Top-1 accuracy of finding each case's view_b among all cases' view_b from its view_a (chance 1/len)."""
    was_training = encoder.training
    encoder.eval()
    a, b = pairs_fn(list(case_ids), seed)
    za, zb = encoder.embed(a.to(device)), encoder.embed(b.to(device))
    encoder.train(was_training)
    return (za @ zb.T).argmax(1).eq(torch.arange(len(case_ids), device=device)).float().mean().item()


def train_condition_encoder(encoder: _CondEncoder, pairs_fn: PairsFn, case_ids: Sequence[int], *, steps: int = 500,
                            batch_size: int = 32, lr: float = 2e-3, temperature: float = 0.1, seed: int = 0,
                            device: str | torch.device = "cpu", eval_ids: Sequence[int] | None = None,
                            progress: bool = True) -> dict:
    """Contrastive pre-training: each step draws `batch_size` distinct cases and calls pairs_fn(ids, seed).

    Distinct ids per batch keep false negatives out of InfoNCE. Returns {"loss": [...], "retrieval": {...}} with
    top-1 retrieval accuracy on `eval_ids` (e.g. held-out cases) before and after training.
    """
    case_ids = list(case_ids)
    if len(case_ids) < 2:
        raise LofaError("contrastive training needs at least two cases; pass more case ids")
    batch_size = min(batch_size, len(case_ids))
    encoder.to(device).train()
    opt = torch.optim.AdamW(encoder.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    history = {"loss": [], "retrieval": {}}
    if eval_ids is not None:
        history["retrieval"]["before"] = retrieval_accuracy(encoder, pairs_fn, eval_ids, seed + 10**6, device)
    g = torch.Generator().manual_seed(seed)
    for step in tqdm(range(steps), desc="condition encoder", disable=not progress):
        ids = [case_ids[i] for i in torch.randperm(len(case_ids), generator=g)[:batch_size].tolist()]
        a, b = pairs_fn(ids, seed * 10**5 + step)
        loss = info_nce(encoder.embed(a.to(device)), encoder.embed(b.to(device)), temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history["loss"].append(loss.item())
    encoder.eval()
    if eval_ids is not None:
        history["retrieval"]["after"] = retrieval_accuracy(encoder, pairs_fn, eval_ids, seed + 10**6, device)
    return history
