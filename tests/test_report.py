"""Notebook 06-07's tables and verdict lines built from scores (lofa.hypernet.report), on hand-made tables."""
import numpy as np
import pandas as pd

from lofa.config import preset
from lofa.evaluate import METRICS, ScoringConfig, paired_differences, setting_metrics
from lofa.hypernet.fidelity import PAPER_FIDELITY
from lofa.hypernet.report import heldout_quality, recon_ablation, reference_verdict_lines, stage2_verdicts

SETTINGS = (("identities", "identities", "image"),)
METHODS = ("ground truth", "base", "per-case LoRA", "LoFA")


def _scores():
    rows = [{"setting": "identities", "method": m, "sample": k, "case_id": c, "split": "heldout",
             **{metric: 0.1 * i + 0.01 * c for metric in METRICS["identities"]}, "denoise": 1.0 - 0.1 * i}
            for i, m in enumerate(METHODS) for c in range(4) for k in range(2)]
    return pd.DataFrame(rows)


def test_heldout_quality_and_the_verdict_lines():
    speed = pd.DataFrame({"setting": ["identities"], "lofa_predict_s": [0.01], "lora_train_s": [10.0],
                          "device": ["cpu"], "speedup": [1000.0]})
    per_case, quality = heldout_quality(_scores(), SETTINGS, speed, samples_per_case=2, seed=0)
    assert len(per_case) == len(METHODS) * 4 and (quality.samples_per_case == 2).all()
    assert set(quality.metric) == {*METRICS["identities"], "denoise"} and (quality.cases == 4).all()
    seconds = quality.drop_duplicates("method").set_index("method").seconds_per_lora
    assert seconds["LoFA"] == 0.01 and seconds["per-case LoRA"] == 10.0 and np.isnan(seconds["base"])
    diffs = paired_differences(per_case, "LoFA", ("base", "per-case LoRA"), setting_metrics(SETTINGS),
                               by=("setting",)).rename(columns={"difference": "lofa_minus_baseline"})
    assert (diffs.verdict == "better").all()  # LoFA's scores are the highest and its denoising loss the lowest
    fidelity = pd.DataFrame([{"setting": "identities", "comparison": c, "cosine": 0.5, "stage2_density": 0.1,
                              "true_density": 0.2} for c in PAPER_FIDELITY])
    ablation = pd.DataFrame({"setting": "identities", "metric": ["dW_L1", "acc"], "verdict": ["better", "worse"]})
    lines = stage2_verdicts(SETTINGS, fidelity, quality, diffs, speed, ablation, PAPER_FIDELITY)
    assert lines[0].startswith("identities: map fidelity") and "1,000x faster" in " ".join(lines)
    assert "settings: identities): squared error better on 0, worse on 1" in lines[-2]
    assert "in 1 of 1 settings" in lines[-1]
    verdicts = diffs.rename(columns={"baseline": "reference", "lofa_minus_baseline": "difference"}).assign(
        split="heldout")
    assert reference_verdict_lines(verdicts) == ["   identities  heldout: LoFA vs base better (+0.20), "
                                                 "per-case LoRA better (+0.10)"]


def test_the_reconstruction_ablation_runs_where_the_device_allows():
    """Mini on a CPU: the L1 ablation's extra Stage II training only for identities; on a GPU, and at smoke,
    every setting; no setting asked gives an empty table with the columns, not an error."""
    names = ["actions-text", "actions-pose", "styles", "identities"]
    mini, smoke = preset(ScoringConfig, "mini"), preset(ScoringConfig, "smoke")
    assert mini.on_device(names, mini.recon_ablation_settings_on_cpu, on_cpu=True) == ["identities"]
    assert mini.on_device(names, mini.recon_ablation_settings_on_cpu, on_cpu=False) == names
    assert smoke.on_device(names, smoke.recon_ablation_settings_on_cpu, on_cpu=True) == names
    empty = recon_ablation(None, [], {}, {}, pd.DataFrame(), 2, None)
    assert empty.empty and {"setting", "metric", "squared_minus_l1", "verdict"} <= set(empty.columns)
