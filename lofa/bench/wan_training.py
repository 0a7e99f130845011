"""`lofa bench train`: the cost of LoFA's training steps against a random-weight Wan2.1 DiT at a preset's shapes
(paper: Wan2.1-T2V-1.3B, 240 targets).

Seconds per optimizer step, LoRAs per second and peak GPU memory of one Stage I and one Stage II training step, as
`hypernet.train.fit` runs them (accelerate, bf16 autocast, float32 master weights and AdamW states), Stage II with
the flow-matching term through the frozen DiT on Wan-shaped latents; and the H200-hours that the authors' schedule
of 20,000 steps a stage would take at that rate. The zoo is random (rank-r factors, a 40-token condition among 64
positions), so the figures are the cost of the computation, not of a result.

    lofa bench train --preset paper --device cuda --clip 81x480x832     # or: python -m lofa.bench.wan_training ...
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from lofa.config import preset
from lofa.errors import LofaError
from lofa.hypernet.config import HyperConfig
from lofa.hypernet.data import DiffusionLoss, TripletConfig, target_spec
from lofa.hypernet.model import Stage1, Stage2
from lofa.hypernet.tokenizer import BaseWeights
from lofa.hypernet.train import (LoraBatch, Stage1Objective, Stage2Objective, Stage2TrainConfig, TrainConfig,
                                 make_accelerator, make_optimizer)
from lofa.io import write_json

AUTHORS_STEPS = 20_000        # the authors' schedule: 20k steps for each stage
CONDITION_POSITIONS = 64      # condition tokens a batch carries (the longest prompt of a batch, trimmed)
PROMPT_TOKENS = 40            # real tokens among them
WAN_VAE_STRIDE = (4, 8, 8)    # Wan2.1's VAE: 4x in time (after the first frame), 8x in space, 16 channels


def latent_shape(clip: str, channels: int = 16) -> tuple[int, int, int, int]:
    """'FRAMESxHEIGHTxWIDTH' of a video clip -> Wan's latent [C, 1 + (F - 1) / 4, H / 8, W / 8]."""
    try:
        frames, height, width = (int(v) for v in clip.lower().split("x"))
    except ValueError:
        raise LofaError(f"--clip {clip!r}: give FRAMESxHEIGHTxWIDTH, e.g. 81x480x832") from None
    st, sh, sw = WAN_VAE_STRIDE
    if frames < 1 or (frames - 1) % st or height % (2 * sh) or width % (2 * sw):
        raise LofaError(f"--clip {clip}: frames must be 1 + 4k, height and width multiples of 16 (Wan's VAE and "
                        "2x2 patches)")
    return channels, 1 + (frames - 1) // st, height // sh, width // sw


class RandomZoo:
    """n random LoRAs over `spec` (A [n, r, in], B [n, out, r], alpha r) with random condition tokens
    [n, CONDITION_POSITIONS, cond_dim] (PROMPT_TOKENS real), on `device`: batches for the training step."""

    def __init__(self, spec, cfg: HyperConfig, n: int, device: torch.device, seed: int = 0):
        g = torch.Generator(device).manual_seed(seed)
        self.spec, self.n, self.alpha = spec, n, float(cfg.rank)
        self.loras = {t.name: (torch.randn(n, cfg.rank, t.shape[1], device=device, generator=g) * 0.02,
                               torch.randn(n, t.shape[0], cfg.rank, device=device, generator=g) * 0.02)
                      for t in spec.targets}
        self.cond = torch.randn(n, CONDITION_POSITIONS, cfg.cond_dim, device=device, generator=g)
        self.mask = torch.zeros(n, CONDITION_POSITIONS, dtype=torch.bool, device=device)
        self.mask[:, :PROMPT_TOKENS] = True
        self.cond[~self.mask] = 0

    def batch(self, step: int, batch_size: int, matrices: int | None) -> LoraBatch:
        g = torch.Generator().manual_seed(step)
        rows = torch.randint(self.n, (batch_size,), generator=g)
        targets = torch.arange(len(self.spec))
        if matrices is not None:
            targets = torch.randperm(len(self.spec), generator=g)[:matrices].sort().values
        names = [self.spec.targets[t].name for t in targets.tolist()]
        alpha = torch.full((batch_size,), self.alpha)
        on = rows.to(self.cond.device)
        loras = {n: (self.loras[n][0][on], self.loras[n][1][on], alpha) for n in names}
        return LoraBatch(self.cond[on], self.mask[on], targets, loras, {"case_ids": rows, "step": step})


class RandomLatentClips(DiffusionLoss):
    """Stage II's flow-matching term on random Wan-shaped latents [P, 16, T, H, W] with a random umT5-like context
    [P, 512, text_dim] (PROMPT_TOKENS real): the term's computation at Wan's shapes, without a VAE or a dataset."""

    def __init__(self, gen, latent: tuple[int, ...], cfg: TripletConfig, text_len: int = 512, seed: int = 0):
        super().__init__(gen, None, None, cfg, seed)
        self.latent, self.text_len = latent, text_len

    def clips(self, case_id: int):
        if case_id not in self._clips:
            device = next(self.gen.parameters()).device
            g = torch.Generator(device).manual_seed(case_id)
            p = self.cfg.clips_per_case
            x = torch.randn(p, *self.latent, device=device, generator=g)
            context = torch.randn(p, self.text_len, self.gen.context_dim, device=device, generator=g)
            mask = torch.zeros(p, self.text_len, dtype=torch.bool, device=device)
            mask[:, :PROMPT_TOKENS] = True
            self._clips[case_id] = (x, context * mask[..., None], mask)
        return self._clips[case_id]


def _time_steps(model, objective, batch_fn, cfg: TrainConfig, device: torch.device, steps: int,
                warmup: int) -> dict:
    """fit's step (accelerate, autocast, clipping, AdamW) `warmup + steps` times -> seconds a step (median of the
    timed ones), peak memory of the timed steps, the last loss."""
    acc = make_accelerator(cfg, str(device))
    optimizer = make_optimizer(model, cfg)
    model, optimizer = acc.prepare(model, optimizer)
    objective.to(acc.device)
    seconds = []
    for step in range(warmup + steps):
        if step == warmup and device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        batch = batch_fn(step).to(acc.device)
        model.train()
        with acc.autocast():
            loss, _ = objective(model, batch)
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            seconds.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"seconds_per_step": statistics.median(seconds), "samples_s": seconds, "peak_gib": peak,
            "loss": float(loss.detach())}


def random_wan(args):
    """(device, compute dtype, a random-weight video DiT of args.preset built on that device) for a benchmark.

    At the Wan-scale presets ("wan", "paper") the DiT stands for Wan2.1 and carries Wan's t distribution, which
    Stage II's diffusion term draws from; at the smaller ones a from-scratch base's (the default)."""
    from lofa.diffusion import TimeDistribution
    from lofa.models.generator import Generator
    from lofa.models.wan import T_DISTRIBUTION

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LofaError("--device cuda but no CUDA device is visible; use --device cpu (e.g. with --preset smoke)")
    torch.manual_seed(0)
    with torch.device(device):  # a 1.3B-parameter model initialises in seconds on the GPU, minutes on a CPU
        gen = Generator.build("video_dit", args.preset, t_distribution=T_DISTRIBUTION if args.preset in ("wan", "paper")
                              else TimeDistribution())
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32, gen


def cli_bench_train(args) -> int:
    """`lofa bench train`: args.preset, device, clip, steps, stage1_batch, stage2_batch, checkpointing, json_out."""
    if args.steps < 3:
        raise LofaError(f"--steps {args.steps}: time at least 3 steps (the median is reported)")
    scale = args.preset
    device, dtype, gen = random_wan(args)
    latent = latent_shape(args.clip, gen.config.in_channels)
    patch = gen.config.patch_size
    if any(n % p for n, p in zip(latent[1:], patch)):
        raise LofaError(f"--clip {args.clip}: its latent {'x'.join(map(str, latent[1:]))} does not divide into the "
                        f"DiT's {'x'.join(map(str, patch))} patches")
    tokens = (latent[1] // patch[0]) * (latent[2] // patch[1]) * (latent[3] // patch[2])
    gen = gen.to(dtype).eval().requires_grad_(False)
    if args.dit_checkpointing:
        gen.enable_gradient_checkpointing()
    spec = target_spec(gen, gen.lora_target_modules())
    base = BaseWeights(spec, {n: gen.net.get_submodule(n).weight.float() for n in spec.names})
    cfg = preset(HyperConfig, scale, {"grad_checkpoint": args.checkpointing, "cond_dim": gen.context_dim})
    train1 = preset(TrainConfig, scale, {"batch_size": args.stage1_batch} if args.stage1_batch else None)
    train2 = preset(Stage2TrainConfig, scale, {"batch_size": args.stage2_batch} if args.stage2_batch else None)
    if not train2.lambda_diff:
        train2.lambda_diff = 1.0  # the benchmark is of the step with the flow-matching term
    zoo = RandomZoo(spec, cfg, n=max(16, train1.batch_size, train2.batch_size), device=device)
    triplet = preset(TripletConfig, scale, {"clips_per_case": 1, "clips_per_step": 1})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"LoFA training steps | preset {scale} | {name} | bf16 autocast, float32 master weights | "
          f"hypernet checkpointing {'on' if args.checkpointing else 'off'}, DiT checkpointing "
          f"{'on' if args.dit_checkpointing else 'off'}")
    n_dit = sum(p.numel() for p in gen.parameters())
    print(f"targets: {len(spec)} matrices; DiT {n_dit / 1e9:.2f} B parameters; clip {args.clip} -> latent "
          f"{'x'.join(map(str, latent))} -> {tokens} tokens; condition {CONDITION_POSITIONS} x {cfg.cond_dim} "
          f"({PROMPT_TOKENS} real)")

    results = {}
    stage1 = Stage1(cfg, spec).to(device)
    results["stage1"] = _time_steps(stage1, Stage1Objective(base, train1, cfg.tau),
                                    lambda step: zoo.batch(step, train1.batch_size, train1.matrices_per_sample),
                                    train1, device, args.steps, warmup=2)
    results["stage1"].update(batch=train1.batch_size, matrices=train1.matrices_per_sample,
                             params=sum(p.numel() for p in stage1.parameters()))
    stage1 = stage1.eval().requires_grad_(False)
    stage2 = Stage2.from_stage1(stage1).to(device)
    diffusion = RandomLatentClips(gen, latent, triplet)
    results["stage2"] = _time_steps(stage2, Stage2Objective(base, train2, stage1, diffusion),
                                    lambda step: zoo.batch(step, train2.batch_size, None),
                                    train2, device, args.steps, warmup=2)
    results["stage2"].update(batch=train2.batch_size, matrices=len(spec), clips_per_lora=triplet.clips_per_step,
                             params=sum(p.numel() for p in stage2.parameters()))
    print(f"{'stage':<10s}{'LoRAs/step':>11s}{'matrices':>9s}{'s/step':>9s}{'LoRAs/s':>9s}{'peak GiB':>10s}"
          f"{'h for 20k steps':>17s}")
    for stage, r in results.items():
        r["loras_per_s"] = r["batch"] / r["seconds_per_step"]
        r["hours_for_authors_steps"] = AUTHORS_STEPS * r["seconds_per_step"] / 3600
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(f"{stage:<10s}{r['batch']:>11d}{r['matrices']:>9d}{r['seconds_per_step']:>9.3f}"
              f"{r['loras_per_s']:>9.2f}{peak:>10s}{r['hours_for_authors_steps']:>17.1f}")
    print(f"median of {args.steps} steps after 2 warm-up steps; Stage II includes Stage I's frozen forward and the "
          f"flow-matching term through the DiT ({triplet.clips_per_step} clip per LoRA); hours: "
          f"{AUTHORS_STEPS:,} steps on this one device")
    if args.json_out:
        write_json(args.json_out, {"preset": scale, "device": name, "clip": args.clip, "latent": list(latent),
                                   "dit_tokens": tokens, "dit_params": n_dit, "targets": len(spec),
                                   "checkpointing": args.checkpointing, "dit_checkpointing": args.dit_checkpointing,
                                   "steps": args.steps, "authors_steps": AUTHORS_STEPS, **results})
    return 0


if __name__ == "__main__":  # python -m lofa.bench.wan_training ARGS = lofa bench train ARGS
    from lofa.cli import bench_main

    sys.exit(bench_main("train"))
