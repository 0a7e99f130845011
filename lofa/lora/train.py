"""Per-case LoRA training with peft (the paper's per-case baseline), and using a LoRA on a base generator.

One LoRA per case: rank-r adapters on the paper's targets (q, k, v, o of self- and cross-attention in every
block; optionally the FFN) trained with the flow-matching loss on fresh renders of the case, captioned with the
case's train-split phrasings. Identity prompts carry the "[V]" identifier (DreamBooth); `prior_weight` > 0 adds
DreamBooth's prior preservation on coarse-prompt renders of other cases of the same coarse category.

`CaseStream` holds everything one LoRA's training draws (initial factors, samples, captions, t, noise) from a
private generator, so a LoRA trained alone here and inside a batch by `lofa.lora.batched` sees the same numbers
and ends at the same weights. t is drawn from the base generator's own distribution (`Generator.t_distribution`):
a LoRA refines the base's denoising task, so the recipe has no t distribution of its own.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lofa import seeds as seed_streams
from lofa.config import for_task
from lofa.diffusion import TimeDistribution, check_precision, flow_matching_loss
from lofa.errors import LofaError
from lofa.lora.formats import LoraFactor, LoraWeights, check_compatible
from lofa.models.text import text_encoder
from lofa.response import delta_w
from lofa.schedules import lr_scheduler


@dataclass
class LoraTrainConfig:
    """Recipe of one per-case LoRA. The batched trainer trains `group_size` of them per forward/backward."""

    rank: int = field(default=4, metadata={"help": "LoRA rank r of every adapter: A is [r, in], B is [out, r]."})
    alpha: float = field(default=4.0, metadata={"help": "LoRA alpha: ΔW = (alpha / rank) · B @ A."})
    include_ffn: bool = field(default=False, metadata={
        "help": "Also adapt the two linear layers of every block's feed-forward network; False adapts q, k, v and "
                "the output of self- and cross-attention only, as the paper does."})
    steps: int = field(default=100, metadata={"help": "Optimizer steps of each LoRA."})
    batch_size: int = field(default=2, metadata={
        "help": "Renders of the case per step (as many prior-preservation renders again when prior_weight > 0)."})
    lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate from the first step on (no warm-up)."})
    # "constant" in every preset: the cosine decay removes the last steps' gradient noise from the weights, so two
    # LoRAs of one case agree more, but that noise barely changes what a LoRA generates and the decay lowers
    # recognition at equal lr (figures/bench/lora_sweep_replicates_mini_h100.csv).
    lr_schedule: str = field(default="constant", metadata={
        "help": "Learning-rate schedule: 'constant', or 'cosine' (decays to 0 at the last step)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay of the LoRA factors."})
    max_grad_norm: float = field(default=1.0, metadata={
        "help": "Gradient-norm clip, applied to each LoRA's factors on their own (also inside a batched group)."})
    n_renders: int = field(default=16, metadata={
        "help": "Renders of the case drawn once per LoRA, each with its own appearance and train phrasing; every "
                "step draws batch_size of them."})
    prior_weight: float = field(default=0.0, metadata={
        "help": "Weight λ of DreamBooth's prior-preservation loss, on coarse-captioned renders of the other training "
                "cases of the case's coarse category; 0 turns it off."})
    precision: str = field(default="fp32", metadata={
        "help": "'fp32', or 'bf16': the generator's forward runs under bf16 autocast, while the LoRA weights and "
                "the loss stay float32."})
    group_size: int = field(default=32, metadata={
        "help": "LoRAs trained together per forward / backward by the batched trainer (lofa.lora.batched); it does "
                "not change their weights, so a zoo's recipe check ignores it."})
    # A short LoRA run moves A little, so ΔW = B A stays near the row space of its initial A: with per-case inits the
    # zoo's ΔW lie in unrelated random subspaces and no hypernetwork can predict them from the condition. A shared
    # init makes ΔW a function of the case.
    shared_init: bool = field(default=True, metadata={
        "help": "Start every LoRA of a zoo from one A drawn from the zoo seed (B = 0); False draws each LoRA's own "
                "A from its case's seed stream."})
    # With one frozen A for the whole zoo, ΔW = B·A lies in one row space per module and a LoRA is its B alone:
    # replicates of a case then differ only in what B learned, not in how A drifted.
    train_a: bool = field(default=True, metadata={
        "help": "Train A as well as B; False keeps A at its initialisation (with shared_init the zoo's one A) and "
                "trains B alone."})
    task_overrides: dict = field(default_factory=dict, metadata={
        "help": "{task: {field: value}}: fields of this recipe that differ for one world (`lofa.config.for_task`). "
                "The trainers and the zoo resolve it for the world they are given, and a zoo's index stores the "
                "resolved recipe."})

    PRESETS = {
        "smoke": {"steps": 10, "n_renders": 4, "group_size": 8},
        # mini: the recipe of an H200 sweep on the shipped mini bases (figures/bench/lora_sweep_mini_h200.csv, 48
        # cases a task; exact-case recognition of LoRA samples as a fraction of ground truth's, target >= 0.5):
        # FFN adapters, and per task the best point. The zoo is trained on the GPU and ships with the package
        # (data/pretrained/mini/<task>/zoo/), as the paper's LoRA collection comes trained.
        "mini": {"include_ffn": True, "task_overrides": {
            "actions": {"steps": 400, "batch_size": 16, "lr": 5e-3},
            "styles": {"steps": 400, "batch_size": 8},
            "identities": {"steps": 200}}},
        # full: mini's recipe (the full bases are mini's networks, deeper) on the GPU, 256 LoRAs a forward / backward:
        # at 32 a group, 800 mini LoRAs took 8 min on an H100, the step launch-bound
        "full": {"include_ffn": True, "group_size": 256, "task_overrides": {
            "actions": {"steps": 400, "batch_size": 16, "lr": 5e-3},
            "styles": {"steps": 400, "batch_size": 8},
            "identities": {"steps": 200}}},
        # Wan2.1-1.3B at the paper's adapter shape; a LoRA there is trained alone or a few at a time.
        "wan": {"rank": 32, "alpha": 32.0, "steps": 2000, "batch_size": 1, "n_renders": 64, "lr": 1e-4,
                "precision": "bf16", "group_size": 4},
    }

    def for_task(self, task: str) -> "LoraTrainConfig":
        """This recipe with `task_overrides[task]` applied (`lofa.config.for_task`)."""
        return for_task(self, task)

    def __post_init__(self):
        check_precision(self.precision)
        if self.lr_schedule not in ("constant", "cosine"):
            raise LofaError(f"unknown lr_schedule {self.lr_schedule!r}; use 'constant' or 'cosine'")


LoraTrainConfig.PRESETS["paper"] = LoraTrainConfig.PRESETS["wan"]


def recipe(cfg: LoraTrainConfig, t_distribution: TimeDistribution) -> dict:
    """What a LoRA is trained with, as a zoo's index and each LoRA's metadata record it: the recipe's fields and the
    base's t distribution under t_sampling / t_mean / t_std (the keys of the recipe when it still held them, so
    zoos written then and now compare equal)."""
    return {**asdict(cfg), **t_distribution.record()}


def case_seeds(seed: int, case_id: int) -> dict[str, int]:
    """Independent seeds of one LoRA (renders, prior renders, training stream, condition), from (seed, case)."""
    return {k: seed_streams.stream(seed, f"lora.{k}", case=case_id) for k in ("render", "prior", "stream", "condition")}


def shared_init_seed(seed: int) -> int:
    """Seed of the initial A shared by every LoRA of a zoo (LoraTrainConfig.shared_init)."""
    return seed_streams.stream(seed, "lora.init")


def init_factors(shapes: dict[str, tuple[int, int]], rank: int, generator: torch.Generator
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """peft's default LoRA init drawn from `generator`: A [r, in] ~ U(±1/sqrt(in)) (kaiming a=√5), B [out, r] = 0."""
    factors = {}
    for name, (out_features, in_features) in shapes.items():
        bound = in_features ** -0.5
        a = (torch.rand((rank, in_features), generator=generator, device=generator.device) * 2 - 1) * bound
        factors[name] = (a, torch.zeros(out_features, rank, device=generator.device))
    return factors


class CaseStream:
    """One LoRA's training data: a pool of captioned renders of its case, and a private RNG.

    Fine pool: `world.sample` renders of the case [P, 3, (T,) H, W] (appearance random per render) with a random
    train-split phrasing each, which also names the render's per-sample extras (styles: content; identities:
    hat / sunglasses). Prior pool (prior preservation only): renders of other train cases of the same coarse
    category with coarse captions. Captions are kept as token states [P, L, D] and masks [P, L].
    t_distribution: the base generator's (`Generator.t_distribution`), which every step's t is drawn from.
    """

    def __init__(self, world, text, case_id: int, cfg: LoraTrainConfig, seed: int, device, dtype=torch.float32,
                 replicate: int = 0, new_renders: bool = False, *, t_distribution: TimeDistribution):
        self.case = world.cases[case_id]
        self.task = world.task
        self.cfg = cfg
        self.t_distribution = t_distribution
        self.seed = seed
        self.seeds = case_seeds(seed, case_id)
        stream, render = self.seeds["stream"], self.seeds["render"]
        if replicate:  # same init, another draw of batches, t and noise (lofa bench replicates); renders too if asked
            stream = seed_streams.stream(stream, "lora.replicate", index=replicate)
            if new_renders:
                render = seed_streams.stream(render, "lora.replicate", index=replicate)
        self.rng = torch.Generator(device).manual_seed(stream)
        self.prompts = [world.prompt(case_id, v, "train") for v in range(world.n_prompts("train"))]
        self.pools = [self._pool(world, text, [case_id] * cfg.n_renders, render, "fine", device, dtype)]
        if cfg.prior_weight > 0:
            others = [i for i in world.ids("train") if world.cases[i].coarse == self.case.coarse and i != case_id]
            if not others:
                raise LofaError(f"case {case_id} has no other train case in its coarse category, so prior "
                                f"preservation has no data; set prior_weight=0")
            pick = np.random.default_rng(self.seeds["prior"]).choice(others, cfg.n_renders).tolist()
            self.pools.append(self._pool(world, text, pick, self.seeds["prior"], "coarse", device, dtype))

    @staticmethod
    def _pool(world, text, ids, seed, level, device, dtype):
        x, captions = world.sample(ids, seed, split="train", level=level)
        context, mask = text.encode(captions)
        return x.to(device, dtype), context.to(device, dtype), mask.to(device)

    @property
    def samples_per_step(self) -> int:
        return self.cfg.batch_size * len(self.pools)

    def init_factors(self, shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The LoRA's initial (A, B): the zoo's shared A (cfg.shared_init) or one from this case's stream."""
        dtype = self.pools[0][0].dtype
        g = self.rng
        if self.cfg.shared_init:
            g = torch.Generator(self.rng.device).manual_seed(shared_init_seed(self.seed))
        return {n: (a.to(dtype), b.to(dtype)) for n, (a, b) in init_factors(shapes, self.cfg.rank, g).items()}

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next step's samples: x0 [S, ...], context [S, L, D], mask [S, L], t [S], noise [S, ...].

        S = batch_size fine samples, followed by batch_size prior samples when prior preservation is on.
        """
        b = self.cfg.batch_size
        parts = []
        for x, context, mask in self.pools:
            pick = torch.randint(len(x), (b,), generator=self.rng, device=x.device)
            t = self.t_distribution.sample(b, self.rng, x.device).to(x.dtype)
            noise = torch.randn((b, *x.shape[1:]), generator=self.rng, device=x.device, dtype=x.dtype)
            parts.append(dict(x0=x[pick], context=context[pick], mask=mask[pick], t=t, noise=noise))
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def info(self, losses: torch.Tensor, prior_losses: torch.Tensor | None, wall_time_s: float, trainer: str) -> dict:
        """The LoRA's metadata. losses / prior_losses: per-step training losses [steps].

        final_loss is the mean over the last tenth of the steps (one step's loss is noisy in t and noise).
        """
        window = max(1, len(losses) // 10)
        curve = losses[:: max(1, len(losses) // 20)]
        return {
            "task": self.task, "case_id": self.case.id, "case_name": self.case.name, "split": self.case.split,
            "coarse": self.case.coarse, "prompts": self.prompts, "condition_seed": self.seeds["condition"],
            "seed": self.seed, **recipe(self.cfg, self.t_distribution), "trainer": trainer,
            "final_loss": float(losses[-window:].mean()),
            "final_prior_loss": None if prior_losses is None else float(prior_losses[-window:].mean()),
            "loss_curve": [round(float(x), 6) for x in curve], "wall_time_s": wall_time_s,
        }


def lora_losses(gen, batches: list[dict[str, torch.Tensor]], cfg: LoraTrainConfig
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward over G LoRAs' batches (concatenated in order, S samples each, the first batch_size fine).

    Returns per-LoRA mean losses fine [G] and prior [G] (None without prior samples). Summing per-LoRA means (not
    one mean over the whole batch) gives each LoRA exactly the gradient it would get alone.
    """
    cat = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    with torch.autocast(cat["x0"].device.type, torch.bfloat16, enabled=cfg.precision == "bf16"):
        per_sample = flow_matching_loss(gen, cat["x0"], cat["context"], cat["mask"], t=cat["t"], noise=cat["noise"],
                                        reduction="none").view(len(batches), -1)
    prior = per_sample[:, cfg.batch_size:].mean(1) if per_sample.shape[1] > cfg.batch_size else None
    return per_sample[:, :cfg.batch_size].mean(1), prior


def make_optimizer(params: list[torch.Tensor], cfg: LoraTrainConfig
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW and the recipe's lr schedule (stepped once per training step). AdamW's state is per element, so
    stacked adapters [G, ...] keep G independent optimizer states."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return opt, lr_scheduler(opt, warmup_steps=0, total_steps=cfg.steps, decay=cfg.lr_schedule)


def train_steps(gen, streams: Sequence[CaseStream], params: list[torch.Tensor], cfg: LoraTrainConfig,
                clip: Callable[[list[torch.Tensor], float], Any], *, desc: str, progress: bool = False,
                after_step: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """cfg.steps training steps of the G LoRAs of `streams` (the loop of `train_lora`, G = 1, and of
    `lofa.lora.batched.train_lora_batch`): one forward over their next batches, the backward pass of
    Σ fine + prior_weight · Σ prior, clip(params, cfg.max_grad_norm), then AdamW and the lr schedule.

    params: the LoRAs' factors, installed in `gen` (peft's adapter of one LoRA, or stacks [G, ...]); clip: how the
    gradient is clipped (one LoRA's norm, or each stacked LoRA's own); after_step(step): called after each step,
    1-based (e.g. to copy the factors). Returns per-step losses fine [steps, G] and prior [steps, G] (None without
    prior preservation), on the CPU.
    """
    opt, sched = make_optimizer(params, cfg)
    losses, prior_losses = [], []
    for step in tqdm(range(cfg.steps), desc=desc, leave=False, disable=not progress):
        fine, prior = lora_losses(gen, [s.next_batch() for s in streams], cfg)
        objective = fine.sum() + (cfg.prior_weight * prior.sum() if prior is not None else 0)
        objective.backward()
        clip(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(fine.detach())
        if prior is not None:
            prior_losses.append(prior.detach())
        if after_step is not None:
            after_step(step + 1)
    # .cpu() waits for the device, so a wall time taken after this is complete
    return torch.stack(losses).cpu(), torch.stack(prior_losses).cpu() if prior_losses else None


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Freeze every parameter of `module` for the block, then restore each one's requires_grad."""
    flags = {p: p.requires_grad for p in module.parameters()}
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _dtype(gen: nn.Module) -> torch.dtype:
    return next(gen.parameters()).dtype


def train_lora(gen, world, case_id: int, cfg: LoraTrainConfig, seed: int = 0, device="cpu", *, text=None,
               progress: bool = False, init: LoraWeights | None = None, snapshots: Sequence[int] = ()
               ) -> tuple[LoraWeights, dict]:
    """Train one LoRA for `case_id` with peft on `gen.net`; `gen` comes back unchanged.

    gen: a `lofa.models.Generator` (on `device`); text: a TextEncoder (default: MiniLM on `device`).
    init: start from this LoRA instead of the recipe's init (B = 0), e.g. LoFA's prediction for the case (the
    paper's "LoFA as an initialisation"): every target module with the recipe's rank; its alpha is honoured (B is
    rescaled to the recipe's alpha / rank, so ΔW at step 0 is the given LoRA's). The renders, batches, t and noise
    are the same as without it. snapshots: steps (0 <= s <= cfg.steps) after which the LoRA is copied, returned in
    metadata["snapshots"] {step: LoraWeights} (step 0: the start). A LoRA whose loss or factors go NaN or inf
    raises a LofaError naming the case and the step (`divergence`).
    Returns (weights {module_name: LoraFactor(A [r, in], B [out, r], alpha)}, metadata dict).
    """
    from peft import LoraConfig

    if getattr(gen.net, "peft_config", None):
        raise LofaError("the generator already carries peft adapters; unload them (gen.net.unload_lora()) first")
    cfg = cfg.for_task(world.task)
    targets = gen.lora_target_modules(cfg.include_ffn)
    bad_steps = [s for s in snapshots if not 0 <= int(s) <= cfg.steps]
    if bad_steps:
        raise LofaError(f"snapshot step {bad_steps[0]} is outside 0..{cfg.steps}; snapshot steps the run takes")
    if init is not None:
        check_init(init, targets, cfg.rank)
    text = text_encoder(text, device)
    start = time.perf_counter()
    stream = CaseStream(world, text, case_id, cfg, seed, device, _dtype(gen), t_distribution=gen.t_distribution)
    with frozen(gen):
        gen.net.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=targets,
                                       lora_dropout=0.0), adapter_name="lofa")
        try:
            layers = {name: gen.net.get_submodule(name) for name in targets}
            params = []
            inits = stream.init_factors({n: tuple(l.base_layer.weight.shape) for n, l in layers.items()})
            if init is not None:
                recipe_scale = cfg.alpha / cfg.rank
                inits = {n: (init[n].A, init[n].B * (init[n].scale / recipe_scale)) for n in layers}
            with torch.no_grad():
                for name, layer in layers.items():
                    layer.lora_A["lofa"].weight.copy_(inits[name][0])
                    layer.lora_B["lofa"].weight.copy_(inits[name][1])
                    layer.lora_A["lofa"].weight.requires_grad_(cfg.train_a)
                    params += [layer.lora_A["lofa"].weight] if cfg.train_a else []
                    params += [layer.lora_B["lofa"].weight]

            def current() -> LoraWeights:
                return {name: LoraFactor(layer.lora_A["lofa"].weight.detach().clone(),
                                         layer.lora_B["lofa"].weight.detach().clone(), float(cfg.alpha))
                        for name, layer in layers.items()}

            taken = {0: current()} if 0 in snapshots else {}

            def snapshot(step: int) -> None:
                if step in snapshots:
                    taken[step] = current()

            losses, prior_losses = train_steps(gen, [stream], params, cfg, torch.nn.utils.clip_grad_norm_,
                                               desc=f"LoRA case {case_id}", progress=progress, after_step=snapshot)
            weights = current()
        finally:
            gen.net.unload_lora()
    losses = losses[:, 0]
    prior_losses = None if prior_losses is None else prior_losses[:, 0]
    why = divergence(losses, prior_losses, weights)
    if why is not None:
        raise LofaError(f"the LoRA of case {case_id} diverged: {why}; {DIVERGED_FIX}")
    info = stream.info(losses, prior_losses, time.perf_counter() - start, "peft")
    if init is not None:
        info["init"] = "given"
    if snapshots:
        info["snapshots"] = taken
    return weights, info


# What to change when a LoRA's training diverges.
DIVERGED_FIX = "lower the learning rate (LoraTrainConfig.lr) or train in fp32 (precision) and rerun"


def divergence(losses: torch.Tensor, prior_losses: torch.Tensor | None, weights: LoraWeights) -> str | None:
    """Why one LoRA's training diverged, or None when it did not: a NaN or inf in its per-step losses [steps] or
    prior losses [steps] (None: no prior preservation), or in its final factors.

    Checked once after training, not at every step: a per-step check would wait for the device at every step.
    """
    for what, curve in (("loss", losses), ("prior loss", prior_losses)):
        if curve is not None and not torch.isfinite(curve).all():
            step = int((~torch.isfinite(curve)).nonzero()[0, 0])
            return f"its {what} is {float(curve[step])} at step {step + 1}"
    for name, f in weights.items():
        if not (torch.isfinite(f.A).all() and torch.isfinite(f.B).all()):
            return f"its factors at {name!r} are not finite"
    return None


def check_init(init: LoraWeights, targets: Sequence[str], rank: int) -> None:
    """A LoRA to start training from must adapt exactly `targets`, each with the recipe's rank."""
    missing = [n for n in targets if n not in init]
    if missing:
        raise LofaError(f"the initial LoRA has no factors for {missing[0]!r}; start from a LoRA of this base and "
                        "recipe (its target modules)")
    extra = sorted(set(init) - set(targets))
    if extra:
        raise LofaError(f"the initial LoRA adapts {extra[0]!r}, which this recipe does not train; use a LoRA of the "
                        "same target modules")
    wrong = [n for n in targets if init[n].rank != rank]
    if wrong:
        raise LofaError(f"the initial LoRA has rank {init[wrong[0]].rank} at {wrong[0]!r}, the recipe rank {rank}; "
                        "predict or import it at the recipe's rank")


# ---------------------------------------------------------------------------------------------------------------
# Using a LoRA: merge ΔW into the base weights (fast generation) or a functional view (gradients to the factors).


def check_lora(net: nn.Module, weights: LoraWeights) -> None:
    """Refuse a LoRA whose modules or shapes do not match `net`'s linear layers, naming the first mismatch."""
    check_compatible(weights, {n: tuple(m.weight.shape) for n, m in net.named_modules() if isinstance(m, nn.Linear)})


def _delta(f: LoraFactor, w: torch.Tensor) -> torch.Tensor:
    """ΔW [out, in] on w's device and in w's dtype."""
    return delta_w(f.A.to(w.device), f.B.to(w.device), f.scale, w.dtype)


def _net(gen) -> nn.Module:
    return getattr(gen, "net", gen)


def merge_lora(gen, weights: LoraWeights, scale: float = 1.0) -> None:
    """Add scale · ΔW to the base weights in place (permanent; see `apply_lora` for a reversible merge)."""
    net = _net(gen)
    check_lora(net, weights)
    with torch.no_grad():
        for name, f in weights.items():
            w = net.get_submodule(name).weight
            w += scale * _delta(f, w)


@contextlib.contextmanager
def apply_lora(gen, weights: LoraWeights, scale: float = 1.0) -> Iterator:
    """Generate with a LoRA: merge it into `gen` for the block, then restore the exact original weights.

    Merging costs one matmul per module and makes the LoRA free at every sampling step.
    """
    net = _net(gen)
    check_lora(net, weights)
    originals = {name: net.get_submodule(name).weight.detach().clone() for name in weights}
    try:
        merge_lora(gen, weights, scale)
        yield gen
    finally:
        with torch.no_grad():
            for name, w in originals.items():
                net.get_submodule(name).weight.copy_(w)


def merged_weights(gen: nn.Module, weights: LoraWeights, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """{parameter name in gen: W + scale · ΔW} for `torch.func.functional_call(gen, merged, args)`.

    Differentiable in the factors, so a loss through the generator reaches whatever produced them.
    """
    net = _net(gen)
    check_lora(net, weights)
    prefix = next(n for n, m in gen.named_modules() if m is net)
    prefix = f"{prefix}." if prefix else ""
    merged = {}
    for name, f in weights.items():
        w = net.get_submodule(name).weight
        merged[f"{prefix}{name}.weight"] = w + scale * _delta(f, w)
    return merged
