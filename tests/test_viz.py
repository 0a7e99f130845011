"""Image and video grids: value mapping, tile placement, filmstrip frames, labels, and bad input."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lofa.errors import LofaError  # noqa: E402
from lofa.viz import (FRAME_GAP, PAD, TILE_PX, filmstrip, frame_indices, image_grid, mosaic, to_unit,  # noqa: E402
                      upscale, video_grid)


def constant_tiles(rows, cols, h=3, w=5):
    """Tiles [rows, cols, 3, h, w]; tile (r, c) has the [-1, 1] value -1 + 0.1 (r cols + c) in every pixel."""
    values = -1 + 0.1 * torch.arange(rows * cols, dtype=torch.float32)
    return values.reshape(rows, cols, 1, 1, 1).expand(rows, cols, 3, h, w).clone(), values.reshape(rows, cols)


def test_to_unit_maps_signed_pixels_and_clamps():
    x = torch.tensor([-1.0, 0.0, 1.0, -3.0, 2.5, 0.5])
    assert torch.allclose(to_unit(x), torch.tensor([0.0, 0.5, 1.0, 0.0, 1.0, 0.75]))


def test_mosaic_places_every_tile_and_fills_the_padding():
    rows, cols, h, w, pad = 2, 3, 3, 5, 2
    tiles, values = constant_tiles(rows, cols, h, w)
    out = mosaic(tiles, pad=pad, pad_value=0.25)
    assert out.shape == (rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad, 3)
    covered = np.zeros(out.shape[:2], bool)
    for r in range(rows):
        for c in range(cols):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            np.testing.assert_allclose(out[y: y + h, x: x + w], (values[r, c].item() + 1) / 2, atol=1e-6)
            covered[y: y + h, x: x + w] = True
    assert np.all(out[~covered] == 0.25)


def test_upscale_repeats_pixels():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(upscale(x, 2), torch.tensor([[1.0, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]))


def test_frame_indices():
    assert frame_indices(8) == list(range(8))
    assert frame_indices(8, 4) == [0, 2, 4, 6]
    assert frame_indices(8, [0, -1]) == [0, 7]
    for bad in (0, 9, [8], []):
        with pytest.raises(LofaError):
            frame_indices(8, bad)


def test_filmstrip_puts_the_chosen_frames_side_by_side():
    n, t, h, w, gap = 2, 6, 3, 4, 1
    video = torch.arange(t, dtype=torch.float32).reshape(1, 1, t, 1, 1).expand(n, 3, t, h, w) / t
    strip = filmstrip(video, frames=[5, 1, 3], gap=gap, gap_value=-1.0)
    assert strip.shape == (n, 3, h, 3 * w + 2 * gap)
    for k, frame in enumerate([5, 1, 3]):
        assert torch.all(strip[..., k * (w + gap): k * (w + gap) + w] == frame / t)
    assert torch.all(strip[..., w: w + gap] == -1.0) and torch.all(strip[..., 2 * w + gap: 2 * (w + gap)] == -1.0)


def test_image_grid_lays_out_rows_with_labels_and_blank_filler():
    images, values = constant_tiles(1, 5, 8, 8)
    fig = image_grid(images[0], ncols=3, row_labels=["first", "second"], col_labels=["a", "b", "c"], title="t")
    ax = fig.axes[0]
    pixels = ax.get_images()[0].get_array()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["first", "second"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    # row 1, column 1 holds image 4; row 1, column 2 is blank (white); both read at the tick positions
    y1, x1, x2 = ax.get_yticks()[1], ax.get_xticks()[1], ax.get_xticks()[2]
    np.testing.assert_allclose(pixels[int(y1), int(x1)], (values[0, 4].item() + 1) / 2, atol=1e-6)
    np.testing.assert_allclose(pixels[int(y1), int(x2)], 1.0)
    plt.close(fig)


def test_video_grid_draws_filmstrips_into_a_given_axis():
    n, t, h = 4, 5, 8
    frame_value = torch.linspace(-1, 1, t)                 # every pixel of frame k holds frame_value[k]
    videos = frame_value.reshape(1, 1, t, 1, 1).expand(n, 3, t, h, h)
    fig, (left, right) = plt.subplots(1, 2)
    assert video_grid(videos, ncols=2, frames=3, ax=right, row_labels=["x", "y"]) is fig
    pixels = right.get_images()[0].get_array()
    assert len(left.get_images()) == 0
    zoom = -(-TILE_PX // h)
    tile, strip = h * zoom, 3 * h * zoom + 2 * FRAME_GAP
    assert pixels.shape == (2 * tile + 3 * PAD, 2 * strip + 3 * PAD, 3)
    for k, frame in enumerate(frame_indices(t, 3)):        # frames 0, 1, 3 along the second strip of row 2
        y, x = PAD + tile + PAD + tile // 2, 2 * PAD + strip + k * (tile + FRAME_GAP) + tile // 2
        np.testing.assert_allclose(pixels[y, x], (frame_value[frame].item() + 1) / 2, atol=1e-6)
    plt.close(fig)


@pytest.mark.parametrize("call", [
    lambda: image_grid(torch.zeros(2, 3, 5, 4, 4)),                       # a video given to image_grid
    lambda: video_grid(torch.zeros(2, 3, 4, 4)),                          # an image batch given to video_grid
    lambda: image_grid(torch.zeros(2, 1, 4, 4)),                          # not RGB
    lambda: image_grid(torch.zeros(4, 3, 4, 4), ncols=2, row_labels=["only one"]),
    lambda: image_grid(torch.zeros(4, 3, 4, 4), ncols=2, col_labels=["a", "b", "c"]),
])
def test_bad_input_raises_lofa_error(call):
    with pytest.raises(LofaError):
        call()


def test_long_column_labels_are_wrapped_so_they_never_overlap():
    """The layout of notebook 06's samples figure: four panels in one column, the last of four square images.
    Case names as column labels are wrapped at their separators to stay above their own column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lofa.viz import wrap_label

    names = ["p0007-round-tan-short-black", "p0009-round-pale-curly-brown", "p0017-round-beige-grey",
             "p0026-long-beige-none"]
    fig, axes = plt.subplots(4, 1, figsize=(11, 3.4 * 4), squeeze=False)
    for ax in axes[:3, 0]:
        video_grid(torch.zeros(8, 3, 4, 16, 16), ncols=2, frames=4, col_labels=["left_arm_swing-slow-low-small"] * 2,
                   ax=ax)
    image_grid(torch.zeros(16, 3, 16, 16), ncols=4, row_labels=list("abcd"), col_labels=names, ax=axes[3, 0])
    fig.tight_layout()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in axes[:, 0]:
        boxes = [label.get_window_extent(renderer) for label in ax.get_xticklabels()]
        for left, right in zip(boxes, boxes[1:]):
            assert left.x1 < right.x0, [label.get_text() for label in ax.get_xticklabels()]
    drawn = [label.get_text() for label in axes[3, 0].get_xticklabels()]
    assert [text.replace("\n", "") for text in drawn] == names  # wrapped, nothing cut
    assert all("\n" in text for text in drawn)
    plt.close(fig)
    assert wrap_label("a-b", 10) == "a-b" and wrap_label("abc-def", 4) == "abc-\ndef"
    assert wrap_label("averyveryverylongname", 4) == "averyveryverylongname"


def test_notebook_figures_draw_from_their_tables():
    import matplotlib.pyplot as plt
    import pandas as pd

    from lofa.viz import (initialisation_curves, learning_curves, method_points, sample_panels, sparsity_strip,
                          tau_sweep_lines)

    panels = [("images", torch.zeros(4, 3, 8, 8), ["a", "b"], ["x", "y"]),
              ("videos", torch.zeros(2, 3, 4, 8, 8), ["a"], ["x", "y"]), ("empty", torch.zeros(0), [], [])]
    fig = sample_panels(panels, heights=[1, 1, 1])
    assert len(fig.axes) == 3 and not fig.axes[2].axison
    history = pd.DataFrame({"step": range(10), "loss": range(1, 11), "cosine": [0.1] * 10})
    fig = learning_curves({"a": history}, {"loss": "loss", "cosine": "cosine", "absent": "not drawn"}, log=False,
                          reference=("cosine", 0.5, "paper"))
    assert [ax.get_title() for ax in fig.axes] == ["loss", "cosine"]
    per_case = pd.DataFrame([{"setting": s, "method": m, "split": split, "case_id": c, "acc": 0.5}
                             for s in ("a", "b") for m in ("ground truth", "base", "LoFA")
                             for split in ("heldout", "train") for c in range(2)])
    fig = method_points(per_case, ["base", "LoFA"])
    quality = pd.DataFrame([{"task": "t", "start": s, "steps": k, "metric": "acc", "mean": 0.1 * k}
                            for s, k in (("per-case LoRA", 4), ("ground truth", np.nan), ("LoFA", 0), ("LoFA", 4))])
    fig2 = initialisation_curves(quality)
    per_lora = pd.DataFrame({"task": ["a", "b"], "fraction_below": [0.6, 0.7]})
    fig3 = sparsity_strip(per_lora, ["a", "b"], 0.02, (0.5, 0.8))
    sweep = pd.DataFrame({"task": "a", "tau": [0.01, 0.02], "active_fraction_mean": [0.5, 0.3],
                          "active_fraction_min": [0.4, 0.2], "active_fraction_max": [0.6, 0.4]})
    fig4 = tau_sweep_lines(sweep, ["a"], 0.02, (0.5, 0.8))
    for f in (fig, fig2, fig3, fig4):
        plt.close(f)


def test_zoo_size_curves_draw_one_line_and_band_per_method_and_split():
    import matplotlib.pyplot as plt
    import pandas as pd

    from lofa.viz import zoo_size_curves

    quality = pd.DataFrame([{"train LoRAs": n, "setting": "s", "split": split, "method": m, "metric": "acc",
                             "mean": 0.1, "ci_low": 0.0, "ci_high": 0.2}
                            for n in (40, 80, 160) for split in ("heldout", "train")
                            for m in ("ground truth", "LoFA", "mean LoRA")])
    fig = zoo_size_curves(quality, ["LoFA", "mean LoRA", "not scored"])
    assert [ax.get_title() for ax in fig.axes] == ["heldout cases", "train cases"]
    for ax in fig.axes:
        assert len(ax.lines) == 3 and len(ax.collections) == 2  # two methods and the truth; one band each
        assert [t.get_text() for t in ax.get_xticklabels()] == ["40", "80", "160"]
    plt.close(fig)
