"""How close the hypernetwork's predictions are to the zoo's LoRAs of held-out cases, before any sampling.

Response maps (notebooks 05 and 06): per held-out case, the true map R = [|ΔW| > τ·|W|] of its zoo LoRA (τ: the one
Stage I was trained with, `HyperConfig.tau`) against Stage I's map from the case's reserved condition, and against
the map implied by the LoRA Stage II predicts. ΔW (notebook 06): the cosine and norm ratio of a predicted or
reference LoRA's ΔW against the zoo's.

    per_case, examples = stage1_heldout_maps(stage1, data)               # 05: Stage I and the mean-map baseline
    table = map_metric_summary(per_case, seed=0)                          # 05_stage1_metrics.csv
    predicted, per_case = stage2_map_fidelity(lofa, data)                 # 06: Stage I / II maps per case
    table = map_fidelity_summary(per_case, PAPER_FIDELITY, seed=0)        # 06_map_fidelity.csv
    levels = reference_delta_fidelity(data, MONITOR_CASES)                # 06_reference_fidelity.csv

`stage1`, `lofa` and `data` are dicts keyed by setting name (Stage I modules, LoFA predictors, `Triplets`); rows
come in their order. Metrics per case are over all its target matrices (`losses.map_metrics`); summaries are
means over cases with 95 % percentile-bootstrap intervals (cases resampled).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd

from lofa.baselines import mean_train_map, reference_loras
from lofa.hypernet.data import delta_fidelity_per_case, lora_maps, stack_loras, stage1_maps
from lofa.hypernet.losses import map_metrics
from lofa.hypernet.predictor import predict_cases
from lofa.metrics.scores import bootstrap_ci

MAP_MEASURES = ("precision", "recall", "iou", "cosine")
# The paper's response-map fidelity (cosine of the 0/1 maps, validation): Stage I vs the truth, the map implied by
# Stage II's LoRA vs Stage I's, and vs the truth.
PAPER_FIDELITY = {"stage1_vs_truth": 0.77, "stage2_vs_stage1": 0.91, "stage2_vs_truth": 0.83}


def stage1_heldout_maps(stage1: Mapping, data: Mapping, chunk: int = 8) -> tuple[pd.DataFrame, dict]:
    """Stage I's maps of every held-out case of each setting (decided at the training density, and at logit 0)
    and the condition-blind baseline (the entry-wise majority of the training LoRAs' maps), each against the true
    map of the case's zoo LoRA, `chunk` cases at a time (memory: chunk x M x R x C booleans).

    Returns (per_case, examples): per_case has one row per (setting, predictor, case_id) with the `map_metrics`
    columns (density, pred_density, precision, recall, iou, cosine); examples {setting: (case_id, true map
    [M, R, C], Stage I map [M, R, C])} of each setting's first held-out case.
    """
    rows, examples = [], {}
    for setting, d in data.items():
        tau = stage1[setting].cfg.tau  # the maps Stage I was trained on are the truth it is scored against
        baseline = mean_train_map(d, tau) > 0.5
        for i in range(0, len(d.heldout_ids), chunk):
            ids = d.heldout_ids[i:i + chunk]
            true, valid = lora_maps(d.base, d.batch(ids).loras, tau)
            pred = stage1_maps(stage1[setting], d, ids, split="eval")
            raw = stage1_maps(stage1[setting], d, ids, split="eval", calibrated=False)
            for j, case in enumerate(ids):
                for predictor, p in (("Stage I", pred[j]), ("Stage I, logit 0", raw[j]), ("mean train map", baseline)):
                    rows.append({"setting": setting, "predictor": predictor, "case_id": case,
                                 **map_metrics(p, true[j], valid[j])})
            if setting not in examples:
                examples[setting] = (ids[0], true[0], pred[0])
    return pd.DataFrame(rows), examples


def map_metric_summary(per_case: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per (setting, predictor) of `stage1_heldout_maps`' table: cases, then for each of MAP_MEASURES the mean over
    cases and its interval (`<measure>`, `<measure>_ci_low`, `<measure>_ci_high`), then the mean true density and
    the mean predicted density (pred_density)."""
    table = []
    for (setting, predictor), group in per_case.groupby(["setting", "predictor"], sort=False):
        row = {"setting": setting, "predictor": predictor, "cases": len(group)}
        for metric in MAP_MEASURES:
            mean, lo, hi = bootstrap_ci(group[metric].dropna().to_numpy(), seed=seed)
            row.update({metric: mean, f"{metric}_ci_low": lo, f"{metric}_ci_high": hi})
        row.update(density=group.density.mean(), pred_density=group.pred_density.mean())
        table.append(row)
    return pd.DataFrame(table)


def stage1_verdicts(metrics: pd.DataFrame, per_case: pd.DataFrame, paper_cosine: float, seed: int = 0) -> list[str]:
    """One line per setting: Stage I's held-out map cosine against the paper's and against the mean train map
    (the paired difference over cases with its bootstrap interval), from `map_metric_summary` and its per-case
    table."""
    verdicts = []
    m = metrics.set_index(["setting", "predictor"])
    for setting in metrics.setting.unique():
        s, b = m.loc[(setting, "Stage I")], m.loc[(setting, "mean train map")]
        paired = per_case[per_case.setting == setting].pivot(index="case_id", columns="predictor", values="cosine")
        diff, lo, hi = bootstrap_ci((paired["Stage I"] - paired["mean train map"]).to_numpy(), seed=seed)
        beats = "beats" if lo > 0 else ("loses to" if hi < 0 else "does not differ significantly from")
        paper = "reaches" if s.cosine >= paper_cosine else "falls short of"
        verdicts.append(f"{setting}: Stage I held-out cosine {s.cosine:.3f} [{s.cosine_ci_low:.3f}, "
                        f"{s.cosine_ci_high:.3f}] ({paper} the paper's {paper_cosine}); IoU {s.iou:.3f}, precision "
                        f"{s.precision:.3f}, recall {s.recall:.3f}, predicted density {s.pred_density:.2f} vs true "
                        f"{s.density:.2f}. It {beats} the condition-blind mean train map (cosine {b.cosine:.3f}; "
                        f"paired difference {diff:+.3f} [{lo:+.3f}, {hi:+.3f}], {s.cases:.0f} held-out cases).")
    return verdicts


def shown_targets(names: Sequence[str]) -> list[int]:
    """Indices of the two target matrices a map figure shows: the first self-attention query and the first
    cross-attention key when the network has them, else the first targets."""
    wanted = [next((i for i, n in enumerate(names) if n.endswith(suffix)), None)
              for suffix in ("attn1.to_q", "attn2.to_k")]
    wanted = [i for i in wanted if i is not None]
    return (wanted + [i for i in range(len(names)) if i not in wanted])[:2]


def stage2_map_fidelity(lofa: Mapping, data: Mapping, chunk: int = 8) -> tuple[dict, pd.DataFrame]:
    """LoFA's LoRA for every held-out case of each setting (from its reserved condition) and the paper's map
    fidelity comparisons per case: Stage I's map vs the truth, the map implied by the predicted LoRA
    (|ΔŴ| > τ·|W|) vs Stage I's, and vs the truth.

    Returns (predicted {(setting, case_id): LoraWeights}, per_case) with per_case columns setting, case_id,
    density (true), stage1_density, stage2_density, stage1_vs_truth, stage2_vs_stage1, stage2_vs_truth (cosines
    of the 0/1 maps).
    """
    predicted, rows = {}, []
    for setting, d in data.items():
        model = lofa[setting]
        tau = model.stage1.cfg.tau
        loras = predict_cases(model, d.conditions("eval"), d.heldout_ids, chunk)
        predicted.update({(setting, c): lora for c, lora in loras.items()})
        for i in range(0, len(d.heldout_ids), chunk):
            ids = d.heldout_ids[i:i + chunk]
            true, valid = lora_maps(d.base, d.batch(ids).loras, tau)
            first = stage1_maps(model.stage1, d, ids, split="eval")
            implied, _ = lora_maps(d.base, stack_loras([loras[c] for c in ids]), tau)
            for j, case in enumerate(ids):
                stage1_vs_truth = map_metrics(first[j], true[j], valid[j])
                stage2_vs_truth = map_metrics(implied[j], true[j], valid[j])
                rows.append({"setting": setting, "case_id": case, "density": stage1_vs_truth["density"],
                             "stage1_density": stage1_vs_truth["pred_density"],
                             "stage2_density": stage2_vs_truth["pred_density"],
                             "stage1_vs_truth": stage1_vs_truth["cosine"],
                             "stage2_vs_stage1": map_metrics(implied[j], first[j], valid[j])["cosine"],
                             "stage2_vs_truth": stage2_vs_truth["cosine"]})
    return predicted, pd.DataFrame(rows)


def map_fidelity_summary(per_case: pd.DataFrame, paper: Mapping[str, float], seed: int = 0) -> pd.DataFrame:
    """Per setting and comparison of `paper` ({comparison: the paper's cosine}): the mean cosine over cases of
    `stage2_map_fidelity`'s table with its interval -> columns setting, comparison, cosine, ci_low, ci_high, paper,
    cases, true_density, stage1_density, stage2_density."""
    table = []
    for setting, group in per_case.groupby("setting", sort=False):
        for comparison, value in paper.items():
            mean, lo, hi = bootstrap_ci(group[comparison].to_numpy(), seed=seed)
            table.append({"setting": setting, "comparison": comparison, "cosine": mean, "ci_low": lo, "ci_high": hi,
                          "paper": value, "cases": len(group), "true_density": group.density.mean(),
                          "stage1_density": group.stage1_density.mean(),
                          "stage2_density": group.stage2_density.mean()})
    return pd.DataFrame(table)


def reference_delta_fidelity(data: Mapping, monitor_cases: int) -> pd.DataFrame:
    """The reference predictors' LoRAs (`baselines.reference_loras`, one fit for both splits) of the cases Stage
    II's learning curves follow (`Triplets.monitor_cases`), scored like those curves: one row per (setting, cases
    = "heldout" / "train", method, case_id) with the ΔW cosine and magnitude (‖ΔŴ‖ / ‖ΔW‖) to the zoo LoRA."""
    rows = []
    for setting, d in data.items():
        followed = d.monitor_cases(monitor_cases)
        references, _ = reference_loras(d, [c for ids in followed.values() for c in ids])
        for split, ids in followed.items():
            for method, by_case in references.items():
                cosine, magnitude = delta_fidelity_per_case(d, ids, [by_case[c] for c in ids])
                rows += [{"setting": setting, "cases": split, "method": method, "case_id": c, "cosine": x,
                          "magnitude": m} for c, x, m in zip(ids, cosine, magnitude)]
    return pd.DataFrame(rows)


def example_panels(examples: Mapping, data: Mapping) -> list[tuple[str, str, str, object, object]]:
    """`stage1_heldout_maps`' examples as the panels of `lofa.viz.map_disagreement`: per setting, its two
    `shown_targets` as (setting, case name, target name, true map [out, in], Stage I map [out, in])."""
    panels = []
    for setting, (case, true, pred) in examples.items():
        d = data[setting]
        for t in shown_targets(d.spec.names):
            target = d.spec.targets[t]
            o, i = target.shape
            panels.append((setting, d.world.cases[case].name, target.name, true[t, :o, :i], pred[t, :o, :i]))
    return panels


# The measures of Stage II's learning curves (`lofa.hypernet.train.Stage2Monitor`): ΔW cosine and norm ratio of the
# followed held-out and training cases.
CURVE_MEASURES = ("heldout_cosine", "train_cosine", "heldout_magnitude", "train_magnitude")


def fidelity_curve_table(histories: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The monitored steps of Stage II's training histories ({setting: history}) -> columns setting, step and
    CURVE_MEASURES, one row per monitored step."""
    curves = pd.concat([h.assign(setting=setting) for setting, h in histories.items()], ignore_index=True)
    return curves.dropna(subset=list(CURVE_MEASURES))[["setting", "step", *CURVE_MEASURES]]


def last_step_levels(curves: pd.DataFrame, reference_fidelity: pd.DataFrame) -> pd.DataFrame:
    """ΔW cosine per (setting, cases) of LoFA at its last monitored step beside each reference predictor's mean
    (`reference_delta_fidelity`): one column per method."""
    levels = reference_fidelity.groupby(["setting", "cases", "method"], sort=False).cosine.mean().unstack("method")
    last = curves.groupby("setting", sort=False).last()
    levels.insert(0, "LoFA (last step)", [last.loc[s, f"{split}_cosine"] for s, split in levels.index])
    return levels
