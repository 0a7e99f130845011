"""`lofa zoo import`: a researcher's folder of LoRA files plus a JSONL of their conditions -> a zoo (`lofa.lora.zoo`).

    import_zoo("my_loras/", "my_loras/conditions.jsonl", "Wan2.1-T2V-1.3B-Diffusers/", "zoo/")
    zoo = Zoo("zoo/"); weights, meta = zoo.load(0)          # {module: LoraFactor}, as the source file's ΔW

The JSONL holds one line per LoRA file, in case order (case id = line order, 0, 1, ...; blank lines are skipped):
    {"file": "a.safetensors", "prompt": "a person kicks with the left leg"}
    {"file": "b.safetensors", "image": "refs/b.png"}        # or "pose": "poses/b.npy"
"file" is the LoRA's name in the LoRA folder; image and pose paths are relative to the JSONL's folder. One
condition kind per zoo. Images are any PIL-readable picture; poses a .npy / .pt / .safetensors tensor [3, T, H, W]
in [-1, 1] (what `lofa predict --pose` reads).

What is written (one folder, built in a temporary folder and swapped in whole: an interrupted import leaves
nothing half-written, and a refused one leaves nothing at all):
    index.json                    header {"task": "imported", "seed": None, "config": None, "base": fingerprint,
                                  "condition_kind", "tau", "ranks", "rank", "modules"} + "loras": one entry per LoRA
    loras/case_00000.safetensors  the LoRA in the zoo's naming (diffusers, `save_lora`: alpha / r folded into B,
                                  factors in the source's dtype), its index entry as the file's metadata
    conditions/case_00000.png     a copy of each image / pose condition (prompts live in the index)

Each entry: case_id, split ("train"), file, source (name in the LoRA folder), sha256 (of the source file), line,
naming (of the source), condition ({"prompt": TEXT} or {"image" | "pose": path in the zoo}), condition_source,
rank (in the zoo), source_rank, alpha (the source's; one number, or {module: alpha} when modules differ), modules
(count), density (fraction of ΔW entries with |ΔW| / |W| > tau), and with --ranks truncate the relative error
||ΔW' - ΔW||_F / ||ΔW||_F of the whole LoRA.

Rules (each refusal is a one-line LofaError naming the file / line and what to do):
- every LoRA adapts modules of the base, at the base's shapes (`check_compatible`), and all LoRAs adapt the same
  modules; every .safetensors file of the folder has exactly one line, every line names a file of the folder; no
  file twice and no two files holding the same LoRA (in any naming); every condition file exists and reads;
- one rank per zoo: different ranks (across LoRAs or modules) are refused with ranks="strict"; "pad" zero-pads
  A [r, in] and B [out, r] to the largest rank R (alpha scaled by R / r: ΔW unchanged); "truncate" keeps the top
  `rank` singular directions of each ΔW (SVD, re-factorised as B' = U √S, A' = √S Vᵀ), which CHANGES ΔW when a
  module's rank is above `rank` (the error is in the index); modules of lower rank are zero-padded.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lofa.config import TAU
from lofa.errors import LofaError
from lofa.io import atomic_dir, write_json
from lofa.lora.formats import (BaseWeightsFile, LoraFactor, LoraWeights, check_compatible, detect_format, load_lora,
                               natural_key, save_lora)
from lofa.lora.zoo import INDEX, LORA_DIR, lora_filename, weights_fingerprint

# The keys of a conditions.jsonl line that give a LoRA its condition (one per line).
CONDITION_FIELDS = ("prompt", "image", "pose")
RANK_RULES = ("strict", "pad", "truncate")
CONDITION_DIR = "conditions"
TASK = "imported"  # the `task` of an imported zoo's index: it belongs to no lofa world


@dataclass
class ConditionLine:
    """One JSONL line: the LoRA file it conditions and its condition (kind "prompt" | "image" | "pose")."""

    number: int   # line number in the JSONL, from 1
    file: str     # LoRA file name in the LoRA folder
    kind: str
    value: str    # the prompt, or the condition file's path as written (relative to the JSONL's folder)


def read_conditions(path: str | os.PathLike) -> list[ConditionLine]:
    """The lines of a conditions JSONL, checked: each a JSON object with "file" and exactly one of "prompt",
    "image", "pose" (the same one on every line), nothing else; a prompt not empty. Blank lines are skipped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LofaError(f"{path}: no such file; give the JSONL of conditions, one line per LoRA file")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: a byte-order mark (Windows editors) is no line
    except UnicodeDecodeError as err:
        raise LofaError(f"{path}: not UTF-8 text (byte {err.start}); save the JSONL as UTF-8") from None
    except OSError as err:
        raise LofaError(f"{path}: cannot read ({err.strerror}); check its permissions") from None
    lines = []
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        where = f"{path} line {number}"
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError as err:
            raise LofaError(f"{where}: not JSON ({err.msg} at column {err.colno}); write one JSON object per line, "
                            'e.g. {"file": "a.safetensors", "prompt": "..."}') from None
        except RecursionError:  # json gives up on very deep nesting this way
            raise LofaError(f"{where}: not a JSON object of conditions (nested too deeply)") from None
        lines.append(_condition_line(entry, number, where))
    kinds = {}
    for line in lines:
        kinds.setdefault(line.kind, line)
    if len(kinds) > 1:
        first, other = list(kinds.values())[:2]
        raise LofaError(f"{path} line {other.number} has a {other.kind} condition but line {first.number} a "
                        f"{first.kind}; a zoo has one condition kind, split the LoRAs into two zoos")
    return lines


def _condition_line(entry, number: int, where: str) -> ConditionLine:
    if not isinstance(entry, dict):
        raise LofaError(f"{where}: a {type(entry).__name__}, not a JSON object; write "
                        '{"file": "a.safetensors", "prompt": "..."} (or "image" / "pose" instead of "prompt")')
    if "file" not in entry:
        raise LofaError(f"{where}: no \"file\"; name the LoRA file this condition belongs to")
    file = entry["file"]
    if not isinstance(file, str) or not file.strip():
        raise LofaError(f"{where}: \"file\" is {json.dumps(file)[:60]}; give the LoRA file's name in the LoRA "
                        "folder, e.g. \"a.safetensors\"")
    if Path(file).name != file or not file.endswith(".safetensors"):
        raise LofaError(f"{where}: \"file\" {file!r} is not a .safetensors file name; give the name of a "
                        ".safetensors file directly in the LoRA folder (no folders)")
    unknown = sorted(k for k in entry if k != "file" and k not in CONDITION_FIELDS)
    if unknown:
        raise LofaError(f"{where}: unknown key {unknown[0]!r}; a line holds \"file\" and one of "
                        f"{', '.join(CONDITION_FIELDS)}")
    kinds = [k for k in CONDITION_FIELDS if k in entry]
    if not kinds:
        raise LofaError(f"{where}: no condition; add one of {', '.join(CONDITION_FIELDS)}")
    if len(kinds) > 1:
        raise LofaError(f"{where}: mixes condition kinds {' and '.join(kinds)}; give one condition per line")
    kind = kinds[0]
    value = entry[kind]
    if not isinstance(value, str):
        what = "the prompt text" if kind == "prompt" else f"the {kind} file's path"
        raise LofaError(f"{where}: \"{kind}\" is a {type(value).__name__}; give {what} as a string")
    if not value.strip():
        what = "the prompt is empty; describe the LoRA" if kind == "prompt" else f"the {kind} path is empty"
        raise LofaError(f"{where}: {what}")
    return ConditionLine(number=number, file=file, kind=kind, value=value)


def check_condition_file(path: Path, kind: str, where: str) -> None:
    """Refuse a condition file that is missing or unreadable, as `lofa predict` would read it: an image any PIL
    picture, a pose one tensor [3, T, H, W] (or [1, 3, T, H, W]) float in [-1, 1]."""
    from lofa.models.cond_encoders import IMAGE_SUFFIXES, TENSOR_SUFFIXES, CondEncoderConfig, read_condition

    if not path.is_file():
        raise LofaError(f"{where}: {kind} {path}: no such file; paths are relative to the JSONL's folder")
    suffixes = IMAGE_SUFFIXES if kind == "image" else TENSOR_SUFFIXES
    if path.suffix.lower() not in suffixes:
        raise LofaError(f"{where}: {kind} {path}: give a {' / '.join(suffixes)} file")
    try:
        # read_condition reads a config's kind and input shape only; a zoo has no encoder yet, so no shape: the
        # condition is read at its own size, which read_condition warns about (not news here)
        if kind == "pose":
            config = CondEncoderConfig(kind="pose", grid=(1, 1, 1))
        else:
            config = CondEncoderConfig(kind="image")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            read_condition(path, config)
    except LofaError as err:
        raise LofaError(f"{where}: {kind} {path}: {err}") from None
    except OSError as err:
        raise LofaError(f"{where}: {kind} {path}: cannot read ({err.strerror or err})") from None


def _lora_digest(lora: LoraWeights) -> str:
    """A hash of what a LoRA is (module names, A and the scaled B = (alpha / r) · B, in float32, as load_lora reads
    them), not of its file: the same LoRA saved twice, or in two namings (kohya files fold the scale into B), hashes
    the same, though safetensors may order a file's header differently each time."""
    h = hashlib.sha256()
    for name in sorted(lora, key=natural_key):
        factor = lora[name]
        h.update(f"{name} {tuple(factor.A.shape)} {tuple(factor.B.shape)}".encode())
        h.update(factor.A.float().contiguous().numpy().tobytes())
        h.update((factor.B.float() * factor.scale).contiguous().numpy().tobytes())
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        block = f.read(1 << 20)
        while block:  # 1 MiB at a time: a LoRA file need not be read whole
            h.update(block)
            block = f.read(1 << 20)
    return h.hexdigest()


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies below it (both resolved)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


# --- rank rules ----------------------------------------------------------------------------------------------------
def pad_rank(factor: LoraFactor, rank: int) -> LoraFactor:
    """Zero-pad A [r, in] and B [out, r] to `rank` rows / columns; alpha · rank / r keeps the scale, so ΔW is
    unchanged (the added directions are zero)."""
    r = factor.rank
    A = torch.zeros(rank, factor.A.shape[1], dtype=factor.A.dtype)
    B = torch.zeros(factor.B.shape[0], rank, dtype=factor.B.dtype)
    A[:r] = factor.A
    B[:, :r] = factor.B
    return LoraFactor(A=A, B=B, alpha=factor.alpha * rank / r)


def truncate_rank(factor: LoraFactor, rank: int) -> tuple[LoraFactor, float, float]:
    """The best rank-`rank` approximation of ΔW (Eckart-Young), re-factorised -> (factor, dropped, total).

    Computed in float64 without forming ΔW [out, in]: B = Qb Rb and Aᵀ = Qa Ra (QR), so ΔW = Qb (s Rb Raᵀ) Qaᵀ
    and the SVD of the small core U S Vᵀ gives ΔW's singular values S; B' = Qb U √S and A' = √S Vᵀ Qaᵀ keep the
    top `rank` (scale 1: alpha = rank), zero-padded when ΔW has fewer. dropped / total: the sums of squared
    singular values left out / in all (||ΔW' - ΔW||²_F and ||ΔW||²_F, up to the storage dtype's rounding).
    """
    Qb, Rb = torch.linalg.qr(factor.B.double())
    Qa, Ra = torch.linalg.qr(factor.A.double().T)
    U, S, Vh = torch.linalg.svd(factor.scale * Rb @ Ra.T, full_matrices=False)
    keep = min(rank, S.shape[0])
    root = S[:keep].sqrt()
    B = torch.zeros(factor.B.shape[0], rank, dtype=torch.float64)
    A = torch.zeros(rank, factor.A.shape[1], dtype=torch.float64)
    B[:, :keep] = (Qb @ U[:, :keep]) * root
    A[:keep] = root[:, None] * (Vh[:keep] @ Qa.T)
    dropped, total = float((S[keep:] ** 2).sum()), float((S ** 2).sum())
    return LoraFactor(A=A.to(factor.A.dtype), B=B.to(factor.B.dtype), alpha=float(rank)), dropped, total


def uniform_rank(lora: LoraWeights, rule: str, rank: int) -> tuple[LoraWeights, float | None]:
    """`lora` with every module at `rank` by `rule` ("strict": unchanged, "pad", "truncate") -> (LoRA, relative
    error ||ΔW' - ΔW||_F / ||ΔW||_F over all modules; None unless "truncate")."""
    if rule == "strict":
        return lora, None
    out, dropped, total = {}, 0.0, 0.0
    for name, factor in lora.items():
        if rule == "truncate" and factor.rank > rank:
            out[name], module_dropped, module_total = truncate_rank(factor, rank)
            dropped, total = dropped + module_dropped, total + module_total
            continue
        if rule == "truncate":  # kept whole: its ΔW counts in the norm of the LoRA
            total += float(factor.delta_rows(dtype=torch.float64).square().sum())
        out[name] = pad_rank(factor, rank) if factor.rank < rank else factor
    if rule != "truncate":
        return out, None
    return out, (math.sqrt(dropped / total) if total > 0 else 0.0)


# --- the import ----------------------------------------------------------------------------------------------------
@dataclass
class _Source:
    """What the first pass learnt about one LoRA file (its weights are read again when it is written)."""

    line: ConditionLine
    path: Path
    sha256: str
    naming: str
    ranks: dict[str, int]      # module -> rank
    alphas: dict[str, float]   # module -> alpha


def _check_options(tau: float, ranks: str, rank: int | None) -> None:
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau >= 0):
        raise LofaError(f"--tau {tau}: must be a finite number >= 0 (the paper uses 0.02)")
    if ranks not in RANK_RULES:
        raise LofaError(f"--ranks {ranks!r}: choose one of {', '.join(RANK_RULES)}")
    if ranks == "truncate" and rank is None:
        raise LofaError("--ranks truncate needs --rank R, the rank every LoRA is cut to")
    if ranks != "truncate" and rank is not None:
        raise LofaError(f"--rank {rank} is for --ranks truncate; drop it (--ranks {ranks} chooses the rank itself)")
    if rank is not None and rank < 1:
        raise LofaError(f"--rank {rank}: give a rank of at least 1")


def _check_out(out: Path, force: bool, inputs: list[Path]) -> None:
    if out.is_file():
        raise LofaError(f"--out {out} is a file; give a folder for the zoo")
    for path in inputs:
        if _inside(path, out):
            raise LofaError(f"--out {out} holds the import's input {path}; write the zoo to another folder")
    if out.exists() and not force:
        raise LofaError(f"--out {out} exists; pass --force to replace it, or choose another folder")


def _lora_files(lora_dir: Path, lines: list[ConditionLine], conditions: Path) -> list[str]:
    """Names of the LoRA files in `lora_dir` (its *.safetensors files, minus pose conditions kept there)."""
    condition_files = {(conditions.parent / line.value).resolve() for line in lines if line.kind != "prompt"}
    return sorted(p.name for p in lora_dir.glob("*.safetensors")
                  if p.is_file() and p.resolve() not in condition_files)


def _match_lines(lora_dir: Path, conditions: Path, lines: list[ConditionLine]) -> None:
    """Every LoRA file has exactly one line and every line names a LoRA file."""
    files = _lora_files(lora_dir, lines, conditions)
    if not files:
        raise LofaError(f"{lora_dir} holds no .safetensors LoRA files; give the folder of the LoRAs to import")
    if not lines:
        raise LofaError(f"{conditions} holds no condition lines; add one line per LoRA file, e.g. "
                        f'{{"file": "{files[0]}", "prompt": "..."}}')
    seen = {}
    for line in lines:
        if line.file in seen:
            raise LofaError(f"{conditions} lines {seen[line.file]} and {line.number} both name {line.file}; keep "
                            "one line per LoRA file")
        seen[line.file] = line.number
        if line.file not in files:
            raise LofaError(f"{conditions} line {line.number} names {line.file}, which is not in {lora_dir}; add "
                            "the file or drop the line")
    for name in files:
        if name not in seen:
            raise LofaError(f"{lora_dir / name} has no line in {conditions}; add "
                            f'{{"file": "{name}", "{lines[0].kind}": ...}} or move the file out of the folder')


def _read_sources(lora_dir: Path, conditions: Path, lines: list[ConditionLine], base: BaseWeightsFile) -> list[_Source]:
    """First pass: read and check every LoRA and condition; keep what the rules need, not the weights (a zoo of
    full-size LoRAs need not fit in memory)."""
    sources, by_hash, modules = [], {}, None
    for line in lines:
        where = f"{conditions} line {line.number}"
        if line.kind != "prompt":
            check_condition_file(conditions.parent / line.value, line.kind, where)
        path = lora_dir / line.file
        try:
            lora, _ = load_lora(path, module_names=list(base))
            check_compatible(lora, base.shapes)
        except LofaError as err:
            # some refusals (a kohya name the base lacks, a module of another base) do not say which file
            raise (err if str(path) in str(err) else LofaError(f"{path}: {err}")) from None
        digest = _sha256(path)
        same = _lora_digest(lora)
        if same in by_hash:
            first = by_hash[same]
            raise LofaError(f"{path} (line {line.number}) has the same content as {first.path.name} (line "
                            f"{first.line.number}); drop one of the two")
        names = sorted(lora, key=natural_key)
        if modules is None:
            modules = (line, names)
        elif names != modules[1]:
            first_line, first_names = modules
            only_here = sorted(set(names) - set(first_names), key=natural_key)
            only_there = sorted(set(first_names) - set(names), key=natural_key)
            which = (f"module {only_here[0]!r} is not in {first_line.file}" if only_here else
                     f"it lacks module {only_there[0]!r} of {first_line.file}")
            raise LofaError(f"{path} (line {line.number}) adapts {len(names)} modules and {first_line.file} (line "
                            f"{first_line.number}) {len(first_names)}: {which}; every LoRA of a zoo adapts the same "
                            "modules, import the two kinds as two zoos")
        source = _Source(line=line, path=path, sha256=digest, naming=detect_format(path),
                         ranks={n: f.rank for n, f in lora.items()}, alphas={n: f.alpha for n, f in lora.items()})
        by_hash[same] = source
        sources.append(source)
    return sources


def _zoo_rank(sources: list[_Source], rule: str, rank: int | None, conditions: Path) -> int:
    """The one rank of the zoo: the LoRAs' rank ("strict", refused when they differ), the largest ("pad") or
    `rank` ("truncate")."""
    if rule == "truncate":
        return rank
    if rule == "pad":
        return max(r for s in sources for r in s.ranks.values())
    first = sources[0]
    first_rank = first.ranks[next(iter(first.ranks))]
    for source in sources:
        for name, r in source.ranks.items():
            if r != first_rank:
                raise LofaError(f"{source.path} (line {source.line.number}) has rank {r} at {name!r} but "
                                f"{first.path.name} rank {first_rank}; a zoo has one rank: pass --ranks pad "
                                "(zero-pad to the largest, ΔW unchanged) or --ranks truncate --rank R (SVD, "
                                "changes ΔW)")
    return first_rank


def _one_or_all(values: dict[str, float | int]) -> float | int | dict:
    """One number when every module has it, else {module: value}."""
    distinct = set(values.values())
    return distinct.pop() if len(distinct) == 1 else dict(values)


def import_zoo(lora_dir: str | os.PathLike, conditions: str | os.PathLike, base: str | os.PathLike,
               out_dir: str | os.PathLike, *, tau: float = TAU, ranks: str = "strict", rank: int | None = None,
               force: bool = False) -> Path:
    """Import the LoRA files of `lora_dir` with the conditions of the JSONL `conditions` as a zoo at `out_dir`.

    base: the base model the LoRAs adapt (a diffusers model / pipeline folder or one .safetensors file);
    tau: response threshold of each LoRA's density in the index; ranks / rank: the rank rule (module docstring);
    force: replace an existing `out_dir`. Everything is checked before anything is written; the zoo appears whole
    or not at all. Returns `out_dir`, readable with `lofa.lora.zoo.Zoo`.
    """
    from lofa.analysis import analyze_lora

    lora_dir, conditions = Path(lora_dir).expanduser(), Path(conditions).expanduser()
    base_path, out_dir = Path(base).expanduser(), Path(out_dir).expanduser()
    _check_options(tau, ranks, rank)
    if not lora_dir.is_dir():
        raise LofaError(f"{lora_dir}: no such folder; give the folder of the LoRA files to import")
    _check_out(out_dir, force, [lora_dir, conditions, base_path])
    lines = read_conditions(conditions)
    _match_lines(lora_dir, conditions, lines)
    base_weights = BaseWeightsFile(base_path)
    sources = _read_sources(lora_dir, conditions, lines, base_weights)
    zoo_rank = _zoo_rank(sources, ranks, rank, conditions)
    modules = sorted(sources[0].ranks, key=natural_key)
    header = {"task": TASK, "seed": None, "config": None, "source": "lofa zoo import",
              "base": weights_fingerprint(base_weights, modules), "base_path": str(base_path),
              "condition_kind": lines[0].kind, "tau": tau, "ranks": ranks, "rank": zoo_rank, "modules": modules}

    entries = []
    with atomic_dir(out_dir) as tmp:
        for case_id, source in enumerate(sources):
            line = source.line
            lora, _ = load_lora(source.path, module_names=list(base_weights))
            lora, error = uniform_rank(lora, ranks, zoo_rank)
            if line.kind == "prompt":
                condition, condition_source = {"prompt": line.value}, None
            else:
                copy = f"{CONDITION_DIR}/case_{case_id:05d}{Path(line.value).suffix.lower()}"
                (tmp / CONDITION_DIR).mkdir(exist_ok=True)
                shutil.copyfile(conditions.parent / line.value, tmp / copy)
                condition, condition_source = {line.kind: copy}, line.value
            entry = {"case_id": case_id, "split": "train", "source": line.file, "sha256": source.sha256,
                     "line": line.number, "naming": source.naming, "condition": condition,
                     "condition_source": condition_source, "rank": zoo_rank,
                     "source_rank": _one_or_all(source.ranks), "alpha": _one_or_all(source.alphas),
                     "modules": len(lora), "density": analyze_lora(base_weights, lora, tau)["active_fraction"],
                     "base": header["base"]}
            if error is not None:
                entry["truncation_error"] = error
            save_lora(tmp / LORA_DIR / lora_filename(case_id), lora, entry)
            entries.append({**entry, "file": f"{LORA_DIR}/{lora_filename(case_id)}"})
        write_json(tmp / INDEX, {**header, "loras": entries})
    return out_dir
