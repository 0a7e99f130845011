"""Interruptions of long steps: base generator training and zoo collection, killed (SIGKILL or SIGINT) at a point
drawn from a seeded generator while they train, then rerun; the rerun completes and its result equals, bit for bit,
that of a run never interrupted."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
# Long enough at smoke to be killed mid-training: the base checkpoints every 10 of 60 steps, the zoo trains 8 LoRAs
# of 40 steps in groups of 2 (each group's LoRAs written when it ends).
OVERRIDES = {"BaseTrainConfig": {"steps": 60, "checkpoint_every": 10},
             "LoraTrainConfig": {"steps": 40, "group_size": 2}, "ZooConfig": {"max_cases": 8}}
# The step in its own process. SIGINT gets Python's handler: a test suite started as a shell's background job
# inherits SIGINT ignored, and Ctrl-C reaches a user's foreground command with the handler in place.
STEP = """
import signal
import sys
from lofa.run import Run

signal.signal(signal.SIGINT, signal.default_int_handler)

run = Run("smoke", "cpu", 0, sys.argv[1], overrides={overrides!r}, pretrained=False)
getattr(run, sys.argv[2])("identities", progress=False)
"""


def start(root: Path, step: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", STEP.format(overrides=OVERRIDES), str(root), step], env=env,
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(root: Path, step: str) -> None:
    process = start(root, step)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-2000:]


def base_weights(root: Path) -> dict[str, torch.Tensor]:
    files = sorted((root / "base" / "identities").rglob("*.safetensors"))
    assert files
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


def zoo_weights(root: Path) -> dict[str, torch.Tensor]:
    files = sorted((root / "zoo" / "identities" / "loras").glob("*.safetensors"))
    assert len(files) == OVERRIDES["ZooConfig"]["max_cases"]
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


def started_training(root: Path, step: str) -> bool:
    """The step has made progress a rerun can keep: the base's first checkpoint, the zoo's first LoRA file."""
    if step == "base":
        return (root / "base" / "identities" / "checkpoints" / "latest.json").exists()
    return any((root / "zoo" / "identities" / "loras").glob("*.safetensors"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run: base, then zoo."""
    root = tmp_path_factory.mktemp("straight")
    finish(root, "base")
    finish(root, "zoo")
    return root


# Each step meets one signal: SIGKILL (nothing runs after it) and SIGINT (Python unwinds: finally blocks, atomic
# writes' clean-up); both kinds of death reach both steps' resume logic the same way, through the files left.
@pytest.mark.parametrize("step, sig", [("base", signal.SIGKILL), ("zoo", signal.SIGINT)])
def test_a_step_killed_while_training_resumes_to_the_same_result(straight, tmp_path, step, sig):
    rng = random.Random(f"{step}-{sig.name}")
    root = tmp_path / "run"
    if step == "zoo":  # the same base as the straight run's (its training is tested above)
        shutil.copytree(straight / "base", root / "base")
    process = start(root, step)
    deadline = time.monotonic() + 300
    while not started_training(root, step):
        assert process.poll() is None, f"{step} ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    delay = rng.uniform(0.0, 1.0)
    print(f"{step}: {sig.name} {delay:.2f} s after its first saved progress")
    time.sleep(delay)
    assert process.poll() is None, f"{step} ended before the {sig.name}"
    process.send_signal(sig)
    process.communicate(timeout=60)
    assert process.returncode != 0
    weights = base_weights if step == "base" else zoo_weights
    if step == "zoo":
        made = list((root / "zoo" / "identities" / "loras").glob("*.safetensors"))
        assert len(made) < OVERRIDES["ZooConfig"]["max_cases"]  # interrupted with LoRAs left to train
    finish(root, step)
    resumed, expected = weights(root), weights(straight)
    assert resumed.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(resumed[key], value), key
