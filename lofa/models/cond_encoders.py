"""Condition encoders: user conditions -> tokens [N, K, Dc] for the hypernetwork's cross-attention.

The paper encodes pose sequences with a multi-layer 3D-conv encoder and reference images with CLIP-ViT-L + MLP.
No CLIP weights ship offline, so the image encoder is a small CNN; both are pre-trained contrastively (InfoNCE)
inside the worlds, where two different renders / conditions of the same case are positives.

A user's condition reaches an encoder through `read_condition` (files, PIL images, arrays): images are converted
from any PIL mode and bit depth to RGB in [-1, 1] and fitted to the resolution the encoder was trained at
(`image_to_condition`); pose sequences are checked for the layout, dtype, range and size it was trained on
(`check_pose`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lofa import seeds
from lofa.config import preset
from lofa.errors import LofaError
from lofa.metrics.features import info_nce
from lofa.optimise import one_cycle

PairsFn = Callable[[Sequence[int], int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class CondEncoderConfig:
    """The shape of a condition encoder: conv stages, pooled to a grid of K tokens [K, Dc] for the hypernetwork."""

    kind: str = field(default="image", metadata={
        "help": "'pose': 3D convs over skeleton sequences [N, 3, T, H, W] (actions); 'image': 2D convs over "
                "reference images [N, 3, H, W]."})
    channels: tuple[int, ...] = field(default=(32, 64, 128), metadata={
        "help": "Channels of each conv stage: two 3x3 convs, the first halving height and width."})
    dim: int = field(default=128, metadata={"help": "Width Dc of the tokens handed to the hypernetwork."})
    grid: tuple[int, ...] = field(default=(4, 4), metadata={
        "help": "Grid the features are average-pooled to, one token per cell: (H, W) for images, (T, H, W) for "
                "poses; K = prod(grid)."})
    proj_dim: int = field(default=64, metadata={
        "help": "Width of the contrastive head the encoder is pre-trained with (the hypernetwork does not use it)."})
    input_shape: tuple[int, ...] | None = field(default=None, metadata={
        "help": "One condition's shape at training time, (3, H, W) image or (3, T, H, W) pose; users' conditions "
                "are fitted to it or checked against it (`read_condition`). None: not recorded (encoders saved "
                "before it was), nothing is fitted."})

    PRESETS = {
        "smoke": {"channels": (8, 16, 32), "dim": 32, "proj_dim": 16},
        "mini": {"channels": (16, 32, 64)},
        "full": {"channels": (64, 128, 256), "dim": 256, "proj_dim": 128},
    }

    def __post_init__(self):
        self.channels = tuple(self.channels)
        self.grid = tuple(self.grid)
        if self.input_shape is not None:
            self.input_shape = tuple(int(n) for n in self.input_shape)
        want = 3 if self.kind == "pose" else 2
        if self.kind not in ("pose", "image") or len(self.grid) != want:
            raise LofaError(f"condition encoder kind {self.kind!r} with grid {self.grid}: use kind 'pose' with a "
                            "(T, H, W) grid or kind 'image' with an (H, W) grid")

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)


class _CondEncoder(nn.Module):
    """Conv stack (spatial stride-2 stages) -> adaptive pool to `grid` -> linear to Dc + learned position embedding."""

    conv: type[nn.Module]
    pool: type[nn.Module]
    stride: int | tuple[int, ...]

    def __init__(self, config: CondEncoderConfig):
        super().__init__()
        self.config = config
        layers, c_in = [], 3
        for c in config.channels:
            layers += [self.conv(c_in, c, 3, stride=self.stride, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU(),
                       self.conv(c, c, 3, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU()]
            c_in = c
        self.features = nn.Sequential(*layers, self.pool(config.grid))
        self.to_tokens = nn.Linear(c_in, config.dim)
        self.pos = nn.Parameter(torch.randn(config.num_tokens, config.dim) * 0.02)
        self.head = nn.Sequential(nn.LayerNorm(config.dim), nn.Linear(config.dim, config.dim), nn.SiLU(),
                                  nn.Linear(config.dim, config.proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, 3, (T,) H, W] in [-1, 1] -> tokens [N, K, Dc]."""
        return self.to_tokens(self.features(x).flatten(2).transpose(1, 2)) + self.pos

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [N, K, Dc], mask [N, K] bool, all True: every token is real)."""
        tokens = self(x)
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm pooled embedding [N, proj_dim] for the contrastive objective."""
        return F.normalize(self.head(self(x).mean(1)), dim=-1)

    def save(self, path) -> None:
        from lofa.io import save_safetensors

        meta = {"lofa_cond_encoder": json.dumps(dataclasses.asdict(self.config))}
        save_safetensors(self.state_dict(), path, metadata=meta)


class PoseEncoder(_CondEncoder):
    """Multi-layer 3D conv over skeleton frames [N, 3, T, H, W] -> tokens [N, T'·H'·W', Dc]."""

    conv = nn.Conv3d
    pool = nn.AdaptiveAvgPool3d
    stride = (1, 2, 2)  # keep every frame until the pool: the motion is the condition


class ImageEncoder(_CondEncoder):
    """Small CNN over a reference image [N, 3, H, W] -> tokens [N, H'·W', Dc] (stands in for CLIP-ViT-L + MLP)."""

    conv = nn.Conv2d
    pool = nn.AdaptiveAvgPool2d
    stride = 2


def make_condition_encoder(config: CondEncoderConfig) -> _CondEncoder:
    return PoseEncoder(config) if config.kind == "pose" else ImageEncoder(config)


def load_condition_encoder(path, device="cpu") -> _CondEncoder:
    """Inverse of `encoder.save(path)` (weights + config in one safetensors file)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise LofaError(f"{path}: condition encoder file missing; the checkpoint is incomplete, re-train it")
    try:
        with safe_open(str(path), "pt") as f:
            meta = (f.metadata() or {}).get("lofa_cond_encoder")
        if meta is None:
            raise LofaError(f"{path} is not a lofa condition encoder (no lofa_cond_encoder metadata); re-train it")
        encoder = make_condition_encoder(CondEncoderConfig(**json.loads(meta)))
        encoder.load_state_dict(load_file(str(path)))
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError, KeyError, AttributeError) as err:
        # ValueError covers bad JSON; TypeError / KeyError a damaged config; RuntimeError mismatched weights
        raise LofaError(f"{path}: not a readable condition encoder ({' '.join(str(err).split())[:200]}); "
                        "re-train it") from None
    return encoder.to(device).eval()


def encoder_for_world(world, scale: str = "mini", overrides: dict | None = None) -> _CondEncoder:
    """PoseEncoder for the actions world (pose-sequence conditions), ImageEncoder for reference-image worlds."""
    kind = "pose" if world.task == "actions" else "image"
    # the shape of one of the world's conditions, so that users' conditions can be fitted to it: a pose video has
    # the renders' (3, T, H, W), a reference image one frame's (3, H, W)
    shape = tuple(world.shape) if kind == "pose" else (3, *world.shape[-2:])
    fields = {"kind": kind, "input_shape": shape, **({"grid": (4, 2, 2)} if kind == "pose" else {}),
              **(overrides or {})}
    return make_condition_encoder(preset(CondEncoderConfig, scale, fields))


# --- users' conditions ---------------------------------------------------------------------------------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
TENSOR_SUFFIXES = (".pt", ".npy", ".safetensors")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _intensities(image) -> np.ndarray:
    """A PIL image of any mode -> float32 [H, W, 3] intensities in [0, 1].

    8-bit modes (1, L, P, RGB, CMYK, YCbCr, ...) go through PIL's RGB conversion and are divided by 255; modes
    with transparency (LA, RGBA, PA, P with a transparent colour) are composited onto black, since transparent
    means nothing drawn there and the worlds' conditions are drawn on dark grounds. Single-channel high-depth modes
    are grey levels scaled by their true range: I;16* and I (16-bit PNGs) by 65535, F taken as [0, 1].
    """
    import numpy as np

    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        grey = np.asarray(image, dtype=np.float64)
        top = 1.0 if mode == "F" else 65535.0
        if not np.isfinite(grey).all() or grey.min() < 0 or grey.max() > top:
            raise LofaError(f"a mode-{mode} image with values in [{grey.min():g}, {grey.max():g}]; grey levels are "
                            f"read in [0, {top:g}] — save it as an 8- or 16-bit PNG")
        return np.repeat((grey / top).astype(np.float32)[:, :, None], 3, axis=2)
    has_alpha = "A" in mode or "a" in mode or "transparency" in image.info
    if has_alpha:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        return rgba[:, :, :3] * rgba[:, :, 3:]
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def image_to_condition(image, size: tuple[int, int] | None) -> torch.Tensor:
    """A PIL image -> [3, H, W] float32 in [-1, 1] (black -1, white 1), the layout of the worlds' conditions.

    Rule: the EXIF orientation is applied, the mode converted as `_intensities` says, then the largest centred
    crop of the target aspect ratio is resized (bicubic, PIL.ImageOps.fit) to size = (H, W) — for a square
    encoder: resize the shorter side and crop the centre. Small images are upsampled the same way. Bicubic
    overshoot is clipped to [0, 1] before the shift to [-1, 1]. size None keeps the image's own size.
    """
    import numpy as np
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    rgb = _intensities(image)
    if size is not None and rgb.shape[:2] != tuple(size):
        h, w = size
        # one float ("F") image per channel: PIL resizes float images exactly, but not three-channel ones
        channels = [np.asarray(ImageOps.fit(Image.fromarray(np.ascontiguousarray(rgb[:, :, c])), (w, h),
                                            method=Image.Resampling.BICUBIC)) for c in range(3)]
        rgb = np.clip(np.stack(channels, axis=2), 0.0, 1.0)
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1) * 2.0 - 1.0


POSE_LAYOUT = ("[3, T, H, W] float in [-1, 1]: T RGB frames of a skeleton drawn on black (-1), one colour per "
               "limb, as lofa.worlds.ActionsWorld.condition draws them")


def check_pose(x: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A pose sequence [3, T, H, W] (or [1, 3, T, H, W]) -> [3, T, H, W] float32, checked against `shape`.

    Refused with a LofaError that states the expected layout (POSE_LAYOUT): another number of dimensions or
    channels, a (T, H, W) other than the encoder's `shape` = (3, T, H, W) when given, an integer or bool dtype
    (e.g. uint8 0-255 frames: convert them with x / 127.5 - 1), NaN / inf, or values outside [-1, 1].
    """
    expected = "" if shape is None else f" of shape {list(shape)}"
    if x.ndim == 5 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 4 or x.shape[0] != 3:
        hint = "; channels go first" if x.ndim == 4 and x.shape[-1] == 3 else ""
        raise LofaError(f"pose of shape {list(x.shape)}; expected {POSE_LAYOUT}{expected}{hint}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise LofaError(f"pose of shape {list(x.shape)}; this checkpoint's pose encoder takes {list(shape)} "
                        f"([3, T, H, W]); resample the sequence to {shape[1]} frames of {shape[2]} x {shape[3]}")
    if not x.is_floating_point():
        span = "" if x.is_complex() or x.numel() == 0 else f" with values in [{x.min().item()}, {x.max().item()}]"
        raise LofaError(f"pose of dtype {str(x.dtype).replace('torch.', '')}{span}; expected {POSE_LAYOUT} (uint8 "
                        "frames: x / 127.5 - 1)")
    x = x.float()
    if not torch.isfinite(x).all():
        raise LofaError("pose contains NaN or inf; expected finite values in [-1, 1]")
    low, high = x.min().item(), x.max().item()
    if low < -1.0 - 1e-3 or high > 1.0 + 1e-3:
        raise LofaError(f"pose values lie in [{low:g}, {high:g}]; expected {POSE_LAYOUT} (0-255 frames: "
                        "x / 127.5 - 1; 0-1 frames: 2 x - 1)")
    return x.clamp(-1.0, 1.0)


def _read_tensor(path: Path) -> torch.Tensor:
    """The one tensor of a .pt / .npy / .safetensors file."""
    try:
        if path.suffix == ".pt":
            with warnings.catch_warnings():  # torch warns about odd pickles it then refuses: the error says it
                warnings.simplefilter("ignore")
                x = torch.load(path, map_location="cpu", weights_only=True)
        elif path.suffix == ".npy":
            import numpy as np

            x = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            if len(tensors) != 1:
                raise LofaError(f"{path} holds {len(tensors)} tensors; save the condition as one tensor")
            x = next(iter(tensors.values()))
    except LofaError:
        raise
    except Exception as err:  # pickle, numpy and safetensors each raise their own types for a damaged file
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        raise LofaError(f"{path}: cannot read a tensor ({reason}); save the condition with numpy.save, torch.save "
                        "or safetensors") from None
    if not isinstance(x, torch.Tensor):
        raise LofaError(f"{path} holds a {type(x).__name__}, not a tensor; save the condition as one tensor")
    return x


def _open_image(path: Path):
    from PIL import Image

    try:
        with warnings.catch_warnings():  # PIL warns about damage it then fails on (corrupt EXIF): the error says it
            warnings.simplefilter("ignore")
            image = Image.open(path)
            image.load()
    except Exception as err:  # PIL's decoders raise many types on damaged data (OSError, SyntaxError, EOFError...)
        raise LofaError(f"{path}: not a readable image ({' '.join(str(err).split())})") from None
    return image


def read_condition(source, config: CondEncoderConfig) -> torch.Tensor:
    """A user's condition for an encoder of `config` -> one condition tensor, [3, H, W] image or [3, T, H, W] pose.

    source: a file path (image: PNG / JPEG / ... read with PIL; pose: a .pt / .npy / .safetensors tensor), a PIL
    image (image encoders) or a tensor / numpy array (pose encoders). Images follow `image_to_condition`'s rule to
    the encoder's (H, W); poses are checked by `check_pose`. An encoder that records no input shape (saved
    before lofa recorded it) gets images at their own size, with a warning.
    """
    import numpy as np

    shape = config.input_shape
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise LofaError(f"{path}: no such file")
        suffix = path.suffix.lower()
        wanted = IMAGE_SUFFIXES if config.kind == "image" else TENSOR_SUFFIXES
        if suffix not in wanted:
            what = "an image" if config.kind == "image" else f"a pose tensor {POSE_LAYOUT}"
            raise LofaError(f"{path}: this checkpoint is conditioned on {config.kind}; give {what} "
                            f"({' / '.join(wanted)})")
        source = _open_image(path) if config.kind == "image" else _read_tensor(path)
    if config.kind == "pose":
        if isinstance(source, np.ndarray):
            source = torch.from_numpy(source)
        if not isinstance(source, torch.Tensor):
            raise LofaError(f"a pose condition is a tensor {POSE_LAYOUT}, not a {type(source).__name__}")
        return check_pose(source, shape)
    from PIL import Image

    if not isinstance(source, Image.Image):
        raise LofaError(f"an image condition is an image file or a PIL image, not a {type(source).__name__}")
    if shape is None:
        warnings.warn("the condition encoder records no input resolution (saved before lofa recorded it); the "
                      f"image is encoded at its own size {source.height} x {source.width} — retrain the encoder "
                      "to fit images to it", UserWarning, stacklevel=2)
    return image_to_condition(source, None if shape is None else shape[1:])


def world_pairs(world) -> PairsFn:
    """pairs_fn for `train_condition_encoder`: (condition, render) of the same cases at independent seeds.

    A condition pairs with a render of its case: pose sequences [N, 3, T, H, W] with the rendered video (another
    seed's pose condition is nearly identical — a random encoder already retrieves it — while the render
    changes colours, size and place, so the encoder must keep the motion); reference images with one random
    frame (styles) or image (identities) of a render, so the encoder keeps the style / identity and drops
    content, pose and context.
    """
    def pairs(case_ids: Sequence[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = world.condition(case_ids, seed=seeds.stream(seed, "pairs.condition"))
        b = world.render(case_ids, seed=seeds.stream(seed, "pairs.render"))
        if a.ndim == 4 and b.ndim == 5:
            g = torch.Generator().manual_seed(seeds.stream(seed, "pairs.frames"))
            frames = torch.randint(b.shape[2], (b.shape[0],), generator=g)
            b = b[torch.arange(b.shape[0]), :, frames]
        return a, b

    return pairs


@torch.no_grad()
def retrieval_accuracy(encoder: _CondEncoder, pairs_fn: PairsFn, case_ids: Sequence[int], seed: int,
                       device="cpu") -> float:
    """Top-1 accuracy of finding each case's view_b among all cases' view_b from its view_a (chance 1/len)."""
    was_training = encoder.training
    encoder.eval()
    a, b = pairs_fn(list(case_ids), seed)
    za, zb = encoder.embed(a.to(device)), encoder.embed(b.to(device))
    encoder.train(was_training)
    return (za @ zb.T).argmax(1).eq(torch.arange(len(case_ids), device=device)).float().mean().item()


def train_condition_encoder(encoder: _CondEncoder, pairs_fn: PairsFn, case_ids: Sequence[int], *, steps: int = 500,
                            batch_size: int = 32, lr: float = 2e-3, temperature: float = 0.1, seed: int = 0,
                            device: str | torch.device = "cpu", eval_ids: Sequence[int] | None = None,
                            progress: bool = True) -> dict:
    """Contrastive pre-training: each step draws `batch_size` distinct cases and calls pairs_fn(ids, seed).

    Distinct ids per batch keep false negatives out of InfoNCE. AdamW under a one-cycle schedule, gradients not
    clipped (`lofa.optimise.one_cycle`); a NaN or inf loss or gradient norm stops training with a LofaError naming
    the step. Returns {"loss": [...], "retrieval": {...}} with top-1 retrieval accuracy on `eval_ids` (e.g.
    held-out cases) before and after training.
    """
    case_ids = list(case_ids)
    if len(case_ids) < 2:
        raise LofaError("contrastive training needs at least two cases; pass more case ids")
    batch_size = min(batch_size, len(case_ids))
    encoder.to(device).train()
    history = {"loss": [], "retrieval": {}}
    check_seed = seeds.stream(seed, "encoder.check")
    if eval_ids is not None:
        history["retrieval"]["before"] = retrieval_accuracy(encoder, pairs_fn, eval_ids, check_seed, device)
    g = torch.Generator().manual_seed(seeds.stream(seed, "encoder.batch"))

    def step_loss(step: int) -> torch.Tensor:
        ids = [case_ids[i] for i in torch.randperm(len(case_ids), generator=g)[:batch_size].tolist()]
        a, b = pairs_fn(ids, seeds.stream(seed, "encoder.pairs", step=step))
        return info_nce(encoder.embed(a.to(device)) @ encoder.embed(b.to(device)).T / temperature)

    history["loss"] = one_cycle(encoder, step_loss, steps, lr=lr, weight_decay=1e-4, clip=None,
                                what="condition encoder", fix="lower the learning rate (train_condition_encoder's lr)",
                                desc="condition encoder", progress=progress)
    if eval_ids is not None:
        history["retrieval"]["after"] = retrieval_accuracy(encoder, pairs_fn, eval_ids, check_seed, device)
    return history
