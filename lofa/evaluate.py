"""Scoring LoRAs the same way for every method: generate per case (with or without a LoRA), score on the world's
ground truth, aggregate over cases with bootstrap intervals.

Every method that ends in "one LoRA per case" — the zoo's per-case LoRAs, Stage II's predicted LoRAs, the baselines
— and the base model itself go through the same three calls, so their numbers are comparable:

    ids, prompts, seeds = eval_plan(world, case_ids, per_case=4, seed=1)       # who, which prompt, which noise
    x = generate(gen, world, ids, [loras[c] for c in ids], prompts, seeds)     # loras=None: the base model
    frame = score_cases(evaluators, world, ids, x, prompts, reference_seed=2)  # one row per sample
    frame["denoise"] = denoising_loss(gen, world, ids, [loras[c] for c in ids], prompts, seed=3)
    table = summarize(case_means(frame.assign(method="LoRA")), ["acc", "coarse_acc"])

Samples with the same seed start from the same noise whatever the LoRA, so base and LoRA samples of a case are
paired. Many LoRAs are sampled in one batch through `lofa.lora.batched.multi_lora` (each sample routed to its own
LoRA), classifier-free guidance included. `denoising_loss` scores a LoRA without sampling: the flow-matching loss
of fresh ground-truth renders of its case (lower is better), which shows what a LoRA has learned even where the
base samples poorly. Cases, not samples, are the unit of the intervals: a per-case LoRA is one draw from the
method.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from lofa import seeds as seed_streams
from lofa.diffusion import check_precision, sample
from lofa.errors import LofaError
from lofa.lora.batched import multi_lora
from lofa.lora.formats import LoraWeights
from lofa.metrics.scores import bootstrap_ci
from lofa.models.text import text_encoder

# Per-sample metrics of each task: the ground-truth ones (exact case, the fraction of its components, coarse
# category) and the paper-style ones (Table 1: CLIP-T, Dynamic Degree; Table 2: CSD, CLIP-T; Table 3: Face Sim,
# DINO, CLIP-I).
METRICS = {
    "actions": ("acc", "attr_acc", "coarse_acc", "clip_t", "dynamic"),
    "styles": ("acc", "attr_acc", "coarse_acc", "csd", "clip_t"),
    "identities": ("acc", "attr_acc", "coarse_acc", "face_sim", "dino", "clip_i"),
}
# Metrics where a lower value is the better one (paired differences turn their verdicts around).
LOWER_IS_BETTER = frozenset({"denoise"})


@dataclass
class GenerateConfig:
    """Sampler settings for evaluation (Euler on diffusers' flow-matching grid, classifier-free guidance)."""

    steps: int = field(default=20, metadata={"help": "Euler steps of the sampler, from t = 1 (pure noise) to 0."})
    guidance_scale: float = field(default=3.0, metadata={
        "help": "Classifier-free guidance scale g: v = v_uncond + g · (v_cond - v_uncond), the unconditional "
                "prediction on the empty prompt; 1 turns guidance off."})
    shift: float = field(default=1.0, metadata={
        "help": "Timestep shift of diffusers' FlowMatchEulerDiscreteScheduler grid; 1 is the plain grid (Wan uses "
                "3-5 at its resolution)."})
    batch: int = field(default=64, metadata={"help": "Samples per sampler call."})
    precision: str = field(default="fp32", metadata={
        "help": "'bf16': the generator's forward passes run under bf16 autocast (weights, latents, the guidance mix "
                "and the Euler update stay float32): faster on a GPU and on a CPU with native bf16 (1.5-2x on an "
                "AMX CPU; slower on a CPU without); 'fp32': everything float32."})

    # mini and full sample in bf16: on the 2-core CPU that runs the mini job (AMX, one thread) 64 guided samples of
    # the shipped mini bases take 17-18 s instead of 26 s (actions, styles) and 12.5 s instead of 24-29 s
    # (identities), and differ from float32's by about 1 % of their mean magnitude
    PRESETS: ClassVar[dict[str, dict]] = {
        "smoke": {"steps": 8},
        "mini": {"precision": "bf16"},
        "full": {"steps": 30, "batch": 256, "precision": "bf16"},
        "wan": {"steps": 50, "guidance_scale": 5.0, "shift": 5.0, "batch": 4, "precision": "bf16"},
    }

    def __post_init__(self):
        check_precision(self.precision, "sampling precision")


GenerateConfig.PRESETS["paper"] = GenerateConfig.PRESETS["wan"]


@dataclass
class ScoringConfig:
    """How many cases and samples each notebook scores: every interval of a run rests on these counts. Samples of a
    case share their noise seeds across methods (paired); cases are the unit the intervals resample."""

    competence_samples: int = field(default=128, metadata={
        "help": "Samples per check and task in the base model's competence table (notebook 02)."})
    zoo_cases: int = field(default=240, metadata={
        "help": "Cases per task whose per-case LoRA is scored (notebook 03): every held-out case first, then "
                "training cases up to this count."})
    zoo_per_case: int = field(default=4, metadata={"help": "Samples per case and method in notebook 03."})
    stage2_cases: int | None = field(default=None, metadata={
        "help": "Held-out cases sampled per setting in Stage II's comparison (notebook 06); None: all of them."})
    stage2_per_case: int = field(default=4, metadata={"help": "Samples per case and method in notebook 06."})
    reference_cases: int = field(default=64, metadata={
        "help": "Held-out cases, and as many training cases, per setting in the reference comparison (notebook 07)."})
    reference_per_case: int = field(default=4, metadata={"help": "Samples per case and method in notebook 07."})
    initialisation_cases: int = field(default=16, metadata={
        "help": "Held-out cases per task fine-tuned from each start in notebook 08."})
    initialisation_per_case: int = field(default=4, metadata={"help": "Samples per case and method in notebook 08."})
    initialisation_tasks_on_cpu: tuple[str, ...] | None = field(default=None, metadata={
        "help": "The tasks notebook 08 fine-tunes when the run computes on a CPU (None: every task); on a GPU it "
                "runs every task."})
    ablation_settings_on_cpu: tuple[str, ...] | None = field(default=None, metadata={
        "help": "The settings whose Table 4 ablations notebook 07 trains and scores when the run computes on a CPU "
                "(None: every setting; empty: none); on a GPU it runs every setting. Each ablation is one more "
                "Stage II training per setting."})

    recon_ablation_settings_on_cpu: tuple[str, ...] | None = field(default=None, metadata={
        "help": "The settings whose reconstruction-term ablation (squared error against L1 on ΔW) notebook 06 "
                "trains and scores when the run computes on a CPU (None: every setting); on a GPU it runs every "
                "setting. Each is one more Stage II training."})

    def on_device(self, names: Sequence[str], only_on_cpu: Sequence[str] | None, on_cpu: bool) -> list[str]:
        """The tasks or settings of `names` (in their order) a notebook runs on this device: all of them on a GPU
        or where `only_on_cpu` (one of the *_on_cpu fields) is None, else those it lists."""
        if not on_cpu or only_on_cpu is None:
            return list(names)
        return [name for name in names if name in only_on_cpu]

    PRESETS: ClassVar[dict[str, dict]] = {
        # one video and one image setting's ablations: the notebook's path is tested, in seconds
        "smoke": {"competence_samples": 16, "zoo_cases": 12, "zoo_per_case": 2, "stage2_per_case": 2,
                  "reference_cases": 3, "reference_per_case": 1, "initialisation_cases": 2,
                  "initialisation_per_case": 1, "ablation_settings_on_cpu": ("actions-text", "identities")},
        # 2 CPU cores: fewer cases, two paired samples each; notebook 08 fine-tunes the identities task only, the
        # Table 4 ablations (three more Stage II trainings per setting) wait for a GPU, and the reconstruction-term
        # ablation runs on the cheapest setting (a Stage II training costs ~6 core-minutes at mini)
        "mini": {"zoo_cases": 48, "zoo_per_case": 2, "stage2_cases": 16, "stage2_per_case": 2, "reference_cases": 12,
                 "reference_per_case": 2, "initialisation_cases": 8, "initialisation_per_case": 2,
                 "initialisation_tasks_on_cpu": ("identities",), "ablation_settings_on_cpu": (),
                 "recon_ablation_settings_on_cpu": ("identities",)},
        # full: 128 of a task's 500-600 held-out cases in notebook 06 (notebook 07 scores 64 held-out and 64 training)
        "full": {"stage2_cases": 128},
    }


@dataclass(frozen=True)
class EvalSeeds:
    """First seeds of the scored streams of a comparison: sample noise, style / face references, ground-truth
    renders, denoising-loss renders: the "compare.*" streams of lofa.seeds, below the evaluators' training seeds
    (>= 900,000,000) and apart from the training streams (tests/test_seeds.py lists the known collisions); `of(seed)`
    gives a run's."""

    sample: int
    reference: int
    ground_truth: int
    denoise: int

    @classmethod
    def of(cls, seed: int) -> "EvalSeeds":
        """The streams of run seed `seed` (notebook 06's held-out comparison and notebook 07 share them)."""
        return cls(*(seed_streams.stream(seed, f"compare.{name}")
                     for name in ("sample", "reference", "ground_truth", "denoise")))


def eval_plan(world, case_ids: Sequence[int], per_case: int, seed: int, split: str = "train"
              ) -> tuple[list[int], list[str], list[int]]:
    """`per_case` samples of each case: (case id of each sample, its prompt, its noise seed), N = len·per_case.

    Sample k of a case uses phrasing k of the prompt split ("train": the phrasings a LoRA was trained with;
    "eval": reserved ones); seeds seed, seed + 1, ... are distinct per sample.
    """
    if per_case < 1:
        raise LofaError(f"per_case must be at least 1, not {per_case}")
    n_prompts = world.n_prompts(split)
    if n_prompts == 0:
        raise LofaError(f"the {world.task} world has no {split!r} phrasings; use split='train'")
    ids = [int(c) for c in case_ids for _ in range(per_case)]
    prompts = [world.prompt(c, k % n_prompts, split) for c in case_ids for k in range(per_case)]
    return ids, prompts, [seed + i for i in range(len(ids))]


@contextlib.contextmanager
def _routed(gen, loras: Sequence[LoraWeights]):
    """`gen` with sample i routed to loras[i]; each distinct LoRA (by identity) is stacked once."""
    slot: dict[int, int] = {}
    distinct = []
    for weights in loras:
        if id(weights) not in slot:
            slot[id(weights)] = len(distinct)
            distinct.append(weights)
    with multi_lora(gen, distinct) as grouped:
        grouped.route(torch.tensor([slot[id(w)] for w in loras]))
        yield


@torch.no_grad()
def generate(gen, world, case_ids: Sequence[int], loras: Sequence[LoraWeights] | None, prompts: Sequence[str],
             seeds: Sequence[int], *, cfg: GenerateConfig | None = None, text=None, progress: bool = True
             ) -> torch.Tensor:
    """Samples [N, *world.shape] (on the CPU, in [-1, 1]) of `gen`, sample i with loras[i] (None: no LoRA).

    case_ids, prompts, seeds: one per sample (see `eval_plan`); loras: one LoRA per sample, the same object
    repeated for samples that share a LoRA (each distinct LoRA is stacked once per batch). text: a TextEncoder
    (default MiniLM on gen's device). The initial noise of sample i depends on seeds[i] only.
    """
    n = len(case_ids)
    if len(prompts) != n or len(seeds) != n or (loras is not None and len(loras) != n):
        raise LofaError(f"got {n} case ids, {len(prompts)} prompts, {len(seeds)} seeds"
                        + ("" if loras is None else f" and {len(loras)} LoRAs") + "; pass one of each per sample")
    cfg = cfg or GenerateConfig()
    device = next(gen.parameters()).device
    text = text_encoder(text, device)
    uncond, uncond_mask = text.encode([""])
    out = []
    for start in tqdm(range(0, n, cfg.batch), desc=f"sampling {world.task}", leave=False, disable=not progress):
        rows = slice(start, start + cfg.batch)
        context, mask = text.encode(list(prompts[rows]))
        noise = torch.stack([torch.randn(world.shape, generator=torch.Generator().manual_seed(int(s)))
                             for s in seeds[rows]])
        with _routed(gen, loras[rows]) if loras is not None else contextlib.nullcontext():
            out.append(sample(gen, context.to(device), mask.to(device), noise.shape, steps=cfg.steps,
                              guidance_scale=cfg.guidance_scale, uncond_context=uncond.to(device),
                              uncond_mask=uncond_mask.to(device), shift=cfg.shift, noise=noise,
                              precision=cfg.precision).cpu())
    return torch.cat(out)


@torch.no_grad()
def denoising_loss(gen, world, case_ids: Sequence[int], loras: Sequence[LoraWeights] | None, prompts: Sequence[str],
                   seed: int, *, times: Sequence[float] = (0.2, 0.4, 0.6, 0.8), text=None, batch: int = 64
                   ) -> np.ndarray:
    """Flow-matching loss [N] of a fresh ground-truth render of each sample's case under its prompt, with
    loras[i] applied (None: the base), averaged over the fixed flow times `times`.

    Lower is better. It asks whether a LoRA has learned its case even where sampling cannot show it yet (a base
    that renders poorly). The renders (world.render(case_ids, seed)) and the noise (from seed + 1) depend on
    (case_ids, seed) only, so two methods called with the same arguments are scored on identical inputs.
    """
    from lofa.diffusion import flow_matching_loss

    n = len(case_ids)
    if len(prompts) != n or (loras is not None and len(loras) != n):
        raise LofaError(f"got {n} case ids, {len(prompts)} prompts"
                        + ("" if loras is None else f" and {len(loras)} LoRAs") + "; pass one of each per sample")
    device = next(gen.parameters()).device
    text = text_encoder(text, device)
    x0 = world.render(list(case_ids), seed)
    noise = torch.randn((len(times), *x0.shape), generator=torch.Generator().manual_seed(seed + 1))
    out = []
    for start in range(0, n, batch):
        rows = slice(start, start + batch)
        context, mask = (z.to(device) for z in text.encode(list(prompts[rows])))
        x = x0[rows].to(device)
        with _routed(gen, loras[rows]) if loras is not None else contextlib.nullcontext():
            losses = [flow_matching_loss(gen, x, context, mask, t=torch.full((len(x),), float(t), device=device),
                                         noise=noise[k, rows].to(device), reduction="none")
                      for k, t in enumerate(times)]
        out.append(torch.stack(losses).mean(0).cpu())
    return torch.cat(out).double().numpy()


def score_cases(evaluators, world, case_ids: Sequence[int], samples: torch.Tensor,
                prompts: Sequence[str] | None = None, *, reference_seed: int | None = None):
    """Per-sample scores as a pandas DataFrame: case_id, split, and one column per metric of `evaluators.score`
    (acc = the referee names the intended case, coarse_acc, clip_t with prompts, motion measures for videos, ...).

    reference_seed: for styles and identities, also score against world.condition of the intended case at this
    seed (the style reference / reference face a condition-driven method would receive): csd, face_sim, dino,
    clip_i. It must lie outside the evaluators' training seeds, like any seed of scored renders.
    """
    import pandas as pd

    references = None
    if reference_seed is not None and world.task in ("styles", "identities"):
        references = world.condition(list(case_ids), seed=reference_seed)
    scores = evaluators.score(samples, list(case_ids), None if prompts is None else list(prompts), references)
    frame = pd.DataFrame({"case_id": [int(c) for c in case_ids],
                          "split": [world.cases[int(c)].split for c in case_ids], **scores})
    return frame


def case_means(frame, by: Sequence[str] = ("method",)):
    """Per-case means of every metric column: one row per (by..., case_id, split)."""
    keys = [*by, "case_id", "split"]
    return frame.groupby(keys, sort=False).mean(numeric_only=True).reset_index()


def summarize(per_case, metrics: Sequence[str], by: Sequence[str] = ("method",), n_boot: int = 1000,
              seed: int = 0):
    """Mean over cases and a 95 % percentile-bootstrap interval (cases resampled) of each metric per group.

    per_case: `case_means` output. Returns a long DataFrame: by..., metric, mean, ci_low, ci_high, cases.
    """
    import pandas as pd

    rows = []
    for key, group in per_case.groupby(list(by), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        for metric in metrics:
            if metric not in group or group[metric].isna().all():
                continue
            values = group[metric].dropna().to_numpy()
            mean, lo, hi = bootstrap_ci(values, n=n_boot, seed=seed)
            rows.append({**dict(zip(by, key)), "metric": metric, "mean": mean, "ci_low": lo, "ci_high": hi,
                         "cases": len(values)})
    return pd.DataFrame(rows)


def paired_difference(a: np.ndarray, b: np.ndarray, *, lower_is_better: bool = False, n_boot: int = 1000,
                      seed: int = 0) -> dict:
    """Mean of a - b over paired per-case values [C] (same cases, prompts and noise seeds), a 95 % bootstrap
    interval over cases, and the verdict for a: "better" / "worse" only when the interval excludes 0."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    d = d[~np.isnan(d)]
    mean, lo, hi = bootstrap_ci(d, n=n_boot, seed=seed)
    up, down = ("worse", "better") if lower_is_better else ("better", "worse")
    verdict = up if lo > 0 else (down if hi < 0 else "no significant difference")
    return {"difference": mean, "ci_low": lo, "ci_high": hi, "cases": len(d), "verdict": verdict}


def ratio_of_means(numerator: np.ndarray, denominator: np.ndarray, n_boot: int = 1000, seed: int = 0
                   ) -> tuple[float, float, float]:
    """mean(numerator) / mean(denominator) over paired per-case values [C], with a 95 % percentile-bootstrap
    interval that resamples cases (both arrays together); resamples whose denominator mean is 0 are skipped.
    E.g. exact-case recognition of LoRA samples / of ground-truth renders of the same cases."""
    num, den = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 1 or len(num) == 0:
        raise LofaError(f"ratio_of_means needs two equal-length 1-D arrays of per-case values, got shapes "
                        f"{num.shape} and {den.shape}")
    if den.mean() == 0:
        raise LofaError("the denominator's mean is 0 (e.g. the referee recognises no ground-truth render); the ratio "
                        "is undefined — check the evaluators")
    rows = np.random.default_rng(seed).integers(0, len(num), size=(n_boot, len(num)))
    num_boot, den_boot = num[rows].mean(1), den[rows].mean(1)
    boots = num_boot[den_boot > 0] / den_boot[den_boot > 0]
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return float(num.mean() / den.mean()), float(lo), float(hi)


def prediction_cost(model, bank, case_ids: Sequence[int]) -> dict:
    """What one predicted LoRA costs a method that maps a condition to a LoRA (LoFA, Text-to-LoRA): its parameter
    count and the median wall time of `model.predict` on one condition alone, over `case_ids`' conditions in `bank`
    (a ConditionBank, view 0), after one warm-up call -> {"parameters", "predict_ms", "device"}.
    The call is the whole prediction a user makes (condition tokens in, LoraWeights out), on the model's device.
    """
    if isinstance(model, torch.nn.Module):  # Text-to-LoRA
        modules = [model]
    else:  # LoFA: Stage I (when it has one) and Stage II
        modules = [m for m in (model.stage1, model.stage2) if m is not None]
    parameters = sum(p.numel() for m in modules for p in m.parameters())
    if not len(case_ids):
        raise LofaError("prediction_cost needs at least one case to time")
    tokens, mask = bank.get(list(case_ids))
    device = next(modules[0].parameters()).device
    model.predict(tokens[:1], mask[:1])
    ms = []
    for i in range(len(tokens)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model.predict(tokens[i:i + 1], mask[i:i + 1])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ms.append((time.perf_counter() - start) * 1e3)
    return {"parameters": int(parameters), "predict_ms": float(np.median(ms)), "device": str(device)}


def same_coarse_others(world, ids: Sequence[int], rng: np.random.Generator) -> list[int]:
    """For each training case id, a random *other* training case of its coarse category (itself only when its
    category has no other training case)."""
    by_coarse: dict[int, list[int]] = {}
    for c in world.ids("train"):
        by_coarse.setdefault(world.cases[c].coarse, []).append(int(c))
    out = []
    for i in ids:
        pool = by_coarse[world.cases[i].coarse]
        others = [j for j in pool if j != i] or pool
        out.append(int(rng.choice(others)))
    return out


def competence_seed(seed: int) -> int:
    """First noise / render seed of the base-competence check of a run with seed `seed` (notebook 02 and
    `lofa pretrain`): the "competence" stream of lofa.seeds; the check uses seed .. seed + n + held-out cases + 4."""
    return seed_streams.stream(seed, "competence")


def base_competence(gen, world, evaluators, *, n: int, seed: int, cfg: GenerateConfig | None = None, text=None,
                    progress: bool = True) -> dict:
    """Is the base a competent generator of its world at the coarse level, and *not* at the fine level?

    Three checks (the mini-worlds acceptance): (1) samples for coarse captions of `n` random training cases are
    recognised as the right coarse category; (2) their Fréchet distance to ground-truth renders of the same
    cases, beside two floors: renders of the same cases at other seeds, and renders of *other* training cases
    of the same coarse categories — all a coarse caption tells the base, so the distance a perfect
    coarse-level generator would reach; (3) samples for the held-out cases' reserved fine prompts are
    recognised as their exact case, beside ground-truth renders of those cases.
    Seeds seed, seed + 1, ... must lie outside the evaluators' training seeds. Returns a dict of scalars.
    """
    rng = np.random.default_rng(seed)
    train = world.ids("train")
    ids = [int(i) for i in rng.choice(train, size=n, replace=len(train) < n)]
    others = same_coarse_others(world, ids, rng)
    real, captions = world.sample(ids, seed, level="coarse")
    seeds = [seed + 1 + i for i in range(n)]
    coarse = generate(gen, world, ids, None, captions, seeds, cfg=cfg, text=text, progress=progress)
    heldout = world.ids("heldout")
    fine_prompts = [world.prompt(c, 0, "eval") for c in heldout]
    fine = generate(gen, world, heldout, None, fine_prompts, [seed + 1 + n + i for i in range(len(heldout))],
                    cfg=cfg, text=text, progress=progress)
    gt_fine = world.render(heldout, seed + 2)
    return {
        "coarse_acc_base": float(evaluators.score(coarse, ids)["coarse_acc"].mean()),
        "coarse_acc_renders": float(evaluators.score(real, ids)["coarse_acc"].mean()),
        "fd_base_vs_renders": evaluators.frechet(coarse, real),
        "fd_renders_vs_renders": evaluators.frechet(world.render(ids, seed + 3), real),
        "fd_other_cases_vs_renders": evaluators.frechet(world.render(others, seed + 4), real),
        "exact_acc_base_heldout": float(evaluators.score(fine, heldout)["acc"].mean()),
        "exact_acc_renders_heldout": float(evaluators.score(gt_fine, heldout)["acc"].mean()),
        "coarse_acc_base_heldout_fine": float(evaluators.score(fine, heldout)["coarse_acc"].mean()),
        "samples": {"coarse": coarse, "fine": fine, "real": real, "ids": ids, "heldout": heldout},
    }


def compare(gen, world, evaluators, methods: dict, case_ids: Sequence[int], *, per_case: int, seeds: EvalSeeds,
            split: str = "eval", cfg: GenerateConfig | None = None, text=None, progress: bool = False,
            return_samples: bool = False):
    """The per-sample table every comparison of methods uses: each method samples the same cases, prompts and
    noise (`eval_plan(world, case_ids, per_case, seeds.sample, split)`), and ground-truth renders of the cases join
    as the method "ground truth".

    methods: {name: None (the base model) or {case_id: LoraWeights}} (one LoRA per case; several cases may share
    one object). Returns a pandas DataFrame with one row per (method, sample): method, sample, case_id, split, the
    task's metrics (`score_cases`) and denoise (`denoising_loss`; NaN for ground truth). Summarise it with
    `case_means` then `summarize` / `paired_differences`. With return_samples, also the samples that were scored:
    (table, {method: samples [N, *world.shape]}), ground truth included, N = len(case_ids) · per_case in
    `eval_plan` order.
    """
    import pandas as pd

    ids, prompts, noise = eval_plan(world, case_ids, per_case, seeds.sample, split=split)
    text = text_encoder(text, next(gen.parameters()).device)
    samples = {"ground truth": world.render(ids, seed=seeds.ground_truth)}
    frames = [score_cases(evaluators, world, ids, samples["ground truth"], prompts,
                          reference_seed=seeds.reference).assign(method="ground truth", denoise=np.nan)]
    for name, loras in methods.items():
        per_sample = None if loras is None else [loras[c] for c in ids]
        x = generate(gen, world, ids, per_sample, prompts, noise, cfg=cfg, text=text, progress=progress)
        frame = score_cases(evaluators, world, ids, x, prompts, reference_seed=seeds.reference)
        frame["denoise"] = denoising_loss(gen, world, ids, per_sample, prompts, seeds.denoise, text=text)
        frames.append(frame.assign(method=name))
        if return_samples:
            samples[name] = x
    table = pd.concat([f.assign(sample=range(len(ids))) for f in frames], ignore_index=True)
    table = table[["method", "sample", *[c for c in table.columns if c not in ("method", "sample")]]]
    return (table, samples) if return_samples else table


def paired_differences(per_case, method: str, baselines: Sequence[str], metrics: dict[tuple, Sequence[str]],
                       by: Sequence[str], *, baseline_column: str = "baseline", seed: int = 0):
    """`method` minus each baseline, paired over cases (`paired_difference`), per group of `by`, metric and baseline.

    per_case: `case_means` output (columns by..., method, case_id, the metrics). metrics: {group key (a tuple of
    the `by` values): its metrics}, in the order the rows should come; a metric the table lacks is left out.
    Returns a DataFrame with one row per (group, metric, baseline): by..., metric, `baseline_column`, difference,
    ci_low, ci_high, cases, verdict (for `method`; LOWER_IS_BETTER metrics turned around), method (`method`, so
    that tables of several methods concatenate and every reader finds the method compared in its row).
    """
    import pandas as pd

    # One pivot of the whole table, then a block per group: the order of the cases in a block (which the bootstrap
    # resamples) is the pivot's.
    values = sorted({m for group_metrics in metrics.values() for m in group_metrics} & set(per_case.columns))
    wide = per_case.pivot_table(index=[*by, "case_id"], columns="method", values=values, sort=False)
    rows = []
    for key, group_metrics in metrics.items():
        for metric in group_metrics:
            if metric not in wide.columns.get_level_values(0):
                continue
            block = wide.loc[key if len(key) > 1 else key[0], metric]
            for baseline in baselines:
                if baseline not in block.columns or block[baseline].isna().all():
                    continue  # a method this group was not scored with (e.g. one the paper runs on one task only)
                d = paired_difference(block[method], block[baseline], lower_is_better=metric in LOWER_IS_BETTER,
                                      seed=seed)
                rows.append({**dict(zip(by, key)), "metric": metric, baseline_column: baseline, **d, "method": method})
    return pd.DataFrame(rows)


def preference(scores, method: str, against: str, metrics: dict[tuple, Sequence[str]], by: Sequence[str], *,
               n_boot: int = 1000, seed: int = 0):
    """How often the referees prefer `method`'s sample to `against`'s sample of the same case, prompt and noise.

    scores: `compare`'s per-sample table with the columns by..., method, sample, case_id and the metrics (samples
    with the same `sample` index share case, prompt and noise whatever the method). metrics: {group key (a tuple of
    the `by` values): its metrics}, as for `paired_differences`. Each pair scores 1 when `method`'s value is the
    better one (LOWER_IS_BETTER turned around), 0 when it is the worse one and 0.5 on a tie; a case's preference is
    the mean over its pairs, and the share is the mean over cases with a percentile-bootstrap interval over cases
    (the pairs of one case share a LoRA, so they are not independent draws). Returns a DataFrame with one row per
    (group, metric): by..., metric, method, against, share, ci_low, ci_high, cases, pairs.
    """
    import pandas as pd

    rows = []
    for key, group_metrics in metrics.items():
        mask = np.ones(len(scores), dtype=bool)
        for column, value in zip(by, key):
            mask &= (scores[column] == value).to_numpy()
        block = scores[mask & scores.method.isin([method, against]).to_numpy()]
        for metric in group_metrics:
            if metric not in block or block[metric].isna().all():
                continue
            wide = block.pivot_table(index=["case_id", "sample"], columns="method", values=metric, sort=False)
            if method not in wide or against not in wide:
                continue
            wide = wide.dropna()
            ahead = wide[method] - wide[against]
            if metric in LOWER_IS_BETTER:
                ahead = -ahead
            wins = np.where(ahead > 0, 1.0, np.where(ahead < 0, 0.0, 0.5))
            per_case = pd.Series(wins, index=wide.index).groupby(level="case_id", sort=False).mean()
            share, lo, hi = bootstrap_ci(per_case.to_numpy(), n=n_boot, seed=seed)
            rows.append({**dict(zip(by, key)), "metric": metric, "method": method, "against": against,
                         "share": share, "ci_low": lo, "ci_high": hi, "cases": len(per_case), "pairs": len(wins)})
    return pd.DataFrame(rows)


def setting_metrics(settings: Sequence[tuple[str, str, str]], splits: Sequence[str] = ()) -> dict[tuple, list[str]]:
    """The metrics `paired_differences` compares per group: each setting's (name, task, kind) task metrics and
    denoise, keyed (setting,) or, with splits, (setting, split) for each split."""
    metrics = {}
    for setting, task, _ in settings:
        for key in ([(setting, split) for split in splits] if splits else [(setting,)]):
            metrics[key] = [*METRICS[task], "denoise"]
    return metrics
