"""`lofa bench tau`: Stage I's threshold τ, the paper's 2 % against a τ per task that gives the paper's sparsity.

The paper's τ = 2 % leaves 50–80 % of a Wan2.1 LoRA's entries below it. On the miniature's zoos it leaves 5–16 %
(notebook 04): every response map is nearly full, and a condition-blind mean map predicts it as well as Stage I
does (notebook 05). This study trains LoFA twice on one zoo, its Stage I on the maps at τ = 2 % (the upstream run,
the pipeline's configuration) and at each task's sparsity τ (the `below`-quantile of the training LoRAs' relative
change |ΔW| / |W|, `Triplets.sparsity_tau`; `below` 0.65 is the middle of the paper's band), and scores both:

- Stage I against the mean training map at its own τ (notebook 05's table, `fidelity.stage1_heldout_maps`);
- the paper's map fidelity (Stage I vs truth, Stage II's implied map vs Stage I and vs truth; notebook 06);
- LoRA quality with notebook 07's protocol on held-out and training cases, the same prompts and noise for each
  method, beside the per-case LoRA and the mean, nearest and ridge LoRA, with each method's ΔW cosine and norm ratio
  to the case's per-case LoRA; and the paired differences of LoFA at the sparsity τ minus LoFA at 2 % and minus each
  reference.

    lofa bench tau --scale mini --device cpu --cases 24 --per-case 2 --run-root runs/tau \\
        --out figures/bench/tau_mini_cpu.csv
    python -m lofa.bench.tau ...       # the same command

Writes --out (quality: per setting, split, method and metric the mean and 95 % interval over cases),
<out>_verdicts.csv (paired differences), <out>_maps.csv (Stage I and map fidelity per setting and τ) and Markdown
twins of each. Resumes: the runs' folders cache every training and each setting's scores.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from lofa.bench.linked import DELTA_METRICS, REFERENCES, build_side_by_side, linked_run, method_comparison
from lofa.config import TAU
from lofa.errors import LofaError
from lofa.io import atomic_path

PAPER_TAU = "LoFA, τ = 2 %"       # the upstream run's LoFA (Stage I's maps at the paper's τ)
SPARSE_TAU = "LoFA, sparsity τ"   # LoFA whose Stage I learnt the maps at the task's sparsity τ
METHODS = ("base", "per-case LoRA", PAPER_TAU, SPARSE_TAU, *REFERENCES)


def variant_run(upstream, task: str, tau: float, root: Path):
    """The run whose Stage I of `task` trains on the maps at `tau`; upstream's base, evaluators, encoders, zoo."""
    return linked_run(upstream, task, root / f"tau-{task}", {"HyperConfig": {"tau": tau}})


def _score_setting(upstream, setting: str, variant_args: dict, cases_per_split: int, per_case: int,
                   seed: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """One setting (in a `Run.map` worker on the CPU): (samples table, Stage I map rows, map-fidelity rows)."""
    from lofa.evaluate import EvalSeeds
    from lofa.hypernet.fidelity import stage1_heldout_maps, stage2_map_fidelity
    from lofa.run import Run, parse_setting

    _, task, _ = parse_setting(setting)
    variant = Run(*variant_args[task])
    # each setting's results are kept in its variant run's folder: an interrupted study resumes at the next setting
    kept = [variant.path("figures", f"tau_{part}_{setting}.csv") for part in ("scores", "stage1", "fidelity")]
    if all(path.exists() for path in kept):
        return tuple(pd.read_csv(path) for path in kept)
    models = {PAPER_TAU: upstream.hypernet(setting), SPARSE_TAU: variant.hypernet(setting)}
    data = variant.triplets(setting)
    maps, fidelity = [], []
    for name, model in models.items():
        rows, _ = stage1_heldout_maps({setting: model.stage1}, {setting: data})
        maps.append(rows.assign(tau=model.stage1.cfg.tau, hypernet=name))
        _, rows = stage2_map_fidelity({setting: model}, {setting: data})
        fidelity.append(rows.assign(tau=model.stage1.cfg.tau, hypernet=name))
    table = method_comparison(variant, setting, models, cases_per_split, per_case, EvalSeeds.of(seed), seed=seed,
                              references=REFERENCES)
    results = (table, pd.concat(maps, ignore_index=True), pd.concat(fidelity, ignore_index=True))
    kept[0].parent.mkdir(parents=True, exist_ok=True)
    for path, frame in zip(kept, results):
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False)
    return results


def per_model_summary(rows: pd.DataFrame, summary, **kwargs) -> pd.DataFrame:
    """`summary(block, **kwargs)` of each (hypernet, setting) block of per-case rows (columns hypernet, setting,
    tau, ...), each result labelled with its hypernet and the τ its Stage I was trained with."""
    return pd.concat([summary(block, **kwargs).assign(hypernet=name, tau=block.tau.iloc[0])
                      for (name, _), block in rows.groupby(["hypernet", "setting"], sort=False)], ignore_index=True)


def tau_study(upstream, settings, below: float, root: Path, cases_per_split: int, per_case: int, *, seed: int = 0,
              workers: int = 1) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """The study for `settings` ((name, task, kind) as `lofa.run.SETTINGS`) -> (quality, verdicts, maps, taus).

    quality: per setting, split, method and metric the mean over cases and its 95 % interval (`evaluate.summarize`);
    verdicts: LoFA at the sparsity τ minus each other method, paired over cases (`evaluate.paired_differences`);
    maps: per setting, hypernet (`PAPER_TAU`, `SPARSE_TAU`) and τ, Stage I and the mean training map against the
    true maps (`fidelity.map_metric_summary`) and the paper's three map fidelities; taus: {task: sparsity τ}.
    workers > 1 trains the runs side by side (one process each) and scores the settings in `Run.map`'s workers."""
    from lofa.evaluate import case_means, paired_differences, setting_metrics, summarize
    from lofa.hypernet.fidelity import PAPER_FIDELITY, map_fidelity_summary, map_metric_summary

    tasks = list(dict.fromkeys(task for _, task, _ in settings))
    for task in tasks:
        upstream.build([("evaluators", task), ("condition_encoder", task)])
        upstream.zoo(task)
    first = {task: next(name for name, t, _ in settings if t == task) for task in tasks}
    taus = {task: upstream.triplets(first[task]).sparsity_tau(below) for task in tasks}
    variants = {task: variant_run(upstream, task, taus[task], root) for task in tasks}
    names = [name for name, *_ in settings]
    work = [(upstream, [("stage2", f"{name}/lofa") for name in names])]
    work += [(variants[task], [("stage2", f"{name}/lofa") for name, t, _ in settings if t == task]) for task in tasks]
    build_side_by_side(work, workers)

    results = upstream.map(_score_setting, names, {task: run.args() for task, run in variants.items()},
                           cases_per_split, per_case, seed, workers=workers)
    scores = pd.concat([r[0] for r in results], ignore_index=True)
    per_case_table = case_means(scores.drop(columns="sample"), by=("setting", "method"))
    metric_sets = setting_metrics(settings, splits=("heldout", "train"))
    metrics = list(dict.fromkeys(m for ms in metric_sets.values() for m in [*ms, *DELTA_METRICS]
                                 if m in per_case_table))
    quality = summarize(per_case_table, metrics, by=("setting", "split", "method"), seed=seed)
    verdicts = paired_differences(per_case_table, SPARSE_TAU, [m for m in METHODS if m != SPARSE_TAU],
                                  {key: [*ms, *DELTA_METRICS] for key, ms in metric_sets.items()},
                                  by=("setting", "split"), baseline_column="reference", seed=seed)
    stage1_table = per_model_summary(pd.concat([r[1] for r in results], ignore_index=True), map_metric_summary,
                                     seed=seed)
    fidelity_table = per_model_summary(pd.concat([r[2] for r in results], ignore_index=True), map_fidelity_summary,
                                       paper=PAPER_FIDELITY, seed=seed)
    maps = pd.concat([stage1_table.rename(columns={"predictor": "comparison"}), fidelity_table], ignore_index=True)
    return quality, verdicts, maps, taus


def cli_bench_tau(args) -> int:
    """`lofa bench tau`: args.scale, settings, below, cases, per_case, device, seed, overrides, run_root, workers,
    out."""
    from lofa.config import load_overrides
    from lofa.hypernet.config import HyperConfig
    from lofa.outputs import save_table
    from lofa.run import SETTINGS, Run

    if not 0 < args.below < 1:
        raise LofaError(f"--below is the share of entries below τ and must lie in (0, 1); got {args.below}")
    known = [name for name, *_ in SETTINGS]
    unknown = [s for s in args.settings if s not in known]
    if unknown:
        raise LofaError(f"unknown setting {unknown[0]!r}; choose from {', '.join(known)}")
    settings = [s for s in SETTINGS if s[0] in args.settings]
    upstream = Run(args.scale, args.device, args.seed, Path(args.run_root) / "tau-paper",
                   overrides=load_overrides(args.overrides))
    upstream.one_thread_on_cpu()  # tiny models: as in the notebooks, one intra-op thread (workers set their own)
    if upstream.config(HyperConfig).tau != TAU:
        raise LofaError(f"the upstream run's τ must be the paper's {TAU}; leave HyperConfig.tau out of --overrides")
    quality, verdicts, maps, taus = tau_study(upstream, settings, args.below, Path(args.run_root), args.cases,
                                              args.per_case, seed=args.seed, workers=args.workers)
    out = Path(args.out).with_suffix(".csv")
    save_table(quality, out)
    save_table(verdicts, out.with_name(out.stem + "_verdicts.csv"))
    save_table(maps, out.with_name(out.stem + "_maps.csv"))
    print("sparsity τ per task (a share of " f"{args.below:g} of the training LoRAs' entries below it): "
          + ", ".join(f"{task} {tau:.4g}" for task, tau in taus.items()))
    table = quality[quality.metric == "acc"].pivot_table(index=["setting", "split"], columns="method", values="mean",
                                                         sort=False)
    print("exact-case recognition:\n" + table.round(3).to_string())
    print("Stage I against the true maps (cosine):\n" + maps[maps.comparison.isin(["Stage I", "mean train map"])]
          .pivot_table(index=["setting", "hypernet"], columns="comparison", values="cosine", sort=False)
          .round(3).to_string())
    return 0


if __name__ == "__main__":  # python -m lofa.bench.tau ARGS = lofa bench tau ARGS
    from lofa.cli import bench_main

    sys.exit(bench_main("tau"))
