"""Prediction: a trained LoFA checkpoint -> a standard LoRA file, in one process.

A checkpoint folder holds config.json (HyperConfig, the TargetSpec, the condition-encoder reference, the base
model reference), stage1.safetensors (absent for the single-stage ablation) and stage2.safetensors.
`LoFA.predict` runs Stage I -> Stage II in memory (Stage I's features never leave the GPU), and `lofa predict`
writes the LoRA through `lofa.lora.formats.save_lora` (diffusers-loadable, alpha honoured).

Everything that depends on the base weights alone (patch tokens and block 0's self half, for each stage) is
computed once in `set_base` and reused for every condition; the map decoder of Stage I is skipped, since Stage II
needs only Stage I's features.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from lofa.config import check_fields
from lofa.errors import LofaError
from lofa.hypernet.config import HyperConfig
from lofa.hypernet.model import Stage1, Stage2, Stage2Output, trim_condition
from lofa.hypernet.tokenizer import BaseWeights, TargetSpec
from lofa.io import read_json, save_safetensors, write_json

CONFIG_FILE = "config.json"


def save_pretrained(directory: str | Path, stage2: Stage2, stage1: Stage1 | None = None, *,
                    condition_encoder: dict | nn.Module | None = None, base: str | None = None) -> None:
    """Write a predictor checkpoint folder.

    condition_encoder: a reference dict ({"kind": "text", "max_length": 32}) or a lofa condition encoder module
    (saved beside, as condition_encoder.safetensors). base: path of the base model (diffusers folder or safetensors
    file), absolute or relative to `directory`, from which `from_pretrained` loads the target weights.
    """
    directory = Path(directory)
    if stage1 is not None and stage1.spec != stage2.spec:
        raise LofaError("Stage I and Stage II were built for different target specs")
    if isinstance(condition_encoder, nn.Module):
        condition_encoder.save(directory / "condition_encoder.safetensors")
        condition_encoder = {"kind": condition_encoder.config.kind, "path": "condition_encoder.safetensors"}
    if stage1 is not None:
        save_safetensors(stage1.state_dict(), directory / "stage1.safetensors")
    save_safetensors(stage2.state_dict(), directory / "stage2.safetensors")
    # config.json last: a folder with a config is complete.
    write_json(directory / CONFIG_FILE, {
        "hyper": {k: getattr(stage2.cfg, k) for k in stage2.cfg.__dataclass_fields__},
        "targets": stage2.spec.to_dict(),
        "stages": ["stage1", "stage2"] if stage1 is not None else ["stage2"],
        "condition_encoder": condition_encoder,
        "base": base,
    })


@torch.no_grad()
def merge_lora_(weights: Mapping[str, torch.Tensor], lora: Mapping) -> None:
    """W += (alpha / r) · B @ A in place for every module of `lora` (LoraFactor or (A, B, alpha) values)."""
    for name, f in lora.items():
        A, B, alpha = (f.A, f.B, f.alpha) if hasattr(f, "A") else f
        W = weights[name]
        W.addmm_(B.to(W.dtype), A.to(W.dtype), alpha=alpha / A.shape[0])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LoFA:
    """Stage I + Stage II for one base model.

    predict(condition_tokens [K, Dc] or [1, K, Dc], mask [K] / [1, K]) -> LoraWeights; `timings` holds the last
    call's per-phase milliseconds. set_base(weights) must run first (from_pretrained does it when the checkpoint
    names its base model).
    """

    def __init__(self, stage2: Stage2, stage1: Stage1 | None = None, *, condition_encoder: dict | None = None,
                 base: str | None = None):
        self.stage2 = stage2.eval().requires_grad_(False)
        self.stage1 = None if stage1 is None else stage1.eval().requires_grad_(False)
        self.cfg: HyperConfig = stage2.cfg
        self.spec: TargetSpec = stage2.spec
        self.condition_encoder = condition_encoder
        self.base_ref = base
        self.base: BaseWeights | None = None
        self.timings: dict[str, float] = {}
        self._adapter_slots: dict[tuple[int, str], list] = {}  # (id(net), adapter) -> [(lora_A, lora_B) weights]
        self._stage1_fn, self._stage2_fn = self.stage1_features, self.stage2_factors

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, base_weights: Mapping[str, torch.Tensor] | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> "LoFA":
        """Load a checkpoint folder; the base weights come from `base_weights` or the checkpoint's base path.

        dtype defaults to bf16 on CUDA and float32 on the CPU.
        """
        directory = Path(directory)
        try:
            meta = read_json(directory / CONFIG_FILE)
        except ValueError:  # JSONDecodeError, or UnicodeDecodeError for a file that is not text
            raise LofaError(f"{directory / CONFIG_FILE} is not valid JSON; the checkpoint is damaged") from None
        if meta is None:
            raise LofaError(f"{directory} has no {CONFIG_FILE}: not a LoFA checkpoint (or an interrupted save); "
                            "checkpoints of the pipeline are in runs/<scale>/hypernet/<setting>/lofa/")
        try:
            stage2, stage1, encoder, base = _build_from_config(meta, directory)
        except LofaError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, ArithmeticError, RuntimeError) as err:
            # a config.json of another model (a diffusers folder) or a damaged one: the fields are read as Python
            # values, so any of these can come out of a wrong one
            reason = " ".join(f"{type(err).__name__}: {err}".split())[:160]
            raise LofaError(f"{directory / CONFIG_FILE} is not a valid LoFA checkpoint config ({reason}); give a "
                            "folder written by lofa train or save_pretrained") from None
        _load_weights(stage2, directory / "stage2.safetensors")
        if stage1 is not None:
            _load_weights(stage1, directory / "stage1.safetensors")
        lofa = cls(stage2, stage1, condition_encoder=encoder, base=base).to(device, dtype)
        if base_weights is None and base is not None:
            from lofa.lora.formats import load_base_weights

            base_weights = load_base_weights(base, stage2.spec.names)
        if base_weights is not None:
            lofa.set_base(base_weights)
        return lofa

    def save_pretrained(self, directory: str | Path) -> None:
        save_pretrained(directory, self.stage2, self.stage1, condition_encoder=self.condition_encoder,
                        base=self.base_ref)

    @property
    def device(self) -> torch.device:
        return next(self.stage2.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.stage2.parameters()).dtype

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "LoFA":
        device = torch.device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        for stage in (self.stage1, self.stage2):
            if stage is not None:
                stage.to(device=device, dtype=dtype)
        if self.base is not None:
            self.set_base({n: self.base[i] for i, n in enumerate(self.spec.names)})
        return self

    @torch.no_grad()
    def set_base(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Hold the base model's target weights and cache each stage's condition-independent prefix."""
        t0 = time.perf_counter()
        self.base = BaseWeights(self.spec, weights, device=self.device, dtype=self.dtype)
        self._targets = torch.arange(len(self.spec), device=self.device)
        self._layout = self.stage2.backbone.tokenizer.layout(self._targets)
        self._prefix1 = None if self.stage1 is None else self.stage1.backbone.prefix(self.base, self._targets,
                                                                                     self._layout)
        self._prefix2 = self.stage2.backbone.prefix(self.base, self._targets, self._layout)
        _sync(self.device)
        self.timings = {"prefix_ms": 1e3 * (time.perf_counter() - t0)}

    def compile(self, **kwargs) -> "LoFA":
        """torch.compile the two condition-dependent passes (kwargs go to torch.compile)."""
        self._stage1_fn = torch.compile(self.stage1_features, **kwargs)
        self._stage2_fn = torch.compile(self.stage2_factors, **kwargs)
        # these modes replay CUDA graphs whose outputs live in pooled memory: each prediction must open a new
        # step, and results are copied out (predict_batch does) before the next one
        self._cudagraphs = kwargs.get("mode") in ("reduce-overhead", "max-autotune")
        return self

    def begin_step(self) -> None:
        """Mark the start of one prediction (needed with CUDA graphs, see `compile`; a no-op otherwise)."""
        if getattr(self, "_cudagraphs", False):
            torch.compiler.cudagraph_mark_step_begin()

    def stage1_features(self, cond: torch.Tensor, cond_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Stage I's final token features [N, M, S, d] for a trimmed condition; None without Stage I."""
        if self.stage1 is None:
            return None
        return self.stage1.backbone(self._prefix1, self._layout, cond, cond_mask)

    def stage2_factors(self, cond: torch.Tensor, cond_mask: torch.Tensor | None,
                       features: torch.Tensor | None) -> Stage2Output:
        """Padded LoRA factors of every target (Stage2Output, [N, M, ...]) for a trimmed condition."""
        backbone = self.stage2.backbone
        feats = backbone(self._prefix2, self._layout, cond, cond_mask, features)
        return Stage2Output(*self.stage2.lora_head(feats, self._targets, backbone.tokenizer, self.base.rms))

    def prepare_condition(self, tokens: torch.Tensor, mask: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens [N, K, Dc] (or [K, Dc]), mask [N, K] -> trimmed, on the model's device and dtype."""
        if self.base is None:
            raise LofaError("no base weights: call set_base(weights) or give the checkpoint a base path")
        if tokens.ndim == 2:
            tokens, mask = tokens[None], None if mask is None else mask[None]
        if tokens.shape[-1] != self.cfg.cond_dim:
            raise LofaError(f"condition tokens have width {tokens.shape[-1]}, the model expects {self.cfg.cond_dim}; "
                            "use the condition encoder the checkpoint was trained with")
        tokens, mask = trim_condition(tokens, mask)
        return tokens.to(self.device, self.dtype), None if mask is None else mask.to(self.device)

    @torch.no_grad()
    def predict_factors(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> Stage2Output:
        """Stage I -> Stage II for N conditions; padded factors A [N, M, r, GC·p], B [N, M, GR·p, r]."""
        cond, cond_mask = self.prepare_condition(tokens, mask)
        self.begin_step()
        t0 = time.perf_counter()
        features = self._stage1_fn(cond, cond_mask)
        _sync(self.device)
        t1 = time.perf_counter()
        out = self._stage2_fn(cond, cond_mask, features)
        _sync(self.device)
        self.timings.update(stage1_ms=1e3 * (t1 - t0), stage2_ms=1e3 * (time.perf_counter() - t1))
        return out

    def predict_batch(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> list[dict]:
        """N conditions -> N LoraWeights ({module name: LoraFactor(A [r, in], B [out, r], alpha)}, float32)."""
        from lofa.lora.formats import LoraFactor

        out = self.predict_factors(tokens, mask)
        loras = self.stage2.lora(out, self._targets)
        n = out.A.shape[0]
        return [{k: LoraFactor(A=A[i].float(), B=B[i].float(), alpha=float(alpha))
                 for k, (A, B, alpha) in loras.items()} for i in range(n)]

    def predict(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        """One condition, tokens [K, Dc] or [1, K, Dc] -> LoraWeights."""
        if tokens.ndim == 3 and tokens.shape[0] != 1:
            raise LofaError(f"predict takes one condition, got {tokens.shape[0]}; use predict_batch")
        return self.predict_batch(tokens, mask)[0]

    @torch.no_grad()
    def activate(self, net: nn.Module, tokens: torch.Tensor, mask: torch.Tensor | None = None,
                 adapter_name: str = "lofa") -> None:
        """Predict one condition's LoRA and make it the active peft adapter `adapter_name` of the diffusers model
        `net` (the base this LoFA holds: the target names are its module names), in memory, with no file.

        The first call adds a LoRA adapter of the predicted rank and alpha to the target modules (diffusers'
        `add_adapter`, peft's LoraConfig); later calls write the new factors into it in place, one fused copy:
        the modules stay the same objects, so a compiled `net` is not retraced. `timings` gets the phases
        (stage1_ms, stage2_ms, write_ms; add_adapter_ms on the first call).
        """
        out = self.predict_factors(tokens, mask)
        t0 = time.perf_counter()
        slots = self._adapter_slots.get((id(net), adapter_name))
        if slots is None:
            from peft import LoraConfig

            net.add_adapter(LoraConfig(r=self.cfg.rank, lora_alpha=self.cfg.alpha, target_modules=self.spec.names,
                                       init_lora_weights=False), adapter_name=adapter_name)
            net.set_adapters([adapter_name])
            slots = []
            for target in self.spec.targets:
                module = net.get_submodule(target.name)
                slots.append((module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight))
            self._adapter_slots[(id(net), adapter_name)] = slots
            _sync(self.device)
            self.timings["add_adapter_ms"] = 1e3 * (time.perf_counter() - t0)
            t0 = time.perf_counter()
        sources, targets = [], []
        for t, (target, (a, b)) in enumerate(zip(self.spec.targets, slots)):
            out_f, in_f = target.shape
            sources += [out.A[0, t, :, :in_f], out.B[0, t, :out_f]]
            targets += [a, b]
        torch._foreach_copy_(targets, sources)
        _sync(self.device)
        self.timings["write_ms"] = 1e3 * (time.perf_counter() - t0)

    @torch.no_grad()
    def merge_(self, out: Stage2Output, weight: float = 1.0, index: int = 0) -> None:
        """W += weight · (alpha / r) · B @ A into the held base weights, one batched product per shape group
        (the fused merge; `merge_lora_` does the same into any {name: W})."""
        scale = weight * self.cfg.lora_scale
        for idx, stack in self.base.groups:
            out_f, in_f = stack.shape[1:]
            contiguous = idx == list(range(idx[0], idx[0] + len(idx)))
            i = slice(idx[0], idx[0] + len(idx)) if contiguous else torch.as_tensor(idx, device=stack.device)
            A = out.A[index, i, :, :in_f].to(stack.dtype)
            B = out.B[index, i, :out_f].to(stack.dtype)
            stack.baddbmm_(B, A, alpha=scale)

    @torch.no_grad()
    def encode_condition(self, prompt: str | None = None, image=None, pose=None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [1, K, Dc], mask [1, K] bool) of one condition from the checkpoint's condition encoder.

        Give the one the checkpoint was trained on (`condition_kind`): prompt (text; an empty or blank prompt is
        refused, one longer than the encoder's max_length tokens is cut with a warning naming the cut); image (a
        file path or PIL image, any mode and bit depth, fitted to the encoder's resolution:
        `lofa.models.cond_encoders.image_to_condition`); pose (a .pt / .npy / .safetensors path or a tensor
        [3, T, H, W] in [-1, 1] of the encoder's T, H, W: `check_pose`). Raises LofaError otherwise.
        """
        kind = self.condition_kind
        given = {"text": prompt, "image": image, "pose": pose}
        if kind not in given:
            raise LofaError("the checkpoint names no condition encoder; pass condition tokens to predict() instead")
        if given[kind] is None:
            other = next((k for k, v in given.items() if v is not None), None)
            offered = f", not {other}" if other else ""
            raise LofaError(f"this checkpoint is conditioned on {kind}{offered}: pass --{CONDITION_OPTION[kind]}")
        ref = self.condition_encoder
        if kind == "text":
            if not isinstance(prompt, str) or not prompt.strip():
                raise LofaError("the prompt is empty; describe the case to personalize, e.g. --prompt \"a person "
                                "does a side kick with the left leg\"")
            if ref.get("encoder") == "umt5":  # a checkpoint trained on a Wan zoo (lofa.hypernet.imported)
                from lofa.models.wan import UMT5TextEncoder

                return UMT5TextEncoder(ref["path"], self.device, ref.get("max_length", 512)).encode([prompt])
            from lofa.models.text import TextEncoder

            return TextEncoder(self.device, ref.get("max_length", 32)).encode([prompt])
        from lofa.models.cond_encoders import load_condition_encoder, read_condition

        encoder = load_condition_encoder(ref["path"], device=self.device)
        x = read_condition(given[kind], encoder.config)
        return encoder.encode(x.to(self.device)[None])

    @property
    def condition_kind(self) -> str | None:
        """"text", "image" or "pose": the condition the checkpoint was trained on (None when it names none)."""
        return (self.condition_encoder or {}).get("kind")


def _build_from_config(meta: dict, directory: Path) -> tuple[Stage2, Stage1 | None, dict | None, str | None]:
    """The untrained stages, the condition-encoder reference and the base path a checkpoint's config.json names."""
    check_fields(f"{directory / CONFIG_FILE}: hyper", HyperConfig, meta["hyper"], allow_task_overrides=False)
    cfg = HyperConfig(**meta["hyper"])
    spec = TargetSpec.from_dict(meta["targets"])
    stage2 = Stage2(cfg, spec)
    stage1 = Stage1(cfg, spec) if "stage1" in meta["stages"] else None
    encoder = meta.get("condition_encoder")
    if encoder is not None:
        if not isinstance(encoder, dict) or encoder.get("kind") not in CONDITION_OPTION:
            raise ValueError(f"condition_encoder {encoder!r} names no condition kind ({', '.join(CONDITION_OPTION)})")
        if encoder["kind"] == "text":
            length = encoder.get("max_length", 32)
            if not isinstance(length, int) or isinstance(length, bool) or length < 1:
                raise ValueError(f"condition_encoder max_length {length!r} is not a positive integer")
            if encoder.get("encoder", "minilm") not in ("minilm", "umt5"):
                raise ValueError(f"text encoder {encoder['encoder']!r} is neither 'minilm' nor 'umt5'")
            if encoder.get("encoder") == "umt5" and not isinstance(encoder.get("path"), str):
                raise ValueError("the umt5 text encoder has no folder path")
        else:
            if not isinstance(encoder.get("path"), str):
                raise ValueError(f"the {encoder['kind']} condition encoder has no file path")
            encoder = {**encoder, "path": str(directory / encoder["path"])}
    base = meta.get("base")
    if base is not None and not isinstance(base, str):
        raise ValueError(f"base {base!r} is not a path")
    if base is not None and not Path(base).is_absolute():
        base = str(directory / base)
    return stage2, stage1, encoder, base


def _load_weights(module: nn.Module, path: Path) -> None:
    """module.load_state_dict from a safetensors file; a missing, damaged or mismatched file is a LofaError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        module.load_state_dict(load_file(str(path)))
    except (FileNotFoundError, SafetensorError, OSError, RuntimeError) as err:
        reason = " ".join(str(err).split())[:200]
        raise LofaError(f"{path}: cannot load the weights ({reason}); the checkpoint is incomplete or damaged, "
                        "retrain it with lofa train") from None


# The `lofa predict` option of each condition kind.
CONDITION_OPTION = {"text": "prompt", "image": "image", "pose": "pose"}


@torch.no_grad()
def predict_cases(model: LoFA, bank, case_ids, chunk: int = 8) -> dict[int, dict]:
    """LoFA's LoRA for each case of `case_ids` from its condition in `bank` (a ConditionBank, view 0), predicted
    `chunk` cases at a time -> {case_id: LoraWeights}."""
    out = {}
    for i in range(0, len(case_ids), chunk):
        ids = list(case_ids[i:i + chunk])
        tokens, mask = bank.get(ids)
        out.update(zip(ids, model.predict_batch(tokens, mask)))
    return out
