"""The image base generator: diffusers' UNet2DConditionModel (the SD / SDXL family), in pixel space.

Like SDXL the highest-resolution level has no attention and the lower levels have cross-attention transformer
blocks with linear proj_in/proj_out; attention modules are named attn1 (self) / attn2 (cross) with
to_q/to_k/to_v/to_out.0, the names LoRA files for SDXL use. SDXL's pooled-text "text_time" embedding is left out:
the mini text encoder has token states only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageUNetConfig:
    sample_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    # diffusers' historical naming: for UNet2DConditionModel `attention_head_dim` is the number of heads
    attention_head_dim: int = 4
    cross_attention_dim: int = 384
    norm_num_groups: int = 8
    use_linear_projection: bool = True
    zero_init_output: bool = True  # start from a zero output so early training is stable
    prediction: str = "x0"         # what the net outputs: "x0" or "velocity"; see Generator

    PRESETS = {
        "smoke": {"block_out_channels": (16, 32, 32), "attention_head_dim": 2},
        "mini": {},
        "full": {"sample_size": 64, "block_out_channels": (64, 128, 256), "layers_per_block": 2,
                 "attention_head_dim": 8, "norm_num_groups": 32},
    }

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)


def make_image_unet(cfg: ImageUNetConfig):
    """A freshly initialised UNet2DConditionModel for `cfg` (sample layout [N, C, H, W])."""
    from diffusers import UNet2DConditionModel

    net = UNet2DConditionModel(
        sample_size=cfg.sample_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        block_out_channels=cfg.block_out_channels,
        down_block_types=cfg.down_block_types,
        up_block_types=cfg.up_block_types,
        mid_block_type="UNetMidBlock2DCrossAttn",
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        cross_attention_dim=cfg.cross_attention_dim,
        norm_num_groups=cfg.norm_num_groups,
        use_linear_projection=cfg.use_linear_projection,
    )
    if cfg.zero_init_output:
        torch.nn.init.zeros_(net.conv_out.weight)
        torch.nn.init.zeros_(net.conv_out.bias)
    return net
