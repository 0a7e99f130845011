"""HyperConfig: the shape of the LoFA hypernetwork (both stages share it).

The defaults are the paper configuration (the authors' released code): d_model 768, 12 heads, 8 blocks,
MLP ratio 4, QK-norm, 96×96 weight patches, rank-32 LoRA with alpha 32, a 512 × 4096 umT5 text context.
The targets (which matrices, their shapes, depths and module types) are not here: they come from a
`lofa.hypernet.tokenizer.TargetSpec` built from the base model, so nothing is tied to Wan.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lofa.config import TAU


@dataclass
class HyperConfig:
    """The shape of the LoFA hypernetwork, shared by Stage I and Stage II; the defaults are the paper's."""

    d_model: int = field(default=768, metadata={"help": "Token width d of the hypernetwork."})
    n_heads: int = field(default=12, metadata={
        "help": "Attention heads of every attention layer; must divide d_model."})
    depth: int = field(default=8, metadata={
        "help": "Blocks, each self-attention over one matrix's tokens, MLP, cross-attention to the condition, MLP."})
    mlp_ratio: float = field(default=4.0, metadata={"help": "Hidden width of every MLP, as a multiple of d_model."})
    qk_norm: bool = field(default=True, metadata={"help": "RMSNorm on each head's queries and keys (QK-norm)."})
    patch: int = field(default=96, metadata={
        "help": "Side p of the square weight patches: a matrix [out, in] becomes ceil(out / p) · ceil(in / p) tokens "
                "plus a CLS token."})
    rank: int = field(default=32, metadata={"help": "Rank r of the predicted LoRAs."})
    alpha: float = field(default=32.0, metadata={
        "help": "Alpha of the predicted LoRAs; ΔW = (alpha / r) · B @ A everywhere (loss, inference, saved file)."})
    cond_dim: int = field(default=4096, metadata={
        "help": "Width Dc of the condition tokens (umT5-XXL: 4096, MiniLM: 384, the condition encoders' dim)."})
    cond_len: int = field(default=512, metadata={
        "help": "Condition tokens K the encoder pads to; the benchmarks and reports use it, the network takes any K."})
    map_rank: int = field(default=32, metadata={
        "help": "Rank k of Stage I's response-map logits U V^T (row and column factors of each matrix)."})
    tau: float = field(default=TAU, metadata={
        "help": "Response threshold τ of Stage I's target maps: an entry responds when |ΔW| / |W| > τ (the paper's "
                "2 %)."})
    stage2_cross_after: list[int] | None = field(default=None, metadata={
        "help": "Blocks (0-based) after which Stage II cross-attends to Stage I's final features; None: after the "
                "middle and the last block (the authors': after blocks 4 and 8 of 8); []: a single-stage model "
                "(ablation)."})
    input_tokens: str = field(default="weights", metadata={
        "help": "What Stage II's blocks read as their token sequence. 'weights' (LoFA's): the base model's weight "
                "patches, one sequence per target matrix, cross-attending to the condition. 'condition' (the 'prompt "
                "input' ablation of the paper's Table 4): the condition tokens self-attend, and learned per-target "
                "query tokens in the weight tokens' layout cross-attend to them; the base weights are never read "
                "(B's unit rms(W) is a constant of the network, `LoraHead.set_units`). Stage I always reads W."})
    lora_head: str = field(default="shared", metadata={
        "help": "Stage II's LoRA head. 'shared' (the paper's) decodes every weight patch of every target with one "
                "linear layer d -> p·r, so each patch's block of A or B lies in one d-dimensional subspace shared by "
                "all targets; 'per_target' adds one such layer per target matrix (zero at the start), which lets the "
                "head hold each target's own patterns (n_targets · 2 · d · p·r more parameters: 0.65 M at mini, "
                "1.1 G at the paper's shapes)."})
    grad_checkpoint: bool = field(default=False, metadata={
        "help": "Recompute each half-block in the backward pass instead of keeping its activations (less memory, "
                "more compute)."})

    PRESETS = {
        # smoke / mini: sized so Stage I + Stage II of all four settings train in < 2 min / ~13 min on 2 shared CPU
        # cores (lofa.run.Run.hypernet); rank, alpha and cond_dim are replaced by the zoo's and the condition's.
        "smoke": {"d_model": 32, "n_heads": 2, "depth": 2, "patch": 16, "rank": 4, "alpha": 4.0, "cond_dim": 384,
                  "cond_len": 32, "map_rank": 8},
        # mini / full: the per-target head, which fit both held-out and training LoRAs better than the shared head at
        # mini; the "shared_head" variant of lofa.run.Run.hypernet is the paper's head on the same Stage I.
        "mini": {"d_model": 64, "n_heads": 4, "depth": 2, "patch": 32, "rank": 4, "alpha": 4.0, "cond_dim": 384,
                 "cond_len": 32, "map_rank": 16, "lora_head": "per_target"},
        "full": {"d_model": 384, "n_heads": 6, "depth": 6, "patch": 32, "rank": 16, "alpha": 16.0, "cond_dim": 384,
                 "cond_len": 32, "map_rank": 32, "lora_head": "per_target"},
        "wan": {},
        "paper": {},
    }

    def __post_init__(self):
        if self.lora_head not in ("shared", "per_target"):
            raise ValueError(f"lora_head {self.lora_head!r}: use 'shared' (the paper's head) or 'per_target'")
        if self.input_tokens not in ("weights", "condition"):
            raise ValueError(f"input_tokens {self.input_tokens!r}: use 'weights' (LoFA's) or 'condition' (the "
                             "prompt-input ablation)")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.stage2_cross_after is not None:
            self.stage2_cross_after = [int(i) for i in self.stage2_cross_after]
            bad = [i for i in self.stage2_cross_after if not 0 <= i < self.depth]
            if bad:
                raise ValueError(f"stage2_cross_after {bad} outside blocks 0..{self.depth - 1}")

    @property
    def feature_cross_after(self) -> list[int]:
        """Blocks after which Stage II attends to Stage I's features."""
        if self.stage2_cross_after is None:
            return sorted({self.depth // 2 - 1, self.depth - 1} - {-1})
        return list(self.stage2_cross_after)

    @property
    def lora_scale(self) -> float:
        return self.alpha / self.rank
