"""LoFA on your own LoRA collection: both stages trained on a zoo made by `lofa zoo import`, no world needed.

    lofa zoo import my_loras/ --conditions my_loras/conditions.jsonl --base Wan2.1-T2V-1.3B-Diffusers/ --out zoo/
    lofa zoo train zoo/ --out my_lofa/ --text-encoder Wan2.1-T2V-1.3B-Diffusers/ --scale paper --device cuda
    lofa predict --checkpoint my_lofa/ --prompt "a person does a cartwheel" --out cartwheel.safetensors

What differs from the pipeline's settings (`lofa.run.Run.hypernet`), and why:
- conditions are the zoo's prompts, one view per LoRA, encoded once by the text encoder: MiniLM by default, or a
  local umT5 folder (`lofa.models.wan.UMT5TextEncoder`) as Wan2.1 itself reads prompts. Image and pose zoos are
  refused: their condition encoders are trained on a world's renders, which an imported zoo does not have;
- Stage II trains on the reconstruction term alone: an imported zoo holds LoRAs, not the clips they were trained
  on, so there is nothing for the flow-matching term to score;
- `heldout` keeps the zoo's last LoRAs (by case id) out of training; Stage II's history follows their ΔW fidelity
  beside the training cases', the only check of generalisation a zoo without a world allows.
The recipe itself (`lofa.hypernet.recipe`) and the configs (scale presets plus a YAML of overrides) are the
pipeline's; the checkpoint names the base and the text encoder, so `lofa predict` needs nothing else.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch

from lofa.config import load_overrides, preset, resolve_device
from lofa.errors import LofaError
from lofa.hypernet.data import ConditionBank, TripletConfig, Triplets, stack_zoo
from lofa.hypernet.tokenizer import BaseWeights, TargetSpec
from lofa.lora.formats import BaseWeightsFile
from lofa.lora.zoo import Zoo, weights_fingerprint


def load_text_encoder(path: str | Path | None, device: str | torch.device):
    """MiniLM (`lofa.models.text.TextEncoder`, path None) or a local umT5 encoder folder (`UMT5TextEncoder`)."""
    if path is None:
        from lofa.models.text import TextEncoder

        return TextEncoder(device)
    from lofa.models.wan import UMT5TextEncoder

    return UMT5TextEncoder(path, device)


def text_encoder_reference(text, path: str | Path | None) -> dict:
    """The checkpoint's `condition_encoder` entry for a text encoder (what `LoFA.encode_condition` reloads)."""
    if path is None:
        return {"kind": "text", "max_length": text.max_length}
    return {"kind": "text", "encoder": "umt5", "path": str(Path(path).resolve()), "max_length": text.max_length}


class ZooTriplets(Triplets):
    """(prompt, LoRA, base weights) triplets of an imported zoo: Triplets' interface without a world.

    zoo_dir: a zoo of prompt conditions (`lofa zoo import`); base: the base model it was imported against (default:
    the path in its index), checked by fingerprint; text: a text encoder (`load_text_encoder`); heldout: how many of
    the last LoRAs stay out of training. Base weights and LoRAs are held as in Triplets (float32, on the CPU).
    """

    def __init__(self, zoo_dir: str | Path, base: str | Path | None, text, *, heldout: int = 0,
                 cfg: TripletConfig | None = None, seed: int = 0, progress: bool = False):
        self.zoo = zoo = Zoo(zoo_dir)
        header = zoo.header
        if header.get("source") != "lofa zoo import":
            raise LofaError(f"{zoo.dir} is not an imported zoo; pipeline zoos train with lofa train --setting")
        if header.get("condition_kind") != "prompt":
            raise LofaError(f"{zoo.dir} holds {header.get('condition_kind')} conditions; lofa zoo train takes prompt "
                            "zoos (image and pose encoders are trained on a world's renders: lofa train --setting)")
        ids = zoo.case_ids()
        if not 0 <= heldout < len(ids):
            raise LofaError(f"--heldout {heldout}: give 0 to {len(ids) - 1} for a zoo of {len(ids)} LoRAs (at least "
                            "one must train)")
        base = Path(base if base is not None else header["base_path"])
        weights = BaseWeightsFile(base)
        modules = list(header["modules"])
        if weights_fingerprint(weights, modules) != header["base"]:
            raise LofaError(f"--base {base} is not the model the zoo was imported against (its weights' fingerprint "
                            f"differs from the index's {header['base']}); give that base")
        self.world, self.kind, self.seed, self.text = None, "text", seed, text
        self.encoder = None
        self.cfg = cfg or TripletConfig()
        self.train_ids, self.heldout_ids = ids[:len(ids) - heldout], ids[len(ids) - heldout:]
        self.spec = TargetSpec.from_shapes({n: tuple(weights[n].shape) for n in modules})
        self.base = BaseWeights(self.spec, {n: weights[n].float() for n in modules})
        self.row = {c: i for i, c in enumerate(ids)}
        self.A, self.B, self.alpha = stack_zoo(zoo, ids, modules, "load LoRAs", progress)
        self.rank = next(iter(self.A.values())).shape[1]
        self._banks = {}

    def prompts(self, case_ids: Sequence[int]) -> list[str]:
        return [self.zoo[c]["condition"]["prompt"] for c in case_ids]

    def conditions(self, split: str = "train") -> ConditionBank:
        """One view per LoRA, its prompt's token states; "train" and "eval" are the same prompts (a zoo holds one)."""
        if split not in ("train", "eval"):
            raise LofaError(f"unknown condition split {split!r}; use 'train' or 'eval'")
        if "train" not in self._banks:
            ids = self.train_ids + self.heldout_ids
            states, mask = self.text.encode(self.prompts(ids))
            keep = int(mask.any(0).nonzero().max()) + 1  # drop positions padded in every prompt
            self._banks["train"] = ConditionBank(ids, states[:, None, :keep].float().cpu(),
                                                 mask[:, None, :keep].cpu())
        return self._banks["train"]


def train_on_zoo(zoo_dir: str | Path, out: str | Path, *, base: str | Path | None = None,
                 text_encoder: str | Path | None = None, scale: str = "mini", overrides: str | Path | None = None,
                 heldout: int = 0, device: str = "auto", seed: int = 0, progress: bool = True):
    """Train Stage I and Stage II on an imported zoo; the LoFA checkpoint goes to `out` (resumes; a complete folder
    is only loaded). Configs: the `scale` presets with the YAML `overrides` ({ConfigClass: {field: value}}).
    Returns the trained `LoFA`."""
    from lofa.hypernet import LoFA, save_pretrained
    from lofa.hypernet.config import HyperConfig
    from lofa.hypernet.predictor import CONFIG_FILE
    from lofa.hypernet.recipe import train_stage1, train_stage2
    from lofa.hypernet.train import Stage2TrainConfig, TrainConfig
    from lofa.run import MONITOR_CASES

    out = Path(out)
    device = resolve_device(device)
    if (out / CONFIG_FILE).exists():
        return LoFA.from_pretrained(out, device=device, dtype=torch.float32)
    changes = load_overrides(overrides)
    text = load_text_encoder(text_encoder, device)
    data = ZooTriplets(zoo_dir, base, text, heldout=heldout, cfg=preset(TripletConfig, scale, changes.get("TripletConfig")),
                       seed=seed, progress=progress)
    bank = data.conditions("train")
    fields = {"rank": data.rank, "alpha": data.alpha_value, "cond_dim": bank.dim, "cond_len": bank.tokens.shape[2]}
    cfg = preset(HyperConfig, scale, {**fields, **(changes.get("HyperConfig") or {})})
    train1 = preset(TrainConfig, scale, changes.get("TrainConfig"))
    train2 = preset(Stage2TrainConfig, scale, changes.get("Stage2TrainConfig"))
    train2 = dataclasses.replace(train2, lambda_diff=0.0)  # no clips to score (module docstring)
    stage1 = train_stage1(data, cfg, train1, out / "stage1", device=str(device), seed=seed, progress=progress)
    stage2 = train_stage2(data, stage1, train2, out / "stage2", device=str(device), seed=seed,
                          monitor_cases=MONITOR_CASES, progress=progress)
    save_pretrained(out, stage2, stage1, condition_encoder=text_encoder_reference(text, text_encoder),
                    base=str(Path(base if base is not None else data.zoo.header["base_path"]).resolve()))
    return LoFA.from_pretrained(out, device=device, dtype=torch.float32)
