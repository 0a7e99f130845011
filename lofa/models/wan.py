"""Local Wan2.1 models, nothing downloaded: the DiT in either layout, and the umT5 text encoder.

Two layouts of the transformer are read:
- diffusers (`Wan-AI/Wan2.1-T2V-1.3B-Diffusers`): a pipeline folder with `transformer/` (config.json with
  `_class_name: WanTransformer3DModel`, one safetensors file or shards with an index), or that folder itself;
- original (`Wan-AI/Wan2.1-T2V-1.3B`): config.json with `_class_name: WanModel` (dim, num_heads, ...) and
  `diffusion_pytorch_model.safetensors` (or shards with `diffusion_pytorch_model.safetensors.index.json`) in Wan's
  own key names (`blocks.0.self_attn.q.weight`), converted to diffusers names by diffusers' own converter.

The text encoder is transformers' `UMT5EncoderModel` with its tokenizer, from a diffusers pipeline folder
(`text_encoder/` + `tokenizer/`) or one folder holding both. Prompts are encoded as the Wan pipeline does: 512
tokens, each prompt's states cut at its length and zero-padded.

    net = load_transformer("Wan2.1-T2V-1.3B/")                    # either layout -> WanTransformer3DModel
    text = UMT5TextEncoder("Wan2.1-T2V-1.3B-Diffusers/", "cuda")
    states, mask = text(["a person kicks with the left leg"])     # [1, 512, 4096], [1, 512]
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lofa.diffusion import TimeDistribution
from lofa.errors import LofaError

WAN_MAX_LENGTH = 512  # Wan2.1's text context: umT5 states of 512 tokens
# The t distribution LoRAs and Stage II's diffusion term train a Wan2.1 base with: SD3's logit-normal(0, 1). A
# Wan checkpoint records none, so every Wan generator (`Generator.from_pretrained_wan`) carries this one.
T_DISTRIBUTION = TimeDistribution(mode="logit_normal", mean=0.0, std=1.0)

# Fields an original WanModel config.json may leave out, at WanModel's own defaults.
_ORIGINAL_DEFAULTS = {"patch_size": [1, 2, 2], "text_dim": 4096, "freq_dim": 256, "eps": 1e-6, "text_len": 512}


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LofaError(f"{path}: cannot read the {what} ({type(err).__name__}); restore the file") from None
    if not isinstance(data, dict):
        raise LofaError(f"{path}: the {what} is not a JSON object; restore the file")
    return data


def transformer_folder(folder: str | os.PathLike) -> tuple[Path, dict]:
    """(folder holding the transformer's config.json, that config) for a pipeline folder or the transformer's own."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LofaError(f"{folder}: no such folder; point at a local Wan2.1 folder (diffusers or original layout)")
    if (folder / "transformer" / "config.json").exists():
        folder = folder / "transformer"
    config_path = folder / "config.json"
    if not config_path.exists():
        raise LofaError(f"{folder} has no config.json; point at a Wan2.1 folder (diffusers: the pipeline or its "
                        "transformer/ folder; original: the folder with config.json and diffusion_pytorch_model*)")
    return folder, _read_json(config_path, "model config")


def diffusers_config_from_original(config: dict) -> dict:
    """WanTransformer3DModel's arguments for an original Wan2.1 `config.json` (WanModel: dim, num_heads, ...)."""
    cfg = {**_ORIGINAL_DEFAULTS, **config}
    if cfg.get("model_type", "t2v") != "t2v":
        raise LofaError(f"original Wan model_type {cfg['model_type']!r}: only text-to-video (t2v) models are read")
    missing = [k for k in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim") if k not in cfg]
    if missing:
        raise LofaError(f"the original Wan config lacks {', '.join(missing)}; restore config.json")
    if cfg["dim"] % cfg["num_heads"]:
        raise LofaError(f"the original Wan config has dim {cfg['dim']} not divisible by num_heads {cfg['num_heads']}")
    return {
        "patch_size": tuple(cfg["patch_size"]),
        "num_attention_heads": cfg["num_heads"],
        "attention_head_dim": cfg["dim"] // cfg["num_heads"],
        "in_channels": cfg["in_dim"],
        "out_channels": cfg["out_dim"],
        "text_dim": cfg["text_dim"],
        "freq_dim": cfg["freq_dim"],
        "ffn_dim": cfg["ffn_dim"],
        "num_layers": cfg["num_layers"],
        "cross_attn_norm": True,  # every released Wan2.1 model normalises before cross-attention (norm3)
        "qk_norm": "rms_norm_across_heads",
        "eps": cfg["eps"],
    }


def _original_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The original checkpoint's tensors (one file or the shards of its index), keys as stored."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise LofaError(f"{index}: weight_map is not {{tensor name: shard file}}; restore the index")
        files = [folder / f for f in sorted(set(weight_map.values()))]
    else:
        files = [folder / "diffusion_pytorch_model.safetensors"]
    state = {}
    for path in files:
        if not path.exists():
            raise LofaError(f"{path}: missing; the original Wan folder is incomplete, copy the file back")
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError) as err:
            raise LofaError(f"{path}: not a readable safetensors file ({' '.join(str(err).split())[:120]}); "
                            "copy it again") from None
    return state


def load_transformer(folder: str | os.PathLike, torch_dtype: torch.dtype | None = None):
    """A WanTransformer3DModel from a local Wan2.1 folder in the diffusers or the original layout."""
    from diffusers import WanTransformer3DModel

    folder, config = transformer_folder(folder)
    kind = config.get("_class_name")
    if kind == "WanTransformer3DModel":
        try:
            return WanTransformer3DModel.from_pretrained(folder, local_files_only=True, torch_dtype=torch_dtype)
        except (OSError, ValueError, RuntimeError) as err:
            raise LofaError(f"{folder}: cannot load the Wan transformer ({' '.join(str(err).split())[:160]}); "
                            "check that its weight files are complete") from None
    if kind != "WanModel":
        raise LofaError(f"{folder / 'config.json'} describes {kind!r}, not a Wan2.1 transformer "
                        "(WanTransformer3DModel or the original WanModel)")
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    net = WanTransformer3DModel(**diffusers_config_from_original(config))
    state = convert_wan_transformer_to_diffusers(_original_state_dict(folder))
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the config's model has not"
        raise LofaError(f"{folder}: the checkpoint {what} ({len(missing)} missing, {len(extra)} unexpected "
                        "tensors); config.json and the weights belong to different models")
    bad = next((k for k, v in state.items() if v.shape != expected[k].shape), None)
    if bad is not None:
        raise LofaError(f"{folder}: tensor {bad} has shape {tuple(state[bad].shape)}, the config's model "
                        f"{tuple(expected[bad].shape)}; config.json and the weights belong to different models")
    net.load_state_dict(state)
    return net.to(torch_dtype) if torch_dtype is not None else net


def _text_folders(folder: Path) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) of a umT5 encoder: a pipeline folder's text_encoder/ and tokenizer/, or one
    folder holding both."""
    if (folder / "text_encoder" / "config.json").exists():
        return folder / "text_encoder", folder / "tokenizer"
    return folder, folder


class UMT5TextEncoder:
    """prompts -> (states [N, L, D] float32, mask [N, L] bool) from a local umT5 encoder (Wan: L 512, D 4096).

    As the Wan pipeline: the tokenizer pads to L with truncation, the encoder sees the attention mask, and each
    prompt's states past its own length are zeroed. The model is frozen in eval mode; `dtype` is the weights'
    compute type (default float32 on the CPU, bfloat16 on CUDA, as Wan runs umT5-XXL).
    """

    def __init__(self, folder: str | os.PathLike, device: str | torch.device = "cpu",
                 max_length: int = WAN_MAX_LENGTH, dtype: torch.dtype | None = None):
        from transformers import AutoTokenizer, UMT5EncoderModel

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise LofaError(f"{self.folder}: no such folder; point at a local umT5 encoder (a Wan2.1 diffusers "
                            "pipeline folder, or a folder with the encoder's config.json and tokenizer)")
        model_dir, tokenizer_dir = _text_folders(self.folder)
        config = model_dir / "config.json"
        if not config.exists():
            raise LofaError(f"{model_dir} has no config.json; point at a Wan2.1 diffusers pipeline folder "
                            "(text_encoder/ + tokenizer/) or a umT5 encoder folder")
        model_type = _read_json(config, "text encoder config").get("model_type")
        if model_type not in ("umt5", "t5"):
            raise LofaError(f"{config} describes a {model_type!r} model, not a umT5 encoder")
        self.device = torch.device(device)
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
            self.model = UMT5EncoderModel.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
        except (OSError, ValueError) as err:
            raise LofaError(f"{self.folder}: cannot load the umT5 encoder or its tokenizer "
                            f"({' '.join(str(err).split())[:160]})") from None
        self.model = self.model.to(self.device).eval().requires_grad_(False)
        self.max_length = max_length
        self.dim = self.model.config.d_model

    @torch.no_grad()
    def encode(self, prompts: list[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                               max_length=max_length or self.max_length, add_special_tokens=True,
                               return_attention_mask=True, return_tensors="pt").to(self.device)
        mask = batch["attention_mask"].bool()
        states = self.model(batch["input_ids"], batch["attention_mask"]).last_hidden_state.float()
        return states * mask.unsqueeze(-1), mask

    def __call__(self, prompts: list[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(prompts, max_length)
