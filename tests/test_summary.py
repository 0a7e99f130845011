"""The results summary `lofa reproduce` prints: each line read back from the run's own tables."""
import pandas as pd

from lofa.summary import results_summary


def test_the_summary_reads_each_table_and_leaves_out_what_the_run_did_not_make(tmp_path):
    assert results_summary(tmp_path) == []
    pd.DataFrame([{"task": "styles", "cases": 4, "gt acc": 0.9, "base acc": 0.0, "LoRA acc": 0.45, "ratio": 0.5,
                   "ratio ci_low": 0.3, "ratio ci_high": 0.7}]).to_csv(tmp_path / "03_lora_target.csv", index=False)
    pd.DataFrame([{"setting": "styles", "split": "heldout", "metric": "acc", "reference": "mean LoRA",
                   "difference": 0.25, "ci_low": 0.1, "ci_high": 0.4, "cases": 6, "verdict": "better"},
                  {"setting": "styles", "split": "heldout", "metric": "acc", "reference": "per-case LoRA",
                   "difference": -0.1, "ci_low": -0.3, "ci_high": 0.1, "cases": 6,
                   "verdict": "no significant difference"},
                  {"setting": "styles", "split": "heldout", "metric": "clip_t", "reference": "mean LoRA",
                   "difference": 9.0, "ci_low": 1.0, "ci_high": 10.0, "cases": 6, "verdict": "better"}]
                 ).to_csv(tmp_path / "07_reference_verdicts.csv", index=False)
    lines = results_summary(tmp_path)
    assert lines[0] == ("per-case LoRA exact-case recognition / ground truth's (03_lora_target.csv): "
                        "styles 0.50 [0.30, 0.70]")
    assert lines[1] == ("LoFA exact-case acc, styles heldout (07_reference_verdicts.csv): mean LoRA +0.25 (better); "
                        "per-case LoRA -0.10 (n.s.)")  # only the exact-case metric
    assert len(lines) == 2
