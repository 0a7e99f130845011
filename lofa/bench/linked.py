"""What the studies of `lofa bench` share: variant runs linked to one upstream run, and the scoring of their methods.

A study (`zoo_size`, `tau`) trains hypernetworks in several run folders that differ in one config (the zoo's size,
Stage I's τ) and must see the same world, base, evaluators, condition encoders and LoRA files: each variant's run
hard-links them from the upstream run instead of training them again (`linked_run`), so every variant is scored
by the same referees on the same zoo. `method_comparison` then scores the learned methods of one setting beside the
per-case LoRA and the reference predictors with notebook 07's protocol.

    run = linked_run(upstream, "identities", root / "tau-identities", {"HyperConfig": {"tau": 0.05}})
    table = method_comparison(run, "identities", {"LoFA": run.hypernet("identities")}, 24, 2, EvalSeeds.of(0))
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

# Beside the scores of the samples: each method's ΔW against the case's per-case LoRA (cosine, norm ratio).
DELTA_METRICS = ("dW_cosine", "dW_magnitude")
# The reference predictors a study scores beside its learned methods (`baselines.reference_loras`' names).
REFERENCES = ("mean LoRA", "nearest LoRA", "ridge LoRA")


def link_tree(source: Path, target: Path) -> None:
    """Hard-link copy of a finished artifact folder (a copy where links are refused), unless target exists."""
    if target.exists():
        return
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, tmp, copy_function=link)
    tmp.rename(target)


def linked_run(upstream, task: str, run_dir: Path, overrides: Mapping | None = None, max_cases: int | None = None):
    """The Run in run_dir with `upstream`'s scale, device, seed and overrides plus `overrides` (config name ->
    fields, merged into upstream's), whose base, evaluators and condition encoder of `task` and whose LoRA files
    (every case the zoo selects, all of them unless `max_cases` caps it: `ZooConfig.max_cases`) are upstream's,
    linked. upstream's zoo of `task` must be built."""
    from lofa.lora.zoo import LORA_DIR, lora_filename, select_cases
    from lofa.run import Run

    merged = {name: dict(fields) for name, fields in upstream.overrides.items()}
    for name, fields in {**(overrides or {}), **({"ZooConfig": {"max_cases": max_cases}} if max_cases else {})}.items():
        merged[name] = {**merged.get(name, {}), **fields}
    run = Run(upstream.scale, upstream.device, upstream.seed, run_dir, overrides=merged, pretrained=upstream.pretrained)
    for part in ("base", "evaluators", "encoders"):
        link_tree(upstream.path(part, task), run.path(part, task))
    lora_dir = run.path("zoo", task, LORA_DIR)
    lora_dir.mkdir(parents=True, exist_ok=True)
    for case in select_cases(run.world(task), max_cases, upstream.seed):
        target = lora_dir / lora_filename(case)
        if not target.exists():
            os.link(upstream.path("zoo", task, LORA_DIR, lora_filename(case)), target)
    return run


def method_comparison(run, setting: str, learned: Mapping, cases_per_split: int, per_case: int, seeds, *,
                      seed: int = 0, references: Sequence[str] = REFERENCES) -> pd.DataFrame:
    """Notebook 07's protocol for one setting of `run`: the base, the per-case LoRA, each of `learned` ({method name:
    a predictor `predict_cases` takes, e.g. `run.hypernet(setting)`}) and `references` on up to `cases_per_split`
    held-out and as many training cases (`report.comparison_cases`), the same prompts and noise for every method
    (`evaluate.compare`) -> the per-sample table with a setting column and, per method and case, `DELTA_METRICS`
    against the case's per-case LoRA (NaN for the base and the per-case LoRA itself)."""
    from lofa.baselines import reference_loras
    from lofa.evaluate import GenerateConfig, compare
    from lofa.hypernet.data import delta_fidelity_per_case
    from lofa.hypernet.predictor import predict_cases
    from lofa.hypernet.report import comparison_cases
    from lofa.run import parse_setting

    _, task, _ = parse_setting(setting)
    data = run.triplets(setting)
    cases = comparison_cases(data, task, cases_per_split, seed)
    found, _ = reference_loras(data, cases)
    bank = data.conditions("eval")
    methods = {"base": None, "per-case LoRA": {c: data.zoo.load(c)[0] for c in cases},
               **{name: predict_cases(model, bank, cases) for name, model in learned.items()},
               **{name: found[name] for name in references}}
    table = compare(run.base(task), run.world(task), run.evaluators(task), methods, cases, per_case=per_case,
                    seeds=seeds, cfg=run.config(GenerateConfig))
    fidelity = []
    for name, loras in methods.items():
        if loras is None or name == "per-case LoRA":
            continue
        cosine, magnitude = delta_fidelity_per_case(data, cases, [loras[c] for c in cases])
        fidelity += [{"method": name, "case_id": c, "dW_cosine": float(cos), "dW_magnitude": float(mag)}
                     for c, cos, mag in zip(cases, cosine, magnitude)]
    table = table.merge(pd.DataFrame(fidelity), on=["method", "case_id"], how="left")
    return table.assign(setting=setting)


def _build_in_worker(args: tuple, jobs: list[tuple[str, str]]) -> None:
    """In a worker process: one run's `jobs`, in order (e.g. a single stage after LoFA's Stage I exists)."""
    import torch

    from lofa.run import Run

    torch.set_num_threads(1)  # side-by-side processes: each one's intra-op threads would only contend
    Run(*args).build(jobs, workers=1)


def build_side_by_side(work: Sequence[tuple], workers: int = 1) -> None:
    """[(run, jobs), ...]: each run's `Run.build` jobs, in order within a run; with workers > 1 the runs side by side,
    one process each (a GPU's small-model steps are launch-bound, a CPU's cores idle under one single-threaded run).
    Independent runs only: no two may write one artifact."""
    if workers <= 1 or len(work) <= 1:
        for run, jobs in work:
            run.build(jobs, workers=1)
        return
    from lofa.workers import process_pool

    with process_pool(min(workers, len(work))) as pool:  # each worker ends itself if this process dies
        for future in [pool.submit(_build_in_worker, run.args(), jobs) for run, jobs in work]:
            future.result()
