"""Grids of images and videos for the notebooks: renders, conditions and generated samples side by side.

    image_grid(images [N, 3, H, W], ncols, row_labels, col_labels, title)          -> matplotlib Figure
    video_grid(videos [N, 3, T, H, W], ncols, frames, row_labels, col_labels, title) -> matplotlib Figure
                                                  (each video drawn as a filmstrip of its frames)

Pixels are in the project's [-1, 1] range; values outside are clamped, so raw generator samples can be shown as
they are. Tiles are laid out row-major, `ncols` per row, on one mosaic drawn by a single `imshow`: row labels sit
left of the rows, column labels above the columns. Pass `ax` to draw into a panel of a larger figure.
Small tiles are upscaled (nearest neighbour) before they are laid out so that separators stay thin beside them.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from lofa.errors import LofaError

TILE_PX = 96          # tiles are upscaled to at least this height, so the separators below stay thin
PAD = 8               # pixels between tiles of the mosaic (after upscaling)
FRAME_GAP = 2         # pixels between the frames of one filmstrip (after upscaling)


def to_unit(x: Tensor) -> Tensor:
    """[-1, 1] pixels -> [0, 1] on the CPU, clamped."""
    return ((x.detach().float().cpu() + 1) / 2).clamp(0, 1)


def upscale(x: Tensor, factor: int) -> Tensor:
    """Nearest-neighbour upscaling of the last two (H, W) dimensions by an integer factor."""
    return x.repeat_interleave(factor, -2).repeat_interleave(factor, -1) if factor > 1 else x


def frame_indices(n_frames: int, frames: int | Sequence[int] | None = None) -> list[int]:
    """Which frames a filmstrip shows: None = all, an int k = k frames evenly spaced (first included), or explicit
    indices (negative ones count from the end)."""
    if frames is None:
        return list(range(n_frames))
    if isinstance(frames, int):
        if not 1 <= frames <= n_frames:
            raise LofaError(f"cannot show {frames} frames of a {n_frames}-frame video; ask for 1..{n_frames}")
        return [i * n_frames // frames for i in range(frames)]
    idx = [int(i) for i in frames]
    if not idx or any(not -n_frames <= i < n_frames for i in idx):
        raise LofaError(f"frame indices {idx} out of range for a {n_frames}-frame video")
    return [i % n_frames for i in idx]


def filmstrip(videos: Tensor, frames: int | Sequence[int] | None = None, gap: int = FRAME_GAP,
              gap_value: float = 1.0) -> Tensor:
    """The chosen frames of each video side by side: [N, 3, T, H, W] -> [N, 3, H, k W + (k - 1) gap], k frames,
    gaps filled with gap_value (pixel range [-1, 1]; 1 = white)."""
    videos = _checked(videos, 5, "filmstrip")
    idx = frame_indices(videos.shape[2], frames)
    n, c, _, h, w = videos.shape
    out = torch.full((n, c, h, len(idx) * (w + gap) - gap), gap_value, dtype=videos.dtype)
    for k, t in enumerate(idx):
        out[..., k * (w + gap): k * (w + gap) + w] = videos[:, :, t]
    return out


def mosaic(tiles: Tensor, pad: int = PAD, pad_value: float = 1.0) -> np.ndarray:
    """Tiles [R, C, 3, H, W] in [-1, 1] -> one RGB array [R H + (R + 1) pad, C W + (C + 1) pad, 3] in [0, 1];
    tile (r, c) starts at row pad + r (H + pad), column pad + c (W + pad); the rest is pad_value (in [0, 1])."""
    if tiles.ndim != 5 or tiles.shape[2] != 3:
        raise LofaError(f"mosaic needs tiles [rows, cols, 3, H, W]; got shape {tuple(tiles.shape)}")
    r, c, _, h, w = tiles.shape
    out = np.full((r * h + (r + 1) * pad, c * w + (c + 1) * pad, 3), pad_value, dtype=np.float32)
    unit = to_unit(tiles).permute(0, 1, 3, 4, 2).numpy()
    for i in range(r):
        for j in range(c):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y: y + h, x: x + w] = unit[i, j]
    return out


def image_grid(images: Tensor, ncols: int | None = None, row_labels: Sequence[str] | None = None,
               col_labels: Sequence[str] | None = None, title: str | None = None, ax=None,
               tile_inches: float = 0.7, label_size: float = 7.0):
    """Images [N, 3, H, W] in [-1, 1], row-major with `ncols` per row (default: all in one row); a short last row is
    filled with blank tiles. row_labels: one per row; col_labels: one per column. tile_inches: the height of one
    tile when a new figure is made (ignored with `ax`). Returns the matplotlib Figure."""
    images = _checked(images, 4, "image_grid")
    n, _, h, w = images.shape
    ncols = ncols or n
    nrows = math.ceil(n / ncols)
    for labels, count, what in ((row_labels, nrows, "row_labels"), (col_labels, ncols, "col_labels")):
        if labels is not None and len(labels) != count:
            raise LofaError(f"image_grid: {len(labels)} {what} for {count} {what[:3]}s; give one label each")
    zoom = max(1, math.ceil(TILE_PX / h))
    blank = torch.ones(nrows * ncols - n, *images.shape[1:], dtype=images.dtype)
    tiles = upscale(torch.cat([images.detach().float().cpu(), blank]), zoom).reshape(nrows, ncols, 3, h * zoom,
                                                                                    w * zoom)
    pixels = mosaic(tiles)
    return _show(pixels, (nrows, ncols), (h * zoom, w * zoom), row_labels, col_labels, title, ax,
                 tile_inches, label_size)


def video_grid(videos: Tensor, ncols: int | None = None, frames: int | Sequence[int] | None = None,
               row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
               title: str | None = None, ax=None, tile_inches: float = 0.7, label_size: float = 7.0):
    """Videos [N, 3, T, H, W] in [-1, 1] as filmstrips (the frames chosen by `frames`, see `frame_indices`), laid
    out like `image_grid` with `ncols` filmstrips per row. Returns the matplotlib Figure."""
    videos = _checked(videos, 5, "video_grid")
    idx = frame_indices(videos.shape[2], frames)
    h = videos.shape[-2]
    strips = filmstrip(upscale(videos[:, :, idx].detach().float().cpu(), max(1, math.ceil(TILE_PX / h))))
    return image_grid(strips, ncols, row_labels, col_labels, title, ax, tile_inches, label_size)


def _show(pixels: np.ndarray, grid: tuple[int, int], tile: tuple[int, int], row_labels, col_labels, title, ax,
          tile_inches: float, label_size: float):
    """Draw the mosaic with tick labels at the row / column centres."""
    import matplotlib.pyplot as plt

    (nrows, ncols), (th, tw) = grid, tile
    if ax is None:
        _, ax = plt.subplots(figsize=(max(1.0, ncols * tile_inches * tw / th), max(0.6, nrows * tile_inches)))
    ax.imshow(pixels, interpolation="antialiased")
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.xaxis.tick_top()
    if col_labels is not None:
        col_labels = [wrap_label(label, _chars_per_tile(ax, pixels.shape, tw, label_size)) for label in col_labels]
    ax.set_yticks([PAD + i * (th + PAD) + th / 2 for i in range(nrows)], row_labels or [])
    ax.set_xticks([PAD + j * (tw + PAD) + tw / 2 for j in range(ncols)], col_labels or [])
    ax.tick_params(length=0, labelsize=label_size, pad=2)
    for label in ax.get_yticklabels():
        label.set_multialignment("left")
    if title:
        ax.set_title(title, loc="left", fontsize=label_size + 2, fontweight="bold")
    return ax.figure


# Width of an average character of the tick labels' font as a fraction of the font size (DejaVu Sans is about
# 0.55-0.6; taken high, so that a label fitted by it never reaches the next column's).
CHAR_WIDTH = 0.65


def _chars_per_tile(ax, mosaic_shape: tuple[int, ...], tile_width: int, label_size: float) -> int:
    """How many characters of a column label fit above one tile, from the drawn size of the mosaic in `ax`.

    imshow keeps the pixels square, so the mosaic fills the axes' width or height, whichever binds. The axes may
    shrink a little when the figure's layout is tightened afterwards: 90 % of the width is used.
    """
    fig = ax.figure
    box = ax.get_position()
    width_in, height_in = box.width * fig.get_figwidth(), box.height * fig.get_figheight()
    inches_per_px = min(width_in / mosaic_shape[1], height_in / mosaic_shape[0])
    tile_points = 0.9 * tile_width * inches_per_px * 72
    return max(4, int(tile_points / (CHAR_WIDTH * label_size)))


def wrap_label(label: str, width: int) -> str:
    """`label` broken into lines of at most `width` characters after its separators ("-", "_", " "), so that
    column labels such as case names ("p0007-round-tan-short-black") stay above their own column. A part longer
    than `width` stays whole on its own line."""
    lines, line = [], ""
    part = ""
    for char in label:
        part += char
        if char in "-_ ":
            if line and len(line) + len(part) > width:
                lines.append(line)
                line = ""
            line += part
            part = ""
    if part:
        if line and len(line) + len(part) > width:
            lines.append(line)
            line = ""
        line += part
    lines.append(line)
    return "\n".join(lines)


def _checked(x: Tensor, ndim: int, what: str) -> Tensor:
    layout = "[N, 3, H, W]" if ndim == 4 else "[N, 3, T, H, W]"
    if not isinstance(x, Tensor) or x.ndim != ndim or x.shape[1] != 3 or x.shape[0] == 0:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise LofaError(f"{what} needs a non-empty tensor {layout} in [-1, 1]; got {got}")
    return x
