import pytest

from lofa.errors import LofaError
from lofa.run import Run


def test_build_refuses_unknown_steps_before_running_anything(tmp_path):
    run = Run("smoke", "cpu", 0, tmp_path)
    with pytest.raises(LofaError, match="unknown step 'hypernet'"):
        run.build([("base", "actions"), ("hypernet", "actions")])
    assert not (tmp_path / "base").exists()


def test_build_in_worker_processes_writes_the_artifacts_the_run_then_loads(tmp_path):
    run = Run("smoke", "cpu", 0, tmp_path)
    run.build([("condition_encoder", "styles"), ("condition_encoder", "identities")], workers=2)
    for task in ("styles", "identities"):
        assert (tmp_path / "encoders" / task / "encoder.safetensors").exists()
        run.condition_encoder(task)  # loads, trains nothing


def test_lofa_train_runs_as_two_processes(tmp_path):
    """`lofa train` under a 2-process launch (torchrun on CPU: what `accelerate launch --multi_gpu` starts, one
    process per GPU): the main process builds the upstream artifacts, both train, one predictor folder is written."""
    import json
    import os
    import subprocess
    import sys

    from lofa.hypernet import LoFA

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lofa.cli", "train",
           "--scale", "smoke", "--setting", "identities", "--run-root", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on 2 processes" in r.stdout
    out = tmp_path / "smoke" / "hypernet" / "identities" / "lofa"
    for stage in ("stage1", "stage2"):
        history = json.loads((out / stage / "history.json").read_text())
        assert history and all(h["processes"] == 2 for h in history)
    LoFA.from_pretrained(out, device="cpu")


@pytest.mark.parametrize("extra, message", [(["--setting", "nope"], "unknown setting 'nope'"),
                                            (["--setting", "styles", "--overrides", "missing.yaml"],
                                             "overrides file missing.yaml not found")])
def test_lofa_train_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, capsys, extra, message):
    from lofa.cli import main

    assert main(["train", "--run-root", str(tmp_path / "runs"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "runs").exists()


def test_variants_train_stage2_from_the_shared_stage1(tmp_path):
    """The L1-on-factors ablation: its Stage II starts from the one Stage I (no second Stage I is trained), sees
    the same batches, and differs from LoFA's only in the reconstruction term. The shared-head ablation of a
    per-target configuration has the paper's head, saved and loaded as such."""
    import torch

    run = Run("smoke", "cpu", 0, tmp_path, overrides={"HyperConfig": {"lora_head": "per_target"}})
    lofa = run.hypernet("identities", 2, progress=False)
    shared = run.hypernet("identities", 2, "shared_head", progress=False)
    assert lofa.stage2.cfg.lora_head == "per_target" and shared.stage2.cfg.lora_head == "shared"
    assert lofa.stage2.lora_head.a_per_target is not None and shared.stage2.lora_head.a_per_target is None
    assert not (tmp_path / "hypernet" / "identities" / "shared_head" / "stage1").exists()
    factors = run.hypernet("identities", 2, "recon_factors", progress=False)
    assert not (tmp_path / "hypernet" / "identities" / "recon_factors" / "stage1").exists()
    s1a, s1b = lofa.stage1.state_dict(), factors.stage1.state_dict()
    assert all(torch.equal(s1a[k], s1b[k]) for k in s1a)
    h_delta, h_factors = run.hypernet_history("identities", 2), run.hypernet_history("identities", 2, "recon_factors")
    assert len(h_delta) == len(h_factors)
    assert h_delta.recon.iloc[0] != pytest.approx(h_factors.recon.iloc[0], rel=1e-3)  # a different L1 term
    w2a, w2b = lofa.stage2.state_dict(), factors.stage2.state_dict()
    assert any(not torch.equal(w2a[k], w2b[k]) for k in w2a)
    with pytest.raises(LofaError, match="unknown hypernetwork variant 'nope'"):
        run.hypernet("identities", 2, "nope")


def test_zoo_shard_keys_are_parsed_or_refused_in_one_line(tmp_path):
    from lofa.run import _zoo_shard

    assert _zoo_shard("styles:1/3") == ("styles", (1, 3))
    for bad in ("styles", "styles:1", "styles:a/2"):
        with pytest.raises(LofaError, match="write TASK:I/N"):
            _zoo_shard(bad)


def test_a_step_built_twice_gives_identical_artifacts_in_process_and_in_a_worker(tmp_path):
    """Reproducibility: the smoke base of one task, trained here (one thread) and in a Run.build worker process
    in another run folder, has the same loss table and the same weights, byte for byte."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as Run.build's workers run
    try:
        Run("smoke", "cpu", 0, tmp_path / "a", pretrained=False).base("actions", progress=False)
    finally:
        torch.set_num_threads(threads)
    Run("smoke", "cpu", 0, tmp_path / "b", pretrained=False).build([("base", "actions"), ("base", "styles")],
                                                                     workers=2)
    for rel in ("loss.json", "generator/diffusion_pytorch_model.safetensors"):
        here, in_worker = tmp_path / "a" / "base" / "actions" / rel, tmp_path / "b" / "base" / "actions" / rel
        assert here.read_bytes() == in_worker.read_bytes(), rel


def test_text_to_lora_baseline_trains_with_stage2s_loop_once_and_its_cost_is_measured(tmp_path):
    """Run.text_to_lora trains the baseline on the setting's zoo with Stage II's step budget, saves it, and a later
    run loads the folder instead of training again; prediction_cost counts its parameters and times a prediction."""
    from lofa.evaluate import prediction_cost
    from lofa.hypernet.train import Stage2TrainConfig

    run = Run("smoke", "cpu", 0, tmp_path)
    model = run.text_to_lora("identities", progress=False)
    out = tmp_path / "baselines" / "identities" / "text-to-lora"
    history = (out / "history.json").read_text()
    assert history.count('"step"') == run.config(Stage2TrainConfig).steps
    weights = out / "text_to_lora.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = Run("smoke", "cpu", 0, tmp_path).text_to_lora("identities", progress=False)
    assert weights.stat().st_mtime_ns == stamp and (out / "history.json").read_text() == history
    data = run.triplets("identities")
    cost = prediction_cost(again, data.conditions("eval"), data.heldout_ids[:2])
    assert cost["parameters"] == sum(p.numel() for p in model.parameters()) > 0
    assert cost["predict_ms"] > 0 and cost["device"] == "cpu"
    with pytest.raises(LofaError, match="at least one case"):
        prediction_cost(again, data.conditions("eval"), [])
    with pytest.raises(LofaError, match="unknown setting"):
        run.text_to_lora("faces")


def _world_summary(run, task, scale_by):
    """A Run.map job: this run's world of `task`, summarised (module level: spawn workers import it)."""
    if task == "fails":
        raise LofaError("a job's error")
    world = run.world(task)
    return task, len(world.cases) * scale_by, str(run.dir)


def test_map_runs_jobs_in_workers_in_key_order_and_gives_what_this_process_would(tmp_path):
    run = Run("smoke", "cpu", 0, tmp_path)
    tasks = ["identities", "styles", "actions"]
    here = run.map(_world_summary, tasks, 2, workers=1)
    assert [t for t, *_ in here] == tasks and all(d == str(tmp_path) for *_, d in here)
    assert run.map(_world_summary, tasks, 2, workers=2) == here
    with pytest.raises(LofaError, match="a job's error"):
        run.map(_world_summary, ["styles", "fails"], 1, workers=2)


def test_a_run_of_some_tasks_loops_over_their_tasks_and_settings_only(tmp_path):
    from lofa.run import SETTINGS, TASKS, select_tasks

    assert select_tasks("all") == TASKS == Run(run_dir=tmp_path).tasks
    assert select_tasks("identities,actions") == select_tasks(["actions", "identities"]) == ("actions", "identities")
    run = Run("smoke", "cpu", 0, tmp_path, tasks="actions")
    assert run.tasks == ("actions",) and [s for s, *_ in run.settings] == ["actions-text", "actions-pose"]
    assert Run(*run.args()).settings == run.settings  # a worker process opens the same selection
    assert Run(run_dir=tmp_path).settings == SETTINGS
    for bad in ("", "faces", "actions,faces", "all,styles"):
        with pytest.raises(LofaError, match="unknown task selection"):
            select_tasks(bad)
