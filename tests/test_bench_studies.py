"""The studies of `lofa bench` (zoo-size, tau): their variant runs share one upstream's files; bad input is one line."""
import os

import pytest

from lofa.bench.tau import variant_run
from lofa.bench.zoo_size import size_run, zoo_sizes
from lofa.cli import main
from lofa.errors import LofaError
from lofa.hypernet.config import HyperConfig
from lofa.lora.zoo import LORA_DIR, ZooConfig, lora_filename, select_cases
from lofa.run import Run


def test_sizes_are_distinct_ascending_shares_of_the_training_cases():
    assert zoo_sizes(640, [1, 0.125, 0.25, 0.5]) == [80, 160, 320, 640]
    assert zoo_sizes(10, [0.01, 0.04, 1]) == [1, 10]  # never 0 training LoRAs; equal sizes once
    for bad in (0, -0.5, 1.5):
        with pytest.raises(LofaError, match=r"in \(0, 1\]"):
            zoo_sizes(640, [bad])


def _fake_full_run(root, overrides=None):
    """A smoke Run whose identities base, evaluators, encoder and one LoRA file per case exist as stand-in files."""
    full = Run("smoke", "cpu", 0, root / "all", overrides=overrides)
    world = full.world("identities")
    for part in ("base", "evaluators", "encoders"):
        full.path(part, "identities").mkdir(parents=True)
        (full.path(part, "identities") / "weights.safetensors").write_bytes(part.encode())
    loras = full.path("zoo", "identities", LORA_DIR)
    loras.mkdir(parents=True)
    for case in world.cases:
        (loras / lora_filename(case.id)).write_bytes(str(case.id).encode())
    return full, world


def test_a_size_links_every_heldout_lora_and_its_share_of_training_ones(tmp_path):
    full, world = _fake_full_run(tmp_path)
    n_heldout = len(world.ids("heldout"))
    run = size_run(full, "identities", 5, tmp_path)
    assert run.dir == tmp_path / "train-5" and run.config(ZooConfig).max_cases == n_heldout + 5
    linked = sorted(p.name for p in run.path("zoo", "identities", LORA_DIR).iterdir())
    chosen = select_cases(world, n_heldout + 5, full.seed)
    assert linked == sorted(lora_filename(c) for c in chosen)
    assert set(world.ids("heldout")) <= set(chosen) and len(set(chosen) & set(world.ids("train"))) == 5
    for name in linked:  # the big zoo's files themselves, not retrained copies
        assert os.path.samefile(run.path("zoo", "identities", LORA_DIR, name),
                                full.path("zoo", "identities", LORA_DIR, name))
    for part in ("base", "evaluators", "encoders"):
        assert (run.path(part, "identities") / "weights.safetensors").read_bytes() == part.encode()
    again = size_run(full, "identities", 5, tmp_path)  # a rerun finds everything in place
    assert sorted(p.name for p in again.path("zoo", "identities", LORA_DIR).iterdir()) == linked


def test_bad_arguments_get_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "zs.csv"
    for bad in (["--task", "styles", "--n-cases", "300"], ["--fractions", "0"]):
        assert main(["bench", "zoo-size", "--scale", "smoke", "--device", "cpu", "--run-root", str(tmp_path / "r"),
                     *bad, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lofa bench zoo-size: error:") and err.count("\n") == 1
        assert not out.exists()


def test_a_tau_variant_links_the_whole_zoo_and_changes_only_stage1s_tau(tmp_path):
    full, world = _fake_full_run(tmp_path, {"TrainConfig": {"steps": 7}, "HyperConfig": {"depth": 1}})
    run = variant_run(full, "identities", 0.05, tmp_path)
    assert run.dir == tmp_path / "tau-identities"
    assert run.config(HyperConfig).tau == 0.05 and full.config(HyperConfig).tau == 0.02
    assert run.overrides["TrainConfig"] == {"steps": 7} and run.config(HyperConfig).depth == 1  # upstream's kept
    linked = sorted(p.name for p in run.path("zoo", "identities", LORA_DIR).iterdir())
    assert linked == sorted(lora_filename(c.id) for c in world.cases)  # every case: no cap
    assert all(os.path.samefile(run.path("zoo", "identities", LORA_DIR, n), full.path("zoo", "identities", LORA_DIR, n))
               for n in linked)


def test_tau_bad_arguments_get_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "tau.csv"
    overrides = tmp_path / "o.yaml"
    overrides.write_text("HyperConfig: {tau: 0.1}\n")
    for bad in (["--below", "1.5"], ["--below", "0"], ["--overrides", str(overrides)]):
        assert main(["bench", "tau", "--scale", "smoke", "--device", "cpu", "--run-root", str(tmp_path / "r"),
                     *bad, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lofa bench tau: error:") and err.count("\n") == 1
        assert not out.exists()


def test_tau_summaries_label_each_setting_with_its_own_tau():
    import pandas as pd

    from lofa.bench.tau import PAPER_TAU, SPARSE_TAU, per_model_summary

    rows = pd.DataFrame([{"hypernet": h, "setting": s, "tau": tau, "case_id": c, "cosine": 0.5 + 0.1 * c}
                         for s, sparse in (("actions-text", 0.59), ("styles", 0.23))
                         for h, tau in ((PAPER_TAU, 0.02), (SPARSE_TAU, sparse)) for c in range(3)])

    def mean_cosine(block, scale=1.0):
        return pd.DataFrame([{"setting": block.setting.iloc[0], "cosine": scale * block.cosine.mean()}])

    table = per_model_summary(rows, mean_cosine, scale=2.0)
    assert table[["setting", "hypernet", "tau"]].values.tolist() == [
        ["actions-text", PAPER_TAU, 0.02], ["actions-text", SPARSE_TAU, 0.59],
        ["styles", PAPER_TAU, 0.02], ["styles", SPARSE_TAU, 0.23]]
    assert table.cosine.tolist() == pytest.approx([1.2] * 4)
