"""`lofa bench zoo-size`: quality against the number of training LoRAs (the paper's Fig. 8).

One world, one zoo with a LoRA for every case, and then one run per zoo size: every held-out LoRA and a share of
the training ones (`ZooConfig.max_cases`, the zoo's seeded round-robin over the coarse categories). A size's run
links the big zoo's LoRA files, its base, evaluators and condition encoder instead of training them again, so
every size reads the same LoRAs and is scored by the same referees. At each size LoFA, Text-to-LoRA and the
single-stage ablation ("w/o response") are trained on that zoo with the scale's recipes, and notebook 07's protocol
scores them beside the per-case LoRA and the reference predictors (mean, nearest, ridge LoRA) on the same held-out
cases, prompts and noise at every size, and on as many training cases of that size's zoo; each method's ΔW is also
compared with the case's per-case LoRA (dW_cosine, dW_magnitude: cosine and norm ratio, as Stage II's curves).

--n-cases enlarges the scale's world for the sweep (`world.<task>: {n_cases: N}`, identities only: the other
worlds are products of their component lists): the mini identities world holds 160 identities (128 for training),
too few to see a trend, and draws up to 800 under its distinctness rule.

    lofa bench zoo-size --scale mini --task identities --n-cases 800 --fractions 0.125 0.25 0.5 1 \\
        --device cuda --run-root runs/zoo-size --out zoo_size.csv
    python -m lofa.bench.zoo_size ...       # the same command

Writes --out (one row per size, setting, split, method and metric: mean and 95 % interval over cases) and, beside
it, <out>_verdicts.csv (LoFA minus each other method, paired over cases), Markdown twins of both and <out>.png (the
figure: exact-case recognition against training LoRAs). Resumes: every size's run folder caches its trainings.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from lofa.bench.linked import DELTA_METRICS, REFERENCES, build_side_by_side, linked_run, method_comparison
from lofa.errors import LofaError
from lofa.io import atomic_path

# The methods scored at every size: the three the paper's Fig. 8 draws, and the references that say what their
# numbers mean.
SINGLE_STAGE = "w/o response"
METHODS = ("base", "per-case LoRA", "LoFA", "Text-to-LoRA", SINGLE_STAGE, "mean LoRA", "nearest LoRA", "ridge LoRA")


def zoo_sizes(n_train: int, fractions) -> list[int]:
    """Training LoRAs per size: round(f · n_train) for each fraction f in (0, 1], at least 1, ascending, distinct."""
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise LofaError(f"zoo-size fractions must lie in (0, 1]; got {bad[0]}")
    return sorted({max(1, round(f * n_train)) for f in fractions})


def size_run(full, task: str, n_train: int, root: Path):
    """The Run of one zoo size: `full`'s scale, device, seed and overrides, a zoo capped at every held-out case plus
    n_train training cases, and `full`'s base, evaluators, condition encoder and LoRA files linked in."""
    max_cases = len(full.world(task).ids("heldout")) + n_train
    return linked_run(full, task, root / f"train-{n_train}", max_cases=max_cases)


def size_comparison(run, setting: str, cases_per_split: int, per_case: int, seeds, *, seed: int = 0) -> pd.DataFrame:
    """Notebook 07's comparison of `METHODS` for one setting of one size's run -> the per-sample `compare` table
    with a setting column and the methods' ΔW fidelity (`linked.method_comparison`)."""
    learned = {"LoFA": run.hypernet(setting), "Text-to-LoRA": run.text_to_lora(setting),
               SINGLE_STAGE: run.hypernet(setting, variant="no_response")}
    return method_comparison(run, setting, learned, cases_per_split, per_case, seeds, seed=seed,
                             references=[m for m in METHODS if m in REFERENCES])


def zoo_size_study(full, task: str, sizes: list[int], root: Path, cases_per_split: int, per_case: int, *,
                   seed: int = 0, workers: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fig. 8's data for `task` -> (quality, verdicts): per size ("train LoRAs"), setting, split, method and metric
    the mean over cases with a 95 % interval (`evaluate.summarize`), and LoFA minus every other method paired over
    cases (`evaluate.paired_differences`). `full`: a Run whose zoo of `task` holds every case (built here first).
    workers > 1 trains that many sizes side by side, one process each (a GPU's small-model steps are launch-bound)."""
    from lofa.evaluate import EvalSeeds, case_means, paired_differences, setting_metrics, summarize
    from lofa.run import SETTINGS

    settings = [s for s in SETTINGS if s[1] == task]
    for step in ("evaluators", "condition_encoder"):
        full.build([(step, task)])
    full.zoo(task)
    runs = {n: size_run(full, task, n, root) for n in sizes}
    jobs = [(step, key) for name, *_ in settings
            for step, key in (("stage2", f"{name}/lofa"), ("text_to_lora", name), ("stage2", f"{name}/no_response"))]
    build_side_by_side([(run, jobs) for run in runs.values()], workers)
    frames = []
    for n, run in runs.items():
        for name, *_ in settings:
            # each size's scores are kept in its run folder: an interrupted sweep resumes at the next size
            scored = run.path("figures", f"zoo_size_scores_{name}.csv")
            if scored.exists():
                table = pd.read_csv(scored)
            else:
                table = size_comparison(run, name, cases_per_split, per_case, EvalSeeds.of(seed), seed=seed)
                scored.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(scored) as tmp:
                    table.to_csv(tmp, index=False)
            frames.append(table.assign(**{"train LoRAs": n}))
    scores = pd.concat(frames, ignore_index=True)
    by = ("train LoRAs", "setting", "method")
    per_case_table = case_means(scores.drop(columns="sample"), by=by)
    metrics = [m for m in [*setting_metrics(settings)[(settings[0][0],)], *DELTA_METRICS] if m in per_case_table]
    quality = summarize(per_case_table, metrics, by=("train LoRAs", "setting", "split", "method"), seed=seed)
    verdicts = pd.concat([
        paired_differences(block, "LoFA", [m for m in METHODS if m != "LoFA"],
                           {key: metrics for key in [(s[0], split) for s in settings for split in ("heldout", "train")]},
                           by=("setting", "split"), baseline_column="reference", seed=seed).assign(**{"train LoRAs": n})
        for n, block in per_case_table.groupby("train LoRAs")], ignore_index=True)
    return quality, verdicts


def cli_bench_zoo_size(args) -> int:
    """`lofa bench zoo-size`: args.scale, task, n_cases, fractions, cases, per_case, device, seed, overrides,
    run_root, workers, out."""
    from lofa.config import load_overrides
    from lofa.outputs import save_figure, save_table, set_theme
    from lofa.run import Run
    from lofa.viz import zoo_size_curves

    if args.n_cases is not None and args.task != "identities":
        raise LofaError(f"--n-cases enlarges the identities world only; the {args.task} world is the product of its "
                        "component lists (change them in an overrides file instead)")
    overrides = load_overrides(args.overrides)
    if args.n_cases is not None:
        overrides[f"world.{args.task}"] = {**(overrides.get(f"world.{args.task}") or {}), "n_cases": args.n_cases}
    root = Path(args.run_root)
    full = Run(args.scale, args.device, args.seed, root / "all", overrides=overrides)
    full.one_thread_on_cpu()  # tiny models: as in the notebooks, one intra-op thread (workers set their own)
    sizes = zoo_sizes(len(full.world(args.task).ids("train")), args.fractions)
    print(f"zoo-size sweep ({args.task}, {args.scale}): training LoRAs {sizes}, "
          f"{len(full.world(args.task).ids('heldout'))} held-out cases", flush=True)
    quality, verdicts = zoo_size_study(full, args.task, sizes, root, args.cases, args.per_case, seed=args.seed,
                                       workers=args.workers)
    out = Path(args.out).with_suffix(".csv")
    save_table(quality, out)
    save_table(verdicts, out.with_name(out.stem + "_verdicts.csv"))
    set_theme()
    save_figure(zoo_size_curves(quality, [m for m in METHODS if m != "base"]), out.with_suffix(".png"))
    table = quality[quality.metric == "acc"].pivot_table(index=["setting", "split", "method"], columns="train LoRAs",
                                                         values="mean", sort=False)
    print("exact-case recognition by training LoRAs:\n" + table.round(3).to_string())
    return 0


if __name__ == "__main__":  # python -m lofa.bench.zoo_size ARGS = lofa bench zoo-size ARGS
    from lofa.cli import bench_main

    sys.exit(bench_main("zoo-size"))
