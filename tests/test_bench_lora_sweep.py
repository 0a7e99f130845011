import pandas as pd
import pytest

from lofa.bench.lora_sweep import parse_set, points
from lofa.cli import main
from lofa.errors import LofaError
from lofa.lora.train import LoraTrainConfig


def test_points_move_one_knob_of_the_tasks_recipe():
    cfg = LoraTrainConfig(steps=100, lr=2e-3, rank=4, alpha=4.0, batch_size=2)
    p = points(cfg, [50, 200], knobs=True)
    assert p == {"50 steps": {"steps": 50}, "200 steps": {"steps": 200}, "lr x 2.5": {"lr": 5e-3},
                 "rank x 2": {"rank": 8, "alpha": 8.0}, "batch x 4": {"batch_size": 8}}
    assert list(points(cfg, [], knobs=False)) == []


def test_fixed_fields_go_under_every_point_and_into_its_label():
    cfg = LoraTrainConfig(steps=100, batch_size=2, include_ffn=False)
    p = points(cfg, [400], knobs=True, fixed={"include_ffn": True, "batch_size": 8})
    assert p["400 steps | include_ffn=True, batch_size=8"] == {"include_ffn": True, "batch_size": 8, "steps": 400}
    # knobs move from the fixed recipe: batch x 4 of 8, not of the preset's 2
    assert p["batch x 4 | include_ffn=True, batch_size=8"]["batch_size"] == 32


def test_set_items_are_typed_from_the_fields_defaults_and_checked():
    assert parse_set(["include_ffn=true", "batch_size=8", "lr=1e-3"], LoraTrainConfig) == \
        {"include_ffn": True, "batch_size": 8, "lr": 1e-3}
    with pytest.raises(LofaError, match="no field 'ffn'"):
        parse_set(["ffn=true"], LoraTrainConfig)
    with pytest.raises(LofaError, match="not of type int"):
        parse_set(["rank=four"], LoraTrainConfig)
    with pytest.raises(LofaError, match="FIELD=VALUE"):
        parse_set(["include_ffn"], LoraTrainConfig)


def test_finished_points_are_skipped_without_touching_models(tmp_path, capsys):
    """A rerun resumes: points already in the CSV are not retrained (the run folder has no base to load)."""
    out = tmp_path / "sweep.csv"
    pd.DataFrame([{"task": "identities", "point": "7 steps", "ratio": 0.5}]).to_csv(out, index=False)
    before = out.read_text()
    assert main(["bench", "sweep", "--run-dir", str(tmp_path / "run"), "--scale", "smoke", "--device", "cpu",
                 "--tasks", "identities", "--steps", "7", "--out", str(out)]) == 0
    assert out.read_text() == before and not (tmp_path / "run" / "base").exists()


def test_bad_arguments_get_one_line_and_exit_2(tmp_path, capsys):
    for bad in (["--steps", "0"], ["--set", "rnak=8"]):
        assert main(["bench", "sweep", "--run-dir", str(tmp_path), *bad, "--out", str(tmp_path / "s.csv")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lofa bench sweep: error:") and err.count("\n") == 1
        assert not (tmp_path / "s.csv").exists()
