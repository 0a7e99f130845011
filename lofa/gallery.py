"""What notebook 01 shows of the procedural worlds: a summary table, one gallery per task and the conditions LoFA
reads.

    table = world_summary(worlds, seed)                   # 01_worlds_summary.csv: one row per task
    fig = actions_gallery(worlds["actions"], seed)        # training cases above, held-out cases below
    fig = conditions_figure(worlds, seed)                 # pose sequences, style references, reference faces

A gallery row is one case: renders with different appearance seeds (or contents / prompt contexts), labelled with
the case's name and coarse category, its varying components, the nearest training case of a held-out case, a
training prompt and the reserved evaluation prompt. Cases are picked in a seeded order, spread over the coarse
categories. Figures are matplotlib Figures; nothing is stored.
"""
from __future__ import annotations

import textwrap
from typing import Callable, Sequence

import pandas as pd
import torch

from lofa.baselines.reference import oracle_case
from lofa.viz import frame_indices, image_grid, video_grid

CASES_PER_PANEL = 4   # cases per gallery panel (training cases above, held-out cases below)
TILE = 0.55           # inches per tile
# What each task's hypernetwork reads besides text.
CONDITIONS = {"actions": "pose sequence (skeleton video)", "styles": "style reference image (other content)",
              "identities": "reference face image"}


def pick_cases(world, split: str, k: int, seed: int) -> list[int]:
    """k case ids of a split in a seeded order, spread over the coarse categories (one from each in turn)."""
    ids = world.ids(split)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    taken, keyed = {}, []
    for i in (ids[j] for j in order):
        coarse = world.cases[i].coarse
        taken[coarse] = taken.get(coarse, 0) + 1
        keyed.append((taken[coarse], coarse, i))
    return [i for *_, i in sorted(keyed)[:k]]


def case_label(world, case_id: int, variant: int = 0, width: int = 96) -> str:
    """Row label: name and coarse category, varying components not in the name, the nearest training case and the
    components it differs in (held-out cases only, `baselines.reference.oracle_case`), one training prompt and the
    evaluation prompt, wrapped at `width` characters."""
    case = world.cases[case_id]
    parts = set(case.name.split("-"))
    lines = [f"{case.name}   [{world.coarse_names[case.coarse]}]"]
    extra = ", ".join(f"{k} {v}" for k, v in case.attrs.items() if str(v) not in parts and len(world.vocab[k]) > 1)
    lines += textwrap.wrap(extra, width)
    if case.split == "heldout":
        near = world.cases[oracle_case(world, case_id, world.ids("train"))[0]]
        diff = [k for k, v in case.attrs.items() if near.attrs[k] != v]
        lines += textwrap.wrap(f"nearest training case {near.name} differs in: {', '.join(diff)}", width)
    lines += textwrap.wrap("train: " + world.prompt(case_id, variant % world.n_prompts("train"), "train"), width)
    lines += textwrap.wrap("eval: " + world.prompt(case_id, variant % world.n_prompts("eval"), "eval"), width)
    return "\n".join(lines)


def _frames_by_size(shape: Sequence[int]) -> str:
    """(3, T, H, W) -> "T × H×W"; (3, H, W) -> "1 × H×W"."""
    return f"{shape[1] if len(shape) == 4 else 1} × {shape[-2]}×{shape[-1]}"


def world_summary(worlds: dict, seed: int) -> pd.DataFrame:
    """One row per task ({task: World}): modality, cases by split, whether every component value of a held-out
    case occurs in training, coarse categories, case components and their vocabularies, prompts per case (train /
    eval), frames × resolution, and the condition with its size."""
    rows = []
    for task, world in worlds.items():
        cases = world.describe()
        components = [k for k in world.cases[0].attrs if len(world.vocab[k]) > 1]
        train, held = cases[cases.split == "train"], cases[cases.split == "heldout"]
        condition = world.condition(world.ids("train")[:1], seed)[0]
        rows.append({
            "task": task, "modality": world.modality, "cases": len(cases), "train": len(train),
            "held-out": len(held),
            "held-out components seen in training": all(held[k].isin(train[k]).all() for k in components),
            "coarse categories": len(world.coarse_names), "coarse names": "; ".join(world.coarse_names),
            "case components": " × ".join(f"{k} ({len(world.vocab[k])})" for k in components),
            "component combinations": int(torch.tensor([len(world.vocab[k]) for k in components]).prod()),
            "vocabularies": "; ".join(f"{k}: {'/'.join(world.vocab[k])}" for k in components),
            "prompts per case (train / eval)": f"{world.n_prompts('train')} / {world.n_prompts('eval')}",
            "frames × resolution": _frames_by_size(world.shape),
            "condition": f"{CONDITIONS[task]}, {_frames_by_size(condition.shape)}",
        })
    return pd.DataFrame(rows)


def _gallery(world, draw: Callable, n_tiles: int, seed: int, width: int = 96):
    """Training cases above, held-out cases below; draw(case_ids, row_labels, ax, title) fills one panel with
    n_tiles tiles per row. Rows are made tall enough for their labels."""
    import matplotlib.pyplot as plt

    panels = []
    for split, title in (("train", "training cases"),
                         ("heldout", "held-out cases: unseen combinations of components seen in training")):
        ids = pick_cases(world, split, CASES_PER_PANEL, seed)
        panels.append((ids, [case_label(world, i, v, width) for v, i in enumerate(ids)], f"{world.task}: {title}"))
    lines = max(label.count("\n") + 1 for _, labels, _ in panels for label in labels)
    tile = max(TILE, 0.12 * lines + 0.08)
    fig, axes = plt.subplots(2, 1, figsize=(n_tiles * tile + width * 0.055, 2 * CASES_PER_PANEL * tile + 1.6),
                             layout="constrained")
    for ax, (ids, labels, title) in zip(axes, panels):
        draw(ids, labels, ax, title)
    return fig


def actions_gallery(world, seed: int, seeds: int = 3):
    """Each case as `seeds` filmstrips of all its frames, one per appearance seed (seed, seed + 1, ...): the motion
    is what the case fixes."""
    def draw(ids, labels, ax, title):
        x = torch.stack([world.render(ids, seed=seed + s) for s in range(seeds)], 1).flatten(0, 1)
        video_grid(x, ncols=seeds, row_labels=labels,
                   col_labels=[f"appearance seed {seed + s}: frames 1–{world.cfg.frames}" for s in range(seeds)],
                   title=title, ax=ax)

    return _gallery(world, draw, seeds * world.cfg.frames, seed)


def style_contents(world) -> list[str]:
    """One animated content per shape of the styles world ("shape-motion", the motions taken in turn)."""
    return [f"{shape}-{world.cfg.motions[j % len(world.cfg.motions)]}" for j, shape in enumerate(world.cfg.shapes)]


def styles_gallery(world, seed: int, frames: int = 4):
    """Each style case rendered with every content of `style_contents` (one column each, `frames` frames): the
    style stays, the content changes."""
    contents = style_contents(world)
    shown = ", ".join(str(t + 1) for t in frame_indices(world.cfg.frames, frames))

    def draw(ids, labels, ax, title):
        x = torch.stack([world.render(ids, seed=seed + j, content=[c] * len(ids)) for j, c in enumerate(contents)], 1)
        video_grid(x.flatten(0, 1), ncols=len(contents), frames=frames, row_labels=labels,
                   col_labels=[f"{c.replace('-', ' ')}: frames {shown}" for c in contents], title=title, ax=ax)

    return _gallery(world, draw, len(contents) * frames, seed)


def identities_gallery(world, seed: int, contexts: Sequence[str] = ("", "", "", "", "", "hat", "sunglasses")):
    """Each identity rendered once per prompt context (seeds seed, seed + 1, ...; "" = no context): pose,
    expression, background, shirt and lighting vary, the identity stays."""
    def draw(ids, labels, ax, title):
        x = [world.render(ids, seed=seed + j, context=[c] * len(ids)) for j, c in enumerate(contexts)]
        image_grid(torch.stack(x, 1).flatten(0, 1), ncols=len(contexts), row_labels=labels,
                   col_labels=[f"+ {c}" if c else f"seed {seed + j}" for j, c in enumerate(contexts)], title=title,
                   ax=ax)

    return _gallery(world, draw, len(contexts), seed, width=64)


def conditions_figure(worlds: dict, seed: int, n: int = 3):
    """What LoFA reads besides text, beside renders of the same cases (n training cases a task): the actions pose
    sequence beside two renders, a style reference of other content beside the style's renders (middle frame), a
    reference face beside varied renders. `worlds` {task: World} may hold any of the three tasks: with all three,
    actions spans the top row and styles and identities share the second; otherwise one row a task."""
    import matplotlib.pyplot as plt

    frames = worlds["actions"].cfg.frames if "actions" in worlds else 4
    heights = {"actions": 1.0, "styles": 1.5, "identities": 1.5}
    fig = plt.figure(figsize=(3 * frames * TILE + 3, 2.5 * n * TILE + 2.2), layout="constrained")
    if len(worlds) == 3:
        grid = fig.add_gridspec(2, 2, height_ratios=[1, 1.5])
        axes = {"actions": grid[0, :], "styles": grid[1, 0], "identities": grid[1, 1]}
    else:
        grid = fig.add_gridspec(len(worlds), 1, height_ratios=[heights[t] for t in worlds])
        axes = {task: grid[i, 0] for i, task in enumerate(worlds)}
    for task, world in worlds.items():
        _CONDITION_PANELS[task](world, seed, n, fig.add_subplot(axes[task]))
    return fig


def _pose_panel(actions, seed: int, n: int, ax) -> None:
    """conditions_figure's actions panel: the pose sequence of n training cases beside two renders."""
    ids = pick_cases(actions, "train", n, seed)
    pose = actions.condition(ids, seed)
    x = torch.stack([pose, actions.render(ids, seed), actions.render(ids, seed + 1)], 1).flatten(0, 1)
    video_grid(x, ncols=3, row_labels=[actions.cases[i].name for i in ids], ax=ax,
               col_labels=["pose condition (skeleton sequence)", f"render, seed {seed}", f"render, seed {seed + 1}"],
               title="actions: pose sequence → action")


def _style_panel(styles, seed: int, n: int, ax) -> None:
    """conditions_figure's styles panel: the reference image of n training styles beside renders of other
    content (middle frame)."""
    ids = pick_cases(styles, "train", n, seed)
    contents = style_contents(styles)
    mid = styles.cfg.frames // 2
    renders = [styles.render(ids, seed + j, content=[c] * n)[:, :, mid] for j, c in enumerate(contents)]
    x = torch.stack([styles.condition(ids, seed)] + renders, 1).flatten(0, 1)
    image_grid(x, ncols=len(contents) + 1, row_labels=[styles.cases[i].name for i in ids], ax=ax,
               col_labels=["reference\n(condition)"] + [c.replace("-", "\n") for c in contents],
               title="styles: reference image → style (renders: middle frame)")


def _face_panel(identities, seed: int, n: int, ax) -> None:
    """conditions_figure's identities panel: the reference face of n training identities beside varied renders."""
    ids = pick_cases(identities, "train", n, seed)
    varied = ["", "", "hat", "sunglasses"]
    renders = [identities.render(ids, seed + j, context=[c] * n) for j, c in enumerate(varied)]
    x = torch.stack([identities.condition(ids, seed)] + renders, 1).flatten(0, 1)
    image_grid(x, ncols=len(varied) + 1, row_labels=[identities.cases[i].name for i in ids], ax=ax,
               col_labels=["reference\n(condition)"] + [f"+ {c}" if c else "varied render" for c in varied],
               title="identities: reference face → identity")


_CONDITION_PANELS = {"actions": _pose_panel, "styles": _style_panel, "identities": _face_panel}
