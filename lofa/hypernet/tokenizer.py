"""Base weights as tokens: which matrices (TargetSpec), the frozen matrices themselves (BaseWeights), and the
patch tokenizer (WeightTokenizer).

LoFA's input is the base model's weights, not the prompt: every target matrix W [out, in] is its own token
sequence. W is divided by its own RMS (so every layer of every base model enters at unit scale), zero-padded to a
multiple of the patch side p, and cut into p×p patches; a linear patch embedding (≡ Conv2d(1, d, p, stride p)),
RMSNorm, learned row / column position tables and the block-depth and module-type embeddings give one token per
patch, and a CLS token leads. Matrices of different shapes (non-square FFN, UNet attention at several widths,
cross-attention keys from the text width) share one batch: sequences are padded to the longest target and a
key-padding mask marks the real tokens. Nothing here is specific to one base model.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from lofa.errors import LofaError

# The block a module belongs to is the longest prefix ending in `...blocks.N` / `...layers.N`; the rest of the name is
# its module type. Wan: blocks.3 | attn1.to_q; UNet: down_blocks.1.attentions.0.transformer_blocks.0 | attn2.to_k.
DEFAULT_BLOCK_PATTERN = r"^(?P<block>.*(?:blocks|layers)\.\d+)\.(?P<type>.+)$"
# The paper's targets: q, k, v, o of self- and cross-attention (diffusers naming).
DEFAULT_INCLUDE = (r"\.attn[12]\.to_(?:q|k|v|out\.0)$",)


@dataclass(frozen=True)
class Target:
    name: str                 # the base model's module name, e.g. "blocks.0.attn1.to_q"
    shape: tuple[int, int]    # (out, in) of its weight
    depth: int                # index of its block, in module order
    type: int                 # index into TargetSpec.type_names


class TargetSpec:
    """The ordered list of target matrices of one base model, with depth and module-type indices.

    Depth is the order of first appearance of each block prefix and type the rest of the name (see
    DEFAULT_BLOCK_PATTERN), so the embedding tables are sized by the base model, not by a constant.
    """

    def __init__(self, targets: Sequence[Target], type_names: Sequence[str], block_names: Sequence[str]):
        self.targets = list(targets)
        self.type_names = list(type_names)
        self.block_names = list(block_names)
        self.index = {t.name: i for i, t in enumerate(self.targets)}
        if not self.targets:
            raise LofaError("the target spec is empty; check the include patterns against the model's module names")

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]], block_pattern: str = DEFAULT_BLOCK_PATTERN
                    ) -> "TargetSpec":
        """shapes: {module name: (out, in)} in module order."""
        rx = re.compile(block_pattern)
        blocks: dict[str, int] = {}
        types: dict[str, int] = {}
        targets = []
        for name, shape in shapes.items():
            m = rx.match(name)
            if m is None:
                raise LofaError(f"module {name!r} does not match the block pattern {block_pattern!r}; pass a "
                                "block_pattern with groups (?P<block>...) and (?P<type>...)")
            block = blocks.setdefault(m["block"], len(blocks))
            kind = types.setdefault(m["type"], len(types))
            out_f, in_f = (int(s) for s in shape)
            targets.append(Target(name, (out_f, in_f), block, kind))
        return cls(targets, list(types), list(blocks))

    @classmethod
    def from_weights(cls, weights: Mapping[str, torch.Tensor], block_pattern: str = DEFAULT_BLOCK_PATTERN
                     ) -> "TargetSpec":
        return cls.from_shapes({k: tuple(w.shape) for k, w in weights.items()}, block_pattern)

    @classmethod
    def from_module(cls, module: nn.Module, include: str | Iterable[str] = DEFAULT_INCLUDE,
                    block_pattern: str = DEFAULT_BLOCK_PATTERN) -> "TargetSpec":
        """Every nn.Linear of `module` whose name matches one of the `include` regexes (re.search).

        A peft-wrapped layer counts under its own name (its `.base_layer` suffix is dropped).
        """
        patterns = [re.compile(p) for p in ([include] if isinstance(include, str) else include)]
        shapes = {}
        for name, sub in module.named_modules():
            if not isinstance(sub, nn.Linear):
                continue
            name = name.removesuffix(".base_layer")
            if any(p.search(name) for p in patterns):
                shapes[name] = tuple(sub.weight.shape)
        if not shapes:
            raise LofaError(f"no nn.Linear in the model matches {[p.pattern for p in patterns]}")
        return cls.from_shapes(shapes, block_pattern)

    def to_dict(self) -> dict:
        return {"targets": [[t.name, list(t.shape), t.depth, t.type] for t in self.targets],
                "type_names": self.type_names, "block_names": self.block_names}

    @classmethod
    def from_dict(cls, d: dict) -> "TargetSpec":
        targets = [Target(n, (int(s[0]), int(s[1])), int(dp), int(tp)) for n, s, dp, tp in d["targets"]]
        return cls(targets, d["type_names"], d["block_names"])

    def __len__(self) -> int:
        return len(self.targets)

    def __eq__(self, other) -> bool:
        return isinstance(other, TargetSpec) and self.to_dict() == other.to_dict()

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.targets]

    def grid(self, patch: int) -> list[tuple[int, int]]:
        """(rows, cols) of patches per target."""
        return [(math.ceil(t.shape[0] / patch), math.ceil(t.shape[1] / patch)) for t in self.targets]

    def n_lora_params(self, rank: int) -> int:
        return sum(rank * (t.shape[0] + t.shape[1]) for t in self.targets)


class BaseWeights:
    """The frozen base model's target matrices in spec order, with the per-matrix RMS the tokenizer divides by.

    weights: {name: W [out, in]} holding every target of `spec` (extra names are ignored). Matrices of one shape are
    stacked into one tensor [g, out, in] (`groups`), which the tokenizer and the fused LoRA merge work on.
    """

    def __init__(self, spec: TargetSpec, weights: Mapping[str, torch.Tensor], *, device=None,
                 dtype: torch.dtype | None = None):
        missing = [n for n in spec.names if n not in weights]
        if missing:
            raise LofaError(f"the base weights lack {len(missing)} target(s), first {missing[0]!r}: the checkpoint "
                            "was trained for another base model")
        self.spec = spec
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(spec.targets):
            w = weights[t.name]
            if tuple(w.shape) != t.shape:
                raise LofaError(f"{t.name}: base weight has shape {tuple(w.shape)}, the spec says {t.shape}")
            by_shape.setdefault(t.shape, []).append(i)
        self.groups: list[tuple[list[int], torch.Tensor]] = []
        self.slot = [(0, 0)] * len(spec)  # target -> (group, position in group)
        rms = torch.empty(len(spec))
        for g, (shape, idx) in enumerate(by_shape.items()):
            stack = torch.stack([weights[spec.targets[i].name].detach().to(device=device, dtype=dtype) for i in idx])
            if not torch.isfinite(stack).all():
                raise LofaError(f"base weights of shape {shape} contain NaN or inf")
            r = stack.float().square().mean(dim=(1, 2)).sqrt().clamp_min(1e-12).cpu()
            rms[idx] = r
            self.groups.append((idx, stack))
            for j, i in enumerate(idx):
                self.slot[i] = (g, j)
        self.rms = rms.to(device)

    @property
    def device(self) -> torch.device:
        return self.groups[0][1].device

    def to(self, device) -> "BaseWeights":
        """These weights on `device` (self when already there)."""
        if torch.device(device) == self.device:
            return self
        return BaseWeights(self.spec, {n: self[i] for i, n in enumerate(self.spec.names)}, device=device)

    def __getitem__(self, target: int) -> torch.Tensor:
        """W [out, in] of target index `target` (a view into its group's stack)."""
        g, j = self.slot[target]
        return self.groups[g][1][j]


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm whose float32 weight follows the input's dtype: under bf16 autocast the input is bf16, and mixed
    dtypes would send torch.rms_norm down its slow unfused path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class WeightTokenizer(nn.Module):
    """Target matrices -> token sequences [m, S, d] with S = 1 + max patches over targets (CLS first).

    Also owns the layout buffers every head needs: which tokens are real (`token_mask`), the patch row / column
    of each token, and the row / column pooling matrices that turn tokens into per-row and per-column features.
    """

    def __init__(self, spec: TargetSpec, d_model: int, patch: int):
        super().__init__()
        self.patch = patch
        grids = spec.grid(patch)
        self.grid_rows = max(g[0] for g in grids)
        self.grid_cols = max(g[1] for g in grids)
        self.seq_len = 1 + max(r * c for r, c in grids)
        self.has_padding = len({r * c for r, c in grids}) > 1

        self.embed = nn.Linear(patch * patch, d_model)
        self.norm = RMSNorm(d_model)
        self.row_pos = nn.Parameter(torch.randn(self.grid_rows, d_model) * 0.02)
        self.col_pos = nn.Parameter(torch.randn(self.grid_cols, d_model) * 0.02)
        self.depth_emb = nn.Embedding(len(spec.block_names), d_model)
        self.type_emb = nn.Embedding(len(spec.type_names), d_model)
        self.cls = nn.Parameter(torch.randn(d_model) * 0.02)
        nn.init.normal_(self.depth_emb.weight, std=0.02)
        nn.init.normal_(self.type_emb.weight, std=0.02)

        M, P = len(spec), self.seq_len - 1
        rows = torch.zeros(M, P, dtype=torch.long)
        cols = torch.zeros(M, P, dtype=torch.long)
        mask = torch.zeros(M, self.seq_len, dtype=torch.bool)
        row_pool = torch.zeros(M, self.grid_rows, P)
        col_pool = torch.zeros(M, self.grid_cols, P)
        for i, (gr, gc) in enumerate(grids):
            n = gr * gc
            rows[i, :n] = torch.arange(gr).repeat_interleave(gc)
            cols[i, :n] = torch.arange(gc).repeat(gr)
            mask[i, : n + 1] = True
            row_pool[i, rows[i, :n], torch.arange(n)] = 1.0 / gc
            col_pool[i, cols[i, :n], torch.arange(n)] = 1.0 / gr
        # Layout is a function of the spec: rebuilt on load, never saved.
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("row_pool", row_pool, persistent=False)
        self.register_buffer("col_pool", col_pool, persistent=False)
        self.register_buffer("depth_index", torch.tensor([t.depth for t in spec.targets]), persistent=False)
        self.register_buffer("type_index", torch.tensor([t.type for t in spec.targets]), persistent=False)
        self.register_buffer("out_features", torch.tensor([t.shape[0] for t in spec.targets]), persistent=False)
        self.register_buffer("in_features", torch.tensor([t.shape[1] for t in spec.targets]), persistent=False)

    def layout(self, targets: torch.Tensor) -> "TokenLayout":
        """Where the real tokens of targets [m] sit in the padded [m, S] layout, grouped by token count."""
        counts = self.mask[targets].sum(1).tolist()                     # tokens of each target, CLS included
        by_count: dict[int, list[int]] = {}
        for j, n in enumerate(counts):
            by_count.setdefault(n, []).append(j)
        index, spans, start = [], [], 0
        for n, positions in by_count.items():
            for j in positions:
                index.extend(range(j * self.seq_len, j * self.seq_len + n))
            spans.append((start, len(positions), n))
            start += len(positions) * n
        return TokenLayout(len(counts), self.seq_len, torch.tensor(index, device=self.mask.device), tuple(spans))

    def token_mask(self, targets: torch.Tensor) -> torch.Tensor | None:
        """[m, S] bool (True = real token) for targets [m], or None when no target is padded."""
        return self.mask[targets] if self.has_padding else None

    def patches(self, w: torch.Tensor, rms: torch.Tensor) -> torch.Tensor:
        """w [g, out, in] -> normalised, zero-padded patches [g, gr·gc, p·p] (row-major over the patch grid)."""
        g, out_f, in_f = w.shape
        p = self.patch
        gr, gc = math.ceil(out_f / p), math.ceil(in_f / p)
        w = w / rms.to(w.dtype)[:, None, None]
        w = nn.functional.pad(w, (0, gc * p - in_f, 0, gr * p - out_f))
        return w.view(g, gr, p, gc, p).transpose(2, 3).reshape(g, gr * gc, p * p)

    def forward(self, base: BaseWeights, targets: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """targets [m] (spec indices) -> tokens [m, S, d]; padded positions are zero.

        Matrices are embedded `chunk` at a time so the patch copies stay small next to the weights themselves.
        """
        d = self.cls.shape[0]
        dtype = self.embed.weight.dtype
        x = torch.zeros(len(targets), self.seq_len, d, device=self.cls.device, dtype=dtype)
        order = targets.tolist()
        for pos, t in chunks_by_shape(base, order, chunk):
            g = base.slot[t[0]][0]
            stack = base.groups[g][1][[base.slot[i][1] for i in t]]
            rms = base.rms[t]
            tok = self.norm(self.embed(self.patches(stack.to(dtype), rms)))
            n = tok.shape[1]
            ti = torch.tensor(t, device=x.device)
            tok = tok + self.row_pos[self.rows[ti, :n]] + self.col_pos[self.cols[ti, :n]]
            x[pos, 1: n + 1] = tok
        ti = targets.to(x.device)
        x[:, 0] = self.cls
        emb = self.depth_emb(self.depth_index[ti]) + self.type_emb(self.type_index[ti])
        x = x + emb[:, None, :]
        if self.has_padding:
            x = x * self.mask[ti, :, None]
        return x

    def pool(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token features x [N, m, S, d] -> per patch-row [N, m, GR, d] and per patch-column [N, m, GC, d] means."""
        tokens = x[:, :, 1:]
        rows = self.row_pool[targets].to(x.dtype) @ tokens
        cols = self.col_pool[targets].to(x.dtype) @ tokens
        return rows, cols

    def to_grid(self, values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token values [N, m, S-1] -> patch grid [N, m, GR, GC] (zero outside each target's grid)."""
        N, m, P = values.shape
        GR, GC = self.grid_rows, self.grid_cols
        index = self.rows[targets] * GC + self.cols[targets]                      # [m, P]
        if self.has_padding:  # padded tokens go to a spare slot that is dropped
            index = torch.where(self.mask[targets, 1:], index, GR * GC)
        out = values.new_zeros(N, m, GR * GC + 1)
        out.scatter_(2, index.expand(N, m, P), values)
        return out[..., : GR * GC].view(N, m, GR, GC)


@dataclass(frozen=True)
class TokenLayout:
    """The packed token layout: only the real tokens of m target matrices, [N, T, d] with T = Σ tokens per matrix.

    The padded layout [N, m, S, d] gives every matrix the longest target's S tokens; with targets of several shapes
    most of them are padding (a mini UNet's 64 × 64 matrices have 5 real tokens of 33), and every linear layer of
    the transformer would spend most of its time on them. Packed, the MLPs and the cross-attention run on real
    tokens only and each matrix's self-attention runs at its own length, without a mask.

    Packed order: groups of targets with equal token counts (in order of first appearance), target by target
    within a group. spans[k] = (start, g, s): group k holds g matrices of s tokens each at packed positions
    [start, start + g·s). index [T]: each packed token's position in the flattened padded layout [m·S].
    """

    m: int
    seq_len: int
    index: torch.Tensor
    spans: tuple[tuple[int, int, int], ...]

    @property
    def is_padded(self) -> bool:
        return not (len(self.spans) == 1 and self.spans[0][2] == self.seq_len)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[N, m, S, d] -> [N, T, d]"""
        flat = x.flatten(1, 2)
        return flat[:, self.index] if self.is_padded else flat

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[N, T, d] -> [N, m, S, d], zero at padded positions"""
        N, _, d = x.shape
        if self.is_padded:
            x = x.new_zeros(N, self.m * self.seq_len, d).index_copy(1, self.index, x)
        return x.view(N, self.m, self.seq_len, d)

    def per_matrix(self, fn, *xs: torch.Tensor) -> torch.Tensor:
        """fn over each matrix's own tokens: xs [N, T, d] each; fn takes and returns [N·g, s, d] per group
        -> [N, T, d'] (fn's output width)."""
        N = xs[0].shape[0]
        parts = []
        for start, g, s in self.spans:
            views = [x[:, start: start + g * s].reshape(N * g, s, x.shape[-1]) for x in xs]
            parts.append(fn(*views).reshape(N, g * s, -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def chunks_by_shape(base: BaseWeights, order: list[int], chunk: int):
    """(positions in `order`, target ids) in runs of at most `chunk` targets of one shape."""
    by_group: dict[int, list[int]] = {}
    for pos, t in enumerate(order):
        by_group.setdefault(base.slot[t][0], []).append(pos)
    for positions in by_group.values():
        for i in range(0, len(positions), chunk):
            pos = positions[i: i + chunk]
            yield pos, [order[p] for p in pos]
