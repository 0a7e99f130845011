"""Styles world (paper: text-to-video stylization). Simple animated content — a ball, box, triangle or diamond that
bounces, slides, circles or pulses — rendered in compositional styles: palette × fill texture × stroke / edge
treatment (× background treatment at `full`: plain, grid paper, ruled lines, a dot grid or a vignette, all drawn
in the palette's ink). Coarse class = the palette's family (warm, cool, pastel, neon, earth, mono): the base model
learns colour moods, the LoRA has to learn the exact style.

Content varies per sample and is not part of the case. Prompts are content + style words:
- `prompt(case, variant)` describes the content generically ("a moving shape, in sunset colours with striped
  fill and glowing edges"), so it is true of every `render` of the case;
- `render(..., content=[...])` pins each sample's content ("ball-bouncing", see `world.contents`) and
  `prompt(..., content="ball-bouncing")` names it ("a ball bouncing, in sunset colours ..."); `sample()` does
  both at once, giving captions that name the content.
The condition is a style reference IMAGE [N, 3, H, W]: a still life of two *other* shapes (star, ring, cross,
hexagon), never used as video content, drawn in the case's style.

Appearance varies per sample: content, object size, path and speed, pattern phase and period, colour jitter.
Speed (one CPU thread): 256 mini clips (8 × 32 × 32) render in ≈ 0.35 s, 256 reference images in ≈ 0.09 s on the
2-core dev machine under load. A small 3D CNN trained on renders names the exact style of fresh renders 99.75 % of
the time at mini (120 styles); not measured at full (2520 styles).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lofa.errors import LofaError
from lofa.worlds.world import (World, coverage, grid, pick, sd_box, sd_polygon, single_threaded, to_signed,
                              uniform)

# name -> (family, background, primary, secondary, ink, accent), RGB in [0, 1]
PALETTES = {
    "sunset": ("warm", (0.99, 0.88, 0.66), (0.92, 0.30, 0.12), (0.99, 0.74, 0.10),
               (0.35, 0.05, 0.10), (1.0, 0.45, 0.15)),
    "ember": ("warm", (0.28, 0.05, 0.05), (0.96, 0.42, 0.08), (1.0, 0.86, 0.30),
              (1.0, 0.93, 0.78), (1.0, 0.25, 0.05)),
    "ocean": ("cool", (0.82, 0.92, 0.98), (0.08, 0.30, 0.72), (0.20, 0.80, 0.84),
              (0.02, 0.08, 0.25), (0.25, 0.65, 1.0)),
    "arctic": ("cool", (0.08, 0.14, 0.30), (0.30, 0.62, 0.95), (0.90, 0.96, 1.0),
               (0.75, 1.0, 1.0), (0.45, 0.90, 1.0)),
    "candy": ("pastel", (0.99, 0.93, 0.96), (0.96, 0.55, 0.72), (0.58, 0.80, 0.98),
              (0.55, 0.25, 0.45), (0.95, 0.35, 0.65)),
    "mint": ("pastel", (0.92, 0.98, 0.93), (0.50, 0.84, 0.66), (0.99, 0.88, 0.55),
             (0.20, 0.42, 0.32), (0.20, 0.75, 0.55)),
    "neon": ("neon", (0.05, 0.02, 0.12), (1.0, 0.10, 0.78), (0.10, 1.0, 0.92),
             (0.92, 0.92, 1.0), (1.0, 0.25, 0.95)),
    "acid": ("neon", (0.03, 0.07, 0.03), (0.60, 1.0, 0.05), (0.50, 0.12, 0.65),
             (0.85, 1.0, 0.80), (0.55, 1.0, 0.15)),
    "desert": ("earth", (0.88, 0.79, 0.60), (0.55, 0.30, 0.14), (0.95, 0.68, 0.25),
               (0.22, 0.13, 0.06), (0.80, 0.50, 0.20)),
    "moss": ("earth", (0.30, 0.26, 0.17), (0.46, 0.62, 0.24), (0.82, 0.66, 0.35),
             (0.95, 0.92, 0.75), (0.60, 0.80, 0.30)),
    "ink": ("mono", (0.96, 0.96, 0.93), (0.15, 0.15, 0.15), (0.62, 0.62, 0.62),
            (0.0, 0.0, 0.0), (0.40, 0.40, 0.40)),
    "noir": ("mono", (0.07, 0.07, 0.07), (0.88, 0.88, 0.88), (0.45, 0.45, 0.45),
             (1.0, 1.0, 1.0), (0.95, 0.95, 0.95)),
}
FAMILIES = ("warm", "cool", "pastel", "neon", "earth", "mono")
TEXTURES = ("solid", "stripes", "dots", "checker", "gradient", "diagonal", "rings")
STROKES = ("none", "outline", "glow", "shadow", "thick", "double")
BACKGROUNDS = ("plain", "grid", "ruled", "dotted", "vignette")   # only `full` uses more than "plain"
SHAPES = ("ball", "box", "triangle", "diamond")          # video content
MOTIONS = ("bouncing", "sliding", "circling", "pulsing")
REFERENCE_SHAPES = ("star", "ring", "cross", "hexagon")  # reference-image content, never in videos
ALL_SHAPES = SHAPES + REFERENCE_SHAPES
PERIOD = 0.15                                             # pattern period, canvas units (≈ 5 px at 32)


@dataclass
class StylesConfig:
    """Sizes, style vocabularies (subsets of the tables above), content vocabularies and the held-out fraction."""

    frames: int = field(default=8, metadata={"help": "Frames T of every clip."})
    height: int = field(default=32, metadata={
        "help": "Height H of clips and reference images, in pixels; sizes and positions are drawn in units of it."})
    width: int = field(default=32, metadata={"help": "Width W of clips and reference images, in pixels."})
    palettes: tuple = field(default=("sunset", "ocean", "candy", "neon", "desert", "ink"), metadata={
        "help": "Colour palettes of the style space (names in PALETTES); a style's coarse class is its palette's "
                "family."})
    textures: tuple = field(default=("solid", "stripes", "dots", "checker", "gradient"), metadata={
        "help": "Fill textures of the style space (names in TEXTURES)."})
    strokes: tuple = field(default=("none", "outline", "glow", "shadow"), metadata={
        "help": "Edge treatments of the style space (names in STROKES)."})
    backgrounds: tuple = field(default=("plain",), metadata={
        "help": "Background treatments of the style space (names in BACKGROUNDS); with a single one, case names "
                "and prompts leave it out."})
    shapes: tuple = field(default=SHAPES, metadata={
        "help": "Shapes that move in the clips (names in SHAPES): per-sample content, not part of a style."})
    motions: tuple = field(default=MOTIONS, metadata={
        "help": "How those shapes move (names in MOTIONS): per-sample content, not part of a style."})
    heldout_fraction: float = field(default=0.2, metadata={
        "help": "Fraction of the styles held out (rounded up), chosen so that every palette, texture, stroke, "
                "background and family keeps a training case (`heldout_split`)."})

    PRESETS: ClassVar[dict] = {
        "smoke": {"height": 16, "width": 16, "palettes": ("sunset", "ocean", "neon"),
                  "textures": ("solid", "stripes", "dots"), "strokes": ("none", "outline", "glow")},   # 27 styles
        "mini": {},                                                                                     # 120 styles
        "full": {"palettes": tuple(PALETTES), "textures": TEXTURES, "strokes": STROKES,
                 "backgrounds": BACKGROUNDS},
        # full: 12 palettes x 7 textures x 6 strokes x 5 backgrounds = 2520 styles (2016 train / 504 held out)
    }


PALETTE_WORDS = {
    "sunset": ["sunset", "warm sunset", "evening sky"], "ember": ["ember", "smouldering ember", "fiery"],
    "ocean": ["ocean", "sea blue", "marine"], "arctic": ["arctic", "icy", "polar"],
    "candy": ["candy", "sweet pastel", "bubblegum"], "mint": ["mint", "fresh mint", "spearmint"],
    "neon": ["neon", "electric", "fluorescent"], "acid": ["acid green", "toxic lime", "radioactive"],
    "desert": ["desert", "sandy", "dune"], "moss": ["moss", "mossy forest", "woodland"],
    "ink": ["black ink", "pen and paper", "inkwell"], "noir": ["noir", "film noir", "dark monochrome"],
}
TEXTURE_WORDS = {
    "solid": ["flat solid", "plain filled", "uniformly filled"],
    "stripes": ["striped", "banded", "horizontally lined"],
    "dots": ["polka-dot", "dotted", "spotted"], "checker": ["checkered", "chequerboard", "tiled"],
    "gradient": ["gradient", "shaded", "softly blended"],
    "diagonal": ["diagonally striped", "slanted-stripe", "hatched"],
    "rings": ["ring-patterned", "concentric-circle", "target-patterned"],
}
STROKE_WORDS = {
    "none": ["no outlines", "borderless shapes", "edgeless shapes"],
    "outline": ["thin outlines", "inked edges", "contour lines"],
    "glow": ["glowing edges", "a soft glow", "a luminous halo"],
    "shadow": ["drop shadows", "cast shadows", "offset shadows"],
    "thick": ["thick outlines", "heavy borders", "bold contours"],
    "double": ["double outlines", "twin contour lines", "doubled edges"],
}
BACKGROUND_WORDS = {"plain": ["on a plain background", "on a flat backdrop", "against a blank backdrop"],
                    "grid": ["on grid paper", "over a grid", "against a squared grid"],
                    "ruled": ["on ruled paper", "over horizontal lines", "against lined notepaper"],
                    "dotted": ["on dot-grid paper", "over a grid of dots", "against a dotted backdrop"],
                    "vignette": ["with a vignette", "with shaded corners", "framed by a soft vignette"]}
FAMILY_WORDS = {"warm": ["warm", "warm-toned"], "cool": ["cool", "cool-toned"], "pastel": ["pastel", "soft pastel"],
                "neon": ["neon", "bright neon"], "earth": ["earthy", "earth-toned"],
                "mono": ["monochrome", "greyscale"]}
SHAPE_WORDS = {"ball": ["a ball", "a round ball", "a sphere"], "box": ["a box", "a square block", "a cube"],
               "triangle": ["a triangle", "a triangular shape", "a wedge"],
               "diamond": ["a diamond", "a rhombus", "a lozenge"]}
MOTION_WORDS = {"bouncing": ["bouncing", "hopping", "bounding along"],
                "sliding": ["sliding sideways", "gliding across", "drifting across"],
                "circling": ["moving in a circle", "orbiting", "going round in a loop"],
                "pulsing": ["growing and shrinking", "pulsing", "throbbing"]}
GENERIC_CONTENT = ["a moving shape", "an animated shape", "a shape in motion"]


class StylesWorld(World):
    """Stylized clips [N, 3, T, H, W]; style reference images [N, 3, H, W] of different content."""

    task = "styles"
    modality = "video"
    extra = "content"
    TEMPLATES = {
        "train": ["{content}, in {palette} colours with {texture} fill and {stroke}, {bg}",
                  "{content} drawn in a {texture} {palette} style with {stroke}, {bg}",
                  "{palette} palette, {texture} texture, {stroke}, {bg}: {content}"],
        "eval": ["{content}, rendered in {palette} tones using {texture} patterns and {stroke}, {bg}"],
    }
    COARSE_TEMPLATES = ["{content} in {family} colours", "{content}, {family} palette",
                        "an animation of {content} in {family} tones"]

    def __init__(self, cfg: StylesConfig, seed: int = 0):
        super().__init__(cfg, seed)
        vocab = {"palette": cfg.palettes, "texture": cfg.textures, "stroke": cfg.strokes,
                 "background": cfg.backgrounds, "shape": cfg.shapes, "motion": cfg.motions}
        tables = {"palette": PALETTES, "texture": TEXTURES, "stroke": STROKES, "background": BACKGROUNDS,
                  "shape": SHAPES, "motion": MOTIONS}
        for k, values in vocab.items():
            if not values or len(set(values)) != len(values) or any(v not in tables[k] for v in values):
                raise LofaError(f"styles: bad {k} vocabulary {list(values)}; choose distinct values from "
                                f"{list(tables[k])}")
        self.vocab = vocab
        self.contents = [f"{s}-{m}" for s in cfg.shapes for m in cfg.motions]
        style_keys = ("palette", "texture", "stroke", "background")
        combos = [{}]
        for k in style_keys:
            combos = [{**a, k: v} for a in combos for v in vocab[k]]
        varying = [k for k in style_keys if len(vocab[k]) > 1]
        names = ["-".join(a[k] for k in varying) for a in combos]
        self.coarse_names = [f for f in FAMILIES if any(PALETTES[p][0] == f for p in cfg.palettes)]
        self._finish(names, combos, [self.coarse_names.index(PALETTES[a["palette"]][0]) for a in combos])
        a = [c.attrs for c in self.cases]
        self._colours = torch.tensor([PALETTES[x["palette"]][1:] for x in a])        # [C, 5, 3]
        self._texture = torch.tensor([TEXTURES.index(x["texture"]) for x in a])
        self._stroke = torch.tensor([STROKES.index(x["stroke"]) for x in a])
        self._background = torch.tensor([BACKGROUNDS.index(x["background"]) for x in a])

    # -- content ----------------------------------------------------------------------------------

    def _content_ids(self, n: int, content, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """(shape index into ALL_SHAPES, motion index into MOTIONS) [n] each: given, or random. The random draw
        happens either way, so pinning a sample's content to its random choice leaves the render unchanged."""
        drawn = self._random_extras(n, g)
        content = drawn if content is None else list(content)
        if len(content) != n or any(c not in self.contents for c in content):
            raise LofaError(f"styles: content must list one of {self.contents} per sample ({n} samples)")
        shapes = torch.tensor([ALL_SHAPES.index(c.split("-")[0]) for c in content])
        motions = torch.tensor([MOTIONS.index(c.split("-")[1]) for c in content])
        return shapes, motions

    def _random_extras(self, n: int, g: torch.Generator) -> list[str]:
        return [self.contents[i] for i in torch.randint(len(self.contents), (n,), generator=g).tolist()]

    # -- drawing ----------------------------------------------------------------------------------

    @single_threaded
    def render(self, case_ids: Sequence[int], seed: int, content: Sequence[str] | None = None) -> Tensor:
        """Clips [N, 3, T, H, W] in [-1, 1]. content: one of `self.contents` per sample, or None for random
        content; everything else about appearance is random per sample, deterministic given the arguments."""
        ids = self._check_ids(case_ids)
        n, (t_len, h, w) = len(ids), (self.cfg.frames, self.cfg.height, self.cfg.width)
        g = torch.Generator().manual_seed(seed)
        shape, motion = self._content_ids(n, content, g)
        t = ((torch.arange(t_len, dtype=torch.float32) + 0.5) / t_len)[None]                      # [1, T]
        width = w / h
        size = uniform(g, 0.2, 0.26, n)[:, None]
        heading = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)[:, None]
        travel = uniform(g, 0.5, 1.0, n)[:, None] * (width - 2 * size - 0.06)
        x_start = width / 2 - heading * travel / 2
        x_lin = x_start + heading * travel * t                                                       # [N, T]
        floor = 1 - size - 0.03
        hops = torch.randint(1, 3, (n, 1), generator=g).float()
        hop_h = uniform(g, 0.25, 0.45, n)[:, None]
        y_fixed = uniform(g, 0.4, 0.6, n)[:, None]
        orbit = uniform(g, 0.1, 0.16, n)[:, None]
        angle0 = uniform(g, 0, 2 * math.pi, n)[:, None]
        turns = heading * uniform(g, 0.6, 1.0, n)[:, None]
        pulse_phase = uniform(g, 0, 2 * math.pi, n)[:, None]
        jitter = uniform(g, -0.08, 0.08, n, 2)
        orbit_angle = angle0 + 2 * math.pi * turns * t
        still = torch.ones_like(x_lin)
        paths = {  # motion -> centre x, centre y, size factor, each [N, T]
            "bouncing": (x_lin, floor - hop_h * torch.sin(math.pi * hops * t).abs(), still),
            "sliding": (x_lin, y_fixed * still, still),
            "circling": (width / 2 + orbit * torch.cos(orbit_angle), 0.5 + orbit * torch.sin(orbit_angle), still),
            "pulsing": ((width / 2 + jitter[:, :1]) * still, (0.5 + jitter[:, 1:]) * still,
                        0.95 + 0.15 * torch.sin(2 * math.pi * t + pulse_phase)),
        }
        cx, cy, grow = (torch.stack([paths[k][i] for k in MOTIONS])[motion, torch.arange(n)] for i in range(3))
        r = size * grow
        objects = [(shape, cx, cy, r, uniform(g, -0.15, 0.15, n)[:, None].expand(n, t_len))]
        canvas = self._draw(ids, objects, g, t_len)
        return to_signed(canvas.permute(0, 2, 1, 3, 4))

    @single_threaded
    def condition(self, case_ids: Sequence[int], seed: int) -> Tensor:
        """Style reference images [N, 3, H, W] in [-1, 1]: two static reference shapes (not video content) in the
        case's style, random shapes, sizes and places per sample."""
        ids = self._check_ids(case_ids)
        n, width = len(ids), self.cfg.width / self.cfg.height
        g = torch.Generator().manual_seed(seed)
        objects = []
        flip = torch.rand(n, generator=g) < 0.5                   # which diagonal the two shapes sit on
        for side in (0.28, 0.72):
            shape = len(SHAPES) + torch.randint(len(REFERENCE_SHAPES), (n,), generator=g)
            r = uniform(g, 0.16, 0.2, n)[:, None]
            cx = width * side + uniform(g, -0.04, 0.04, n)[:, None]
            cy = torch.where(flip, 1 - side, side)[:, None] + uniform(g, -0.04, 0.04, n)[:, None]
            objects.append((shape, cx, cy, r, uniform(g, -0.3, 0.3, n)[:, None]))
        return to_signed(self._draw(ids, objects, g, 1)[:, 0])

    def _draw(self, ids: Tensor, objects: list, g: torch.Generator, t_len: int) -> Tensor:
        """Canvas [N, T, 3, H, W] in [0, 1]: background, then per object under-layer (glow / shadow), textured fill
        and over-layer (outlines). objects: (shape [N], cx, cy, r, angle [N, T] or [N, 1])."""
        n, h, w = len(ids), self.cfg.height, self.cfg.width
        px = 1 / h
        x, y = grid(h, w)
        colours = (self._colours[ids] + 0.03 * torch.randn(n, 5, 3, generator=g)) \
            * uniform(g, 0.93, 1.07, n)[:, None, None]
        bg, primary, secondary, ink, accent = (colours[:, i].clamp(0, 1) for i in range(5))
        texture, stroke, background = self._texture[ids], self._stroke[ids], self._background[ids]
        period = PERIOD * uniform(g, 0.9, 1.1, n)
        offset = torch.rand(n, 2, generator=g)

        canvas = bg[:, None, :, None, None].expand(n, t_len, 3, h, w)
        cell = 0.25
        to_line = cell * (0.5 - (torch.frac(torch.stack([x, y]) / cell) - 0.5).abs()).amin(0)      # [H, W]
        lines = coverage(to_line - 0.5 * px, px)
        grid_alpha = 0.35 * lines * (background == BACKGROUNDS.index("grid"))[:, None, None]
        canvas = _over(canvas, grid_alpha[:, None].expand(n, t_len, h, w), ink)
        canvas = _backdrop(canvas, background, x, y, w / h, px, ink)
        shift = max(1, round(0.06 * h))
        for shape, cx, cy, r, angle in objects:
            cx, cy, r, angle = (v.expand(n, t_len) for v in (cx, cy, r, angle))
            sd, u, v = _shape_sdf(x, y, shape, cx, cy, r, angle)                                 # [N, T, H, W]
            outside = sd.clamp_min(0)
            glow = 0.9 * torch.exp(-outside / 0.045) * (sd > 0)
            shadow = 0.75 * coverage(_shift(sd, shift), px)
            under = torch.where(_is(stroke, "glow"), glow, torch.where(_is(stroke, "shadow"), shadow, 0.0))
            canvas = _over(canvas, under, torch.where((stroke == STROKES.index("glow"))[:, None], accent, ink))
            mix = _texture(texture, u, v, r, period, offset, px)
            fill = torch.lerp(primary[:, None, :, None, None], secondary[:, None, :, None, None], mix.unsqueeze(2))
            canvas = torch.lerp(canvas, fill, coverage(sd, px).unsqueeze(2))
            band = lambda c, half: coverage((sd - c).abs() - half, px)
            over = torch.where(_is(stroke, "outline"), band(0, 0.022), torch.where(
                _is(stroke, "thick"), band(0.008, 0.036), torch.where(
                    _is(stroke, "double"), torch.maximum(band(0, 0.018), band(0.075, 0.018)), 0.0)))
            canvas = _over(canvas, over, ink)
        return canvas

    # -- prompts ----------------------------------------------------------------------------------

    def _content_words(self, content: str | None, split: str, j: int) -> str:
        if content is None:
            return pick(GENERIC_CONTENT, split, j)
        if content not in self.contents:
            raise LofaError(f"styles: unknown content {content!r}; choose one of {self.contents}")
        shape, motion = content.split("-")
        return f"{pick(SHAPE_WORDS[shape], split, j)} {pick(MOTION_WORDS[motion], split, j)}"

    def _phrases(self, case, split: str, j: int, content) -> dict[str, str]:
        a = case.attrs
        return {"content": self._content_words(content, split, j),
                "palette": pick(PALETTE_WORDS[a["palette"]], split, j),
                "texture": pick(TEXTURE_WORDS[a["texture"]], split, j),
                "stroke": pick(STROKE_WORDS[a["stroke"]], split, j),
                "bg": pick(BACKGROUND_WORDS[a["background"]], split, j) if len(self.vocab["background"]) > 1 else ""}

    def _coarse_phrases(self, coarse: int, j: int, content) -> dict[str, str]:
        return {"content": self._content_words(content, "train", j),
                "family": pick(FAMILY_WORDS[self.coarse_names[coarse]], "train", j)}


def _backdrop(canvas: Tensor, background: Tensor, x: Tensor, y: Tensor, width: float, px: float, ink: Tensor
              ) -> Tensor:
    """The `full` backgrounds beyond plain and grid, in ink over the canvas [N, T, 3, H, W]: ruled (a horizontal
    line every 0.125, twice as dense as the grid and with no verticals), dotted (dots of radius 0.045 every 0.2)
    and vignette (ink creeping in from the edges, 0.65 at the corners). Batches without them come back as they
    are, so worlds that do not list them render exactly as before."""
    n, t_len, _, h, w = canvas.shape
    for name in ("ruled", "dotted", "vignette"):
        sel = background == BACKGROUNDS.index(name)
        if not sel.any():
            continue
        if name == "ruled":
            alpha = 0.4 * coverage(0.125 * (0.5 - (torch.frac(y / 0.125) - 0.5).abs()) - 0.5 * px, px)
        elif name == "dotted":
            dx, dy = torch.frac(x / 0.2) - 0.5, torch.frac(y / 0.2) - 0.5
            alpha = 0.55 * coverage(0.2 * torch.hypot(dx, dy) - 0.045, px)
        else:
            alpha = 0.65 * ((torch.hypot(x - width / 2, y - 0.5) - 0.3) / 0.4).clamp(0, 1)
        canvas = _over(canvas, (alpha * sel[:, None, None]).unsqueeze(1).expand(n, t_len, h, w), ink)
    return canvas


def _is(index: Tensor, name: str) -> Tensor:
    """[N] bool mask of samples whose stroke is `name`, broadcast to [N, 1, 1, 1]."""
    return (index == STROKES.index(name))[:, None, None, None]


def _over(canvas: Tensor, alpha: Tensor, colour: Tensor) -> Tensor:
    """Composite per-sample colour [N, 3] with alpha [N, T, H, W] over canvas [N, T, 3, H, W]."""
    return torch.lerp(canvas, colour[:, None, :, None, None].expand_as(canvas), alpha.unsqueeze(2))


def _shift(sd: Tensor, k: int) -> Tensor:
    """The field moved k pixels right and down (a drop shadow's shape), filling with 'outside'."""
    return F.pad(sd, (k, 0, k, 0), value=1.0)[..., : sd.shape[-2], : sd.shape[-1]]


def _shape_sdf(x: Tensor, y: Tensor, shape: Tensor, cx: Tensor, cy: Tensor, r: Tensor, angle: Tensor
               ) -> tuple[Tensor, Tensor, Tensor]:
    """SDF [N, T, H, W] of each sample's shape (index into ALL_SHAPES) of size r, turned by angle, and the local
    coordinates u, v [N, T, H, W] its texture is drawn in (texture turns with the shape)."""
    c, s = torch.cos(angle)[..., None, None], torch.sin(angle)[..., None, None]
    dx, dy = x - cx[..., None, None], y - cy[..., None, None]
    u, v = c * dx + s * dy, -s * dx + c * dy
    z = torch.zeros_like(r)
    sd = torch.empty(u.shape)
    for k, name in enumerate(ALL_SHAPES):
        sel = shape == k
        if not sel.any():
            continue
        us, vs, rs, zs = u[sel], v[sel], r[sel], z[sel]
        if name == "ball":
            d = torch.hypot(us, vs) - rs[..., None, None]
        elif name == "box":
            d = sd_box(us, vs, zs, zs, 0.84 * rs, 0.84 * rs, 0.12 * rs)
        elif name == "ring":
            d = (torch.hypot(us, vs) - 0.72 * rs[..., None, None]).abs() - 0.3 * rs[..., None, None]
        elif name == "cross":
            d = torch.minimum(sd_box(us, vs, zs, zs, rs, 0.36 * rs), sd_box(us, vs, zs, zs, 0.36 * rs, rs))
        else:
            radii, turn = {"triangle": ((1.2,), -math.pi / 2), "diamond": ((1.15, 0.85), -math.pi / 2),
                           "star": ((1.2, 0.5), -math.pi / 2), "hexagon": ((1.05,), 0.0)}[name]
            k_vert = {"triangle": 3, "diamond": 4, "star": 10, "hexagon": 6}[name]
            theta = turn + 2 * math.pi * torch.arange(k_vert) / k_vert
            rad = torch.tensor([radii[i % len(radii)] for i in range(k_vert)])
            shift_y = 0.2 * rs[..., None] if name == "triangle" else 0.0       # centre the triangle's mass
            d = sd_polygon(us, vs, rs[..., None] * rad * torch.cos(theta),
                           rs[..., None] * rad * torch.sin(theta) + shift_y)
        sd[sel] = d
    return sd, u, v


def _texture(texture: Tensor, u: Tensor, v: Tensor, r: Tensor, period: Tensor, offset: Tensor, px: float
             ) -> Tensor:
    """Mix weight [N, T, H, W] in [0, 1] between the primary and secondary colour of each sample's fill texture;
    antialiased to about a pixel. r [N, T] shape size, period [N], offset [N, 2] pattern phase."""
    p = period[:, None, None, None]
    ou, ov = offset[:, 0, None, None, None], offset[:, 1, None, None, None]
    sharp = p / (2 * math.pi * px)             # turns a unit sine into a band with ~1 pixel soft edges
    out = torch.zeros_like(u)
    for k, name in enumerate(TEXTURES):
        sel = texture == k
        if not sel.any() or name == "solid":
            continue
        us, vs, ps, a, b, sh = u[sel], v[sel], p[sel], ou[sel], ov[sel], sharp[sel]
        band = lambda s: (0.5 + torch.sin(2 * math.pi * s) * sh).clamp(0, 1)
        if name == "stripes":
            m = band(vs / ps + a)
        elif name == "diagonal":
            m = band((us + vs) / (ps * 1.2) + a)
        elif name == "rings":      # a centred bullseye, finer than the other patterns so it reads as rings
            m = band(torch.hypot(us, vs) / (0.65 * ps) + 0.25)
        elif name == "checker":
            m = (0.5 + torch.sin(2 * math.pi * (us / (1.6 * ps) + a)) * torch.sin(2 * math.pi * (vs / (1.6 * ps) + b))
                 * sh * 3).clamp(0, 1)
        elif name == "dots":
            du = torch.frac(us / ps + a) - 0.5
            dv = torch.frac(vs / ps + b) - 0.5
            m = coverage(torch.hypot(du, dv) * ps - 0.28 * ps, px)
        else:  # gradient: top to bottom across the shape
            rs = r[sel][..., None, None]
            m = ((vs + rs) / (2 * rs)).clamp(0, 1)
        out[sel] = m
    return out
