"""Numerical and resource faults: a NaN / inf in training, a diverging LoRA of a batched group, a full disk, a
read-only folder, running out of GPU memory and a closed pipe each end in one clear line (or, for one LoRA of a
group, a warning and a retrain) and leave nothing corrupt; training resumes from the last good checkpoint.

The faults are injected (a NaN batch, a write that raises ENOSPC / EACCES / EROFS, torch.OutOfMemoryError), tiny
CPU sizes throughout."""
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lofa import io
from lofa.cli import main
from lofa.errors import LofaError

pytestmark = pytest.mark.usefixtures("one_thread")
NAN = float("nan")


def _only(folder: Path) -> list[str]:
    """The names in `folder`: an atomic write that failed leaves no temp file (".<name>.<random>.tmp") behind."""
    return sorted(p.name for p in folder.iterdir())


# --- 1. a NaN or inf loss stops training with one line; resuming from the last good checkpoint works ------------------
def _hypernet_run(out_dir, stage, steps=6, poison_at=None, inf_grad_at=None):
    """Stage `stage` of the tiny hypernetwork of tests/test_hypernet_train.py for `steps` steps, checkpoints every 2.

    poison_at: 0-based step whose batch holds NaN conditions (a NaN loss); inf_grad_at: 0-based step whose loss is
    finite but has an inf gradient (an overflow in the backward pass).
    """
    from test_hypernet_train import make_batch_fn, stage1_and_2

    from lofa.hypernet.train import Stage1Objective, Stage2Objective, TrainConfig, fit

    spec, base, s1, s2 = stage1_and_2()
    cfg = TrainConfig(steps=steps, warmup_steps=2, lr=1e-3, checkpoint_every=2, matrices_per_sample=2)
    clean = make_batch_fn(spec, m=2 if stage == 1 else None)

    def batch_fn(step, rank):
        batch = clean(step, rank)
        if step == poison_at:
            batch.cond = batch.cond * NAN
        return batch

    model, objective = (s1, Stage1Objective(base, cfg)) if stage == 1 else (s2, Stage2Objective(base, cfg, s1))
    if inf_grad_at is not None:
        objective = InfGradient(objective, inf_grad_at)
    history = fit(model, objective, batch_fn, cfg, out_dir, device="cpu", progress=False)
    return model, history


class InfGrad(torch.autograd.Function):
    """Identity forward, inf gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class InfGradient:
    """An objective whose loss at call `at` (0-based) is finite but has an inf gradient."""

    name = "Stage II"

    def __init__(self, objective, at):
        self.objective, self.at, self.calls = objective, at, 0

    def to(self, device):
        self.objective.to(device)
        return self

    def __call__(self, model, batch):
        loss, metrics = self.objective(model, batch)
        self.calls += 1
        if self.calls - 1 == self.at:
            loss = InfGrad.apply(loss)
        return loss, metrics


def _checkpoint_weights(out_dir: Path) -> tuple[int, dict[str, torch.Tensor]]:
    from lofa.io import read_json

    latest = read_json(out_dir / "checkpoints" / "latest.json")
    return latest["step"], load_file(str(out_dir / "checkpoints" / latest["path"] / "model.safetensors"))


@pytest.mark.parametrize("stage", [1, 2])
def test_a_nan_loss_names_the_step_and_the_last_good_checkpoint_and_resuming_from_it_works(tmp_path, stage):
    name = {1: "Stage I", 2: "Stage II"}[stage]
    reference, ref_history = _hypernet_run(tmp_path / "straight", stage)
    run = tmp_path / "faulted"
    with pytest.raises(LofaError) as err:
        _hypernet_run(run, stage, poison_at=4)  # the 5th step; the checkpoints are at steps 2 and 4
    ckpt = run / "checkpoints" / "step-0000004"
    assert str(err.value) == (f"{name} loss is nan at step 5; the last good checkpoint is step 4 at {ckpt}; rerun "
                              "to resume from it, or lower the learning rate and start over without it")
    step, weights = _checkpoint_weights(run)
    assert step == 4 and all(torch.isfinite(w).all() for w in weights.values())
    resumed, history = _hypernet_run(run, stage)  # the fault gone: resumes at step 4 and ends as a straight run
    for (k, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert [h["loss"] for h in history] == [h["loss"] for h in ref_history]


def test_an_inf_gradient_under_a_finite_loss_stops_before_a_checkpoint_gets_nan_weights(tmp_path):
    """The inf gradient comes at step 4, a checkpoint step: clipping it would make every weight NaN, and the
    checkpoint of step 4 would hold them."""
    with pytest.raises(LofaError, match=r"^Stage II gradient norm is (inf|nan) at step 4; the last good checkpoint is "
                                        r"step 2 at .*step-0000002; rerun to resume"):
        _hypernet_run(tmp_path, 2, inf_grad_at=3)
    step, weights = _checkpoint_weights(tmp_path)
    assert step == 2 and all(torch.isfinite(w).all() for w in weights.values())


def test_a_nan_before_the_first_checkpoint_says_there_is_none(tmp_path):
    with pytest.raises(LofaError, match="^Stage I loss is nan at step 1 and there is no checkpoint to resume from; "
                                        "lower the learning rate and rerun$"):
        _hypernet_run(tmp_path, 1, poison_at=0)


def test_a_nan_in_base_generator_training_names_its_checkpoint_and_the_run_resumes_from_it(tmp_path):
    from test_models import FakeWorld, _base_cfg

    from lofa.io import read_json
    from lofa.models.train_base import train_base

    class NanWorld(FakeWorld):
        """Renders of step 5 (seed 4: a run's draws are seeded by its step) are NaN."""

        def render(self, case_ids, seed):
            x = super().render(case_ids, seed)
            return x * NAN if seed == 4 else x

    straight = train_base(FakeWorld(), _base_cfg(), tmp_path / "a", progress=False)
    run = tmp_path / "b"
    with pytest.raises(LofaError) as err:  # 6 steps, a checkpoint at step 3
        train_base(NanWorld(), _base_cfg(), run, progress=False)
    ckpt = run / "checkpoints" / "step-0000003"
    assert str(err.value) == (f"base generator (actions) loss is nan at step 5; the last good checkpoint is step 3 "
                              f"at {ckpt}; rerun to resume from it, or lower the learning rate and start over "
                              "without it")
    assert read_json(run / "checkpoints" / "latest.json")["step"] == 3
    for name in ("generator", "ema"):
        assert all(torch.isfinite(w).all() for w in load_file(str(ckpt / f"{name}.safetensors")).values())
    assert not (run / "generator").exists() and not (run / "summary.json").exists()
    resumed = train_base(FakeWorld(), _base_cfg(), run, progress=False)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_a_nan_in_evaluator_training_names_the_role_and_the_step():
    from lofa.metrics.evaluators import EvalConfig, fit

    net = torch.nn.Linear(3, 1)

    def loss_fn(g):
        x = torch.randn(4, 3, generator=g)
        if len(calls) == 2:
            x[0, 0] = float("inf")
        calls.append(1)
        return net(x).square().mean()

    calls = []
    with pytest.raises(LofaError, match=r"^evaluator styles style loss is (inf|nan) at step 3 and there is no "
                                        r"checkpoint to resume from; lower the learning rate \(EvalConfig.lr\)"):
        fit(net, loss_fn, 5, EvalConfig(), 0, "styles style")
    assert all(torch.isfinite(p).all() for p in net.parameters())  # the step never reached the weights


# --- 2. a diverging LoRA of a batched group is retrained alone; the others are kept -----------------------------------
def _poison_member(monkeypatch, member: int, alone_too: bool) -> None:
    """The 3rd step's loss of group member `member` becomes NaN (its factors then follow); with `alone_too` also in
    a group of one (the retrain). Patched where the step loop (`train_steps`) looks it up."""
    from lofa.lora import train

    real = train.lora_losses
    calls = {}

    def lora_losses(gen, batches, cfg):
        fine, prior = real(gen, batches, cfg)
        calls[len(batches)] = calls.get(len(batches), 0) + 1
        target = member if len(batches) > 1 else 0
        if calls[len(batches)] == 3 and (len(batches) > 1 or alone_too):
            scale = torch.ones_like(fine)
            scale[target] = NAN
            fine = fine * scale  # NaN gradients too, as a real divergence has
        return fine, prior

    monkeypatch.setattr(train, "lora_losses", lora_losses)


def test_a_diverging_lora_of_a_group_is_reported_and_retrained_alone_the_others_kept(monkeypatch):
    from test_lora_train import StubText, StubWorld, tiny_config, tiny_generator

    from lofa.lora.batched import train_lora_batch

    world, text, cfg = StubWorld(), StubText(), tiny_config()
    gen = tiny_generator()
    cases = [0, 1, 3]
    clean = train_lora_batch(gen, world, cases, cfg, seed=7, text=text)
    alone = train_lora_batch(gen, world, [1], cfg, seed=7, text=text)[0]
    _poison_member(monkeypatch, member=1, alone_too=False)
    with pytest.warns(UserWarning, match=r"^the LoRA of case 1 diverged in a group of 3 \(its loss is nan at step "
                                         r"3\); retraining it alone$"):
        got = train_lora_batch(gen, world, cases, cfg, seed=7, text=text)
    assert [info["case_id"] for _, info in got] == cases
    for g, (weights, info) in enumerate(got):
        expected = alone if cases[g] == 1 else clean[g]  # the diverged one as trained alone, the others as they were
        assert info["final_loss"] == expected[1]["final_loss"]
        for name, f in weights.items():
            assert torch.equal(f.A, expected[0][name].A) and torch.equal(f.B, expected[0][name].B), (cases[g], name)


def test_a_lora_that_diverges_alone_too_raises_naming_its_case(monkeypatch):
    from test_lora_train import StubText, StubWorld, tiny_config, tiny_generator

    from lofa.lora.batched import train_lora_batch

    _poison_member(monkeypatch, member=1, alone_too=True)
    with pytest.warns(UserWarning, match="case 1 diverged in a group"):
        with pytest.raises(LofaError, match=r"^the LoRA of case 1 diverged \(trained alone\): its loss is nan at step "
                                            r"3; lower the learning rate \(LoraTrainConfig.lr\)"):
            train_lora_batch(tiny_generator(), StubWorld(), [0, 1], tiny_config(), seed=7, text=StubText())


def test_a_diverging_lora_trained_one_at_a_time_raises_naming_its_case(monkeypatch):
    from test_lora_train import StubText, StubWorld, tiny_config, tiny_generator

    from lofa.lora import train

    real = train.CaseStream.next_batch

    def next_batch(self):
        batch = real(self)
        batch["noise"] = batch["noise"] * NAN
        return batch

    monkeypatch.setattr(train.CaseStream, "next_batch", next_batch)
    gen = tiny_generator()
    with pytest.raises(LofaError, match=r"^the LoRA of case 2 diverged: its loss is nan at step 1; "):
        train.train_lora(gen, StubWorld(), 2, tiny_config(), seed=7, text=StubText())
    assert not getattr(gen.net, "peft_config", None)  # the adapter is gone: the generator is usable again


def test_a_zoo_stops_at_a_lora_that_diverges_alone_too_and_a_rerun_completes_it(tmp_path, monkeypatch):
    """The LoRA files are the zoo's checkpoints: the groups before the diverging one stay, nothing of it is written,
    and a rerun without the fault trains only what is missing."""
    from test_zoo import _build, _check_consistent

    from lofa.lora import train

    real = train.CaseStream.next_batch

    def next_batch(self):
        batch = real(self)
        if self.case.id == 5:
            batch["noise"] = batch["noise"] * NAN
        return batch

    monkeypatch.setattr(train.CaseStream, "next_batch", next_batch)
    zoo = tmp_path / "zoo"
    with pytest.warns(UserWarning, match="case 5 diverged in a group of 2"):  # groups [0, 1, 2, 3] and [4, 5]
        with pytest.raises(LofaError, match=r"^the LoRA of case 5 diverged \(trained alone\): its loss is nan at "
                                            r"step 1"):
            _build(zoo)
    assert _only(zoo / "loras") == [f"case_{c:05d}.safetensors" for c in range(4)]
    monkeypatch.undo()
    _build(zoo)
    _check_consistent(zoo, 6)


# --- 3. full disk, read-only folder, out of GPU memory ----------------------------------------------------------------
def _safetensors_disk_full(tensors, filename, metadata=None):
    """safetensors' own error on a full disk (its text as seen on a full tmpfs), after part of the file landed."""
    Path(filename).write_bytes(b"\x00" * 100)
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _mkstemp_permission_denied(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied")


def _replace_read_only(src, dst):
    raise OSError(errno.EROFS, "Read-only file system")


WRITE_FAULTS = {
    "full disk": (safetensors.torch, "save_file", _safetensors_disk_full,
                  "no space left on device; free space and rerun"),
    "permission denied": (io.tempfile, "mkstemp", _mkstemp_permission_denied,
                          "permission denied; make the folder writable or write somewhere else"),
    "read-only": (io.os, "replace", _replace_read_only, "read-only file system; write somewhere else"),
}


@pytest.fixture(scope="module")
def image_checkpoint(tmp_path_factory):
    """A tiny image-conditioned LoFA checkpoint (root/image) and a reference image (root/ref.png)."""
    from test_hypernet import tiny_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    tiny_checkpoint(root, "image", input_shape=(3, 16, 16), name="image")
    Image.new("RGB", (40, 30), (200, 40, 90)).save(root / "ref.png")
    return root


@pytest.mark.parametrize("fault", sorted(WRITE_FAULTS))
def test_lofa_predict_on_a_full_disk_or_read_only_folder_exits_2_in_one_line_old_file_intact(
        image_checkpoint, tmp_path, monkeypatch, capsys, fault):
    owner, name, failing, reason = WRITE_FAULTS[fault]
    out = tmp_path / "lora.safetensors"
    out.write_bytes(b"the old LoRA")
    monkeypatch.setattr(owner, name, failing)
    code = main(["predict", "--checkpoint", str(image_checkpoint / "image"), "--image",
                 str(image_checkpoint / "ref.png"), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"lofa predict: error: cannot write {out}: {reason}\n"
    assert out.read_bytes() == b"the old LoRA" and _only(tmp_path) == ["lora.safetensors"]


def test_lofa_predict_writes_when_the_disk_is_fine(image_checkpoint, tmp_path, capsys):
    """The test above is not passed by a predict that fails anyway."""
    out = tmp_path / "lora.safetensors"
    code = main(["predict", "--checkpoint", str(image_checkpoint / "image"), "--image",
                 str(image_checkpoint / "ref.png"), "--out", str(out), "--device", "cpu"])
    assert code == 0 and len(load_file(str(out))) > 0


class _FileFillingUp:
    """A binary file that takes `room` bytes and then fails as a full disk does (after a short write)."""

    def __init__(self, path, room):
        self.f, self.room = open(path, "wb"), room

    def write(self, data):
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = min(self.room, len(memoryview(data).cast("B")))
        self.room -= n
        return self.f.write(memoryview(data).cast("B")[:n])

    def flush(self):
        self.f.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_checkpoint_written_on_a_full_disk_is_one_line_and_the_old_one_stays(tmp_path, monkeypatch):
    """torch.save turns a failed write into a RuntimeError ("unexpected pos ...") without its errno; save_torch
    still says the disk is full."""
    path = tmp_path / "trainer.pt"
    io.save_torch({"step": 2}, path)

    def opening_a_full_disk(file, mode="r", *args, **kwargs):
        return _FileFillingUp(file, 300)

    monkeypatch.setattr(io, "open", opening_a_full_disk, raising=False)
    with pytest.raises(LofaError, match=f"^cannot write {path}: no space left on device; free space and rerun$"):
        io.save_torch({"step": 4, "weights": torch.ones(1000)}, path)
    assert torch.load(path) == {"step": 2} and _only(tmp_path) == ["trainer.pt"]


def test_a_generator_saved_on_a_full_disk_is_one_line_and_the_old_folder_stays(tmp_path, monkeypatch):
    """Generator.save writes through diffusers' save_pretrained (safetensors), in a folder swapped in whole."""
    import safetensors.torch
    from safetensors import SafetensorError

    from lofa.models.generator import Generator

    generator = Generator.build("image_unet", "smoke")
    generator.save(tmp_path / "base")
    before = sorted(p.name for p in (tmp_path / "base").iterdir())

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(LofaError, match=f"^cannot write {tmp_path / 'base'}: no space left on device; free space"):
        generator.save(tmp_path / "base")
    assert _only(tmp_path) == ["base"] and sorted(p.name for p in (tmp_path / "base").iterdir()) == before
    monkeypatch.undo()
    Generator.load(tmp_path / "base")  # still whole


@pytest.mark.parametrize("code, reason", [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only file system"),
                                          (errno.EDQUOT, "disk quota exceeded")])
def test_a_folder_that_cannot_be_made_is_one_line(tmp_path, monkeypatch, code, reason):
    def mkdir(self, *args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(LofaError, match=f"^cannot write {tmp_path / 'run' / 'loss.json'}: {reason}; "):
        io.write_json(tmp_path / "run" / "loss.json", {"loss": [1.0]})
    assert _only(tmp_path) == []


def test_other_os_errors_are_not_disguised(tmp_path, monkeypatch):
    """Only the write errors the user can fix become a LofaError; anything else is a bug and keeps its traceback."""
    def failing(self, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Path, "write_text", failing)
    with pytest.raises(OSError, match="Input/output error"):
        io.write_text(tmp_path / "x.txt", "x")
    assert _only(tmp_path) == []


@pytest.mark.parametrize("argv, fix", [
    (["train", "--setting", "styles"], "lower the batch size with --overrides or use --device cpu"),
    (["predict", "--checkpoint", "c", "--prompt", "a", "--out", "o.safetensors"], "use --device cpu"),
    (["response-map", "--base", "b", "--lora", "l"], "free GPU memory (other processes hold it) and rerun"),
])
def test_out_of_gpu_memory_is_one_line_and_exit_2(monkeypatch, capsys, argv, fix):
    from lofa import cli

    def out_of_memory(self, args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")

    monkeypatch.setattr(cli._Command, "__call__", out_of_memory)
    assert main(argv) == 2
    assert capsys.readouterr().err == f"lofa {argv[0]}: error: out of GPU memory in {argv[0]}; {fix}\n"


# --- 4. `lofa response-map ... | head` --------------------------------------------------------------------------------
def test_response_map_into_a_closed_pipe_exits_quietly(tmp_path):
    from lofa.lora.formats import LoraFactor, save_lora

    g = torch.Generator().manual_seed(0)
    names = [f"blocks.{i}.attn1.to_{t}" for i in range(2) for t in "qkvo"]
    save_file({f"{n}.weight": torch.randn(8, 8, generator=g) for n in names}, tmp_path / "base.safetensors")
    save_lora(tmp_path / "lora.safetensors", {n: LoraFactor(torch.randn(2, 8, generator=g),
                                                            torch.randn(8, 2, generator=g), 2.0) for n in names})
    env = {**os.environ, "PYTHONPATH": str(Path(io.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "lofa.cli", "response-map", "--base",
                             str(tmp_path / "base.safetensors"), "--lora", str(tmp_path / "lora.safetensors")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # `| head` that has read enough: every write of the command meets a closed pipe
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 141  # 128 + SIGPIPE, as a tool the closed pipe stopped
    # stderr holds the progress bar only: no BrokenPipeError traceback, no "Exception ignored" at exit
    assert "Error" not in err and "Exception" not in err and "Traceback" not in err, err
