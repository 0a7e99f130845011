"""The paper's claims against a run (lofa.paper): each verdict follows from its table by the stated rule."""
import json
from pathlib import Path

import numpy as np
import pandas as pd

from lofa.paper import (CLAIMS, FAILS, HOLDS, MISSING, PAPER_FIGURES, PAPER_TABLES, UNDECIDED, UNTESTABLE,
                        assess_claims, paper_figures, paper_tables, provenance, report_markdown, verdict_counts,
                        write_report)


def _verdicts(table, key):
    block = table[table.key == key]
    return dict(zip(block.setting, block.verdict))


def test_every_claim_reads_not_in_this_run_or_untestable_without_tables(tmp_path):
    table = assess_claims(tmp_path)
    assert list(dict.fromkeys(table.key)) == [c.key for c in CLAIMS]
    assert set(table.verdict) == {MISSING, UNTESTABLE}
    untestable = sum(1 for c in CLAIMS if c.section == "paper" and c.table is None)
    assert verdict_counts(table)[UNTESTABLE] == untestable
    assert verdict_counts(table)[MISSING] == sum(1 for c in CLAIMS if c.section == "paper") - untestable
    assert provenance(tmp_path) == ""


def test_sparsity_holds_inside_the_band_fails_outside_and_is_undecided_across_its_edge(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"task": task, "fraction_below": value}
            for task, centre in (("actions", 0.65), ("styles", 0.1), ("identities", 0.5))
            for value in centre + 0.02 * rng.standard_normal(40)]
    pd.DataFrame(rows).to_csv(tmp_path / "04_sparsity_per_lora.csv", index=False)
    assert _verdicts(assess_claims(tmp_path), "sparsity") == {"actions": HOLDS, "styles": FAILS,
                                                               "identities": UNDECIDED}


def test_map_fidelity_compares_the_interval_with_the_papers_number(tmp_path):
    pd.DataFrame([{"setting": s, "comparison": "stage1_vs_truth", "cosine": c, "ci_low": c - 0.01,
                   "ci_high": c + 0.01, "paper": 0.77, "cases": 8}
                  for s, c in (("styles", 0.9), ("identities", 0.6), ("actions-text", 0.765))]
                 ).to_csv(tmp_path / "06_map_fidelity.csv", index=False)
    assert _verdicts(assess_claims(tmp_path), "stage1-fidelity") == {"styles": HOLDS, "identities": FAILS,
                                                                      "actions-text": UNDECIDED}


def test_on_par_claims_hold_unless_worse_and_better_claims_only_when_better(tmp_path):
    rows = []
    for reference in ("per-case LoRA", "Text-to-LoRA", "mean LoRA"):
        for setting, metric, verdict, difference in (("styles", "csd", "worse", -0.3),
                                                     ("styles", "acc", "no significant difference", 0.0),
                                                     ("identities", "acc", "better", 0.2),
                                                     ("identities", "dino", "worse", -0.1)):  # not a claim's metric
            rows.append({"setting": setting, "split": "heldout", "metric": metric, "reference": reference,
                         "difference": difference, "ci_low": difference - 0.1 if verdict != "better" else 0.1,
                         "ci_high": difference + 0.1 if verdict != "worse" else -0.1, "cases": 12,
                         "verdict": verdict, "method": "LoFA"})
    pd.DataFrame(rows).to_csv(tmp_path / "07_reference_verdicts.csv", index=False)
    table = assess_claims(tmp_path)
    assert _verdicts(table, "lofa-vs-lora") == {"styles · csd": FAILS, "styles · acc": HOLDS,
                                                 "identities · acc": HOLDS}
    assert _verdicts(table, "lofa-vs-t2l") == {"styles · csd": FAILS, "styles · acc": FAILS,
                                                "identities · acc": HOLDS}
    assert _verdicts(table, "lofa-vs-mean") == {"styles · acc": FAILS, "identities · acc": HOLDS}
    # the norm-matched rows are another method's: absent from this table
    assert set(_verdicts(table, "matched-vs-mean").values()) == {MISSING}


def test_speed_and_prior_rules(tmp_path):
    pd.DataFrame([{"setting": "styles", "method": "LoFA", "parameters": 10, "predict_ms": 20.0, "device": "cpu",
                   "per_case_lora_train_s": 3.0},
                  {"setting": "identities", "method": "LoFA", "parameters": 10, "predict_ms": 20.0, "device": "cpu",
                   "per_case_lora_train_s": 1.0},
                  {"setting": "identities", "method": "Text-to-LoRA", "parameters": 10, "predict_ms": 1.0,
                   "device": "cpu", "per_case_lora_train_s": 1.0}]).to_csv(tmp_path / "07_methods.csv", index=False)
    pd.DataFrame([{"task": "identities", "start": "recipe start", "steps_to_reach": 100.0, "recipe_steps": 200},
                  {"task": "identities", "start": "LoFA (identities)", "steps_to_reach": 25.0, "recipe_steps": 200},
                  {"task": "styles", "start": "recipe start", "steps_to_reach": np.nan, "recipe_steps": 200},
                  {"task": "styles", "start": "LoFA (styles)", "steps_to_reach": np.nan, "recipe_steps": 200},
                  {"task": "actions", "start": "recipe start", "steps_to_reach": 50.0, "recipe_steps": 200},
                  {"task": "actions", "start": "LoFA (actions-text)", "steps_to_reach": np.nan, "recipe_steps": 200}]
                 ).to_csv(tmp_path / "08_steps_to_reach.csv", index=False)
    table = assess_claims(tmp_path)
    assert _verdicts(table, "seconds-vs-hours") == {"styles": HOLDS, "identities": FAILS}  # 150× vs 50×
    assert _verdicts(table, "prior") == {"LoFA (identities)": HOLDS, "LoFA (styles)": UNDECIDED,
                                         "LoFA (actions-text)": FAILS}


def test_report_has_one_section_per_claim_and_names_the_runs_provenance(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"a.csv": {"git_commit": "abcdef0123", "device": "cpu", "created": "2026-12-07T01:00:00+0000"},
         "b.csv": {"git_commit": "abcdef0123", "device": "cpu", "created": "2026-12-07T02:00:00+0000"}}))
    line = provenance(tmp_path)
    assert "commit abcdef0" in line and "2026-12-07T01:00:00+0000 to 2026-12-07T02:00:00+0000" in line
    table = assess_claims(tmp_path)
    text = report_markdown(table, "mini", line)
    assert text.count("### ") == len(CLAIMS) and line in text
    path = write_report(table, tmp_path / "REPORT.md", "mini", line)
    assert path.read_text() == text + "\n"
    assert "## The paper's figures" not in text


def test_report_shows_the_paper_figures_the_run_drew(tmp_path):
    from lofa.figures import FIGURES, figure_name

    # the figure files notebook 07 writes are the ones the report looks for
    assert {f"{figure_name(s)}.png" for s in FIGURES} <= {name for *_, name in PAPER_FIGURES}
    (tmp_path / "07_fig7_identities.png").write_bytes(b"png")
    (tmp_path / "04_fig2_response_maps.png").write_bytes(b"png")
    figures = paper_figures(tmp_path)
    assert [f for f, *_ in figures] == ["Fig. 2", "Fig. 7"]
    text = report_markdown(assess_claims(tmp_path), "mini", figures=figures)
    assert "## The paper's figures" in text and "](07_fig7_identities.png)" in text and "fig4" not in text


def test_preference_holds_unless_its_interval_lies_below_half_on_the_paper_metric(tmp_path):
    rows = [{"setting": setting, "split": split, "metric": metric, "method": method, "against": "per-case LoRA",
             "share": share, "ci_low": share - 0.1, "ci_high": share + 0.1, "cases": 12, "pairs": 24}
            for setting, metric, share in (("styles", "csd", 0.3), ("styles", "acc", 0.45), ("styles", "dino", 0.1),
                                           ("identities", "face_sim", 0.6))
            for split in ("heldout", "train") for method in ("LoFA", "LoFA, norm-matched")]
    pd.DataFrame(rows).to_csv(tmp_path / "07_referee_preference.csv", index=False)
    # styles · dino is not a claim's metric; the train split and the norm-matched rows are not the claim's
    assert _verdicts(assess_claims(tmp_path), "preference") == {"styles · csd": FAILS, "styles · acc": HOLDS,
                                                                 "identities · face_sim": HOLDS}


def test_paper_tables_take_each_tables_settings_metrics_and_the_time_column():
    references = pd.DataFrame([{"setting": setting, "split": split, "method": method, "metric": metric,
                                "mean": 0.5, "ci_low": 0.4, "ci_high": 0.6, "cases": 12}
                               for setting, metrics in (("actions-text", ("clip_t", "acc", "csd")),
                                                        ("identities", ("face_sim", "acc")))
                               for split in ("heldout", "train") for method in ("LoFA", "per-case LoRA")
                               for metric in metrics])
    methods = pd.DataFrame([{"setting": "identities", "method": "LoFA", "predict_ms": 20.0,
                             "per_case_lora_train_s": 60.0}])
    data = paper_tables(references, methods)
    assert set(data.table) == {"Table 1", "Table 3"}
    assert set(data[data.table == "Table 1"].metric) == {"clip_t", "acc"}  # csd is not one of Table 1's columns
    time = data[data.metric == "adapt_s"].set_index("method")["mean"].to_dict()
    assert time == {"LoFA": 0.02, "per-case LoRA": 60.0}
    assert len(data) == 2 * 2 + 2 * 2 + 2  # held-out rows only, two methods, plus the Time column
    text = report_markdown(assess_claims(Path("/nonexistent")), "mini", "", data)
    assert "### Table 1 · human action video" in text and "### Table 2" not in text
    assert "| identities | LoFA | 0.5 [0.4, 0.6] | 0.5 [0.4, 0.6] | 0.02 |" in text  # columns the run scored
    assert "| identities | per-case LoRA | 0.5 [0.4, 0.6] | 0.5 [0.4, 0.6] | 60 |" in text
    assert text.count("### ") == len(CLAIMS) + 2 and len(PAPER_TABLES) == 4
    ablations = references.assign(method=references.method.map({"LoFA": "LoFA", "per-case LoRA": "w/o response"}))
    with_table4 = paper_tables(references, methods, ablations)
    table4 = with_table4[with_table4.table == "Table 4"]
    assert set(table4.method) == {"LoFA", "w/o response"} and set(table4.metric) == {"acc", "csd", "face_sim"}
    assert paper_tables(references, methods, ablations.iloc[:0]).equals(data)  # an empty ablation table: no Table 4


def test_ablations_hold_only_when_lofa_is_better_and_an_empty_table_is_untestable(tmp_path):
    rows = [{"setting": "styles", "metric": metric, "baseline": baseline, "difference": d, "ci_low": d - 0.05,
             "ci_high": d + 0.05, "cases": 12, "verdict": verdict, "method": "LoFA"}
            for baseline, metric, d, verdict in (("w/o response", "csd", 0.2, "better"),
                                                 ("lightweight", "csd", 0.0, "no significant difference"),
                                                 ("prompt input", "acc", -0.2, "worse"),
                                                 ("prompt input", "dino", 0.3, "better"))]  # dino: no claim's metric
    pd.DataFrame(rows).to_csv(tmp_path / "07_ablation_verdicts.csv", index=False)
    assert _verdicts(assess_claims(tmp_path), "ablations") == {"styles · w/o response · csd": HOLDS,
                                                                "styles · lightweight · csd": FAILS,
                                                                "styles · prompt input · acc": FAILS}
    pd.DataFrame(columns=list(rows[0])).to_csv(tmp_path / "07_ablation_verdicts.csv", index=False)
    assert _verdicts(assess_claims(tmp_path), "ablations") == {"all": UNTESTABLE}


def test_a_run_of_some_tasks_expects_their_tables_and_figures_only():
    from lofa.paper import expected_figures, expected_tables

    assert expected_tables(["identities"], ablations=False) == ["Table 3"]
    assert expected_tables(["identities"], ablations=True) == ["Table 3", "Table 4"]
    assert expected_tables(["actions-text", "actions-pose", "styles", "identities"], ablations=False) == \
        ["Table 1", "Table 2", "Table 3"]
    assert [f for f, *_ in expected_figures(("identities",))] == ["Fig. 1", "Fig. 2", "Fig. 7"]
    assert [f for f, *_ in expected_figures(("actions",))] == ["Fig. 1", "Fig. 2", "Fig. 4", "Fig. 5"]
