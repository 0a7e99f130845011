"""Does each LoRA of the zoo teach its case? Notebook 03's tables: what the zoo holds and cost, and its LoRAs' samples
against the base model's and ground truth's.

    summary = summarize_zoos(run, zoos, build_s)                                 # 03_zoo_summary.csv
    scores, frechet, shown = quality_scores(run, zoos, max_cases=12, per_case=2)
    per_case = case_means(scores, by=("task", "method"))
    quality = quality_table(per_case, frechet, seed=0)                          # 03_lora_quality.csv
    target = target_table(per_case, seed=0)                                     # 03_lora_target.csv

Samples of the base and of the case's LoRA share their prompts (training phrasings) and noise seeds
(`lofa.evaluate.compare`, seeds from `lofa.lora.zoo.quality_seeds`), so per-case differences are paired.
"""
from __future__ import annotations

from typing import Mapping

import pandas as pd

from lofa.evaluate import METRICS, EvalSeeds, GenerateConfig, compare, ratio_of_means, summarize
from lofa.lora.zoo import quality_seeds, select_cases

# The per-sample metric of each task in the paper's Tables 1-3.
PAPER_METRIC = {"actions": "clip_t", "styles": "csd", "identities": "face_sim"}
# The target: LoRA samples recognised as their exact case at least this share as often as ground truth.
TARGET = 0.5
METHODS = ("ground truth", "base", "LoRA")


def summarize_zoos(run, zoos: Mapping, build_s: float) -> pd.DataFrame:
    """One row per task's zoo ({task: Zoo}): its cases and LoRAs by split, the recipe (rank, alpha, steps, lr,
    batch, group), modules and numbers per LoRA, mean final loss, seconds per LoRA, the zoo's total minutes, and
    `build_s` (this run's wall time for all zoos) in minutes."""
    rows = []
    for task, zoo in zoos.items():
        frame, cfg = zoo.frame(), zoo.config
        weights, _ = zoo.load(zoo.case_ids()[0])
        rows.append({"task": task, "world cases": len(run.world(task).cases), "LoRAs": len(zoo),
                     "train": len(zoo.case_ids("train")), "held-out": len(zoo.case_ids("heldout")),
                     "rank": cfg.rank, "alpha": cfg.alpha, "steps": cfg.steps, "lr": cfg.lr,
                     "batch": cfg.batch_size, "group": cfg.group_size, "modules": len(weights),
                     "numbers per LoRA": sum(f.A.numel() + f.B.numel() for f in weights.values()),
                     "final loss": frame.final_loss.mean(), "s per LoRA": frame.wall_time_s.mean(),
                     "total min": frame.wall_time_s.sum() / 60, "this run min (3 zoos, wall)": build_s / 60})
    return pd.DataFrame(rows)


def zoo_verdicts(summary: pd.DataFrame) -> list[str]:
    """One line per zoo of `summarize_zoos`: LoRAs by split and what they cost."""
    return [f"zoo {r['task']}: {r['LoRAs']} LoRAs ({r['train']} train, {r['held-out']} held-out) of "
            f"{r['world cases']} cases, {r['s per LoRA']:.2f} s a LoRA, {r['total min']:.1f} min in all"
            for r in summary.to_dict("records")]


def quality_cases(run, zoos: Mapping, max_cases: int) -> dict[str, list[int]]:
    """The cases scored per task: every held-out case with a LoRA, then training cases up to `max_cases`
    (`select_cases` with the run's seed)."""
    return {task: select_cases(run.world(task), max_cases, run.seed, among=zoo.case_ids())
            for task, zoo in zoos.items()}


def quality_scores(run, zoos: Mapping, max_cases: int, per_case: int, shown: int = 4
                   ) -> tuple[pd.DataFrame, list[dict], dict]:
    """Ground truth, the base and each case's LoRA on the `quality_cases`, `per_case` samples a case with its
    training phrasings (`evaluate.compare`, split "train", seeds `quality_seeds(run.seed)`).

    Returns (scores, frechet, examples): scores one row per (task, method, sample) with the `compare` columns;
    frechet one dict per (task, method): the Fréchet distance (fvd for video, fid for images) of its samples to a
    second set of ground-truth renders; examples {task: (case names, {method: samples [k, *world.shape]})} of the
    first sample of the first `shown` held-out cases.
    """
    frames, frechet, examples = [], [], {}
    by_task = quality_cases(run, zoos, max_cases)
    for task, (frame, task_frechet, example) in zip(by_task, run.map(_task_quality, list(by_task), by_task, per_case,
                                                                     shown)):
        frames.append(frame)
        frechet += task_frechet
        examples[task] = example
    return pd.concat(frames, ignore_index=True), frechet, examples


def _task_quality(run, task: str, by_task: Mapping, per_case: int, shown: int) -> tuple[pd.DataFrame, list[dict], tuple]:
    """`quality_scores` of one task (a `Run.map` job; by_task: {task: its quality cases})."""
    sample, ground_truth, reference, denoise = quality_seeds(run.seed)
    seeds = EvalSeeds(sample=sample, reference=reference, ground_truth=ground_truth, denoise=denoise)
    cases = by_task[task]
    world, ev, zoo = run.world(task), run.evaluators(task), run.zoo(task, progress=False)
    loras = {c: zoo.load(c, run.device)[0] for c in cases}
    table, samples = compare(run.base(task), world, ev, {"base": None, "LoRA": loras}, cases, per_case=per_case,
                             seeds=seeds, split="train", cfg=run.config(GenerateConfig), return_samples=True)
    ids = table[table.method == "ground truth"].case_id.tolist()
    real = world.render(ids, seed=ground_truth + 1)
    frechet = [{"task": task, "method": method, "split": "all", "metric": "fvd" if world.modality == "video" else "fid",
                "mean": ev.frechet(samples[method], real), "cases": len(cases)} for method in METHODS]
    first = [ids.index(c) for c in world.ids("heldout") if c in cases][:shown]  # first sample of each
    example = ([world.cases[ids[i]].name for i in first], {m: samples[m][first] for m in METHODS})
    return table.drop(columns="sample").assign(task=task), frechet, example


def quality_table(per_case: pd.DataFrame, frechet: list[dict], seed: int = 0) -> pd.DataFrame:
    """Means over cases with bootstrap intervals of every task's metrics and denoise, per (task, method) over all
    cases (split "all") and per split, then the Fréchet distances -> columns task, split, method, metric, mean,
    ci_low, ci_high, cases. per_case: `case_means` of `quality_scores`' scores by (task, method)."""
    tasks = per_case.task.unique()
    metrics = list(dict.fromkeys([m for task in tasks for m in METRICS[task]] + ["denoise"]))
    quality = pd.concat([summarize(per_case, metrics, by=("task", "method"), seed=seed).assign(split="all"),
                         summarize(per_case, metrics, by=("task", "method", "split"), seed=seed),
                         pd.DataFrame(frechet)], ignore_index=True)
    return quality[["task", "split", "method", "metric", "mean", "ci_low", "ci_high", "cases"]]


def per_case_wide(per_case: pd.DataFrame) -> pd.DataFrame:
    """`case_means` by (task, method) as one row per (task, case_id, split) and one column per (metric, method),
    for acc, denoise and the paper metrics."""
    paper = dict.fromkeys(PAPER_METRIC[task] for task in per_case.task.unique())  # the tasks present (a run of some)
    return per_case.pivot_table(index=["task", "case_id", "split"], columns="method",
                                values=["acc", "denoise", *paper]).reset_index()


def target_table(per_case: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per task: exact-case recognition of ground truth, base and LoRA samples, the ratio LoRA / ground truth with
    its bootstrap interval against TARGET, the shares of cases the LoRA improved / left / worsened, and the mean
    per-case gain in the paper metric and reduction of the denoising loss (1 - LoRA / base)."""
    wide = per_case_wide(per_case)
    rows = []
    for task in per_case.task.unique():
        w = wide[wide.task == task]
        acc = w["acc"]
        ratio, lo, hi = ratio_of_means(acc["LoRA"].to_numpy(), acc["ground truth"].to_numpy(), seed=seed)
        gain = acc["LoRA"] - acc["base"]
        metric = PAPER_METRIC[task]
        paper_gain = w[metric]["LoRA"] - w[metric]["base"]
        denoise_gain = 1 - w["denoise"]["LoRA"] / w["denoise"]["base"]
        rows.append({"task": task, "cases": len(w), "gt acc": acc["ground truth"].mean(),
                     "base acc": acc["base"].mean(), "LoRA acc": acc["LoRA"].mean(), "ratio": ratio,
                     "ratio ci_low": lo, "ratio ci_high": hi, "target": TARGET, "met": bool(ratio >= TARGET),
                     "cases improved": (gain > 0).mean(), "cases same": (gain == 0).mean(),
                     "cases worse": (gain < 0).mean(), "paper metric": metric,
                     "paper metric gain": paper_gain.mean(), "cases paper metric improved": (paper_gain > 0).mean(),
                     "denoise reduction": denoise_gain.mean(), "cases denoise improved": (denoise_gain > 0).mean()})
    return pd.DataFrame(rows)


def target_verdicts(target: pd.DataFrame) -> list[str]:
    """One line per task of `target_table`: the ratio against the target and the per-case gains."""
    return [f"quality {r['task']}: LoRA samples recognised as their exact case {r['LoRA acc']:.2f} of the time, ground "
            f"truth {r['gt acc']:.2f}, base {r['base acc']:.2f} -> ratio {r['ratio']:.2f} [{r['ratio ci_low']:.2f}, "
            f"{r['ratio ci_high']:.2f}] vs target >= {TARGET}: {'MET' if r['met'] else 'NOT MET'}; exact-case "
            f"recognition improved on {r['cases improved']:.0%} of cases (same {r['cases same']:.0%}, worse "
            f"{r['cases worse']:.0%}); {r['paper metric']} {r['paper metric gain']:+.3f} "
            f"(improved on {r['cases paper metric improved']:.0%}); denoising loss on fresh renders "
            f"{-r['denoise reduction']:+.0%} (lower on {r['cases denoise improved']:.0%} of cases)"
            for r in target.to_dict("records")]
