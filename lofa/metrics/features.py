"""Small feature networks for the evaluators (stand-ins for I3D, CLIP, CSD, ArcFace and DINO-style features).

Every network maps a batch of renders to a feature vector: videos [N, 3, T, H, W] through 3-D convolutions,
images [N, 3, H, W] through 2-D convolutions, both in [-1, 1]. Heads and losses sit beside them so that
`evaluators.py` only wires data to them.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvEncoder(nn.Module):
    """Strided conv stack + global average pool: [N, 3, (T,) H, W] -> features [N, dim].

    Each stage halves H and W; video stages in the second half also halve T, so an 8-frame clip keeps its
    temporal order through the early layers where motion is visible.
    """

    def __init__(self, modality: str, width: int = 16, depth: int = 4, dim: int = 128):
        super().__init__()
        if modality not in ("video", "image"):
            raise ValueError(f"modality must be 'video' or 'image', got {modality!r}")
        self.modality = modality
        conv = nn.Conv3d if modality == "video" else nn.Conv2d
        layers, c_in = [], 3
        for i in range(depth):
            c_out = width * 2 ** i
            if modality == "video":
                stride = (2 if i >= depth // 2 else 1, 2, 2)
            else:
                stride = 2
            layers += [conv(c_in, c_out, 3, stride=stride, padding=1),
                       nn.GroupNorm(min(8, c_out // 4), c_out), nn.SiLU()]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.proj = nn.Linear(c_in, dim)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.body(x).flatten(2).mean(-1))


class MultiHeadClassifier(nn.Module):
    """The referee: encoder + one linear head per label set (fine case, coarse category, each component).

    forward(x) -> (features [N, dim], {head: logits [N, C_head]}); features feed the Fréchet distance.
    """

    def __init__(self, modality: str, head_sizes: dict[str, int], width: int = 16, depth: int = 4,
                 dim: int = 128):
        super().__init__()
        self.encoder = ConvEncoder(modality, width, depth, dim)
        self.norm = nn.LayerNorm(dim)
        self.heads = nn.ModuleDict({k: nn.Linear(dim, n) for k, n in head_sizes.items()})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        f = self.encoder(x)
        h = F.silu(self.norm(f))
        return f, {k: head(h) for k, head in self.heads.items()}


class ArcMarginHead(nn.Module):
    """ArcFace additive angular margin (Deng et al. 2019): logits s * cos(theta_y + m) for the true class.

    forward(emb [N, D], labels [N]) -> logits [N, C]; with labels=None returns s * cos(theta) (no margin).
    """

    def __init__(self, dim: int, n_classes: int, scale: float = 16.0, margin: float = 0.3):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, dim) / math.sqrt(dim))
        self.scale, self.margin = scale, margin

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cos = F.normalize(emb, dim=-1) @ F.normalize(self.weight, dim=-1).T
        if labels is None:
            return self.scale * cos
        theta = torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6))
        target = F.one_hot(labels, cos.shape[1]).bool()
        # cos(theta + m) is not monotonic past pi - m; fall back to the CosFace-style cos - m*sin(m) there.
        with_margin = torch.where(theta + self.margin < math.pi, torch.cos(theta + self.margin),
                                  cos - self.margin * math.sin(self.margin))
        return self.scale * torch.where(target, with_margin, cos)


class Embedder(nn.Module):
    """Encoder trained as a metric embedding (ArcFace for faces and styles, SimCLR for label-free
    appearance features).

    forward(x) -> embedding [N, dim] (not normalised; scores use cosine). Video input to an image embedder is
    handled by the evaluators (mean over frames).
    """

    def __init__(self, modality: str, n_classes: int = 0, width: int = 16, depth: int = 4, dim: int = 128,
                 arc_scale: float = 16.0, arc_margin: float = 0.3):
        super().__init__()
        self.encoder = ConvEncoder(modality, width, depth, dim)
        self.head = ArcMarginHead(dim, n_classes, arc_scale, arc_margin) if n_classes else None
        # SimCLR computes its loss on a projection and keeps the encoder output as the representation.
        self.projector = None if n_classes else nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class ContrastiveModel(nn.Module):
    """CLIP stand-in: render tower + projection of mean-pooled MiniLM token states into one joint space.

    encode_render(x) -> [N, dim] and encode_text(pooled [N, text_dim]) -> [N, dim], both L2-normalised.
    """

    def __init__(self, modality: str, text_dim: int = 384, width: int = 16, depth: int = 4, dim: int = 128):
        super().__init__()
        self.render_tower = ConvEncoder(modality, width, depth, dim)
        self.text_tower = nn.Sequential(nn.Linear(text_dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def encode_render(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.render_tower(x), dim=-1)

    def encode_text(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_tower(pooled), dim=-1)


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean of token states [N, L, D] with mask [N, L] bool -> [N, D] (sentence-transformers pooling)."""
    m = mask.to(states.dtype).unsqueeze(-1)
    return (states * m).sum(1) / m.sum(1).clamp_min(1)


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP's loss) over a similarity matrix logits [N, N] = scale · a @ b.T of two batches whose
    rows i are the positive pairs: cross-entropy of each row and each column towards its diagonal entry."""
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """SimCLR loss for two views z1, z2 [N, D]: each row's positive is its other view, negatives all else."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    n = len(z1)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)
