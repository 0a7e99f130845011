"""Base generators (Wan-family video DiT, UNet image model), the text encoder and condition encoders.

Names are imported on first use: `lofa.models.text` alone must not pay for importing diffusers (seconds).
"""
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers, and for lofa.reproduce's cache key, which follows imports statically
    from lofa.models.generator import Generator
    from lofa.models.image_unet import ImageUNetConfig, make_image_unet
    from lofa.models.text import TextEncoder
    from lofa.models.video_dit import VideoDiTConfig, make_video_dit

_WHERE = {"Generator": "generator", "ImageUNetConfig": "image_unet", "make_image_unet": "image_unet",
          "TextEncoder": "text", "VideoDiTConfig": "video_dit", "make_video_dit": "video_dit"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"lofa.models.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'lofa.models' has no attribute {name!r}")
