"""Actions world (paper: personalized human-action video, MotionX). Stick-figure people with a jointed skeleton —
torso, head, two arms with elbows, two legs with knees — perform parameterised actions in short clips.

An action is a combination of components: body part × motion × speed × level × amplitude (× direction × tempo at
`full`). A motion drives the proximal joint (shoulder / hip, or the torso's lean) with one waveform and the distal
joint (elbow / knee, or the torso's crouch) with another; speed is the number of cycles per clip, level the joint's
base angle, amplitude the angular range, direction the starting phase, tempo how the pace changes over the clip
(steady, speeding up or slowing down: the motion's phase runs along t + k·t·(1 − t), k = 0, −1, +1, so the same
cycles are spread over the frames differently). Tempo is off unless `tempos` lists values (only `full` does): the
cases then have no "tempo" attribute and render exactly as before. Coarse class = body part: the base model only
learns *which* part moves, the LoRA has to learn *how*.

Appearance varies per sample: figure and background colours (always contrasting), size, position, ground height,
line width, head size, and the resting angles of the limbs that do not move. The pose condition is the same joint
trajectory drawn canonically (fixed size and place, black background, one fixed colour per limb so left and right
are told apart) — a skeleton video for a 3D-conv pose encoder. It is the same for every seed (the pose sequence *is*
the action) unless `pose_jitter` > 0 adds a seeded shift and rescale, an augmentation for condition encoders.
"Left" is the figure's own left, drawn on the image's right: the figure faces the viewer.

Speed (one CPU thread; see base.single_threaded): 256 mini clips (8 × 32 × 32) render in ≈ 0.5 s and their pose
conditions in ≈ 0.55 s on the 2-core dev machine under load 4.7 (0.78 s on an H100 host's CPU core). A small 3D CNN
trained on renders names the exact case of fresh renders 100 % of the time at mini (216 cases) and 99.97 % at
full when full had 1024 cases (before tempo; not re-measured at 3072). Gallery: python tests/test_worlds.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import ClassVar, Sequence

import torch
from torch import Tensor

from lofa.errors import LofaError
from lofa.worlds.world import (World, contrasting_pair, coverage, grid, paint, pick, sd_circle, sd_segment,
                              single_threaded, to_signed, uniform)

# limb order everywhere: left arm, right arm, left leg, right leg; side sign +1 = figure's left = image right
LIMBS = ("left_arm", "right_arm", "left_leg", "right_leg")
SIDE = torch.tensor([1.0, -1.0, 1.0, -1.0])
IS_ARM = torch.tensor([True, True, False, False])

# body geometry in figure units (a standing figure is about 0.62 tall before scaling)
TORSO, SHOULDER_DROP, NECK, HEAD_R = 0.20, 0.025, 0.02, 0.062
UPPER_ARM, FOREARM, THIGH, SHIN = 0.12, 0.11, 0.14, 0.14
REST = {"arm": (28.0, 15.0), "leg": (14.0, 0.0)}          # (proximal angle, distal flex) in degrees

# part -> (moving limbs, extra phase of each limb in cycles, torso moves)
PARTS = {
    "left_arm": ((1, 0, 0, 0), (0, 0, 0, 0), False),
    "right_arm": ((0, 1, 0, 0), (0, 0, 0, 0), False),
    "both_arms": ((1, 1, 0, 0), (0, 0, 0, 0), False),
    "left_leg": ((0, 0, 1, 0), (0, 0, 0, 0), False),
    "right_leg": ((0, 0, 0, 1), (0, 0, 0, 0), False),
    "torso": ((0, 0, 0, 0), (0, 0, 0, 0), True),
    "arms_alternate": ((1, 1, 0, 0), (0, 0.5, 0, 0), False),
    "left_arm_right_leg": ((1, 0, 0, 1), (0, 0, 0, 0), False),
}
# motion -> weights of (sine, sawtooth) on the proximal joint and of a 0->1->0 hump on the distal joint
MOTIONS = {"swing": (1.0, 0.0, 0.0), "bend": (0.0, 0.0, 1.0), "circle": (1.0, 0.0, 1.0), "flick": (0.0, 1.0, 0.0)}
SPEEDS = {"slow": 1.0, "fast": 2.0}                                       # cycles per clip
LEVELS = {"low": 0, "mid": 1, "high": 2, "top": 3}
LEVEL_ANGLE = {"arm": (25.0, 80.0, 135.0, 168.0), "leg": (12.0, 35.0, 58.0, 80.0)}
LEVEL_CROUCH = (0.8, 0.4, 0.0, -0.3)              # torso: crouch depth (negative = up on the toes)
AMPLITUDES = {"small": 0.5, "large": 1.0}
DIRECTIONS = {"up": 0.0, "down": 0.5}             # starting phase in cycles
TEMPOS = {"steady": 0.0, "speeding_up": -1.0, "slowing_down": 1.0}   # k of the time warp t + k t (1 - t)
SWING = {"arm": 50.0, "leg": 35.0}                # proximal range (degrees) at amplitude 1
FLEX = {"arm": 110.0, "leg": 80.0}                # distal range (degrees) at amplitude 1
LEAN, CROUCH = 30.0, 0.6                          # torso: lean range (degrees) and crouch range at amplitude 1
CROUCH_HIP, CROUCH_KNEE, TIPTOE = 60.0, 110.0, 0.15   # per unit crouch: thigh out, knee bend (deg); lift if < 0

# pose-condition colours (figure's left warm, right cool), RGB in [0, 1]
POSE_COLOURS = {"body": (0.9, 0.9, 0.9), "left_arm": (1.0, 0.55, 0.1), "right_arm": (0.15, 0.85, 0.3),
                "left_leg": (0.95, 0.2, 0.6), "right_leg": (0.2, 0.5, 1.0)}


@dataclass
class ActionsConfig:
    """Sizes, component vocabularies (subsets of the tables above) and the held-out fraction."""

    frames: int = field(default=8, metadata={"help": "Frames T of every clip and pose sequence."})
    height: int = field(default=32, metadata={
        "help": "Height H of clips and pose sequences, in pixels; the figure is laid out in units of it."})
    width: int = field(default=32, metadata={"help": "Width W of clips and pose sequences, in pixels."})
    parts: tuple = field(default=("left_arm", "right_arm", "both_arms", "left_leg", "right_leg", "torso"), metadata={
        "help": "Body parts that move (names in PARTS); an action's coarse class is its part."})
    motions: tuple = field(default=("swing", "bend", "circle"), metadata={
        "help": "Motions (names in MOTIONS): the waveforms that drive the proximal and the distal joint."})
    speeds: tuple = field(default=("slow", "fast"), metadata={
        "help": "Speeds (names in SPEEDS): motion cycles per clip."})
    levels: tuple = field(default=("low", "mid", "high"), metadata={
        "help": "Levels (names in LEVELS): the moving joint's base angle, or the torso's crouch depth."})
    amplitudes: tuple = field(default=("small", "large"), metadata={
        "help": "Amplitudes (names in AMPLITUDES): the fraction of the full angular range the motion sweeps."})
    directions: tuple = field(default=("up",), metadata={
        "help": "Directions (names in DIRECTIONS): the starting phase of the motion."})
    heldout_fraction: float = field(default=0.2, metadata={
        "help": "Fraction of the actions held out (rounded up), chosen so that every component value keeps a "
                "training case (`heldout_split`)."})
    pose_jitter: float = field(default=0.0, metadata={
        "help": "Augmentation of the pose condition: the largest seeded shift of the skeleton, in canvas heights, "
                "and relative change of its size; 0 draws the canonical skeleton whatever the seed."})
    tempos: tuple = field(default=(), repr=False, metadata={
        "help": "Tempos (names in TEMPOS): how the pace changes over the clip; () leaves tempo out of the case "
                "space, every clip steady (and out of the repr, see __repr__)."})

    PRESETS: ClassVar[dict] = {
        "smoke": {"height": 16, "width": 16, "parts": ("left_arm", "right_arm", "left_leg"),
                  "motions": ("swing", "bend"), "levels": ("low", "high"), "amplitudes": ("large",)},  # 24 cases
        "mini": {},                                                                       # 216 cases
        "full": {"parts": tuple(PARTS), "motions": tuple(MOTIONS), "levels": tuple(LEVELS),
                 "directions": tuple(DIRECTIONS), "tempos": tuple(TEMPOS)},
        # full: 8 parts x 4 motions x 2 speeds x 4 levels x 2 amplitudes x 2 directions x 3 tempos = 3072 cases
        # (2457 train / 615 held out)
    }

    def __repr__(self) -> str:
        """The dataclass repr, plus `tempos` only when set: the repr fingerprints the shipped mini evaluators
        (lofa.metrics.evaluators.fingerprint), so a preset without tempo must print exactly as before it existed."""
        shown = [f for f in fields(self) if f.repr or getattr(self, f.name) != f.default]
        return f"{type(self).__name__}({', '.join(f'{f.name}={getattr(self, f.name)!r}' for f in shown)})"


# prompt phrases: entries 0-1 train synonyms, 2 reserved for eval (see base.pick)
PART_WORDS = {
    "left_arm": ["the left arm", "their left arm", "the arm on their left"],
    "right_arm": ["the right arm", "their right arm", "the arm on their right"],
    "both_arms": ["both arms", "the two arms", "each arm at once"],
    "left_leg": ["the left leg", "their left leg", "the leg on their left"],
    "right_leg": ["the right leg", "their right leg", "the leg on their right"],
    "torso": ["the torso", "the upper body", "the trunk"],
    "arms_alternate": ["both arms in turn", "alternating arms", "one arm after the other"],
    "left_arm_right_leg": ["the left arm and right leg", "left arm together with right leg",
                           "the left arm plus the right leg"],
}
# (motion, "limb" | "torso") -> (-ing forms, third-person forms)
MOTION_WORDS = {
    ("swing", "limb"): (["swinging", "waving", "sweeping"], ["swings", "waves", "sweeps"]),
    ("bend", "limb"): (["bending and straightening", "flexing", "folding and unfolding"],
                       ["bends and straightens", "flexes", "folds and unfolds"]),
    ("circle", "limb"): (["circling", "rotating", "looping"], ["circles", "rotates", "loops"]),
    ("flick", "limb"): (["flicking", "snapping", "jerking"], ["flicks", "snaps", "jerks"]),
    ("swing", "torso"): (["swaying", "rocking", "tilting"], ["sways", "rocks", "tilts"]),
    ("bend", "torso"): (["bobbing", "dipping", "lowering and raising"], ["bobs", "dips", "lowers and raises"]),
    ("circle", "torso"): (["circling", "rolling", "swirling"], ["circles", "rolls", "swirls"]),
    ("flick", "torso"): (["jerking", "snapping", "twitching"], ["jerks", "snaps", "twitches"]),
}
SPEED_WORDS = {"slow": ["slowly", "at a slow pace", "unhurriedly"], "fast": ["quickly", "rapidly", "briskly"]}
LEVEL_WORDS = {
    "arm": {"low": ["down low", "near the hip", "beside the waist"],
            "mid": ["at shoulder height", "out to the side", "level with the shoulders"],
            "high": ["raised high", "above the shoulders", "up over the shoulders"],
            "top": ["straight overhead", "above the head", "high over the head"]},
    "leg": {"low": ["close to the ground", "barely lifted", "just off the floor"],
            "mid": ["lifted halfway", "raised to the side", "partly raised"],
            "high": ["raised high", "lifted up high", "kicked up"],
            "top": ["kicked up to hip height", "raised level with the hip", "lifted all the way up"]},
    "torso": {"low": ["in a deep crouch", "squatting low", "crouched down"],
              "mid": ["in a half crouch", "with knees slightly bent", "half squatting"],
              "high": ["standing tall", "upright", "standing straight"],
              "top": ["on tiptoe", "up on the toes", "raised onto the toes"]},
}
AMPLITUDE_WORDS = {"small": ["with small movements", "in a small range", "only a little"],
                   "large": ["with big movements", "through a wide range", "with a large sweep"]}
DIRECTION_WORDS = {"up": ["starting upward", "beginning with an upward move", "opening upward"],
                   "down": ["starting downward", "beginning with a downward move", "opening downward"]}
# kept to 1-2 word pieces: the full world's prompts must fit the text encoder's 32 tokens (TEMPO_TEMPLATES)
TEMPO_WORDS = {"steady": ["steadily", "evenly", "uniformly"],
               "speeding_up": ["speeding up", "accelerating", "ever faster"],
               "slowing_down": ["slowing down", "losing speed", "ever slower"]}


class ActionsWorld(World):
    """Fine-grained compositional action clips [N, 3, T, H, W] with skeleton pose conditions [N, 3, T, H, W]."""

    task = "actions"
    modality = "video"
    COMPONENTS = ("part", "motion", "speed", "level", "amplitude", "direction", "tempo")   # tempo: when set
    TEMPLATES = {
        "train": ["a person {ving} {obj} {level}, {speed}, {amp}, {dir}, {tempo}",
                  "someone {vs} {obj} {speed} {amp}, {level}, {dir}, {tempo}",
                  "a stick figure {ving} {obj} {amp}, {speed}, {level}, {dir}, {tempo}"],
        "eval": ["a video of a figure that {vs} {obj} {level} {speed} {amp}, {dir}, {tempo}"],
    }
    # With tempo (the full world) the commas go and the eval phrasing loses "a video of ... that": with them, prompts
    # reached 38 MiniLM tokens, and the text encoder reads 32, which cut the tempo off the end of 23 % of eval prompts
    TEMPO_TEMPLATES = {
        "train": ["a person {ving} {obj} {level} {speed} {amp} {dir} {tempo}",
                  "someone {vs} {obj} {speed} {amp} {level} {dir} {tempo}",
                  "a stick figure {ving} {obj} {amp} {speed} {level} {dir} {tempo}"],
        "eval": ["a figure {vs} {obj} {level} {speed} {amp} {dir} {tempo}"],
    }
    COARSE_TEMPLATES = ["a person moving {obj}", "someone moving {obj}", "a stick figure using {obj}"]

    def __init__(self, cfg: ActionsConfig, seed: int = 0):
        super().__init__(cfg, seed)
        if cfg.tempos:
            self.TEMPLATES = self.TEMPO_TEMPLATES
        vocab = {"part": cfg.parts, "motion": cfg.motions, "speed": cfg.speeds, "level": cfg.levels,
                 "amplitude": cfg.amplitudes, "direction": cfg.directions}
        if cfg.tempos:                       # off by default: the case space (and attrs) as before tempo existed
            vocab["tempo"] = cfg.tempos
        tables = {"part": PARTS, "motion": MOTIONS, "speed": SPEEDS, "level": LEVELS, "amplitude": AMPLITUDES,
                  "direction": DIRECTIONS, "tempo": TEMPOS}
        _check_vocab(vocab, tables)
        self.vocab = vocab
        components = [k for k in self.COMPONENTS if k in vocab]
        combos = [{}]
        for k in components:
            combos = [{**a, k: v} for a in combos for v in vocab[k]]
        varying = [k for k in components if len(vocab[k]) > 1]
        names = ["-".join(a[k] for k in varying) for a in combos]
        self.coarse_names = list(cfg.parts)
        self._finish(names, combos, [cfg.parts.index(a["part"]) for a in combos])
        self._tables()

    def _tables(self) -> None:
        """Per-case numeric parameters as tensors, indexed by case id at render time."""
        a = [c.attrs for c in self.cases]
        self._moving = torch.tensor([PARTS[x["part"]][0] for x in a], dtype=torch.bool)           # [C, 4]
        self._limb_phase = torch.tensor([PARTS[x["part"]][1] for x in a], dtype=torch.float32)     # [C, 4]
        self._torso = torch.tensor([PARTS[x["part"]][2] for x in a])                               # [C]
        self._waves = torch.tensor([MOTIONS[x["motion"]] for x in a])                              # [C, 3]
        self._cycles = torch.tensor([SPEEDS[x["speed"]] for x in a])
        self._level = torch.tensor([LEVELS[x["level"]] for x in a])
        self._amp = torch.tensor([AMPLITUDES[x["amplitude"]] for x in a])
        self._start = torch.tensor([DIRECTIONS[x["direction"]] for x in a])
        self._tempo = torch.tensor([TEMPOS[x.get("tempo", "steady")] for x in a])

    # -- kinematics ---------------------------------------------------------------------------------

    def joints(self, case_ids: Sequence[int], rest_jitter: Tensor | None = None) -> dict[str, Tensor]:
        """Joint trajectories in figure units, origin on the ground below the pelvis, y down.

        Returns {name: [N, T, 2]} for pelvis, neck, shoulder, head and elbow / hand / knee / foot of each limb
        ("left_arm_mid", "left_arm_end", ...). rest_jitter [N, 4, 2] (radians) perturbs the resting angles of
        limbs that do not move.
        """
        ids = self._check_ids(case_ids)
        n, t_len = len(ids), self.cfg.frames
        t = (torch.arange(t_len, dtype=torch.float32) + 0.5) / t_len
        if "tempo" in self.vocab:            # time warp: same end points, the pace rises (k < 0) or falls (k > 0)
            t = t + self._tempo[ids, None] * t * (1 - t)                                           # [N, T]
        phase = 2 * math.pi * (self._cycles[ids, None] * t + self._start[ids, None])              # [N, T]
        limb_phase = phase[:, None, :] + 2 * math.pi * self._limb_phase[ids][:, :, None]          # [N, 4, T]
        w = self._waves[ids]

        def proximal(p):  # sine and a rising sawtooth that snaps back
            saw = 2 * torch.frac(p / (2 * math.pi) + 0.5) - 1
            return _wsel(w, 0, p) * torch.sin(p) + _wsel(w, 1, p) * saw

        def distal(p):
            return _wsel(w, 2, p) * (1 - torch.cos(p)) / 2

        amp = self._amp[ids]
        level = self._level[ids]
        arm = IS_ARM[None, :, None]
        base = torch.where(arm, torch.tensor(LEVEL_ANGLE["arm"])[level][:, None, None],
                           torch.tensor(LEVEL_ANGLE["leg"])[level][:, None, None])                 # [N, 4, 1]
        swing = torch.where(arm, SWING["arm"], SWING["leg"])
        flex = torch.where(arm, FLEX["arm"], FLEX["leg"])
        rest_prox = torch.where(arm, REST["arm"][0], REST["leg"][0])
        rest_dist = torch.where(arm, REST["arm"][1], REST["leg"][1])
        a = amp[:, None, None]
        prox_move = torch.deg2rad(base + a * swing * proximal(limb_phase))                        # [N, 4, T]
        dist_move = torch.deg2rad(rest_dist + a * flex * distal(limb_phase))
        if rest_jitter is None:
            rest_jitter = torch.zeros(n, 4, 2)
        prox_rest = torch.deg2rad(rest_prox).expand(n, 4, t_len) + rest_jitter[..., 0:1]
        dist_rest = torch.deg2rad(rest_dist).expand(n, 4, t_len) + rest_jitter[..., 1:2]
        moving = self._moving[ids][:, :, None]
        prox = torch.where(moving, prox_move, prox_rest)
        dist = torch.where(moving, dist_move, dist_rest)

        torso = self._torso[ids][:, None]
        lean = torch.where(torso, torch.deg2rad(amp[:, None] * LEAN * proximal(phase[:, None])[:, 0]), 0.0)
        crouch = torch.where(torso, torch.tensor(LEVEL_CROUCH)[level][:, None]
                             + amp[:, None] * CROUCH * distal(phase[:, None])[:, 0], 0.0)          # [N, T]
        bend = crouch.clamp_min(0)[:, None]
        legs = ~IS_ARM[None, :, None]
        prox = torch.where(legs, prox + torch.deg2rad(CROUCH_HIP * bend), prox)
        dist = torch.where(legs, dist - torch.deg2rad(CROUCH_KNEE * bend), dist)

        # the lower foot stays on the ground; a negative crouch lifts the body onto the toes
        drop = THIGH * torch.cos(prox[:, 2:]) + SHIN * torch.cos(prox[:, 2:] + dist[:, 2:])      # [N, 2, T]
        pelvis_y = -drop.amax(1) + TIPTOE * crouch.clamp_max(0)
        pelvis = torch.stack([torch.zeros_like(pelvis_y), pelvis_y], -1)                         # [N, T, 2]
        up = torch.stack([torch.sin(lean), -torch.cos(lean)], -1)
        out = {"pelvis": pelvis, "neck": pelvis + TORSO * up,
               "shoulder": pelvis + (TORSO - SHOULDER_DROP) * up,
               "head": pelvis + (TORSO + NECK + HEAD_R) * up}
        for i, limb in enumerate(LIMBS):
            root = out["shoulder"] if i < 2 else pelvis
            l1, l2 = (UPPER_ARM, FOREARM) if i < 2 else (THIGH, SHIN)
            mid = root + l1 * _direction(prox[:, i], SIDE[i])
            out[f"{limb}_mid"] = mid
            out[f"{limb}_end"] = mid + l2 * _direction(prox[:, i] + dist[:, i], SIDE[i])
        return out

    # -- drawing ----------------------------------------------------------------------------------

    def _segments(self, j: dict[str, Tensor]) -> list[tuple[str, Tensor, Tensor]]:
        """(colour key, start, end) of each bone; the torso last so that it stays visible over the limb roots."""
        segs = []
        for limb in LIMBS:
            root = j["shoulder"] if "arm" in limb else j["pelvis"]
            segs += [(limb, root, j[f"{limb}_mid"]), (limb, j[f"{limb}_mid"], j[f"{limb}_end"])]
        return segs + [("body", j["pelvis"], j["neck"])]

    @single_threaded
    def render(self, case_ids: Sequence[int], seed: int) -> Tensor:
        """Clips [N, 3, T, H, W] in [-1, 1]; appearance random per sample, deterministic given (case_ids, seed)."""
        ids = self._check_ids(case_ids)
        n, (t_len, h, w) = len(ids), (self.cfg.frames, self.cfg.height, self.cfg.width)
        g = torch.Generator().manual_seed(seed)
        bg, fg = contrasting_pair(g, n)
        scale = 1.2 * uniform(g, 0.88, 1.06, n)
        cx = w / h / 2 + uniform(g, -0.08, 0.08, n)
        ground = uniform(g, 0.86, 0.93, n)
        radius = scale * uniform(g, 0.026, 0.038, n)
        head_r = scale * HEAD_R * uniform(g, 0.85, 1.15, n)
        floor_shade = uniform(g, 0.6, 0.85, n)
        rest_jitter = torch.deg2rad(uniform(g, -8, 8, n, 4, 2))
        j = self.joints(ids.tolist(), rest_jitter)

        x, y = grid(h, w)
        place = lambda p: (cx[:, None] + scale[:, None] * p[..., 0], ground[:, None] + scale[:, None] * p[..., 1])
        r = radius[:, None].expand(n, t_len)
        hx, hy = place(j["head"])
        sd = sd_circle(x, y, hx, hy, head_r[:, None].expand(n, t_len))
        for _, a, b in self._segments(j):
            (ax, ay), (bx, by) = place(a), place(b)
            sd = torch.minimum(sd, sd_segment(x, y, ax, ay, bx, by, r))
        canvas = bg[:, None, :, None, None].expand(n, t_len, 3, h, w)
        floor = coverage(ground[:, None, None] - y, 1 / h)[:, None]                              # [N, 1, H, W]
        canvas = paint(canvas, floor.expand(n, t_len, h, w), (bg * floor_shade[:, None])[:, None, :])
        canvas = paint(canvas, coverage(sd, 1 / h), fg[:, None, :].expand(n, t_len, 3))
        return to_signed(canvas.permute(0, 2, 1, 3, 4))

    @single_threaded
    def condition(self, case_ids: Sequence[int], seed: int) -> Tensor:
        """Pose sequences [N, 3, T, H, W] in [-1, 1]: the case's joint trajectory as a skeleton on black, one fixed
        colour per limb, canonical size and place up to `cfg.pose_jitter` (seeded; 0 by default, so the seed then
        does not matter); none of the render's appearance."""
        ids = self._check_ids(case_ids)
        n, (t_len, h, w) = len(ids), (self.cfg.frames, self.cfg.height, self.cfg.width)
        g = torch.Generator().manual_seed(seed)
        jit = self.cfg.pose_jitter
        scale = 1.15 * (1 + uniform(g, -jit, jit, n))
        cx = w / h / 2 + uniform(g, -jit, jit, n)
        ground = 0.9 + uniform(g, -jit, jit, n) / 2
        j = self.joints(ids.tolist())
        x, y = grid(h, w)
        place = lambda p: (cx[:, None] + scale[:, None] * p[..., 0], ground[:, None] + scale[:, None] * p[..., 1])
        r = (0.03 * scale)[:, None].expand(n, t_len)
        canvas = torch.zeros(n, t_len, 3, h, w)
        colour = lambda k: torch.tensor(POSE_COLOURS[k]).expand(n, t_len, 3)
        for limb, a, b in self._segments(j):
            (ax, ay), (bx, by) = place(a), place(b)
            canvas = paint(canvas, coverage(sd_segment(x, y, ax, ay, bx, by, r), 1 / h), colour(limb))
        hx, hy = place(j["head"])
        canvas = paint(canvas, coverage(sd_circle(x, y, hx, hy, HEAD_R * scale[:, None].expand(n, t_len)), 1 / h),
                       colour("body"))
        return to_signed(canvas.permute(0, 2, 1, 3, 4))

    # -- prompts ----------------------------------------------------------------------------------

    def _phrases(self, case, split: str, j: int, extra) -> dict[str, str]:
        a = case.attrs
        kind = "torso" if a["part"] == "torso" else "limb"
        group = "torso" if kind == "torso" else ("leg" if a["part"].endswith("leg") and "arm" not in a["part"]
                                                  else "arm")
        ving, vs = MOTION_WORDS[(a["motion"], kind)]
        said = lambda comp, words: pick(words, split, j) if len(self.vocab.get(comp, ())) > 1 else ""
        return {"obj": pick(PART_WORDS[a["part"]], split, j),
                "ving": pick(ving, split, j) if len(self.vocab["motion"]) > 1 else "moving",
                "vs": pick(vs, split, j) if len(self.vocab["motion"]) > 1 else "moves",
                "speed": said("speed", SPEED_WORDS[a["speed"]]),
                "level": said("level", LEVEL_WORDS[group][a["level"]]),
                "amp": said("amplitude", AMPLITUDE_WORDS[a["amplitude"]]),
                "dir": said("direction", DIRECTION_WORDS[a["direction"]]),
                "tempo": said("tempo", TEMPO_WORDS[a["tempo"]]) if "tempo" in a else ""}

    def _coarse_phrases(self, coarse: int, j: int, extra) -> dict[str, str]:
        return {"obj": pick(PART_WORDS[self.coarse_names[coarse]], "train", j)}


def _wsel(w: Tensor, k: int, p: Tensor) -> Tensor:
    """Weight k of each sample's motion [N], broadcast against a phase tensor [N, ...]."""
    return w[:, k].reshape(-1, *([1] * (p.ndim - 1)))


def _direction(angle: Tensor, side: Tensor) -> Tensor:
    """Unit vector [..., 2] of a limb at `angle` from straight down, turned outward on its side."""
    return torch.stack([side * torch.sin(angle), torch.cos(angle)], -1)


def _check_vocab(vocab: dict, tables: dict) -> None:
    for k, values in vocab.items():
        bad = [v for v in values if v not in tables[k]]
        if bad or not values or len(set(values)) != len(values):
            raise LofaError(f"actions: bad {k} vocabulary {list(values)}; choose distinct values from "
                            f"{list(tables[k])}")
