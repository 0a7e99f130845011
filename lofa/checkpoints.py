"""Resumable training checkpoints: the one format of every trainer that resumes (base generators through
`lofa.models.train_base`, the hypernetwork's stages and Text-to-LoRA through `lofa.hypernet.train.fit`).

    <run>/checkpoints/
        step-XXXXXXX/                  one folder per checkpoint, named by the step it was written after
            <name>.safetensors         the state_dict of each named module (e.g. model; generator and ema)
            trainer.pt                 {"optimizer", "scheduler", "step", "history", "extra"} (torch.save)
            rng-<process>.pt           each process's torch / python / numpy (/ cuda) RNG state
        latest.json                    {"step", "path"}: the complete checkpoint a restart resumes from

Every file is written atomically and latest.json last, so an interruption at any point leaves the previous
complete checkpoint as the one a restart resumes from; older folders beyond `keep` are deleted after it.

The functions take an `accelerate.Accelerator` (a multi-process launch: every process writes its RNG state, the
main process the rest) or, for a trainer without one, `OneProcess`.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lofa.errors import LofaError
from lofa.io import read_json, save_safetensors, save_torch, write_json

FOLDER = "checkpoints"


class OneProcess:
    """What the checkpoints ask of an accelerate Accelerator, for a trainer that runs in one process without one."""

    process_index = 0
    is_main_process = True

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    def wait_for_everyone(self) -> None:
        """A single process has no one to wait for."""

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return model


def rng_state() -> dict:
    """The global RNG states a training step may draw from (torch, python, numpy and, where present, CUDA)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(ckpt_dir: str | Path, step: int, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
         scheduler, history: Any, *, extra: dict | None = None, keep: int = 2, accelerator=None) -> Path:
    """Write ckpt_dir/step-XXXXXXX/ and then point ckpt_dir/latest.json at it; older folders beyond `keep` go.

    modules: {name: module}, each saved as <name>.safetensors (unwrapped from a multi-process wrapper); history:
    the trainer's log so far; extra: anything else the trainer restores or checks on resume (e.g. its config).
    Returns the folder.
    """
    ckpt_dir = Path(ckpt_dir)
    accelerator = OneProcess() if accelerator is None else accelerator
    path = ckpt_dir / f"step-{step:07d}"
    save_torch(rng_state(), path / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        for name, module in modules.items():
            save_safetensors(accelerator.unwrap_model(module).state_dict(), path / f"{name}.safetensors")
        save_torch({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                    "history": history, "extra": extra or {}}, path / "trainer.pt")
    # latest.json only once every process has written its RNG state, so it never points at a partial folder
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(ckpt_dir / "latest.json", {"step": step, "path": path.name})
        for old in sorted(ckpt_dir.glob("step-*"))[:-keep]:
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def latest(ckpt_dir: str | Path) -> tuple[int, Path] | None:
    """(step, folder) of the complete checkpoint a restart resumes from, or None when there is none."""
    ckpt_dir = Path(ckpt_dir)
    pointer = read_json(ckpt_dir / "latest.json")
    if pointer is None:
        return None
    return pointer["step"], ckpt_dir / pointer["path"]


def load(ckpt_dir: str | Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, scheduler, *,
         accelerator=None, expect: dict | None = None) -> dict | None:
    """Restore the checkpoint latest.json points to into `modules`, `optimizer`, `scheduler` and this process's
    RNG; returns {"step", "history", "extra"}, or None when there is none (nothing is touched then).

    expect: {key: value} the checkpoint's extra must hold (e.g. the run's config and seed); a checkpoint of another
    run is refused with a LofaError before anything is restored.
    """
    from safetensors.torch import load_file

    found = latest(ckpt_dir)
    if found is None:
        return None
    accelerator = OneProcess() if accelerator is None else accelerator
    path = found[1]
    trainer = torch.load(path / "trainer.pt", map_location=accelerator.device, weights_only=False)
    # a hypernetwork checkpoint written before trainer.pt held extra state resumes as one without any
    extra = trainer.get("extra", {})
    different = [key for key, value in (expect or {}).items() if extra.get(key) != value]
    if different:
        raise LofaError(f"{path} was written with another {' or '.join(different)}; delete {Path(ckpt_dir)} to "
                        "start over")
    for name, module in modules.items():
        accelerator.unwrap_model(module).load_state_dict(load_file(str(path / f"{name}.safetensors"),
                                                                   device=str(accelerator.device)))
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    rng = path / f"rng-{accelerator.process_index}.pt"
    # a launch with more processes than the one that wrote the checkpoint finds no state for the new ones
    if rng.exists():
        set_rng_state(torch.load(rng, weights_only=False))
    return {"step": trainer["step"], "history": trainer["history"], "extra": extra}


def discard(ckpt_dir: str | Path) -> None:
    """Delete every checkpoint of a run that is complete (its results are written: there is nothing to resume)."""
    shutil.rmtree(ckpt_dir, ignore_errors=True)
