"""The LoRA zoo: one LoRA file per case and one index over all of them; collection resumes after any interruption.

Layout of a zoo folder:
    index.json                  {"task", "seed", "config", "base", "loras": [entry per LoRA, by case id]}
    loras/case_00012.safetensors  diffusers-loadable LoRA (rank and alpha stored) + the LoRA's metadata

Which cases get a LoRA: every case at every preset; `ZooConfig.max_cases` can cap a zoo's size (`select_cases`), and
every held-out case always gets one, since held-out per-case LoRAs are the baseline predicted LoRAs are compared with.

Every write is atomic (temp file + rename): a LoRA file first, then the index. The files are the truth and the
index is rebuilt from their metadata on every start, so a kill at any moment loses at most the LoRAs in training:
an entry whose file is missing or damaged is dropped (and the LoRA retrained), a finished file the index has not
caught up with is indexed, and a finished LoRA is never trained again.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections import Counter
from dataclasses import MISSING, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lofa import seeds
from lofa.errors import LofaError
from lofa.io import read_json, write_json
from lofa.lora.batched import train_lora_batch
from lofa.lora.formats import LoraFactor, LoraWeights, load_lora, save_lora
from lofa.lora.train import LoraTrainConfig, recipe, train_lora
from lofa.models.text import text_encoder

INDEX = "index.json"
LORA_DIR = "loras"
# Fields that do not change a LoRA's weights (the batched and single trainers are equivalent).
_FREE_FIELDS = ("group_size",)
# The component prefix diffusers pipelines expect in a LoRA file (`load_lora_weights`).
PIPELINE_PREFIX = {"video_dit": "transformer", "image_unet": "unet"}


@dataclass
class ZooConfig:
    """Which cases of a world get a LoRA (the recipe of each LoRA is `LoraTrainConfig`)."""

    max_cases: int | None = field(default=None, metadata={
        "help": "Largest number of LoRAs a zoo holds, or None for one per case. Every held-out case gets one "
                "even past the cap; training cases fill the rest in a seeded order, round-robin over the coarse "
                "categories (`select_cases`)."})

    # every scale gives every case a LoRA: a cap would drop training cases and break the worlds' guarantee that each
    # held-out component value is seen in training
    PRESETS = {"smoke": {}, "mini": {}, "full": {}}


def quality_seeds(seed: int = 0) -> tuple[int, int, int, int]:
    """Seeds of a zoo's quality check (notebook 03, `lofa bench sweep`): LoRA / base samples, ground-truth
    renders, reference images, denoising noise: the first seeds of the "quality.*" streams of lofa.seeds."""
    return tuple(seeds.stream(seed, f"quality.{name}") for name in ("sample", "ground_truth", "reference", "denoise"))


def select_cases(world, max_cases: int | None = None, seed: int = 0, among: list[int] | None = None) -> list[int]:
    """Case ids (sorted) that get a LoRA: every held-out case, then train cases up to `max_cases` in total.

    Train cases are taken in a seeded random order, round-robin over the coarse categories, so a capped zoo still
    covers every category evenly. among: restrict the choice to these case ids (e.g. the cases a zoo holds).
    """
    if max_cases is not None and max_cases < 1:
        raise LofaError(f"max_cases must be a positive number of LoRAs or None (every case), not {max_cases}")
    allowed = None if among is None else set(among)
    pool = [c for c in world.cases if allowed is None or c.id in allowed]
    heldout = [c.id for c in pool if c.split == "heldout"]
    train = [c for c in pool if c.split == "train"]
    n_train = len(train) if max_cases is None else max(0, min(len(train), max_cases - len(heldout)))
    order = np.random.default_rng([seed, len(world.cases)]).permutation(len(train))
    turn = Counter()
    ranked = []  # (turn of its category, position in the random order, case id)
    for position, i in enumerate(order):
        ranked.append((turn[train[i].coarse], position, train[i].id))
        turn[train[i].coarse] += 1
    return sorted(heldout + [case_id for *_, case_id in sorted(ranked)[:n_train]])


def lora_filename(case_id: int) -> str:
    return f"case_{case_id:05d}.safetensors"


def base_fingerprint(gen, names: list[str]) -> str:
    """Hash of the base weights the LoRAs adapt, so a zoo is never resumed on another base."""
    return weights_fingerprint({name: gen.net.get_submodule(name).weight for name in names}, names)


def weights_fingerprint(weights, names: list[str]) -> str:
    """`base_fingerprint` of base weights given as {module_name: W [out, in]} (a dict or a lazy
    `lofa.lora.formats.BaseWeightsFile`): the same hash of the same tensors, in the order of `names`."""
    h = hashlib.sha256()
    for name in names:
        w = weights[name].detach().float().cpu().contiguous()
        h.update(name.encode())
        h.update(w.numpy().tobytes())
    return h.hexdigest()[:16]


def zoo_header(world, gen, cfg: LoraTrainConfig, seed: int) -> dict:
    """What identifies a zoo (its index.json minus the entries): task, seed, resolved recipe (with the base's t
    distribution, `lofa.lora.train.recipe`) and base fingerprint; two zoos with equal headers (up to
    `_FREE_FIELDS`) hold the same LoRAs."""
    cfg = cfg.for_task(world.task)
    return {"task": world.task, "seed": seed, "config": recipe(cfg, gen.t_distribution),
            "base": base_fingerprint(gen, gen.lora_target_modules(cfg.include_ffn))}


def same_zoo(found: dict, expected: dict) -> bool:
    """Whether two zoo headers (`zoo_header`) describe the same LoRAs."""
    return (all(found.get(k) == expected[k] for k in ("task", "seed", "base"))
            and _recipe(found.get("config", {})) == _recipe(expected["config"]))


def _recipe(config: dict) -> dict:
    """The recipe fields of an index's config; a field the index lacks (it was written before the field existed)
    takes its dataclass default, which is the behaviour the recipe had then. The t distribution's keys have no
    default (they are the base's, `recipe`): an index without them matches no header."""
    defaults = {f.name: f.default for f in fields(LoraTrainConfig) if f.default is not MISSING}
    return {k: v for k, v in {**defaults, **config}.items() if k not in _FREE_FIELDS}


def _check_same_zoo(found: dict, expected: dict, where: Path) -> None:
    for key in ("task", "seed", "base"):
        if found.get(key) != expected[key]:
            raise LofaError(f"{where} was built with {key} {found.get(key)!r}, not {expected[key]!r}; use another "
                            f"zoo folder or delete this one")
    found_recipe, recipe = _recipe(found.get("config", {})), _recipe(expected["config"])
    if found_recipe != recipe:
        field = next(k for k in sorted(set(found_recipe) | set(recipe)) if found_recipe.get(k) != recipe.get(k))
        raise LofaError(f"{where} was built with {field}={found_recipe.get(field)!r}, not {recipe.get(field)!r}; use "
                        f"another zoo folder or delete this one")


def _reconcile(zoo_dir: Path, header: dict, world, clean: bool = True) -> dict[int, dict]:
    """Index entries {case_id: entry} rebuilt from the valid LoRA files; damaged files and (clean=True) temp
    leftovers go. A shard passes clean=False: a temp file may be another shard's write in progress.

    A LoRA belongs to its case, not to a world: a file whose case name is `world`'s case of that id is kept (a
    world enlarged with more cases keeps its first ones, so their LoRAs need no retraining), and its entry takes
    the split from `world` (the held-out draw of a larger world differs). A file of another case is refused."""
    lora_dir = zoo_dir / LORA_DIR
    lora_dir.mkdir(parents=True, exist_ok=True)
    for leftover in [*zoo_dir.glob(".*.tmp"), *lora_dir.glob(".*.tmp")] if clean else []:
        leftover.unlink()  # a killed atomic write's temp file
    index = read_json(zoo_dir / INDEX)
    if index is not None:
        _check_same_zoo(index, header, zoo_dir / INDEX)
    entries = {}
    for path in sorted(lora_dir.glob("case_*.safetensors")):
        try:
            _, meta = load_lora(path)
        except LofaError:
            path.unlink()
            continue
        if meta.get("case_id") is None or lora_filename(meta["case_id"]) != path.name:
            raise LofaError(f"{path} is not a LoRA of this zoo (its metadata names case {meta.get('case_id')!r}); "
                            f"move it out of {lora_dir}")
        # a field the file's metadata lacks predates the field: `_recipe` gives it its default
        _check_same_zoo({**meta, "config": {k: meta[k] for k in header["config"] if k in meta}}, header, path)
        case_id = meta["case_id"]
        if case_id >= len(world.cases) or meta.get("case_name") != world.cases[case_id].name:
            this = world.cases[case_id].name if case_id < len(world.cases) else "no case"
            raise LofaError(f"{path} is the LoRA of case {meta.get('case_name')!r}, but case {case_id} of this "
                            f"{world.task} world is {this!r} (the world changed); move {zoo_dir} away or rebuild it")
        entries[case_id] = {**meta, "split": world.cases[case_id].split, "file": f"{LORA_DIR}/{path.name}"}
    return entries


def _write_index(zoo_dir: Path, header: dict, entries: dict[int, dict]) -> None:
    """Write the index, unless the one on disk already says the same: a finished zoo is only read, so processes
    that open it side by side (notebook 07's workers) never rename a file over one another's, nor take another's
    write in progress for a killed write's leftover."""
    index = {**header, "loras": [entries[c] for c in sorted(entries)]}
    if read_json(zoo_dir / INDEX) == json.loads(json.dumps(index, default=str)):  # as JSON reads it back
        return
    write_json(zoo_dir / INDEX, index)


def build_zoo(world, gen, cfg: LoraTrainConfig, zoo_dir: str | os.PathLike, device="cpu", seed: int = 0, *,
              case_ids: list[int] | None = None, text=None, batched: bool = True, progress: bool = True,
              shard: tuple[int, int] | None = None) -> "Zoo | None":
    """Train one LoRA per case (default: every case of `world`) into `zoo_dir`, resuming what is already there.

    gen: the base `lofa.models.Generator` (moved to `device`); batched: `cfg.group_size` LoRAs per
    forward/backward (`lofa.lora.batched`) instead of one peft LoRA at a time — the same weights either way.
    Rerun after an interruption with the same arguments to finish the rest.

    shard=(i, n): train only groups i, i + n, ... of the groups a fresh unsharded call forms (so every LoRA comes
    out as it would there) and write no index; n processes can share a zoo that way. A final unsharded call
    trains what is left, if anything, and writes the index; until then the zoo is incomplete and returns None.
    """
    zoo_dir = Path(zoo_dir)
    cfg = cfg.for_task(world.task)
    gen.to(device)
    case_ids = [c.id for c in world.cases] if case_ids is None else list(case_ids)
    header = zoo_header(world, gen, cfg, seed)
    if shard is not None and not (len(shard) == 2 and 0 <= shard[0] < shard[1]):
        raise LofaError(f"shard {shard!r}: give (i, n) with 0 <= i < n")
    entries = _reconcile(zoo_dir, header, world, clean=shard is None)
    chunk = cfg.group_size if batched else 1
    todo = [c for c in case_ids if c not in entries]
    if shard is None:
        _write_index(zoo_dir, header, entries)
        groups = [todo[start:start + chunk] for start in range(0, len(todo), chunk)]
    else:  # groups of the whole case list, so a shard's share does not depend on how far the others have got
        groups = [case_ids[start:start + chunk] for start in range(0, len(case_ids), chunk)][shard[0]::shard[1]]
        groups = [g for g in ([c for c in group if c not in entries] for group in groups) if g]
    run_id = uuid.uuid4().hex[:12]
    text = text_encoder(text, device)
    with tqdm(total=len(case_ids), initial=len(case_ids) - len(todo), desc=f"LoRA zoo ({world.task})",
              unit="LoRA", disable=not progress) as bar:
        for ids in groups:
            if batched:
                results = train_lora_batch(gen, world, ids, cfg, seed, device, text=text)
            else:
                results = [train_lora(gen, world, ids[0], cfg, seed, device, text=text)]
            trained_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
            for weights, info in results:
                meta = {**info, "base": header["base"], "run_id": run_id, "trained_at": trained_at}
                save_lora(zoo_dir / LORA_DIR / lora_filename(info["case_id"]), weights, meta,
                          prefix=PIPELINE_PREFIX[gen.kind])
                entries[info["case_id"]] = {**meta, "file": f"{LORA_DIR}/{lora_filename(info['case_id'])}"}
            if shard is None:
                _write_index(zoo_dir, header, entries)
            bar.update(len(ids))
            bar.set_postfix(final_loss=f"{sum(i['final_loss'] for _, i in results) / len(results):.4f}")
    return Zoo(zoo_dir) if shard is None else None


class Zoo:
    """A built zoo folder: its index entries (metadata of every LoRA) and LoRA loading.

    Iterating gives the entries in case order; `zoo[case_id]` is one entry.
    """

    def __init__(self, zoo_dir: str | os.PathLike):
        self.dir = Path(zoo_dir)
        index = read_json(self.dir / INDEX)
        if index is None:
            raise LofaError(f"{self.dir} has no {INDEX}; build the zoo with lofa.lora.zoo.build_zoo first")
        self.task, self.seed, self.base = index["task"], index["seed"], index["base"]
        # a field the index lacks takes its default; an imported zoo (lofa.lora.zoo_import) has no recipe: None.
        # The recipe's t_sampling / t_mean / t_std are the base's t distribution (`recipe`), not LoraTrainConfig's.
        names = {f.name for f in fields(LoraTrainConfig)}
        self.config = None if index["config"] is None else LoraTrainConfig(
            **{k: v for k, v in index["config"].items() if k in names})
        self.entries = {e["case_id"]: e for e in index["loras"]}
        self.header = {k: v for k, v in index.items() if k != "loras"}  # the index without its entries

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries[c] for c in sorted(self.entries))

    def __contains__(self, case_id: int) -> bool:
        return case_id in self.entries

    def __getitem__(self, case_id: int) -> dict:
        return self.entries[case_id]

    def case_ids(self, split: str | None = None) -> list[int]:
        """Case ids with a LoRA, optionally only those of one split ("train" | "heldout")."""
        return [c for c in sorted(self.entries) if split is None or self.entries[c]["split"] == split]

    def path(self, case_id: int) -> Path:
        if case_id not in self.entries:
            raise LofaError(f"the zoo at {self.dir} has no LoRA for case {case_id}; run build_zoo to add it")
        return self.dir / self.entries[case_id]["file"]

    def load(self, case_id: int, device="cpu") -> tuple[LoraWeights, dict]:
        """(weights {module_name: LoraFactor}, metadata) of one case's LoRA."""
        weights, meta = load_lora(self.path(case_id))
        # float32 whatever the file stores: the shipped zoos keep their factors in float16 (exact in float32)
        return {n: LoraFactor(f.A.to(device, torch.float32), f.B.to(device, torch.float32), f.alpha)
                for n, f in weights.items()}, meta

    def frame(self):
        """The index as a pandas DataFrame, one row per LoRA (for tables and plots)."""
        import pandas as pd

        return pd.DataFrame(list(self)).set_index("case_id")
