"""The few lines `lofa reproduce` prints at the end: what the run's tables say, read back from its figures folder.

Each line comes from one published table (nothing is recomputed) and names the file it comes from, so a reader can
follow it up; a table the run did not produce (an `--only` run, a failed step) is left out.

    for line in results_summary(Path("runs/mini/figures")):
        print(line)
"""
from __future__ import annotations

from pathlib import Path


def results_summary(figures: Path) -> list[str]:
    """Headline lines of a run's tables in `figures` (base competence, per-case LoRA quality, Stage I against the
    mean training map, LoFA against the per-case LoRA and the reference predictors)."""
    import pandas as pd

    def table(name: str):
        path = Path(figures) / name
        return pd.read_csv(path) if path.exists() else None

    lines = []
    base = table("02_base_competence.csv")
    if base is not None:
        parts = [f"{r.task} coarse acc {r.coarse_acc_base:.2f}, FD {r.fd_base_vs_renders / r.fd_other_cases_vs_renders:.1f}x"
                 f" the other-cases floor" for r in base.itertuples()]
        lines.append("base (02_base_competence.csv): " + "; ".join(parts))
    lora = table("03_lora_target.csv")
    if lora is not None:
        parts = [f"{r['task']} {r['ratio']:.2f} [{r['ratio ci_low']:.2f}, {r['ratio ci_high']:.2f}]"
                 for _, r in lora.iterrows()]
        lines.append("per-case LoRA exact-case recognition / ground truth's (03_lora_target.csv): " + "; ".join(parts))
    maps = table("05_stage1_metrics.csv")
    if maps is not None:
        cosine = maps.pivot_table(index="setting", columns="predictor", values="cosine", sort=False)
        parts = [f"{s} {row['Stage I']:.2f} vs {row['mean train map']:.2f}" for s, row in cosine.iterrows()]
        lines.append("held-out map cosine, Stage I vs mean training map (05_stage1_metrics.csv): " + "; ".join(parts))
    curves, levels = table("06_stage2_fidelity_curves.csv"), table("06_reference_fidelity.csv")
    if curves is not None and levels is not None:
        last = curves.groupby("setting", sort=False).last()
        level = levels.groupby(["setting", "cases", "method"]).cosine.mean()
        for setting, row in last.iterrows():
            parts = [f"{split} LoFA {row[f'{split}_cosine']:.2f} (" + ", ".join(
                f"{method.split()[0]} {level[(setting, split, method)]:.2f}" for method in levels.method.unique()
                if (setting, split, method) in level) + ")" for split in ("heldout", "train")]
            lines.append(f"ΔW cosine to the zoo LoRA after Stage II step {int(row.step)}, {setting} "
                         "(06_stage2_fidelity_curves.csv, 06_reference_fidelity.csv): " + "; ".join(parts))
    verdicts = table("07_reference_verdicts.csv")
    if verdicts is not None:
        acc = verdicts[verdicts.metric == "acc"]
        for (setting, split), block in acc.groupby(["setting", "split"], sort=False):
            parts = [f"{r.reference} {r.difference:+.2f} ({_short(r.verdict)})" for r in block.itertuples()]
            lines.append(f"LoFA exact-case acc, {setting} {split} (07_reference_verdicts.csv): " + "; ".join(parts))
    reached = table("08_steps_to_reach.csv")
    if reached is not None:
        for task, block in reached.groupby("task", sort=False):
            parts = []
            for r in block.itertuples():
                steps = f"not within {int(r.recipe_steps)}" if pd.isna(r.steps_to_reach) else int(r.steps_to_reach)
                parts.append(f"{r.start} {steps}")
            lines.append(f"fine-tuning steps to the per-case LoRA's exact-case acc, {task} (08_steps_to_reach.csv): "
                         + "; ".join(parts))
    return lines


def _short(verdict: str) -> str:
    """A verdict of `lofa.evaluate.paired_difference` in a word or two."""
    return "n.s." if verdict.startswith("no significant") else verdict
