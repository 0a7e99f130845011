"""Notebook 03's tables of the zoo's quality (lofa.lora.quality), on a hand-made per-case table."""
import numpy as np
import pandas as pd

from lofa.evaluate import METRICS, ratio_of_means
from lofa.lora.quality import PAPER_METRIC, TARGET, quality_table, target_table, target_verdicts


def _per_case():
    rows = []
    for task in ("styles", "identities"):
        for case in range(4):
            for method, acc, denoise in (("ground truth", 1.0, np.nan), ("base", 0.0, 2.0),
                                         ("LoRA", 1.0 if case < 3 else 0.0, 1.0)):
                rows.append({"task": task, "method": method, "case_id": case, "split": "heldout" if case else "train",
                             **{m: 0.5 for m in METRICS[task]}, "acc": acc, PAPER_METRIC[task]: 0.1 + acc,
                             "denoise": denoise})
    return pd.DataFrame(rows)


def test_target_table_ratio_gains_and_verdict():
    per_case = _per_case()
    target = target_table(per_case, seed=0)
    assert list(target.task) == ["styles", "identities"] and (target.cases == 4).all()
    row = target.iloc[0]
    ratio = ratio_of_means(np.array([1.0, 1, 1, 0]), np.ones(4), seed=0)
    assert (row.ratio, row["ratio ci_low"], row["ratio ci_high"]) == ratio
    assert row.target == TARGET and row.met and row["cases improved"] == 0.75 and row["cases same"] == 0.25
    assert np.isclose(row["paper metric gain"], 0.75) and np.isclose(row["denoise reduction"], 0.5)
    assert "MET" in target_verdicts(target)[0]


def test_quality_table_summarises_all_and_per_split_then_frechet():
    per_case = _per_case()
    frechet = [{"task": "styles", "method": "base", "split": "all", "metric": "fvd", "mean": 3.0, "cases": 4}]
    quality = quality_table(per_case, frechet, seed=0)
    assert list(quality.columns) == ["task", "split", "method", "metric", "mean", "ci_low", "ci_high", "cases"]
    assert set(quality.split) == {"all", "train", "heldout"} and quality.iloc[-1].metric == "fvd"
    lora_acc = quality[(quality.task == "styles") & (quality.split == "all") & (quality.method == "LoRA")
                       & (quality.metric == "acc")].iloc[0]
    assert np.isclose(lora_acc["mean"], 0.75) and lora_acc.cases == 4
