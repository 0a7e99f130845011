"""The LoFA hypernetwork: a transformer over weight tokens that cross-attends to a condition.

Read top to bottom: attention and MLP; the block (self-attention, MLP, cross-attention, MLP, as the authors'
code); Stage II's feature cross-attention; the backbone shared by both stages; the Stage I response-map head and
the Stage II LoRA head; the two stages.

Shapes: N conditions (one LoRA each), m target matrices, S tokens per matrix (CLS + patches, padded to the
longest target), d = d_model, K condition tokens of width Dc. The heads read the padded layout [N, m, S, d]; the
blocks run on the packed one [N, T, d], the T real tokens of the m matrices (`TokenLayout`): each matrix's
self-attention over its own tokens, the cross-attention over all T tokens of one condition, so the condition's
keys and values are computed once per condition and block and shared by every matrix, never once per matrix
(the authors' preview code recomputes them for every one of the 240 matrices).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lofa.errors import LofaError
from lofa.hypernet.config import HyperConfig
from lofa.hypernet.tokenizer import BaseWeights, RMSNorm, TargetSpec, TokenLayout, WeightTokenizer, chunks_by_shape


def _split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, L, d] -> [B, L, H, d/H] (a view)"""
    return x.unflatten(-1, (n_heads, -1))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q [B, Lq, H, Dh], k, v [B, Lk, H, Dh], key mask [B, Lk] or None -> [B, Lq, H·Dh].

    SDPA gets [B, H, L, Dh] views of the [B, L, H, Dh] tensors: the cuDNN and flash kernels take those strides as
    they are and lay their output out like the query, so no head transpose is ever copied on a GPU.
    """
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=_key_mask(mask))
    return o.transpose(1, 2).flatten(2)


def _key_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Key-padding mask [B, L] (True = attend) -> SDPA's broadcastable [B, 1, 1, L]; None keeps the flash kernel."""
    return None if mask is None else mask[:, None, None, :]


class SelfAttention(nn.Module):
    def __init__(self, d: int, n_heads: int, qk_norm: bool):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.q_norm = RMSNorm(d // n_heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(d // n_heads) if qk_norm else nn.Identity()
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, d], mask [B, L] or None -> [B, L, d]"""
        q, k, v = (_split_heads(t, self.n_heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.out(_attend(self.q_norm(q), self.k_norm(k), v, mask))


class CrossAttention(nn.Module):
    def __init__(self, d: int, n_heads: int, qk_norm: bool):
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.q_norm = RMSNorm(d // n_heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(d // n_heads) if qk_norm else nn.Identity()
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, Lq, d] attends to context [B, Lk, d] (mask [B, Lk] or None) -> [B, Lq, d]"""
        q = _split_heads(self.q(x), self.n_heads)
        k, v = (_split_heads(t, self.n_heads) for t in self.kv(context).chunk(2, dim=-1))
        return self.out(_attend(self.q_norm(q), self.k_norm(k), v, mask))


class MLP(nn.Module):
    def __init__(self, d: int, ratio: float):
        super().__init__()
        self.fc1 = nn.Linear(d, int(d * ratio))
        self.fc2 = nn.Linear(int(d * ratio), d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] -> [..., d]"""
        if x.is_cuda and not (torch.is_grad_enabled() and (x.requires_grad or self.fc1.weight.requires_grad)):
            # Inference on a GPU: bias and tanh-GELU run in cuBLASLt's GEMM epilogue (the same function), which
            # saves writing and re-reading the 4d-wide hidden activation, the largest tensor of every block.
            h = torch._addmm_activation(self.fc1.bias, x.reshape(-1, x.shape[-1]), self.fc1.weight.t(), use_gelu=True)
            return self.fc2(h.view(*x.shape[:-1], h.shape[-1]))
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm residual block: self-attention over one matrix's tokens, MLP, cross-attention to the condition, MLP.

    The two halves are separate methods because the first never sees the condition: block 0's self half is a
    function of the base weights alone, so the predictor computes it once per base model.
    """

    def __init__(self, cfg: HyperConfig):
        super().__init__()
        d = cfg.d_model
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.norm3, self.norm4 = RMSNorm(d), RMSNorm(d)
        self.attn = SelfAttention(d, cfg.n_heads, cfg.qk_norm)
        self.mlp1 = MLP(d, cfg.mlp_ratio)
        self.cross = CrossAttention(d, cfg.n_heads, cfg.qk_norm)
        self.mlp2 = MLP(d, cfg.mlp_ratio)

    def self_half(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """x [N, T, d] packed (`layout`) -> [N, T, d]; each matrix's tokens attend to that matrix's tokens only."""
        x = x + layout.per_matrix(self.attn, self.norm1(x))
        return x + self.mlp1(self.norm2(x))

    def cross_half(self, x: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor | None) -> torch.Tensor:
        """x [N, T, d] attends to cond [N, K, d] (cond_mask [N, K] or None) -> [N, T, d]"""
        x = x + self.cross(self.norm3(x), cond, cond_mask)
        return x + self.mlp2(self.norm4(x))


class FeatureCross(nn.Module):
    """Stage II's extra residual cross-attention: each matrix's tokens attend to Stage I's final features of the
    same matrix. The output projection starts at zero, so a Stage II copied from Stage I computes exactly Stage I's
    backbone at initialisation."""

    def __init__(self, cfg: HyperConfig):
        super().__init__()
        d = cfg.d_model
        self.norm = RMSNorm(d)
        self.norm_features = RMSNorm(d)
        self.cross = CrossAttention(d, cfg.n_heads, cfg.qk_norm)
        nn.init.zeros_(self.cross.out.weight)
        nn.init.zeros_(self.cross.out.bias)

    def forward(self, x: torch.Tensor, features: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """x, features [N, T, d] packed (`layout`) -> [N, T, d]"""
        return x + layout.per_matrix(self.cross, self.norm(x), self.norm_features(features))


def trim_condition(cond: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drop trailing condition positions masked in every sample, and the mask itself once nothing is masked.

    cond [N, K, Dc], mask [N, K] bool -> cond [N, K', Dc], mask [N, K'] or None. Exact: masked keys get zero
    attention. A 512-token umT5 context with a 40-token prompt attends over 40 keys, through the flash kernel.
    """
    if mask is None:
        return cond, None
    mask = mask.to(torch.bool)
    if not mask.any(dim=1).all():
        raise LofaError("a condition has no valid token (its mask is all False); give every sample at least one")
    keep = int(mask.any(dim=0).nonzero().max()) + 1
    cond, mask = cond[:, :keep], mask[:, :keep]
    return (cond, None) if bool(mask.all()) else (cond, mask.to(cond.device))


class Backbone(nn.Module):
    """The backbone both stages share: weight tokenizer, condition projection, blocks, final norm.

    `prefix` is the condition-independent start (tokens through block 0's self half); `forward` continues from it
    with the condition. Gradient checkpointing wraps each half-block; the function is passed directly (a bound
    method of that block), never through a closure over the loop variable, so the recomputation in backward runs
    the same block as the forward did (the authors' preview code wraps each block in a lambda over the
    loop variable, so its recomputation runs the last block and the gradients are wrong).
    """

    tokenizer_class = WeightTokenizer

    def __init__(self, cfg: HyperConfig, spec: TargetSpec, feature_cross_after: list[int] = ()):
        super().__init__()
        d = cfg.d_model
        self.grad_checkpoint = cfg.grad_checkpoint
        self.tokenizer = self.tokenizer_class(spec, d, cfg.patch)
        # Condition standardisation (per channel, fitted on the training conditions by `set_condition_stats`).
        # Conditions of one task are alike (MiniLM states of two action prompts have cosine ~0.9), so without it the
        # RMS-normalised projection is dominated by what every condition shares and the part that tells cases apart
        # reaches the blocks at a few percent of the signal.
        self.register_buffer("cond_shift", torch.zeros(cfg.cond_dim))
        self.register_buffer("cond_scale", torch.ones(cfg.cond_dim))
        self.cond_proj = nn.Linear(cfg.cond_dim, d)
        self.cond_norm = RMSNorm(d)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.feature_cross = nn.ModuleDict({str(i): FeatureCross(cfg) for i in feature_cross_after})
        self.norm_out = RMSNorm(d)

    @torch.no_grad()
    def set_condition_stats(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Fit the condition standardisation to training conditions: tokens [..., K, Dc], mask [..., K] bool (the
        valid tokens; None = all) -> per-channel mean and standard deviation over the valid tokens."""
        valid = tokens.reshape(-1, tokens.shape[-1]).double()
        if mask is not None:
            valid = valid[mask.reshape(-1).to(torch.bool)]
        if len(valid) < 2:
            raise LofaError("condition statistics need at least two valid condition tokens")
        self.cond_shift.copy_(valid.mean(0))
        self.cond_scale.copy_(valid.std(0).clamp_min(1e-6))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before the condition standardisation carry none: they are the identity
        for name, default in (("cond_shift", self.cond_shift.new_zeros), ("cond_scale", self.cond_shift.new_ones)):
            state_dict.setdefault(prefix + name, default(self.cond_shift.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _run(self, fn, *args):
        if self.grad_checkpoint and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def prefix(self, base: BaseWeights, targets: torch.Tensor, layout: TokenLayout | None = None) -> torch.Tensor:
        """targets [m] -> packed tokens after block 0's self half [T, d]; depends on the base weights only."""
        layout = self.tokenizer.layout(targets) if layout is None else layout
        x = layout.pack(self.tokenizer(base, targets)[None])
        return self._run(self.blocks[0].self_half, x, layout)[0]

    def forward(self, x: torch.Tensor, layout: TokenLayout, cond: torch.Tensor, cond_mask: torch.Tensor | None,
                features: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, d] from `prefix` (or [N, T, d]), layout of its targets (`tokenizer.layout`), cond [N, K, Dc]
        (already trimmed), cond_mask [N, K] or None, features [N, m, S, d] (Stage I's, for Stage II) or None
        -> features [N, m, S, d], zero at padded positions"""
        N = cond.shape[0]
        c = self.cond_norm(self.cond_proj((cond - self.cond_shift.to(cond.dtype)) / self.cond_scale.to(cond.dtype)))
        x = x.expand(N, *x.shape[-2:])
        f = None if features is None else layout.pack(features)
        for i, block in enumerate(self.blocks):
            if i > 0:
                x = self._run(block.self_half, x, layout)
            x = self._run(block.cross_half, x, c, cond_mask)
            if f is not None and str(i) in self.feature_cross:
                x = self._run(self.feature_cross[str(i)], x, f, layout)
        return layout.unpack(self.norm_out(x))


class QueryTokenizer(WeightTokenizer):
    """The weight tokens with the weights taken out, for the prompt-input ablation (`PromptNet`): the same layout
    (a CLS slot and one token per p×p patch of each target, the same masks and pooling) and the same token recipe,
    RMSNorm(embedding) + row and column position + block-depth and module-type embeddings, but the embedding of each
    patch token is a learned query vector of its own (one per real patch of each target: `query` [patches, d]) where
    LoFA embeds the weight patch. No patch embedding, no CLS parameter (nothing reads the CLS slot's output here):
    `base` is never read."""

    def __init__(self, spec: TargetSpec, d_model: int, patch: int):
        super().__init__(spec, d_model, patch)
        del self.embed, self.cls
        real = self.mask[:, 1:]                                       # [M, S-1] the real patch tokens
        index = torch.zeros_like(self.rows)
        index[real] = torch.arange(int(real.sum()))
        self.register_buffer("query_index", index, persistent=False)  # (target, patch) -> row of `query`
        self.query = nn.Parameter(torch.randn(int(real.sum()), d_model) * 0.02)

    def forward(self, base: BaseWeights | None, targets: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """targets [m] -> query tokens [m, S, d]; padded positions are zero. `base` and `chunk` are not used."""
        ti = targets.to(self.query.device)
        queries = self.norm(self.query[self.query_index[ti]])                                # [m, S-1, d]
        patches = queries + self.row_pos[self.rows[ti]] + self.col_pos[self.cols[ti]]
        x = torch.cat([torch.zeros_like(patches[:, :1]), patches], dim=1)
        x = x + (self.depth_emb(self.depth_index[ti]) + self.type_emb(self.type_index[ti]))[:, None, :]
        return x * self.mask[ti, :, None] if self.has_padding else x


def _condition_self_half(block: Block, c: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A block's self half over the condition tokens: c [N, K, d], key mask [N, K] or None -> [N, K, d]."""
    c = c + block.attn(block.norm1(c), mask)
    return c + block.mlp1(block.norm2(c))


class PromptNet(Backbone):
    """The backbone of the 'prompt input' ablation (the paper's Table 4): the condition is the input sequence and
    the base weights are not read (`HyperConfig.input_tokens = "condition"`).

    Backbone's blocks (the same modules and parameters) with the roles swapped: in each block the condition tokens
    (standardised and projected as in Backbone) run the self half — self-attention over the condition, MLP — and the
    learned per-target query tokens of `QueryTokenizer`, standing where LoFA's weight tokens stand, run the cross
    half, reading the condition stream of that block. The queries leave in the weight tokens' layout, so
    Stage II's `LoraHead` decodes them unchanged (with a fixed unit for B: `LoraHead.set_units`). `prefix` is the
    query tokens alone, a function of nothing but the network's parameters.
    """

    tokenizer_class = QueryTokenizer

    def prefix(self, base: BaseWeights | None, targets: torch.Tensor, layout: TokenLayout | None = None
               ) -> torch.Tensor:
        """targets [m] -> packed query tokens [T, d]; the base weights are not read."""
        layout = self.tokenizer.layout(targets) if layout is None else layout
        return layout.pack(self.tokenizer(None, targets)[None])[0]

    def forward(self, x: torch.Tensor, layout: TokenLayout, cond: torch.Tensor, cond_mask: torch.Tensor | None,
                features: torch.Tensor | None = None) -> torch.Tensor:
        """As `Backbone.forward`: x [T, d] from `prefix` -> features [N, m, S, d], zero at padded positions."""
        N = cond.shape[0]
        c = self.cond_norm(self.cond_proj((cond - self.cond_shift.to(cond.dtype)) / self.cond_scale.to(cond.dtype)))
        x = x.expand(N, *x.shape[-2:])
        f = None if features is None else layout.pack(features)
        for i, block in enumerate(self.blocks):
            c = self._run(_condition_self_half, block, c, cond_mask)
            x = self._run(block.cross_half, x, c, cond_mask)
            if f is not None and str(i) in self.feature_cross:
                x = self._run(self.feature_cross[str(i)], x, f, layout)
        return layout.unpack(self.norm_out(x))


class ResponseMapHead(nn.Module):
    """Stage I: response-map logits, one [N, out, in] tensor per target matrix (each at its own shape).

    logit[o, i] = <U_o, V_i> / sqrt(k) + b[o//p, i//p] + c + β · log(|W[o, i]| / rms(W) + 1e-6)
    U (rows) and V (columns) are rank-k factors decoded from the patch-row and patch-column means of the token
    features, b a per-patch bias from each token, c and β per matrix from the CLS token. Every term is unbounded,
    so the map can go to "no response" anywhere (the authors' softplus floor kept p ≥ 0.45, so their BCE could
    never say "no response"). The last term carries the input weight itself: the target is |ΔW| > τ·|W|, so small
    |W| entries respond more easily.

    Logits are computed per group of equal-shape targets and never padded to the largest target: with FFN targets
    (512 × 128 beside 128 × 128 attention) a padded map would be 16× larger than the attention maps it holds.
    """

    def __init__(self, cfg: HyperConfig):
        super().__init__()
        d, p, k = cfg.d_model, cfg.patch, cfg.map_rank
        self.patch, self.rank = p, k
        self.norm = RMSNorm(d)
        self.rows = nn.Linear(d, p * k)
        self.cols = nn.Linear(d, p * k)
        self.patch_bias = nn.Linear(d, 1)
        self.global_terms = nn.Linear(d, 2)  # (c, β)
        nn.init.zeros_(self.global_terms.weight)
        with torch.no_grad():
            self.global_terms.bias.copy_(torch.tensor([0.0, -1.0]))

    def forward(self, feats: torch.Tensor, targets: torch.Tensor, tokenizer: WeightTokenizer,
                base: BaseWeights) -> list[torch.Tensor]:
        """feats [N, m, S, d] -> m logit maps, the j-th [N, out, in] of target targets[j]."""
        N, m = feats.shape[:2]
        p, k = self.patch, self.rank
        h = self.norm(feats)
        rows, cols = tokenizer.pool(h, targets)                                   # [N, m, GR, d], [N, m, GC, d]
        u = self.rows(rows).reshape(N, m, -1, k)                                  # [N, m, GR·p, k]
        v = self.cols(cols).reshape(N, m, -1, k)                                  # [N, m, GC·p, k]
        bias = tokenizer.to_grid(self.patch_bias(h[:, :, 1:])[..., 0], targets)   # [N, m, GR, GC]
        c, beta = self.global_terms(h[:, :, 0]).unbind(-1)                        # [N, m] each
        logits: list[torch.Tensor | None] = [None] * m
        for positions, group_targets in chunks_by_shape(base, targets.tolist(), len(targets)):
            j = torch.tensor(positions, device=feats.device)
            out_f, in_f = base.spec.targets[group_targets[0]].shape
            gr, gc = math.ceil(out_f / p), math.ceil(in_f / p)
            group = u[:, j, :out_f] @ v[:, j, :in_f].transpose(-1, -2) / math.sqrt(k)     # [N, g, out, in]
            b = bias[:, j, :gr, :gc].repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)
            group = group + b[..., :out_f, :in_f]
            log_w = _log_abs_normalised(base, group_targets).to(group.dtype)                 # [g, out, in]
            group = group + c[:, j, None, None] + beta[:, j, None, None] * log_w
            for g, pos in enumerate(positions):
                logits[pos] = group[:, g]
        return logits


def _log_abs_normalised(base: BaseWeights, targets: list[int]) -> torch.Tensor:
    """log(|W| / rms(W) + 1e-6) of targets of one shape -> [g, out, in] float32"""
    w = torch.stack([base[t] for t in targets]).float()
    return torch.log(w.abs() / base.rms[targets].to(w.device)[:, None, None] + 1e-6)


class LoraHead(nn.Module):
    """Stage II: LoRA factors A [N, m, r, GC·p] and B [N, m, GR·p, r] (crop to [r, in] and [out, r]).

    A's columns come from the patch-column features and B's rows from the patch-row features. Two fixed units, no
    learned gain: A is divided by sqrt(in) (the scale of a trained LoRA's A, as peft initialises it) and B is
    multiplied by rms(W), because the tokens saw W / rms(W) and ΔW must come back in W's units. The factors
    returned are the LoRA: the loss, the diffusion term, the merge and the saved file all use (alpha / r) · B @ A.

    Where the prediction starts: the paper's head starts at ΔW = 0 (B's projection zero, A's random). `set_start`
    instead puts fixed factors under the prediction — A = A₀ + Â, B = B₀ + B̂ with (A₀, B₀) per target, e.g. the
    mean factors of the training LoRAs, and both projections zero — so training begins at the mean LoRA and the
    network learns only what the condition changes (the residual). A₀ and B₀ are buffers, saved with the weights; a
    head without them (the paper's) has none, so its files and its speed are the paper head's.

    cfg.lora_head = "per_target" adds to each projection one layer per target matrix, `a_per_target` and
    `b_per_target` [n_targets, d, p·r] (zero at construction and at `set_start`): the shared layer alone can only place
    a patch's block of A or B in one d-dimensional subspace common to every target.

    cfg.input_tokens = "condition" (the prompt-input ablation, which never reads the base weights) gives B a fixed unit
    instead of the given base's rms(W): the buffer `b_unit` [n_targets], saved with the weights and set once from the
    training base by `set_units`, as Text-to-LoRA's factor units are.
    """

    def __init__(self, cfg: HyperConfig, n_targets: int, grid_rows: int, grid_cols: int):
        super().__init__()
        d, p, r = cfg.d_model, cfg.patch, cfg.rank
        self.patch, self.rank = p, r
        self.norm = RMSNorm(d)
        self.a = nn.Linear(d, p * r)
        self.b = nn.Linear(d, p * r)
        nn.init.zeros_(self.b.weight)
        nn.init.zeros_(self.b.bias)
        self.start_shapes = ((n_targets, r, grid_cols * p), (n_targets, grid_rows * p, r))
        self.a_per_target = self.b_per_target = None
        if cfg.lora_head == "per_target":
            self.a_per_target = nn.Parameter(torch.zeros(n_targets, d, p * r))
            self.b_per_target = nn.Parameter(torch.zeros(n_targets, d, p * r))
        self.register_buffer("a_start", None)  # set_start (or a loaded state dict) fills them
        self.register_buffer("b_start", None)
        self.register_buffer("b_unit", torch.ones(n_targets) if cfg.input_tokens == "condition" else None)

    @torch.no_grad()
    def set_units(self, w_rms: torch.Tensor) -> None:
        """Fix B's unit to w_rms [n_targets] (rms(W) of the training base) for a head whose network never reads the
        base weights (cfg.input_tokens = "condition"); a head of LoFA's takes rms(W) from the base at every call."""
        if self.b_unit is None:
            raise LofaError("this LoRA head takes B's unit from the base weights at every call; fixed units are for a "
                            "network that does not read them (HyperConfig.input_tokens = 'condition')")
        self.b_unit.copy_(w_rms)

    @torch.no_grad()
    def set_start(self, factors: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Start the prediction at `factors` {target index: (A₀ [r, in], B₀ [out, r])} (targets not named start at
        zero) and zero both projections, so that the head outputs exactly these factors until trained."""
        device = self.a.weight.device
        self.register_buffer("a_start", torch.zeros(self.start_shapes[0], device=device))
        self.register_buffer("b_start", torch.zeros(self.start_shapes[1], device=device))
        for t, (a0, b0) in factors.items():
            if a0.shape[0] != self.rank or b0.shape[1] != self.rank:
                raise LofaError(f"start factors of target {t} have rank {a0.shape[0]}, the head predicts rank "
                                f"{self.rank}")
            self.a_start[t, :, : a0.shape[1]] = a0
            self.b_start[t, : b0.shape[0]] = b0
        for layer in (self.a, self.b):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.a_per_target is not None:
            self.a_per_target.zero_()
            self.b_per_target.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a saved head with start factors brings them: make room for them before torch copies them in
        if prefix + "a_start" in state_dict and self.a_start is None:
            device = self.a.weight.device
            self.register_buffer("a_start", torch.empty(self.start_shapes[0], device=device))
            self.register_buffer("b_start", torch.empty(self.start_shapes[1], device=device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, feats: torch.Tensor, targets: torch.Tensor, tokenizer: WeightTokenizer,
                w_rms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        N, m = feats.shape[:2]
        p, r = self.patch, self.rank
        rows, cols = tokenizer.pool(self.norm(feats), targets)
        a, b = self.a(cols), self.b(rows)                                   # [N, m, GC, p·r], [N, m, GR, p·r]
        if self.a_per_target is not None:
            a = a + torch.einsum("nmgd,mde->nmge", cols, self.a_per_target[targets].to(cols.dtype))
            b = b + torch.einsum("nmgd,mde->nmge", rows, self.b_per_target[targets].to(rows.dtype))
        a = a.view(N, m, -1, p, r).permute(0, 1, 4, 2, 3).reshape(N, m, r, -1)
        b = b.view(N, m, -1, r)
        a = a * tokenizer.in_features[targets].to(a.dtype).rsqrt()[:, None, None]
        b = b * (w_rms if self.b_unit is None else self.b_unit)[targets].to(b.dtype)[:, None, None]
        if self.a_start is not None:
            a, b = a + self.a_start[targets], b + self.b_start[targets]
        return a, b


@dataclass
class Stage1Output:
    features: torch.Tensor              # [N, m, S, d] final token features (what Stage II attends to)
    logits: list[torch.Tensor] | None   # per target [N, out, in] response-map logits, or None when not decoded


@dataclass
class Stage2Output:
    A: torch.Tensor                     # [N, m, r, GC·p]
    B: torch.Tensor                     # [N, m, GR·p, r]


class Stage1(nn.Module):
    """f_θ(W + E_pos + E_type, C) -> response map R̂. The condition enters only through cross-attention."""

    def __init__(self, cfg: HyperConfig, spec: TargetSpec):
        super().__init__()
        if cfg.input_tokens != "weights":
            raise LofaError(f"Stage I reads the base weights (input_tokens 'weights', not {cfg.input_tokens!r}): its "
                            "map is |ΔW / W| > τ; the prompt-input ablation is a single Stage II")
        self.cfg, self.spec = cfg, spec
        self.backbone = Backbone(cfg, spec)
        self.map_head = ResponseMapHead(cfg)
        # The balanced BCE weighs responding and silent entries alike, so its logit 0 decides as if half of all
        # entries responded; at the paper's τ most of ours do (84-95 % at mini), and logit 0 under-predicts them.
        # Adding the log-odds of the training maps' density π restores the decision at the true prior (logit
        # adjustment): `set_map_density` fits it, `decide` applies it. 0 (logit 0) until fitted and in older files.
        self.register_buffer("map_offset", torch.zeros(()))

    @torch.no_grad()
    def set_map_density(self, density: float) -> None:
        """Decide at the prior `density` (0 < π < 1, the fraction of responding entries in the training maps):
        map_offset = log(π / (1 − π))."""
        if not 0.0 < density < 1.0:
            raise LofaError(f"map density must lie strictly between 0 and 1, not {density}; fit it on training maps "
                            "that have both responding and silent entries")
        self.map_offset.fill_(math.log(density / (1.0 - density)))

    def decide(self, logits: torch.Tensor, calibrated: bool = True) -> torch.Tensor:
        """Response map from logits (any shape) -> bool: logit + map_offset > 0 (calibrated) or logit > 0."""
        return logits + self.map_offset.to(logits.dtype) > 0 if calibrated else logits > 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # files from before the calibration carry no offset: they decide at logit 0
        state_dict.setdefault(prefix + "map_offset", self.map_offset.new_zeros(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, base: BaseWeights, targets: torch.Tensor, cond: torch.Tensor,
                cond_mask: torch.Tensor | None = None, *, prefix: torch.Tensor | None = None,
                decode_map: bool = True) -> Stage1Output:
        """targets [m] spec indices; cond [N, K, Dc], cond_mask [N, K]; prefix [T, d] from
        `backbone.prefix` when cached. decode_map=False skips the map (inference needs only the features)."""
        cond, cond_mask = trim_condition(cond, cond_mask)
        layout = self.backbone.tokenizer.layout(targets)
        x = self.backbone.prefix(base, targets, layout) if prefix is None else prefix
        feats = self.backbone(x, layout, cond, cond_mask)
        logits = self.map_head(feats, targets, self.backbone.tokenizer, base) if decode_map else None
        return Stage1Output(feats, logits)


class Stage2(nn.Module):
    """Stage I's architecture plus feature cross-attention to Stage I, with A and B heads at rank r.

    Build it with `Stage2.from_stage1(stage1)` (the paper initialises Stage II from Stage I) or `Stage2(cfg, spec)`
    from scratch; with cfg.stage2_cross_after = [] or stage1_features=None it is the single-stage ablation, and with
    cfg.input_tokens = "condition" its backbone is `PromptNet` (the prompt-input ablation).
    """

    def __init__(self, cfg: HyperConfig, spec: TargetSpec):
        super().__init__()
        self.cfg, self.spec = cfg, spec
        backbone = PromptNet if cfg.input_tokens == "condition" else Backbone
        self.backbone = backbone(cfg, spec, cfg.feature_cross_after)
        tokenizer = self.backbone.tokenizer
        self.lora_head = LoraHead(cfg, len(spec), tokenizer.grid_rows, tokenizer.grid_cols)

    @classmethod
    def from_stage1(cls, stage1: Stage1, lora_head: str | None = None) -> "Stage2":
        """A Stage II whose tokenizer, condition projection and blocks are copies of Stage I's; `lora_head`
        ("shared" | "per_target") replaces the configuration's head (Stage I has none)."""
        ref = next(stage1.parameters())
        cfg = stage1.cfg if lora_head is None else replace(stage1.cfg, lora_head=lora_head)
        stage2 = cls(cfg, stage1.spec).to(device=ref.device, dtype=ref.dtype)
        missing, unexpected = stage2.backbone.load_state_dict(stage1.backbone.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("feature_cross.") for k in missing), (missing, unexpected)
        return stage2

    def forward(self, base: BaseWeights, targets: torch.Tensor, cond: torch.Tensor,
                cond_mask: torch.Tensor | None = None, stage1_features: torch.Tensor | None = None, *,
                prefix: torch.Tensor | None = None) -> Stage2Output:
        """targets [m]; cond [N, K, Dc]; stage1_features [N, m, S, d] (Stage1Output.features) or None."""
        cond, cond_mask = trim_condition(cond, cond_mask)
        layout = self.backbone.tokenizer.layout(targets)
        x = self.backbone.prefix(base, targets, layout) if prefix is None else prefix
        feats = self.backbone(x, layout, cond, cond_mask, stage1_features)
        return Stage2Output(*self.lora_head(feats, targets, self.backbone.tokenizer, base.rms))

    def lora(self, out: Stage2Output, targets: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """{name: (A [N, r, in], B [N, out, r], alpha)} cropped from the padded head outputs (views)."""
        lora = {}
        for j, t in enumerate(targets.tolist()):
            target = self.spec.targets[t]
            out_f, in_f = target.shape
            lora[target.name] = (out.A[:, j, :, :in_f], out.B[:, j, :out_f], self.cfg.alpha)
        return lora


class JointStages(nn.Module):
    """Stage I feeding Stage II, trained as one network by Stage II's loss alone: the 'lightweight' ablation of the
    paper's Table 4, Stage II guided by implicit features without explicit response supervision.

    Built as LoFA is (`Stage2.from_stage1` of an untrained Stage I, feature cross-attention after the same blocks),
    but no response map is ever computed or supervised: Stage I's backbone learns whatever features help Stage II's
    reconstruction (and diffusion) term through the feature cross-attention, end to end, and its map decoder is frozen
    at its initialisation (never run). Same parameters and the same inference path as LoFA: save `stage1` and `stage2`
    with `save_pretrained` and the `LoFA` predictor runs them unchanged. forward / lora have Stage II's signature, so
    `Stage2Objective(base, cfg, stage1=None)` trains it with Stage II's loop.
    """

    def __init__(self, stage1: Stage1, stage2: Stage2):
        super().__init__()
        self.stage1, self.stage2 = stage1, stage2
        self.cfg, self.spec = stage2.cfg, stage2.spec
        stage1.map_head.requires_grad_(False)

    def forward(self, base: BaseWeights, targets: torch.Tensor, cond: torch.Tensor,
                cond_mask: torch.Tensor | None = None, stage1_features: torch.Tensor | None = None) -> Stage2Output:
        """As `Stage2.forward`, with Stage I's features computed here, with gradient (stage1_features must be None)."""
        if stage1_features is not None:
            raise LofaError("JointStages computes Stage I's features itself; pass stage1_features=None")
        features = self.stage1(base, targets, cond, cond_mask, decode_map=False).features
        return self.stage2(base, targets, cond, cond_mask, features)

    def lora(self, out: Stage2Output, targets: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        return self.stage2.lora(out, targets)
