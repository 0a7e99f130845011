"""The few lines `lofa reproduce` prints at the end: what the run's tables say, read back from its figures folder.

Each line comes from one published table (nothing is recomputed) and names the file it comes from, so a reader can
follow it up; a table the run did not produce (an `--only` run, a failed step) is left out.

    for line in results_summary(Path("runs/mini/figures")):
        print(line)

It also holds the checks the notebooks' closing cells run on their tables (`check_table`, `check_metric_table`,
`check_verdicts`, `check_group_sizes`): invariants that hold at every scale when the code is right.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


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
        for (method, setting, split), block in acc.groupby(["method", "setting", "split"], sort=False):
            parts = [f"{r.reference} {r.difference:+.2f} ({_short(r.verdict)})" for r in block.itertuples()]
            lines.append(f"{method} exact-case acc, {setting} {split} (07_reference_verdicts.csv): "
                         + "; ".join(parts))
    prefs = table("07_referee_preference.csv")
    if prefs is not None:
        block = prefs[(prefs.method == "LoFA") & (prefs.split == "heldout") & (prefs.metric == "acc")]
        parts = [f"{r.setting} {r.share:.0%} [{r.ci_low:.0%}, {r.ci_high:.0%}]" for r in block.itertuples()]
        lines.append("referees prefer LoFA to the per-case LoRA, held-out exact case, paired samples "
                     "(07_referee_preference.csv): " + "; ".join(parts))
    ablations = table("07_ablation_verdicts.csv")
    if ablations is not None and len(ablations):
        for setting, block in ablations[ablations.metric == "acc"].groupby("setting", sort=False):
            parts = [f"{r.baseline} {r.difference:+.2f} ({_short(r.verdict)})" for r in block.itertuples()]
            lines.append(f"LoFA − each Table 4 ablation, exact-case acc, {setting} (07_ablation_verdicts.csv): "
                         + "; ".join(parts))
    reached = table("08_steps_to_reach.csv")
    if reached is not None:
        for task, block in reached.groupby("task", sort=False):
            parts = []
            for r in block.itertuples():
                steps = f"not within {int(r.recipe_steps)}" if pd.isna(r.steps_to_reach) else int(r.steps_to_reach)
                parts.append(f"{r.start} {steps}")
            lines.append(f"fine-tuning steps to the per-case LoRA's exact-case acc, {task} (08_steps_to_reach.csv): "
                         + "; ".join(parts))
    claims = table("09_paper_claims.csv")
    if claims is not None:
        from lofa.paper import verdict_counts

        counts = ", ".join(f"{verdict} {n}" for verdict, n in verdict_counts(claims).items() if n)
        lines.append(f"the paper's claims (09_paper_claims.csv, REPORT.md): {counts}")
    return lines


def _short(verdict: str) -> str:
    """A verdict of `lofa.evaluate.paired_difference` in a word or two."""
    return "n.s." if verdict.startswith("no significant") else verdict


# ---------------------------------------------------------------- invariants of the tables (notebooks' last cells)
# What every pipeline table must satisfy at every scale if the code is right, whatever the results say: columns and
# rows as the notebook's parameters promise, numbers where numbers are due, shares in [0, 1], intervals around their
# estimates, verdicts that follow from their intervals. Each check raises TableCheckFailed naming the table and what
# is wrong, so a notebook's closing cell fails with one readable line.

# Per-sample metrics of `lofa.evaluate` (and the evaluators) by the range their values and means must lie in: shares
# of samples (recognition, the dynamic-degree indicator), cosines, and losses / distances.
SHARE_METRICS = ("acc", "attr_acc", "coarse_acc", "dynamic")
COSINE_METRICS = ("clip_t", "csd", "face_sim", "dino", "clip_i")
NONNEGATIVE_METRICS = ("denoise", "dW_L1", "fid", "fvd")
VERDICTS = ("better", "worse", "no significant difference")
# Float32 cosines of identical vectors can come out a few ulps above 1, and a bootstrap quantile that equals the
# sample mean may differ from np.mean by an ulp: comparisons allow this much.
TOLERANCE = 1e-6


class TableCheckFailed(AssertionError):
    """A pipeline table breaks an invariant; the message names the table, the check and the offending rows."""


def metric_range(metric: str) -> tuple[float, float]:
    """(lowest, highest) value a per-sample metric (or a mean of it) can take: [0, 1] for shares of samples,
    [-1, 1] for cosines, [0, inf) for losses and distances, unbounded otherwise. `acc:<component>` is a share."""
    name = metric.split(":")[0]
    if name in SHARE_METRICS:
        return 0.0, 1.0
    if name in COSINE_METRICS:
        return -1.0, 1.0
    if name in NONNEGATIVE_METRICS:
        return 0.0, float("inf")
    return float("-inf"), float("inf")


def check_table(table, name: str, *, columns: Sequence[str] = (), rows: int | None = None,
                finite: Sequence[str] = (), ranges: dict[str, tuple[float, float]] | None = None,
                intervals: Sequence[tuple[str, str, str]] = ()) -> None:
    """Raise TableCheckFailed unless the DataFrame `table` (called `name` in the message)
    - has every column of `columns`, `finite`, `ranges` and `intervals`, and exactly `rows` rows (when given);
    - has a finite number in every row of each `finite` column;
    - has each `ranges` column within its (low, high) wherever it holds a number (NaN is for `finite` to reject);
    - has low <= value <= high in every row of each (value, low, high) column triple of `intervals` whose value
      is a number.
    """
    import numpy as np

    ranges = ranges or {}
    needed = [*columns, *finite, *ranges, *(c for triple in intervals for c in triple)]
    missing = [c for c in dict.fromkeys(needed) if c not in table.columns]
    if missing:
        raise TableCheckFailed(f"{name}: missing columns {missing} (has {list(table.columns)})")
    problems = []
    if rows is not None and len(table) != rows:
        problems.append(f"{len(table)} rows, expected {rows}")
    for column in finite:
        values = table[column].to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            problems.append(f"{column} is not a finite number in rows {_rows(table, bad)}")
    for column, (low, high) in ranges.items():
        values = table[column].to_numpy(dtype=np.float64)
        bad = (values < low - TOLERANCE) | (values > high + TOLERANCE)  # NaN compares False: left to `finite`
        if bad.any():
            problems.append(f"{column} outside [{low}, {high}] in rows {_rows(table, bad)}: {values[bad][:5].tolist()}")
    for value, low, high in intervals:
        v, lo, hi = (table[c].to_numpy(dtype=np.float64) for c in (value, low, high))
        slack = TOLERANCE * np.maximum(1.0, np.abs(v))
        bad = np.isfinite(v) & ~((lo - slack <= v) & (v <= hi + slack))
        if bad.any():
            problems.append(f"{value} outside [{low}, {high}] in rows {_rows(table, bad)}")
    if problems:
        raise TableCheckFailed(f"{name}: " + "; ".join(problems))


def check_metric_table(table, name: str, *, metric: str = "metric", value: str = "mean",
                       interval: tuple[str, str] | None = ("ci_low", "ci_high")) -> None:
    """A long table of metric summaries (`lofa.evaluate.summarize`: one row per group and metric): every value a
    finite number inside its metric's range (`metric_range`), and inside its interval when the table has one."""
    import numpy as np

    check_table(table, name, columns=[metric], finite=[value],
                intervals=[(value, *interval)] if interval else ())
    bounds = np.array([metric_range(m) for m in table[metric]]).reshape(-1, 2)
    values = table[value].to_numpy(dtype=np.float64)
    bad = (values < bounds[:, 0] - TOLERANCE) | (values > bounds[:, 1] + TOLERANCE)
    if bad.any():
        found = [f"{m} {v:.4g}" for m, v in zip(table[metric][bad], values[bad])][:5]
        raise TableCheckFailed(f"{name}: {value} outside its metric's range in rows {_rows(table, bad)}: {found}")


def check_verdicts(table, name: str, *, estimate: str = "difference", low: str = "ci_low", high: str = "ci_high",
                   verdict: str = "verdict") -> None:
    """A table of paired differences (`lofa.evaluate.paired_difference`): each estimate a finite number inside its
    interval, and each verdict one of VERDICTS that follows from the interval: "better" / "worse" exactly when the
    interval excludes 0."""
    import numpy as np

    check_table(table, name, columns=[verdict], finite=[estimate], intervals=[(estimate, low, high)])
    unknown = ~table[verdict].isin(VERDICTS).to_numpy()
    if unknown.any():
        raise TableCheckFailed(f"{name}: unknown verdicts {sorted(set(table[verdict][unknown]))}")
    excludes_zero = ((table[low] > 0) | (table[high] < 0)).to_numpy()
    called = (table[verdict] != "no significant difference").to_numpy()
    bad = excludes_zero != called
    if bad.any():
        raise TableCheckFailed(f"{name}: verdict does not follow from the interval in rows {_rows(table, bad)}")


def check_group_sizes(table, name: str, by: Sequence[str], size: int) -> None:
    """Every group of `table` by the columns `by` has exactly `size` rows (e.g. samples per case and method, as the
    notebook's PER_CASE says)."""
    counts = table.groupby(list(by), sort=False).size()
    wrong = counts[counts != size]
    if len(counts) == 0 or len(wrong):
        raise TableCheckFailed(f"{name}: groups by {list(by)} should have {size} rows each; "
                               f"{'there are no groups' if len(counts) == 0 else dict(wrong.head(5))}")


def _rows(table, mask) -> list:
    """The index labels of the first few rows of `table` where `mask` is True (for messages)."""
    return table.index[mask][:5].tolist()
