"""Where an artifact came from: the commit, the package versions and the device, as every manifest records them.

Kept apart from `lofa.reproduce` (which drives Jupyter kernels) so that a machine without Jupyter, such as a GPU
lease that only trains and exports models (`lofa pretrain`), can write the same provenance.
"""
from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata as importlib_metadata
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
REPORTED_PACKAGES = ("torch", "diffusers", "peft", "transformers", "safetensors", "papermill", "numpy")


def git_commit() -> str:
    """HEAD of the checkout (with -dirty for uncommitted changes), or $LOFA_COMMIT when set: a copy of the tree
    on another machine (a device lease) may carry no .git, or a stale one."""
    if os.environ.get("LOFA_COMMIT"):
        return os.environ["LOFA_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", str(REPO_DIR), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO_DIR), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in REPORTED_PACKAGES:
        try:
            out[p] = importlib_metadata.version(p)
        except importlib_metadata.PackageNotFoundError:
            out[p] = "missing"
    return out


def device_description(device: str) -> str:
    if device == "cuda":
        import torch

        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({platform.processor() or platform.machine()})"
