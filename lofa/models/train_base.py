"""Base-generator training: all training-split renders, COARSE captions only (world.sample(level="coarse")).

The base sees every training case, but only under its category-level caption (world.coarse_prompt), so the
fine-grained cases are not in its prior — as Wan cannot produce a particular kung-fu kick; the LoRAs add them.
Each step renders fresh appearance seeds on the fly. Every `checkpoint_every` steps the whole training state is
written atomically (`lofa.checkpoints`), so an interrupted run continues where it stopped and ends bit-identical to
an uninterrupted one.
"""
from __future__ import annotations

import concurrent.futures
import copy
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lofa import checkpoints, seeds
from lofa.config import as_record, for_task, storage_dtype
from lofa.diffusion import TimeDistribution, condition_dropout, flow_matching_loss
from lofa.errors import LofaError
from lofa.faults import check_finite
from lofa.io import read_json, write_json
from lofa.models.generator import Generator
from lofa.models.text import TextEncoder
from lofa.schedules import lr_scheduler

KIND_BY_MODALITY = {"video": "video_dit", "image": "image_unet"}


@dataclass
class BaseTrainConfig:
    """Recipe of a world's base generator: flow matching on fresh renders of every training case under their coarse
    captions (`train_base`)."""

    model_scale: str = field(default="mini", metadata={
        "help": "Preset of the generator's config: VideoDiTConfig for video worlds, ImageUNetConfig for image worlds."})
    model_overrides: dict = field(default_factory=dict, metadata={
        "help": "{field: value}: fields of that generator config that differ from its preset."})
    steps: int = field(default=2000, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=8, metadata={
        "help": "Renders per step, of random training cases, each with fresh appearance and a coarse caption."})
    lr: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate, reached after the warm-up."})
    warmup_steps: int = field(default=100, metadata={
        "help": "Steps of linear warm-up to lr; a cosine decay to lr · min_lr_ratio at the last step follows."})
    min_lr_ratio: float = field(default=0.1, metadata={
        "help": "Where the cosine decay ends, as a fraction of lr."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    grad_clip: float = field(default=1.0, metadata={"help": "Gradient-norm clip; 0 turns clipping off."})
    cond_dropout: float = field(default=0.1, metadata={
        "help": "Rate at which a sample's caption is replaced by the empty prompt, which trains the unconditional "
                "prediction that classifier-free guidance needs."})
    # The base's t distribution (`TimeDistribution`, whose defaults these are), kept as three flat fields because
    # summary.json records the config flat and the shipped bases are matched on it. The trained generator carries
    # the distribution, and its LoRAs and Stage II draw t from there: this is the only place to set it.
    t_sampling: str = field(default=TimeDistribution.mode, metadata={
        "help": "How training times t are drawn: 'logit_normal' (sigmoid of N(t_mean, t_std)) or 'uniform'. The "
                "trained generator keeps it, and LoRA training and Stage II on that base draw t the same way."})
    t_mean: float = field(default=TimeDistribution.mean, metadata={
        "help": "Mean of the normal draw inside logit-normal t sampling; larger trains more near pure noise (t = 1)."})
    t_std: float = field(default=TimeDistribution.std, metadata={
        "help": "Std of the normal draw inside logit-normal t sampling."})
    ema_decay: float = field(default=0.0, metadata={
        "help": "Decay of a constant-rate exponential moving average of the weights, which the saved generator then "
                "holds; 0: no EMA, the trained weights are saved."})
    text_length: int = field(default=32, metadata={
        "help": "Tokens the text encoder pads or cuts every caption to (its max_length)."})
    checkpoint_every: int = field(default=200, metadata={
        "help": "Steps between checkpoints of the whole training state, from which an interrupted run resumes."})
    save_dtype: str = field(default="float32", metadata={
        "help": "dtype of the saved generator's weights: 'float32', 'bfloat16' or 'float16' (the shipped `full` "
                "bases, to fit the repository's file budget). Training keeps float32 weights; the final ones are "
                "rounded to this dtype and the run goes on with exactly what was saved."})
    task_overrides: dict = field(default_factory=dict, metadata={
        "help": "{task: {field: value}}: fields that differ for one world's base (`lofa.config.for_task`); they "
                "replace the fields above, not merge into them."})

    RECORDED_IF_SET = ("save_dtype",)  # the shipped mini bases were recorded before it (`lofa.config.as_record`)

    # mini / full: actions bases get the position planes (Generator._with_positions); without them a mini base did
    # not learn where the figure is.
    PRESETS = {
        "smoke": {"model_scale": "smoke", "steps": 20, "batch_size": 4, "warmup_steps": 5, "checkpoint_every": 10},
        "mini": {"batch_size": 32, "steps": 4000, "warmup_steps": 200, "ema_decay": 0.999,
                 "task_overrides": {"actions": {"model_overrides": {"position_channels": 3}},
                                    "identities": {"batch_size": 64}}},
        # full: one GPU lease trains the three tasks' bases side by side (`lofa pretrain --scale full`), each ≤ 25
        # min with its evaluators; 4x mini's renders a step; saved in bfloat16 for the repository's file budget
        "full": {"model_scale": "full", "steps": 6000, "batch_size": 128, "warmup_steps": 300, "ema_decay": 0.999,
                 "checkpoint_every": 1000, "save_dtype": "bfloat16",
                 "task_overrides": {"actions": {"model_overrides": {"position_channels": 3}}}},
    }

    def __post_init__(self):
        storage_dtype(self.save_dtype)  # a typo fails here, not after the training

    def for_task(self, task: str) -> "BaseTrainConfig":
        """This config with `task_overrides[task]` applied (`lofa.config.for_task`)."""
        return for_task(self, task)

    @property
    def t_distribution(self) -> TimeDistribution:
        """The distribution t_sampling / t_mean / t_std describe; the trained generator carries it."""
        return TimeDistribution(mode=self.t_sampling, mean=self.t_mean, std=self.t_std)


def record(cfg: BaseTrainConfig) -> dict:
    """The config as summary.json stores it (`as_record`; JSON turns tuples into lists), for completeness checks."""
    return json.loads(json.dumps(as_record(cfg)))


def is_complete(out_dir: str | Path, cfg: BaseTrainConfig, seed: int) -> bool:
    """Whether `out_dir` holds a finished base of (`cfg` resolved for its task, `seed`): summary.json is
    written last."""
    summary = read_json(Path(out_dir) / "summary.json")
    return summary is not None and summary["config"] == record(cfg) and summary["seed"] == seed


def train_base(world, cfg: BaseTrainConfig, out_dir, device: str | torch.device = "cpu", seed: int = 0,
               progress: bool = True) -> Generator:
    """Train (or resume, or just load) the base generator of `world`; returns it in eval mode on `device`.

    out_dir/generator/ — the trained Generator (diffusers folder); out_dir/loss.json — per-step loss and lr;
    out_dir/summary.json — config, wall time, steps/s (written last: its presence means the run is complete);
    out_dir/checkpoints/ — resumable training state (`lofa.checkpoints`: step-XXXXXXX/ with generator.safetensors,
    ema.safetensors when ema_decay > 0, trainer.pt and rng-0.pt, then latest.json; the newest only, removed once
    complete). A checkpoint written with another config or seed is refused. A NaN or inf loss or gradient norm
    stops training with a LofaError naming the step and the checkpoint a rerun resumes from, before the optimizer
    step, so the checkpoint never holds non-finite weights.
    """
    out_dir = Path(out_dir)
    device = torch.device(device)
    cfg = cfg.for_task(world.task)
    if is_complete(out_dir, cfg, seed):
        return Generator.load(out_dir / "generator", device=device).eval()

    kind = KIND_BY_MODALITY.get(world.modality)
    if kind is None:
        raise LofaError(f"world modality {world.modality!r} has no base generator; expected 'video' or 'image'")
    train_ids = torch.tensor(world.ids("train"))
    text = TextEncoder(device=device, max_length=cfg.text_length)  # caches each distinct caption once
    uncond, uncond_mask = text.encode([""])

    torch.manual_seed(seeds.stream(seed, "base.init"))
    gen = Generator.build(kind, cfg.model_scale, cfg.model_overrides, cfg.t_distribution).to(device).train()
    ema = copy.deepcopy(gen).requires_grad_(False) if cfg.ema_decay > 0 else None
    opt = torch.optim.AdamW(gen.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = lr_scheduler(opt, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, decay="cosine",
                         min_ratio=cfg.min_lr_ratio)
    log = {"step": [], "loss": [], "lr": []}
    start, wall = 0, 0.0

    ckpt_dir = out_dir / checkpoints.FOLDER
    modules = {"generator": gen} if ema is None else {"generator": gen, "ema": ema}
    process = checkpoints.OneProcess(device)
    run = {"config": record(cfg), "seed": seed}
    resumed = checkpoints.load(ckpt_dir, modules, opt, sched, accelerator=process, expect=run)
    if resumed is not None:
        log, start, wall = resumed["history"], resumed["step"], resumed["extra"]["wall"]
    last_good = checkpoints.latest(ckpt_dir)  # where a non-finite error says to resume from

    def checkpoint(step: int) -> Path:
        # the newest only: a base's checkpoint is there to resume from, never to go back to
        return checkpoints.save(ckpt_dir, step, modules, opt, sched, log, extra={**run, "wall": wall}, keep=1,
                                accelerator=process)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"base {world.task}",
               disable=not progress)
    draw = functools.partial(_draw_batch, world, train_ids, cfg.batch_size, seed)
    # On a GPU the CPU renders of the next step overlap this step's kernels (a thread: torch's ops release the GIL);
    # on a CPU the renders and the step share the same cores, so they take turns.
    prefetch = concurrent.futures.ThreadPoolExecutor(1) if device.type == "cuda" else None
    upcoming = prefetch.submit(draw, start) if prefetch and start < cfg.steps else None
    for step in bar:
        t0 = time.perf_counter()
        if prefetch:
            g, x0, prompts = upcoming.result()
            if step + 1 < cfg.steps:
                upcoming = prefetch.submit(draw, step + 1)
        else:
            g, x0, prompts = draw(step)
        x0 = x0.to(device)
        context, mask = text.encode(prompts)
        context, mask = condition_dropout(context, mask, uncond, uncond_mask, cfg.cond_dropout, generator=g)
        with autocast:
            loss = flow_matching_loss(gen, x0, context, mask, generator=g, times=gen.t_distribution)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # before the optimizer step, so no weight (and no checkpoint) gets a NaN
        check_finite(loss.detach(), f"base generator ({world.task}) loss", step + 1, last_good)
        if cfg.grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(gen.parameters(), cfg.grad_clip)
            # an inf gradient under a finite loss (an overflow in the backward pass) would make every weight NaN
            check_finite(grad_norm, f"base generator ({world.task}) gradient norm", step + 1, last_good)
        opt.step()
        sched.step()
        if ema is not None:
            # A constant decay, not diffusers' EMAModel: its default decay ramps as (1 + step) / (10 + step) up to
            # the cap, another average than the one the shipped bases were trained with (their recipe says
            # ema_decay, constant), so using it would make every shipped base a different recipe.
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(gen.parameters()), 1 - cfg.ema_decay)
        wall += time.perf_counter() - t0
        log["step"].append(step)
        log["loss"].append(loss.item())
        log["lr"].append(sched.get_last_lr()[0])
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            last_good = (step + 1, checkpoint(step + 1))

    if prefetch:
        prefetch.shutdown()
    final = (ema if ema is not None else gen).eval()
    final.save(out_dir / "generator", dtype=storage_dtype(cfg.save_dtype))  # rounds `final` to what it stores
    write_json(out_dir / "loss.json", log)
    write_json(out_dir / "summary.json", {
        "config": record(cfg), "seed": seed, "task": world.task, "kind": kind, "device": str(device),
        "parameters": sum(p.numel() for p in gen.parameters()), "train_cases": len(train_ids),
        "wall_s": wall, "steps_per_s": cfg.steps / wall if wall else None,
        "final_loss": sum(log["loss"][-50:]) / max(1, len(log["loss"][-50:]))})
    checkpoints.discard(ckpt_dir)
    return final


def _draw_batch(world, train_ids: torch.Tensor, batch_size: int, seed: int, step: int):
    """The training batch of `step`: (generator for the step's other draws, renders x0 [B, 3, (T,) H, W] of random
    training cases, their coarse captions). Every draw is a function of (seed, step), so a resumed run replays
    exactly."""
    step_seed = seeds.stream(seed, "base.batch", step=step)
    g = torch.Generator().manual_seed(step_seed)
    pick = torch.randint(len(train_ids), (batch_size,), generator=g)
    # renders with coarse captions (world.coarse_prompt, plus the per-sample content words where the world has
    # them), fresh appearance every step
    x0, prompts = world.sample(train_ids[pick].tolist(), seed=step_seed, level="coarse")
    return g, x0, prompts


def training_summary(runs: dict[str, tuple[str | Path, Generator]]):
    """Notebook 02's record of the base generators' training, read from each training folder's loss.json and
    summary.json. runs: {task: (training folder, its Generator)}. Returns (table, curves): table one row per task —
    task, generator, parameters (M), steps, final loss (last 10 %) (the mean over the last tenth of the steps), wall
    time (min); curves {task: pandas Series of the per-step flow-matching loss, indexed by step}."""
    import pandas as pd

    rows, curves = [], {}
    for task, (folder, gen) in runs.items():
        log = read_json(Path(folder) / "loss.json")
        summary = read_json(Path(folder) / "summary.json")
        if log is None or summary is None:
            raise LofaError(f"{folder} holds no finished base training (loss.json, summary.json); train it with "
                            "`lofa pretrain` or Run.base")
        curve = pd.Series(log["loss"], index=log["step"])
        curves[task] = curve
        last_tenth = curve.iloc[-max(1, len(curve) // 10):]
        rows.append({"task": task, "generator": gen.kind,
                     "parameters (M)": sum(p.numel() for p in gen.parameters()) / 1e6, "steps": len(curve),
                     "final loss (last 10 %)": float(last_tenth.mean()), "wall time (min)": summary["wall_s"] / 60})
    return pd.DataFrame(rows), curves
