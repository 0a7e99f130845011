import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lofa.errors import LofaError
from lofa.io import read_json
from lofa.lora.formats import load_lora
from lofa.lora.train import apply_lora
from lofa.lora.zoo import INDEX, Zoo, build_zoo
from test_lora_train import StubText, StubWorld, tiny_config, tiny_generator

pytestmark = pytest.mark.usefixtures("one_thread")

TESTS = Path(__file__).resolve().parent


def _build(zoo_dir, n_cases=6, shard=None, **cfg):
    return build_zoo(StubWorld(n_cases), tiny_generator(), tiny_config(**{"steps": 2, "group_size": 4, **cfg}),
                     zoo_dir, seed=0, text=StubText(), progress=False, shard=shard)


def _check_consistent(zoo_dir, n_cases):
    """Every case has exactly one valid LoRA file and one index entry that agrees with the file's metadata."""
    index = read_json(zoo_dir / INDEX)
    assert [e["case_id"] for e in index["loras"]] == list(range(n_cases))
    assert sorted(p.name for p in (zoo_dir / "loras").iterdir()) == [f"case_{c:05d}.safetensors" for c in range(n_cases)]
    assert not list(zoo_dir.glob(".*")), "temp files left behind"
    for entry in index["loras"]:
        weights, meta = load_lora(zoo_dir / entry["file"])
        assert meta["case_id"] == entry["case_id"] and meta["run_id"] == entry["run_id"]
        assert all(f.rank == entry["rank"] and f.alpha == entry["alpha"] for f in weights.values())
    return {e["case_id"]: e for e in index["loras"]}


def test_zoo_files_index_and_reader(tmp_path):
    zoo = _build(tmp_path / "zoo")
    entries = _check_consistent(tmp_path / "zoo", 6)
    assert len(zoo) == 6 and zoo.case_ids("heldout") == [5] and 5 in zoo and zoo.task == "identities"
    entry = zoo[2]
    for key in ("task", "case_id", "case_name", "prompts", "condition_seed", "steps", "seed", "final_loss",
                "wall_time_s", "rank", "alpha", "trainer", "split"):
        assert entry[key] is not None, key
    assert entry["prompts"][0] == StubWorld().prompt(2, 0) and entry["steps"] == 2 and entry["trainer"] == "batched"
    assert len({e["condition_seed"] for e in entries.values()}) == 6
    weights, meta = zoo.load(2)
    assert meta["case_id"] == 2
    gen = tiny_generator()
    with apply_lora(gen, weights):
        pass
    assert list(zoo.frame().index) == list(range(6))
    with pytest.raises(LofaError, match="no LoRA for case 9"):
        zoo.path(9)
    with pytest.raises(LofaError, match="no index.json"):
        Zoo(tmp_path / "nothing")


def test_a_finished_zoo_is_only_read(tmp_path, monkeypatch):
    """Opening a finished zoo again (as notebook 07's workers do, side by side) writes nothing: a write there raced
    another process's (one renamed its index over the other's, or removed its temp file as a leftover)."""
    from lofa.lora import zoo as zoo_module

    _build(tmp_path / "zoo")
    before = (tmp_path / "zoo" / INDEX).read_bytes()

    def no_write(*args, **kwargs):
        raise AssertionError("a finished zoo was written")

    monkeypatch.setattr(zoo_module, "write_json", no_write)
    assert len(_build(tmp_path / "zoo")) == 6
    assert (tmp_path / "zoo" / INDEX).read_bytes() == before


def test_resume_reconciles_index_and_files(tmp_path):
    zoo_dir = tmp_path / "zoo"
    _build(zoo_dir)
    first = _check_consistent(zoo_dir, 6)
    lora_dir = zoo_dir / "loras"
    (lora_dir / "case_00001.safetensors").unlink()                      # index entry without a file
    damaged = lora_dir / "case_00003.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:200])                      # a truncated file
    (lora_dir / ".case_00004.safetensors.x1.tmp").write_bytes(b"half")  # a killed atomic write
    index = read_json(zoo_dir / INDEX)
    index["loras"] = [e for e in index["loras"] if e["case_id"] != 2]   # a finished file the index never saw
    (zoo_dir / INDEX).write_text(__import__("json").dumps(index))
    mtimes = {p.name: p.stat().st_mtime_ns for p in lora_dir.glob("case_*")}

    _build(zoo_dir, group_size=2)  # group_size does not change the LoRAs, so the zoo is the same zoo
    again = _check_consistent(zoo_dir, 6)
    retrained = {c for c in again if again[c]["run_id"] != first[c]["run_id"]}
    assert retrained == {1, 3}
    for c in (0, 2, 4, 5):
        assert again[c] == first[c]
        assert (lora_dir / f"case_{c:05d}.safetensors").stat().st_mtime_ns == mtimes[f"case_{c:05d}.safetensors"]
    # a retrained LoRA is the same LoRA (same seed, same recipe)
    a, _ = load_lora(lora_dir / "case_00001.safetensors")
    assert again[1]["final_loss"] == pytest.approx(first[1]["final_loss"], rel=1e-5)
    assert a.keys() == set(tiny_generator().lora_target_modules())


def test_an_index_older_than_a_recipe_field_matches_that_fields_default():
    """A zoo index written before a LoraTrainConfig field existed describes the field's default behaviour: it is the
    same zoo as a recipe with the default, and not one with another value."""
    from dataclasses import asdict

    from lofa.lora.zoo import same_zoo

    expected = {"task": "identities", "seed": 0, "base": "f", "config": asdict(tiny_config())}
    old = {**expected, "config": {k: v for k, v in expected["config"].items() if k != "lr_schedule"}}
    assert expected["config"]["lr_schedule"] == "constant" and same_zoo(old, expected)
    cosine = {**expected, "config": asdict(tiny_config(lr_schedule="cosine"))}
    assert not same_zoo(old, cosine)


def test_a_zoo_written_before_a_recipe_field_existed_resumes(tmp_path):
    """The LoRA files and index of an older zoo lack a field added since (here lr_schedule): resuming with the
    field's default reads every LoRA and trains nothing; with another value it is refused."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    zoo_dir = tmp_path / "zoo"
    _build(zoo_dir, n_cases=2)
    index = json.loads((zoo_dir / INDEX).read_text())
    del index["config"]["lr_schedule"]
    (zoo_dir / INDEX).write_text(json.dumps(index))
    for path in (zoo_dir / "loras").iterdir():
        with safe_open(path, "pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
        record = json.loads(meta["lofa"])
        del record["lr_schedule"]
        save_file(tensors, path, metadata={**meta, "lofa": json.dumps(record)})
        assert "lr_schedule" not in load_lora(path)[1]
    files = {p: p.stat().st_mtime_ns for p in (zoo_dir / "loras").iterdir()}
    zoo = _build(zoo_dir, n_cases=2)
    assert len(zoo.case_ids()) == 2 and {p: p.stat().st_mtime_ns for p in files} == files
    with pytest.raises(LofaError, match="lr_schedule"):
        _build(zoo_dir, n_cases=2, lr_schedule="cosine")


def test_the_zoo_recipe_holds_the_bases_t_distribution_and_resume_refuses_another(tmp_path):
    """t_sampling / t_mean / t_std of a zoo's recipe are the base generator's: a base of the same weights with
    another t distribution trains other LoRAs, so it is refused like another recipe."""
    from lofa.diffusion import TimeDistribution

    zoo_dir = tmp_path / "zoo"
    zoo = _build(zoo_dir, n_cases=2)
    index = read_json(zoo_dir / INDEX)
    assert {k: index["config"][k] for k in ("t_sampling", "t_mean", "t_std")} == TimeDistribution().record()
    assert all(entry["t_mean"] == 0.8 for entry in index["loras"])
    assert zoo.config == tiny_config(steps=2, group_size=4)  # the recipe proper, without the base's part
    other = tiny_generator()
    other.t_distribution = TimeDistribution(mean=0.0, std=1.0)
    with pytest.raises(LofaError, match="t_mean=0.8, not 0.0"):
        build_zoo(StubWorld(2), other, tiny_config(steps=2, group_size=4), zoo_dir, text=StubText(), progress=False)


def test_resume_refuses_another_recipe_or_base(tmp_path):
    zoo_dir = tmp_path / "zoo"
    _build(zoo_dir, n_cases=2)
    with pytest.raises(LofaError, match="rank=4, not 2"):
        _build(zoo_dir, n_cases=2, rank=2)
    other_base = tiny_generator(seed=1)
    with pytest.raises(LofaError, match="base"):
        build_zoo(StubWorld(2), other_base, tiny_config(steps=2, group_size=4), zoo_dir, text=StubText(),
                  progress=False)


def test_an_enlarged_world_keeps_its_first_cases_loras_and_gives_them_its_splits(tmp_path):
    zoo_dir = tmp_path / "zoo"
    _build(zoo_dir, n_cases=3)
    first = _check_consistent(zoo_dir, 3)
    assert first[2]["split"] == "heldout"
    _build(zoo_dir, n_cases=5)  # the same first three cases; case 2 is a training case of the larger world
    entries = _check_consistent(zoo_dir, 5)
    assert all(entries[c]["run_id"] == first[c]["run_id"] for c in range(3))  # kept, not retrained
    assert [entries[c]["split"] for c in range(5)] == ["train"] * 4 + ["heldout"]
    assert Zoo(zoo_dir).case_ids("heldout") == [4]
    changed = StubWorld(5)
    changed.cases[1].name = "someone else"
    with pytest.raises(LofaError, match=r"case_00001.safetensors is the LoRA of case 'case-1', but case 1 of this "
                                        r"identities world is 'someone else'"):
        build_zoo(changed, tiny_generator(), tiny_config(steps=2, group_size=4), zoo_dir, text=StubText(),
                  progress=False)


def test_kill_during_collection_then_rerun_completes(tmp_path):
    """SIGKILL a real collection process after its first LoRAs are written; a rerun finishes only the rest."""
    zoo_dir = tmp_path / "zoo"
    script = tmp_path / "collect.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from test_zoo import _build
        _build({str(zoo_dir)!r}, n_cases=6, steps=25, group_size=2)
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 45
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            index = read_json(zoo_dir / INDEX) if (zoo_dir / INDEX).exists() else None
            if index and len(index["loras"]) >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"collection ended before it could be killed: {proc.stderr.read()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    done = {e["case_id"]: e for e in read_json(zoo_dir / INDEX)["loras"]}
    assert 2 <= len(done) < 6
    mtimes = {c: (zoo_dir / e["file"]).stat().st_mtime_ns for c, e in done.items()}

    _build(zoo_dir, n_cases=6, steps=25, group_size=2)
    final = _check_consistent(zoo_dir, 6)
    for c, entry in done.items():  # finished LoRAs were not retrained
        assert final[c]["run_id"] == entry["run_id"] and final[c]["trained_at"] == entry["trained_at"]
        assert (zoo_dir / entry["file"]).stat().st_mtime_ns == mtimes[c]
    assert len({final[c]["run_id"] for c in final if c not in done} - {e["run_id"] for e in done.values()}) == 1
    assert all(torch.isfinite(torch.tensor(e["final_loss"])) for e in final.values())


def test_shards_side_by_side_give_the_zoo_one_call_gives(tmp_path):
    """Two shard calls (either order, the second started after the first finished) then one plain call: the same
    LoRAs, bit for bit, as a single unsharded build, and the index only appears with the plain call."""
    n = 10  # group_size 4 -> groups [0-3], [4-7], [8, 9]: shard 0 takes two of them, shard 1 one
    _build(tmp_path / "one", n_cases=n)
    assert _build(tmp_path / "sharded", n_cases=n, shard=(1, 2)) is None
    assert not (tmp_path / "sharded" / INDEX).exists()
    assert sorted(p.name for p in (tmp_path / "sharded" / "loras").iterdir()) == [
        f"case_{c:05d}.safetensors" for c in range(4, 8)]
    assert _build(tmp_path / "sharded", n_cases=n, shard=(0, 2)) is None
    assert len(list((tmp_path / "sharded" / "loras").iterdir())) == n
    zoo = _build(tmp_path / "sharded", n_cases=n)
    _check_consistent(tmp_path / "sharded", n)
    for c in range(n):
        (a, _), (b, _) = Zoo(tmp_path / "one").load(c), zoo.load(c)
        assert all(torch.equal(a[k].A, b[k].A) and torch.equal(a[k].B, b[k].B) for k in a)
    with pytest.raises(LofaError, match=r"shard \(2, 2\)"):
        _build(tmp_path / "bad", n_cases=n, shard=(2, 2))


def test_zoo_trains_the_recipe_of_its_world(tmp_path):
    """task_overrides give one world its own steps; the index stores the resolved recipe, and resuming accepts it."""
    special = {"identities": {"steps": 3}, "styles": {"steps": 7}}  # StubWorld is an identities world
    zoo = _build(tmp_path / "zoo", n_cases=2, task_overrides=special)
    assert zoo.config.steps == 3 and zoo.config.task_overrides == {}
    assert [e["steps"] for e in zoo] == [3, 3]
    assert len(_build(tmp_path / "zoo", n_cases=2, task_overrides=special)) == 2  # same recipe: nothing refused
    with pytest.raises(LofaError, match="unknown field"):
        _build(tmp_path / "other", n_cases=2, task_overrides={"identities": {"stepz": 3}})
