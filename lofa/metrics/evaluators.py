"""Evaluators trained on a world's ground-truth renders only, and the per-task `Evaluators` bundle.

No evaluator ever sees a method's output: they train on a pool of `world.sample` renders and `world.condition`
references drawn at seeds of their own (`EvalConfig.seed_range`), disjoint from the seeds anything is scored at.

Roles (paper metric -> network, trained on ground truth of ALL cases, train and held-out, since it referees):
- referee   fine-case classifier with coarse and per-component heads: ground-truth accuracies; its pooled
            features give the Fréchet distance (FVD for videos, FID for images) and, as generic features of
            a multi-attribute classifier, DINO (sample-reference cosine) for identities.
- clip      render tower + MiniLM text tower, contrastive on (render, train phrasing): CLIP-T, and CLIP-I
            (image-image cosine in its render space) for identities.
- style     ArcFace-trained style descriptor over frames and style references (different content): CSD.
- face      ArcFace-trained identity embedding over varied renders and reference faces: face similarity.
- generic   SimCLR features over augmented renders (no labels, so pose, expression and background stay in
            them): Face Div among a case's samples.
Motion measures (dynamic degree, smoothness) need no training; the dynamic threshold is calibrated on renders.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lofa import seeds
from lofa.config import as_record, storage_dtype
from lofa.errors import LofaError
from lofa.io import read_json, save_safetensors, write_json
from lofa.metrics import scores
from lofa.metrics.features import (ContrastiveModel, Embedder, MultiHeadClassifier, info_nce, mean_pool,
                                   nt_xent)
from lofa.optimise import one_cycle

ROLES = {
    "actions": ("referee", "clip"),
    "styles": ("referee", "clip", "style"),
    "identities": ("referee", "clip", "face", "generic"),
}
META_FILE = "evaluators.json"


@dataclass
class EvalConfig:
    """Sizes and training lengths of the evaluators of one world."""

    width: int = field(default=16, metadata={
        "help": "Channels of the first conv stage of every evaluator's encoder; each further stage doubles them."})
    depth: int = field(default=4, metadata={
        "help": "Conv stages of every evaluator's encoder; each halves the height and width."})
    dim: int = field(default=128, metadata={
        "help": "Width of every evaluator's features and embeddings: the referee's pooled features (Fréchet "
                "distance, DINO), the CLIP stand-in's joint space, the style, face and generic embeddings."})
    batch: int = field(default=64, metadata={
        "help": "Samples per training step of each evaluator; the CLIP stand-in draws distinct cases, so it takes "
                "at most one per case."})
    lr: float = field(default=2e-3, metadata={
        "help": "Peak learning rate of every evaluator's AdamW, under a one-cycle schedule over its steps."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay of every evaluator."})
    per_case: int = field(default=32, metadata={
        "help": "Ground-truth renders per case in the training pool, rendered once and shared by every role."})
    steps_referee: int = field(default=600, metadata={
        "help": "Training steps of the referee, the fine-case classifier with coarse and per-component heads "
                "(ground-truth accuracies, Fréchet distance)."})
    steps_clip: int = field(default=500, metadata={
        "help": "Training steps of the CLIP stand-in, contrastive on (render, train phrasing): CLIP-T and CLIP-I."})
    steps_embed: int = field(default=400, metadata={
        "help": "Training steps of each ArcFace descriptor: the style descriptor (CSD) and the face embedding "
                "(face similarity)."})
    steps_generic: int = field(default=300, metadata={
        "help": "Training steps of the SimCLR appearance features that measure Face Div among a case's samples."})
    arc_scale: float = field(default=16.0, metadata={
        "help": "ArcFace logit scale s of the style and face descriptors: logits s · cos θ."})
    arc_margin: float = field(default=0.3, metadata={
        "help": "ArcFace additive angular margin m, in radians, on the true class of the style and face "
                "descriptors: its logit is s · cos(θ + m)."})
    simclr_temperature: float = field(default=0.2, metadata={
        "help": "Temperature of the NT-Xent loss of the SimCLR appearance features."})
    noise_aug: float = field(default=0.05, metadata={
        "help": "Largest std of the Gaussian noise added to training renders (each sample draws its std uniformly "
                "below it, besides a random blur), so the evaluators tolerate sampler noise."})
    motion_pool: int = field(default=2, metadata={
        "help": "Side, in pixels, of the average pooling of channel-averaged frames before their differences are "
                "taken (motion magnitude, dynamic degree), so per-pixel sampling noise averages out."})
    motion_top: float = field(default=0.05, metadata={
        "help": "Fraction of the largest pooled frame differences averaged into a frame pair's motion magnitude "
                "(VBench likewise averages the top 5 % of flow magnitudes)."})
    dd_quantile: float = field(default=0.1, metadata={
        "help": "Dynamic-degree threshold: this quantile of the motion magnitudes of the ground-truth pool; a "
                "sample that moves more counts as dynamic."})
    # A field, not a constant, because the evaluators' fingerprint records it; tests/test_seeds.py checks the
    # seed streams at the default only.
    seed_offset: int = field(default=seeds.purpose("evaluators.pool").base, metadata={
        "help": "First render seed of the ground-truth pools (stream evaluators.pool of lofa.seeds): the "
                "pool of evaluator seed s takes seeds from seed_offset + 1,000,000 · s on; another value moves "
                "the pools."})

    save_dtype: str = field(default="float32", metadata={
        "help": "dtype of the saved weights: 'float32', 'bfloat16' or 'float16' (the shipped `full` evaluators, to "
                "fit the repository's file budget); the trained nets are rounded to it and scored as saved."})

    RECORDED_IF_SET: ClassVar[tuple] = ("save_dtype",)  # the mini evaluators shipped before it (`as_record`)

    PRESETS: ClassVar[dict[str, dict]] = {
        "smoke": {"width": 8, "dim": 64, "batch": 32, "lr": 4e-3, "per_case": 8, "steps_referee": 300,
                  "steps_clip": 300, "steps_embed": 150, "steps_generic": 60},
        "mini": {},
        # full: mini's nets (float16 on disk) trained longer on larger batches; 24 renders of each of the 2,500-3,100
        # cases keep the pools of a video world near 5 GB
        "full": {"batch": 128, "per_case": 24, "steps_referee": 2000, "steps_clip": 2000, "steps_embed": 1200,
                 "steps_generic": 800, "save_dtype": "float16"},
    }

    def __post_init__(self):
        storage_dtype(self.save_dtype)  # a typo fails here, not after the training

    def seed_range(self, seed: int) -> tuple[int, int]:
        """[lo, hi) of the render seeds these evaluators train on; anything scored must use others."""
        lo, hi = seeds.span(seed, "evaluators.pool")
        shift = self.seed_offset - seeds.purpose("evaluators.pool").base
        return lo + shift, hi + shift


# ----------------------------------------------------------------------------- augmentation


def _blur(x: torch.Tensor) -> torch.Tensor:
    """3x3 box blur over H, W of [N, 3, (T,) H, W]."""
    shape = x.shape
    flat = x.reshape(-1, 1, *shape[-2:])
    return F.avg_pool2d(flat, 3, 1, 1, count_include_pad=False).reshape(shape)


def robust_aug(x: torch.Tensor, g: torch.Generator, noise: float) -> torch.Tensor:
    """Random blur and Gaussian noise per sample, so evaluators do not hinge on pixel-exact renders."""
    n = len(x)
    view = (n,) + (1,) * (x.ndim - 1)
    mix = (torch.rand(view, generator=g) < 0.5).float() * torch.rand(view, generator=g)
    x = (1 - mix) * x + mix * _blur(x)
    return x + noise * torch.rand(view, generator=g) * torch.randn(x.shape, generator=g)


def view_aug(x: torch.Tensor, g: torch.Generator, noise: float, shift: int = 3) -> torch.Tensor:
    """SimCLR views of images [N, 3, H, W]: translation, flip, colour jitter, then robust_aug."""
    n, _, h, w = x.shape
    pad = F.pad(x, (shift,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * shift + 1, (2, n), generator=g)
    x = torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
    gain = 1 + 0.2 * (2 * torch.rand(n, 3, 1, 1, generator=g) - 1)
    bias = 0.2 * (2 * torch.rand(n, 1, 1, 1, generator=g) - 1)
    return robust_aug((x * gain + bias).clamp(-1, 1), g, noise)


def random_frames(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One random frame per video [N, 3, T, H, W] -> [N, 3, H, W]; images pass through."""
    if x.ndim == 4:
        return x
    t = torch.randint(0, x.shape[2], (len(x),), generator=g)
    return x[torch.arange(len(x)), :, t]


# ----------------------------------------------------------------------------- training


def fit(module: torch.nn.Module, loss_fn: Callable[[torch.Generator], torch.Tensor], steps: int,
        cfg: EvalConfig, seed: int, desc: str) -> list[float]:
    """AdamW with a one-cycle schedule over `steps`, gradients clipped to norm 1 (`lofa.optimise.one_cycle`);
    loss_fn(generator) draws its own ground-truth batch.

    Returns the loss curve. The generator (seeded by `seed`) fixes batch composition and augmentation, so a
    rerun reproduces the run. A NaN or inf loss stops training with a LofaError naming `desc` and the step
    (a role keeps no checkpoint of its own: `train_evaluators` saves each role once it has finished).
    """
    g = torch.Generator().manual_seed(seed)

    def step_loss(step: int) -> torch.Tensor:
        return loss_fn(g)

    return one_cycle(module, step_loss, steps, lr=cfg.lr, weight_decay=cfg.weight_decay, clip=1.0,
                     what=f"evaluator {desc}", fix="lower the learning rate (EvalConfig.lr)", desc=desc)


def attribute_vocab(world) -> dict[str, list[str]]:
    """component -> sorted list of its values (as strings) over all cases; single-valued components are left
    out (nothing to recognise)."""
    vocab: dict[str, set] = {}
    for c in world.cases:
        for k, v in c.attrs.items():
            vocab.setdefault(k, set()).add(str(v))
    return {k: sorted(v) for k, v in sorted(vocab.items()) if len(v) > 1}


def case_labels(world, vocab: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """Referee targets per case: {"case": [n_cases], "coarse": [n_cases], "attr:<component>": [n_cases]}."""
    labels = {"case": torch.tensor([c.id for c in world.cases]),
              "coarse": torch.tensor([c.coarse for c in world.cases])}
    for k, values in vocab.items():
        labels[f"attr:{k}"] = torch.tensor([values.index(str(c.attrs[k])) for c in world.cases])
    return labels


def attribute_caption(case) -> str:
    """A caption that names every component ("oval face shape, brown skin, ..."), for worlds whose prompts
    do not identify the case."""
    return ", ".join(f"{str(v).replace('_', ' ')} {k.replace('_', ' ')}" for k, v in case.attrs.items())


def prompts_identify_cases(world) -> bool:
    """False when two cases share a train phrasing (e.g. DreamBooth "[V]" prompts): captions are then needed."""
    owner: dict[str, int] = {}
    for c in world.cases:
        for v in range(world.n_prompts("train")):
            p = world.prompt(c.id, v, "train")
            if owner.setdefault(p, c.id) != c.id:
                return False
    return True


def fingerprint(world, cfg: EvalConfig, seed: int) -> str:
    """Identifies (world config and cases, evaluator config, seed): cached weights are reused only on a match."""
    blob = json.dumps({"task": world.task, "world": repr(getattr(world, "cfg", None)), "world_seed":
                       getattr(world, "seed", None), "cases": [c.name for c in world.cases], "cfg": as_record(cfg),
                       "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_complete(out_dir: str | Path, world, cfg: EvalConfig, seed: int) -> bool:
    """Whether `out_dir` holds finished evaluators of (world, cfg, seed) (evaluators.json is written last)."""
    meta = read_json(Path(out_dir) / META_FILE)
    return meta is not None and meta.get("fingerprint") == fingerprint(world, cfg, seed)


def _build(role: str, world, cfg: EvalConfig, head_sizes: dict[str, int]) -> torch.nn.Module:
    n = len(world.cases)
    if role == "referee":
        return MultiHeadClassifier(world.modality, head_sizes, cfg.width, cfg.depth, cfg.dim)
    if role == "clip":
        return ContrastiveModel(world.modality, 384, cfg.width, cfg.depth, cfg.dim)
    if role in ("style", "face"):
        return Embedder("image", n, cfg.width, cfg.depth, cfg.dim, cfg.arc_scale, cfg.arc_margin)
    if role == "generic":
        return Embedder("image", 0, cfg.width, cfg.depth, cfg.dim)
    raise ValueError(f"unknown evaluator role {role!r}")


def _to_u8(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


class GroundTruthPool:
    """`per_case` ground-truth samples of every case, rendered once and shared by every evaluator's training.

    Samples come from `world.sample`, which also draws the per-sample extras (styles: content, identities: hat /
    sunglasses context), so evaluators see everything a prompt may ask for. Row r * n_cases + c holds case c.
    x [n_cases * per_case, 3, (T,) H, W] uint8, captions (one fine "train" caption per row), and where asked
    conditions [n_cases * per_case, ...] uint8 (world.condition at the same seeds). uint8 keeps a mini pool at
    ~170 MB; its 1/255 quantisation is far below the training noise. `batch(rows)` decodes to [-1, 1].
    """

    def __init__(self, world, per_case: int, seed: int, conditions: bool, chunk: int = 256):
        self.n_cases = len(world.cases)
        self.per_case = per_case
        ids = torch.arange(self.n_cases).repeat(per_case)
        xs, refs, self.captions = [], [], []
        for i, start in enumerate(tqdm(range(0, len(ids), chunk), desc=f"{world.task} ground truth", leave=False)):
            sub = ids[start:start + chunk].tolist()
            x, captions = world.sample(sub, seed=seed + i, split="train")
            xs.append(_to_u8(x))
            self.captions += captions
            if conditions:
                refs.append(_to_u8(world.condition(sub, seed=seed + i)))
        self.x = torch.cat(xs)
        self.conditions = torch.cat(refs) if conditions else None

    def batch(self, rows: torch.Tensor, conditions: bool = False) -> torch.Tensor:
        """Pooled renders (or conditions) at `rows` [B], float32 in [-1, 1]."""
        return (self.conditions if conditions else self.x)[rows].float() / 127.5 - 1

    def rows(self, ids: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """A random pooled sample of each case in ids [B] -> row indices [B]."""
        return torch.randint(0, self.per_case, (len(ids),), generator=g) * self.n_cases + ids


def _role_loss(role: str, net, world, pool: GroundTruthPool, cfg: EvalConfig, labels: dict[str, torch.Tensor],
               text: "PooledText", device: torch.device):
    """loss_fn(g) for one role, drawing batches from the ground-truth pool.

    Batches are gathered and augmented on the CPU (the generator lives there), then moved to `device`.
    """
    n_cases = len(world.cases)

    def ids_for(g, distinct=False):
        if distinct:
            return torch.randperm(n_cases, generator=g)[:cfg.batch]
        return torch.randint(0, n_cases, (cfg.batch,), generator=g)

    if role == "referee":
        def loss(g):
            ids = ids_for(g)
            x = robust_aug(pool.batch(pool.rows(ids, g)), g, cfg.noise_aug)
            _, logits = net(x.to(device))
            return sum(F.cross_entropy(logits[k], labels[k][ids].to(device)) for k in logits) / len(logits)
    elif role == "clip":
        n_plain = world.n_prompts("train")

        def loss(g):
            ids = ids_for(g, distinct=True)  # distinct cases: no false negatives among in-batch pairs
            rows = pool.rows(ids, g)
            # Half the captions are the plain fine prompt (no content / context words): both kinds get scored.
            plain = torch.rand(len(ids), generator=g) < 0.5
            variant = torch.randint(0, n_plain, (len(ids),), generator=g)
            captions = [world.prompt(int(i), int(v), "train") if p else pool.captions[int(r)]
                        for i, v, p, r in zip(ids, variant, plain, rows)]
            t = text(captions, ids.tolist()).to(device)
            x = robust_aug(pool.batch(rows), g, cfg.noise_aug).to(device)
            # CLIP's learnable inverse temperature, capped at 100
            return info_nce(net.logit_scale.exp().clamp(max=100.0) * net.encode_render(x) @ net.encode_text(t).T)
    elif role in ("style", "face"):
        def loss(g):
            ids = ids_for(g)
            rows = pool.rows(ids, g)
            x = torch.cat([random_frames(pool.batch(rows), g), pool.batch(pool.rows(ids, g), conditions=True)])
            y = torch.cat([ids, ids]).to(device)
            return F.cross_entropy(net.head(net(robust_aug(x, g, cfg.noise_aug).to(device)), y), y)
    elif role == "generic":
        def loss(g):
            x = random_frames(pool.batch(pool.rows(ids_for(g), g)), g)
            z1, z2 = (net.projector(net(view_aug(x, g, cfg.noise_aug).to(device))) for _ in range(2))
            return nt_xent(z1, z2, cfg.simclr_temperature)
    else:
        raise ValueError(f"unknown evaluator role {role!r}")
    return loss


class PooledText:
    """Texts -> mean-pooled MiniLM states [N, 384] on the CPU (encoded on `device`), cached per string (384 floats,
    not the token states).

    For worlds whose prompts do not name the case (DreamBooth "[V]"), the prompt's pooled state is averaged with
    that of the case's attribute caption: "[V]" stands for that identity, so the text side reads it as the
    identity's description. (Encoding the two apart keeps the strings few: prompts are shared by all cases.)
    """

    PROMPT_LENGTH, CAPTION_LENGTH = 32, 64  # MiniLM tokens read of a prompt and of an attribute caption

    def __init__(self, world, captions_from_attrs: bool, device: str | torch.device = "cpu"):
        self.world, self.from_attrs = world, captions_from_attrs
        self.device = torch.device(device)
        self._cache: dict[tuple[str, int], torch.Tensor] = {}

    def _pooled(self, texts: list[str], max_length: int) -> torch.Tensor:
        from lofa.models.text import TextEncoder

        missing = sorted({t for t in texts if (t, max_length) not in self._cache})
        if missing:
            # A throwaway encoder: its own per-token cache would hold [L, 384] per string for the whole run.
            pooled = mean_pool(*TextEncoder(self.device, max_length).encode(missing)).cpu()
            self._cache.update({(t, max_length): v for t, v in zip(missing, pooled)})
        return torch.stack([self._cache[(t, max_length)] for t in texts])

    def prepare(self, prompts: Sequence[str], case_ids: Sequence[int], chunk: int = 512) -> None:
        """Encode every prompt (and, in "[V]" worlds, every case's attribute caption) that training will ask for
        before it starts, `chunk` strings a forward pass in sorted order, so that a rerun encodes the same batches
        and gets the same states. A `full` CLIP pool holds ~90k distinct captions: encoded one at a time on demand
        they made each training step wait ~2 s."""
        from lofa.models.text import TextEncoder

        wanted = [(sorted(set(prompts)), self.PROMPT_LENGTH)]
        if self.from_attrs:
            captions = {attribute_caption(self.world.cases[int(i)]) for i in set(case_ids)}
            wanted.append((sorted(captions), self.CAPTION_LENGTH))
        for texts, max_length in wanted:
            missing = [t for t in texts if (t, max_length) not in self._cache]
            encoder = TextEncoder(self.device, max_length)
            for start in range(0, len(missing), chunk):
                part = missing[start:start + chunk]
                pooled = mean_pool(*encoder.encode_batch(part))
                self._cache.update({(t, max_length): v for t, v in zip(part, pooled)})

    def __call__(self, prompts: Sequence[str], case_ids: Sequence[int]) -> torch.Tensor:
        pooled = self._pooled(list(prompts), self.PROMPT_LENGTH)
        if self.from_attrs:
            captions = [attribute_caption(self.world.cases[int(i)]) for i in case_ids]
            pooled = (pooled + self._pooled(captions, self.CAPTION_LENGTH)) / 2
        return pooled


def train_evaluators(world, cfg: EvalConfig | None = None, out_dir: str | Path | None = None,
                     device: str | torch.device = "cpu", seed: int = 0) -> "Evaluators":
    """Train (or load from `out_dir`) every evaluator of `world.task` on ground-truth renders.

    Resumable: each role's weights are written atomically as `<role>.safetensors` when it finishes and are
    reused when their fingerprint (world cases, config, seed) matches; `evaluators.json` is written last.
    With out_dir=None nothing is saved. Training runs on CPU batches of world renders moved to `device`.
    """
    cfg = cfg or EvalConfig()
    if world.task not in ROLES:
        raise LofaError(f"no evaluators for task {world.task!r}; expected one of {sorted(ROLES)}")
    out = Path(out_dir) if out_dir is not None else None
    fp = fingerprint(world, cfg, seed)
    if out is not None and is_complete(out, world, cfg, seed):
        return Evaluators.load(out, world, device)

    vocab = attribute_vocab(world)
    labels = case_labels(world, vocab)
    head_sizes = {k: int(v.max()) + 1 for k, v in labels.items()}
    head_sizes["case"] = len(world.cases)
    head_sizes["coarse"] = len(world.coarse_names)
    from_attrs = not prompts_identify_cases(world)
    lo, _ = cfg.seed_range(seed)
    device = torch.device(device)

    roles = ROLES[world.task]
    pool = None
    nets, seconds, curves = {}, {}, {}
    for r, role in enumerate(roles):
        role_seed = seeds.stream(seed, "evaluators.fit", index=r)
        torch.manual_seed(role_seed)  # parameter init
        net = _build(role, world, cfg, head_sizes)
        path = out / f"{role}.safetensors" if out is not None else None
        if path is not None and path.exists():
            stored = _load_weights(net, path)
            if stored.get("fingerprint") == fp:
                nets[role] = net.to(device).eval()
                curves[role], seconds[role] = json.loads(stored["curve"]), json.loads(stored["seconds"])
                continue
        steps = {"referee": cfg.steps_referee, "clip": cfg.steps_clip, "style": cfg.steps_embed,
                 "face": cfg.steps_embed, "generic": cfg.steps_generic}[role]
        if pool is None:
            with _timed(seconds, "pool"):
                pool = GroundTruthPool(world, cfg.per_case, lo, conditions=bool({"style", "face"} & set(roles)))
        net = net.to(device)
        text = PooledText(world, from_attrs, device)
        if role == "clip":  # every caption its batches can draw: the pool's and each case's plain train prompts
            plain = [world.prompt(c, v, "train") for c in range(len(world.cases))
                     for v in range(world.n_prompts("train"))]
            text.prepare(pool.captions + plain, range(len(world.cases)))
        loss_fn = _role_loss(role, net, world, pool, cfg, labels, text, device)
        with _timed(seconds, role):
            curves[role] = fit(net, loss_fn, steps, cfg, role_seed, f"{world.task} {role}")
        stored = _rounded(net, storage_dtype(cfg.save_dtype))  # the net goes on with exactly what is stored
        if path is not None:
            save_safetensors(stored, path, metadata={
                "fingerprint": fp, "curve": json.dumps(curves[role]), "seconds": json.dumps(seconds[role])})
        nets[role] = net.eval()

    meta = {"fingerprint": fp, "task": world.task, "modality": world.modality, "config": as_record(cfg),
            "seed": seed, "vocab": vocab, "head_sizes": head_sizes, "captions_from_attrs": from_attrs,
            "train_seconds": seconds, "curves": curves}
    if world.modality == "video":
        if pool is None:
            pool = GroundTruthPool(world, cfg.per_case, lo, conditions=False)
        motion = torch.cat([scores.motion_magnitude(pool.batch(torch.arange(i, min(i + 256, len(pool.x)))),
                                                    cfg.motion_pool, cfg.motion_top)
                            for i in range(0, len(pool.x), 256)])
        meta["motion_threshold"] = scores.calibrate_motion_threshold(motion, cfg.dd_quantile)
    if out is not None:
        write_json(out / META_FILE, meta)
    return Evaluators(world, cfg, nets, meta, device)


@contextlib.contextmanager
def _timed(log: dict, key: str):
    """log[key] = {"wall": seconds, "cpu": process CPU seconds (all threads)} of the block."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    log[key] = {"wall": round(time.perf_counter() - wall, 2), "cpu": round(time.process_time() - cpu, 2)}


def _rounded(net: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`net`'s state dict with its floating tensors in `dtype`, after rounding the net's own tensors to it (they
    keep their dtype); the state dict as it is for float32."""
    if dtype == torch.float32:
        return net.state_dict()
    state = {}
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(dtype))
                state[name] = tensor.to(dtype)
            else:
                state[name] = tensor
    return state


def _load_weights(net: torch.nn.Module, path: Path) -> dict[str, str]:
    """Load `path` into `net`; returns the metadata stored with it (fingerprint, loss curve, seconds)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    net.load_state_dict(load_file(str(path)))
    return metadata


# ----------------------------------------------------------------------------- the bundle


class Evaluators:
    """Every evaluator of one world, and the metrics computed with them.

    Per-sample metrics: `score(...)`; set-level: `frechet(...)`, `face_diversity(...)`; the paper's table
    columns: `paper_metrics(...)`. Samples are tensors in the world's layout ([N, 3, T, H, W] or [N, 3, H, W]).
    """

    def __init__(self, world, cfg: EvalConfig, nets: dict[str, torch.nn.Module], meta: dict,
                 device: str | torch.device = "cpu"):
        self.world, self.cfg, self.nets, self.meta = world, cfg, nets, meta
        self.device = torch.device(device)
        self.curves: dict[str, list[float]] = meta["curves"]  # training loss per step, per role
        self.task, self.modality = meta["task"], meta["modality"]
        self._text = None
        self._labels = case_labels(world, meta["vocab"])

    @classmethod
    def load(cls, out_dir: str | Path, world, device: str | torch.device = "cpu") -> "Evaluators":
        out = Path(out_dir)
        meta = read_json(out / META_FILE)
        if meta is None:
            raise LofaError(f"no {META_FILE} in {out}; run train_evaluators(world, cfg, out_dir) first")
        if meta["task"] != world.task or len(world.cases) != meta["head_sizes"]["case"]:
            raise LofaError(f"evaluators in {out} were trained for task {meta['task']!r} with "
                            f"{meta['head_sizes']['case']} cases, not this {world.task!r} world; retrain them")
        missing = {"config", "curves", "fingerprint"} - meta.keys()
        unknown = set(meta.get("config", {})) - {f.name for f in fields(EvalConfig)}
        if missing or unknown:
            raise LofaError(f"{out / META_FILE} was written by another version of lofa (missing {sorted(missing)}, "
                            f"unknown config fields {sorted(unknown)}); delete {out} and retrain the evaluators")
        cfg = EvalConfig(**meta["config"])
        nets = {}
        for role in ROLES[meta["task"]]:
            net = _build(role, world, cfg, meta["head_sizes"])
            if _load_weights(net, out / f"{role}.safetensors").get("fingerprint") != meta["fingerprint"]:
                raise LofaError(f"{out / (role + '.safetensors')} does not belong to {out / META_FILE}; "
                                f"delete the folder and retrain")
            nets[role] = net.to(device).eval()
        return cls(world, cfg, nets, meta, device)

    # -- feature extractors (batched, no grad) --------------------------------------------------

    @torch.no_grad()
    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int = 256):
        outs = [fn(x[i:i + chunk].to(self.device).float()) for i in range(0, len(x), chunk)]
        if isinstance(outs[0], dict):
            return {k: torch.cat([o[k] for o in outs]).cpu() for k in outs[0]}
        return torch.cat(outs).cpu()

    def _check(self, samples: torch.Tensor) -> None:
        want = 5 if self.modality == "video" else 4
        if samples.ndim != want or samples.shape[1] != 3:
            layout = "[N, 3, T, H, W]" if want == 5 else "[N, 3, H, W]"
            raise LofaError(f"{self.task} samples must be {layout} in [-1, 1], got shape {tuple(samples.shape)}")

    def features(self, samples: torch.Tensor) -> torch.Tensor:
        """Referee features [N, dim] (the FVD / FID feature space)."""
        self._check(samples)
        return self._map(lambda x: self.nets["referee"](x)[0], samples)

    def logits(self, samples: torch.Tensor) -> dict[str, torch.Tensor]:
        """Referee logits {"case": [N, n_cases], "coarse": [N, n_coarse], "attr:<component>": ...}."""
        self._check(samples)
        return self._map(lambda x: self.nets["referee"](x)[1], samples)

    def render_embedding(self, samples: torch.Tensor) -> torch.Tensor:
        """CLIP-style render embedding [N, dim], unit norm."""
        return self._map(self.nets["clip"].encode_render, samples)

    def text_embedding(self, prompts: Sequence[str], case_ids: Sequence[int]) -> torch.Tensor:
        """CLIP-style text embedding [N, dim], unit norm, of each prompt meant for case_ids[i] (the case only
        matters for "[V]" worlds, where it supplies the identity's description)."""
        self._text = self._text or PooledText(self.world, self.meta["captions_from_attrs"])
        return self._map(self.nets["clip"].encode_text, self._text(prompts, case_ids))

    def _image_embedding(self, role: str, x: torch.Tensor) -> torch.Tensor:
        """Image-network embedding; videos are embedded per frame and averaged (unit-norm frame vectors)."""
        net = self.nets[role]
        if x.ndim == 5:
            n, c, t, h, w = x.shape
            frames = x.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)
            e = F.normalize(self._map(net, frames), dim=-1).view(n, t, -1)
            return F.normalize(e.mean(1), dim=-1)
        return F.normalize(self._map(net, x), dim=-1)

    def style_descriptor(self, x: torch.Tensor) -> torch.Tensor:
        """CSD-style descriptor [N, dim] of videos or images."""
        return self._image_embedding("style", x)

    def face_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """ArcFace-style identity embedding [N, dim] of face images."""
        return self._image_embedding("face", x)

    def generic_features(self, x: torch.Tensor) -> torch.Tensor:
        """Label-free SimCLR appearance features [N, dim] of images (the Face Div space)."""
        return self._image_embedding("generic", x)

    def caption(self, case_id: int, variant: int = 0, split: str = "eval") -> str:
        """The fine prompt CLIP-T is measured against by default: reserved "eval" phrasings (unseen by the
        text tower), falling back to "train" where a world reserves none."""
        if self.world.n_prompts(split) == 0:
            split = "train"
        return self.world.prompt(case_id, variant % self.world.n_prompts(split), split)

    # -- metrics ---------------------------------------------------------------------------------

    def score(self, samples: torch.Tensor, case_ids: Sequence[int], prompts: Sequence[str] | None = None,
              references: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        """Per-sample metrics, each an array [N] (higher is better for all of them):

        acc / coarse_acc / acc:<component>: the referee recognises the intended case / category / component;
        attr_acc: the fraction of the case's components it recognises (mean of the acc:<component>);
        clip_t: cosine(render emb, text emb of `prompts`) (needs prompts);
        motion, dynamic, smoothness: video worlds (dynamic: 1 above the calibrated threshold);
        with `references` (world.condition of the intended cases): csd (styles), face_sim, dino, clip_i
        (identities).
        """
        self._check(samples)
        ids = torch.as_tensor(list(case_ids))
        if len(ids) != len(samples):
            raise LofaError(f"got {len(samples)} samples but {len(ids)} case ids; pass one id per sample")
        logits = self.logits(samples)
        out = {"acc": scores.top1(logits["case"], self._labels["case"][ids]),
               "coarse_acc": scores.top1(logits["coarse"], self._labels["coarse"][ids])}
        components = [k for k in logits if k.startswith("attr:")]
        for k in components:
            out["acc:" + k[5:]] = scores.top1(logits[k], self._labels[k][ids])
        if components:
            # partial credit: exact-case recognition needs every component right at once, so at a few cases a
            # method that gets most of them right scores 0 beside one that gets none
            out["attr_acc"] = torch.stack([out["acc:" + k[5:]] for k in components]).float().mean(0)
        if prompts is not None:
            if len(prompts) != len(samples):
                raise LofaError(f"got {len(samples)} samples but {len(prompts)} prompts")
            out["clip_t"] = scores.cosine(self.render_embedding(samples),
                                          self.text_embedding(prompts, ids.tolist()))
        if self.modality == "video":
            cfg = self.cfg
            out["motion"] = scores.motion_magnitude(samples, cfg.motion_pool, cfg.motion_top)
            out["dynamic"] = (out["motion"] > self.meta["motion_threshold"]).float()
            out["smoothness"] = scores.motion_smoothness(samples)
        if references is not None:
            if len(references) != len(samples):
                raise LofaError(f"got {len(samples)} samples but {len(references)} references")
            if self.task == "styles":
                out["csd"] = scores.cosine(self.style_descriptor(samples), self.style_descriptor(references))
            elif self.task == "identities":
                out["face_sim"] = scores.cosine(self.face_embedding(samples), self.face_embedding(references))
                out["dino"] = scores.cosine(self.features(samples), self.features(references))
                out["clip_i"] = scores.cosine(self.render_embedding(samples), self.render_embedding(references))
            else:
                raise LofaError(f"{self.task} has no reference-based metric; call score without references")
        return {k: v.double().numpy() for k, v in out.items()}

    def frechet(self, samples_a: torch.Tensor, samples_b: torch.Tensor) -> float:
        """FVD / FID stand-in: Fréchet distance between referee features of two sample sets."""
        return scores.frechet_distance(self.features(samples_a), self.features(samples_b))

    def face_diversity(self, samples: torch.Tensor, case_ids: Sequence[int]) -> dict[int, float]:
        """Face Div: {case: 100 x mean pairwise (1 - cosine) of generic features among its samples}."""
        return scores.group_diversity(self.generic_features(samples), list(case_ids))

    def paper_metrics(self, samples: torch.Tensor, case_ids: Sequence[int], prompts: Sequence[str] | None = None,
                      references: torch.Tensor | None = None, real: torch.Tensor | None = None
                      ) -> dict[str, float]:
        """The paper's table columns for this task (plus ground-truth accuracies), as set means.

        real: ground-truth renders to measure the Fréchet distance against (FVD for videos, FID for images).
        """
        s = self.score(samples, case_ids, prompts, references)
        names = {"acc": "Acc (case)", "coarse_acc": "Acc (coarse)", "clip_t": "CLIP-T", "dynamic": "DD",
                 "smoothness": "MS", "csd": "CSD", "face_sim": "Face Sim", "dino": "DINO", "clip_i": "CLIP-I"}
        out = {names[k]: float(v.mean()) for k, v in s.items() if k in names}
        if real is not None:
            out["FVD" if self.modality == "video" else "FID"] = self.frechet(samples, real)
        if self.task == "identities":
            div = self.face_diversity(samples, case_ids)
            out["Face Div"] = float(np.mean(list(div.values())))
        return out


# ----------------------------------------------------------------------------- sanity


def _wrong_ids(world, ids: list[int], same_coarse: bool, g: np.random.Generator) -> list[int]:
    """A different case for every id: any other case, or one of the same coarse category where there is one."""
    by_coarse: dict[int, list[int]] = {}
    for c in world.cases:
        by_coarse.setdefault(c.coarse, []).append(c.id)
    out = []
    for i in ids:
        pool = [j for j in by_coarse[world.cases[i].coarse] if j != i] if same_coarse else []
        if not pool:
            pool = [j for j in range(len(world.cases)) if j != i]
        out.append(int(g.choice(pool)))
    return out


def evaluator_sanity_table(world, evaluators: Evaluators, seed: int, n: int = 128):
    """Known answers on fresh ground truth: right-case vs wrong-case score for every evaluator.

    Renders up to `n` cases (both splits) at seeds `seed`, `seed + 1`, ... (must lie outside the evaluators'
    training seeds) and scores each render as its own case ("right") and as a wrong case: a random other
    case, and another case of the same coarse category (the base model's typical failure). Motion rows
    compare renders with static (first frame repeated) and frame-shuffled copies; FVD/FID compares two render
    sets of the same cases with one where each coarse category collapsed onto one case.

    Returns a pandas DataFrame: metric, wrong (kind), right, wrong_score, margin (> 0: right is better), and
    right_wins: the fraction of renders whose own score beats their wrong score (paired; NaN for the set-level
    rows FVD / FID / face diversity). A margin can be small in absolute terms and still clear — motion smoothness
    lives in 0.97–0.99, as in VBench — and right_wins says whether it holds render by render.
    """
    import pandas as pd

    lo, hi = evaluators.cfg.seed_range(evaluators.meta["seed"])
    if lo <= seed + 3 and seed < hi:
        raise LofaError(f"seed {seed} overlaps the evaluators' training seeds [{lo}, {hi}); pick another")
    rng = np.random.default_rng(seed)
    n_cases = len(world.cases)
    ids = sorted(rng.choice(n_cases, size=min(n, n_cases), replace=False).tolist())
    x = world.render(ids, seed=seed)
    has_refs = world.task in ("styles", "identities")

    def per_sample(case_ids):
        """Score the renders of `ids` as if they were meant to be `case_ids`."""
        prompts = [evaluators.caption(i) for i in case_ids]
        refs = world.condition(case_ids, seed=seed + 2) if has_refs else None
        return evaluators.score(x, case_ids, prompts, refs)

    right = per_sample(ids)
    rows = []
    for kind, same in (("random case", False), ("same-coarse case", True)):
        wrong_ids = _wrong_ids(world, ids, same, rng)
        shared = {"coarse_acc"} if same else set()  # what the wrong case shares with the right one by design
        shared |= {f"acc:{k}" for k in evaluators.meta["vocab"]
                   if all(world.cases[i].attrs[k] == world.cases[j].attrs[k] for i, j in zip(ids, wrong_ids))}
        wrong = per_sample(wrong_ids)
        for k in right:
            if k in ("motion", "dynamic", "smoothness") or k in shared:
                continue  # motion does not depend on the case
            rows.append((k, kind, right[k], wrong[k]))

    if world.modality == "video":
        static = x[:, :, :1].expand_as(x).contiguous()
        t = x.shape[2]
        perm = torch.cat([torch.arange(0, t, 2), torch.arange(1, t, 2)])  # even frames, then odd: jumps back
        rows.append(("dynamic", "static clip", right["dynamic"], evaluators.score(static, ids)["dynamic"]))
        rows.append(("smoothness", "shuffled frames", right["smoothness"],
                     evaluators.score(x[:, :, perm], ids)["smoothness"]))

    x2 = world.render(ids, seed=seed + 1)
    collapsed = [min(j for j in range(n_cases) if world.cases[j].coarse == world.cases[i].coarse) for i in ids]
    name = "fvd" if world.modality == "video" else "fid"
    rows.append((name, "one case per coarse category", evaluators.frechet(x, x2),
                 evaluators.frechet(x, world.render(collapsed, seed=seed + 1))))

    if world.task == "identities":
        k = min(16, len(ids))
        rep_ids = [i for i in ids[:k] for _ in range(4)]
        div_gt = evaluators.face_diversity(world.render(rep_ids, seed=seed + 3), rep_ids)
        one = world.render(ids[:k], seed=seed + 3).repeat_interleave(4, 0)
        div_one = evaluators.face_diversity(one, rep_ids)
        rows.append(("face_div", "one sample repeated", np.mean(list(div_gt.values())),
                     np.mean(list(div_one.values()))))

    def summary(metric, kind, right_score, wrong_score):
        r, w = np.asarray(right_score, dtype=float), np.asarray(wrong_score, dtype=float)
        margin = w.mean() - r.mean() if metric in ("fvd", "fid") else r.mean() - w.mean()  # > 0: right is better
        wins = float(np.mean(r > w)) if r.ndim == 1 else float("nan")  # per-render scores only
        return metric, kind, r.mean(), w.mean(), margin, wins

    return pd.DataFrame([summary(*row) for row in rows],
                        columns=["metric", "wrong", "right", "wrong_score", "margin", "right_wins"])
