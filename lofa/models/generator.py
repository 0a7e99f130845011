"""`Generator`: one flow-matching interface over both base model families (Wan DiT video, UNet image).

Everything downstream (base training, LoRA training, the hypernetwork's diffusion loss, evaluation) calls
`gen(x_t, t, context, context_mask) -> velocity` and never touches the diffusers model's own conventions.
LoRA goes on `.net` (peft / diffusers `add_adapter`), whose module names are the base model's names.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from lofa.config import preset
from lofa.diffusion import TimeDistribution
from lofa.errors import LofaError
from lofa.io import atomic_dir
from lofa.models.image_unet import ImageUNetConfig, make_image_unet
from lofa.models.video_dit import VideoDiTConfig, config_from_wan, make_video_dit, use_fast_rope

CONFIG_FILE = "lofa_generator.json"
TIMESTEP_SCALE = 1000.0  # both families were built for timesteps in [0, 1000] (Wan: sigma * 1000)
X0_T_MIN = 0.05          # x0-prediction: v = (x_t - x0) / max(t, X0_T_MIN), as JiT clips 1 / t

# The paper's LoRA targets: q, k, v, o of self- (attn1) and cross-attention (attn2) in every block.
_ATTN_TARGET = re.compile(r"(^|\.)attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_FFN_TARGET = {"video_dit": re.compile(r"(^|\.)ffn\.net\.(0\.proj|2)$"),
               "image_unet": re.compile(r"(^|\.)ff\.net\.(0\.proj|2)$")}


# The config class of each generator kind (the kinds Generator.build takes).
GENERATOR_CONFIGS = {"video_dit": VideoDiTConfig, "image_unet": ImageUNetConfig}


class Generator(nn.Module):
    """A velocity predictor v(x_t, t, context) around a diffusers model `.net`.

    kind: "video_dit" (x [N, C, T, H, W], WanTransformer3DModel) or "image_unet" (x [N, C, H, W],
    UNet2DConditionModel). config: the VideoDiTConfig / ImageUNetConfig it was built from.

    config.prediction says what `.net` outputs. Wan predicts the velocity itself. The from-scratch pixel-space
    models predict the clean sample x0, turned into v = (x_t - x0) / t here: with large patches and a narrow
    width a net cannot carry the high-dimensional noise through its bottleneck, but it can output clean data,
    which lies near a low-dimensional manifold (Li & He 2025, "Back to Basics: Let Denoising Generative Models
    Denoise"). Measured here at the mini budget: v-prediction left patch-grid noise over every sample, x0
    gave figures on clean backgrounds; an EDM-style skip (x0 = c_skip x_t + c_out F) was noisier than plain x0.
    Either way the loss and the sampler see a velocity.

    t_distribution: the `TimeDistribution` the generator was trained with; LoRA training and Stage II's
    diffusion term draw t from it, so they train on the base's own denoising task. It is saved with the generator.
    """

    def __init__(self, net: nn.Module, kind: str, config: VideoDiTConfig | ImageUNetConfig, *,
                 t_distribution: TimeDistribution):
        super().__init__()
        if kind not in ("video_dit", "image_unet"):
            raise LofaError(f"unknown generator kind {kind!r}; use 'video_dit' or 'image_unet'")
        if config.prediction not in ("x0", "velocity"):
            raise LofaError(f"unknown prediction {config.prediction!r}; use 'x0' or 'velocity'")
        if kind == "video_dit":
            use_fast_rope(net)
        self.net = net
        self.kind = kind
        self.config = config
        self.t_distribution = t_distribution

    @classmethod
    def from_config(cls, config: VideoDiTConfig | ImageUNetConfig,
                    t_distribution: TimeDistribution = TimeDistribution()) -> "Generator":
        """A fresh (randomly initialised) generator of `config`, to be trained with `t_distribution` (default:
        `BaseTrainConfig`'s, logit-normal(0.8, 0.8))."""
        if isinstance(config, VideoDiTConfig):
            return cls(make_video_dit(config), "video_dit", config, t_distribution=t_distribution)
        if isinstance(config, ImageUNetConfig):
            return cls(make_image_unet(config), "image_unet", config, t_distribution=t_distribution)
        raise LofaError(f"no generator for config type {type(config).__name__}; pass a VideoDiTConfig or ImageUNetConfig")

    @classmethod
    def build(cls, kind: str, scale: str = "mini", overrides: dict | None = None,
              t_distribution: TimeDistribution = TimeDistribution()) -> "Generator":
        """A fresh generator of `kind` ("video_dit" | "image_unet") at a scale preset, to be trained with
        `t_distribution` (default: `BaseTrainConfig`'s, logit-normal(0.8, 0.8); `train_base` passes its config's)."""
        config_cls = GENERATOR_CONFIGS.get(kind)
        if config_cls is None:
            raise LofaError(f"unknown generator kind {kind!r}; use 'video_dit' or 'image_unet'")
        return cls.from_config(preset(config_cls, scale, overrides), t_distribution)

    @property
    def context_dim(self) -> int:
        return self.config.text_dim if self.kind == "video_dit" else self.config.cross_attention_dim

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity v ≈ noise - x0 at flow time t.

        x_t: [N, C, T, H, W] (video_dit) or [N, C, H, W] (image_unet); t: [N] or scalar in [0, 1], 1 = pure noise;
        context: [N, L, D] token states; context_mask: [N, L] bool, True = real token. Returns a tensor like x_t.
        """
        n = x_t.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
        t = t.expand(n) if t.ndim == 0 else t
        if self.kind == "video_dit":
            # WanTransformer3DModel's cross-attention takes no text mask; like the Wan pipeline (umT5 states cut
            # at the prompt length and zero-padded to 512), padded positions are zeroed so only real tokens carry
            # content. Zero tokens still receive attention (through the text projection's bias), as in Wan.
            if context_mask is not None:
                context = context * context_mask.unsqueeze(-1).to(context.dtype)
            out = self.net(self._with_positions(x_t), t * TIMESTEP_SCALE, context, return_dict=False)[0]
        else:
            out = self.net(x_t, t * TIMESTEP_SCALE, context, encoder_attention_mask=context_mask,
                           return_dict=False)[0]
        if self.config.prediction == "velocity":
            return out
        return (x_t - out) / t.clamp_min(X0_T_MIN).view(n, *([1] * (x_t.ndim - 1))).to(out.dtype)

    def _with_positions(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C, T, H, W] -> [N, C + P, T, H, W] with P = config.position_channels coordinate planes in [-1, 1].

        Wan's only position signal is RoPE, which is relative: a token learns where it sits in the frame only
        through the image content, and at t ≈ 1 there is none. At Wan's scale training overcomes that; a
        from-scratch miniature did not (measured: the mini DiT, 1,000 steps on 8 fixed clips, sampled them back
        with MSE 0.13 without the planes, 0.05 with them), so a config may hand the patch embedding absolute
        (t, y, x) planes, the way Wan's image-to-video model takes extra input channels. The mini actions base
        uses them (BaseTrainConfig.task_overrides).
        """
        p = self.config.position_channels
        if not p:
            return x
        n, _, t, h, w = x.shape
        axes = [torch.linspace(-1, 1, k, device=x.device, dtype=x.dtype) for k in (t, h, w)]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))[3 - p:]  # the last p of (t, y, x)
        return torch.cat([x, grid.expand(n, -1, -1, -1, -1)], 1)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each transformer block in the backward pass instead of keeping its activations, correctly
        also under `torch.func.functional_call` (how a predicted LoRA enters the base: `merged_weights`).

        diffusers' own checkpointing recomputes a block with whatever weights the module holds when the backward
        pass runs; by then functional_call has put the base weights back, so the gradient reaching a predicted
        LoRA would be computed through the wrong weights. Here each checkpointed block captures the tensors it
        computed with (merged LoRA weights included) and recomputes with exactly those.
        """
        self.net.enable_gradient_checkpointing(_checkpoint_block)

    def lora_target_modules(self, include_ffn: bool = False) -> list[str]:
        """Full module names (in `.net`) of the paper's LoRA targets, in network order.

        Wan: blocks.{i}.attn1/attn2.to_q/to_k/to_v/to_out.0; UNet: the same four in attn1/attn2 of every
        transformer block. include_ffn adds the feed-forward linears (ffn.net.0.proj / ffn.net.2, UNet: ff.net...).
        """
        ffn = _FFN_TARGET[self.kind]
        return [name for name, _ in self.net.named_modules()
                if _ATTN_TARGET.search(name) or (include_ffn and ffn.search(name))]

    def save(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """A diffusers model folder (config.json + safetensors) plus lofa_generator.json (kind, config,
        t_distribution), written atomically. The weights are stored as they are, or in `dtype`: a half dtype stores
        them at half the size and rounds this generator's own weights to it (they keep their dtype), so that it
        equals what `load` gives back."""
        payload = {"kind": self.kind, "config": dataclasses.asdict(self.config),
                   "t_distribution": self.t_distribution.to_json()}
        with atomic_dir(directory) as tmp:
            # diffusers saves a model as its tensors are: cast, save, cast back (exact: the values are the
            # rounded ones now)
            current = next(self.net.parameters()).dtype
            self.net.to(dtype or current)
            try:
                self.net.save_pretrained(tmp, safe_serialization=True)
            finally:
                self.net.to(current)
            (tmp / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> "Generator":
        """Inverse of `save`. A plain diffusers Wan transformer folder (no lofa json) is accepted too.

        A lofa_generator.json without "t_distribution" (written before generators carried it) takes the one its
        training recorded, when the folder is a `train_base` output's generator/ (the sibling summary.json's
        config); otherwise it is a one-line LofaError saying what to add: guessing would silently train LoRAs on
        another t distribution than the base's.
        """
        directory = Path(directory)
        meta_path = directory / CONFIG_FILE
        if not meta_path.exists():
            return cls.from_pretrained_wan(directory).to(device)
        meta = json.loads(meta_path.read_text())
        summary = directory.parent / "summary.json"
        if "t_distribution" not in meta and summary.exists():
            config = json.loads(summary.read_text()).get("config", {})
            if {"t_sampling", "t_mean", "t_std"} <= set(config):
                meta["t_distribution"] = TimeDistribution.from_record(config).to_json()
        if "t_distribution" not in meta:
            raise LofaError(f"{meta_path} has no \"t_distribution\" (the t distribution the generator was trained "
                            f"with); add \"t_distribution\": {{\"mode\": ..., \"mean\": ..., \"std\": ...}} with the "
                            f"t_sampling, t_mean and t_std of its training (its summary.json's config for a "
                            f"train_base folder; BaseTrainConfig's defaults are logit_normal, 0.8, 0.8)")
        t_distribution = TimeDistribution(**meta["t_distribution"])
        if meta["kind"] == "video_dit":
            from diffusers import WanTransformer3DModel as net_cls
            config = VideoDiTConfig(**meta["config"])
        else:
            from diffusers import UNet2DConditionModel as net_cls
            config = ImageUNetConfig(**meta["config"])
        net = net_cls.from_pretrained(directory, local_files_only=True)
        return cls(net, meta["kind"], config, t_distribution=t_distribution).to(device)

    @classmethod
    def from_pretrained_wan(cls, folder: str | os.PathLike, torch_dtype: torch.dtype | None = None) -> "Generator":
        """Wrap a local Wan2.1 transformer: a diffusers pipeline folder (with transformer/) or that folder itself,
        or the original layout (WanModel config.json + diffusion_pytorch_model*.safetensors); `lofa.models.wan`.

        Nothing is downloaded. The context must then be the model's own text states (umT5: text_dim 4096). Its
        t distribution is Wan's (`lofa.models.wan.T_DISTRIBUTION`).
        """
        from lofa.models.wan import T_DISTRIBUTION, load_transformer

        net = load_transformer(folder, torch_dtype)
        return cls(net, "video_dit", config_from_wan(dict(net.config)), t_distribution=T_DISTRIBUTION)


def _block_tensors(block: nn.Module) -> dict[str, torch.Tensor]:
    """{name: the tensor the block computes with now} for every parameter and buffer name of the block: under
    functional_call these are the substituted tensors, not the module's own."""
    names = [n for n, _ in block.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in block.named_buffers(remove_duplicate=False)]
    tensors = {}
    for name in names:
        owner, _, leaf = name.rpartition(".")
        tensors[name] = getattr(block.get_submodule(owner) if owner else block, leaf)
    return tensors


def _call_block(block: nn.Module, tensors: dict[str, torch.Tensor], *args):
    return torch.func.functional_call(block, tensors, args)


def _checkpoint_block(block: nn.Module, *args):
    """diffusers' gradient-checkpointing hook (`enable_gradient_checkpointing(fn)`): the block recomputed in the
    backward pass with the tensors of its forward pass (`Generator.enable_gradient_checkpointing`)."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(_call_block, block, _block_tensors(block), *args, use_reentrant=False)
