"""Base generators (Wan-family video DiT, UNet image model), the text encoder and condition encoders."""
from lofa.models.generator import Generator
from lofa.models.image_unet import ImageUNetConfig, make_image_unet
from lofa.models.text import TextEncoder
from lofa.models.video_dit import VideoDiTConfig, make_video_dit

__all__ = ["Generator", "ImageUNetConfig", "TextEncoder", "VideoDiTConfig", "make_image_unet", "make_video_dit"]
