"""Identities world (paper: identity-personalized images, DreamBooth LoRAs on SDXL, FFHQ). Procedural faces whose
identity is a combination of attributes: face shape, skin tone, hair style and colour, eye shape and colour,
brows, nose, mouth, facial hair and an accessory (glasses / earrings). Identities are drawn at random from the
attribute space (seeded by the world seed), any two differing in at least `min_distance` attributes, two of them
among the salient ones (face shape, skin, hair style, hair colour, facial hair, accessory), so they stay
distinguishable at 32 × 32. Coarse class = skin family × hair-colour family (light / dark skin × dark / light /
dyed hair): the base model learns the broad look, the LoRA has to learn the person.

Identity attributes and everything else are kept apart. Per render (random, seeded): head pose (offset, tilt,
scale, a small turn that shifts the features), expression (smile or frown, open mouth, eye openness, brow
raise), background colour and gradient, shirt colour, lighting. Prompt context is separate again: `render` shows
no context unless asked — `render(..., context=["hat", "", "sunglasses", ...])` draws it, and
`prompt(..., context="hat")` says it ("a photo of [V] person wearing a hat"); `sample()` does both at random.
Prompts are DreamBooth-style with the literal "[V]" token and are the same for every identity.
The condition is one reference face per sample [N, 3, H, W]: neutral pose and expression, plain grey background,
grey shirt, no context (the seed is accepted for API symmetry; the reference is canonical).

Speed (one CPU thread): 256 mini images (32 × 32) render in ≈ 0.09 s on the 2-core dev machine under load. A small
CNN trained on renders names the exact identity of fresh renders 100 % of the time at mini (160 identities) and
99.9 % at full when full had 1200 (not re-measured at 2600).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch
from torch import Tensor

from lofa.errors import LofaError
from lofa.worlds.world import (World, coverage, grid, pick, sd_box, sd_circle, sd_ellipse, sd_segment,
                              single_threaded, to_signed, uniform)

# face shape -> (half width, half height, superellipse exponent, chin taper); face-local units (canvas height 1)
FACE_SHAPES = {"round": (0.205, 0.235, 2.0, 0.0), "oval": (0.18, 0.25, 2.0, 0.15), "long": (0.16, 0.27, 2.3, 0.1),
               "square": (0.2, 0.235, 3.8, 0.0), "heart": (0.21, 0.245, 2.3, 0.42), "wide": (0.235, 0.215, 2.6, 0.05)}
SKINS = {"porcelain": ((0.98, 0.87, 0.80), "light"), "fair": ((0.94, 0.77, 0.64), "light"),
         "beige": ((0.86, 0.66, 0.50), "light"), "olive": ((0.78, 0.62, 0.42), "light"),
         "tan": ((0.70, 0.49, 0.33), "dark"), "brown": ((0.53, 0.34, 0.21), "dark"),
         "dark": ((0.37, 0.23, 0.15), "dark"), "ebony": ((0.25, 0.15, 0.10), "dark")}
HAIR_COLOURS = {"black": ((0.07, 0.06, 0.06), "dark"), "brown": ((0.38, 0.22, 0.10), "dark"),
                "blonde": ((0.95, 0.82, 0.45), "light"), "red": ((0.80, 0.30, 0.08), "light"),
                "grey": ((0.68, 0.68, 0.68), "light"), "white": ((0.96, 0.96, 0.94), "light"),
                "blue": ((0.20, 0.40, 0.95), "dyed"), "pink": ((0.98, 0.45, 0.70), "dyed")}
HAIR_STYLES = ("bald", "short", "bob", "long", "bun", "curly", "mohawk", "ponytail", "side_part")
EYE_COLOURS = {"brown": (0.35, 0.18, 0.07), "blue": (0.15, 0.45, 0.90), "green": (0.20, 0.62, 0.25),
               "grey": (0.55, 0.60, 0.66), "amber": (0.85, 0.55, 0.10)}
EYE_SHAPES = {"round": (0.042, 0.038), "almond": (0.054, 0.027), "small": (0.032, 0.026)}  # semi-axes
BROWS = {"thin": (0.011, 0.0), "thick": (0.022, 0.0), "arched": (0.014, 0.03)}             # half width, arch
NOSES = ("button", "long", "broad")
MOUTHS = {"thin": (0.065, 0.011), "full": (0.065, 0.021), "wide": (0.095, 0.014)}           # half width, thickness
FACIAL_HAIR = ("none", "moustache", "beard", "goatee")
ACCESSORIES = ("none", "glasses", "earrings", "glasses_earrings")
CONTEXTS = ("hat", "sunglasses")
SALIENT = ("face_shape", "skin", "hair_style", "hair_colour", "facial_hair", "accessory")
SKIN_FAMILIES, HAIR_FAMILIES = ("light", "dark"), ("dark", "light", "dyed")


@dataclass
class IdentitiesConfig:
    """Sizes, number of identities, attribute vocabularies (subsets of the tables above), distinctness and split."""

    height: int = field(default=32, metadata={
        "help": "Height H of the face images, in pixels; the face is laid out in units of it."})
    width: int = field(default=32, metadata={"help": "Width W of the face images, in pixels."})
    n_cases: int = field(default=160, metadata={
        "help": "Number of identities, drawn from the attribute space with the world seed."})
    face_shapes: tuple = field(default=("round", "oval", "long", "square"), metadata={
        "help": "Face shapes identities draw from (names in FACE_SHAPES)."})
    skins: tuple = field(default=("porcelain", "fair", "beige", "tan", "brown", "dark"), metadata={
        "help": "Skin tones identities draw from (names in SKINS); their light / dark family is half of the coarse "
                "class."})
    hair_styles: tuple = field(default=("bald", "short", "bob", "long", "bun", "curly"), metadata={
        "help": "Hair styles identities draw from (names in HAIR_STYLES)."})
    hair_colours: tuple = field(default=("black", "brown", "blonde", "red", "grey"), metadata={
        "help": "Hair colours identities draw from (names in HAIR_COLOURS); their dark / light / dyed family is the "
                "other half of the coarse class."})
    eye_colours: tuple = field(default=("brown", "blue", "green"), metadata={
        "help": "Eye colours identities draw from (names in EYE_COLOURS)."})
    eye_shapes: tuple = field(default=tuple(EYE_SHAPES), metadata={
        "help": "Eye shapes identities draw from (names in EYE_SHAPES)."})
    brows: tuple = field(default=tuple(BROWS), metadata={"help": "Brow shapes identities draw from (names in BROWS)."})
    noses: tuple = field(default=NOSES, metadata={"help": "Nose shapes identities draw from (names in NOSES)."})
    mouths: tuple = field(default=tuple(MOUTHS), metadata={
        "help": "Mouth shapes identities draw from (names in MOUTHS)."})
    facial_hair: tuple = field(default=("none", "moustache", "beard"), metadata={
        "help": "Facial hair identities draw from (names in FACIAL_HAIR)."})
    accessories: tuple = field(default=("none", "glasses", "earrings"), metadata={
        "help": "Accessories identities draw from (names in ACCESSORIES)."})
    min_distance: int = field(default=3, metadata={
        "help": "Fewest attributes in which any two identities differ; two of them must be salient ones (SALIENT)."})
    context_prob: float = field(default=0.4, metadata={
        "help": "Chance that a sample() render shows a context (a hat or sunglasses) and its caption names it."})
    heldout_fraction: float = field(default=0.2, metadata={
        "help": "Fraction of the identities held out (rounded up), chosen so that every attribute value and coarse "
                "class keeps a training case (`heldout_split`)."})

    PRESETS: ClassVar[dict] = {
        "smoke": {"height": 16, "width": 16, "n_cases": 32},                          # 32 identities
        "mini": {},                                                                     # 160 identities
        # full: 2600 identities (2080 train / 520 held out), drawn from 6 x 8 x 9 x 8 x 5 x 3 x 3 x 3 x 3 x 4 x 4
        # attribute combinations under the same distinctness rule (the draw takes ~2 s on one CPU thread)
        "full": {"n_cases": 2600, "face_shapes": tuple(FACE_SHAPES), "skins": tuple(SKINS),
                 "hair_styles": HAIR_STYLES, "hair_colours": tuple(HAIR_COLOURS), "eye_colours": tuple(EYE_COLOURS),
                 "facial_hair": FACIAL_HAIR, "accessories": ACCESSORIES},
    }


CONTEXT_WORDS = {"": [""], "hat": ["wearing a hat", "with a hat on", "in a hat"],
                 "sunglasses": ["wearing sunglasses", "with sunglasses on", "in dark glasses"]}
SKIN_WORDS = {"light": ["light", "pale"], "dark": ["dark", "deep brown"]}
HAIR_WORDS = {"dark": ["dark", "black or brown"], "light": ["light", "fair"], "dyed": ["dyed", "brightly dyed"]}


class IdentitiesWorld(World):
    """Face images [N, 3, H, W] of procedural identities; reference faces [N, 3, H, W] as conditions."""

    task = "identities"
    modality = "image"
    extra = "context"
    SYNONYM_SETS = {"train": 1, "eval": 1}
    TEMPLATES = {
        "train": ["a photo of [V] person {ctx}", "a portrait of [V] person {ctx}", "[V] person, headshot, {ctx}",
                  "a picture of the face of [V] person {ctx}"],
        "eval": ["a close-up photograph of [V] person {ctx}", "an image showing [V] person {ctx}"],
    }
    COARSE_TEMPLATES = ["a photo of a person with {skin} skin and {hair} hair {ctx}",
                        "a portrait of someone with {hair} hair and {skin} skin {ctx}",
                        "a headshot of a person, {skin} skin, {hair} hair, {ctx}"]

    def __init__(self, cfg: IdentitiesConfig, seed: int = 0):
        super().__init__(cfg, seed)
        self.vocab = {"face_shape": cfg.face_shapes, "skin": cfg.skins, "hair_style": cfg.hair_styles,
                      "hair_colour": cfg.hair_colours, "eye_colour": cfg.eye_colours, "eye_shape": cfg.eye_shapes,
                      "brows": cfg.brows, "nose": cfg.noses, "mouth": cfg.mouths, "facial_hair": cfg.facial_hair,
                      "accessory": cfg.accessories}
        tables = {"face_shape": FACE_SHAPES, "skin": SKINS, "hair_style": HAIR_STYLES, "hair_colour": HAIR_COLOURS,
                  "eye_colour": EYE_COLOURS, "eye_shape": EYE_SHAPES, "brows": BROWS, "nose": NOSES,
                  "mouth": MOUTHS, "facial_hair": FACIAL_HAIR, "accessory": ACCESSORIES}
        for k, values in self.vocab.items():
            if not values or len(set(values)) != len(values) or any(v not in tables[k] for v in values):
                raise LofaError(f"identities: bad {k} vocabulary {list(values)}; choose distinct values from "
                                f"{list(tables[k])}")
        self.contexts = CONTEXTS
        attrs = self._sample_identities()
        families = [(s, h) for s in SKIN_FAMILIES for h in HAIR_FAMILIES
                    if any(SKINS[v][1] == s for v in cfg.skins)
                    and any(HAIR_COLOURS[v][1] == h for v in cfg.hair_colours)]
        self.coarse_names = [f"{s} skin, {h} hair" for s, h in families]
        coarse = [families.index((SKINS[a["skin"]][1], HAIR_COLOURS[a["hair_colour"]][1])) for a in attrs]
        names = [f"p{i:04d}-{a['face_shape']}-{a['skin']}-{a['hair_colour']}-{a['hair_style']}"
                 + ("" if a["accessory"] == "none" else f"-{a['accessory']}") for i, a in enumerate(attrs)]
        self._finish(names, attrs, coarse)
        self._families = families
        self._tables = tables
        # attribute codes index the full tables above, so every lookup in _draw is one gather
        self._codes = {k: torch.tensor([list(tables[k]).index(a[k]) for a in attrs]) for k in self.vocab}

    def _sample_identities(self) -> list[dict]:
        """Random attribute combinations, pairwise far apart (see module docstring); seeded by the world seed."""
        cfg, keys = self.cfg, list(self.vocab)
        salient = torch.tensor([k in SALIENT for k in keys])
        sizes = torch.tensor([len(self.vocab[k]) for k in keys])
        g = torch.Generator().manual_seed(self.seed)
        chosen = torch.empty(0, len(keys), dtype=torch.long)
        for _ in range(200):
            cand = (torch.rand(4 * cfg.n_cases, len(keys), generator=g) * sizes).long()
            for row in cand:
                diff = chosen != row
                if len(chosen) and ((diff.sum(1) < cfg.min_distance) | ((diff & salient).sum(1) < 2)).any():
                    continue
                chosen = torch.cat([chosen, row[None]])
                if len(chosen) == cfg.n_cases:
                    return [{k: self.vocab[k][int(i)] for k, i in zip(keys, r)} for r in chosen]
        raise LofaError(f"identities: could not draw {cfg.n_cases} identities {cfg.min_distance} attributes apart; "
                        f"lower n_cases or min_distance, or enlarge the attribute vocabularies")

    # -- drawing ----------------------------------------------------------------------------------

    def _random_extras(self, n: int, g: torch.Generator) -> list[str]:
        show = torch.rand(n, generator=g) < self.cfg.context_prob
        which = torch.randint(len(CONTEXTS), (n,), generator=g)
        return [CONTEXTS[int(k)] if s else "" for s, k in zip(show, which)]

    @single_threaded
    def render(self, case_ids: Sequence[int], seed: int, context: Sequence[str] | None = None) -> Tensor:
        """Faces [N, 3, H, W] in [-1, 1] with random pose, expression, background, shirt and lighting. context: per
        sample "" / "hat" / "sunglasses" (None: no context)."""
        ids = self._check_ids(case_ids)
        n = len(ids)
        g = torch.Generator().manual_seed(seed)
        if context is None:
            context = [""] * n
        if len(context) != n or any(c not in ("",) + CONTEXTS for c in context):
            raise LofaError(f"identities: context must give one of {('',) + CONTEXTS} per sample ({n} samples)")
        smile = uniform(g, -0.4, 1.0, n)
        look = {
            "cx": self.cfg.width / self.cfg.height / 2 + uniform(g, -0.06, 0.06, n),
            "cy": 0.47 + uniform(g, -0.04, 0.03, n),
            "tilt": torch.deg2rad(uniform(g, -13, 13, n)), "scale": uniform(g, 0.9, 1.07, n),
            "turn": uniform(g, -1, 1, n), "smile": smile,
            "open": (torch.rand(n, generator=g) < 0.35) & (smile > 0.3),
            "eyes_open": torch.where(torch.rand(n, generator=g) < 0.12, 0.25, uniform(g, 0.65, 1.1, n)),
            "brow_raise": uniform(g, -0.012, 0.018, n),
            "light": uniform(g, 0.92, 1.06, n), "jitter": 0.025 * torch.randn(n, 3, generator=g),
            "bg": torch.rand(n, 3, generator=g) * 0.8 + 0.1, "bg_slope": uniform(g, -0.25, 0.25, n),
            "shirt": torch.rand(n, 3, generator=g),
            "hat": torch.tensor([c == "hat" for c in context]),
            "sunglasses": torch.tensor([c == "sunglasses" for c in context]),
            "hat_colour": torch.rand(n, 3, generator=g),
        }
        return to_signed(self._draw(ids, look))

    @single_threaded
    def condition(self, case_ids: Sequence[int], seed: int) -> Tensor:
        """Reference faces [N, 3, H, W] in [-1, 1]: neutral pose and expression, plain grey background, no context."""
        ids = self._check_ids(case_ids)
        n = len(ids)
        full = lambda v: torch.full((n,), float(v))
        look = {"cx": full(self.cfg.width / self.cfg.height / 2), "cy": full(0.47), "tilt": full(0), "scale": full(1),
                "turn": full(0), "smile": full(0.3), "open": torch.zeros(n, dtype=torch.bool), "eyes_open": full(1),
                "brow_raise": full(0), "light": full(1), "jitter": torch.zeros(n, 3),
                "bg": torch.full((n, 3), 0.82), "bg_slope": full(0),
                "shirt": torch.tensor([0.45, 0.47, 0.5]).expand(n, 3),
                "hat": torch.zeros(n, dtype=torch.bool), "sunglasses": torch.zeros(n, dtype=torch.bool),
                "hat_colour": torch.zeros(n, 3)}
        return to_signed(self._draw(ids, look))

    def _draw(self, ids: Tensor, look: dict[str, Tensor]) -> Tensor:
        """Canvas [N, 3, H, W] in [0, 1]. Face parts are drawn in head-local coordinates (u, v): the pixel grid
        moved to the head centre, turned by the tilt and divided by the head scale."""
        h, w = self.cfg.height, self.cfg.width
        n = len(ids)
        x, y = grid(h, w)
        px = 1 / h
        code = {k: v[ids] for k, v in self._codes.items()}
        col = lambda c: c[:, :, None, None]                                       # [N, 3] -> [N, 3, 1, 1]
        e = lambda t: t[:, None, None]                                            # [N] -> [N, 1, 1]
        lit = lambda c: (c * look["light"][:, None]).clamp(0, 1)

        canvas = col(look["bg"]) * (1 + e(look["bg_slope"]) * (y - 0.5)).unsqueeze(1)
        canvas = canvas.expand(n, 3, h, w).clamp(0, 1)
        layer = lambda canvas, sd, colour, alpha=1.0: torch.lerp(
            canvas, col(colour).expand_as(canvas), (alpha * coverage(sd * e(look["scale"]), px)).unsqueeze(1))

        c, s = torch.cos(look["tilt"]), torch.sin(look["tilt"])
        dx, dy = x - e(look["cx"]), y - e(look["cy"])
        u = (e(c) * dx + e(s) * dy) / e(look["scale"])
        v = (-e(s) * dx + e(c) * dy) / e(look["scale"])
        fu = u - 0.025 * e(look["turn"])                                          # features shift as the head turns
        z = torch.zeros(n)

        face = torch.tensor(list(FACE_SHAPES.values()))[code["face_shape"]]
        a, b, p, taper = face.unbind(1)
        skin = lit(torch.tensor([v[0] for v in SKINS.values()])[code["skin"]] + look["jitter"])
        hair = lit(torch.tensor([v[0] for v in HAIR_COLOURS.values()])[code["hair_colour"]])
        has = lambda key, *names: e(torch.isin(code[key],
                                               torch.tensor([list(self._tables[key]).index(x) for x in names])))
        style = lambda name: has("hair_style", name)

        # body: shoulders and neck move with the head but do not tilt
        shirt_x = look["cx"]
        canvas = layer(canvas, sd_ellipse(x, y, shirt_x, 1.03 + 0 * shirt_x, 0.36 + z, 0.21 + z), lit(look["shirt"]))
        canvas = layer(canvas, sd_box(x, y, shirt_x, look["cy"] + 0.27, 0.065 + z, 0.1 + z, 0.02), skin * 0.85)

        # hair behind the face, ears
        top = -(b + 0.045)
        back = torch.full_like(u, 1.0)
        back = torch.where(style("bob"), sd_box(u, v, z, (top + 0.12) / 2, a + 0.045, (0.12 - top) / 2, 0.09), back)
        back = torch.where(style("long"), sd_box(u, v, z, (top + b + 0.13) / 2, a + 0.055, (b + 0.13 - top) / 2,
                                                 0.1), back)
        bumpy = torch.hypot(u, v + 0.05) - (e(a) + 0.1 + 0.016 * torch.cos(9 * torch.atan2(v + 0.05, u)))
        back = torch.where(style("curly"), bumpy, back)
        back = torch.where(style("ponytail"), sd_ellipse(u, v, a + 0.05, 0.12 + z, 0.05 + z, 0.13 + z), back)
        ear_x = a + 0.005
        ears = torch.minimum(sd_ellipse(u, v, ear_x, 0.02 + z, 0.032 + z, 0.05 + z),
                             sd_ellipse(u, v, -ear_x, 0.02 + z, 0.032 + z, 0.05 + z))
        canvas = layer(canvas, ears, skin * 0.93)
        canvas = layer(canvas, back, hair * 0.85)
        earring = torch.minimum(sd_circle(u, v, ear_x, 0.08 + z, 0.02 + z), sd_circle(u, v, -ear_x, 0.08 + z, 0.02 + z))
        has_earrings = has("accessory", "earrings", "glasses_earrings")
        canvas = layer(canvas, torch.where(has_earrings, earring, 1.0), torch.tensor([0.98, 0.78, 0.15]).expand(n, 3))

        # face: superellipse, narrowing toward the chin by `taper`
        half_w = e(a) * (1 - e(taper) * (v / e(b)).clamp(0, 1) ** 2)
        q = ((u / half_w).abs() ** e(p) + (v / e(b)).abs() ** e(p)) ** (1 / e(p))
        sd_face = (q - 1) * torch.minimum(half_w, e(b))
        canvas = layer(canvas, sd_face, skin)

        # facial hair
        chin = torch.maximum(sd_face - 0.006, 0.19 - v)
        jaw = torch.maximum(torch.maximum(sd_face - 0.006, -sd_face - 0.045), 0.05 - v)
        beard = torch.minimum(chin, jaw)
        goatee = sd_ellipse(fu, v, z, b - 0.045, 0.045 + z, 0.055 + z)
        moustache = sd_segment(fu, v, -0.05 + z, 0.115 + z, 0.05 + z, 0.115 + z, 0.017 + z)
        sd_fh = torch.where(has("facial_hair", "beard"), torch.minimum(beard, moustache),
                            torch.where(has("facial_hair", "goatee"), torch.minimum(goatee, moustache),
                                        torch.where(has("facial_hair", "moustache"), moustache, 1.0)))
        canvas = layer(canvas, sd_fh, hair * 0.9)

        # eyes: white, iris clipped to the white; openness squashes them
        ew, eh = torch.tensor(list(EYE_SHAPES.values()))[code["eye_shape"]].unbind(1)
        eh = eh * look["eyes_open"]
        eye_x, eye_y = 0.085 * a / 0.2, -0.03 + z
        iris_colour = torch.tensor(list(EYE_COLOURS.values()))[code["eye_colour"]]
        for side in (-1, 1):
            white = sd_ellipse(fu, v, side * eye_x, eye_y, ew, eh)
            canvas = layer(canvas, white, torch.tensor([0.97, 0.97, 0.97]).expand(n, 3))
            iris = torch.maximum(sd_circle(fu, v, side * eye_x, eye_y, 0.8 * torch.minimum(ew, 0.035 + z)), white)
            canvas = layer(canvas, iris, iris_colour)

        # brows
        thick, arch = torch.tensor(list(BROWS.values()))[code["brows"]].unbind(1)
        brow_y = eye_y - EYE_SHAPES["round"][1] - 0.035 - look["brow_raise"]
        sd_brow = torch.full_like(u, 1.0)
        for side in (-1, 1):
            inner, outer, mid = side * 0.035, side * (eye_x + 0.05), side * (eye_x + 0.005)
            sd_brow = torch.minimum(sd_brow, sd_segment(fu, v, inner + z, brow_y, mid, brow_y - arch, thick))
            sd_brow = torch.minimum(sd_brow, sd_segment(fu, v, mid, brow_y - arch, outer, brow_y + 0.005 + z, thick))
        canvas = layer(canvas, sd_brow, hair * 0.8)

        # nose
        sd_nose = torch.where(has("nose", "button"), sd_ellipse(fu, v, z, 0.075 + z, 0.022 + z, 0.017 + z),
                              torch.where(has("nose", "long"),
                                          sd_segment(fu, v, z, 0.0 + z, z, 0.085 + z, 0.012 + z),
                                          sd_ellipse(fu, v, z, 0.08 + z, 0.046 + z, 0.02 + z)))
        canvas = layer(canvas, sd_nose, skin * 0.72)

        # mouth: two strokes bent by the smile, or an open dark mouth
        mw, lip = torch.tensor(list(MOUTHS.values()))[code["mouth"]].unbind(1)
        my = 0.155 + z
        corner = my - 0.028 * look["smile"]
        sd_mouth = torch.minimum(sd_segment(fu, v, -mw, corner, z, my, lip), sd_segment(fu, v, z, my, mw, corner, lip))
        lips = skin * 0.45 + torch.tensor([0.72, 0.2, 0.25]) * 0.55
        canvas = layer(canvas, sd_mouth, lips)
        canvas = layer(canvas, torch.where(e(look["open"]), sd_ellipse(fu, v, z, my + 0.012, 0.6 * mw, 0.028 + z), 1.0),
                       torch.tensor([0.3, 0.05, 0.08]).expand(n, 3))

        # hair in front: a cap over the top of the head down to a hairline, per style
        cap_shape = sd_ellipse(u, v, z, -0.012 + z, a + 0.022, b + 0.035)
        hairline = torch.where(style("short") | style("bun") | style("ponytail"), -0.42 * e(b), -0.34 * e(b))
        hairline = torch.where(style("side_part"), -0.36 * e(b) + 0.3 * u, hairline)
        cap = torch.maximum(cap_shape, v - hairline)
        cap = torch.where(style("curly"), torch.maximum(bumpy, v + 0.36 * e(b)), cap)
        cap = torch.where(style("bun"), torch.minimum(cap, sd_circle(u, v, z, -(b + 0.055), 0.075 + z)), cap)
        cap = torch.where(style("mohawk"), torch.maximum(sd_box(u, v, z, -b, 0.035 + z, 0.12 + z), v + 0.3 * e(b)), cap)
        cap = torch.where(style("bald"), 1.0, cap)
        canvas = layer(canvas, cap, hair)

        # accessories and context
        glasses_on = has("accessory", "glasses", "glasses_earrings")
        ring = lambda side: (torch.hypot(fu - side * e(eye_x), v - e(eye_y)) - e(ew) - 0.028).abs() - 0.011
        frames = torch.minimum(torch.minimum(ring(-1), ring(1)),
                               sd_segment(fu, v, -eye_x + ew + 0.03, eye_y, eye_x - ew - 0.03, eye_y, 0.01 + z))
        canvas = layer(canvas, torch.where(glasses_on, frames, 1.0), torch.tensor([0.08, 0.08, 0.1]).expand(n, 3))
        lenses = torch.minimum(torch.minimum(sd_ellipse(fu, v, -eye_x, eye_y, ew + 0.035, 0.048 + z),
                                             sd_ellipse(fu, v, eye_x, eye_y, ew + 0.035, 0.048 + z)),
                               sd_segment(fu, v, -eye_x, eye_y, eye_x, eye_y, 0.012 + z))
        canvas = layer(canvas, torch.where(e(look["sunglasses"]), lenses, 1.0),
                       torch.tensor([0.04, 0.04, 0.07]).expand(n, 3))
        hat = torch.minimum(sd_box(u, v, z, -(b + 0.035), a + 0.03, 0.095 + z, 0.04 + z),
                            sd_segment(u, v, -(a + 0.1), -0.55 * b, a + 0.1, -0.55 * b, 0.025 + z))
        canvas = layer(canvas, torch.where(e(look["hat"]), hat, 1.0), lit(look["hat_colour"]))
        return canvas

    # -- prompts ----------------------------------------------------------------------------------

    def _context_words(self, context: str | None, split: str, j: int) -> str:
        context = context or ""
        if context not in CONTEXT_WORDS:
            raise LofaError(f"identities: unknown context {context!r}; choose one of {list(CONTEXT_WORDS)}")
        return pick(CONTEXT_WORDS[context], split, j)

    def _phrases(self, case, split: str, j: int, context) -> dict[str, str]:
        return {"ctx": self._context_words(context, split, j)}

    def _coarse_phrases(self, coarse: int, j: int, context) -> dict[str, str]:
        skin, hair = self._families[coarse]
        return {"skin": pick(SKIN_WORDS[skin], "train", j), "hair": pick(HAIR_WORDS[hair], "train", j),
                "ctx": self._context_words(context, "train", j)}
