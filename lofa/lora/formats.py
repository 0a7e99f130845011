"""LoRA and base-model weight files: diffusers/peft, original Wan / DiffSynth and kohya naming, one in-memory form.

In memory a LoRA is `LoraWeights = {module_name: LoraFactor(A [r, in], B [out, r], alpha)}` with module_name the
base model's module name in diffusers naming ("blocks.0.attn1.to_q", "blocks.3.ffn.net.0.proj",
"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k") and ΔW = (alpha / r) · B @ A, [out, in].

Namings read (detected from the keys, see `detect_format`):
- diffusers / peft: `transformer.blocks.0.attn1.to_q.lora_A.weight` (also `unet.`, `base_model.model.` or no
  prefix, `.lora_A.default.weight`, and the old `.lora.down.weight` / `.processor.to_q_lora.down.weight`);
- original Wan / DiffSynth: `blocks.0.self_attn.q.lora_A[.default].weight` or `.lora_down` / `.lora_up`,
  optional `diffusion_model.` prefix, mapped to diffusers names with `wan_to_diffusers`;
- kohya / musubi-tuner: `lora_unet_blocks_0_self_attn_q.lora_down.weight` / `.lora_up.weight` / `.alpha`; the
  flattened names are matched against the base model's module names when given, else through the Wan mapping.

Alpha, per module, from the first of: an `.alpha` tensor beside the factors (kohya, Wan); diffusers' peft config
in the safetensors metadata under "lora_adapter_metadata" (`lora_alpha`, `alpha_pattern`, `use_rslora`); a peft
`adapter_config.json` beside the file. Without any of these alpha = rank (scale 1), which is how diffusers, peft and
DiffSynth apply a LoRA file that stores no alpha.

Keys that cannot change a linear weight are skipped: bias deltas (`.diff_b`, `.lora_B.bias`), norm-layer deltas
(`norm*.diff`) and text-encoder parts (`text_encoder.`, `lora_te_`). Anything else that is not a LoRA factor or
alpha is refused with a LofaError naming the key.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lofa.errors import LofaError
from lofa.io import save_safetensors
from lofa.response import delta_w

log = logging.getLogger(__name__)

FORMATS = ("diffusers", "wan", "kohya")
DEFAULT_PREFIX = {"diffusers": "transformer", "wan": "diffusion_model", "kohya": "lora_unet"}
# The component a diffusers pipeline loads a LoRA file's keys into (`load_lora_weights`, `load_lora_adapter(...,
# prefix=...)`): "transformer" for Wan-family DiTs, "unet" for the SD / SDXL family (lofa.models.image_unet).
UNET_PREFIX = "unet"
# Top-level module names of diffusers' UNet2DConditionModel that carry linear layers (attention and projections);
# a Wan DiT has "blocks.", "condition_embedder.", "proj_out" instead.
_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.")
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY (0.42)
LOFA_METADATA_KEY = "lofa"


@dataclass(eq=False)
class LoraFactor:
    """One LoRA module: ΔW = (alpha / r) · B @ A.

    A: [r, in], B: [out, r], alpha: float (scale = alpha / r).
    """

    A: torch.Tensor
    B: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of ΔW."""
        return self.B.shape[0], self.A.shape[1]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta_rows(self, start: int = 0, stop: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows start:stop of ΔW, [stop - start, in], computed in `dtype` (never the factors' half precision)."""
        return delta_w(self.A, self.B[start:stop], self.scale, dtype)

    @property
    def delta_w(self) -> torch.Tensor:
        """ΔW = (alpha / r) · B @ A in float32, [out, in]."""
        return self.delta_rows()


LoraWeights = dict[str, LoraFactor]


# --- Wan naming ------------------------------------------------------------------------------------------------
# Original Wan (and DiffSynth) module name <-> diffusers WanTransformer3DModel module name; {i} = block index.
# Same table as diffusers' scripts/convert_wan_to_diffusers.py, linear layers only.
WAN_NAMES = (
    ("blocks.{i}.self_attn.q", "blocks.{i}.attn1.to_q"),
    ("blocks.{i}.self_attn.k", "blocks.{i}.attn1.to_k"),
    ("blocks.{i}.self_attn.v", "blocks.{i}.attn1.to_v"),
    ("blocks.{i}.self_attn.o", "blocks.{i}.attn1.to_out.0"),
    ("blocks.{i}.cross_attn.q", "blocks.{i}.attn2.to_q"),
    ("blocks.{i}.cross_attn.k", "blocks.{i}.attn2.to_k"),
    ("blocks.{i}.cross_attn.v", "blocks.{i}.attn2.to_v"),
    ("blocks.{i}.cross_attn.o", "blocks.{i}.attn2.to_out.0"),
    ("blocks.{i}.cross_attn.k_img", "blocks.{i}.attn2.add_k_proj"),
    ("blocks.{i}.cross_attn.v_img", "blocks.{i}.attn2.add_v_proj"),
    ("blocks.{i}.ffn.0", "blocks.{i}.ffn.net.0.proj"),
    ("blocks.{i}.ffn.2", "blocks.{i}.ffn.net.2"),
    ("head.head", "proj_out"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
)
# A module name in original Wan naming that the table does not cover (e.g. a norm) is refused, not passed on.
_WAN_MARKER = re.compile(r"(^|\.)(self_attn|cross_attn)\.|(^|\.)ffn\.\d+$|^(head|time_projection|time_embedding|"
                         r"text_embedding|img_emb)\.")


def _template_regex(template: str, sep: str = ".") -> re.Pattern:
    return re.compile("^" + re.escape(template.replace(".", sep)).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def _renamer(pairs, sep: str = "."):
    rules = [(_template_regex(src, sep), dst) for src, dst in pairs]

    def rename(name: str) -> str | None:
        for regex, dst in rules:
            m = regex.match(name)
            if m:
                return dst.format(**m.groupdict())
        return None

    return rename


_wan_to_diffusers = _renamer(WAN_NAMES)
_diffusers_to_wan = _renamer([(d, w) for w, d in WAN_NAMES])
# kohya flattens dots to underscores; musubi-tuner flattens the original Wan names, others the diffusers names.
_flat_to_diffusers = _renamer([(w, d) for w, d in WAN_NAMES] + [(d, d) for _, d in WAN_NAMES], sep="_")


def wan_to_diffusers(name: str) -> str | None:
    """'blocks.0.self_attn.q' -> 'blocks.0.attn1.to_q'; None for names outside the Wan table."""
    return _wan_to_diffusers(name)


def diffusers_to_wan(name: str) -> str | None:
    """'blocks.0.attn1.to_q' -> 'blocks.0.self_attn.q'; None for names outside the Wan table."""
    return _diffusers_to_wan(name)


def natural_key(name: str) -> tuple:
    """Sort key that orders 'blocks.2' before 'blocks.10'."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t)


# --- safetensors access ------------------------------------------------------------------------------------------
def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _open(path: Path):
    """safe_open that turns a missing, unreadable or non-safetensors file into a LofaError."""
    if not path.exists():
        raise LofaError(f"{path}: no such file")
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        raise LofaError(f"{path}: only .safetensors files are read; convert the checkpoint to safetensors first")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise LofaError(f"{path}: not a readable safetensors file ({_one_line(err)})") from None


def _get_tensor(handle, path: Path, key: str) -> torch.Tensor:
    try:
        return handle.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise LofaError(f"{path}: cannot read tensor {key!r}, the file is damaged ({_one_line(err)})") from None


# --- reading LoRA files ------------------------------------------------------------------------------------------
_STRIP_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.")
_SKIP_PREFIXES = ("text_encoder.", "text_encoder_2.", "text_encoder_3.", "lora_te_", "lora_te1_", "lora_te2_",
                  "lora_te3_")
_KOHYA_PREFIX = "lora_unet_"
# (suffix, role) in order; role A = down / lora_A, B = up / lora_B.
_ROLES = (
    (re.compile(r"\.lora_A(\.\w+)?\.weight$"), "A"),
    (re.compile(r"\.lora_B(\.\w+)?\.weight$"), "B"),
    (re.compile(r"\.lora_down\.weight$"), "A"),
    (re.compile(r"\.lora_up\.weight$"), "B"),
    (re.compile(r"\.lora(_linear_layer)?\.down\.weight$"), "A"),
    (re.compile(r"\.lora(_linear_layer)?\.up\.weight$"), "B"),
    (re.compile(r"(?<=_lora)\.down\.weight$"), "A"),
    (re.compile(r"(?<=_lora)\.up\.weight$"), "B"),
    (re.compile(r"\.alpha$"), "alpha"),
)
# Deltas that never touch a linear weight matrix: safe to skip for ΔW.
_SKIPPABLE = re.compile(r"(\.diff_b|\.lora_B(\.\w+)?\.bias|(^|[._])norm[\w.]*\.diff)$")
_OLD_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")


def _split_key(key: str) -> tuple[str, str] | None:
    """'x.lora_A.weight' -> ('x', 'A'); None when the key is no LoRA factor or alpha."""
    for regex, role in _ROLES:
        m = regex.search(key)
        if m:
            module = key[: m.start()]
            module = _OLD_PROCESSOR.sub(lambda p: "." + (p[1] + ".0" if p[1] == "to_out" else p[1]), module)
            return module, role
    return None


def _strip_prefix(key: str) -> str:
    for prefix in _STRIP_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def detect_format(keys: Iterable[str] | str | os.PathLike) -> str:
    """'diffusers', 'wan' or 'kohya' from a LoRA file's tensor names (or the file's path).

    kohya: any key starts with 'lora_unet_'; wan: a module is in original Wan naming ('self_attn', 'cross_attn',
    'ffn.0', 'head.head', ...); diffusers otherwise.
    """
    if isinstance(keys, (str, os.PathLike)):
        path = _lora_file(Path(keys).expanduser())
        with _open(path) as f:
            keys = list(f.keys())
    keys = list(keys)
    if any(k.startswith(_KOHYA_PREFIX) for k in keys):
        return "kohya"
    for key in keys:
        split = _split_key(_strip_prefix(key))
        if split and _WAN_MARKER.search(split[0]):
            return "wan"
    return "diffusers"


def _lora_file(path: Path) -> Path:
    """A LoRA path may be a folder (peft save_pretrained, diffusers save_lora_weights) holding one file."""
    if not path.is_dir():
        return path
    for name in ("pytorch_lora_weights.safetensors", "adapter_model.safetensors"):
        if (path / name).exists():
            return path / name
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise LofaError(f"{path}: expected one .safetensors LoRA file in the folder, found {len(files)}; "
                        "pass the file itself")
    return files[0]


def _peft_config(header: dict, component: str | None, path: Path) -> dict | None:
    """The peft LoraConfig dict of this file's component: safetensors metadata first, adapter_config.json next."""
    raw = header.get(ADAPTER_METADATA_KEY)
    if raw:
        try:
            config = json.loads(raw)
        except json.JSONDecodeError:
            raise LofaError(f"{path}: metadata {ADAPTER_METADATA_KEY!r} is not valid JSON; the file is damaged") \
                from None
        if component and f"{component}.r" in config:
            return {k[len(component) + 1:]: v for k, v in config.items() if k.startswith(f"{component}.")}
        if "r" in config:
            return config
        return None
    sidecar = path.parent / "adapter_config.json"
    if sidecar.exists():
        try:
            return json.loads(sidecar.read_text())
        except json.JSONDecodeError:
            raise LofaError(f"{sidecar}: not valid JSON") from None
    return None


def _alpha(stored: torch.Tensor | None, config: dict | None, name: str, rank: int, path: Path) -> float:
    """Alpha of module `name`: its own `.alpha` tensor (one number), else the peft config's, else the rank (scale
    1). A non-finite, non-positive or non-numeric alpha is a LofaError."""
    if stored is not None:
        if stored.numel() != 1 or stored.is_complex():
            raise LofaError(f"{path}: module {name!r} has an alpha of shape {list(stored.shape)}; alpha is one "
                            "number, the file is damaged")
        alpha = float(stored.double().reshape(()))
    elif config is not None:
        try:
            alpha = _config_alpha(config, name, rank)
        except (TypeError, ValueError, AttributeError, re.error):
            raise LofaError(f"{path}: the adapter config's lora_alpha / alpha_pattern for {name!r} is not a number; "
                            "the file's metadata is damaged") from None
    else:
        alpha = float(rank)
    if not (math.isfinite(alpha) and alpha > 0):
        raise LofaError(f"{path}: module {name!r} has alpha {alpha:g}; alpha must be a positive number (the scale "
                        "is alpha / rank), the file is damaged")
    return alpha


def _config_alpha(config: dict, name: str, rank: int) -> float:
    """Alpha of module `name` under a peft LoraConfig dict, in the ΔW = (alpha / r) B A convention."""
    alpha = float(config.get("lora_alpha", rank))
    # peft's get_pattern_key: a pattern matches a module name ending in it at a dot boundary.
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            alpha = float(value)
            break
    if config.get("use_rslora"):
        alpha *= math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r)
    return alpha


def _kohya_resolver(module_names: Iterable[str] | None):
    table = {}
    for name in module_names or ():
        table.setdefault(name.replace(".", "_"), name)
        wan = diffusers_to_wan(name)
        if wan:
            table.setdefault(wan.replace(".", "_"), name)

    def resolve(flat: str, key: str) -> str:
        if module_names is not None:
            if flat not in table:
                raise LofaError(f"kohya key {key!r} matches no module of the base model; use the base model this "
                                "LoRA was trained for")
            return table[flat]
        name = _flat_to_diffusers(flat)
        if name is None:
            raise LofaError(f"kohya key {key!r} cannot be mapped to a module name without the base model; pass the "
                            "base model's module names (e.g. the --base of lofa response-map)")
        return name

    return resolve


def load_lora(path: str | os.PathLike, module_names: Iterable[str] | None = None) -> tuple[LoraWeights, dict]:
    """Read a LoRA file in any supported naming -> (weights, metadata).

    weights: LoraWeights, {diffusers module name: LoraFactor(A [r, in], B [out, r], alpha)}, in natural order;
    metadata: the dict lofa stored under "lofa" ({} when absent). `path` may be a folder holding one LoRA file.

    `module_names` (the base model's module names) resolves kohya's flattened names exactly; without it they go
    through the Wan mapping.
    Raises LofaError for a missing / corrupt / non-LoRA file, an unknown key, a factor without its partner,
    mismatched ranks, non-2-D (convolutional) factors, DoRA, or NaN / inf values.
    """
    path = _lora_file(Path(path).expanduser())
    with _open(path) as f:
        header = f.metadata() or {}
        keys = list(f.keys())
        tensors = {k: _get_tensor(f, path, k) for k in keys}
    fmt = detect_format(keys)
    resolve_flat = _kohya_resolver(module_names)

    parts: dict[str, dict[str, torch.Tensor]] = {}
    component = None
    skipped, unrecognised = [], []
    for key in keys:
        if key.startswith(_SKIP_PREFIXES) or _SKIPPABLE.search(key):
            skipped.append(key)
            continue
        if "dora_scale" in key or "lora_magnitude_vector" in key:
            raise LofaError(f"{path}: {key!r} is a DoRA weight; DoRA adapters are not supported, only plain LoRA")
        if fmt == "kohya":
            split = _split_key(key[len(_KOHYA_PREFIX):]) if key.startswith(_KOHYA_PREFIX) else None
        else:
            stripped = _strip_prefix(key)
            if stripped != key and key.split(".")[0] in ("transformer", "unet"):
                component = key.split(".")[0]
            split = _split_key(stripped)
        if split is None:
            if key.endswith(".diff"):
                raise LofaError(f"{path}: {key!r} is a full weight difference, not a low-rank factor; only LoRA "
                                "files are supported")
            unrecognised.append(key)
            continue
        module, role = split
        if fmt == "kohya":
            name = resolve_flat(module, key)
        elif fmt == "wan" and _WAN_MARKER.search(module):
            name = wan_to_diffusers(module)
            if name is None:
                raise LofaError(f"{path}: key {key!r} names a Wan module that has no linear weight in diffusers "
                                "naming")
        else:
            name = module
        if role in parts.setdefault(name, {}):
            raise LofaError(f"{path}: module {name!r} appears twice (key {key!r}); the file mixes namings")
        parts[name][role] = tensors[key]
    if skipped:
        log.info("%s: skipped %d keys that do not change linear weights (e.g. %s)", path, len(skipped), skipped[0])
    if not parts:
        raise LofaError(f"{path}: no LoRA factors found (keys like {keys[:1]}); pass a LoRA file in diffusers/peft, "
                        "Wan / DiffSynth or kohya naming")
    if unrecognised:
        raise LofaError(f"{path}: unrecognised key {unrecognised[0]!r}; expected LoRA factors in diffusers/peft, "
                        "Wan / DiffSynth or kohya naming")

    config = _peft_config(header, component, path)
    weights: LoraWeights = {}
    for name in sorted(parts, key=natural_key):
        part = parts[name]
        if "A" not in part or "B" not in part:
            missing = "down / lora_A" if "A" not in part else "up / lora_B"
            raise LofaError(f"{path}: module {name!r} has no {missing} factor; the file is incomplete")
        A, B = part["A"], part["B"]
        if A.dim() in (3, 4) and B.dim() in (3, 4):
            raise LofaError(f"{path}: module {name!r} has {A.dim()}-D factors; convolutional LoRA (LoCon) is not "
                            "supported, only linear layers")
        if A.dim() != 2 or B.dim() != 2:
            raise LofaError(f"{path}: module {name!r} has factors of shape A {list(A.shape)} and B "
                            f"{list(B.shape)}; a LoRA factor is a matrix, the file is damaged")
        if not (A.is_floating_point() and B.is_floating_point()):
            dtype = str((B if A.is_floating_point() else A).dtype).replace("torch.", "")
            raise LofaError(f"{path}: module {name!r} has a factor of dtype {dtype}; LoRA factors are floating "
                            "point, the file is damaged")
        if A.shape[0] != B.shape[1]:
            raise LofaError(f"{path}: module {name!r} has A {list(A.shape)} and B {list(B.shape)} of different "
                            "rank; the file is damaged")
        rank = A.shape[0]
        if rank == 0:
            raise LofaError(f"{path}: module {name!r} has rank 0 (A {list(A.shape)}); the file is damaged or empty")
        alpha = _alpha(part.get("alpha"), config, name, rank, path)
        factor = LoraFactor(A=A, B=B, alpha=alpha)
        _check_finite(factor, name, path)
        weights[name] = factor

    lofa_meta = header.get(LOFA_METADATA_KEY)
    try:
        metadata = json.loads(lofa_meta) if lofa_meta else {}
    except json.JSONDecodeError:
        raise LofaError(f"{path}: metadata {LOFA_METADATA_KEY!r} is not valid JSON; the file is damaged") from None
    return weights, metadata


def _check_finite(factor: LoraFactor, name: str, where) -> None:
    if not (torch.isfinite(factor.A).all() and torch.isfinite(factor.B).all() and math.isfinite(factor.alpha)):
        raise LofaError(f"{where}: LoRA module {name!r} contains NaN or inf; the file is damaged or training "
                        "diverged")


# --- writing LoRA files ------------------------------------------------------------------------------------------
def is_unet(module_names: Iterable[str]) -> bool:
    """True when the module names are those of a diffusers UNet2DConditionModel (SD / SDXL family)."""
    return any(name.startswith(_UNET_ROOTS) for name in module_names)


def default_prefix(weights: Iterable[str], fmt: str = "diffusers") -> str:
    """The key prefix `save_lora` writes when given none: for diffusers naming the pipeline component the model
    family loads into ("unet" for a UNet, "transformer" otherwise); "diffusion_model" (wan) and "lora_unet" (kohya:
    kohya / sd-scripts and musubi-tuner call every denoiser "unet") otherwise."""
    if fmt == "diffusers" and is_unet(weights):
        return UNET_PREFIX
    return DEFAULT_PREFIX[fmt]


def _fold_scale(factor: LoraFactor) -> torch.Tensor:
    """B · (alpha / r) in B's dtype, so that the file's ΔW = B' A at scale 1 (alpha = r)."""
    if factor.alpha == factor.rank:
        return factor.B
    return (factor.B.float() * factor.scale).to(factor.B.dtype)


def _adapter_config(weights: LoraWeights) -> dict:
    """peft LoraConfig kwargs for factors stored at scale 1: every module's rank, and alpha = rank."""
    ranks = {n: f.rank for n, f in weights.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    # "^" + escaped name: peft matches patterns as regexes at a dot boundary; this pins the one module.
    pattern = {"^" + re.escape(n): v for n, v in ranks.items() if v != r}
    return {"r": r, "lora_alpha": r, "target_modules": sorted(weights, key=natural_key), "rank_pattern": pattern,
            "alpha_pattern": dict(pattern)}


def save_lora(path: str | os.PathLike, weights: LoraWeights, metadata: dict | None = None, fmt: str = "diffusers",
              prefix: str | None = None) -> None:
    """Write `weights` ({module name: LoraFactor(A [r, in], B [out, r], alpha)}) as a LoRA safetensors file,
    atomically (no partial file on failure).

    fmt "diffusers": `{prefix}.{module}.lora_A.weight` / `.lora_B.weight` (prefix default: "unet" for a UNet's
    module names, "transformer" otherwise — what `UNet2DConditionModel.load_lora_adapter(sd, prefix="unet")`, the
    SD / SDXL pipelines' `load_lora_weights` and `WanTransformer3DModel.load_lora_adapter(sd, prefix="transformer")`
    look for; "" for none) with the peft config (ranks, target modules) under "lora_adapter_metadata". The scale
    alpha / r is folded into B and the file says alpha = r: diffusers 0.42's
    `WanTransformer3DModel.load_lora_adapter(path)` drops that metadata when given a file path (it reads it only
    with `use_safetensors=True`), and ComfyUI / DiffSynth never read it, so a file at scale 1 is the one that every
    loader applies as exactly ΔW. Reading it back gives the same ΔW with alpha = r (identical factors when alpha = r
    already).
    fmt "wan": `{prefix}.blocks.0.self_attn.q.lora_A.weight` / `.lora_B.weight` / `.alpha` (prefix default
    "diffusion_model", the naming diffusers' Wan loader converts); modules outside the Wan table keep their
    diffusers names; refused for a UNet (Wan naming is the Wan family's). fmt "kohya":
    `{prefix}_blocks_0_self_attn_q.lora_down.weight` / `.lora_up.weight` / `.alpha` (prefix default "lora_unet",
    musubi-tuner's naming for Wan); a UNet's modules are flattened from their diffusers names
    (`lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`, sd-scripts' SD naming, which the SD
    and SDXL pipelines' `lora_state_dict` convert). `metadata` (JSON-able) is stored under "lofa".

    Files written before lofa chose the prefix by model family carry "transformer." for a UNet too; `load_lora`
    strips either prefix, so they read back exactly as before.
    """
    if fmt not in FORMATS:
        raise LofaError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not weights:
        raise LofaError("refusing to write an empty LoRA")
    if fmt == "wan" and is_unet(weights):
        raise LofaError("original Wan naming is for Wan-family models, this LoRA is for a UNet; write it with "
                        "fmt 'diffusers' or 'kohya'")
    prefix = default_prefix(weights, fmt) if prefix is None else prefix
    header = {"format": "pt"}
    if metadata:
        header[LOFA_METADATA_KEY] = json.dumps(metadata, sort_keys=True, default=str)
    tensors = {}
    for name, f in weights.items():
        if f.A.dim() != 2 or f.B.dim() != 2 or f.A.shape[0] != f.B.shape[1]:
            raise LofaError(f"LoRA module {name!r}: A {list(f.A.shape)} and B {list(f.B.shape)} are not [r, in] "
                            "and [out, r]")
        _check_finite(f, name, "save_lora")
        alpha = torch.tensor(float(f.alpha), dtype=torch.float32)
        if fmt == "diffusers":
            stem = f"{prefix}.{name}" if prefix else name
            tensors[f"{stem}.lora_A.weight"], tensors[f"{stem}.lora_B.weight"] = f.A, _fold_scale(f)
        elif fmt == "wan":
            module = diffusers_to_wan(name) or name
            stem = f"{prefix}.{module}" if prefix else module
            tensors[f"{stem}.lora_A.weight"], tensors[f"{stem}.lora_B.weight"] = f.A, f.B
            tensors[f"{stem}.alpha"] = alpha
        else:
            stem = f"{prefix}_" + (diffusers_to_wan(name) or name).replace(".", "_")
            tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = f.A, f.B
            tensors[f"{stem}.alpha"] = alpha
    # safetensors refuses tensors that share memory (tied or sliced factors): give repeats their own copy
    storages = set()
    for key, t in tensors.items():
        if t.untyped_storage().data_ptr() in storages:
            tensors[key] = t.clone()
        storages.add(t.untyped_storage().data_ptr())
    if fmt == "diffusers":
        config = _adapter_config(weights)
        if prefix:
            config = {f"{prefix}.{k}": v for k, v in config.items()}
        header[ADAPTER_METADATA_KEY] = json.dumps(config, sort_keys=True)
    save_safetensors(tensors, path, metadata=header)


# --- base model weights ------------------------------------------------------------------------------------------
_BASE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def _base_files(path: Path) -> list[Path]:
    """The safetensors files of a base model: one file, or a diffusers model folder (sharded or not).

    A pipeline folder (model_index.json) is followed into its transformer/ or unet/ subfolder.
    """
    if not path.exists():
        raise LofaError(f"{path}: no such file or folder")
    if path.is_file():
        return [path]
    for folder in (path, path / "transformer", path / "unet"):
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if indexes:
            index = indexes[0]
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):  # ValueError: not JSON, or not text
                weight_map = None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise LofaError(f"{index}: not a safetensors index (no 'weight_map' of tensor names to files); the "
                                "folder is damaged")
            files = [folder / f for f in sorted(set(weight_map.values()))]
            missing = [f for f in files if not f.exists()]
            if missing:
                raise LofaError(f"{missing[0]}: shard listed in {index.name} is missing; download the whole model")
            return files
        files = sorted(folder.glob("*.safetensors"))
        if (folder / "diffusion_pytorch_model.safetensors").exists():
            return [folder / "diffusion_pytorch_model.safetensors"]
        if len(files) == 1:
            return files
        if len(files) > 1:
            raise LofaError(f"{folder}: {len(files)} .safetensors files and no index; pass the model file itself")
    raise LofaError(f"{path}: no safetensors weights found; pass a diffusers model folder (config.json + "
                    "diffusion_pytorch_model.safetensors[.index.json]) or one .safetensors file")


class BaseWeightsFile(Mapping):
    """Linear weights of a base model, read lazily: {module_name: W [out, in]} in diffusers naming.

    Only the header is read up front (names, shapes); each W is read from the file when accessed, so a 1.3B model
    is never loaded whole. Original Wan names ('blocks.0.self_attn.q.weight', optional 'model.diffusion_model.' /
    'diffusion_model.' prefix) are mapped to diffusers names.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        self._where: dict[str, tuple[Path, str]] = {}
        self.shapes: dict[str, tuple[int, int]] = {}
        for file in _base_files(self.path):
            with _open(file) as f:
                for key in f.keys():
                    stripped = key
                    for prefix in _BASE_PREFIXES:
                        stripped = stripped.removeprefix(prefix)
                    if not stripped.endswith(".weight"):
                        continue
                    try:
                        shape = tuple(f.get_slice(key).get_shape())
                    except (SafetensorError, OSError, ValueError) as err:
                        raise LofaError(f"{file}: cannot read {key!r} ({_one_line(err)}); the file is damaged") \
                            from None
                    if len(shape) != 2:
                        continue
                    module = stripped[: -len(".weight")]
                    name = wan_to_diffusers(module) or module
                    self._where[name] = (file, key)
                    self.shapes[name] = shape
        if not self.shapes:
            raise LofaError(f"{self.path}: no linear (2-D) weights found; is this a model's weights file?")

    def __getitem__(self, name: str) -> torch.Tensor:
        file, key = self._where[name]
        with _open(file) as f:
            return _get_tensor(f, file, key)

    def __contains__(self, name) -> bool:  # Mapping's default would read the tensor
        return name in self._where

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def load_base_weights(path: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """{module_name: W [out, in]} for `names` (default: every linear weight), reading only those tensors."""
    base = BaseWeightsFile(path)
    names = list(base) if names is None else list(names)
    unknown = [n for n in names if n not in base]
    if unknown:
        raise LofaError(f"{path}: the base model has no linear module {unknown[0]!r}")
    weights = {n: base[n] for n in names}
    for name, W in weights.items():
        if not W.is_floating_point():
            raise LofaError(f"{path}: base weight {name!r} has dtype {str(W.dtype).replace('torch.', '')}, not a "
                            "floating-point type; the file is not a model's weights (or is quantised: dequantise it)")
        if not torch.isfinite(W).all():
            raise LofaError(f"{path}: base weight {name!r} contains NaN or inf; the base model file is damaged")
    return weights


def check_compatible(lora: LoraWeights, base_shapes: Mapping[str, Sequence[int] | torch.Tensor]) -> None:
    """Raise LofaError naming the first LoRA module (natural order) missing from the base or of another shape.

    base_shapes: {module_name: (out, in)} or {module_name: W}.
    """
    for name in sorted(lora, key=natural_key):
        factor = lora[name]
        if name not in base_shapes:
            example = next(iter(sorted(base_shapes, key=natural_key)), None)
            raise LofaError(f"LoRA module {name!r} is not in the base model ({len(base_shapes)} linear modules, "
                            f"e.g. {example!r}); use the base model this LoRA was trained for")
        shape = base_shapes[name]
        shape = tuple(shape.shape if isinstance(shape, torch.Tensor) else shape)
        if tuple(factor.shape) != shape:
            raise LofaError(f"LoRA module {name!r} changes a {list(factor.shape)} weight but the base model's is "
                            f"{list(shape)}; use the base model this LoRA was trained for")
