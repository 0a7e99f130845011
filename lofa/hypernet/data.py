"""The hypernetwork's training data: triplets (condition C, LoRA ΔW, base weights W) from a LoRA zoo, the
flow-matching term of Stage II through the frozen base generator, and response maps of the zoo's LoRAs, of predicted
LoRAs and of Stage I in one layout for evaluation.

    data = Triplets(world, zoo, gen, "text", cfg, text=TextEncoder())      # or "pose" / "image" with encoder=...
    batch_fn = data.batch_fn(batch_size=16, matrices=8)                    # for hypernet.train.fit (Stage I)
    loss_fn = DiffusionLoss(gen, world, TextEncoder(), cfg)                 # Stage2Objective(diffusion_loss_fn=...)
    batch = data.batch(data.heldout_ids, split="eval")                     # held-out cases, reserved conditions
    maps, valid = lora_maps(data.base, batch.loras)                        # true response maps [N, M, R, C]
    pred = stage1_maps(stage1, data, data.heldout_ids)                     # Stage I's maps, same layout

Conditions per paper setting (the condition kind), precomputed once per case as a bank of `views`:
- "text" (actions-text): MiniLM token states of the case's fine prompts with their key-padding mask; the "train"
  split holds the train phrasings, the "eval" split the reserved eval phrasings nobody trains on.
- "pose" (actions-pose): the pose encoder's tokens of `world.condition([case])`.
- "image" (styles, identities): the image encoder's tokens of the reference image `world.condition([case], seed)`,
  one view per seed ("train" and "eval" seeds are disjoint); a condition that does not change with the seed (the
  canonical pose sequence, the neutral reference face) keeps a single view.
Each training step draws a random view per case. Only TRAIN-split LoRAs ever enter a training batch; held-out
cases are for evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from lofa import seeds as seed_streams
from lofa.diffusion import flow_matching_loss, randn
from lofa.errors import LofaError
from lofa.response import relative_change, response_map
from lofa.config import TAU
from lofa.hypernet.losses import delta
from lofa.hypernet.train import LoraBatch
from lofa.hypernet.tokenizer import BaseWeights, TargetSpec

CONDITION_KINDS = ("text", "pose", "image")


@dataclass
class TripletConfig:
    """How conditions are drawn and how the Stage II diffusion term samples clips (it draws t from the base
    generator's own distribution, `Generator.t_distribution`, not from here)."""

    views: int = field(default=8, metadata={
        "help": "Condition seeds per case for pose and image conditions (a seed-independent condition keeps one); "
                "text conditions use every phrasing of the split instead."})
    clips_per_case: int = field(default=8, metadata={
        "help": "Renders of each case, with fine train captions, rendered once and cached for Stage II's diffusion "
                "term."})
    clips_per_step: int = field(default=2, metadata={
        "help": "Of those renders, how many each LoRA of a step is scored on (drawn with t and noise per step)."})
    encode_chunk: int = field(default=256, metadata={
        "help": "Conditions encoded per forward pass of the condition encoder when the condition bank is built."})

    PRESETS = {
        "smoke": {"views": 2, "clips_per_case": 2, "clips_per_step": 1},
        # as many renders per case as the per-case LoRAs saw (LoraTrainConfig.n_renders): Stage II's diffusion term
        # is their training objective, amortised over cases
        "mini": {"views": 4, "clips_per_case": 16, "clips_per_step": 1},
        "full": {"clips_per_case": 32},
    }


@dataclass
class ConditionBank:
    """Precomputed conditions of a list of cases: tokens [C, V, K, Dc], mask [C, V, K] bool (True = real token)."""

    case_ids: list[int]
    tokens: Tensor
    mask: Tensor

    def __post_init__(self):
        self.row = {c: i for i, c in enumerate(self.case_ids)}

    @property
    def views(self) -> int:
        return self.tokens.shape[1]

    @property
    def dim(self) -> int:
        return self.tokens.shape[-1]

    def get(self, case_ids: Sequence[int], views: Sequence[int] | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(tokens [N, K, Dc], mask [N, K]) of view views[i] (default 0) of case case_ids[i]."""
        missing = [c for c in case_ids if c not in self.row]
        if missing:
            raise LofaError(f"no condition for case {missing[0]}; build the bank with it (or use the other split)")
        rows = torch.tensor([self.row[c] for c in case_ids])
        v = torch.zeros(len(rows), dtype=torch.long) if views is None else torch.as_tensor(views).long()
        return self.tokens[rows, v], self.mask[rows, v]


def view_seed(seed: int, split: str, view: int) -> int:
    """The seed of `world.condition` behind view `view` of a pose or image condition bank of `split` ("train" and
    "eval" draw from disjoint streams)."""
    return seed_streams.stream(seed, "hypernet.eval_view" if split == "eval" else "hypernet.view", index=view)


@torch.no_grad()
def build_conditions(world, kind: str, case_ids: Sequence[int], split: str = "train", *, views: int = 8,
                     encoder=None, text=None, seed: int = 0, chunk: int = 256) -> ConditionBank:
    """Condition bank of `case_ids` for a condition kind ("text" | "pose" | "image").

    split "train" | "eval": text uses the world's train / reserved eval phrasings, pose and image the train / eval
    condition seeds (disjoint). encoder: a lofa condition encoder (`encode(x) -> tokens, mask`) for pose and
    image; text: a TextEncoder for text.
    """
    if kind not in CONDITION_KINDS:
        raise LofaError(f"unknown condition kind {kind!r}; use one of {', '.join(CONDITION_KINDS)}")
    if split not in ("train", "eval"):
        raise LofaError(f"unknown condition split {split!r}; use 'train' or 'eval'")
    case_ids = list(case_ids)
    if kind == "text":
        if text is None:
            raise LofaError("text conditions need a TextEncoder (text=...)")
        n = world.n_prompts(split)
        states, mask = text.encode([world.prompt(c, v, split) for c in case_ids for v in range(n)])
        keep = int(mask.any(0).nonzero().max()) + 1   # drop positions padded in every prompt
        return ConditionBank(case_ids, states[:, :keep].reshape(len(case_ids), n, keep, -1).cpu(),
                             mask[:, :keep].reshape(len(case_ids), n, keep).cpu())
    if encoder is None:
        raise LofaError(f"{kind} conditions need a condition encoder (encoder=...)")
    device = next(encoder.parameters()).device
    seeds = [view_seed(seed, split, v) for v in range(views)]
    probe = [world.condition(case_ids[:1], seed=s) for s in seeds[:2]]
    if len(probe) == 2 and torch.equal(*probe):
        seeds = seeds[:1]  # the condition does not depend on the seed: one view says it all
    tokens, masks = [], []
    for s in seeds:
        per_view = [encoder.encode(world.condition(case_ids[i:i + chunk], seed=s).to(device))
                    for i in range(0, len(case_ids), chunk)]
        tokens.append(torch.cat([t for t, _ in per_view]).float().cpu())
        masks.append(torch.cat([m for _, m in per_view]).cpu())
    return ConditionBank(case_ids, torch.stack(tokens, 1), torch.stack(masks, 1))


def target_spec(gen, names: Sequence[str]) -> TargetSpec:
    """TargetSpec of the generator's modules `names` (in network order)."""
    return TargetSpec.from_shapes({n: tuple(gen.net.get_submodule(n).weight.shape) for n in names})


def stack_zoo(zoo, case_ids: Sequence[int], names: Sequence[str], desc: str = "load LoRAs", progress: bool = False
              ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    """The zoo's LoRAs of `case_ids`, stacked per target: ({name: A [C, r, in]}, {name: B [C, out, r]}, alpha [C]),
    float32, in the order of case_ids."""
    A = {n: [] for n in names}
    B = {n: [] for n in names}
    alpha = []
    for c in tqdm(case_ids, desc=desc, disable=not progress):
        lora, _ = zoo.load(c)
        alpha.append(next(iter(lora.values())).alpha)
        for n in names:
            A[n].append(lora[n].A.float())
            B[n].append(lora[n].B.float())
    return ({n: torch.stack(a) for n, a in A.items()}, {n: torch.stack(b) for n, b in B.items()},
            torch.tensor(alpha))


class Triplets:
    """(condition, LoRA, base weights) triplets of one setting: a world, its zoo, its frozen base generator.

    kind: the setting's condition kind; encoder / text: its condition encoder. The zoo's LoRAs (train and held-out)
    are held stacked per target, factors A [C, r, in], B [C, out, r]; `base` holds the generator's target weights.
    Training batches (`batch_fn`) come from train cases only, with random train-split conditions.
    """

    def __init__(self, world, zoo, gen, kind: str, cfg: TripletConfig | None = None, *, encoder=None, text=None,
                 seed: int = 0, progress: bool = False):
        self.world, self.zoo, self.kind, self.seed = world, zoo, kind, seed
        self.cfg = cfg or TripletConfig()
        self.encoder, self.text = encoder, text
        self.train_ids = [c for c in zoo.case_ids("train") if world.cases[c].split == "train"]
        self.heldout_ids = [c for c in zoo.case_ids("heldout") if world.cases[c].split == "heldout"]
        if not self.train_ids:
            raise LofaError(f"the zoo at {zoo.dir} has no train-split LoRA; build the zoo first")
        ids = self.train_ids + self.heldout_ids
        first, _ = zoo.load(ids[0])
        self.spec = target_spec(gen, [n for n in gen.lora_target_modules(zoo.config.include_ffn) if n in first])
        if set(self.spec.names) != set(first):
            extra = sorted(set(first) - set(self.spec.names))[0]
            raise LofaError(f"zoo LoRA module {extra!r} is not a LoRA target of the base generator; use the zoo's base")
        self.base = BaseWeights(self.spec, {n: gen.net.get_submodule(n).weight.detach().float().cpu()
                                            for n in self.spec.names})
        self.row = {c: i for i, c in enumerate(ids)}
        self.A, self.B, self.alpha = stack_zoo(zoo, ids, self.spec.names, f"load {world.task} LoRAs", progress)
        self.rank = next(iter(self.A.values())).shape[1]
        self._banks: dict[str, ConditionBank] = {}

    def conditions(self, split: str = "train") -> ConditionBank:
        """Condition bank of every zoo case (train and held-out) for a condition split, built on first use."""
        if split not in self._banks:
            self._banks[split] = build_conditions(
                self.world, self.kind, self.train_ids + self.heldout_ids, split, views=self.cfg.views,
                encoder=self.encoder, text=self.text, seed=self.seed, chunk=self.cfg.encode_chunk)
        return self._banks[split]

    def condition_inputs(self, case_ids: Sequence[int], split: str = "eval", view: int = 0) -> list[str] | Tensor:
        """What view `view` of the `split` bank encodes for each case, as a figure shows it beside the LoRA
        predicted from it: the prompts (text), or `world.condition` (pose [N, 3, T, H, W], image [N, 3, H, W])."""
        if self.kind == "text":
            return [self.world.prompt(c, view % self.world.n_prompts(split), split) for c in case_ids]
        return self.world.condition(list(case_ids), seed=view_seed(self.seed, split, view))

    @property
    def cond_dim(self) -> int:
        return self.conditions("train").dim

    @property
    def alpha_value(self) -> float:
        """The zoo's LoRA alpha (one value for the whole zoo)."""
        if not torch.all(self.alpha == self.alpha[0]):
            raise LofaError("the zoo's LoRAs have different alphas; the hypernetwork predicts one alpha")
        return float(self.alpha[0])

    def mean_factors(self) -> dict[int, tuple[Tensor, Tensor]]:
        """{target index: (mean A [r, in], mean B [out, r])} over the TRAIN LoRAs, B scaled by each LoRA's
        alpha / r over the predicted alpha / r: where Stage II's prediction starts (`LoraHead.set_start`).

        A zoo trained from one shared A (`LoraTrainConfig.shared_init`) keeps every A near it, so (mean B) @ (mean A)
        is close to the mean ΔW; `mean_factors_error` measures how close.
        """
        rows = torch.tensor([self.row[c] for c in self.train_ids])
        scale = self.alpha[rows] / self.alpha_value  # every LoRA in the predicted alpha's units (1 in a zoo)
        return {t: (self.A[n][rows].mean(0), (self.B[n][rows] * scale[:, None, None]).mean(0))
                for t, n in enumerate(self.spec.names)}

    def mean_factors_error(self) -> float:
        """‖(mean B)(mean A) − mean ΔW‖_F / ‖mean ΔW‖_F over all targets (train LoRAs): how far the factor means
        start from the mean LoRA."""
        rows = torch.tensor([self.row[c] for c in self.train_ids])
        err, norm = 0.0, 0.0
        for t, (a0, b0) in self.mean_factors().items():
            n = self.spec.names[t]
            mean_dw = delta((self.A[n][rows], self.B[n][rows], self.alpha[rows])).mean(0)
            start = self.alpha_value / self.rank * (b0 @ a0)
            err += float((start - mean_dw).pow(2).sum())
            norm += float(mean_dw.pow(2).sum())
        return (err / norm) ** 0.5 if norm > 0 else 0.0

    def lora(self, case_id: int) -> dict[str, tuple[Tensor, Tensor, float]]:
        """One case's LoRA as {name: (A [r, in], B [out, r], alpha)}."""
        i = self.row[case_id]
        return {n: (self.A[n][i], self.B[n][i], float(self.alpha[i])) for n in self.spec.names}

    def batch(self, case_ids: Sequence[int], targets: Tensor | None = None, split: str = "train",
              views: Sequence[int] | Tensor | None = None, step: int = 0) -> LoraBatch:
        """A LoraBatch of these cases (any split) with condition views `views` (default 0) of condition `split`.

        targets [m] spec indices (default all). extra: case_ids [N] and the step (seeds the diffusion term).
        """
        targets = torch.arange(len(self.spec)) if targets is None else targets
        cond, mask = self.conditions(split).get(case_ids, views)
        rows = torch.tensor([self.row[c] for c in case_ids])
        names = [self.spec.targets[t].name for t in targets.tolist()]
        alpha = self.alpha[rows]
        loras = {n: (self.A[n][rows], self.B[n][rows], alpha) for n in names}
        return LoraBatch(cond, mask, targets, loras, {"case_ids": torch.tensor(list(case_ids)), "step": step})

    @torch.no_grad()
    def map_density(self, tau: float = TAU, chunk: int = 16) -> float:
        """The fraction of responding entries over the TRAIN LoRAs' response maps (every valid entry of every
        target), the prior Stage I decides at (`Stage1.set_map_density`)."""
        responding, total = 0, 0
        for i in range(0, len(self.train_ids), chunk):
            loras = self.batch(self.train_ids[i:i + chunk]).loras
            for t, target in enumerate(self.spec.targets):  # one target at a time: no [N, M, R, C] map at full scale
                maps = response_map(delta(loras[target.name]), self.base[t].float(), tau)
                responding += int(maps.sum())
                total += maps.numel()
        return responding / total

    @torch.no_grad()
    def sparsity_tau(self, below: float, chunk: int = 16, bins: int = 4096) -> float:
        """The τ below which a share `below` of the TRAIN LoRAs' entries stay (every valid entry of every target):
        the `below`-quantile of the relative change |ΔW| / |W|, from a histogram over 4096 log-spaced bins between
        1e-6 and 1e3 (τ to within 0.5 %). `map_density(sparsity_tau(b))` is then about 1 - b."""
        if not 0 < below < 1:
            raise LofaError(f"the share of entries below τ must lie in (0, 1); got {below}")
        edges = torch.logspace(-6, 3, bins + 1, dtype=torch.float64)
        counts = torch.zeros(bins + 2, dtype=torch.float64)
        for i in range(0, len(self.train_ids), chunk):
            loras = self.batch(self.train_ids[i:i + chunk]).loras
            for t, target in enumerate(self.spec.targets):
                change = relative_change(delta(loras[target.name]), self.base[t].float()).flatten()
                counts += torch.bincount(torch.bucketize(change.double(), edges), minlength=bins + 2).double()
        # counts[k]: entries in (edges[k-1], edges[k]]; the first edge whose cumulative share reaches `below`
        k = int(torch.searchsorted(counts.cumsum(0) / counts.sum(), torch.tensor([below], dtype=torch.float64)))
        return float(edges[min(max(k, 0), bins)])

    def monitor_cases(self, n: int) -> dict[str, list[int]]:
        """{"heldout": ids, "train": ids}: up to n cases of each split, spread evenly over its sorted case ids (the
        cases Stage II's learning curves follow; a split without cases is left out)."""
        out = {}
        for split, ids in (("heldout", sorted(self.heldout_ids)), ("train", sorted(self.train_ids))):
            if ids:
                out[split] = [ids[i] for i in np.linspace(0, len(ids) - 1, min(n, len(ids))).round().astype(int)]
        return out

    def monitor_batches(self, n: int, chunk: int = 8) -> dict[str, list[LoraBatch]]:
        """What `Stage2Monitor` follows: the `monitor_cases(n)`, every target, each queried with its reserved "eval"
        condition (view 0), in LoraBatches of `chunk` cases."""
        return {split: [self.batch(ids[i:i + chunk], split="eval") for i in range(0, len(ids), chunk)]
                for split, ids in self.monitor_cases(n).items()}

    def batch_fn(self, batch_size: int, matrices: int | None = None, seed: int | None = None
                 ) -> Callable[[int, int], LoraBatch]:
        """batch_fn(step, process_index) -> LoraBatch for `hypernet.train.fit`, a pure function of its arguments.

        batch_size train cases (distinct while there are enough), a random train-split condition view each, and
        `matrices` random targets (Stage I) or all of them (None, Stage II).
        """
        seed = self.seed if seed is None else seed
        ids, n_targets = self.train_ids, len(self.spec)
        views = self.conditions("train").views

        def batch_fn(step: int, process_index: int = 0) -> LoraBatch:
            g = torch.Generator().manual_seed(seed_streams.stream(seed, "hypernet.batch", step=step,
                                                                   index=process_index))
            if batch_size <= len(ids):
                pick = torch.randperm(len(ids), generator=g)[:batch_size]
            else:
                pick = torch.randint(len(ids), (batch_size,), generator=g)
            view = torch.randint(views, (batch_size,), generator=g)
            targets = None
            if matrices is not None and matrices < n_targets:
                targets = torch.randperm(n_targets, generator=g)[:matrices].sort().values
            return self.batch([ids[i] for i in pick.tolist()], targets, "train", view, step)

        return batch_fn


class DiffusionLoss:
    """diffusion_loss_fn(pred_lora, batch) -> scalar for Stage2Objective: the flow-matching loss of the FROZEN base
    generator with each case's predicted LoRA merged into its weights through torch.func.functional_call.

    Each case of the batch is scored on its own clips: `clips_per_case` renders of the case with fine train-split
    captions (`world.sample`), rendered once and cached; per step `clips_per_step` of them, with t and noise, are
    drawn from a generator seeded by (seed, step), so the term is a pure function of the step and resumes exactly.
    t is drawn from the base generator's own distribution (`gen.t_distribution`), as the zoo's LoRAs were trained.
    Gradients reach the predicted factors (and through them the hypernetwork); the generator's own parameters are
    frozen and get none.
    """

    def __init__(self, gen, world, text, cfg: TripletConfig | None = None, seed: int = 0):
        self.gen = gen.eval().requires_grad_(False)
        self.world, self.text, self.seed = world, text, seed
        self.cfg = cfg or TripletConfig()
        self._clips: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def clips(self, case_id: int) -> tuple[Tensor, Tensor, Tensor]:
        """(x [P, 3, (T,) H, W], context [P, L, D], mask [P, L]) of one case, on the generator's device."""
        if case_id not in self._clips:
            seed = seed_streams.stream(self.seed, "hypernet.clips", case=case_id)
            x, captions = self.world.sample([case_id] * self.cfg.clips_per_case, seed=seed, split="train", level="fine")
            context, mask = self.text.encode(captions)
            device = next(self.gen.parameters()).device
            self._clips[case_id] = (x.to(device), context.to(device), mask.to(device))
        return self._clips[case_id]

    def __call__(self, pred: dict[str, tuple], batch: LoraBatch) -> Tensor:
        """pred {name: (A [N, r, in], B [N, out, r], alpha float or [N])}; batch.extra: case_ids [N], step."""
        from torch.func import functional_call

        from lofa.lora.formats import LoraFactor
        from lofa.lora.train import merged_weights

        case_ids = batch.extra["case_ids"].tolist()
        g = torch.Generator().manual_seed(seed_streams.stream(self.seed, "hypernet.noise",
                                                             step=int(batch.extra["step"])))
        k = self.cfg.clips_per_step
        losses = []
        for i, case_id in enumerate(case_ids):
            x, context, mask = self.clips(case_id)
            pick = torch.randint(len(x), (k,), generator=g).to(x.device)
            t = self.gen.t_distribution.sample(k, g, x.device)
            noise = randn((k, *x.shape[1:]), g, x.device)
            lora = {}
            for name, (A, B, alpha) in pred.items():
                a = float(alpha) if not torch.is_tensor(alpha) or alpha.ndim == 0 else float(alpha[i])
                lora[name] = LoraFactor(A[i], B[i], a)
            weights = merged_weights(self.gen, lora)

            def velocity(x_t, t_, c, m, weights=weights):
                return functional_call(self.gen, weights, (x_t, t_, c, m))

            losses.append(flow_matching_loss(velocity, x[pick], context[pick], mask[pick], t=t, noise=noise))
        return torch.stack(losses).mean()


def stack_loras(loras: Sequence[dict]) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """N LoraWeights ({name: LoraFactor}) -> {name: (A [N, r, in], B [N, out, r], alpha [N])}."""
    names = list(loras[0])
    return {n: (torch.stack([w[n].A for w in loras]), torch.stack([w[n].B for w in loras]),
                torch.tensor([float(w[n].alpha) for w in loras])) for n in names}


def map_size(spec: TargetSpec) -> tuple[int, int]:
    """(R, C): the largest out and in of the targets; every map is zero-padded to it."""
    return max(t.shape[0] for t in spec.targets), max(t.shape[1] for t in spec.targets)


@torch.no_grad()
def lora_maps(base: BaseWeights, loras: dict[str, tuple], tau: float = TAU) -> tuple[Tensor, Tensor]:
    """Response maps R = |ΔW| > τ·|W| of N LoRAs over every target of `base`, zero-padded to `map_size`.

    loras {name: (A [N, r, in], B [N, out, r], alpha)} -> (maps [N, M, R, C] bool, valid [N, M, R, C] bool).
    """
    spec = base.spec
    n = next(iter(loras.values()))[0].shape[0]
    maps = torch.zeros(n, len(spec), *map_size(spec), dtype=torch.bool)
    for t, target in enumerate(spec.targets):
        o, i = target.shape
        A, B, alpha = loras[target.name]
        maps[:, t, :o, :i] = response_map(delta((A, B, alpha)), base[t].to(A.device).float(), tau).cpu()
    return maps, valid_entries(spec).expand_as(maps)


def valid_entries(spec: TargetSpec) -> Tensor:
    """[M, R, C] bool: True inside each target's own [out, in] (`map_size` padding is False)."""
    valid = torch.zeros(len(spec), *map_size(spec), dtype=torch.bool)
    for t, target in enumerate(spec.targets):
        valid[t, : target.shape[0], : target.shape[1]] = True
    return valid


@torch.no_grad()
def stage1_maps(stage1, data: Triplets, case_ids: Sequence[int], split: str = "eval",
                views: Sequence[int] | None = None, calibrated: bool = True) -> Tensor:
    """Stage I's predicted maps [N, M, R, C] bool for these cases' `split` conditions (`lora_maps` layout), decided
    at the training density (`Stage1.decide`; calibrated=False: at logit 0)."""
    device = next(stage1.parameters()).device
    batch = data.batch(case_ids, split=split, views=views).to(device)
    logits = stage1(data.base.to(device), batch.targets, batch.cond, batch.cond_mask).logits
    maps = torch.zeros(len(case_ids), len(data.spec), *map_size(data.spec), dtype=torch.bool)
    for t, target_logits in enumerate(logits):
        o, i = data.spec.targets[t].shape
        maps[:, t, :o, :i] = stage1.decide(target_logits, calibrated).cpu()
    return maps


@torch.no_grad()
def delta_fidelity_per_case(data: Triplets, case_ids: Sequence[int], loras: Sequence[dict]
                            ) -> tuple[np.ndarray, np.ndarray]:
    """How close any LoRAs ({name: LoraFactor}, e.g. predicted or a reference's) are to the zoo LoRAs of
    `case_ids`, as Stage II's learning curves measure it (`losses.delta_fidelity`) -> (cosine [N], magnitude [N])."""
    from lofa.hypernet.losses import delta_fidelity

    if len(loras) != len(case_ids):
        raise LofaError(f"{len(loras)} LoRAs for {len(case_ids)} cases")
    w_rms = {t.name: data.base.rms[i] for i, t in enumerate(data.spec.targets)}
    cosine, ratio = delta_fidelity(stack_loras(loras), data.batch(case_ids).loras, w_rms)
    return cosine.numpy(), ratio.numpy()


@torch.no_grad()
def delta_l1_per_case(data: Triplets, case_ids: Sequence[int], loras: Sequence[dict]) -> np.ndarray:
    """Stage II's reconstruction measure on any cases: per case, the mean over targets of L1(ΔŴ − ΔW) / rms(W)
    between a LoRA ({name: LoraFactor}, e.g. predicted) and the case's zoo LoRA -> [N] (0 = the zoo's ΔW)."""
    from lofa.hypernet.losses import delta_l1

    if len(loras) != len(case_ids):
        raise LofaError(f"{len(loras)} LoRAs for {len(case_ids)} cases")
    true, pred = data.batch(case_ids).loras, stack_loras(loras)
    out = np.zeros(len(case_ids))
    for j in range(len(case_ids)):
        one = lambda f: tuple(x[j:j + 1] for x in f)  # noqa: E731
        out[j] = np.mean([float(delta_l1(one(pred[t.name]), one(true[t.name]), data.base.rms[i]))
                          for i, t in enumerate(data.spec.targets)])
    return out
