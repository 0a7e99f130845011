"""Response maps: where a LoRA changes its base model, relative to the base weights (the paper's observation).

relative_change m = |ΔW| / (|W| + eps) with ΔW = (alpha / r) · B A; the response map R = m > τ (paper: τ = 2 %).
Whole-LoRA statistics are computed over row chunks of ΔW (chunk = B[rows] @ A in float32), one base matrix at a
time, so a full Wan2.1-1.3B LoRA (240 × 1536×1536, rank 32) needs tens of MB, not the 2 GB of all ΔW at once.

Borderline ties: entries whose relative change lies within float32 rounding (about 1e-6 relative) of τ can land
on either side compared with a float64 computation; everything else matches it exactly.
"""
from __future__ import annotations

import math
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from lofa.errors import LofaError
from lofa.config import TAU
from lofa.io import atomic_path
from lofa.response import EPS, relative_change, response_map  # noqa: F401 (lofa.analysis.response_map, as before)
from lofa.lora.formats import BaseWeightsFile, LoraFactor, LoraWeights, check_compatible, natural_key

CHUNK_ELEMENTS = 1 << 22  # ΔW entries per chunk: 16 MB in float32
PLOT_POOL = 32  # cells per side of a module's pooled map in plots
_SHORT_TYPE = {"self_q": "sq", "self_k": "sk", "self_v": "sv", "self_o": "so", "cross_q": "cq", "cross_k": "ck",
               "cross_v": "cv", "cross_o": "co", "cross_k_img": "ki", "cross_v_img": "vi", "ffn_in": "f1",
               "ffn_out": "f2", "other": "x"}  # x-axis labels of plot_response_rows


@dataclass
class ModuleResponse:
    """One module's response: counts over its [out, in] entries and optionally a pooled map.

    pooled: [ph, pw] fraction of active entries per cell (ph = min(out, pool), pw = min(in, pool)).
    """

    shape: tuple[int, int]
    active: int
    sum_relative_change: float
    pooled: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def active_fraction(self) -> float:
        return self.active / self.numel

    @property
    def mean_relative_change(self) -> float:
        return self.sum_relative_change / self.numel


def module_response(factor: LoraFactor, w: torch.Tensor, tau: float = TAU, eps: float = EPS,
                    pool: int | None = None, chunk_elements: int = CHUNK_ELEMENTS) -> ModuleResponse:
    """Response of one LoRA module against its base weight W [out, in], computed over row chunks of ΔW.

    pool: side of the pooled map (fraction of active entries per cell), None for no map.
    """
    out, inp = w.shape
    if tuple(factor.shape) != (out, inp):
        raise LofaError(f"LoRA ΔW is {list(factor.shape)} but the base weight is {[out, inp]}")
    rows = max(1, chunk_elements // inp)
    active, total = 0, 0.0
    if pool:
        ph, pw = min(out, pool), min(inp, pool)
        row_cell = torch.arange(out) * ph // out
        col_cell = torch.arange(inp) * pw // inp
        col_onehot = torch.nn.functional.one_hot(col_cell, pw).float()  # [in, pw]
        counts = torch.zeros(ph, pw)
    for start in range(0, out, rows):
        stop = min(out, start + rows)
        m = relative_change(factor.delta_rows(start, stop).to(w.device), w[start:stop], eps)
        r = m > tau
        active += int(torch.count_nonzero(r))
        total += float(m.sum(dim=1).double().sum())
        if pool:
            counts.index_add_(0, row_cell[start:stop], r.float().cpu() @ col_onehot)
    pooled = None
    if pool:
        cell_size = torch.bincount(row_cell, minlength=ph)[:, None] * torch.bincount(col_cell, minlength=pw)[None]
        pooled = counts / cell_size
    return ModuleResponse(shape=(out, inp), active=active, sum_relative_change=total, pooled=pooled)


def _shapes(base_weights: Mapping[str, torch.Tensor]) -> Mapping:
    return base_weights.shapes if isinstance(base_weights, BaseWeightsFile) else base_weights


def lora_response(base_weights: Mapping[str, torch.Tensor], lora: LoraWeights, tau: float = TAU, eps: float = EPS,
                  pool: int | None = None, progress: bool = True) -> dict[str, ModuleResponse]:
    """{module_name: ModuleResponse} for every LoRA module, in natural order, one base matrix in memory at a time.

    base_weights: {module_name: W [out, in]} (a dict or a lazy BaseWeightsFile). Raises LofaError when the LoRA does
    not fit the base or a base weight is not finite.
    """
    check_compatible(lora, _shapes(base_weights))
    responses = {}
    for name in tqdm(sorted(lora, key=natural_key), desc="response map", disable=not progress, leave=False):
        w = base_weights[name]
        if not torch.isfinite(w).all():
            raise LofaError(f"base weight {name!r} contains NaN or inf; the base model file is damaged")
        responses[name] = module_response(lora[name], w, tau, eps, pool)
    return responses


def response_summary(responses: Mapping[str, ModuleResponse], tau: float) -> dict:
    """The `lofa response-map --json` object: overall (element-weighted) and per-module active fraction."""
    numel = sum(r.numel for r in responses.values())
    return {
        "tau": tau,
        "active_fraction": sum(r.active for r in responses.values()) / numel,
        "modules": {
            name: {"shape": list(r.shape), "active_fraction": r.active_fraction,
                   "mean_relative_change": r.mean_relative_change}
            for name, r in responses.items()
        },
    }


def analyze_lora(base_weights: Mapping[str, torch.Tensor], lora_weights: LoraWeights, tau: float = TAU,
                 eps: float = EPS) -> dict:
    """{"tau", "active_fraction", "modules": {NAME: {"shape", "active_fraction", "mean_relative_change"}}}."""
    return response_summary(lora_response(base_weights, lora_weights, tau, eps, progress=False), tau)


# --- structure by depth and module type ---------------------------------------------------------------------------
MODULE_TYPES = ("self_q", "self_k", "self_v", "self_o", "cross_q", "cross_k", "cross_v", "cross_o", "cross_k_img",
                "cross_v_img", "ffn_in", "ffn_out")
_TYPE_RULES = (
    (re.compile(r"\.attn1\.to_([qkv])$"), r"self_\1"),
    (re.compile(r"\.attn1\.to_out\.0$"), "self_o"),
    (re.compile(r"\.attn2\.to_([qkv])$"), r"cross_\1"),
    (re.compile(r"\.attn2\.to_out\.0$"), "cross_o"),
    (re.compile(r"\.attn2\.add_([kv])_proj$"), r"cross_\1_img"),
    (re.compile(r"\.ff(n)?\.net\.0\.proj$"), "ffn_in"),
    (re.compile(r"\.ff(n)?\.net\.2$"), "ffn_out"),
)
_BLOCK = re.compile(r"^(.*blocks\.\d+)\.")  # greedy: the innermost "...blocks.N" of a name
_FLAT_STACK = re.compile(r"^(transformer_)?blocks\.(\d+)$")


def module_type(name: str) -> str:
    """The paper's module type: self/cross attention × q/k/v/o (plus I2V image k/v), ffn_in/ffn_out, or 'other'."""
    for regex, label in _TYPE_RULES:
        m = regex.search(name)
        if m:
            return m.expand(label)
    return "other"


def block_depths(names: Sequence[str]) -> dict[str, int | None]:
    """Depth of each module's transformer block: N of 'blocks.N' for one flat stack (Wan, PixArt), else the
    block's rank in natural order among the blocks present (UNet: down, mid, up). None outside any block."""
    blocks = {n: (m.group(1) if (m := _BLOCK.match(n)) else None) for n in names}
    present = sorted({b for b in blocks.values() if b}, key=natural_key)
    if all(_FLAT_STACK.match(b) for b in present):
        return {n: int(_FLAT_STACK.match(b).group(2)) if b else None for n, b in blocks.items()}
    rank = {b: i for i, b in enumerate(present)}
    return {n: rank[b] if b else None for n, b in blocks.items()}


def response_table(responses: Mapping[str, ModuleResponse]) -> pd.DataFrame:
    """One row per module: module, depth, module_type, out, in, numel, active, active_fraction,
    mean_relative_change, sum_relative_change."""
    depths = block_depths(list(responses))
    rows = [{"module": n, "depth": depths[n], "module_type": module_type(n), "out": r.shape[0], "in": r.shape[1],
             "numel": r.numel, "active": r.active, "active_fraction": r.active_fraction,
             "mean_relative_change": r.mean_relative_change, "sum_relative_change": r.sum_relative_change}
            for n, r in responses.items()]
    table = pd.DataFrame(rows)
    table["depth"] = table["depth"].astype("Int64")
    return table


def group_response(table: pd.DataFrame, by: str | Sequence[str]) -> pd.DataFrame:
    """Element-weighted active fraction and mean relative change per group (e.g. by "depth", "module_type")."""
    grouped = table.groupby(by, dropna=False, sort=True)[["numel", "active", "sum_relative_change"]].sum()
    grouped["active_fraction"] = grouped["active"] / grouped["numel"]
    grouped["mean_relative_change"] = grouped["sum_relative_change"] / grouped["numel"]
    return grouped.reset_index()


# --- similarity between maps -------------------------------------------------------------------------------------
def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Intersection over union of two binary maps (any equal shapes); nan when both are empty."""
    a, b = a.bool(), b.bool()
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else math.nan


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two maps (binary or relative change) flattened; nan when either is all zero."""
    a, b = a.double().flatten(), b.double().flatten()
    norm = float(a.norm() * b.norm())
    return float(a @ b) / norm if norm else math.nan


def pairwise_similarity(base_weights: Mapping[str, torch.Tensor], loras: Sequence[LoraWeights], tau: float = TAU,
                        eps: float = EPS, samples_per_module: int | None = 4096, seed: int = 0,
                        progress: bool = True) -> dict[str, np.ndarray]:
    """Pairwise similarity of the response maps of n LoRAs on one base -> {"iou", "cosine", "cosine_relative"},
    each [n, n] float64 (cosine on the binary maps, cosine_relative on the relative change).

    Maps cover the union of the LoRAs' modules (a module a LoRA lacks has ΔW = 0 there). With
    `samples_per_module` the same `samples_per_module` entries per module (drawn with replacement from `seed`)
    stand for each map; None (or a module smaller than that) uses every entry, in row chunks.
    """
    shapes = _shapes(base_weights)
    for lora in loras:
        check_compatible(lora, shapes)
    n = len(loras)
    gram_map = torch.zeros(n, n, dtype=torch.float64)
    gram_rel = torch.zeros(n, n, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    names = sorted(set().union(*loras), key=natural_key)
    for name in tqdm(names, desc="similarity", disable=not progress, leave=False):
        w = base_weights[name]
        out, inp = w.shape
        if samples_per_module is None or samples_per_module >= out * inp:
            rows = max(1, CHUNK_ELEMENTS // (inp * n))
            chunks = [(slice(start, start + rows), None) for start in range(0, out, rows)]
        else:
            index = torch.randint(out * inp, (samples_per_module,), generator=generator)
            chunks = [(index // inp, index % inp)]
        for rows_, cols in chunks:
            w_part = w[rows_] if cols is None else w[rows_, cols]
            m = torch.stack([_sampled_relative_change(lora.get(name), w_part, rows_, cols, eps) for lora in loras])
            m = m.reshape(n, -1).double()
            r = (m > tau).double()
            gram_map += r @ r.T
            gram_rel += m @ m.T
    count = gram_map.diag()
    union = count[:, None] + count[None, :] - gram_map
    norms = (count[:, None] * count[None, :]).sqrt()
    rel_norms = (gram_rel.diag()[:, None] * gram_rel.diag()[None, :]).sqrt()
    return {
        "iou": np.where(union.numpy() > 0, (gram_map / union).numpy(), np.nan),
        "cosine": np.where(norms.numpy() > 0, (gram_map / norms).numpy(), np.nan),
        "cosine_relative": np.where(rel_norms.numpy() > 0, (gram_rel / rel_norms).numpy(), np.nan),
    }


def _sampled_relative_change(factor: LoraFactor | None, w_part: torch.Tensor, rows, cols, eps: float) -> torch.Tensor:
    """Relative change at W[rows] (cols None) or at the entries W[rows[k], cols[k]]."""
    if factor is None:
        return torch.zeros(w_part.shape)
    if cols is None:
        delta = factor.delta_rows(rows.start, rows.stop)
    else:
        delta = factor.scale * (factor.B[rows].float() * factor.A[:, cols].T.float()).sum(1)
    return relative_change(delta, w_part, eps)


# --- the zoo's structure: τ sweep, depth × type profiles, within- vs across-group tests ---------------------------
def module_exceedance(factors: Sequence[LoraFactor], w: torch.Tensor, taus: Sequence[float], eps: float = EPS,
                      chunk_elements: int = CHUNK_ELEMENTS) -> tuple[np.ndarray, np.ndarray]:
    """(counts, sum_relative_change) of n LoRAs' ΔW of one module against W [out, in], in one chunked, batched pass.

    counts: int64 [n, len(taus)], counts[i, j] = entries of LoRA i with relative change > taus[j] (any order of
    taus; the same comparison as `module_response`, so counts at τ equal its `active`). sum_relative_change:
    float64 [n]. Chunks hold about `chunk_elements` ΔW entries: several whole LoRAs, or row blocks of one.
    """
    out, inp = w.shape
    for f in factors:
        if tuple(f.shape) != (out, inp):
            raise LofaError(f"LoRA ΔW is {list(f.shape)} but the base weight is {[out, inp]}")
    n, k = len(factors), len(taus)
    # zero-padding to a common rank adds nothing to B A, so LoRAs of different rank share one bmm
    rank = max(f.rank for f in factors)
    A = torch.zeros(n, rank, inp, device=w.device)
    B = torch.zeros(n, out, rank, device=w.device)
    for i, f in enumerate(factors):
        A[i, :f.rank], B[i, :, :f.rank] = f.A.float(), f.B.float()
    scale = torch.tensor([f.scale for f in factors], device=w.device)[:, None, None]
    taus = np.asarray(taus, dtype=np.float64)
    order = np.argsort(taus)
    # bucket b holds the entries above exactly the b smallest τ (boundaries[b-1] < m <= boundaries[b]); τ in the
    # dtype of m, as `m > tau` compares in module_response
    boundaries = torch.from_numpy(taus[order]).to(torch.promote_types(w.dtype, torch.float32)).to(w.device)
    group = max(1, chunk_elements // (out * inp))
    rows = out if group > 1 else max(1, chunk_elements // inp)
    hist = torch.zeros(n, k + 1, dtype=torch.int64)
    sums = torch.zeros(n, dtype=torch.float64)
    for g in range(0, n, group):
        size = min(group, n - g)
        offset = torch.arange(size, device=w.device)[:, None] * (k + 1)
        for start in range(0, out, rows):
            delta = scale[g:g + size] * torch.bmm(B[g:g + size, start:start + rows], A[g:g + size])
            m = relative_change(delta, w[start:start + rows], eps)  # [size, rows, in]
            bucket = torch.bucketize(m.reshape(size, -1), boundaries) + offset
            hist[g:g + size] += torch.bincount(bucket.flatten(), minlength=size * (k + 1)).reshape(size, k + 1).cpu()
            sums[g:g + size] += m.sum(dim=2).double().sum(dim=1).cpu()
    above_sorted = hist.flip(1).cumsum(1).flip(1)[:, 1:].numpy()  # entries above the j-th smallest τ
    counts = np.empty((n, k), dtype=np.int64)
    counts[:, order] = above_sorted
    return counts, sums.numpy()


def sweep_table(base_weights: Mapping[str, torch.Tensor], loras: Iterable[tuple[Hashable, LoraWeights]],
                taus: Sequence[float], eps: float = EPS, progress: bool = True) -> pd.DataFrame:
    """Active entries of every module of every LoRA at every τ, one batched pass per module over all LoRAs.

    loras: (key, LoraWeights) pairs, e.g. (case id, weights), all on `base_weights`. Returns a long table, one row
    per (LoRA, module, τ) in LoRA, then natural module order: lora, module, depth, module_type, numel, tau, active,
    active_fraction, sum_relative_change (the module's, repeated over τ), so `group_response(table[table.tau == τ],
    by)` works.
    """
    pairs = list(loras)
    if not pairs:
        raise LofaError("sweep_table got no LoRAs; pass (key, LoraWeights) pairs, e.g. zoo LoRAs by case id")
    keys, weights = [key for key, _ in pairs], [lora for _, lora in pairs]
    shapes = _shapes(base_weights)
    for lora in weights:
        check_compatible(lora, shapes)
    names = sorted(set().union(*weights), key=natural_key)
    depths = block_depths(names)
    parts = []
    for name in tqdm(names, desc="τ sweep", unit="module", disable=not progress, leave=False):
        w = base_weights[name]
        if not torch.isfinite(w).all():
            raise LofaError(f"base weight {name!r} contains NaN or inf; the base model file is damaged")
        holders = [i for i, lora in enumerate(weights) if name in lora]
        counts, sums = module_exceedance([weights[i][name] for i in holders], w, taus, eps)
        numel = w.shape[0] * w.shape[1]
        parts.append(pd.DataFrame({
            "order": np.repeat(holders, len(taus)), "lora": [keys[i] for i in holders for _ in taus],
            "module": name, "depth": depths[name], "module_type": module_type(name), "numel": numel,
            "tau": np.tile(np.asarray(taus, dtype=np.float64), len(holders)), "active": counts.ravel(),
            "active_fraction": counts.ravel() / numel, "sum_relative_change": np.repeat(sums, len(taus))}))
    columns = ["lora", "module", "depth", "module_type", "numel", "tau", "active", "active_fraction",
               "sum_relative_change"]
    table = pd.concat(parts, ignore_index=True).sort_values("order", kind="stable")[columns].reset_index(drop=True)
    table["depth"] = table["depth"].astype("Int64")
    return table


def depth_bins(depth: pd.Series, n_bins: int) -> pd.Series:
    """Relative-depth bin of each block depth: depth · n_bins // (max depth + 1), in 0..n_bins-1 (NA stays NA).

    Puts networks of different depth (a 30-block DiT, a 7-block UNet) on the same axis: bin 0 = first blocks.
    """
    if n_bins < 1:
        raise LofaError(f"n_bins = {n_bins}: need at least one depth bin")
    return depth * n_bins // (int(depth.max()) + 1)


def depth_type_profile(table: pd.DataFrame, n_bins: int, key: str = "lora") -> pd.DataFrame:
    """Active fraction per LoRA (rows, by `key`) and (relative-depth bin, module type) (columns), element-weighted.

    table: one row per (LoRA, module) at one τ, with columns key, depth, module_type, numel, active (e.g. a
    `sweep_table` at one τ). Modules outside any block are left out. Columns are a MultiIndex (depth_bin,
    module_type) in depth, then paper type order; a (bin, type) no module of a LoRA falls in is NaN.
    """
    if "tau" in table and table["tau"].nunique() > 1:
        raise LofaError("depth_type_profile needs a table at one τ; select it first, e.g. table[table.tau == 0.02]")
    t = table[table["depth"].notna()].assign(depth_bin=lambda d: depth_bins(d["depth"], n_bins).astype(int))
    grouped = t.groupby([key, "depth_bin", "module_type"])[["numel", "active"]].sum()
    profile = (grouped["active"] / grouped["numel"]).unstack(["depth_bin", "module_type"])
    types = [*MODULE_TYPES, "other"]
    columns = sorted(profile.columns, key=lambda c: (c[0], types.index(c[1])))
    return profile[columns]


def variance_explained(values: Sequence[float], groups: Sequence[Hashable]) -> float:
    """η² = 1 − Σ (value − its group's mean)² / Σ (value − overall mean)²: the share of the variance of
    `values` [n] that membership in `groups` [n] accounts for (0: none, 1: all); nan when the values do not vary."""
    values = np.asarray(values, dtype=np.float64)
    codes = pd.factorize(pd.Series(list(groups)), use_na_sentinel=False)[0]  # a missing label is a group too
    if len(values) != len(codes):
        raise LofaError(f"{len(values)} values but {len(codes)} group labels; give one label per value")
    total = ((values - values.mean()) ** 2).sum()
    means = np.bincount(codes, weights=values) / np.bincount(codes)
    within = ((values - means[codes]) ** 2).sum()
    return float(1 - within / total) if total > 0 else math.nan


def chance_iou(active_fraction: np.ndarray, numel: np.ndarray) -> np.ndarray:
    """Expected IoU of two maps whose entries are independent, given each map's active fraction per module.

    active_fraction: [n, M] (n maps, M modules); numel: [M] entries per module. Returns [n, n]:
    Σ numel · p_a p_b / Σ numel · (p_a + p_b − p_a p_b), the baseline that map IoUs sit above when maps share
    structure (e.g. where |W| is small); nan where both maps are empty.
    """
    p = np.asarray(active_fraction, dtype=np.float64)
    weight = np.asarray(numel, dtype=np.float64)
    inter = (p * weight) @ p.T
    total = p @ weight
    union = total[:, None] + total[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.nan)


def permutation_test(sim: np.ndarray, labels: Sequence[Hashable], n_perm: int = 1000, seed: int = 0) -> dict:
    """Are items with the same label more alike than items with different labels? A label-permutation test.

    sim: [n, n] similarity, symmetric (only pairs i < j are read; NaN = undefined pair, left out). labels: [n].
    Statistic: mean similarity of same-label pairs minus mean of different-label pairs. One-sided p-value:
    (1 + number of the `n_perm` seeded label shuffles whose statistic is at least the observed) / (1 + n_perm).
    (scipy.stats.permutation_test permutes samples of a statistic over independent observations; here the
    observations are pairs of one similarity matrix, whose labels must be shuffled together, so it is written out.)
    Returns {"within", "across", "difference", "p_value", "n_perm", "n", "n_groups", "n_within_pairs",
    "n_across_pairs"}.
    """
    sim = np.asarray(sim, dtype=np.float64)
    codes = pd.factorize(pd.Series(list(labels)))[0]
    n = len(codes)
    if sim.shape != (n, n):
        raise LofaError(f"similarity matrix is {list(sim.shape)} but there are {n} labels; give [n, n] and n labels")
    i, j = np.triu_indices(n, 1)
    s = sim[i, j]
    keep = ~np.isnan(s)
    i, j, s = i[keep], j[keep], s[keep]

    def statistic(shuffled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[p, n] label codes -> (within mean, across mean), each [p]."""
        same = shuffled[:, i] == shuffled[:, j]
        n_same = same.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (same @ s) / n_same, (~same @ s) / (len(s) - n_same)

    within, across = (float(v[0]) for v in statistic(codes[None]))
    if math.isnan(within) or math.isnan(across):
        raise LofaError(f"no {'same' if math.isnan(within) else 'different'}-label pair with a defined similarity "
                        f"among {n} items in {len(set(codes))} groups; the test needs both")
    observed = within - across
    rng = np.random.default_rng(seed)
    exceed = 0
    batch = max(1, (1 << 22) // max(1, len(s)))  # shuffles at a time: about 4 M pairs in memory
    for start in range(0, n_perm, batch):
        shuffled = rng.permuted(np.tile(codes.astype(np.int32), (min(batch, n_perm - start), 1)), axis=1)
        w, a = statistic(shuffled)
        exceed += int(np.sum(w - a >= observed - 1e-12))  # a shuffle that regroups like the data ties it
    n_within = int((codes[i] == codes[j]).sum())
    return {"within": within, "across": across, "difference": observed, "p_value": (1 + exceed) / (1 + n_perm),
            "n_perm": n_perm, "n": n, "n_groups": len(set(codes)), "n_within_pairs": n_within,
            "n_across_pairs": len(s) - n_within}


# --- the zoo against its base models (notebook 04) ------------------------------------------------------------------
# The paper's claims about response maps, tested on every LoRA of a run's zoos: (a) sparsity, (b) depth and module
# type, (c) more alike within a case family or task than across, (d) the τ sweep. Tables take the long `sweep_table`
# of all tasks (with a task column); `cases` is `zoo_against_base`'s case table.
PAPER_BELOW = (0.5, 0.8)  # the paper: 50-80 % of a LoRA's entries below τ = 2 %


def zoo_against_base(run, tasks: Sequence[str]) -> tuple[dict, dict, pd.DataFrame]:
    """Every task's zoo LoRAs and base weights (trained here when missing) -> (bases {task: {module: W [out, in]
    float32 on the CPU}}, loras {task: {case_id: LoraWeights}}, cases): cases one row per LoRA with task, lora
    (case id), case (name), coarse, family (coarse name), split."""
    bases, loras, cases = {}, {}, []
    for task in tasks:
        zoo, gen, world = run.zoo(task), run.base(task), run.world(task)
        bases[task] = {name: gen.net.get_submodule(name).weight.detach().float().cpu()
                       for name in gen.lora_target_modules(zoo.config.include_ffn)}
        loras[task] = {cid: zoo.load(cid)[0] for cid in zoo.case_ids()}
        cases.append(pd.DataFrame({"task": task, "lora": cid, "case": world.cases[cid].name,
                                   "coarse": world.cases[cid].coarse,
                                   "family": world.coarse_names[world.cases[cid].coarse],
                                   "split": world.cases[cid].split} for cid in loras[task]))
    return bases, loras, pd.concat(cases, ignore_index=True)


def figure2_panels(cases: pd.DataFrame, bases: Mapping, loras: Mapping, per_task: int, tau: float = TAU,
                   pool: int = 16) -> dict[str, list[tuple[str, dict]]]:
    """The rows of the paper's Figure 2 (`plot_response_rows`): per task, the first case of each of its first
    `per_task` coarse families, labelled "case [family]", with its `lora_response` pooled to pool x pool cells."""
    panels = {}
    for task in dict.fromkeys(cases.task):
        picks = cases[cases.task == task].groupby("coarse").head(1).head(per_task)
        panels[task] = [(f"{row.case} [{row.family}]",
                         lora_response(bases[task], loras[task][row.lora], tau, pool=pool, progress=False))
                        for row in picks.itertuples()]
    return panels


def _below_summary(frame: pd.DataFrame, paper_below: tuple[float, float]) -> pd.Series:
    """Spread of the per-LoRA fraction below τ of `frame` and the share of LoRAs inside the paper's band."""
    return pd.Series({"loras": len(frame), "mean_fraction_below": frame.fraction_below.mean(),
                      "median": frame.fraction_below.median(), "min": frame.fraction_below.min(),
                      "max": frame.fraction_below.max(),
                      "share_in_paper_band": frame.fraction_below.between(*paper_below).mean()})


def sparsity_tables(at_tau: pd.DataFrame, cases: pd.DataFrame, paper_below: tuple[float, float] = PAPER_BELOW
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(a) The element-weighted fraction of a LoRA's entries at or below τ over all its modules -> (per_lora,
    sparsity): per_lora one row per LoRA (task, lora, numel, active, fraction_below and the `cases` columns);
    sparsity one row per task and one "all": loras, mean_fraction_below, median, min, max, share_in_paper_band.
    at_tau: the sweep at the one τ."""
    per_lora = at_tau.groupby(["task", "lora"])[["numel", "active"]].sum().reset_index()
    per_lora["fraction_below"] = 1 - per_lora.active / per_lora.numel
    per_lora = per_lora.merge(cases, on=["task", "lora"])
    tasks = list(dict.fromkeys(cases.task))
    by_task = pd.DataFrame({task: _below_summary(per_lora[per_lora.task == task], paper_below) for task in tasks}).T
    sparsity = pd.concat([by_task, _below_summary(per_lora, paper_below).to_frame("all").T])
    return per_lora, sparsity.rename_axis("task").reset_index()


def sparsity_verdicts(sparsity: pd.DataFrame, paper_below: tuple[float, float] = PAPER_BELOW) -> list[str]:
    """(a) One line per row of `sparsity_tables`' sparsity: the mean fraction below τ against the paper's band."""
    verdicts = []
    for row in sparsity.itertuples():
        where = ("inside" if paper_below[0] <= row.mean_fraction_below <= paper_below[1]
                 else "below" if row.mean_fraction_below < paper_below[0] else "above")
        verdicts.append(f"(a) {row.task}: fraction below τ = {row.mean_fraction_below:.2f}, {where} the paper's "
                        f"0.50–0.80 (LoRAs {row.min:.2f}–{row.max:.2f}, {row.share_in_paper_band:.0%} of them inside)")
    return verdicts


def variance_explained_table(at_tau: pd.DataFrame) -> pd.DataFrame:
    """(b) Per task, η² of a module's active fraction (one value per LoRA x module) by the module's type, its depth,
    the module itself and the LoRA -> columns task, eta2_module_type, eta2_depth, eta2_module, eta2_lora."""
    rows = []
    for task, frame in at_tau.groupby("task", sort=False):
        groupings = (("module_type", frame.module_type), ("depth", frame.depth), ("module", frame.module),
                     ("lora", frame.lora))
        rows.append({"task": task, **{f"eta2_{by}": variance_explained(frame.active_fraction, keys)
                                      for by, keys in groupings}})
    return pd.DataFrame(rows)


def depth_type_verdicts(at_tau: pd.DataFrame, eta: pd.DataFrame) -> list[str]:
    """(b) One line per task: the range of the active fraction over module types and over blocks, self- vs
    cross-attention, and the η² of `variance_explained_table`."""
    verdicts = []
    for task, frame in at_tau.groupby("task", sort=False):
        by_type = group_response(frame, "module_type").set_index("module_type").active_fraction
        by_depth = group_response(frame, "depth").set_index("depth").active_fraction
        attn = frame.assign(kind=frame.module_type.str.split("_").str[0])
        self_cross = group_response(attn, "kind").set_index("kind").active_fraction
        e = eta.set_index("task").loc[task]
        verdicts.append(f"(b) {task}: active fraction by module type {by_type.min():.2f} ({by_type.idxmin()}) – "
                        f"{by_type.max():.2f} ({by_type.idxmax()}), by block {by_depth.min():.2f} – "
                        f"{by_depth.max():.2f}; self {self_cross.get('self', np.nan):.2f} vs cross "
                        f"{self_cross.get('cross', np.nan):.2f}; η² module {e.eta2_module:.2f}, type "
                        f"{e.eta2_module_type:.2f}, depth {e.eta2_depth:.2f}, LoRA {e.eta2_lora:.2f}")
    return verdicts


def similarity_tables(at_tau: pd.DataFrame, cases: pd.DataFrame, bases: Mapping, loras: Mapping, tau: float = TAU,
                      samples_per_module: int = 4096, n_perm: int = 2000, seed: int = 0
                      ) -> tuple[pd.DataFrame, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(c) Are maps more alike within a group than across (`permutation_test`)? Within each task, full maps
    (`pairwise_similarity` IoU and cosine, each module by `samples_per_module` sampled entries) grouped by case
    family, with the IoU of independent maps at the same active fractions (`chance_iou`) for scale; across tasks,
    the Pearson correlation of the LoRAs' depth x type profiles (`depth_type_profile`), grouped by task (with two
    tasks or more).

    Returns (similarity, matrices): similarity one row per comparison and metric (comparison, task, metric, the
    `permutation_test` fields, chance_iou); matrices {task or "across tasks (profiles)": (similarity [n, n] sorted
    by group, group labels [n])} for the figure.
    """
    tasks = list(dict.fromkeys(cases.task))
    rows, matrices = [], {}
    for task in tasks:
        ids = list(loras[task])
        labels = cases[cases.task == task].set_index("lora").loc[ids, "family"].to_numpy()
        sim = pairwise_similarity(bases[task], [loras[task][c] for c in ids], tau,
                                  samples_per_module=samples_per_module, seed=seed, progress=False)
        order = np.argsort(labels, kind="stable")
        matrices[task] = (sim["iou"][np.ix_(order, order)], labels[order])
        # IoU if the maps were independent at their own per-module active fractions (modules weighted as sampled)
        fractions = at_tau[at_tau.task == task].pivot(index="lora", columns="module", values="active_fraction")
        numel = np.array([min(bases[task][m].numel(), samples_per_module) for m in fractions.columns])
        chance = chance_iou(fractions.loc[ids].to_numpy(), numel)
        off_diagonal = ~np.eye(len(ids), dtype=bool)
        for metric in ("iou", "cosine"):
            rows.append({"comparison": "full maps within task, by family", "task": task, "metric": metric,
                         **permutation_test(sim[metric], labels, n_perm, seed),
                         "chance_iou": chance[off_diagonal].mean() if metric == "iou" else np.nan})
    if len(tasks) < 2:  # a run of one task has no across-task comparison
        return pd.DataFrame(rows), matrices
    n_bins = min(3, *(int(at_tau[at_tau.task == t].depth.nunique()) for t in tasks))
    profiles = pd.concat({t: depth_type_profile(at_tau[at_tau.task == t], n_bins) for t in tasks},
                         names=["task", "lora"])
    profiles = profiles.dropna(axis=1)   # (bin, type) cells present in every task's network
    profile_sim = np.corrcoef(profiles.to_numpy())
    task_labels = profiles.index.get_level_values("task").to_numpy()
    matrices["across tasks (profiles)"] = (profile_sim, task_labels)
    rows.append({"comparison": f"profiles ({n_bins} depth bins × {profiles.shape[1] // n_bins} types) across tasks",
                 "task": "all", "metric": "pearson", **permutation_test(profile_sim, task_labels, n_perm, seed)})
    return pd.DataFrame(rows), matrices


def similarity_verdicts(similarity: pd.DataFrame) -> list[str]:
    """(c) One line per row of `similarity_tables`' table: within against across, and the permutation test's call."""
    verdicts = []
    for row in similarity.itertuples():
        chance = f"; independent maps would give IoU {row.chance_iou:.3f}" if np.isfinite(row.chance_iou) else ""
        verdict = "more alike within groups" if row.p_value < 0.05 else "no evidence of group structure"
        verdicts.append(f"(c) {row.task} {row.metric} ({row.comparison}): within {row.within:.3f} vs across "
                        f"{row.across:.3f}, difference {row.difference:+.3f}, p = {row.p_value:.4f} -> {verdict} "
                        f"({row.n} LoRAs, {row.n_groups} groups){chance}")
    return verdicts


def tau_sweep_summary(sweep: pd.DataFrame) -> pd.DataFrame:
    """(d) Per task and τ, the active fraction of the LoRAs (each element-weighted over its modules): mean, std,
    min, max as active_fraction_<stat>, and fraction_below_mean = 1 - the mean."""
    per_lora = sweep.groupby(["task", "tau", "lora"])[["numel", "active"]].sum()
    per_lora["active_fraction"] = per_lora.active / per_lora.numel
    tau_sweep = (per_lora.reset_index().groupby(["task", "tau"]).active_fraction.agg(["mean", "std", "min", "max"])
                 .add_prefix("active_fraction_").reset_index())
    tau_sweep["fraction_below_mean"] = 1 - tau_sweep.active_fraction_mean
    return tau_sweep


def tau_sweep_verdicts(tau_sweep: pd.DataFrame, tau: float = TAU,
                       paper_below: tuple[float, float] = PAPER_BELOW) -> list[str]:
    """(d) One line per task of `tau_sweep_summary`: the τ range whose mean fraction below lies in the paper's band,
    and the fraction below at the grid's ends and at `tau` (which must be on the grid)."""
    verdicts = []
    for task in tau_sweep.task.unique():
        frame = tau_sweep[tau_sweep.task == task]
        ok = frame[frame.fraction_below_mean.between(*paper_below)].tau
        span = f"τ ∈ [{ok.min():.3g}, {ok.max():.3g}]" if len(ok) else "no τ of the grid"
        verdicts.append(f"(d) {task}: fraction below τ is in the paper's 0.50–0.80 for {span}; "
                        f"at τ = {frame.tau.iloc[0]:g} / {tau:g} / {frame.tau.iloc[-1]:g}: "
                        f"{1 - frame.active_fraction_mean.iloc[0]:.2f} / "
                        f"{1 - frame.set_index('tau').active_fraction_mean.loc[tau]:.2f} / "
                        f"{1 - frame.active_fraction_mean.iloc[-1]:.2f}")
    return verdicts


# --- plot --------------------------------------------------------------------------------------------------------
def plot_format(path: str | Path) -> str:
    from matplotlib.figure import Figure

    fmt = Path(path).suffix.lstrip(".").lower()
    supported = Figure().canvas.get_supported_filetypes()
    if fmt not in supported:
        raise LofaError(f"--plot {path}: unsupported figure type {fmt!r}; use one of {', '.join(sorted(supported))}")
    return fmt


def _percent_active_grid(table: pd.DataFrame) -> pd.DataFrame:
    """% active by block (rows, in depth order; "-" = outside any block) and module type (columns, paper order).

    Adds the string column "block" to `table`.
    """
    table["block"] = table["depth"].map(lambda d: "-" if pd.isna(d) else str(d))
    blocks = sorted(set(table["block"]), key=lambda b: (b == "-", int(b) if b != "-" else 0))
    types = [t for t in (*MODULE_TYPES, "other") if t in set(table["module_type"])]
    return (group_response(table, ["block", "module_type"])
            .pivot(index="block", columns="module_type", values="active_fraction")
            .reindex(index=blocks, columns=types) * 100)


def plot_response_map(responses: Mapping[str, ModuleResponse], path: str | Path, tau: float = TAU,
                      title: str | None = None) -> None:
    """Write a figure (type from the suffix) atomically: left, % active by block depth × module type; right, every
    module's pooled response map (fraction of active entries per cell, from `module_response(..., pool=...)`)
    placed at its depth (rows) and type (columns) — the paper's Figure 2 for one LoRA."""
    from matplotlib.figure import Figure
    import seaborn as sns

    fmt = plot_format(path)
    table = response_table(responses)
    heat = _percent_active_grid(table)
    blocks, types = list(heat.index), list(heat.columns)

    mosaic_cells = table[(table["block"] != "-") & (table["module_type"] != "other")]
    mosaic_cells = mosaic_cells.drop_duplicates(["block", "module_type"], keep=False)
    mosaic_types = [t for t in types if t in set(mosaic_cells["module_type"])]
    mosaic_blocks = [b for b in blocks if b in set(mosaic_cells["block"])]
    show_mosaic = bool(len(mosaic_cells)) and all(responses[m].pooled is not None for m in mosaic_cells["module"])

    height = max(3.0, 0.22 * len(blocks) + 1.6)
    fig = Figure(figsize=(0.6 * len(types) + (0.45 * len(mosaic_types) + 1.5 if show_mosaic else 0) + 2.5, height))
    axes = fig.subplots(1, 2 if show_mosaic else 1, squeeze=False)[0]
    sns.heatmap(heat, ax=axes[0], vmin=0, vmax=100, cmap="viridis", annot=heat.size <= 120, fmt=".0f",
                cbar_kws={"label": f"% entries with |ΔW|/|W| > {tau:g}"})
    axes[0].set_xlabel("module type")
    axes[0].set_ylabel("block")
    if show_mosaic:
        p, gap = PLOT_POOL, 2
        mosaic = np.full((len(mosaic_blocks) * (p + gap) - gap, len(mosaic_types) * (p + gap) - gap), np.nan)
        for row in mosaic_cells.itertuples():
            pooled = responses[row.module].pooled.numpy()
            up = pooled[np.arange(p) * pooled.shape[0] // p][:, np.arange(p) * pooled.shape[1] // p]
            i, j = mosaic_blocks.index(row.block), mosaic_types.index(row.module_type)
            mosaic[i * (p + gap): i * (p + gap) + p, j * (p + gap): j * (p + gap) + p] = up
        image = axes[1].imshow(mosaic, cmap="magma", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        axes[1].set_xticks([j * (p + gap) + p / 2 for j in range(len(mosaic_types))], mosaic_types, rotation=90)
        axes[1].set_yticks([i * (p + gap) + p / 2 for i in range(len(mosaic_blocks))], mosaic_blocks)
        axes[1].set_title("response map per module (pooled)")
        fig.colorbar(image, ax=axes[1], label="fraction active in cell")
    overall = table["active"].sum() / table["numel"].sum()
    fig.suptitle(f"{title + ': ' if title else ''}{overall:.1%} of entries respond (τ = {tau:g})")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=120)


def module_order(names: Iterable[str]) -> list[str]:
    """Module names by block depth, then the paper's type order (q, k, v, o of self-, then cross-attention, then
    FFN), then name; modules outside any block last."""
    names = list(names)
    depths = block_depths(names)
    types = [*MODULE_TYPES, "other"]
    return sorted(names, key=lambda n: (depths[n] is None, depths[n] or 0, types.index(module_type(n)),
                                        natural_key(n)))


def map_strip(responses: Mapping[str, ModuleResponse], modules: Sequence[str], cell: int = 12,
              gap: int = 1) -> np.ndarray:
    """One LoRA's pooled response maps side by side: [cell, len(modules) · (cell + gap) − gap] float.

    Module k's pooled map (fraction of active entries per cell, from `lora_response(..., pool=...)`), resized to
    cell × cell by nearest neighbour, fills columns k · (cell + gap) onwards; gaps and modules the LoRA lacks are NaN.
    """
    strip = np.full((cell, len(modules) * (cell + gap) - gap), np.nan)
    for k, name in enumerate(modules):
        response = responses.get(name)
        if response is None:
            continue
        if response.pooled is None:
            raise LofaError(f"module {name!r} has no pooled map; compute the responses with lora_response(..., pool=N)")
        p = response.pooled.numpy()
        cells = p[np.arange(cell) * p.shape[0] // cell][:, np.arange(cell) * p.shape[1] // cell]
        strip[:, k * (cell + gap): k * (cell + gap) + cell] = cells
    return strip


def plot_response_rows(panels: Mapping[str, Sequence[tuple[str, Mapping[str, ModuleResponse]]]],
                       path: str | Path, tau: float = TAU, cell: int = 12) -> None:
    """The paper's Figure 2 for many LoRAs, written atomically: one panel row per group (e.g. task), one image row
    per LoRA; columns = blocks in depth order and, inside a block, the module types in paper order.

    panels: {group: [(row label, responses with pooled maps), ...]}; LoRAs of one group share a base model.
    Left: every module's pooled binary map R = |ΔW/W| > τ (fraction active per cell); right: the summary, each
    module's active fraction.
    """
    from matplotlib.figure import Figure

    fmt = plot_format(path)
    if not panels or not all(panels.values()):
        raise LofaError("plot_response_rows needs at least one LoRA in every panel")
    gap = 1
    layouts = {}
    for group, rows in panels.items():
        modules = module_order(set().union(*(r for _, r in rows)))
        depths = block_depths(modules)
        mosaic = np.full((len(rows) * (cell + gap) - gap, len(modules) * (cell + gap) - gap), np.nan)
        for i, (_, responses) in enumerate(rows):
            mosaic[i * (cell + gap): i * (cell + gap) + cell] = map_strip(responses, modules, cell, gap)
        summary = np.array([[r[m].active_fraction if m in r else np.nan for m in modules] for _, r in rows])
        layouts[group] = (modules, [depths[m] for m in modules], mosaic, summary)

    heights = [len(rows) + 1.2 for rows in panels.values()]
    fig = Figure(figsize=(15, 0.42 * sum(heights) + 1.0), layout="constrained")
    axes = fig.subplots(len(panels), 2, squeeze=False, gridspec_kw={"height_ratios": heights,
                                                                    "width_ratios": [3.2, 1]})
    for (group, rows), (left, right) in zip(panels.items(), axes):
        modules, depths, mosaic, summary = layouts[group]
        labels = [label for label, _ in rows]
        image = left.imshow(mosaic, cmap="magma", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        right.imshow(summary, cmap="magma", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        starts = [k for k in range(len(modules)) if k == 0 or depths[k] != depths[k - 1]]
        ends = starts[1:] + [len(modules)]
        block_labels = [f"b{depths[s]}" if depths[s] is not None else "-" for s in starts]
        left.set_xticks([(s + e) / 2 * (cell + gap) - gap / 2 for s, e in zip(starts, ends)], block_labels, fontsize=7)
        left.set_yticks([i * (cell + gap) + cell / 2 for i in range(len(rows))], labels, fontsize=7)
        right.set_xticks([(s + e - 1) / 2 for s, e in zip(starts, ends)], block_labels, fontsize=6)
        right.set_yticks([])
        left.grid(False)
        right.grid(False)
        for s in starts[1:]:
            left.axvline(s * (cell + gap) - gap / 2 - 0.5, color="white", lw=0.8)
            right.axvline(s - 0.5, color="white", lw=0.8)
        left.set_title(f"{group}: pooled response map per module (blocks left to right)", fontsize=9, loc="left")
        right.set_title("active fraction per module", fontsize=9, loc="left")
    fig.colorbar(image, ax=axes, shrink=0.6, label=f"fraction of entries with |ΔW|/|W| > {tau:g}")
    types = list(dict.fromkeys(module_type(m) for modules, *_ in layouts.values() for m in modules))
    fig.suptitle(f"Response maps at τ = {tau:g}; module order in each block: "
                 f"{' '.join(_SHORT_TYPE.get(t, t) for t in types)} (s = self-, c = cross-attention)", fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=130, bbox_inches="tight")


# --- `lofa response-map` -----------------------------------------------------------------------------------------
def describe_lora(lora: LoraWeights) -> str:
    ranks = sorted({f.rank for f in lora.values()})
    alphas = sorted({f.alpha for f in lora.values()})

    def span(values):
        return f"{values[0]:g}" if len(values) == 1 else f"{values[0]:g}-{values[-1]:g}"

    return f"{len(lora)} modules, rank {span(ranks)}, alpha {span(alphas)}"


def response_text(responses: Mapping[str, ModuleResponse], tau: float) -> str:
    table = response_table(responses)
    numel, active = int(table["numel"].sum()), int(table["active"].sum())
    grid = _percent_active_grid(table)
    grid["all"] = group_response(table, "block").set_index("block")["active_fraction"] * 100
    by_type = group_response(table, "module_type").set_index("module_type")
    grid.loc["all"] = pd.concat([by_type["active_fraction"] * 100, pd.Series({"all": active / numel * 100})])
    rel = by_type["mean_relative_change"].reindex(grid.columns.drop("all"))
    return "\n".join([
        f"τ = {tau:g}: {active / numel:.2%} of {numel:,} entries respond (|ΔW| / (|W| + eps) > τ), "
        f"{1 - active / numel:.2%} below",
        "",
        "% of entries active, by block (rows) and module type (columns):",
        grid.to_string(float_format=lambda v: f"{v:.1f}", na_rep="."),
        "",
        "mean relative change by module type:",
        rel.to_string(float_format=lambda v: f"{v:.4g}"),
    ])
