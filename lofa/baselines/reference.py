"""Reference predictors: what a LoFA number means only next to.

A predicted LoRA is worth something only where it beats what needs no hypernetwork at all:
- `mean_lora`: the condition-blind reference, one LoRA for every condition: the mean ΔW of the training LoRAs.
- `nearest_lora`: retrieval, the training LoRA whose condition lies closest in the hypernetwork's own condition
  space (pooled condition tokens, cosine similarity). A hypernetwork that only memorised its zoo ties with it.
- `oracle_lora`: the training LoRA of the case that shares the most ground-truth attributes with the query; the best
  retrieval can do, and only a known world can give it (an upper reference, not a method).
- `RidgeLora`: the linear reference, kernel ridge regression (linear kernel) from the pooled condition to the
  per-module ΔW of the training LoRAs. A hypernetwork that learns no more than a linear map of its condition ties with it.
- `RidgeLora.fit_attributes`: the same regression from the case's ground-truth attributes (one-hot,
  `attribute_features`) instead of its condition: what a linear map gets from a condition encoder that loses nothing
  the world defines (an upper reference only a known world can give, like the oracle).
- `mean_train_map`: Stage I's condition-blind reference, the entry-wise mean response map of the training LoRAs.

Every LoRA comes back as the zoo returns one, `(LoraWeights, info)` like `Zoo.load`, so `lofa.evaluate.generate`
and `save_lora` take it as they take a per-case LoRA. Only TRAIN-split LoRAs and conditions are ever used: a held-out
case's own LoRA is what these references are scored against.

    lora, info = mean_lora(data.zoo)                          # info["relative_error"]: the SVD truncation's
    tokens, mask = data.conditions("eval").get([case])        # a held-out case's reserved condition
    lora, info = nearest_lora(data, tokens, mask)             # info["case_id"], info["similarity"]
    lora, info = oracle_lora(data.world, data.zoo, case)      # info["case_id"], info["matches"]
    ridge = RidgeLora.fit(data)                               # once; then any number of queries
    [(lora, info)] = ridge.predict(tokens, mask)              # info["relative_error"]: the SVD truncation's
    ref = mean_train_map(data)                                # [M, R, C] in [0, 1]; ref > 0.5: majority map
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lofa.config import TAU
from lofa.errors import LofaError
from lofa.hypernet.data import ConditionBank, Triplets, lora_maps, map_size
from lofa.lora.formats import LoraFactor, LoraWeights
from lofa.lora.zoo import Zoo

# Cosine similarities this close count as equal, so that one condition stored for two cases (float rounding of the
# same embedding in two rows) is a tie, broken by the lower case id.
TIE_TOLERANCE = 1e-9


# --- the mean LoRA ---------------------------------------------------------------------------------------------
@torch.no_grad()
def mean_lora(zoo: Zoo, rank: int | None = None, device="cpu") -> tuple[LoraWeights, dict]:
    """The mean ΔW of the zoo's train-split LoRAs, per module, factored back into a LoRA of rank `rank`.

    ΔW̄ = mean_c (alpha_c / r_c) · B_c @ A_c, [out, in] per module. A mean of rank-r products generally has rank up to
    N·r, so it is cut to the best rank-k approximation (truncated SVD, optimal in Frobenius norm), k = `rank`
    (default: the zoo's rank), at most min(out, in) per module.

    Returns (weights {module_name: LoraFactor(A [k, in], B [out, k], alpha = k)}, info) with info:
    "rank" (the k asked for), "cases" (the train case ids averaged), "relative_error" (‖ΔW̄ − B A‖_F / ‖ΔW̄‖_F over
    all modules together) and "module_errors" ({module_name: the same per module}).
    """
    case_ids = zoo.case_ids("train")
    if not case_ids:
        raise LofaError(f"the zoo at {zoo.dir} has no train-split LoRA to average; build the zoo first")
    rank = zoo.config.rank if rank is None else int(rank)
    if rank < 1:
        raise LofaError(f"mean_lora: rank must be a positive integer, not {rank}")
    total: dict[str, Tensor] = {}
    for case in case_ids:
        weights, _ = zoo.load(case)
        if total and set(weights) != set(total):
            raise LofaError(f"the zoo's LoRA of case {case} adapts other modules than case {case_ids[0]}'s; "
                            "a mean LoRA needs one set of modules")
        for name, factor in weights.items():
            # float64: a mean over thousands of LoRAs, and the exact-rank case should reproduce it to rounding
            d = factor.delta_rows(dtype=torch.float64)
            total[name] = d if name not in total else total[name].add_(d)
    weights, errors = {}, {}
    tail_energy, energy = 0.0, 0.0
    for name, summed in total.items():
        factor, tail, full = _truncate(summed / len(case_ids), rank)
        weights[name] = LoraFactor(factor.A.to(device), factor.B.to(device), factor.alpha)
        errors[name] = (tail / full) ** 0.5 if full > 0 else 0.0
        tail_energy, energy = tail_energy + tail, energy + full
    info = {"rank": rank, "cases": case_ids, "module_errors": errors,
            "relative_error": (tail_energy / energy) ** 0.5 if energy > 0 else 0.0}
    return weights, info


def _truncate(delta_w: Tensor, rank: int) -> tuple[LoraFactor, float, float]:
    """Best rank-k LoRA of ΔW [out, in] (float32 factors, scale 1) with the squared Frobenius norms of what the cut
    drops and of ΔW."""
    U, S, Vh = torch.linalg.svd(delta_w, full_matrices=False)
    k = min(rank, S.numel())
    # √S on both sides keeps A and B at one scale, as a trained LoRA's are, so neither factor is ill-conditioned
    root = S[:k].sqrt()
    factor = LoraFactor(A=(root[:, None] * Vh[:k]).float(), B=(U[:, :k] * root).float(), alpha=float(k))
    energy = S.square()
    return factor, float(energy[k:].sum()), float(energy.sum())


# --- retrieval by condition ------------------------------------------------------------------------------------
def pool_condition(tokens: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over the valid tokens of each condition: tokens [N, K, Dc], mask [N, K] bool (None: all valid) -> [N, Dc].

    The hypernetwork hears a condition as its token sequence; one vector per condition is its masked mean (MiniLM's
    own sentence pooling), and padding never counts.
    """
    if tokens.ndim != 3:
        raise LofaError(f"condition tokens must be [N, K, Dc], not {list(tokens.shape)}")
    if mask is None:
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    if mask.shape != tokens.shape[:2]:
        raise LofaError(f"condition mask {list(mask.shape)} does not match tokens {list(tokens.shape)}")
    counts = mask.sum(1)
    if (counts == 0).any():
        raise LofaError(f"condition {int((counts == 0).nonzero()[0])} has no valid token; its mask is all False")
    weights = mask.to(torch.float64).unsqueeze(-1)
    return (tokens.to(torch.float64) * weights).sum(1) / counts.to(torch.float64).unsqueeze(-1)


def nearest_cases(bank: ConditionBank, candidates: Sequence[int], tokens: Tensor, mask: Tensor | None = None
                  ) -> tuple[list[int], Tensor]:
    """For each query condition, the candidate case with a condition of highest cosine similarity.

    bank: conditions tokens [C, V, K, Dc] of (at least) the candidates; every view of a candidate is an entry, as a
    retrieval index of all the conditions trained on would hold them. tokens [N, K', Dc], mask [N, K'] (any K').
    Returns (case ids [N], similarity [N] float64); ties (within TIE_TOLERANCE) go to the lowest case id.
    """
    candidates = sorted(set(int(c) for c in candidates))
    if not candidates:
        raise LofaError("nearest_cases: no candidate cases to retrieve from")
    missing = [c for c in candidates if c not in bank.row]
    if missing:
        raise LofaError(f"the condition bank has no condition for case {missing[0]}; build it with every candidate")
    if tokens.shape[-1] != bank.dim:
        raise LofaError(f"query conditions have width {tokens.shape[-1]}, the bank's {bank.dim}; encode the query "
                        "with the bank's condition encoder")
    rows = torch.tensor([bank.row[c] for c in candidates])
    views = bank.views
    index = pool_condition(bank.tokens[rows].flatten(0, 1), bank.mask[rows].flatten(0, 1))   # [candidates·V, Dc]
    owner = torch.tensor(candidates).repeat_interleave(views)                               # case of each entry
    query = pool_condition(tokens.cpu(), None if mask is None else mask.cpu())
    sim = torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(index, dim=1).T  # [N, entries]
    best = sim.max(dim=1).values
    ids = []
    for i in range(len(query)):
        # entries are in ascending case order, so the first entry within the tolerance is the lowest-id tie
        ids.append(int(owner[int((sim[i] >= best[i] - TIE_TOLERANCE).nonzero()[0])]))
    return ids, best


@torch.no_grad()
def nearest_lora(data: Triplets, tokens: Tensor, mask: Tensor | None = None, device="cpu"
                 ) -> tuple[LoraWeights, dict]:
    """The train-split LoRA whose train-split condition is most cosine-similar to the query (pooled tokens).

    tokens [K, Dc] or [1, K, Dc], mask [K] / [1, K] (None: all valid), in the setting's condition space (MiniLM
    token states for text, the condition encoder's tokens for pose / image), e.g. `data.conditions("eval").get([c])`.
    Returns (the zoo's LoRA of that case, info {"case_id", "similarity"}).
    """
    if tokens.ndim == 2:
        tokens, mask = tokens[None], None if mask is None else mask[None]
    if tokens.ndim != 3 or tokens.shape[0] != 1:
        raise LofaError(f"nearest_lora takes one condition [K, Dc] or [1, K, Dc], not {list(tokens.shape)}; use "
                        "nearest_cases for many")
    ids, sim = nearest_cases(data.conditions("train"), data.train_ids, tokens, mask)
    weights, _ = data.zoo.load(ids[0], device)
    return weights, {"case_id": ids[0], "similarity": float(sim[0])}


# --- the linear reference: kernel ridge regression from the condition to ΔW -----------------------------------
class RidgeLora:
    """Linear kernel ridge regression from the pooled condition to each module's ΔW, fitted on training LoRAs.

    Training rows: pooled conditions x_i (`pool_condition`), inputs [N_rows, Dc], each the condition of one case;
    its target is that case's ΔW = (alpha / r) · B @ A, per module [out, in] (every view of a case is one row with
    the same target). Centred on their mean x̄, the rows give the linear kernel K = X̃ X̃ᵀ [N_rows, N_rows], and a
    query x predicts, per module,

        ΔŴ(x) = Ȳ + k(x)ᵀ α,    k(x) = X̃ (x − x̄) [N_rows],    α = (K + λ · mean(diag K) · I)⁻¹ (Y − Ȳ),

    Ȳ the mean target over rows. λ is relative to the kernel's scale, so one default suits every condition encoder.
    Each ΔŴ is cut to the best rank-k LoRA (`_truncate`), a standard LoRA for `generate` / `save_lora`.

    Memory: α is never formed. Y − Ȳ = (P − 1 ρᵀ) Y_c, P [N_rows, N_cases] the rows' case membership, ρ [N_cases]
    the cases' share of the rows and Y_c the cases' ΔW, so α = coefficients @ Y_c with coefficients
    [N_rows, N_cases] = (K + λ s I)⁻¹ (P − 1 ρᵀ), solved once for every module. A prediction is then a weighted sum
    of the training LoRAs, ΔŴ = Σ_c (ρ_c + (k(x)ᵀ coefficients)_c) ΔW_c, formed from their factors module by
    module: what is held is the training LoRAs' factors, never a dense [N, out, in] stack.

    `RidgeLora.fit(data)` fits on a setting's train split; the constructor takes rows and LoRAs directly:
    inputs [N_rows, Dc] pooled conditions, owners [N_rows] the case id of each row, loras {case_id: LoraWeights}
    (one set of modules, one shape per module), lam λ > 0, rank k >= 1.
    """

    def __init__(self, inputs: Tensor, owners: Sequence[int], loras: dict[int, LoraWeights], lam: float = 0.1,
                 rank: int = 4):
        if not loras:
            raise LofaError("RidgeLora needs at least one training LoRA; fit it on a zoo with train-split cases")
        if lam <= 0:
            raise LofaError(f"RidgeLora: lam must be positive, not {lam}; use a small value (1e-6) to interpolate")
        if int(rank) < 1:
            raise LofaError(f"RidgeLora: rank must be a positive integer, not {rank}")
        if inputs.ndim != 2 or inputs.shape[0] != len(owners):
            raise LofaError(f"RidgeLora: inputs {list(inputs.shape)} must be [N_rows, Dc] with one owner per row "
                            f"({len(owners)} owners)")
        self.case_ids = sorted(loras)
        column = {c: j for j, c in enumerate(self.case_ids)}
        unknown = [c for c in owners if int(c) not in column]
        if unknown:
            raise LofaError(f"RidgeLora: row of case {unknown[0]} has no LoRA; pass a LoRA for every row's case")
        self.lam, self.rank = float(lam), int(rank)
        self.x_mean = inputs.to(torch.float64).mean(0)                                     # x̄ [Dc]
        self.inputs = inputs.to(torch.float64) - self.x_mean                               # X̃ [N_rows, Dc]
        kernel = self.inputs @ self.inputs.T                                               # K [N_rows, N_rows]
        scale = float(kernel.diagonal().mean())
        # identical conditions give K = 0; any scale then works, since every k(x) is 0 as well
        scale = scale if scale > 0 else 1.0
        membership = torch.zeros(len(owners), len(self.case_ids), dtype=torch.float64)    # P
        membership[torch.arange(len(owners)), torch.tensor([column[int(c)] for c in owners])] = 1.0
        self.shares = membership.mean(0)                                                   # ρ [N_cases]
        ridge = kernel + self.lam * scale * torch.eye(len(owners), dtype=torch.float64)
        self.coefficients = torch.linalg.solve(ridge, membership - self.shares)          # [N_rows, N_cases]
        self.factors = _stack_factors([loras[c] for c in self.case_ids], self.case_ids)

    @classmethod
    @torch.no_grad()
    def fit(cls, data: Triplets, lam: float = 0.1, rank: int | None = None) -> "RidgeLora":
        """Fit on the TRAIN split only: every view of a train case's "train" condition is a row, its target the
        zoo's LoRA of that case. rank: k of the predicted LoRAs (default: the zoo's rank)."""
        ids = list(data.train_ids)
        if not ids:
            raise LofaError("RidgeLora.fit: the data has no train-split case to fit on; build the zoo's train split "
                            "first")
        bank = data.conditions("train")
        rows = torch.tensor([bank.row[c] for c in ids])
        inputs = pool_condition(bank.tokens[rows].flatten(0, 1), bank.mask[rows].flatten(0, 1))  # [N·V, Dc]
        owners = torch.tensor(ids).repeat_interleave(bank.views).tolist()
        loras = {c: data.zoo.load(c)[0] for c in ids}
        return cls(inputs, owners, loras, lam, data.zoo.config.rank if rank is None else rank)

    @classmethod
    @torch.no_grad()
    def fit_attributes(cls, data: Triplets, lam: float = 0.1, rank: int | None = None) -> "RidgeLora":
        """Fit on the TRAIN split with each case's one-hot ground-truth attributes (`attribute_features`, one row a
        case) as its input; query with `predict(attribute_features(world, ids)[:, None])`."""
        ids = list(data.train_ids)
        if not ids:
            raise LofaError("RidgeLora.fit_attributes: the data has no train-split case to fit on; build the zoo's "
                            "train split first")
        loras = {c: data.zoo.load(c)[0] for c in ids}
        return cls(attribute_features(data.world, ids), ids, loras, lam,
                   data.zoo.config.rank if rank is None else rank)

    @property
    def dim(self) -> int:
        return self.inputs.shape[1]

    def case_weights(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """The weight of each training case's ΔW in the prediction, [N, N_cases] float64 (columns: `case_ids`);
        each row sums to 1. tokens [N, K, Dc], mask [N, K] (None: all valid)."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.dim:
            raise LofaError(f"query conditions {list(tokens.shape)} must be [N, K, {self.dim}]; encode the query "
                            "with the condition encoder the ridge model was fitted with")
        query = pool_condition(tokens.cpu(), None if mask is None else mask.cpu()) - self.x_mean   # [N, Dc]
        return self.shares + (query @ self.inputs.T) @ self.coefficients

    @torch.no_grad()
    def predict(self, tokens: Tensor, mask: Tensor | None = None, device="cpu") -> list[tuple[LoraWeights, dict]]:
        """Predicted LoRAs of N conditions, tokens [N, K, Dc], mask [N, K] (None: all valid), any K.

        Returns one (weights {module_name: LoraFactor(A [k, in], B [out, k], alpha = k)}, info) per condition, info
        as `mean_lora`'s: "rank", "lam", "relative_error" (‖ΔŴ − B A‖_F / ‖ΔŴ‖_F over all modules) and
        "module_errors".
        """
        out = []
        for weights in self.case_weights(tokens, mask):
            lora, errors = {}, {}
            tail_energy, energy = 0.0, 0.0
            for name, (A, B, scale, ranks) in self.factors.items():
                # ΔŴ = Σ_c w_c scale_c B_c A_c as one product of the concatenated factors
                column_weights = (weights * scale).repeat_interleave(ranks)                      # [Σ r_c]
                factor, tail, full = _truncate((B * column_weights) @ A, self.rank)
                lora[name] = LoraFactor(factor.A.to(device), factor.B.to(device), factor.alpha)
                errors[name] = (tail / full) ** 0.5 if full > 0 else 0.0
                tail_energy, energy = tail_energy + tail, energy + full
            out.append((lora, {"rank": self.rank, "lam": self.lam, "module_errors": errors,
                               "relative_error": (tail_energy / energy) ** 0.5 if energy > 0 else 0.0}))
        return out


def _stack_factors(loras: Sequence[LoraWeights], case_ids: Sequence[int]) -> dict[str, tuple]:
    """N LoRAs -> {module_name: (A [Σ r_c, in], B [out, Σ r_c], scale [N], ranks [N])} in float64, the factors of
    every case side by side, so that Σ_c w_c scale_c B_c A_c is one matrix product (ranks may differ by case)."""
    names = set(loras[0])
    stacked = {}
    for name in loras[0]:
        for lora, case in zip(loras, case_ids):
            if set(lora) != names:
                raise LofaError(f"the LoRA of case {case} adapts other modules than case {case_ids[0]}'s; a ridge "
                                "LoRA needs one set of modules")
            if lora[name].shape != loras[0][name].shape:
                raise LofaError(f"module {name} of case {case}'s LoRA is {list(lora[name].shape)}, not "
                                f"{list(loras[0][name].shape)}; use LoRAs of one base model")
        stacked[name] = (torch.cat([lora[name].A.to(torch.float64) for lora in loras]),
                         torch.cat([lora[name].B.to(torch.float64) for lora in loras], dim=1),
                         torch.tensor([lora[name].scale for lora in loras], dtype=torch.float64),
                         torch.tensor([lora[name].rank for lora in loras]))
    return stacked


# --- the oracles: retrieval and regression by ground truth --------------------------------------------------------
def attribute_features(world, case_ids: Sequence[int]) -> Tensor:
    """One-hot ground-truth attributes of cases, [N, Σ_k V_k] float64: for each component k (`Case.attrs`, sorted by
    name) a block over the values V_k that the world's cases take, 1 at the case's value."""
    components = sorted(world.cases[0].attrs)
    values = {k: sorted({repr(c.attrs[k]) for c in world.cases}) for k in components}
    out = torch.zeros(len(case_ids), sum(len(v) for v in values.values()), dtype=torch.float64)
    for i, case in enumerate(case_ids):
        offset = 0
        for k in components:
            out[i, offset + values[k].index(repr(world.cases[case].attrs[k]))] = 1.0
            offset += len(values[k])
    return out


def attribute_matches(world, a: int, b: int) -> int:
    """How many ground-truth attributes (component -> value, `Case.attrs`) cases a and b share."""
    attrs_a, attrs_b = world.cases[a].attrs, world.cases[b].attrs
    return sum(1 for k, v in attrs_a.items() if k in attrs_b and attrs_b[k] == v)


def oracle_case(world, case_id: int, candidates: Sequence[int]) -> tuple[int, int]:
    """The candidate closest to case `case_id` by the world's ground truth -> (case id, shared attributes).

    The case itself when it is a candidate; otherwise the most shared attribute values, then the same coarse
    category, then the lowest id.
    """
    candidates = sorted(set(int(c) for c in candidates))
    if not candidates:
        raise LofaError("oracle_case: no candidate cases")
    n_attrs = len(world.cases[case_id].attrs)
    if case_id in candidates:
        return case_id, n_attrs
    coarse = world.cases[case_id].coarse

    def closeness(c: int) -> tuple[int, int, int]:
        return -attribute_matches(world, case_id, c), int(world.cases[c].coarse != coarse), c

    best = min(candidates, key=closeness)
    return best, attribute_matches(world, case_id, best)


@torch.no_grad()
def oracle_lora(world, zoo: Zoo, case_id: int, device="cpu") -> tuple[LoraWeights, dict]:
    """The train-split LoRA of the case nearest to `case_id` by ground-truth attributes (`oracle_case`).

    Returns (the zoo's LoRA of that case, info {"case_id", "matches" (shared attributes), "attributes" (of the
    query), "same_coarse"}). Candidates: cases with a LoRA that both the zoo and the world put in the train split.
    """
    candidates = [c for c in zoo.case_ids("train") if world.cases[c].split == "train"]
    best, matches = oracle_case(world, case_id, candidates)
    weights, _ = zoo.load(best, device)
    return weights, {"case_id": best, "matches": matches, "attributes": len(world.cases[case_id].attrs),
                     "same_coarse": world.cases[best].coarse == world.cases[case_id].coarse}


# --- Stage I's reference ---------------------------------------------------------------------------------------
@torch.no_grad()
def mean_train_map(data: Triplets, tau: float = TAU, chunk: int = 8) -> Tensor:
    """The mean response map of the train-split LoRAs, in Stage I's layout: [M, R, C] float32 in [0, 1].

    Entry (t, i, j) is the fraction of training LoRAs whose map R = |ΔW| > τ·|W| (`lora_maps`, Stage I's own
    target) is active at entry (i, j) of target t; the `map_size` padding is 0. `mean_train_map(data) > 0.5` is the
    entry-wise majority vote, a bool map [M, R, C] that `map_metrics` scores against a true map as it scores
    `stage1_maps`. chunk: LoRAs per map computation (memory: chunk × M × R × C booleans).
    """
    ids = data.train_ids
    total = torch.zeros(len(data.spec), *map_size(data.spec))
    for start in range(0, len(ids), chunk):
        maps, _ = lora_maps(data.base, data.batch(ids[start:start + chunk]).loras, tau)
        total += maps.sum(0)
    return total / len(ids)


# --- every reference for a list of cases -------------------------------------------------------------------------
REFERENCES = ("mean LoRA", "nearest LoRA", "ridge LoRA", "oracle LoRA", "oracle ridge LoRA")


@torch.no_grad()
def reference_loras(data: Triplets, case_ids: Sequence[int], split: str = "eval", device="cpu", lam: float = 0.1):
    """The reference predictors' LoRAs for `case_ids`, queried with each case's `split` condition (view 0).

    Returns ({method: {case_id: LoraWeights}} for the methods of REFERENCES, a pandas DataFrame with one row per
    (method, case): the case whose LoRA was returned, and the nearest LoRA's similarity / the oracle's shared
    attributes / the ridge LoRAs' truncation error and λ = lam). The mean LoRA is one object shared by every case
    (it ignores the condition).
    """
    import pandas as pd

    mean, mean_info = mean_lora(data.zoo, device=device)
    ridge = RidgeLora.fit(data, lam=lam)
    attribute_ridge = RidgeLora.fit_attributes(data, lam=lam)
    features = attribute_features(data.world, list(case_ids))
    loras: dict[str, dict[int, LoraWeights]] = {name: {} for name in REFERENCES}
    rows = []
    bank = data.conditions(split)
    for i, case in enumerate(case_ids):
        tokens, mask = bank.get([case])
        [(loras["oracle ridge LoRA"][case], by_attributes)] = attribute_ridge.predict(features[i:i + 1, None], None,
                                                                                      device)
        loras["mean LoRA"][case] = mean
        loras["nearest LoRA"][case], near = nearest_lora(data, tokens, mask, device)
        loras["oracle LoRA"][case], oracle = oracle_lora(data.world, data.zoo, case, device)
        [(loras["ridge LoRA"][case], fitted)] = ridge.predict(tokens, mask, device)
        rows += [{"method": "mean LoRA", "case_id": case, "source_case": None,
                  "svd_error": mean_info["relative_error"]},
                 {"method": "nearest LoRA", "case_id": case, "source_case": near["case_id"],
                  "similarity": near["similarity"]},
                 {"method": "ridge LoRA", "case_id": case, "source_case": None,
                  "svd_error": fitted["relative_error"], "lam": fitted["lam"]},
                 {"method": "oracle LoRA", "case_id": case, "source_case": oracle["case_id"],
                  "shared_attributes": oracle["matches"], "attributes": oracle["attributes"]},
                 {"method": "oracle ridge LoRA", "case_id": case, "source_case": None,
                  "svd_error": by_attributes["relative_error"], "lam": by_attributes["lam"]}]
    return loras, pd.DataFrame(rows)
