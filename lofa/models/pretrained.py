"""The shipped pretrained models: base generators and evaluators under data/pretrained/<scale>/<task>/.

The paper never trains its base model (Wan2.1, SDXL) or its scorers (I3D, CLIP, ArcFace, DINO, CSD); neither does
the pipeline. `lofa pretrain` trains them once on a GPU and writes one folder per (scale, task):

    base/generator/        the base Generator (diffusers folder: config.json + safetensors)
    base/summary.json      its training record (config, seed, device, wall time), as `train_base` writes it
    base/loss.json         its loss curve
    evaluators/            <role>.safetensors + evaluators.json, as `train_evaluators` writes them
    zoo/                   the per-case LoRA collection (index.json + loras/case_*.safetensors, factors in float16),
                           as `build_zoo` writes it on the shipped base (`lofa pretrain --part zoo`)
    manifest.json          command, commit, device, wall time, quality numbers, and the sha256 of every file above

`Run.base`, `Run.evaluators` and `Run.zoo` install a folder into the run directory when its recorded config and seed
equal the run's (an override that changes the recipe trains instead), after checking every file against the manifest:
a missing, truncated or altered file is a one-line `LofaError` naming it and the command that remakes it, raised
before anything is copied.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

from lofa.errors import LofaError
from lofa.io import read_json, write_json

MANIFEST = "manifest.json"
# Where the shipped folders live: data/pretrained/ of the checkout (the package is installed editable), or
# $LOFA_PRETRAINED (tests point it at a temporary folder).
_DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "data" / "pretrained"


def root() -> Path:
    return Path(os.environ.get("LOFA_PRETRAINED", _DEFAULT_ROOT))


def folder(scale: str, task: str) -> Path:
    return root() / scale / task


def remake_command(scale: str, task: str) -> str:
    return f"lofa pretrain --scale {scale} --task {task} --device cuda"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def verify(scale: str, task: str) -> dict:
    """Check every file of the shipped folder against its manifest; returns the manifest.

    Raises LofaError naming the first missing, truncated or altered file (or an unreadable manifest).
    """
    where = folder(scale, task)
    remake = remake_command(scale, task)
    try:
        manifest = read_json(where / MANIFEST)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise LofaError(f"{where / MANIFEST} is missing or unreadable; restore it (git checkout -- {where}) or "
                        f"remake the folder with `{remake}`")
    for name, record in sorted(manifest["files"].items()):
        path = where / name
        if not path.is_file():
            problem = "is missing"
        elif path.stat().st_size != record["bytes"]:
            problem = f"is truncated or altered ({path.stat().st_size} bytes, manifest says {record['bytes']})"
        elif sha256(path) != record["sha256"]:
            problem = "is altered (sha256 differs from the manifest)"
        else:
            continue
        raise LofaError(f"shipped model file {path} {problem}; restore it (git checkout -- {path}) or remake the "
                        f"folder with `{remake}`")
    return manifest


def _shipped(scale: str, task: str, part: str) -> Path | None:
    """The shipped `part` folder ("base" or "evaluators") of (scale, task), or None when nothing is shipped."""
    where = folder(scale, task)
    if not where.exists():
        return None
    verify(scale, task)
    return where / part


def install_base(scale: str, task: str, out_dir: Path, config_record: dict, seed: int) -> bool:
    """Copy the shipped base of (scale, task) into `out_dir` when it was trained with `config_record` (the
    resolved BaseTrainConfig as summary.json stores it) and `seed`. Returns whether it did."""
    src = _shipped(scale, task, "base")
    if src is None:
        return False
    summary = read_json(src / "summary.json")
    if summary["config"] != config_record or summary["seed"] != seed:
        return False
    _copy_tree(src, Path(out_dir))
    return True


def install_evaluators(scale: str, task: str, out_dir: Path, fingerprint: str) -> bool:
    """Copy the shipped evaluators of (scale, task) into `out_dir` when their fingerprint (world, config, seed)
    is `fingerprint`. Returns whether it did."""
    src = _shipped(scale, task, "evaluators")
    if src is None:
        return False
    from lofa.metrics.evaluators import META_FILE

    if read_json(src / META_FILE)["fingerprint"] != fingerprint:
        return False
    _copy_tree(src, Path(out_dir))
    return True


def install_zoo(scale: str, task: str, out_dir: Path, header: dict) -> bool:
    """Copy the shipped LoRA zoo of (scale, task) into `out_dir` when its index header (task, seed, recipe, base
    fingerprint: `lofa.lora.zoo.zoo_header`) equals `header` and `out_dir` holds no zoo yet. Returns whether it did."""
    from lofa.lora.zoo import INDEX, same_zoo

    where = folder(scale, task) / "zoo"
    if not (where / INDEX).exists() or (Path(out_dir) / INDEX).exists():
        return False
    verify(scale, task)
    if not same_zoo(read_json(where / INDEX), header):
        return False
    _copy_tree(where, Path(out_dir))
    return True


def _copy_tree(src: Path, dest: Path) -> None:
    """Replace `dest` by a copy of `src`, atomically (a half-copied folder never takes its name)."""
    from lofa.io import atomic_dir

    with atomic_dir(dest) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def _file_records(folder_: Path) -> dict:
    """{relative path: {"sha256", "bytes"}} of every file under `folder_` but the manifest; refuses a file over
    16 MiB (the repository's limit)."""
    files = {}
    for path in sorted(p for p in folder_.rglob("*") if p.is_file() and p.name != MANIFEST):
        size = path.stat().st_size
        if size > 16 * 2**20:
            raise LofaError(f"{path.relative_to(folder_)} is {size / 2**20:.1f} MiB; shipped files must stay under "
                            "16 MiB: make the model smaller")
        files[str(path.relative_to(folder_))] = {"sha256": sha256(path), "bytes": size}
    return files


def export_zoo(run, task: str, dest: Path, command: str) -> dict:
    """Add `run`'s complete zoo of `task` to the shipped folder `dest` (which already holds its base): the LoRA
    factors are stored in float16 (the largest relative ΔW error this costs is measured and recorded), the index
    as built; the manifest gains the zoo's files and record. Atomic: the old folder stays until the new one is
    complete. Returns the manifest."""
    from lofa.lora.formats import LoraFactor, load_lora, save_lora
    from lofa.lora.zoo import INDEX, LORA_DIR, PIPELINE_PREFIX
    from lofa.io import atomic_dir
    from lofa.provenance import device_description

    zoo = run.zoo(task, progress=False)
    manifest = read_json(Path(dest) / MANIFEST)
    if manifest is None:
        raise LofaError(f"{dest} has no {MANIFEST}; ship the base first (lofa pretrain --part models)")
    prefix = PIPELINE_PREFIX[run.base(task, progress=False).kind]
    worst = 0.0
    with atomic_dir(Path(dest)) as tmp:
        shutil.copytree(dest, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("zoo"))
        (tmp / "zoo" / LORA_DIR).mkdir(parents=True)
        shutil.copy2(zoo.dir / INDEX, tmp / "zoo" / INDEX)
        for entry in zoo:
            weights, meta = load_lora(zoo.dir / entry["file"])
            half = {n: LoraFactor(f.A.half(), f.B.half(), f.alpha) for n, f in weights.items()}
            for n, f in weights.items():
                exact = f.delta_rows()
                err = (half[n].delta_rows() - exact).norm() / exact.norm().clamp_min(1e-30)
                worst = max(worst, float(err))
            save_lora(tmp / "zoo" / entry["file"], half, meta, prefix=prefix)
        entries = list(zoo)
        manifest["zoo"] = {"config": read_json(zoo.dir / INDEX)["config"], "loras": len(entries),
                           "wall_time_s": sum(e.get("wall_time_s", 0.0) for e in entries),
                           "float16_max_relative_delta_error": worst, "command": command,
                           "device": device_description(str(run.device)), "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        manifest["files"] = _file_records(tmp)
        write_json(tmp / MANIFEST, manifest)
    return manifest


def export(run, task: str, dest: Path, quality: dict, command: str) -> dict:
    """Write the shipped folder of `task` from `run`'s trained base and evaluators to `dest` (atomically);
    returns its manifest. A zoo shipped in `dest` belonged to the old base and goes with it (`--part zoo` remakes
    it)."""
    from lofa.io import atomic_dir
    from lofa.provenance import device_description, git_commit, package_versions

    base_dir, eval_dir = run.path("base", task), run.path("evaluators", task)
    summary = read_json(base_dir / "summary.json")
    evaluators = read_json(eval_dir / "evaluators.json")
    with atomic_dir(dest) as tmp:
        shutil.copytree(base_dir, tmp / "base", ignore=shutil.ignore_patterns("checkpoints", ".*"))
        shutil.copytree(eval_dir, tmp / "evaluators", ignore=shutil.ignore_patterns(".*"))
        files = _file_records(tmp)
        manifest = {
            "scale": run.scale, "task": task, "seed": run.seed, "command": command, "commit": git_commit(),
            "device": device_description(str(run.device)), "created": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                                     time.gmtime()),
            "versions": package_versions(),
            "base": {"config": summary["config"], "steps": summary["config"]["steps"], "wall_s": summary["wall_s"],
                     "parameters": summary["parameters"], "final_loss": summary["final_loss"]},
            "evaluators": {"config": evaluators["config"], "fingerprint": evaluators["fingerprint"],
                           "train_seconds": evaluators["train_seconds"]},
            "quality": quality, "files": files}
        write_json(tmp / MANIFEST, manifest)
    return manifest


def quality_numbers(run, task: str) -> dict:
    """Notebook 02's base-competence check of the run's base with its evaluators (same n, seed and sampler),
    plus the Fréchet distance as a multiple of the other-cases floor."""
    from lofa.evaluate import GenerateConfig, base_competence, competence_seed
    from lofa.models.text import TextEncoder

    n = 16 if run.scale == "smoke" else 128
    check = base_competence(run.base(task, progress=False), run.world(task), run.evaluators(task), n=n,
                            seed=competence_seed(run.seed), cfg=run.config(GenerateConfig),
                            text=TextEncoder(run.device), progress=False)
    check.pop("samples")
    check["fd_over_other_cases_floor"] = check["fd_base_vs_renders"] / check["fd_other_cases_vs_renders"]
    return check
