"""The invariant checks of the notebooks' closing cells (`lofa.summary.check_*`): each passes a table that keeps its
invariant and names the table and the rows of one that breaks it. And the orchestrator's own: a step that leaves a
declared output empty fails."""
import json
import math

import pandas as pd
import pytest

from lofa import reproduce
from lofa.kernel import NotebookFailed
from lofa.summary import (TableCheckFailed, check_group_sizes, check_metric_table, check_table, check_verdicts,
                          metric_range)


def _table():
    return pd.DataFrame({"task": ["actions", "styles"], "acc": [0.25, 1.0], "mean": [0.5, 0.2],
                         "ci_low": [0.4, 0.2], "ci_high": [0.6, 0.3]})


def test_check_table_passes_a_table_that_keeps_its_invariants():
    check_table(_table(), "t", columns=["task"], rows=2, finite=["acc"], ranges={"acc": (0, 1)},
                intervals=[("mean", "ci_low", "ci_high")])


@pytest.mark.parametrize("change, kw, message", [
    ({}, {"columns": ["case"]}, "missing columns ['case']"),
    ({}, {"rows": 3}, "2 rows, expected 3"),
    ({"acc": [0.25, math.nan]}, {"finite": ["acc"]}, "acc is not a finite number in rows [1]"),
    ({"acc": [1.5, 1.0]}, {"ranges": {"acc": (0, 1)}}, "acc outside [0, 1] in rows [0]"),
    ({"mean": [0.5, 0.35]}, {"intervals": [("mean", "ci_low", "ci_high")]},
     "mean outside [ci_low, ci_high] in rows [1]"),
])
def test_check_table_names_what_is_broken(change, kw, message):
    broken = _table().assign(**change)
    with pytest.raises(TableCheckFailed, match="^t: .*" + message.replace("[", r"\[").replace("]", r"\]")):
        check_table(broken, "t", **kw)


def test_a_nan_is_for_finite_to_reject_not_ranges_or_intervals():
    """A NaN where no number is due (a Fréchet row has no interval) passes `ranges` and `intervals`."""
    table = _table().assign(acc=[math.nan, 0.5], ci_low=[math.nan, 0.2], ci_high=[math.nan, 0.3])
    table.loc[0, "mean"] = math.nan
    check_table(table, "t", ranges={"acc": (0, 1)}, intervals=[("mean", "ci_low", "ci_high")])
    with pytest.raises(TableCheckFailed):
        check_table(table, "t", finite=["acc"])


def test_metric_ranges():
    assert metric_range("acc") == metric_range("acc:hair_colour") == metric_range("dynamic") == (0, 1)
    assert metric_range("clip_t") == (-1, 1)
    assert metric_range("denoise") == (0, math.inf)
    assert metric_range("motion") == (-math.inf, math.inf)


def test_check_metric_table_holds_each_row_to_its_metrics_range():
    table = pd.DataFrame({"metric": ["acc", "clip_t", "denoise"], "mean": [0.5, -0.5, 3.0],
                          "ci_low": [0.4, -0.6, 2.0], "ci_high": [0.6, -0.4, 4.0]})
    check_metric_table(table, "q")
    table.loc[0, ["mean", "ci_high"]] = 1.2  # a share above 1, inside its interval
    with pytest.raises(TableCheckFailed, match=r"q: mean outside its metric's range in rows \[0\]"):
        check_metric_table(table, "q")


def test_check_verdicts_requires_the_verdict_that_the_interval_gives():
    table = pd.DataFrame({"difference": [0.2, -0.1, 0.0], "ci_low": [0.1, -0.2, -0.1], "ci_high": [0.3, 0.0, 0.1],
                          "verdict": ["better", "no significant difference", "no significant difference"]})
    check_verdicts(table, "v")
    # lower is better: "worse" where the interval lies above 0
    flipped = table.assign(verdict=["worse", "no significant difference", "no significant difference"])
    check_verdicts(flipped, "v")
    with pytest.raises(TableCheckFailed, match=r"v: verdict does not follow from the interval in rows \[0\]"):
        check_verdicts(table.assign(verdict=["no significant difference"] * 3), "v")
    with pytest.raises(TableCheckFailed, match="unknown verdicts"):
        check_verdicts(table.assign(verdict=["better", "n.s.", "no significant difference"]), "v")


def test_check_group_sizes():
    samples = pd.DataFrame({"method": ["base"] * 4, "case_id": [1, 1, 2, 2]})
    check_group_sizes(samples, "s", ["method", "case_id"], 2)
    with pytest.raises(TableCheckFailed, match="should have 3 rows each"):
        check_group_sizes(samples, "s", ["method", "case_id"], 3)
    with pytest.raises(TableCheckFailed, match="no groups"):
        check_group_sizes(samples.iloc[:0], "s", ["method"], 2)


EMPTY = """
from pathlib import Path
(Path(run_dir) / "figures").mkdir(parents=True, exist_ok=True)
(Path(run_dir) / "figures" / "full.csv").write_text("a\\n1\\n")
(Path(run_dir) / "figures" / "empty.png").write_bytes(b"")
"""


def test_a_step_that_leaves_a_declared_output_empty_fails_and_is_not_done(tmp_path, make_notebook):
    make_notebook("01_empty", [EMPTY], outputs=["figures/full.csv", "figures/empty.png"])
    with pytest.raises(NotebookFailed, match="01_empty finished but wrote empty declared outputs: figures/empty.png"):
        reproduce.run("smoke", device="cpu", run_root=tmp_path / "runs", nb_dir=tmp_path / "nbs", progress=False)
    record = json.loads((tmp_path / "runs" / "smoke" / ".cache" / "01_empty.json").read_text())
    assert record["status"] == "running"
