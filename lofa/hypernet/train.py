"""Training both stages: objectives, optimizer, schedule, and the loop.

The loop runs through `accelerate.Accelerator`, so one script runs on a CPU, one GPU, or several under
`accelerate launch`. Master weights and AdamW states stay float32; on CUDA the compute runs under bf16 autocast
(pure-bf16 weights, as in the authors' preview code, lose every update below half a bf16 ulp). Checkpoints
(`lofa.checkpoints`: out_dir/checkpoints/step-XXXXXXX/ with model.safetensors, trainer.pt and every process's
rng-<process>.pt, then latest.json) hold the model, optimizer, schedule, step, history and every process's RNG, each
file written atomically, and a run started again with the same arguments continues where the last complete
checkpoint left off (the authors' preview code crashes on resume).

Batches come from `batch_fn(step, process_index) -> LoraBatch`, a pure function of the step (seed a generator
with it), so a resumed run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from lofa.response import response_map
from lofa import checkpoints, seeds
from lofa.config import TAU
from lofa.errors import LofaError
from lofa.faults import check_finite
from lofa.hypernet.losses import DiffusionLossFn, Factors, delta, delta_fidelity, stage1_loss, stage2_loss
from lofa.hypernet.model import Stage1
from lofa.hypernet.tokenizer import BaseWeights
from lofa.io import write_json
from lofa.schedules import lr_scheduler

# Where the cosine decay of the hypernetwork's and Text-to-LoRA's learning rate ends, as a fraction of TrainConfig.lr.
MIN_LR_RATIO = 0.1


@dataclass
class TrainConfig:
    """The training loop (`fit`) of LoFA's Stage I; `Stage2TrainConfig` extends it for Stage II, whose loop the
    pipeline's Text-to-LoRA baseline shares."""

    steps: int = field(default=20_000, metadata={"help": "Optimizer steps."})
    lr: float = field(default=2.5e-4, metadata={"help": "Peak AdamW learning rate, reached after the warm-up."})
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "AdamW's (β1, β2)."})
    weight_decay: float = field(default=0.01, metadata={
        "help": "AdamW weight decay of the Linear and conv weight matrices; norms, biases, embeddings, position "
                "tables and the CLS token are not decayed."})
    warmup_steps: int = field(default=500, metadata={"help": "Steps of linear warm-up to lr."})
    decay: str = field(default="constant", metadata={
        "help": "Learning rate after the warm-up: 'constant' (the authors') or 'cosine' (down to 10 % of lr at the "
                "last step)."})
    grad_clip: float = field(default=1.0, metadata={"help": "Gradient-norm clip of every step."})
    batch_size: int = field(default=48, metadata={
        "help": "LoRAs (training cases) per step and process, each with a random condition view (the authors: 192 "
                "for Stage I, 8 for Stage II on 4 GPUs)."})
    matrices_per_sample: int = field(default=10, metadata={
        "help": "Stage I only: target matrices per step, drawn at random and shared by the step's LoRAs (Stage II "
                "and Text-to-LoRA use every target)."})
    map_balance: str = field(default="balanced", metadata={
        "help": "Stage I's BCE on the response maps: 'balanced' weighs the responding and the silent entries half "
                "each (and calibrates the map threshold to the training maps' density); 'none' is the plain mean."})
    recon: str = field(default="delta", metadata={
        "help": "Reconstruction term of Stage II and Text-to-LoRA: 'delta' L1 on ΔW, 'delta_mse' squared error on "
                "ΔW (both relative to rms(W)), 'factors' L1 on A and B (the paper's wording); see "
                "losses.RECON_TERMS."})
    lambda_recon: float = field(default=1.0, metadata={"help": "Weight of Stage II's reconstruction term."})
    lambda_diff: float = field(default=10.0, metadata={
        "help": "Weight of Stage II's flow-matching term through the frozen base with the predicted LoRA merged; 0 "
                "leaves the term out."})
    mixed_precision: str = field(default="auto", metadata={
        "help": "'auto': bf16 autocast on CUDA, none on CPU; or 'bf16' / 'no'. Weights and AdamW states stay "
                "float32 either way."})
    checkpoint_every: int = field(default=1000, metadata={
        "help": "Steps between resumable checkpoints; the last step always writes one."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Newest checkpoints kept; older ones are deleted."})
    # 0 in every preset: tests/test_seeds.py checks the seed streams at 0 only.
    seed: int = field(default=0, metadata={
        "help": "Added to the run seed to seed this stage's batches (stream hypernet.batch of lofa.seeds; Stage II "
                "and Text-to-LoRA take the hypernet.stage2 seed of run seed + seed); another value draws other "
                "batches from the same zoo."})
    monitor_every: int = field(default=0, metadata={
        "help": "Steps between measurements of the monitor `fit` is given (Stage II: ΔW fidelity on held-out and "
                "training cases): after the first step, every monitor_every steps and after the last; 0 never "
                "measures. Measuring changes nothing in training (no gradient, no random numbers)."})

    # smoke / mini fit the pipeline's budgets on 2 shared CPU cores (Stage I of all four settings: < 1 min / ~4 min)
    PRESETS = {
        "smoke": {"steps": 30, "warmup_steps": 5, "batch_size": 4, "matrices_per_sample": 4, "checkpoint_every": 15,
                  "lr": 2e-3},
        "mini": {"steps": 600, "warmup_steps": 50, "batch_size": 8, "matrices_per_sample": 4,
                 "checkpoint_every": 200, "lr": 1e-3, "decay": "cosine"},
        # full: a task's Stage I and Stage II share one GPU lease with its zoo and the scoring (≤ 25 min)
        "full": {"steps": 2000, "warmup_steps": 100, "batch_size": 32, "checkpoint_every": 500, "decay": "cosine"},
        "wan": {},
        "paper": {},
    }

    def __post_init__(self):
        self.betas = tuple(self.betas)


@dataclass
class Stage2TrainConfig(TrainConfig):
    """TrainConfig of Stage II: few LoRAs per step, since each one also runs the base generator for the diffusion
    term (the authors: 8 per step on 4 GPUs, against 192 for Stage I)."""

    batch_size: int = field(default=2, metadata={
        "help": "LoRAs (training cases) per step and process, each with every target and a random condition view."})
    start: str = field(default="mean", metadata={
        "help": "Where Stage II's LoRA starts. 'mean' puts the training LoRAs' mean factors under the head "
                "(`LoraHead.set_start`), so step 0 predicts the mean LoRA and the network learns the condition's "
                "residual; 'zero' is the paper's start at ΔW = 0 (B = 0), from which the reconstruction term first "
                "has to find the mean LoRA before the condition can matter."})
    # "delta_mse", not the paper's L1: much of a zoo LoRA's ΔW is its training noise (two LoRAs of one case agree
    # only partly: the replicate cosine of figures/bench/lora_sweep_replicates_mini_h100.csv), the L1's optimum is
    # then the per-entry median, and its sign-valued gradient drowns the condition's signal.
    recon: str = field(default="delta_mse", metadata={
        "help": "Reconstruction term: 'delta_mse' squared error on ΔW, 'delta' L1 on ΔW (both relative to rms(W)), "
                "'factors' L1 on A and B (the paper's wording); see losses.RECON_TERMS."})

    # lambda_diff 1, not the authors' 10: the reconstruction term here is relative to rms(W).
    PRESETS = {
        "smoke": {"steps": 10, "warmup_steps": 2, "checkpoint_every": 10, "lr": 2e-3, "lambda_diff": 1.0,
                  "monitor_every": 5},
        # mini: reconstruction only (the diffusion term costs a generator pass per LoRA, which 2 CPU cores cannot
        # afford at 600 steps x 8 LoRAs in the pipeline's budget)
        "mini": {"steps": 600, "batch_size": 8, "warmup_steps": 40, "checkpoint_every": 200, "lr": 3e-3,
                 "decay": "cosine", "lambda_diff": 0.0, "monitor_every": 50},
        "full": {"steps": 1500, "warmup_steps": 75, "batch_size": 16, "checkpoint_every": 500, "lr": 3e-3,
                 "decay": "cosine", "lambda_diff": 1.0, "monitor_every": 100},
        "wan": {},
        "paper": {},
    }

    def __post_init__(self):
        super().__post_init__()
        if self.start not in ("mean", "zero"):
            raise LofaError(f"unknown Stage II start {self.start!r}; use 'mean' (the training LoRAs' mean) or 'zero'")


@dataclass
class LoraBatch:
    """N (condition, LoRA) pairs of one base model, restricted to the target matrices `targets`.

    cond [N, K, Dc], cond_mask [N, K] bool; targets [m] spec indices; loras {name: (A [N, r, in], B [N, out, r],
    alpha float or [N])} for those targets; extra: whatever the diffusion loss needs (clips, text context...).
    """
    cond: torch.Tensor
    cond_mask: torch.Tensor
    targets: torch.Tensor
    loras: dict[str, tuple]
    extra: dict[str, Any] = field(default_factory=dict)

    def to(self, device) -> "LoraBatch":
        def move(v):
            return v.to(device) if torch.is_tensor(v) else v

        return replace(self, cond=self.cond.to(device), cond_mask=self.cond_mask.to(device),
                       targets=self.targets.to(device),
                       loras={k: tuple(move(v) for v in f) for k, f in self.loras.items()},
                       extra={k: move(v) for k, v in self.extra.items()})


def sample_targets(n_targets: int, m: int, step: int, seed: int = 0) -> torch.Tensor:
    """m distinct random target indices [m] for `step`, the same on every run."""
    g = torch.Generator().manual_seed(seeds.stream(seed, "hypernet.targets", step=step))
    return torch.randperm(n_targets, generator=g)[: min(m, n_targets)].sort().values


def _unwrap(model: nn.Module) -> nn.Module:
    """The model itself, also when a multi-process launch has wrapped it (DistributedDataParallel's .module)."""
    return model.module if hasattr(model, "module") else model


class Stage1Objective:
    """loss_fn(model, batch) for Stage I: balanced BCE between the predicted and the true response maps."""

    name = "Stage I"

    def __init__(self, base: BaseWeights, cfg: TrainConfig, tau: float = TAU):
        self.base, self.cfg, self.tau = base, cfg, tau

    def to(self, device) -> "Stage1Objective":
        self.base = self.base.to(device)
        return self

    def true_maps(self, batch: LoraBatch) -> list[torch.Tensor]:
        """The zoo LoRAs' response maps, per target of the batch [N, out, in] bool (the logits' layout)."""
        maps = []
        for t in batch.targets.tolist():
            A, B, alpha = batch.loras[self.base.spec.targets[t].name]
            maps.append(response_map(delta((A, B, alpha)), self.base[t].float(), self.tau))
        return maps

    def __call__(self, model: nn.Module, batch: LoraBatch) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(self.base, batch.targets, batch.cond, batch.cond_mask)
        logits = torch.cat([x.flatten(1) for x in out.logits], dim=1)           # [N, entries of all targets]
        target = torch.cat([x.flatten(1) for x in self.true_maps(batch)], dim=1)
        return stage1_loss(logits, target, torch.ones_like(target), self.cfg.map_balance,
                           float(_unwrap(model).map_offset))


class Stage2Objective:
    """loss_fn(model, batch) for Stage II: λ_recon · L1 + λ_diff · diffusion_loss_fn(pred, batch).

    `stage1` (frozen, evaluated in the same step, in memory) gives the features Stage II attends to; None trains
    the single-stage ablation. The diffusion term is the caller's: it gets the predicted {name: (A, B, alpha)}.
    """

    name = "Stage II"

    def __init__(self, base: BaseWeights, cfg: TrainConfig, stage1: Stage1 | None = None,
                 diffusion_loss_fn: DiffusionLossFn | None = None):
        self.base, self.cfg, self.stage1, self.diffusion_loss_fn = base, cfg, stage1, diffusion_loss_fn
        if stage1 is not None:
            stage1.requires_grad_(False).eval()

    def to(self, device) -> "Stage2Objective":
        self.base = self.base.to(device)
        if self.stage1 is not None:
            self.stage1.to(device)
        return self

    def predict(self, model: nn.Module, batch: LoraBatch) -> dict[str, Factors]:
        """Stage II's LoRAs for the batch's conditions and targets: {name: (A [N, r, in], B [N, out, r], alpha)}."""
        features = None
        if self.stage1 is not None:
            with torch.no_grad():
                features = self.stage1(self.base, batch.targets, batch.cond, batch.cond_mask,
                                       decode_map=False).features
        out = model(self.base, batch.targets, batch.cond, batch.cond_mask, features)
        lora = _unwrap(model).lora(out, batch.targets)
        return {k: (A.float(), B.float(), alpha) for k, (A, B, alpha) in lora.items()}

    def w_rms(self, batch: LoraBatch) -> dict[str, torch.Tensor]:
        """{name: rms(W)} of the batch's targets."""
        return {self.base.spec.targets[t].name: self.base.rms[t] for t in batch.targets.tolist()}

    def __call__(self, model: nn.Module, batch: LoraBatch) -> tuple[torch.Tensor, dict[str, float]]:
        pred = self.predict(model, batch)
        w_rms = self.w_rms(batch)
        return stage2_loss(pred, batch.loras, w_rms, recon=self.cfg.recon, lambda_recon=self.cfg.lambda_recon,
                           lambda_diff=self.cfg.lambda_diff if self.diffusion_loss_fn else 0.0,
                           diffusion_loss_fn=self.diffusion_loss_fn, batch=batch)


class Stage2Monitor:
    """monitor(model) -> {"<split>_cosine": mean, "<split>_magnitude": mean} for `fit`: how close Stage II's
    predictions are to the zoo's LoRAs of fixed cases while it trains (`delta_fidelity`: cosine of ΔW / rms(W)
    over all targets, and the norm ratio ‖ΔŴ‖ / ‖ΔW‖), so its learning curves show held-out generalisation and
    the fit of the cases it trains on side by side.

    batches: {split name: [LoraBatch, ...]}, e.g. {"heldout": [...], "train": [...]}, every target of each case
    and the conditions to query with (a held-out case's reserved "eval" condition); chunk them as memory needs.
    """

    def __init__(self, objective: Stage2Objective, batches: dict[str, list[LoraBatch]]):
        self.objective, self.batches = objective, batches

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        device = next(model.parameters()).device
        metrics = {}
        for split, chunks in self.batches.items():
            cosines, ratios = [], []
            for batch in chunks:
                batch = batch.to(device)
                pred = self.objective.predict(model, batch)
                with torch.autocast(device.type, enabled=False):  # the score in float32, whatever the forward ran in
                    cosine, ratio = delta_fidelity(pred, batch.loras, self.objective.w_rms(batch))
                cosines.append(cosine.cpu())
                ratios.append(ratio.cpu())
            metrics[f"{split}_cosine"] = float(torch.cat(cosines).mean())
            metrics[f"{split}_magnitude"] = float(torch.cat(ratios).mean())
        return metrics


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay the weight matrices of Linear / Conv layers only; norms, biases, embeddings, position
    tables and the CLS token are not decayed (shrinking them toward 0 has no regularising meaning)."""
    decay, no_decay = [], []
    decayed = set()
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            decayed.add(id(module.weight))
    for p in model.parameters():
        if p.requires_grad:
            (decay if id(p) in decayed else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)


def make_accelerator(cfg: TrainConfig, device: str | None = None):
    """An Accelerator for `device` ("cpu", "cuda" or None = whatever accelerate picks, e.g. under accelerate launch).

    accelerate keeps one global state per process; a notebook that trains on CPU in fp32 and then asks for bf16
    gets the state reset instead of an error (never under a multi-process launch, where the state is the launch's).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    cpu = torch.device(device).type == "cpu" if device is not None else not torch.cuda.is_available()
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "no" if cpu else "bf16"
    if mp not in ("no", "bf16"):
        raise LofaError(f"mixed_precision {mp!r}: use 'auto', 'bf16' or 'no' (weights always stay float32)")
    state = AcceleratorState._shared_state
    if state and PartialState().num_processes == 1 and (state.get("_mixed_precision") != mp
                                                         or state.get("_cpu") != cpu):
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=mp, cpu=cpu)


def fit(model: nn.Module, objective: Stage1Objective | Stage2Objective,
        batch_fn: Callable[[int, int], LoraBatch], cfg: TrainConfig, out_dir: str | Path, *,
        device: str | None = None, accelerator=None, progress: bool = True,
        monitor: Callable[[nn.Module], dict[str, float]] | None = None) -> list[dict]:
    """Train `model` in place for cfg.steps optimizer steps (resuming from out_dir/checkpoints if present).

    A checkpoint (`lofa.checkpoints`, module name "model") is written every cfg.checkpoint_every steps and after the
    last one; the newest cfg.keep_checkpoints are kept.

    objective(model, batch) -> (loss, metrics), with a `to(device)` method, is e.g. Stage1Objective /
    Stage2Objective (moved to the process's device here); its `name` (e.g. "Stage II") names it in errors. A NaN or
    inf loss or gradient norm stops training with a LofaError naming the step and the last good checkpoint, before
    the optimizer step, so no checkpoint ever holds the non-finite weights. Returns the history, one
    dict per step (step, loss, lr, grad_norm and the objective's metrics), also written to out_dir/history.json at
    every checkpoint. `monitor(model) -> metrics` (e.g. `Stage2Monitor`), when given and cfg.monitor_every > 0,
    adds its metrics to the records of step 1, every monitor_every-th step and the last step.
    """
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / checkpoints.FOLDER
    acc = accelerator or make_accelerator(cfg, device)
    optimizer = make_optimizer(model, cfg)
    # Stepped by hand once per optimizer step: accelerate's prepared scheduler steps once per process.
    scheduler = lr_scheduler(optimizer, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, decay=cfg.decay,
                             min_ratio=MIN_LR_RATIO)
    model, optimizer = acc.prepare(model, optimizer)
    objective.to(acc.device)
    resumed = checkpoints.load(ckpt_dir, {"model": model}, optimizer, scheduler, accelerator=acc)
    start, history = (0, []) if resumed is None else (resumed["step"], resumed["history"])
    if start >= cfg.steps:
        return history[: cfg.steps]
    last_good = checkpoints.latest(ckpt_dir)  # (step, folder): where a non-finite error says to resume from
    what = getattr(objective, "name", "training")
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train {out_dir.name}",
               disable=not (progress and acc.is_main_process))
    for step in bar:
        batch = batch_fn(step, acc.process_index).to(acc.device)
        model.train()
        with acc.autocast():
            loss, metrics = objective(model, batch)
        acc.backward(loss)
        grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        # Before the optimizer step, so no weight (and no checkpoint) gets a NaN. After the backward pass: its
        # all-reduce gives every process the same gradient norm, so under a multi-process launch all of them stop
        # (a process that stopped alone would leave the others waiting). A finite loss can still have an inf
        # gradient (an overflow in the backward pass), which clipping would turn into NaN weights.
        check_finite(loss.detach(), f"{what} loss", step + 1, last_good)
        check_finite(grad_norm, f"{what} gradient norm", step + 1, last_good)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step + 1, "loss": float(loss.detach()), "lr": scheduler.get_last_lr()[0],
                  "grad_norm": float(grad_norm), "processes": acc.num_processes, **metrics}
        if monitor is not None and cfg.monitor_every > 0 and (
                step == 0 or (step + 1) % cfg.monitor_every == 0 or step + 1 == cfg.steps):
            with acc.autocast():
                record.update(monitor(model))
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4g}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            path = checkpoints.save(ckpt_dir, step + 1, {"model": model}, optimizer, scheduler, history,
                                    keep=cfg.keep_checkpoints, accelerator=acc)
            last_good = (step + 1, path)
            if acc.is_main_process:
                write_json(out_dir / "history.json", history)
    return history

