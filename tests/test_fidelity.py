"""The map- and ΔW-fidelity tables of notebooks 05 and 06 (lofa.hypernet.fidelity), on hand-made per-case tables."""
import numpy as np
import pandas as pd

from lofa.hypernet.fidelity import (CURVE_MEASURES, MAP_MEASURES, PAPER_FIDELITY, fidelity_curve_table,
                                    last_step_levels, map_fidelity_summary, map_metric_summary, shown_targets,
                                    stage1_verdicts)
from lofa.metrics.scores import bootstrap_ci


def _map_cases(seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for setting in ("a", "b"):
        for predictor, level in (("Stage I", 0.8), ("mean train map", 0.5)):
            for case in range(5):
                rows.append({"setting": setting, "predictor": predictor, "case_id": case, "density": 0.3,
                             "pred_density": 0.2, **{m: level + 0.05 * rng.random() for m in MAP_MEASURES}})
    return pd.DataFrame(rows)


def test_map_metric_summary_bootstraps_each_measure_per_setting_and_predictor():
    per_case = _map_cases()
    table = map_metric_summary(per_case, seed=3)
    assert table[["setting", "predictor"]].values.tolist() == [["a", "Stage I"], ["a", "mean train map"],
                                                               ["b", "Stage I"], ["b", "mean train map"]]
    group = per_case[(per_case.setting == "b") & (per_case.predictor == "Stage I")]
    mean, lo, hi = bootstrap_ci(group.iou.to_numpy(), seed=3)
    row = table.iloc[2]
    assert (row.iou, row.iou_ci_low, row.iou_ci_high, row.cases) == (mean, lo, hi, 5)
    assert np.isclose(row.density, 0.3) and np.isclose(row.pred_density, 0.2)
    lines = stage1_verdicts(table, per_case, paper_cosine=0.77, seed=0)
    assert len(lines) == 2 and "beats the condition-blind mean train map" in lines[0] and "reaches" in lines[0]


def test_map_fidelity_summary_one_row_per_comparison():
    rows = [{"setting": s, "case_id": c, "density": 0.2, "stage1_density": 0.3, "stage2_density": 0.25,
             "stage1_vs_truth": 0.7, "stage2_vs_stage1": 0.9, "stage2_vs_truth": 0.6 + 0.01 * c}
            for s in ("a", "b") for c in range(4)]
    table = map_fidelity_summary(pd.DataFrame(rows), PAPER_FIDELITY, seed=0)
    assert len(table) == 2 * len(PAPER_FIDELITY) and list(table.comparison[:3]) == list(PAPER_FIDELITY)
    row = table[(table.setting == "b") & (table.comparison == "stage2_vs_truth")].iloc[0]
    assert np.isclose(row.cosine, 0.615) and row.ci_low <= row.cosine <= row.ci_high and row.paper == 0.83
    assert row.cases == 4 and np.isclose(row.stage2_density, 0.25)


def test_fidelity_curves_keep_monitored_steps_and_last_levels():
    history = pd.DataFrame({"step": [1, 2, 3, 4], "loss": [4.0, 3, 2, 1],
                            **{m: [np.nan, 0.1, np.nan, 0.4] for m in CURVE_MEASURES}})
    curves = fidelity_curve_table({"a": history, "b": history.assign(heldout_cosine=[np.nan, 0.2, np.nan, 0.5])})
    assert list(curves.columns) == ["setting", "step", *CURVE_MEASURES] and curves.step.tolist() == [2, 4, 2, 4]
    reference = pd.DataFrame([{"setting": s, "cases": split, "method": m, "case_id": c, "cosine": v + 0.1 * c,
                               "magnitude": 1.0}
                              for s in ("a", "b") for split in ("heldout", "train") for m, v in (("mean", 0.3),
                                                                                                 ("ridge", 0.5))
                              for c in range(2)])
    levels = last_step_levels(curves, reference)
    assert list(levels.columns) == ["LoFA (last step)", "mean", "ridge"]
    assert levels.loc[("b", "heldout"), "LoFA (last step)"] == 0.5
    assert levels.loc[("a", "train"), "LoFA (last step)"] == 0.4
    assert np.isclose(levels.loc[("a", "heldout"), "ridge"], 0.55)


def test_shown_targets_prefer_the_first_query_and_cross_key():
    names = ["blocks.0.attn1.to_k", "blocks.0.attn1.to_q", "blocks.0.attn2.to_k", "blocks.1.attn1.to_q"]
    assert shown_targets(names) == [1, 2]
    assert shown_targets(["x", "y", "z"]) == [0, 1]
