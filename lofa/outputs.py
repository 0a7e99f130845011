"""Figure and table output for the notebooks: one seaborn theme, atomic writes, tables as CSV + Markdown."""
from __future__ import annotations

import os
from pathlib import Path

from lofa.io import atomic_path, write_text


def set_theme() -> None:
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)


def save_figure(fig, path: str | os.PathLike, dpi: int = 150, show: bool = False) -> Path:
    """Save a matplotlib figure atomically (format from the suffix) and close it; with `show`, display the saved
    file in the notebook (the closed figure would not appear there otherwise)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    if show:
        from IPython.display import Image, display

        display(Image(filename=path))
    return path


def save_table(df, path: str | os.PathLike, float_format: str = "%.4g") -> Path:
    """Write a pandas DataFrame as `path` (.csv) and a Markdown twin (.md) beside it, both atomically."""
    path = Path(path).with_suffix(".csv")
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format=float_format)
    write_text(path.with_suffix(".md"), _markdown(df, float_format) + "\n")
    return path


def _markdown(df, float_format: str) -> str:
    cols = [str(c) for c in df.columns]
    fmt = lambda v: (float_format % v) if isinstance(v, float) else str(v)  # noqa: E731
    rows = [" | ".join(fmt(v) for v in row) for row in df.itertuples(index=False)]
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + [f"| {r} |" for r in rows])
