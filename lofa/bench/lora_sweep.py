"""`lofa bench sweep`, the LoRA recipe sweep: how often samples from a case's LoRA are recognised as that exact case,
as a fraction of how often ground-truth renders of it are (issue 4's target: >= 0.5), for several recipes on every
task.

    lofa bench sweep --run-dir runs/mini [--scale mini] [--device cuda] [--tasks actions ...]
                     [--steps 100 200 400 800] [--knobs] [--set FIELD=VALUE ...] [--cases 48]
                     [--per-case 2] [--replicates] --out FILE.csv      # or: python -m lofa.bench.lora_sweep ...

The protocol is notebook 03's section 3 on the run's own bases and evaluators (trained if missing): the zoo's
selection of cases (every held-out case, then train cases up to `--cases`), `--per-case` samples each with the case's
train phrasings and fixed noise seeds, scored by the ground-truth-trained referee; the ratio's interval is a
bootstrap over cases. A point is the task's recipe at this scale (`LoraTrainConfig` preset, its task_overrides
resolved) with the steps changed, or with `--knobs` one other knob moved: lr x 2.5, rank x 2, batch x 4.
`--set` changes the recipe under every point (e.g. `--set include_ffn=true batch_size=8`); the labels say so.
The CSV is rewritten atomically after every point and finished points are skipped on a rerun, so an interrupted
sweep resumes. Several processes can split a sweep (different --tasks / --steps, different --out) on one GPU.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from lofa.errors import LofaError
from lofa.io import atomic_path


def points(cfg, steps: list[int], knobs: bool, fixed: dict | None = None) -> dict[str, dict]:
    """Sweep points {label: overrides of the task's recipe `cfg`}; `fixed` ({field: value}) goes under every point
    (knobs move from the recipe with `fixed` applied) and is named in every label."""
    fixed = fixed or {}
    cfg = dataclasses.replace(cfg, **fixed)
    out = {f"{s} steps": {"steps": s} for s in steps}
    if knobs:
        out.update({"lr x 2.5": {"lr": cfg.lr * 2.5}, "rank x 2": {"rank": cfg.rank * 2, "alpha": cfg.alpha * 2},
                    "batch x 4": {"batch_size": cfg.batch_size * 4}})
    suffix = ", ".join(f"{k}={v}" for k, v in fixed.items())
    return {(f"{k} | {suffix}" if suffix else k): {**fixed, **v} for k, v in out.items()}


def parse_set(items: list[str], cfg_cls) -> dict:
    """["include_ffn=true", "batch_size=8", "lr=1e-3"] -> {"include_ffn": True, "batch_size": 8, "lr": 0.001}: each
    value converted to the type of the field's default; an unknown field or a value of the wrong kind is a
    LofaError."""
    import yaml

    defaults = cfg_cls()
    fields = {f.name for f in dataclasses.fields(cfg_cls)} - {"task_overrides", "group_size"}
    out = {}
    for item in items:
        name, eq, text = item.partition("=")
        if not eq or not text:
            raise LofaError(f"--set takes FIELD=VALUE, not {item!r}")
        if name not in fields:
            raise LofaError(f"--set: {cfg_cls.__name__} has no field {name!r}; fields: {', '.join(sorted(fields))}")
        kind = type(getattr(defaults, name))
        try:
            value = yaml.safe_load(text) if kind is bool else kind(text)  # bool("false") would be True
        except ValueError:
            value = None
        if not isinstance(value, kind):
            raise LofaError(f"--set {name}: {text!r} is not of type {kind.__name__}")
        out[name] = value
    return out


def sweep_task(run, task: str, steps: list[int], knobs: bool, n_cases: int, per_case: int, done: set, seed: int = 0,
               progress: bool = True, fixed: dict | None = None, replicates: bool = False):
    """Yield one result row per sweep point of `task` (`points`, with `fixed` under each) not in `done`
    ({(task, label)}). replicates: also train each case's LoRA a second time on new renders and report the ΔW
    cosine between a case's two LoRAs and between different cases' (`lofa.bench.lora_replicates`)."""
    from lofa.bench.lora_replicates import replicate_cosine
    from lofa.evaluate import GenerateConfig, denoising_loss, eval_plan, generate, ratio_of_means, score_cases
    from lofa.lora.batched import train_lora_batch
    from lofa.lora.train import LoraTrainConfig
    from lofa.lora.zoo import ZooConfig, quality_seeds, select_cases
    from lofa.models import TextEncoder

    recipe = run.config(LoraTrainConfig).for_task(task)
    todo = {k: v for k, v in points(recipe, steps, knobs, fixed).items() if (task, k) not in done}
    if not todo:
        return
    world, gen, ev = run.world(task), run.base(task, progress=progress), run.evaluators(task)
    text = TextEncoder(run.device)
    zoo_cases = select_cases(world, run.config(ZooConfig).max_cases, seed)
    cases = select_cases(world, n_cases, seed, among=zoo_cases)
    # notebook 03's seeds, so a sweep point equal to the preset scores the zoo's own protocol
    sample_seed, gt_seed, ref_seed, denoise_seed = quality_seeds(seed)
    ids, prompts, seeds = eval_plan(world, cases, per_case, seed=sample_seed)
    gen_cfg = run.config(GenerateConfig)

    def per_case_acc(samples):
        s = score_cases(ev, world, ids, samples, prompts, reference_seed=ref_seed)
        return s.groupby("case_id").acc.mean().reindex(cases).to_numpy(), float(s.coarse_acc.mean())

    gt_acc, _ = per_case_acc(world.render(ids, seed=gt_seed))
    base_acc, _ = per_case_acc(generate(gen, world, ids, None, prompts, seeds, cfg=gen_cfg, text=text,
                                        progress=False))
    base_denoise = float(np.mean(denoising_loss(gen, world, ids, None, prompts, denoise_seed, text=text)))
    for label, overrides in tqdm(todo.items(), desc=f"LoRA sweep ({task})", disable=not progress):
        cfg = dataclasses.replace(recipe, **overrides, group_size=len(cases))
        start = time.perf_counter()
        trained = train_lora_batch(gen, world, cases, cfg, seed, run.device, text=text)
        train_s = time.perf_counter() - start
        loras = {info["case_id"]: w for w, info in trained}
        routed = [loras[c] for c in ids]
        acc, coarse = per_case_acc(generate(gen, world, ids, routed, prompts, seeds, cfg=gen_cfg, text=text,
                                            progress=False))
        ratio, lo, hi = ratio_of_means(acc, gt_acc, seed=seed)
        denoise = float(np.mean(denoising_loss(gen, world, ids, routed, prompts, denoise_seed, text=text)))
        agreement = {}
        if replicates:
            r = replicate_cosine(gen, world, cases, cfg, seed, run.device, text=text, new_renders=True,
                                 first=[w for w, _ in trained])
            agreement = {"replicate cosine": r["same_case"], "other-case cosine": r["other_case"]}
        yield {"task": task, "point": label, "preset": dataclasses.replace(cfg, group_size=recipe.group_size) == recipe,
               "steps": cfg.steps, "lr": cfg.lr, "rank": cfg.rank, "batch_size": cfg.batch_size,
               "include_ffn": cfg.include_ffn, "cases": len(cases), "samples per case": per_case,
               "gt acc": gt_acc.mean(), "base acc": base_acc.mean(), "LoRA acc": acc.mean(), "ratio": ratio,
               "ratio ci_low": lo, "ratio ci_high": hi, "LoRA coarse acc": coarse,
               "denoise reduction": 1 - denoise / base_denoise,
               "final loss": float(np.mean([info["final_loss"] for _, info in trained])),
               "cost (LoRA-steps x batch, x preset)": cfg.steps * cfg.batch_size / (recipe.steps * recipe.batch_size),
               "train s": train_s, **agreement}


def cli_bench_sweep(args) -> int:
    """`lofa bench sweep`: args.run_dir, scale, device, tasks, steps, knobs, set, cases, per_case, replicates, seed,
    out. One line per finished point; the CSV holds every point's row."""
    from lofa.config import resolve_device
    from lofa.lora.train import LoraTrainConfig
    from lofa.run import Run

    if min(args.steps, default=1) < 1 or args.cases < 1 or args.per_case < 1:
        raise LofaError("--steps, --cases and --per-case must be positive")
    fixed = parse_set(args.set, LoraTrainConfig)
    run = Run(args.scale, resolve_device(args.device), args.seed, args.run_dir)
    out = Path(args.out)
    table = pd.read_csv(out) if out.exists() else pd.DataFrame()
    done = set(zip(table.task, table.point)) if len(table) else set()
    for task in args.tasks:
        for row in sweep_task(run, task, args.steps, args.knobs, args.cases, args.per_case, done, args.seed,
                               fixed=fixed, replicates=args.replicates):
            table = pd.concat([table, pd.DataFrame([row])], ignore_index=True)
            with atomic_path(out) as tmp:
                table.to_csv(tmp, index=False, float_format="%.4g")
            print(f"{task:10s} {row['point']:24s} ratio {row['ratio']:.2f} [{row['ratio ci_low']:.2f}, "
                  f"{row['ratio ci_high']:.2f}]  LoRA {row['LoRA acc']:.2f}  ground truth {row['gt acc']:.2f}  "
                  f"base {row['base acc']:.2f}  train {row['train s']:.0f} s"
                  + (f"  replicate cos {row['replicate cosine']:.3f} other {row['other-case cosine']:.3f}"
                     if args.replicates else ""), flush=True)
    return 0


if __name__ == "__main__":  # python -m lofa.bench.lora_sweep ARGS = lofa bench sweep ARGS
    from lofa.cli import bench_main

    sys.exit(bench_main("sweep"))
