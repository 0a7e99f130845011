"""Text-to-LoRA (Charakorn et al., SakanaAI, ICML 2025) as a baseline: condition in, standard LoRA out.

An MLP hypernetwork that reads only the condition, never the base weights. For each target matrix it mixes three
vectors, the encoded condition (the masked mean of its tokens, `pool_condition`, through T2L's task encoder), a
learned embedding of the target's block depth and one of its module type, and an output head turns the mixture
into that matrix's LoRA factors A [r, in] and B [out, r]. The MLP is shared by every target; the heads are one per
(module type, shape), so 128x128 attention, 512x128 / 128x512 FFN and a UNet's 64x384 cross-attention keys each get
outputs of their own size. It is trained by reconstruction on the zoo: the mean over targets of
the reconstruction term of its TrainConfig (`recon`, as Stage II's), through the same resumable loop as LoFA
(`lofa.hypernet.train.fit`).

    cfg = preset(TextToLoraConfig, "mini")                   # rank, alpha and cond_dim come from the data
    model, history = train_text_to_lora(data, cfg, preset(TrainConfig, "mini"), out_dir)
    loras = predict_cases(model, data.conditions("eval"), data.heldout_ids)   # {case_id: LoraWeights}
    model = TextToLora.from_pretrained(out_dir)              # out_dir: config.json + text_to_lora.safetensors

Where the prediction starts: "zero" is T2L's (and LoRA's) start, B = 0 so ΔW = 0; "mean" puts the training LoRAs'
mean factors under the heads, as `LoraHead.set_start` does for LoFA's Stage II, so step 0 predicts the mean LoRA and
the network learns what the condition changes. Each head's outputs are in its targets' units: the RMS of the
zoo's A and B of that target (`factor_units`), so one learning rate suits factors of any scale.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from lofa import seeds
from lofa.baselines.reference import pool_condition
from lofa.errors import LofaError
from lofa.hypernet.data import Triplets
from lofa.hypernet.losses import RECON_TERMS
from lofa.hypernet.tokenizer import BaseWeights, TargetSpec
from lofa.hypernet.train import LoraBatch, TrainConfig, fit
from lofa.io import read_json, save_safetensors, write_json
from lofa.lora.formats import LoraFactor, LoraWeights

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "text_to_lora.safetensors"
METHOD = "text-to-lora"
STARTS = ("mean", "zero")


@dataclass
class TextToLoraConfig:
    """The shape of the Text-to-LoRA hypernetwork. rank, alpha and cond_dim left None are the data's
    (`for_data`): the zoo's rank and alpha, the condition encoder's width."""

    cond_dim: int | None = field(default=None, metadata={
        "help": "Width Dc of the condition tokens (MiniLM: 384); None takes the data's."})
    rank: int | None = field(default=None, metadata={"help": "Rank r of the predicted LoRAs; None takes the zoo's."})
    alpha: float | None = field(default=None, metadata={
        "help": "Alpha of the predicted LoRAs, ΔW = (alpha / r) · B @ A; None takes the zoo's."})
    task_dim: int = field(default=64, metadata={
        "help": "Width of the encoded condition (T2L's task encoder: Linear + LayerNorm over the pooled tokens)."})
    embed_dim: int = field(default=32, metadata={
        "help": "Width of each learned embedding of a target's block depth and module type."})
    hidden: int = field(default=256, metadata={"help": "Width of the MLP shared by every target."})
    depth: int = field(default=2, metadata={"help": "Residual blocks of the shared MLP after its input layer."})
    dropout: float = field(default=0.05, metadata={
        "help": "Dropout rate inside the shared MLP, in [0, 1) (T2L's is 0.05)."})
    start: str = field(default="mean", metadata={
        "help": "Where the prediction starts: 'mean', step 0 predicts the training LoRAs' mean factors (needs the "
                "zoo's rank); 'zero', B = 0 so ΔW = 0 (T2L's start)."})

    PRESETS = {
        "smoke": {"task_dim": 16, "embed_dim": 8, "hidden": 32, "depth": 1},
        # mini on one CPU core, 8 LoRAs x 40 targets (128x128, 512x128, 128x512) a step: the network's forward and
        # backward take ~0.02 s, the ΔW-space L1 (delta_l1, Stage II's) ~0.18 s; 300 steps ~1 min, ~30 s at 4 LoRAs
        "mini": {"task_dim": 64, "embed_dim": 32, "hidden": 128, "depth": 2},
        "full": {"task_dim": 128, "embed_dim": 64, "hidden": 512, "depth": 3},
        "wan": {"task_dim": 128, "embed_dim": 64, "hidden": 512, "depth": 3},
        "paper": {"task_dim": 128, "embed_dim": 64, "hidden": 512, "depth": 3},
    }

    def __post_init__(self):
        if self.start not in STARTS:
            raise LofaError(f"unknown Text-to-LoRA start {self.start!r}; use 'mean' (the training LoRAs' mean) or "
                            "'zero'")
        for name in ("task_dim", "embed_dim", "hidden"):
            if getattr(self, name) < 1:
                raise LofaError(f"TextToLoraConfig.{name} must be a positive integer, not {getattr(self, name)}")
        if self.depth < 0 or not 0 <= self.dropout < 1:
            raise LofaError(f"TextToLoraConfig: depth {self.depth} must be >= 0 and dropout {self.dropout} in [0, 1)")

    def for_data(self, data: Triplets) -> "TextToLoraConfig":
        """This config with the fields left None taken from `data`: the zoo's rank and alpha, the condition width."""
        return dataclasses.replace(self, cond_dim=self.cond_dim or data.cond_dim, rank=self.rank or data.rank,
                                   alpha=data.alpha_value if self.alpha is None else self.alpha)


class ResidualMLP(nn.Module):
    """x + Dropout(Linear(SiLU(Linear(LayerNorm(x))))): [..., d] -> [..., d]."""

    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class FactorHead(nn.Module):
    """The output head of the g targets of one (module type, shape (out, in)): features [N, g', hidden] of g' of
    them -> A [N, g', r, in], B [N, g', out, r].

    One linear layer gives r·in numbers for A and out·r for B, in the target's units (`a_unit`, `b_unit` [g]),
    added to the start factors (`a_start` [g, r, in], `b_start` [g, out, r]; zero unless `set_start`). B's outputs
    start at zero, so an untrained head predicts its start exactly.
    """

    def __init__(self, hidden: int, rank: int, shape: tuple[int, int], n_targets: int):
        super().__init__()
        self.rank, (self.out_features, self.in_features) = rank, shape
        self.proj = nn.Linear(hidden, rank * (self.in_features + self.out_features))
        with torch.no_grad():
            self.proj.weight[rank * self.in_features:].zero_()
            self.proj.bias[rank * self.in_features:].zero_()
        self.register_buffer("a_start", torch.zeros(n_targets, rank, self.in_features))
        self.register_buffer("b_start", torch.zeros(n_targets, self.out_features, rank))
        self.register_buffer("a_unit", torch.ones(n_targets))
        self.register_buffer("b_unit", torch.ones(n_targets))

    def forward(self, h: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
        """h [N, g', hidden], slots [g'] (positions among this head's targets) -> (A, B)."""
        N, g = h.shape[:2]
        r, o, i = self.rank, self.out_features, self.in_features
        y = self.proj(h)
        a = y[..., : r * i].reshape(N, g, r, i) * self.a_unit[slots, None, None] + self.a_start[slots]
        b = y[..., r * i:].reshape(N, g, o, r) * self.b_unit[slots, None, None] + self.b_start[slots]
        return a, b


class TextToLora(nn.Module):
    """The Text-to-LoRA hypernetwork for the targets of one base model (a TargetSpec: names, shapes, depths, types).

    forward(tokens [N, K, Dc], mask [N, K] bool or None, targets [m] spec indices or None = all)
    -> {target name: (A [N, r, in], B [N, out, r], alpha)}, the LoRA layout of `lofa.hypernet.losses`.
    predict_batch / predict give LoraWeights, as LoFA's predictor does, so `predict_cases` takes this model too.
    """

    def __init__(self, cfg: TextToLoraConfig, spec: TargetSpec):
        super().__init__()
        if cfg.cond_dim is None or cfg.rank is None or cfg.alpha is None:
            raise LofaError("TextToLoraConfig has no cond_dim / rank / alpha; fill them from the data with "
                            "cfg.for_data(data)")
        self.cfg, self.spec = cfg, spec
        e = cfg.embed_dim
        # the condition: pooled tokens [N, Dc] -> [N, task_dim]
        self.task_encoder = nn.Sequential(nn.Linear(cfg.cond_dim, cfg.task_dim), nn.LayerNorm(cfg.task_dim))
        # where the target sits: its block depth and its module type -> [m, e] each
        self.depth_embed = nn.Sequential(nn.Embedding(len(spec.block_names), e), nn.LayerNorm(e))
        self.type_embed = nn.Sequential(nn.Embedding(len(spec.type_names), e), nn.LayerNorm(e))
        self.register_buffer("depths", torch.tensor([t.depth for t in spec.targets]), persistent=False)
        self.register_buffer("types", torch.tensor([t.type for t in spec.targets]), persistent=False)
        # the shared MLP: [N, m, task_dim + 2e] -> [N, m, hidden]
        self.mixer = nn.Sequential(nn.Linear(cfg.task_dim + 2 * e, cfg.hidden), nn.SiLU(), nn.Dropout(cfg.dropout),
                                   *[ResidualMLP(cfg.hidden, cfg.dropout) for _ in range(cfg.depth)],
                                   nn.LayerNorm(cfg.hidden))
        # one head per (module type, shape); target t is slot self.slot[t] of head self.head_of[t]
        groups: dict[str, list[int]] = {}
        for t, target in enumerate(spec.targets):
            groups.setdefault(f"type{target.type}_{target.shape[0]}x{target.shape[1]}", []).append(t)
        self.heads = nn.ModuleDict({key: FactorHead(cfg.hidden, cfg.rank, spec.targets[idx[0]].shape, len(idx))
                                    for key, idx in groups.items()})
        self.head_of = {t: key for key, idx in groups.items() for t in idx}
        self.slot = {t: j for idx in groups.values() for j, t in enumerate(idx)}

    # --- where the prediction starts -----------------------------------------------------------------------------
    @torch.no_grad()
    def set_units(self, units: dict[int, tuple[float, float]]) -> None:
        """Scale each target's head outputs: {target index: (unit of A, unit of B)}, e.g. `factor_units(data)`."""
        for t, (a, b) in units.items():
            head = self.heads[self.head_of[t]]
            head.a_unit[self.slot[t]], head.b_unit[self.slot[t]] = float(a), float(b)

    @torch.no_grad()
    def set_start(self, factors: dict[int, tuple[Tensor, Tensor]]) -> None:
        """Start at `factors` {target index: (A₀ [r, in], B₀ [out, r])}, e.g. `data.mean_factors()` (targets not
        named start at zero), and zero every head, so the untrained model predicts exactly these factors."""
        for t, (a0, b0) in factors.items():
            head = self.heads[self.head_of[t]]
            if tuple(a0.shape) != tuple(head.a_start.shape[1:]) or tuple(b0.shape) != tuple(head.b_start.shape[1:]):
                raise LofaError(f"start factors of target {t} are A {list(a0.shape)}, B {list(b0.shape)}; the model "
                                f"predicts A {list(head.a_start.shape[1:])}, B {list(head.b_start.shape[1:])}")
            head.a_start[self.slot[t]], head.b_start[self.slot[t]] = a0, b0
        for head in self.heads.values():
            nn.init.zeros_(head.proj.weight)
            nn.init.zeros_(head.proj.bias)

    # --- the forward pass ----------------------------------------------------------------------------------------
    def check_condition(self, tokens: Tensor) -> None:
        if tokens.ndim != 3:
            raise LofaError(f"condition tokens must be [N, K, Dc], not {list(tokens.shape)}")
        if tokens.shape[-1] != self.cfg.cond_dim:
            raise LofaError(f"condition tokens have width {tokens.shape[-1]}, this Text-to-LoRA model expects "
                            f"{self.cfg.cond_dim}; encode the condition with the encoder it was trained with")

    def forward(self, tokens: Tensor, mask: Tensor | None = None, targets: Tensor | None = None
                ) -> dict[str, tuple[Tensor, Tensor, float]]:
        """tokens [N, K, Dc], mask [N, K] -> {name: (A [N, r, in], B [N, out, r], alpha)} for `targets`."""
        self.check_condition(tokens)
        targets = torch.arange(len(self.spec)) if targets is None else targets
        weight = self.task_encoder[0].weight
        task = self.task_encoder(pool_condition(tokens, mask).to(weight.dtype))            # [N, task_dim]
        idx = targets.to(self.depths.device)
        where = torch.cat([self.depth_embed(self.depths[idx]), self.type_embed(self.types[idx])], -1)  # [m, 2e]
        N, m = task.shape[0], len(idx)
        h = self.mixer(torch.cat([task[:, None].expand(N, m, -1), where[None].expand(N, m, -1)], -1))  # [N, m, hid]
        order = targets.tolist()
        factors: dict[int, tuple[Tensor, Tensor]] = {}
        for key, head in self.heads.items():
            cols = [j for j, t in enumerate(order) if self.head_of[t] == key]
            if not cols:
                continue
            slots = torch.tensor([self.slot[order[j]] for j in cols], device=h.device)
            a, b = head(h[:, cols], slots)
            factors.update({order[j]: (a[:, k], b[:, k]) for k, j in enumerate(cols)})
        alpha = float(self.cfg.alpha)
        return {self.spec.targets[t].name: (*factors[t], alpha) for t in order}

    # --- prediction, as LoFA's predictor offers it ---------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def predict_batch(self, tokens: Tensor, mask: Tensor | None = None) -> list[LoraWeights]:
        """N conditions, tokens [N, K, Dc] (or [K, Dc]), mask [N, K] -> N LoraWeights ({module name:
        LoraFactor(A [r, in], B [out, r], alpha)}, float32, on the model's device). Runs in eval mode."""
        if tokens.ndim == 2:
            tokens, mask = tokens[None], None if mask is None else mask[None]
        self.check_condition(tokens)
        training = self.training
        self.eval()
        try:
            out = self(tokens.to(self.device), None if mask is None else mask.to(self.device))
        finally:
            self.train(training)
        return [{name: LoraFactor(A=A[i].float(), B=B[i].float(), alpha=alpha) for name, (A, B, alpha) in out.items()}
                for i in range(tokens.shape[0])]

    def predict(self, tokens: Tensor, mask: Tensor | None = None) -> LoraWeights:
        """One condition, tokens [K, Dc] or [1, K, Dc] -> LoraWeights."""
        if tokens.ndim == 3 and tokens.shape[0] != 1:
            raise LofaError(f"predict takes one condition, got {tokens.shape[0]}; use predict_batch")
        return self.predict_batch(tokens, mask)[0]

    # --- files ---------------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """directory/text_to_lora.safetensors (weights and start / unit buffers) and directory/config.json
        (TextToLoraConfig and the TargetSpec), written atomically, the config last."""
        directory = Path(directory)
        save_safetensors(self.state_dict(), directory / WEIGHTS_FILE)
        write_json(directory / CONFIG_FILE, {"method": METHOD, "config": dataclasses.asdict(self.cfg),
                                             "targets": self.spec.to_dict()})

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "TextToLora":
        """A model saved by `save_pretrained`, in eval mode on `device`."""
        from safetensors.torch import load_file

        directory = Path(directory)
        meta = read_json(directory / CONFIG_FILE)
        if meta is None or meta.get("method") != METHOD or not (directory / WEIGHTS_FILE).exists():
            raise LofaError(f"{directory} holds no Text-to-LoRA model ({CONFIG_FILE} + {WEIGHTS_FILE}); save one "
                            "with TextToLora.save_pretrained or train_text_to_lora")
        model = cls(TextToLoraConfig(**meta["config"]), TargetSpec.from_dict(meta["targets"]))
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
        return model.to(device).eval()


# --- training -----------------------------------------------------------------------------------------------------
class TextToLoraObjective:
    """loss_fn(model, batch) for `fit`: the mean over the batch's targets of the reconstruction term `recon`
    (`lofa.hypernet.losses.RECON_TERMS`: "delta" L1(ΔŴ − ΔW) / rms(W), "delta_mse" its squared form), so that
    Text-to-LoRA is trained on the same term as LoFA's Stage II when compared with it."""

    name = "Text-to-LoRA"

    def __init__(self, base: BaseWeights, recon: str = "delta"):
        if recon not in ("delta", "delta_mse"):
            raise LofaError(f"Text-to-LoRA trains on ΔW: recon must be 'delta' or 'delta_mse', not {recon!r}")
        self.base, self.recon = base, RECON_TERMS[recon]

    def to(self, device) -> "TextToLoraObjective":
        self.base = self.base.to(device)
        return self

    def __call__(self, model: nn.Module, batch: LoraBatch) -> tuple[Tensor, dict[str, float]]:
        pred = model(batch.cond, batch.cond_mask, batch.targets)
        terms = [self.recon((A.float(), B.float(), alpha), batch.loras[name], self.base.rms[self.base.spec.index[name]])
                 for name, (A, B, alpha) in pred.items()]
        loss = torch.stack(terms).mean()
        return loss, {"recon": float(loss.detach())}


@torch.no_grad()
def factor_units(data: Triplets) -> dict[int, tuple[float, float]]:
    """{target index: (RMS of the train LoRAs' A, RMS of their B)}: the scale of each target's factors in the zoo
    (1/sqrt(in) for A and 1 for B where a factor is all zero)."""
    rows = torch.tensor([data.row[c] for c in data.train_ids])
    units = {}
    for t, target in enumerate(data.spec.targets):
        a = float(data.A[target.name][rows].square().mean().sqrt())
        b = float(data.B[target.name][rows].square().mean().sqrt())
        units[t] = (a if a > 0 else target.shape[1] ** -0.5, b if b > 0 else 1.0)
    return units


def train_text_to_lora(data: Triplets, cfg: TextToLoraConfig, train_cfg: TrainConfig, out_dir: str | Path,
                       device: str = "cpu", seed: int = 0, progress: bool = True
                       ) -> tuple[TextToLora, list[dict]]:
    """Train Text-to-LoRA on the zoo's train cases, by reconstruction, and save it to out_dir.

    cfg: the network (rank, alpha, cond_dim left None come from `data`); train_cfg: the loop (steps, lr, schedule,
    batch_size LoRAs per step with every target; the Stage II fields are unused). seed: the initialisation and the
    batch stream. out_dir gets checkpoints/ and history.json from `fit` (a run started again resumes) and the
    trained model (config.json + text_to_lora.safetensors, `TextToLora.from_pretrained(out_dir)`).
    Returns (the trained model in eval mode on `device`, the history: one dict per step).
    """
    cfg = cfg.for_data(data)
    if cfg.start == "mean" and cfg.rank != data.rank:
        raise LofaError(f"start 'mean' needs the zoo's rank {data.rank}, the config asks for rank {cfg.rank}; use "
                        "start 'zero' or the zoo's rank")
    torch.manual_seed(seeds.stream(seed, "text_to_lora.init"))
    model = TextToLora(cfg, data.spec)
    to_alpha = data.alpha_value / cfg.alpha  # a zoo B in the predicted alpha's units (1 unless alpha is overridden)
    model.set_units({t: (a, b * to_alpha) for t, (a, b) in factor_units(data).items()})
    if cfg.start == "mean":
        model.set_start({t: (a, b * to_alpha) for t, (a, b) in data.mean_factors().items()})
    objective = TextToLoraObjective(data.base, train_cfg.recon)
    history = fit(model, objective, data.batch_fn(train_cfg.batch_size, seed=seed), train_cfg, out_dir, device=device,
                  progress=progress)
    model.eval()
    model.save_pretrained(out_dir)
    return model, history
