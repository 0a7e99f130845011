"""One checkpoint format (`lofa.checkpoints`) for the base generator's and the hypernetwork's trainers: the same
layout on disk, a base checkpoint of another run refused in one line, and the folder's own guarantees (latest.json
names the newest complete step, older folders pruned, the RNG restored). Tiny CPU sizes throughout."""
from pathlib import Path

import pytest
import torch

from lofa import checkpoints
from lofa.errors import LofaError
from lofa.io import read_json

pytestmark = pytest.mark.usefixtures("one_thread")


def _layout(ckpt_dir: Path) -> tuple[set[str], set[str], set[str]]:
    """(files of the folder latest.json names, keys of its trainer.pt, the files next to the step folders)."""
    step, path = checkpoints.latest(ckpt_dir)
    assert path.name == f"step-{step:07d}"
    trainer = torch.load(path / "trainer.pt", weights_only=False)
    assert trainer["step"] == step
    top = {p.name for p in ckpt_dir.iterdir() if not p.name.startswith("step-")}
    return {p.name for p in path.iterdir()}, set(trainer), top


def _interrupted_base(out_dir: Path, **cfg):
    """A base of tests/test_models.py killed at step 4, after its checkpoint at step 3."""
    from test_models import FakeWorld, Interrupted, _base_cfg

    from lofa.models.train_base import train_base

    with pytest.raises(Interrupted):
        train_base(FakeWorld(fail_at_seed=4), _base_cfg(**cfg), out_dir, progress=False)


def test_the_base_and_the_hypernetwork_write_the_same_checkpoint_layout(tmp_path):
    from test_hypernet_train import make_batch_fn, stage1_and_2

    from lofa.hypernet.train import Stage1Objective, TrainConfig, fit

    _interrupted_base(tmp_path / "base")
    spec, base, s1, _ = stage1_and_2()
    cfg = TrainConfig(steps=3, warmup_steps=1, checkpoint_every=2, matrices_per_sample=2)
    fit(s1, Stage1Objective(base, cfg), make_batch_fn(spec, m=2), cfg, tmp_path / "hypernet", device="cpu",
        progress=False)

    base_files, base_keys, base_top = _layout(tmp_path / "base" / "checkpoints")
    hyper_files, hyper_keys, hyper_top = _layout(tmp_path / "hypernet" / "checkpoints")
    shared = {"trainer.pt", "rng-0.pt"}
    assert base_files == shared | {"generator.safetensors", "ema.safetensors"}  # the EMA next to the weights
    assert hyper_files == shared | {"model.safetensors"}
    assert base_keys == hyper_keys == {"optimizer", "scheduler", "step", "history", "extra"}
    assert base_top == hyper_top == {"latest.json"}
    assert sorted(p.name for p in (tmp_path / "hypernet" / "checkpoints").glob("step-*")) == [
        "step-0000002", "step-0000003"]  # keep_checkpoints 2; the base keeps its newest only


@pytest.mark.parametrize("change, what", [({"seed": 1}, "seed"), ({"lr": 5e-3}, "config")])
def test_a_base_checkpoint_of_another_run_is_refused_in_one_line(tmp_path, change, what):
    from test_models import FakeWorld, _base_cfg

    from lofa.models.train_base import train_base

    _interrupted_base(tmp_path)
    seed = change.get("seed", 0)
    cfg = _base_cfg(**{k: v for k, v in change.items() if k != "seed"})
    with pytest.raises(LofaError) as err:
        train_base(FakeWorld(), cfg, tmp_path, seed=seed, progress=False)
    assert str(err.value) == (f"{tmp_path / 'checkpoints' / 'step-0000003'} was written with another {what}; "
                              f"delete {tmp_path / 'checkpoints'} to start over")
    assert read_json(tmp_path / "checkpoints" / "latest.json")["step"] == 3  # left as it was


def _tiny_trainer(lr: float = 0.1):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    return model, optimizer, scheduler


def decay(step: int) -> float:
    """The tiny trainer's learning-rate factor: a schedule whose state a resume must restore."""
    return 1.0 / (1 + step)


def _step(model, optimizer, scheduler) -> None:
    model(torch.randn(4, 3)).square().mean().backward()  # the global RNG: resuming must restore it
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def test_resuming_restores_weights_optimizer_schedule_history_and_rng(tmp_path):
    straight = _tiny_trainer()
    for _ in range(5):
        _step(*straight)

    first = _tiny_trainer()
    for step in range(1, 4):
        _step(*first)
        checkpoints.save(tmp_path, step, {"net": first[0]}, first[1], first[2], [step], extra={"note": step}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000002", "step-0000003"]
    torch.randn(7)  # draws after the checkpoint, which the resumed run must not see

    resumed = _tiny_trainer(lr=0.5)  # another lr: the optimizer's and schedule's states come from the checkpoint
    state = checkpoints.load(tmp_path, {"net": resumed[0]}, resumed[1], resumed[2])
    assert state == {"step": 3, "history": [3], "extra": {"note": 3}}
    for _ in range(2):
        _step(*resumed)
    for a, b in zip(straight[0].state_dict().values(), resumed[0].state_dict().values()):
        assert torch.equal(a, b)


def test_no_checkpoint_loads_nothing_and_a_refusal_touches_nothing(tmp_path):
    model, optimizer, scheduler = _tiny_trainer()
    assert checkpoints.latest(tmp_path) is None
    assert checkpoints.load(tmp_path, {"net": model}, optimizer, scheduler) is None
    checkpoints.save(tmp_path, 1, {"net": model}, optimizer, scheduler, [], extra={"seed": 0})
    other, other_opt, other_sched = _tiny_trainer()
    with torch.no_grad():
        other.weight.add_(1.0)
    before = other.weight.clone()
    with pytest.raises(LofaError, match="was written with another seed"):
        checkpoints.load(tmp_path, {"net": other}, other_opt, other_sched, expect={"seed": 1})
    assert torch.equal(other.weight, before)
    checkpoints.discard(tmp_path)
    assert not tmp_path.exists()
