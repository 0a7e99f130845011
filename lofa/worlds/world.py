"""What the three worlds share: the Case record, the World base class (ids, prompts, describe, matched samples),
the seeded held-out split, and vectorised drawing with signed distance fields in torch.

Drawing coordinates: a canvas of height 1, y pointing down, x in [0, W/H]; pixel centres at (i + 0.5) / H. Every
shape is a signed distance field (SDF, negative inside, canvas units) evaluated on the whole pixel grid for a
whole batch at once, so drawings are resolution free and antialiased: coverage = clamp(0.5 - sdf / pixel, 0, 1).
Shape parameters are tensors of any batch shape [...]; fields come out as [..., H, W].
"""
from __future__ import annotations

import functools
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from lofa.errors import LofaError

SPLITS = ("train", "heldout")
PROMPT_SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Case:
    """One personalization target: an action, a style or an identity (one LoRA each)."""

    id: int                                          # index into world.cases
    name: str                                        # human readable, unique, e.g. "left_arm-swing-fast-low-large"
    attrs: dict = field(hash=False)                  # component -> value
    coarse: int                                      # index into world.coarse_names; base models see only this
    split: str                                       # "train" | "heldout"


def heldout_split(attrs: list[dict], coarse: list[int], fraction: float, seed: int) -> list[str]:
    """"train" / "heldout" per case: ceil(fraction * n) cases held out, chosen in a seeded random order, skipping any
    case whose removal would leave one of its component values (or its coarse class) without a training case —
    so every held-out case is an unseen *combination* of seen components."""
    n = len(attrs)
    n_held = math.ceil(fraction * n)
    counts = Counter()
    for a, c in zip(attrs, coarse):
        counts.update(_keys(a, c))
    split = ["train"] * n
    held = 0
    for i in torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist():
        if held == n_held:
            break
        keys = _keys(attrs[i], coarse[i])
        if all(counts[k] > 1 for k in keys):
            counts.subtract(keys)
            split[i] = "heldout"
            held += 1
    if held < n_held:
        raise LofaError(f"cannot hold out {n_held} of {n} cases with every component seen in training; "
                        f"lower heldout_fraction or enlarge the component vocabularies")
    return split


def _keys(attrs: dict, coarse: int) -> list[tuple]:
    return [(k, str(v)) for k, v in attrs.items()] + [("_coarse", coarse)]


def pick(phrases: Sequence[str], split: str, j: int) -> str:
    """Synonym j of a phrase list: entries 0-1 are train phrasings, entries 2+ are reserved for "eval"."""
    if split == "train":
        return phrases[j % min(2, len(phrases))]
    reserved = phrases[2:] or phrases
    return reserved[j % len(reserved)]


class World:
    """Base of ActionsWorld, StylesWorld and IdentitiesWorld; see lofa/worlds/__init__.py for the API.

    Subclasses set `task`, `modality`, `cfg`, `cases`, `coarse_names`, the prompt templates `TEMPLATES`
    ({"train": [...], "eval": [...]}, str.format fields filled by `_phrases`), `COARSE_TEMPLATES`, and implement
    `render`, `condition`, `_phrases(case, split, j, extra)`, `_coarse_phrases(coarse, j, extra)`,
    `_random_extras(n, generator)`.
    """

    task: str
    modality: str
    extra: str | None = None          # name of the optional per-sample description keyword (styles: "content", ...)
    SYNONYM_SETS = {"train": 2, "eval": 1}
    TEMPLATES: dict[str, list[str]]
    COARSE_TEMPLATES: list[str]

    def __init__(self, cfg, seed: int):
        self.cfg = cfg
        self.seed = seed
        self.cases: list[Case] = []
        self.coarse_names: list[str] = []

    def _finish(self, names: list[str], attrs: list[dict], coarse: list[int]) -> None:
        if len(set(names)) != len(names):
            raise LofaError(f"{self.task}: case names are not unique; check the component vocabularies")
        if len(names) < 2:
            raise LofaError(f"{self.task}: {len(names)} case(s); a world needs at least 2 — enlarge the vocabularies")
        split = heldout_split(attrs, coarse, self.cfg.heldout_fraction, self.seed)
        self.cases = [Case(i, n, a, c, s) for i, (n, a, c, s) in enumerate(zip(names, attrs, coarse, split))]

    # -- cases -------------------------------------------------------------------------------------

    def ids(self, split: str) -> list[int]:
        if split not in SPLITS:
            raise LofaError(f"unknown split {split!r}; use 'train' or 'heldout'")
        return [c.id for c in self.cases if c.split == split]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one render: (3, T, H, W) for video worlds, (3, H, W) for image worlds."""
        if self.modality == "video":
            return (3, self.cfg.frames, self.cfg.height, self.cfg.width)
        return (3, self.cfg.height, self.cfg.width)

    def describe(self):
        """pandas DataFrame, one row per case: id, name, coarse, coarse_name, split and one column per component."""
        import pandas as pd

        return pd.DataFrame([{"id": c.id, "name": c.name, "coarse": c.coarse,
                              "coarse_name": self.coarse_names[c.coarse], "split": c.split, **c.attrs}
                             for c in self.cases])

    def _check_ids(self, case_ids: Sequence[int]) -> Tensor:
        ids = torch.as_tensor(list(case_ids), dtype=torch.long)
        if ids.ndim != 1 or len(ids) == 0:
            raise LofaError(f"{self.task}: case_ids must be a non-empty 1-D sequence of ints")
        if ids.min() < 0 or ids.max() >= len(self.cases):
            raise LofaError(f"{self.task}: case ids must lie in [0, {len(self.cases)}); got {ids.min()}..{ids.max()}")
        return ids

    # -- prompts -----------------------------------------------------------------------------------

    def n_prompts(self, split: str) -> int:
        """Number of fine-grained phrasings per case in a prompt split ("train" or the reserved "eval")."""
        if split not in PROMPT_SPLITS:
            raise LofaError(f"unknown prompt split {split!r}; use 'train' or 'eval'")
        return len(self.TEMPLATES[split]) * self.SYNONYM_SETS[split]

    def prompt(self, case_id: int, variant: int, split: str = "train", **extra) -> str:
        """Fine-grained prompt of a case. Variant v uses template v % n_templates and synonym set
        v // n_templates; "eval" templates and synonyms never occur in "train" phrasings."""
        n = self.n_prompts(split)
        if not 0 <= variant < n:
            raise LofaError(f"{self.task}: prompt variant {variant} out of range for split {split!r} (0..{n - 1})")
        case = self.cases[self._check_ids([case_id])[0]]
        templates = self.TEMPLATES[split]
        words = self._phrases(case, split, variant // len(templates), self._extra_value(extra))
        return _tidy(templates[variant % len(templates)].format(**words))

    def coarse_prompt(self, coarse: int, variant: int = 0, **extra) -> str:
        """Category-level caption (what base models are trained on). Any int variant works (taken modulo the
        number of coarse phrasings), so callers may ask for as many as they like."""
        if not 0 <= coarse < len(self.coarse_names):
            raise LofaError(f"{self.task}: coarse class {coarse} out of range (0..{len(self.coarse_names) - 1})")
        t = variant % len(self.COARSE_TEMPLATES)
        words = self._coarse_phrases(coarse, variant // len(self.COARSE_TEMPLATES), self._extra_value(extra))
        return _tidy(self.COARSE_TEMPLATES[t].format(**words))

    def _extra_value(self, extra: dict):
        unknown = set(extra) - {self.extra} if self.extra else set(extra)
        if unknown:
            raise LofaError(f"{self.task}: unknown keyword(s) {sorted(unknown)}; "
                            + (f"only {self.extra!r} is accepted" if self.extra else "none are accepted"))
        return extra.get(self.extra) if self.extra else None

    def sample(self, case_ids: Sequence[int], seed: int, split: str = "train", level: str = "fine"
               ) -> tuple[Tensor, list[str]]:
        """Renders with captions that describe them, one random phrasing each: (x like `render`, N prompts).

        Beyond `render` + `prompt`, the captions also name the per-sample description (styles: which content
        moves; identities: hat / sunglasses context), so a model can learn those words. level "fine" uses
        `prompt(…, split)` (split "train" | "eval"), level "coarse" uses `coarse_prompt`.
        """
        ids = self._check_ids(case_ids).tolist()
        g = torch.Generator().manual_seed(seed)
        extras = self._random_extras(len(ids), g)
        kw = {self.extra: extras} if self.extra else {}
        x = self.render(ids, seed, **kw)
        prompts = []
        for i, c in enumerate(ids):
            one = {self.extra: extras[i]} if self.extra else {}
            if level == "coarse":
                v = int(torch.randint(len(self.COARSE_TEMPLATES) * 2, (), generator=g))
                prompts.append(self.coarse_prompt(self.cases[c].coarse, v, **one))
            elif level == "fine":
                v = int(torch.randint(self.n_prompts(split), (), generator=g))
                prompts.append(self.prompt(c, v, split, **one))
            else:
                raise LofaError(f"unknown caption level {level!r}; use 'fine' or 'coarse'")
        return x, prompts

    def _random_extras(self, n: int, g: torch.Generator) -> list | None:
        return None


def single_threaded(fn):
    """Run `fn` with one intra-op torch thread, then restore the setting. Rendering is many small elementwise ops;
    on a loaded machine a second OpenMP thread that is not scheduled stalls every op (measured on the 2-core dev
    box under load: 15 ms instead of 0.4 ms per op on 0.5 M floats), and one thread is near optimal anyway."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        if threads == 1:
            return fn(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapper


def _tidy(text: str) -> str:
    """Collapse the spaces and commas that empty phrases (single-valued components) leave behind."""
    text = re.sub(r"\s*,(\s*,)*", ",", " ".join(text.split()))
    text = re.sub(r",\s*(?=[:;.])", "", text)  # "thin outlines, : a ball" -> "thin outlines: a ball"
    return re.sub(r",(?=\S)", ", ", text).strip(" ,")


# -- drawing -------------------------------------------------------------------------------------------


def grid(h: int, w: int) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates x, y [H, W] in canvas units (canvas height 1, y down)."""
    y = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    x = (torch.arange(w, dtype=torch.float32) + 0.5) / h
    return x.expand(h, w), y[:, None].expand(h, w)


def _f(t: Tensor | float) -> Tensor:
    """Append two broadcast dims so per-shape parameters [...] meet the pixel grid [H, W]."""
    return torch.as_tensor(t, dtype=torch.float32)[..., None, None]


def sd_circle(x: Tensor, y: Tensor, cx, cy, r) -> Tensor:
    return torch.hypot(x - _f(cx), y - _f(cy)) - _f(r)


def sd_ellipse(x: Tensor, y: Tensor, cx, cy, a, b) -> Tensor:
    """Approximate SDF of an axis-aligned ellipse with semi-axes a, b (exact on the axes, good enough to draw)."""
    a, b = _f(a), _f(b)
    return (torch.hypot((x - _f(cx)) / a, (y - _f(cy)) / b) - 1) * torch.minimum(a, b)


def sd_segment(x: Tensor, y: Tensor, ax, ay, bx, by, r) -> Tensor:
    """Capsule of radius r around the segment a-b."""
    ax, ay, bx, by = _f(ax), _f(ay), _f(bx), _f(by)
    pax, pay, bax, bay = x - ax, y - ay, bx - ax, by - ay
    h = ((pax * bax + pay * bay) / (bax * bax + bay * bay).clamp_min(1e-12)).clamp(0, 1)
    return torch.hypot(pax - bax * h, pay - bay * h) - _f(r)


def sd_box(x: Tensor, y: Tensor, cx, cy, hw, hh, radius=0.0) -> Tensor:
    """Axis-aligned box with half sizes hw, hh and rounded corners of the given radius."""
    radius = _f(radius)
    qx = (x - _f(cx)).abs() - _f(hw) + radius
    qy = (y - _f(cy)).abs() - _f(hh) + radius
    outside = torch.hypot(qx.clamp_min(0), qy.clamp_min(0))
    return outside + torch.maximum(qx, qy).clamp_max(0) - radius


def sd_polygon(x: Tensor, y: Tensor, vx: Tensor, vy: Tensor) -> Tensor:
    """Exact SDF of a closed polygon with vertices vx, vy [..., K] (any winding, K small)."""
    d = None
    inside = None
    k = vx.shape[-1]
    for i in range(k):
        ax, ay = _f(vx[..., i]), _f(vy[..., i])
        bx, by = _f(vx[..., (i + 1) % k]), _f(vy[..., (i + 1) % k])
        edge = sd_segment(x, y, vx[..., i], vy[..., i], vx[..., (i + 1) % k], vy[..., (i + 1) % k], 0.0)
        d = edge if d is None else torch.minimum(d, edge)
        crosses = ((ay > y) != (by > y)) & (x < (bx - ax) * (y - ay) / (by - ay + 1e-12) + ax)
        inside = crosses if inside is None else inside ^ crosses
    return torch.where(inside, -d, d)


def coverage(sd: Tensor, pixel: float) -> Tensor:
    """Antialiased alpha of a shape from its SDF; pixel = canvas units per pixel (1 / H)."""
    return (0.5 - sd / pixel).clamp(0, 1)


def paint(canvas: Tensor, alpha: Tensor, colour: Tensor) -> Tensor:
    """Alpha-composite a flat colour [..., 3] with alpha [..., H, W] over canvas [..., 3, H, W]."""
    return torch.lerp(canvas, colour[..., :, None, None].expand_as(canvas), alpha.unsqueeze(-3))


def to_signed(rgb: Tensor) -> Tensor:
    """[0, 1] colours -> the project's [-1, 1] pixel range."""
    return (rgb.clamp(0, 1) * 2 - 1).contiguous()


def uniform(g: torch.Generator, lo: float, hi: float, *shape: int) -> Tensor:
    return lo + (hi - lo) * torch.rand(*shape, generator=g)


def contrasting_pair(g: torch.Generator, n: int) -> tuple[Tensor, Tensor]:
    """Random background and foreground colours [n, 3] in [0, 1] whose luminances differ by at least 0.35."""
    dark_bg = torch.rand(n, generator=g) < 0.5
    bg = torch.rand(n, 3, generator=g)
    fg = torch.rand(n, 3, generator=g)
    bg = torch.where(dark_bg[:, None], bg * 0.35, 0.55 + bg * 0.45)
    fg = torch.where(dark_bg[:, None], 0.65 + fg * 0.35, fg * 0.4)
    return bg, fg
