"""The results summary `lofa reproduce` prints: each line read back from the run's own tables."""
import pandas as pd

from lofa.summary import results_summary


def test_the_summary_reads_each_table_and_leaves_out_what_the_run_did_not_make(tmp_path):
    assert results_summary(tmp_path) == []
    pd.DataFrame([{"task": "styles", "cases": 4, "gt acc": 0.9, "base acc": 0.0, "LoRA acc": 0.45, "ratio": 0.5,
                   "ratio ci_low": 0.3, "ratio ci_high": 0.7}]).to_csv(tmp_path / "03_lora_target.csv", index=False)
    pd.DataFrame([{"setting": "styles", "split": "heldout", "metric": "acc", "reference": "mean LoRA",
                   "difference": 0.25, "ci_low": 0.1, "ci_high": 0.4, "cases": 6, "verdict": "better", "method": "LoFA"},
                  {"setting": "styles", "split": "heldout", "metric": "acc", "reference": "per-case LoRA",
                   "difference": -0.1, "ci_low": -0.3, "ci_high": 0.1, "cases": 6,
                   "verdict": "no significant difference", "method": "LoFA"},
                  {"setting": "styles", "split": "heldout", "metric": "clip_t", "reference": "mean LoRA",
                   "difference": 9.0, "ci_low": 1.0, "ci_high": 10.0, "cases": 6, "verdict": "better", "method": "LoFA"}]
                 ).to_csv(tmp_path / "07_reference_verdicts.csv", index=False)
    pd.DataFrame([{"setting": "styles", "step": 1, "heldout_cosine": 0.1, "train_cosine": 0.2},
                  {"setting": "styles", "step": 50, "heldout_cosine": 0.3, "train_cosine": 0.6}]
                 ).to_csv(tmp_path / "06_stage2_fidelity_curves.csv", index=False)
    pd.DataFrame([{"setting": "styles", "cases": split, "method": method, "case_id": c, "cosine": value + c / 100}
                  for split, method, value in (("heldout", "mean LoRA", 0.1), ("heldout", "ridge LoRA", 0.2),
                                               ("train", "mean LoRA", 0.15), ("train", "ridge LoRA", 0.5))
                  for c in (-1, 1)]).to_csv(tmp_path / "06_reference_fidelity.csv", index=False)
    pd.DataFrame([{"task": "identities", "start": "LoFA (identities)", "steps_to_reach": 25.0, "recipe_steps": 200},
                  {"task": "identities", "start": "recipe start", "steps_to_reach": float("nan"), "recipe_steps": 200}]
                 ).to_csv(tmp_path / "08_steps_to_reach.csv", index=False)
    pd.DataFrame([{"setting": "styles", "split": split, "metric": metric, "method": method,
                   "against": "per-case LoRA", "share": 0.25, "ci_low": 0.1, "ci_high": 0.4, "cases": 6, "pairs": 12}
                  for split in ("heldout", "train") for metric in ("acc", "csd")
                  for method in ("LoFA", "LoFA, norm-matched")]).to_csv(tmp_path / "07_referee_preference.csv",
                                                                       index=False)
    pd.DataFrame(columns=["setting", "metric", "baseline", "difference", "ci_low", "ci_high", "cases", "verdict",
                          "method"]).to_csv(tmp_path / "07_ablation_verdicts.csv", index=False)  # none at this scale
    lines = results_summary(tmp_path)
    assert lines[3] == ("referees prefer LoFA to the per-case LoRA, held-out exact case, paired samples "
                        "(07_referee_preference.csv): styles 25% [10%, 40%]")
    del lines[3]
    assert lines[1] == ("ΔW cosine to the zoo LoRA after Stage II step 50, styles (06_stage2_fidelity_curves.csv, "
                        "06_reference_fidelity.csv): heldout LoFA 0.30 (mean 0.10, ridge 0.20); train LoFA 0.60 "
                        "(mean 0.15, ridge 0.50)")
    assert lines[3] == ("fine-tuning steps to the per-case LoRA's exact-case acc, identities (08_steps_to_reach.csv): "
                        "LoFA (identities) 25; recipe start not within 200")
    assert lines[0] == ("per-case LoRA exact-case recognition / ground truth's (03_lora_target.csv): "
                        "styles 0.50 [0.30, 0.70]")
    assert lines[2] == ("LoFA exact-case acc, styles heldout (07_reference_verdicts.csv): mean LoRA +0.25 (better); "
                        "per-case LoRA -0.10 (n.s.)")  # only the exact-case metric
    assert len(lines) == 4


def test_summary_names_each_ablations_difference_from_lofa_where_the_run_scored_them(tmp_path):
    pd.DataFrame([{"setting": "identities", "metric": metric, "baseline": baseline, "difference": d, "ci_low": d - 0.1,
                   "ci_high": d + 0.1, "cases": 6, "verdict": verdict, "method": "LoFA"}
                  for metric in ("acc", "face_sim")
                  for baseline, d, verdict in (("w/o response", 0.2, "better"),
                                               ("prompt input", 0.0, "no significant difference"))]
                 ).to_csv(tmp_path / "07_ablation_verdicts.csv", index=False)
    assert results_summary(tmp_path) == [
        "LoFA − each Table 4 ablation, exact-case acc, identities (07_ablation_verdicts.csv): w/o response +0.20 "
        "(better); prompt input +0.00 (n.s.)"]
