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


# ---------------------------------------------------------------- the notebooks' figures
# Each function draws one figure of a pipeline notebook from that notebook's tables or samples and returns the
# matplotlib Figure (save it with `lofa.outputs.save_figure`).

def sample_panels(panels: Sequence[tuple[str, Tensor, Sequence[str], Sequence[str]]], width: float = 12.0,
                  heights: Sequence[float] | float = 2.6, frames: int = 4, tight: bool = False, pad: float = 0.0):
    """One panel per row of the figure: (title, tiles, row_labels, col_labels) with tiles [R·C, 3, H, W] images or
    [R·C, 3, T, H, W] videos (drawn as filmstrips of `frames` frames), R = len(row_labels) rows of C =
    len(col_labels) tiles, row-major. A panel without tiles (C = 0) is left blank. heights: inches per panel (one
    number for all); pad: inches added to the figure's height."""
    import matplotlib.pyplot as plt

    heights = [heights] * len(panels) if isinstance(heights, (int, float)) else list(heights)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, sum(heights) + pad),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (title, tiles, row_labels, col_labels) in zip(axes[:, 0], panels):
        if not len(col_labels):
            ax.set_axis_off()
            continue
        labels = {"ncols": len(col_labels), "row_labels": list(row_labels), "col_labels": list(col_labels),
                  "title": title, "ax": ax}
        if tiles.ndim == 5:
            video_grid(tiles, frames=frames, **labels)
        else:
            image_grid(tiles, **labels)
    if tight:
        fig.tight_layout()
    return fig


def learning_curves(histories: dict, titles: dict[str, str], *, log: bool = True,
                    ylims: dict[str, tuple] | None = None, reference: tuple[str, float, str] | None = None,
                    panel_width: float = 4.2, height: float = 3.3):
    """One panel per column of `titles` ({column: panel title}) that the histories have: each history ({label:
    DataFrame with `step` and the columns}) as a moving average over 10 % of its steps. ylims: {column: y limits};
    reference: (column, value, label) of a dashed horizontal line (e.g. the paper's number)."""
    import matplotlib.pyplot as plt

    first = next(iter(histories.values()))
    columns = [c for c in titles if c in first]
    fig, axes = plt.subplots(1, len(columns), figsize=(panel_width * len(columns), height), squeeze=False)
    for label, h in histories.items():
        window = max(1, len(h) // 10)
        for ax, column in zip(axes[0], columns):
            ax.plot(h.step, h[column].rolling(window, min_periods=1).mean(), label=label)
    for ax, column in zip(axes[0], columns):
        ax.set(xlabel="step", title=titles[column], yscale="log" if log else "linear")
        if ylims and column in ylims:
            ax.set_ylim(*ylims[column])
        if reference and reference[0] == column:
            ax.axhline(reference[1], color="grey", ls="--", lw=1, label=reference[2])
    axes[0, -1 if reference else 0].legend(fontsize=7)
    return fig


def loss_curves(curves: dict, titles: dict[str, str], ylabel: str, panel_width: float = 4.2, height: float = 3.2):
    """One panel per curve ({key: pandas Series of a per-step loss indexed by step}, titled titles[key]): the raw
    curve faint, its moving average over 5 % of the steps on top, log scale."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(panel_width * len(curves), height), squeeze=False)
    for ax, (key, curve) in zip(axes[0], curves.items()):
        ax.plot(curve.index, curve.values, alpha=0.3, lw=0.8)
        ax.plot(curve.index, curve.rolling(max(1, len(curve) // 20), min_periods=1).mean(), lw=1.8)
        ax.set(title=titles[key], xlabel="step", ylabel=ylabel, yscale="log")
    fig.tight_layout()  # each panel has its own y label: without it they run into the panel on their left
    return fig


def fidelity_curves(curves, reference_fidelity, settings: Sequence[str], references: Sequence[str]):
    """Stage II's ΔW fidelity over its training (notebook 06): per setting (rows), the cosine and the norm ratio
    (columns) of LoFA's LoRAs of the followed held-out (solid) and training (dashed) cases, beside the reference
    predictors' levels on the same cases (horizontal lines, one colour per reference).

    curves: columns setting, step, {heldout,train}_{cosine,magnitude}; reference_fidelity: one row per (setting,
    cases, method, case_id) with cosine and magnitude (`lofa.hypernet.fidelity.reference_delta_fidelity`)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    levels = reference_fidelity.groupby(["setting", "cases", "method"], sort=False)[["cosine", "magnitude"]].mean()
    colors = dict(zip(references, sns.color_palette("tab10")[1:len(references) + 1]))
    fig, axes = plt.subplots(len(settings), 2, figsize=(10, 2.6 * len(settings)), sharex=True, squeeze=False)
    for setting, row in zip(settings, axes):
        part = curves[curves.setting == setting]
        for ax, quantity in zip(row, ("cosine", "magnitude")):
            for split, style in (("heldout", "-"), ("train", "--")):
                ax.plot(part.step, part[f"{split}_{quantity}"], "k" + style, marker="o", ms=3, label=f"LoFA, {split}")
                for method in references:
                    ax.axhline(levels.loc[(setting, split, method), quantity], color=colors[method], ls=style, lw=1,
                               label=f"{method}, {split}")
            ax.set(title=f"{setting}: " + ("ΔW cosine to the zoo LoRA" if quantity == "cosine" else "‖ΔŴ‖ / ‖ΔW‖"))
    for ax in axes[-1]:
        ax.set(xlabel="Stage II step")
    axes[0, 1].legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    return fig


def map_disagreement(panels: Sequence[tuple[str, str, str, Tensor, Tensor]]):
    """True and predicted response maps of single target matrices (notebook 05), one row per panel (row label,
    case name, target name, true map [out, in] bool, predicted map [out, in] bool): the true map, the prediction,
    and where they disagree (red: missed response, blue: predicted response where there is none, grey: both)."""
    import matplotlib.pyplot as plt

    from lofa.hypernet.losses import map_metrics

    fig, axes = plt.subplots(len(panels), 3, figsize=(7.5, 2.3 * len(panels)), squeeze=False)
    for row, (setting, name, target, true, pred) in zip(axes, panels):
        tm, pm = true.numpy(), pred.numpy()
        diff = np.zeros((*tm.shape, 3))
        diff[tm & ~pm] = (0.85, 0.1, 0.1)
        diff[pm & ~tm] = (0.1, 0.3, 0.9)
        diff[tm & pm] = (0.8, 0.8, 0.8)
        for ax, image, title in zip(row, (tm, pm, diff), ("true map", "Stage I", "disagreement")):
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest", aspect="auto")
            ax.set_xticks([]), ax.set_yticks([])
            ax.grid(False)
            ax.set_title(title, fontsize=8)
        row[0].set_ylabel(f"{setting}\n{name[:28]}\n{target[-22:]}", fontsize=7)
        c = map_metrics(pred, true)["cosine"]
        row[2].set_title(f"disagreement (cosine {c:.2f})", fontsize=8)
    fig.tight_layout()
    return fig


def method_points(per_case, methods: Sequence[str], metric: str = "acc", ylabel: str = "exact case recognised"):
    """Notebook 07's figure: per setting (one panel each), the mean of `metric` over cases of each method with a 95 %
    interval, held-out and training cases side by side, and the ground truth's mean as a dotted line.
    per_case: `lofa.evaluate.case_means` by (setting, method), with a split column."""
    import seaborn as sns

    shown = per_case[per_case.method != "ground truth"]
    grid = sns.catplot(shown, x="method", y=metric, hue="split", col="setting", kind="point", order=list(methods),
                       hue_order=["heldout", "train"], errorbar=("ci", 95), dodge=0.3, linestyle="none", height=3.2,
                       aspect=1.1)
    grid.set_xticklabels(rotation=40, ha="right")
    grid.set_axis_labels("", ylabel)
    truth = per_case[per_case.method == "ground truth"].groupby("setting")[metric].mean()
    for setting, ax in grid.axes_dict.items():
        ax.axhline(truth[setting], color="0.55", ls=":", lw=1)
    return grid.figure


def initialisation_curves(quality, metric: str = "acc", ylabel: str = "exact case recognised"):
    """Notebook 08's figure: per task (one panel each), the mean `metric` after k fine-tuning steps from each start
    (`lofa.evaluate.summarize` by task, start, steps), the per-case LoRA's level dotted and ground truth's dashed."""
    import seaborn as sns

    rows = quality[quality.metric == metric]
    curves = rows[~rows.start.isin(["per-case LoRA", "ground truth"])]
    grid = sns.relplot(curves, x="steps", y="mean", hue="start", col="task", kind="line", marker="o", height=3.2,
                       aspect=1.2, facet_kws={"sharex": False})
    for task, ax in grid.axes_dict.items():
        by_start = rows[rows.task == task].set_index(["start", "steps"])["mean"]
        ax.axhline(by_start.loc["per-case LoRA"].iloc[0], color="0.3", ls=":", lw=1)
        ax.axhline(by_start.loc["ground truth"].iloc[0], color="0.6", ls="--", lw=1)
    grid.set_axis_labels("fine-tuning steps", ylabel)
    return grid.figure


def zoo_size_curves(quality, methods: Sequence[str], metric: str = "acc", ylabel: str = "exact case recognised"):
    """The paper's Fig. 8 (`lofa bench zoo-size`): `metric` against the number of training LoRAs, one line per method
    with its 95 % interval as a band, held-out and training cases in two panels, ground truth dashed.
    quality: `lofa.evaluate.summarize` by (train LoRAs, setting, split, method)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    rows = quality[quality.metric == metric]
    splits = [s for s in ("heldout", "train") if s in set(rows.split)]
    fig, axes = plt.subplots(1, len(splits), figsize=(5.2 * len(splits), 3.6), sharey=True, squeeze=False)
    palette = dict(zip(methods, sns.color_palette("tab10", len(methods))))
    for ax, split in zip(axes[0], splits):
        block = rows[rows.split == split]
        for method in methods:
            line = block[block.method == method].sort_values("train LoRAs")
            if line.empty:
                continue
            ax.plot(line["train LoRAs"], line["mean"], marker="o", color=palette[method], label=method)
            ax.fill_between(line["train LoRAs"], line["ci_low"], line["ci_high"], color=palette[method], alpha=0.15)
        truth = block[block.method == "ground truth"]["mean"]
        if not truth.empty:
            ax.axhline(truth.mean(), color="0.55", ls="--", lw=1, label="ground truth")
        ax.set_xscale("log", base=2)
        sizes = sorted(block["train LoRAs"].unique())
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("training LoRAs")
        ax.set_title(f"{split} cases")
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def lora_train_time(times, summary, title: str):
    """Notebook 03's training-time figure: seconds per LoRA per task and split (box and dots; times: the zoos'
    frames with task and split columns) beside each zoo's total minutes (summary: `lofa.lora.quality.summarize_zoos`),
    with the paper's hours for scale."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    order = list(summary.task)
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.4), gridspec_kw={"width_ratios": [1.4, 1]})
    sns.boxplot(times, x="task", y="wall_time_s", ax=axes[0], color="0.9", showfliers=False, order=order)
    sns.stripplot(times, x="task", y="wall_time_s", hue="split", ax=axes[0], size=3, alpha=0.6, dodge=True,
                  order=order)
    axes[0].set(xlabel="", ylabel="seconds per LoRA", ylim=(0, None), title=title)
    axes[0].legend(title="split", fontsize=8)
    bars = axes[1].bar(summary.task, summary["total min"], color="tab:blue")
    axes[1].bar_label(bars, labels=[f"{m:.{2 if m < 1 else 1}f} min\n{n} LoRAs"
                                   for m, n in zip(summary["total min"], summary.LoRAs)], fontsize=8)
    axes[1].set(ylabel="minutes for the whole zoo", title="collection", ylim=(0, summary["total min"].max() * 1.6))
    axes[1].text(0.02, 0.97, "paper: ~2 h per video LoRA,\n~1 h per identity LoRA (GPU)", transform=axes[1].transAxes,
                 va="top", fontsize=8, color="0.3")
    return fig


def lora_quality(quality, wide, per_case_samples: int, target: float, paper_metric: dict, title: str):
    """Notebook 03's quality figure, one column per task: exact-case recognition of ground truth, base and LoRA with
    intervals and the target line (quality: `lofa.lora.quality.quality_table`), then histograms over cases of the
    LoRA's gain over the base in exact-case recognition, in the paper metric, and of the denoising-loss reduction
    (wide: `lofa.lora.quality.per_case_wide`)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    palette = {"ground truth": "0.55", "base": "tab:orange", "LoRA": "tab:blue"}
    tasks = list(quality.task.unique())
    fig, axes = plt.subplots(4, len(tasks), figsize=(4.2 * len(tasks), 12.5), squeeze=False)
    for j, task in enumerate(tasks):
        q = quality[(quality.task == task) & (quality.split == "all") & (quality.metric == "acc")].set_index("method")
        q = q.loc[list(palette)]
        ax = axes[0, j]
        ax.bar(q.index, q["mean"], color=list(palette.values()),
               yerr=[q["mean"] - q.ci_low, q.ci_high - q["mean"]], capsize=4)
        ax.axhline(target * q.loc["ground truth", "mean"], color="tab:red", ls="--", lw=1,
                   label=f"target: {target} x ground truth")
        ax.set(ylim=(0, 1.05), ylabel="exact case recognised", title=task)
        ax.legend(fontsize=8, loc="upper right")
        w = wide[wide.task == task]
        metric = paper_metric[task]
        edges = np.arange(-1 - 0.5 / per_case_samples, 1 + 0.5 / per_case_samples + 1e-9, 1 / per_case_samples)
        gains = ((w["acc"]["LoRA"] - w["acc"]["base"], edges, "per-case gain in exact-case recognition (LoRA - base)"),
                 (w[metric]["LoRA"] - w[metric]["base"], 15, f"per-case gain in {metric} (LoRA - base)"),
                 (1 - w["denoise"]["LoRA"] / w["denoise"]["base"], 15, "denoising loss reduction, 1 - LoRA / base"))
        for ax, (gain, bins, xlabel) in zip(axes[1:, j], gains):
            frame = gain.rename("gain").to_frame().assign(split=w.split.to_numpy())
            sns.histplot(frame, x="gain", hue="split", bins=bins, multiple="stack", ax=ax,
                         hue_order=["train", "heldout"])
            ax.axvline(0, color="k", lw=0.8)
            ax.set(xlabel=xlabel, ylabel="cases")
    fig.suptitle(title, y=1.0)
    fig.tight_layout()
    return fig


def sparsity_strip(per_lora, tasks: Sequence[str], tau: float, paper_below: tuple[float, float]):
    """Notebook 04 (a): each LoRA's fraction of entries at or below τ (one dot per LoRA, a row per task; per_lora:
    `lofa.analysis.sparsity_tables`), over the paper's band."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    ax.axvspan(*paper_below, color="tab:green", alpha=0.15, label="paper: 50–80 %")
    sns.stripplot(per_lora, x="fraction_below", y="task", hue="task", order=list(tasks), ax=ax, size=4, alpha=0.7,
                  legend=False)
    ax.set(xlim=(0, 1), xlabel=f"fraction of entries with |ΔW|/|W| ≤ {tau:g} (one dot per LoRA)", ylabel="")
    ax.legend(loc="lower left")
    return fig


def depth_type_heatmaps(depth_type, tasks: Sequence[str], tau: float, module_types: Sequence[str]):
    """Notebook 04 (b): per task, % of active entries per block (rows, depth order) and module type (columns, in
    `module_types` order, then "other"); depth_type: `lofa.analysis.group_response` by task, depth, module_type."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        grid = depth_type[depth_type.task == task].pivot(index="depth", columns="module_type", values="active_fraction")
        grid = grid[[t for t in (*module_types, "other") if t in grid]] * 100
        sns.heatmap(grid, ax=ax, vmin=0, vmax=100, cmap="viridis", annot=grid.size <= 80, fmt=".0f",
                    cbar=ax is axes[0, -1], cbar_kws={"label": f"% entries > τ = {tau:g}"})
        ax.set(title=task, xlabel="module type", ylabel="block (depth order)")
    return fig


def similarity_matrices(matrices: dict, tasks: Sequence[str]):
    """Notebook 04 (c): each similarity matrix of `lofa.analysis.similarity_tables` ({name: (matrix [n, n] sorted by
    group, labels [n])}) with its groups outlined and labelled; the diagonal is left blank."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(matrices), figsize=(5.2 * len(matrices), 4.4), squeeze=False, layout="constrained")
    for ax, (name, (matrix, labels)) in zip(axes[0], matrices.items()):
        matrix = matrix.copy()
        np.fill_diagonal(matrix, np.nan)   # self-similarity 1 would swamp the colour scale
        finite = matrix[np.isfinite(matrix)]
        image = ax.imshow(matrix, cmap="viridis", vmin=finite.min(), vmax=finite.max(), interpolation="nearest")
        edges = [k for k in range(1, len(labels)) if labels[k] != labels[k - 1]]
        for k in edges:
            ax.axhline(k - 0.5, color="white", lw=0.8)
            ax.axvline(k - 0.5, color="white", lw=0.8)
        centres = [(s + e - 1) / 2 for s, e in zip([0, *edges], [*edges, len(labels)])]
        ax.set_yticks(centres, [labels[int(c)] for c in centres], fontsize=6)
        ax.set_xticks([])
        ax.grid(False)
        ax.set_title(f"{name}: {'IoU of maps' if name in tasks else 'profile correlation'}", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.7)
    return fig


def tau_sweep_lines(tau_sweep_table, tasks: Sequence[str], tau: float, paper_below: tuple[float, float]):
    """Notebook 04 (d): per task, the mean active fraction of the LoRAs at every τ (line) and their range (band;
    `lofa.analysis.tau_sweep_summary`), with the paper's band at τ = 2 % and the chosen τ marked."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.axhspan(1 - paper_below[1], 1 - paper_below[0], color="tab:green", alpha=0.12, label="paper at τ = 2 %")
    for task in tasks:
        frame = tau_sweep_table[tau_sweep_table.task == task]
        line, = ax.plot(frame.tau, frame.active_fraction_mean, marker="o", ms=3, label=task)
        ax.fill_between(frame.tau, frame.active_fraction_min, frame.active_fraction_max, color=line.get_color(),
                        alpha=0.2)
    ax.axvline(tau, color="grey", ls="--", lw=1)
    ax.set(xscale="log", ylim=(0, 1), xlabel="τ", ylabel="active fraction (|ΔW|/|W| > τ)")
    ax.legend(fontsize=8)
    return fig


def competence_samples(worlds: dict, checks: dict, k: int = 6):
    """Notebook 02's figure: per task ({task: World}), ground-truth renders above base samples for the coarse
    captions of the same `k` training cases (checks: {task: `lofa.evaluate.base_competence` result}), labelled with
    the coarse category. A filmstrip row (4 frames a case) is a quarter as tall as an image row: rows are sized to
    their content."""
    panels, heights = [], []
    for task, world in worlds.items():
        s = checks[task]["samples"]
        labels = [world.coarse_names[world.cases[i].coarse] for i in s["ids"][:k]]
        panels.append((f"{task}: coarse captions", torch.cat([s["real"][:k], s["coarse"][:k]]),
                       ["renders", "base samples"], labels))
        heights.append(1.3 if world.modality == "video" else 3.6)
    return sample_panels(panels, width=12, heights=heights, pad=0.6)
