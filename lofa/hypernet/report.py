"""What notebooks 05 to 07 report about the trained hypernetwork, beyond map fidelity (`lofa.hypernet.fidelity`):
training overviews, LoFA's predicted LoRAs against the per-case LoRA and the base on held-out cases, the L1-on-ΔW
ablation, seconds per LoRA, LoFA against the reference predictors, and the verdict lines.

    scores, samples, plans = heldout_comparison(run, SETTINGS, predicted, 2, EvalSeeds.of(0))   # 2 samples a case
    per_case, quality = heldout_quality(scores, SETTINGS, speed, 2)                            # 06_heldout_quality
    ablation = recon_ablation(run, SETTINGS, predicted, plans, per_case, 2, EvalSeeds.of(0))
    verdicts = paired_differences(per_case, "LoFA", ("base",), setting_metrics(SETTINGS), by=("setting",))

(`paired_differences` and `setting_metrics` are `lofa.evaluate`'s.) `run` is a `lofa.run.Run`; `settings` the
paper's settings as `lofa.run.SETTINGS` lists them, (name, task, condition kind); every table's rows follow
their order. Cases, prompts and noise seeds are shared by every
method of a task (`lofa.evaluate.compare`), so the per-case differences are paired.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from lofa.evaluate import (LOWER_IS_BETTER, METRICS, EvalSeeds, GenerateConfig, case_means, compare, paired_difference,
                           paired_differences, prediction_cost, setting_metrics, summarize)
from lofa.hypernet.data import delta_l1_per_case
from lofa.hypernet.predictor import predict_cases

# The method name of the Stage II variant trained with the L1 on ΔW (the paper's norm) instead of the squared error.
L1_VARIANT = "LoFA, L1 on ΔW"


def stage1_overview(run, settings: Sequence[tuple[str, str, str]], stage1: Mapping, data: Mapping) -> pd.DataFrame:
    """One row per setting of Stage I: condition kind, train / held-out LoRAs, target matrices, condition tokens
    (length x width), LoRA rank, parameters (M) and training steps."""
    rows = []
    for setting, _, kind in settings:
        d, cfg = data[setting], run.hypernet_config(setting)
        rows.append({"setting": setting, "condition": kind, "train LoRAs": len(d.train_ids),
                     "held-out LoRAs": len(d.heldout_ids), "targets": len(d.spec),
                     "condition tokens": f"{cfg.cond_len} x {cfg.cond_dim}", "rank": cfg.rank,
                     "parameters (M)": sum(p.numel() for p in stage1[setting].parameters()) / 1e6,
                     "steps": len(run.hypernet_history(setting, 1))})
    return pd.DataFrame(rows)


def stage2_overview(run, settings: Sequence[tuple[str, str, str]], lofa: Mapping) -> pd.DataFrame:
    """One row per setting of Stage II: training steps, whether the flow-matching term was on (lambda_diff),
    parameters (M), the first step's reconstruction loss and the mean of the last 10 % of steps'."""
    rows = []
    for setting, *_ in settings:
        h = run.hypernet_history(setting, 2)
        rows.append({"setting": setting, "steps": len(h), "lambda_diff": "diffusion" in h,
                     "parameters (M)": sum(p.numel() for p in lofa[setting].stage2.parameters()) / 1e6,
                     "first recon": h.recon.iloc[0], "last recon": h.recon.iloc[-max(1, len(h) // 10):].mean()})
    return pd.DataFrame(rows)


def seconds_per_lora(run, settings: Sequence[tuple[str, str, str]], lofa: Mapping, data: Mapping,
                     timed_cases: int = 8) -> pd.DataFrame:
    """What one LoRA costs: LoFA's prediction from one condition (`evaluate.prediction_cost` over the first
    `timed_cases` held-out cases) against the median recorded training time of the zoo's held-out per-case LoRAs.
    Columns setting, lofa_predict_s, lora_train_s, device, speedup (wall-clock: they differ between runs)."""
    rows = []
    for setting, task, _ in settings:
        d = data[setting]
        cost = prediction_cost(lofa[setting], d.conditions("eval"), d.heldout_ids[:timed_cases])
        train_s = [run.zoo(task)[c]["wall_time_s"] for c in d.heldout_ids]
        rows.append({"setting": setting, "lofa_predict_s": cost["predict_ms"] / 1e3,
                     "lora_train_s": float(np.median(train_s)), "device": cost["device"]})
    speed = pd.DataFrame(rows)
    speed["speedup"] = speed.lora_train_s / speed.lofa_predict_s
    return speed


def heldout_comparison(run, settings: Sequence[tuple[str, str, str]], predicted: Mapping, per_case: int,
                       seeds: EvalSeeds, max_cases: int | None = None, *, seed: int = 0, text=None
                       ) -> tuple[pd.DataFrame, dict, dict]:
    """The base, the zoo's per-case LoRA and LoFA's LoRA of every setting of a task, sampled on the task's held-out
    cases (all, or `max_cases` drawn with `seed`) with their eval phrasings and paired noise (`evaluate.compare`,
    the run's GenerateConfig).

    predicted: {(setting, case_id): LoraWeights}. Returns (scores, samples, plans): scores one row per (setting,
    method, sample) with method one of "ground truth", "base", "per-case LoRA", "LoFA" (each setting gets its
    task's shared methods and its own LoFA) and the `compare` columns; samples {(task, method): samples
    [N, *world.shape]} with LoFA as "LoFA (<setting>)"; plans {task: (held-out case ids, case id of each sample)}.
    """
    tasks = list(dict.fromkeys(task for _, task, _ in settings))
    by_task = {task: [s for s, t, _ in settings if t == task] for task in tasks}
    frames, samples, plans = [], {}, {}
    for task, (frame, task_samples, plan) in zip(tasks, run.map(_task_heldout_comparison, tasks, by_task, predicted,
                                                                per_case, seeds, max_cases, seed=seed, text=text)):
        frames.append(frame)
        samples.update(task_samples)
        plans[task] = plan
    return pd.concat(frames, ignore_index=True), samples, plans


def _task_heldout_comparison(run, task: str, by_task: Mapping, predicted: Mapping, per_case: int, seeds: EvalSeeds,
                             max_cases: int | None, *, seed: int = 0, text=None) -> tuple[pd.DataFrame, dict, tuple]:
    """`heldout_comparison` of one task (a `Run.map` job; by_task: {task: its settings}) -> (scores, samples,
    plan) of that task."""
    task_settings = by_task[task]
    zoo = run.zoo(task)
    heldout = zoo.case_ids("heldout")
    if max_cases is not None and len(heldout) > max_cases:
        heldout = sorted(np.random.default_rng(seed).choice(heldout, max_cases, replace=False).tolist())
    methods = {"base": None, "per-case LoRA": {c: zoo.load(c)[0] for c in heldout}}
    methods.update({f"LoFA ({s})": {c: predicted[(s, c)] for c in heldout} for s in task_settings})
    table, x = compare(run.base(task), run.world(task), run.evaluators(task), methods, heldout,
                       per_case=per_case, seeds=seeds, cfg=run.config(GenerateConfig), text=text, return_samples=True)
    frames = []
    for method, frame in table.groupby("method", sort=False):  # method-major, as the tables were first made
        for setting in task_settings:
            if method.startswith("LoFA") and method != f"LoFA ({setting})":
                continue
            frames.append(frame.assign(setting=setting, method=method.split(" (")[0]))
    plan = (heldout, table[table.method == "ground truth"].case_id.tolist())
    return pd.concat(frames, ignore_index=True), {(task, method): s for method, s in x.items()}, plan


def heldout_quality(scores: pd.DataFrame, settings: Sequence[tuple[str, str, str]], speed: pd.DataFrame,
                    samples_per_case: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`heldout_comparison`'s scores per case and summarised -> (per_case, quality).

    per_case: `case_means` by (setting, method). quality: per (setting, method), the mean over cases with a
    bootstrap interval of each of the task's metrics and denoise (`evaluate.summarize`), with seconds_per_lora
    (LoFA's prediction, the per-case LoRA's training, from `seconds_per_lora`; NaN for the rest) and
    samples_per_case."""
    per_case = case_means(scores.drop(columns="sample"), by=("setting", "method"))
    quality = pd.concat([summarize(per_case[per_case.setting == setting], [*METRICS[task], "denoise"],
                                   by=("setting", "method"), seed=seed) for setting, task, _ in settings],
                        ignore_index=True)
    seconds = {("LoFA", r.setting): r.lofa_predict_s for r in speed.itertuples()}
    seconds.update({("per-case LoRA", r.setting): r.lora_train_s for r in speed.itertuples()})
    quality["seconds_per_lora"] = [seconds.get((m, s), np.nan) for m, s in zip(quality.method, quality.setting)]
    quality["samples_per_case"] = samples_per_case
    return per_case, quality


def recon_ablation(run, settings: Sequence[tuple[str, str, str]], predicted: Mapping, plans: Mapping,
                   per_case: pd.DataFrame, samples_per_case: int, seeds: EvalSeeds, *, chunk: int = 8, seed: int = 0,
                   text=None) -> pd.DataFrame:
    """LoFA (squared error on ΔW) against the `recon_l1` Stage II variant (L1 on ΔW, trained here when missing, the
    settings side by side), both predicting the held-out cases of `heldout_comparison` (plans) and sampled on its
    prompts and noise, the settings scored side by side on a CPU (`Run.map`); per_case: `heldout_quality`'s.

    Returns one row per (setting, metric) of dW_L1 (L1 of the predicted ΔW against the zoo's, / rms(W)), the task's
    metrics and denoise: setting, metric, squared_error and l1 (means over cases), squared_minus_l1, ci_low,
    ci_high, cases, verdict (for the squared error; lower is better for dW_L1 and denoise).
    """
    if not settings:  # e.g. a CPU run of tasks whose settings ScoringConfig.recon_ablation_settings_on_cpu leaves out
        return pd.DataFrame(columns=["setting", "metric", "squared_error", "l1", "squared_minus_l1", "ci_low",
                                     "ci_high", "cases", "verdict"])
    run.build([("stage2", f"{setting}/recon_l1") for setting, _, _ in settings])
    names = [setting for setting, _, _ in settings]
    lofa = {s: {c: predicted[(s, c)] for c in plans[task][0]} for s, task, _ in settings}
    rows, recon_rows = [], []
    for table, recon in run.map(_recon_l1_scores, names, plans, lofa, samples_per_case, seeds, chunk=chunk, text=text):
        rows.append(table)
        recon_rows += recon
    cases = pd.concat([per_case[per_case.method == "LoFA"],
                       case_means(pd.concat(rows, ignore_index=True), by=("setting", "method"))], ignore_index=True)
    cases = cases.merge(pd.DataFrame(recon_rows), on=["setting", "method", "case_id"], how="left")
    ablation = []
    for setting, task, _ in settings:
        metrics = [m for m in ("dW_L1", *METRICS[task], "denoise") if m in cases]
        wide = cases[cases.setting == setting].pivot_table(index="case_id", columns="method", values=metrics,
                                                           sort=False)
        for metric in metrics:
            pair = wide[metric][["LoFA", L1_VARIANT]].dropna()
            d = paired_difference(pair["LoFA"], pair[L1_VARIANT], lower_is_better=metric in LOWER_IS_BETTER | {"dW_L1"},
                                  seed=seed)
            ablation.append({"setting": setting, "metric": metric, "squared_error": pair["LoFA"].mean(),
                             "l1": pair[L1_VARIANT].mean(), **d})
    return pd.DataFrame(ablation).rename(columns={"difference": "squared_minus_l1"})


def stage2_verdicts(settings: Sequence[tuple[str, str, str]], fidelity: pd.DataFrame, quality: pd.DataFrame,
                    diffs: pd.DataFrame, speed: pd.DataFrame, ablation: pd.DataFrame,
                    paper_fidelity: Mapping[str, float]) -> list[str]:
    """Notebook 06's verdict lines, printed from its tables: map fidelity against the paper's, each metric of LoFA
    against the base and the per-case LoRA (`diffs`: `evaluate.paired_differences` with LoFA's differences in
    lofa_minus_baseline), seconds per LoRA, the L1 ablation's tally, and where LoFA loses."""
    verdicts = []
    fid = fidelity.set_index(["setting", "comparison"])
    paper = " / ".join(f"{value:g}" for value in paper_fidelity.values())
    for setting, task, _ in settings:
        f = [fid.loc[(setting, c)] for c in paper_fidelity]
        verdicts.append(f"{setting}: map fidelity (cosine) Stage I vs truth {f[0].cosine:.3f}, Stage II vs Stage I "
                        f"{f[1].cosine:.3f}, Stage II vs truth {f[2].cosine:.3f} (paper {paper}); Stage II's "
                        f"implied density {f[2].stage2_density:.2f} vs true {f[2].true_density:.2f}.")
        q = quality[quality.setting == setting].set_index(["method", "metric"])["mean"]
        for metric in [*METRICS[task], "denoise"]:
            if ("LoFA", metric) not in q:
                continue
            parts = [f"{m} {q[(m, metric)]:.3f}" for m in ("ground truth", "per-case LoRA", "LoFA", "base")
                     if (m, metric) in q]
            calls = diffs[(diffs.setting == setting) & (diffs.metric == metric)].set_index("baseline").verdict
            verdicts.append(f"  {metric}: {', '.join(parts)} -> LoFA vs base: {calls['base']}; LoFA vs per-case "
                            f"LoRA: {calls['per-case LoRA']}")
        s = speed.set_index("setting").loc[setting]
        verdicts.append(f"  time per LoRA: LoFA {s.lofa_predict_s * 1e3:.1f} ms ({s.device}) vs per-case LoRA "
                        f"{s.lora_train_s:.1f} s ({s.speedup:,.0f}x faster)")
    counts = ablation[ablation.metric != "dW_L1"].verdict.value_counts()
    ablated = ", ".join(ablation.setting.unique()) or "none"
    verdicts.append(f"squared error vs L1 on ΔW (held-out; settings: {ablated}): squared error better on "
                    f"{counts.get('better', 0)}, worse on {counts.get('worse', 0)}, no significant difference on "
                    f"{counts.get('no significant difference', 0)} of the sample metrics (06_recon_ablation.csv)")
    lost = diffs[diffs.verdict == "worse"]
    if len(lost):
        verdicts.append("LoFA is significantly WORSE than a baseline on: " + "; ".join(
            f"{r.setting} {r.metric} vs {r.baseline} ({r.lofa_minus_baseline:+.3f})" for r in lost.itertuples()))
    acc = diffs[diffs.metric == "acc"]
    verdicts.append(f"LoFA beats the base model on exact-case recognition in "
                    f"{(acc[acc.baseline == 'base'].verdict == 'better').sum()} of {(acc.baseline == 'base').sum()} "
                    f"settings; it matches or beats the per-case LoRA there in "
                    f"{(acc[acc.baseline == 'per-case LoRA'].verdict != 'worse').sum()}.")
    return verdicts


def sample_panels_of(run, settings: Sequence[tuple[str, str, str]], samples: Mapping, plans: Mapping
                     ) -> list[tuple[str, object, list[str], list[str]]]:
    """The panels of `lofa.viz.sample_panels` for notebook 06: per setting, the first sample of its task's first
    held-out cases (two for video, four for images) as ground truth, base, per-case LoRA and LoFA rows."""
    panels = []
    for setting, task, _ in settings:
        world = run.world(task)
        heldout, ids = plans[task]
        shown = heldout[:2 if world.modality == "video" else 4]
        first = [ids.index(c) for c in shown]
        rows = ("ground truth", "base", "per-case LoRA", f"LoFA ({setting})")
        tiles = torch.cat([samples[(task, method)][first] for method in rows])
        # case names whole: the grid wraps them to its columns
        panels.append((setting, tiles, [r.replace(f" ({setting})", "") for r in rows],
                       [world.cases[c].name for c in shown]))
    return panels

# Titles of the panels of Stage II's learning curves (`lofa.viz.learning_curves`), by history column.
STAGE2_CURVES = {"loss": "total loss", "recon": "reconstruction of ΔW / rms(W)",
                 "diffusion": "flow-matching loss, predicted LoRA"}


def comparison_cases(data, task: str, cases_per_split: int, seed: int) -> list[int]:
    """Notebook 07's cases of one setting: up to `cases_per_split` held-out cases, then as many training cases,
    each drawn without replacement with [seed, the task's index] and sorted."""
    from lofa.run import TASKS

    rng = np.random.default_rng([seed, TASKS.index(task)])
    return [int(c) for ids in (data.heldout_ids, data.train_ids)
            for c in sorted(rng.choice(ids, min(cases_per_split, len(ids)), replace=False))]


def reference_comparison(run, setting: str, cases_per_split: int, per_case: int, seeds: EvalSeeds, *, seed: int = 0,
                         text=None) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    """Notebook 07's comparison of one setting: the base, the per-case LoRA, LoFA, Text-to-LoRA and every reference
    predictor (`baselines.reference_loras`), and LoFA, Text-to-LoRA and the ridge LoRA norm-matched to the training
    LoRAs (`baselines.magnitude`, names `NORM_MATCHED`), on up to `cases_per_split` held-out and as many training
    cases (drawn with [seed, the task's index]), scored by `evaluate.compare` on the same prompts and noise.

    Returns (table, sources, finetune_s): table the `compare` table with a setting column; sources the references'
    choice per case (`reference_loras`' second value) with a setting column; finetune_s the HyperDreamBooth-style
    fine-tune's median seconds per case (None where it does not run). `method_costs` times the methods.

    On the settings the paper runs them on (`PAPER_SETTINGS` of `diff_lora` and `hyper_dreambooth`: identities),
    the DiffLoRA-style baseline and the HyperDreamBooth-style one too: its compressed prediction and the prediction
    after the rank-relaxed fine-tune.
    """
    from lofa.baselines import NORM_MATCHED, diff_lora, hyper_dreambooth, match_norms, module_norms, reference_loras

    from lofa.run import parse_setting

    _, task, _ = parse_setting(setting)
    data, model = run.triplets(setting), run.hypernet(setting)
    cases = comparison_cases(data, task, cases_per_split, seed)
    references, source = reference_loras(data, cases)
    t2l = run.text_to_lora(setting)
    methods = {"base": None, "per-case LoRA": {c: data.zoo.load(c)[0] for c in cases},
               "LoFA": predict_cases(model, data.conditions("eval"), cases),
               "Text-to-LoRA": predict_cases(t2l, data.conditions("eval"), cases), **references}
    norms = module_norms(data.zoo.load(c)[0] for c in data.train_ids)
    for raw, matched in NORM_MATCHED.items():
        methods[matched] = {c: match_norms(lora, norms) for c, lora in methods[raw].items()}
    finetune_s = None
    if setting in diff_lora.PAPER_SETTINGS:
        methods[diff_lora.METHOD] = predict_cases(run.diff_lora(setting), data.conditions("eval"), cases)
    if setting in hyper_dreambooth.PAPER_SETTINGS:
        loras, finetune_s = hyper_dreambooth.hyper_dreambooth_loras(run, setting, cases, seeds.sample)
        methods.update(loras)
    table = compare(run.base(task), run.world(task), run.evaluators(task), methods, cases, per_case=per_case,
                    seeds=seeds, cfg=run.config(GenerateConfig), text=text)
    return table.assign(setting=setting), source.assign(setting=setting), finetune_s


def method_costs(run, setting: str, finetune_s: float | None = None) -> list[dict]:
    """One row per condition-to-LoRA method of a setting (LoFA, Text-to-LoRA and, on their settings, the
    DiffLoRA-style and HyperDreamBooth-style baselines): setting, method, `evaluate.prediction_cost` on the first 8
    held-out cases and per_case_lora_train_s (the median recorded training time of the task's training per-case
    LoRAs); the HyperDreamBooth-style fine-tune's row adds `finetune_s` (seconds per case) to its predict_ms. Timed in
    the calling process: a timing taken beside other work (`Run.map`'s sibling workers) would measure that work."""
    from lofa.baselines import diff_lora, hyper_dreambooth
    from lofa.run import parse_setting

    _, task, _ = parse_setting(setting)
    data = run.triplets(setting)
    bank, timed = data.conditions("eval"), data.heldout_ids[:8]
    train_s = float(np.median([run.zoo(task)[c]["wall_time_s"] for c in data.train_ids]))
    models = [("LoFA", run.hypernet(setting)), ("Text-to-LoRA", run.text_to_lora(setting))]
    if setting in diff_lora.PAPER_SETTINGS:
        models.append((diff_lora.METHOD, run.diff_lora(setting)))
    if setting in hyper_dreambooth.PAPER_SETTINGS:
        models.append((hyper_dreambooth.METHOD, run.hyper_dreambooth(setting)))
    costs = [{"setting": setting, "method": name, **prediction_cost(m, bank, timed), "per_case_lora_train_s": train_s}
             for name, m in models]
    if setting in hyper_dreambooth.PAPER_SETTINGS and finetune_s is not None:
        row = next(c for c in costs if c["method"] == hyper_dreambooth.METHOD)
        costs.append({**row, "method": hyper_dreambooth.FINETUNED, "predict_ms": row["predict_ms"] + 1e3 * finetune_s})
    return costs


def reference_verdict_lines(verdicts: pd.DataFrame, metric: str = "acc") -> list[str]:
    """One line per (method, setting, split) of notebook 07's paired differences (`evaluate.paired_differences`
    with a reference column): its verdict and difference in `metric` against each reference."""
    lines = []
    table = verdicts[verdicts.metric == metric]
    for (method, setting, split), block in table.groupby(["method", "setting", "split"], sort=False):
        lines.append(f"{setting:>13} {split:>8}: {method} vs " + ", ".join(
            f"{r.reference} {r.verdict} ({r.difference:+.2f})" for r in block.itertuples()))
    return lines


def reference_study(run, settings: Sequence[tuple[str, str, str]], cases_per_split: int, per_case: int,
                    seeds: EvalSeeds, *, seed: int = 0, text=None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """`reference_comparison` for each of `settings` ((name, task, kind), as SETTINGS lists them), concatenated ->
    (scores, sources, costs): the per-sample `compare` tables, the references' choices per case, and one row per
    hypernetwork and setting of parameters and prediction time (07_methods.csv). The settings are scored side by
    side on a CPU (`Run.map`)."""
    names = [name for name, *_ in settings]
    scores, sources, costs = [], [], []
    for name, (table, source, finetune_s) in zip(names, run.map(reference_comparison, names, cases_per_split,
                                                                per_case, seeds, seed=seed, text=text)):
        scores.append(table)
        sources.append(source)
        costs += method_costs(run, name, finetune_s)  # here, once the workers are done
    return pd.concat(scores, ignore_index=True), pd.concat(sources, ignore_index=True), pd.DataFrame(costs)


# Table 4's variants (`lofa.hypernet.recipe.ABLATIONS`, `Run.hypernet(setting, variant=...)`) by the paper's names.
ABLATION_NAMES = {"no_response": "w/o response", "lightweight": "lightweight", "prompt_input": "prompt input"}


def _recon_l1_scores(run, setting: str, plans: Mapping, lofa: Mapping, samples_per_case: int, seeds: EvalSeeds, *,
                     chunk: int = 8, text=None) -> tuple[pd.DataFrame, list[dict]]:
    """`recon_ablation`'s work on one setting (a `Run.map` job; lofa: {setting: {case_id: LoFA's LoRA}}): the
    recon_l1 variant's predictions scored by `compare` on the plan's held-out cases, and the ΔW L1 of both."""
    from lofa.run import parse_setting

    _, task, _ = parse_setting(setting)
    d, (heldout, _) = run.triplets(setting), plans[task]
    l1_lora = predict_cases(run.hypernet(setting, 2, "recon_l1"), d.conditions("eval"), heldout, chunk)
    recon = []
    for method, lora in (("LoFA", lofa[setting]), (L1_VARIANT, l1_lora)):
        recon += [{"setting": setting, "method": method, "case_id": c, "dW_L1": v}
                  for c, v in zip(heldout, delta_l1_per_case(d, heldout, [lora[c] for c in heldout]))]
    table = compare(run.base(task), run.world(task), run.evaluators(task), {L1_VARIANT: l1_lora}, heldout,
                    per_case=samples_per_case, seeds=seeds, cfg=run.config(GenerateConfig), text=text)
    return table[table.method == L1_VARIANT].drop(columns="sample").assign(setting=setting), recon


def ablation_comparison(run, setting: str, cases: int, per_case: int, seeds: EvalSeeds, *, seed: int = 0,
                        text=None) -> pd.DataFrame:
    """Notebook 07's Table 4 for one setting: LoFA and its three ablations (`ABLATION_NAMES`, each trained on the
    same zoo by `Run.hypernet(setting, variant=...)`) on the held-out cases of `reference_comparison` (up to `cases`),
    scored by `evaluate.compare` with the same prompts and noise. Returns the `compare` table with a setting column."""
    from lofa.run import parse_setting

    _, task, _ = parse_setting(setting)
    data = run.triplets(setting)
    heldout = comparison_cases(data, task, cases, seed)[:min(cases, len(data.heldout_ids))]
    conditions = data.conditions("eval")
    methods = {"LoFA": predict_cases(run.hypernet(setting), conditions, heldout)}
    for variant, name in ABLATION_NAMES.items():
        methods[name] = predict_cases(run.hypernet(setting, variant=variant), conditions, heldout)
    table = compare(run.base(task), run.world(task), run.evaluators(task), methods, heldout, per_case=per_case,
                    seeds=seeds, cfg=run.config(GenerateConfig), text=text)
    return table.assign(setting=setting)


def ablation_study(run, settings: Sequence[tuple[str, str, str]], cases: int, per_case: int, seeds: EvalSeeds, *,
                   seed: int = 0, text=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Notebook 07's Table 4: `ablation_comparison` for each of `settings` ((name, task, kind), as SETTINGS lists
    them) -> (quality, verdicts): quality the `summarize` table (setting, split, method, metric, mean, ci_low,
    ci_high, cases) of LoFA and each ablation; verdicts `paired_differences` of LoFA minus each ablation per setting
    and metric (its "baseline" column names the ablation). Both empty, with their columns, when `settings` is. The
    settings are scored side by side on a CPU (`Run.map`)."""
    tables = run.map(ablation_comparison, [name for name, *_ in settings], cases, per_case, seeds, seed=seed, text=text)
    if not tables:
        return (pd.DataFrame(columns=["setting", "split", "method", "metric", "mean", "ci_low", "ci_high", "cases"]),
                pd.DataFrame(columns=["setting", "metric", "baseline", "difference", "ci_low", "ci_high", "cases",
                                      "verdict", "method"]))
    per_case_means = case_means(pd.concat(tables, ignore_index=True).drop(columns="sample"), by=("setting", "method"))
    metrics = [m for m in dict.fromkeys([m for _, task, _ in settings for m in METRICS[task]] + ["denoise"])
               if m in per_case_means]
    quality = summarize(per_case_means, metrics, by=("setting", "split", "method"), seed=seed)
    verdicts = paired_differences(per_case_means, "LoFA", list(ABLATION_NAMES.values()), setting_metrics(settings),
                                  by=("setting",), seed=seed)
    return quality, verdicts
