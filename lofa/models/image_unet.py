"""The image base generator: diffusers' UNet2DConditionModel (the SD / SDXL family), in pixel space.

Like SDXL the highest-resolution level has no attention and the lower levels have cross-attention transformer
blocks with linear proj_in/proj_out; attention modules are named attn1 (self) / attn2 (cross) with
to_q/to_k/to_v/to_out.0, the names LoRA files for SDXL use. SDXL's pooled-text "text_time" embedding is left out:
the mini text encoder has token states only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageUNetConfig:
    """The shape of the image base generator, a diffusers UNet2DConditionModel in pixel space (`make_image_unet`)."""

    sample_size: int = field(default=32, metadata={
        "help": "Side, in pixels, of the square images the UNet is built for (diffusers' sample_size)."})
    in_channels: int = field(default=3, metadata={"help": "Channels of the noisy input image (3: RGB pixels)."})
    out_channels: int = field(default=3, metadata={"help": "Channels of the output (3: RGB pixels)."})
    block_out_channels: tuple[int, ...] = field(default=(32, 64, 64), metadata={
        "help": "Channels of each resolution level, the highest resolution first."})
    down_block_types: tuple[str, ...] = field(
        default=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), metadata={
            "help": "diffusers block type of each down level, the highest resolution first; as in SDXL that one has "
                    "no attention and the lower ones have cross-attention transformer blocks."})
    up_block_types: tuple[str, ...] = field(
        default=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), metadata={
            "help": "diffusers block type of each up level, the lowest resolution first."})
    layers_per_block: int = field(default=1, metadata={
        "help": "ResNet layers per down level (each followed by a transformer block where the level has "
                "attention); up levels get one more."})
    # diffusers' historical naming: for UNet2DConditionModel `attention_head_dim` is the number of heads
    attention_head_dim: int = field(default=4, metadata={
        "help": "Number of attention heads of every transformer block (not their width)."})
    cross_attention_dim: int = field(default=384, metadata={
        "help": "Width of the text token states that cross-attention reads (MiniLM: 384)."})
    norm_num_groups: int = field(default=8, metadata={"help": "Groups of every GroupNorm."})
    use_linear_projection: bool = field(default=True, metadata={
        "help": "Linear (not 1x1 conv) proj_in / proj_out around the transformer blocks, as in SDXL."})
    zero_init_output: bool = field(default=True, metadata={
        "help": "Zero the output conv at initialisation, so the untrained net outputs 0 and early training is "
                "stable."})
    prediction: str = field(default="x0", metadata={
        "help": "What the net outputs: 'x0', the clean image (the Generator turns it into a velocity), or "
                "'velocity'."})

    PRESETS = {
        "smoke": {"block_out_channels": (16, 32, 32), "attention_head_dim": 2},
        "mini": {},
        # full: two layers a block (3.0 M parameters, 6 MiB in bfloat16), sized like VideoDiTConfig's full preset
        "full": {"layers_per_block": 2},
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
