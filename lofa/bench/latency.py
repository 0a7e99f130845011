"""`lofa bench latency`: Stage I, Stage II and merge time at a preset's shapes, with random weights.

At the paper preset: the 240 q, k, v, o self- and cross-attention matrices (1536 × 1536) of Wan2.1-T2V-1.3B as the
base weights, a 512 × 4096 umT5 context holding a 40-token prompt, bf16, d_model 768, 12 heads, 8 blocks, patch 96,
rank 32. Reports the median of synchronised runs after warm-up for each phase, peak GPU memory, the analytic FLOP
count per phase and its floor at the matmul rate measured in the same process.

Per condition the predictor runs Stage I's backbone (its map decoder is skipped: only training needs the map),
Stage II, and the fused merge W += (alpha / r) · B @ A. The condition-independent prefix (patch tokens and block
0's self half, per stage) is computed once per base model and reported on its own line.

    lofa bench latency --preset paper --device cuda          # or: python -m lofa.bench.latency ...
    lofa bench latency --preset smoke --device cpu --no-compile
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from lofa.config import preset
from lofa.errors import LofaError
from lofa.hypernet.config import HyperConfig
from lofa.hypernet.model import Stage1, Stage2
from lofa.hypernet.predictor import LoFA
from lofa.hypernet.tokenizer import TargetSpec
from lofa.io import write_json

PAPER_PROMPT_TOKENS = 40  # a typical umT5 prompt length inside Wan's 512-token context


# (blocks, width) of the Wan-family video DiT at each scale (lofa.models.video_dit presets; paper / wan:
# Wan2.1-T2V-1.3B). Kept here so the benchmark runs where diffusers is not installed.
DIT_SHAPES = {"smoke": (2, 64), "mini": (4, 128), "full": (8, 256), "wan": (30, 1536), "paper": (30, 1536)}


def bench_targets(scale: str) -> TargetSpec:
    """q, k, v, o of self- and cross-attention in every block of the video DiT at `scale` (paper: 240 matrices
    of 1536 x 1536; Wan projects the text to the model width first, so the cross-attention k / v are square too)."""
    if scale not in DIT_SHAPES:
        raise LofaError(f"unknown preset {scale!r}; choose one of {', '.join(DIT_SHAPES)}")
    blocks, w = DIT_SHAPES[scale]
    return TargetSpec.from_shapes({f"blocks.{i}.attn{a}.{t}": (w, w) for i in range(blocks)
                                   for a in (1, 2) for t in ("to_q", "to_k", "to_v", "to_out.0")})


def stage_flops(cfg: HyperConfig, spec: TargetSpec, n_cond: int, stage: int) -> dict[str, float]:
    """Analytic FLOPs (2 per multiply-add) of one stage for one condition of n_cond (trimmed) tokens:
    {"prefix": condition-independent part, "condition": the rest}. Tokens are counted packed (real tokens only, as
    the model runs them); norms and elementwise ops are not counted."""
    from lofa.hypernet.tokenizer import WeightTokenizer

    tok = WeightTokenizer(spec, 1, cfg.patch)
    M, S, d, K, p = len(spec), tok.seq_len, cfg.d_model, n_cond, cfg.patch
    counts = tok.mask.sum(1).tolist()       # real tokens of each matrix: the transformer runs on packed tokens
    T, TT, h = sum(counts), sum(n * n for n in counts), int(d * cfg.mlp_ratio)
    self_half = 8 * T * d * d + 4 * TT * d + 4 * T * d * h                  # qkv + out, attention, MLP
    cross_half = 4 * T * d * d + 4 * K * d * d + 4 * T * K * d + 4 * T * d * h  # q + out, cond k/v, attention, MLP
    prefix = 2 * (T - M) * p * p * d + self_half
    cond = 2 * K * cfg.cond_dim * d + cfg.depth * cross_half + (cfg.depth - 1) * self_half
    if stage == 2:
        cond += len(cfg.feature_cross_after) * (8 * T * d * d + 4 * TT * d)
        GR, GC = tok.grid_rows, tok.grid_cols
        cond += 2 * M * (GR + GC) * (S - 1) * d + 2 * M * (GR + GC) * d * p * cfg.rank   # pooling + A/B heads
    return {"prefix": float(prefix), "condition": float(cond)}


def merge_flops(cfg: HyperConfig, spec: TargetSpec) -> float:
    return float(sum(2 * t.shape[0] * t.shape[1] * cfg.rank for t in spec.targets))


class _Clock:
    """Wall-clock seconds of a region, synchronising the device around it."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn, repeats: int, warmup: int = 2) -> float:
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(repeats):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)


def measure_matmul_rate(device: torch.device, dtype: torch.dtype) -> tuple[float, int]:
    """(FLOP/s, n) of an n×n×n matmul in `dtype` on `device` (n = 8192 on CUDA, 512 on CPU)."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _Clock(device).time(lambda: a @ b, repeats=10, warmup=3)
    return 2 * n**3 / seconds, n


def measure_copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device copy, counting bytes read plus bytes written."""
    n = (1 << 28) if device.type == "cuda" else (1 << 22)
    src = torch.empty(n, device=device, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    seconds = _Clock(device).time(lambda: dst.copy_(src), repeats=10, warmup=3)
    return 2 * n / seconds


def randomise_zero_inits(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give zero-initialised parameters (B head, feature cross-attention outputs) random values, so the timed
    outputs, and the compiled-vs-eager check, are not trivially zero."""
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


ATTENTION = ("auto", "cudnn", "flash")


def cli_bench_latency(args) -> int:
    """`lofa bench latency`: args.preset, device, runs, compile, compile_mode, attention (SDPA backend), json_out."""
    attention = getattr(args, "attention", "auto")
    if attention not in ATTENTION:
        raise LofaError(f"unknown --attention {attention!r}; choose one of {', '.join(ATTENTION)}")
    if attention == "auto":
        return _bench(args)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[attention]
    with sdpa_kernel([backend]):  # compiled graphs pick their attention kernel while tracing, inside this too
        return _bench(args)


def _bench(args) -> int:
    scale = getattr(args, "preset", "paper")
    attention = getattr(args, "attention", "auto")
    device = torch.device(getattr(args, "device", "cuda"))
    runs = getattr(args, "runs", 20)
    compile_mode = getattr(args, "compile_mode", None)
    if runs < 20:
        raise LofaError(f"--runs {runs}: the benchmark reports a median of at least 20 runs")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LofaError("--device cuda but no CUDA device is visible; use --device cpu (e.g. with --preset smoke)")
    use_compile = bool(getattr(args, "compile", True)) and device.type == "cuda"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    clock = _Clock(device)

    cfg = preset(HyperConfig, scale)
    spec = bench_targets(scale)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    stage1 = Stage1(cfg, spec)
    stage2 = Stage2.from_stage1(stage1)
    randomise_zero_inits(stage2, g)
    n_params = [sum(p.numel() for p in s.parameters()) for s in (stage1, stage2)]
    lofa = LoFA(stage2, stage1).to(device, dtype)

    weights = {t.name: torch.randn(t.shape, device=device, dtype=dtype) * 0.02 for t in spec.targets}
    lofa.set_base(weights)
    del weights
    prefix_s = clock.time(lambda: lofa.set_base({n: lofa.base[i] for i, n in enumerate(spec.names)}),
                          repeats=3, warmup=0)

    K = cfg.cond_len
    valid = min(PAPER_PROMPT_TOKENS, K // 2)
    tokens = torch.randn(1, K, cfg.cond_dim, device=device, dtype=dtype)
    tokens[:, valid:] = 0  # padded text states are zero, as the encoders emit them
    mask = torch.zeros(1, K, dtype=torch.bool)  # stays on the host: trimming it needs no device sync
    mask[:, :valid] = True

    def pipeline():
        lofa.begin_step()
        cond, cond_mask = lofa.prepare_condition(tokens, mask)
        out = lofa._stage2_fn(cond, cond_mask, lofa._stage1_fn(cond, cond_mask))
        return out

    eager_out = pipeline()
    if use_compile:
        kwargs = {"dynamic": False} | ({"mode": compile_mode} if compile_mode else {})
        lofa.compile(**kwargs)
    t0 = time.perf_counter()
    out = pipeline()
    clock.sync()
    first_call_s = time.perf_counter() - t0
    rel_err = _delta_rel_error(out, eager_out, spec, cfg)  # before the next call: CUDA graphs reuse out's memory
    for _ in range(2):
        pipeline()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    phases = {"stage1": [], "stage2": [], "merge": [], "total": []}
    for _ in range(runs):
        clock.sync()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if device.type == "cuda" else None
        marks = []

        def mark(i):
            if events is not None:
                events[i].record()
            else:
                marks.append(time.perf_counter())

        t0 = time.perf_counter()
        mark(0)
        lofa.begin_step()
        cond, cond_mask = lofa.prepare_condition(tokens, mask)
        features = lofa._stage1_fn(cond, cond_mask)
        mark(1)
        out = lofa._stage2_fn(cond, cond_mask, features)
        mark(2)
        lofa.merge_(out)
        mark(3)
        clock.sync()
        phases["total"].append(time.perf_counter() - t0)
        if events is not None:
            marks = [0.0] + [events[0].elapsed_time(e) / 1e3 for e in events[1:]]
        for i, name in enumerate(("stage1", "stage2", "merge")):
            phases[name].append(marks[i + 1] - marks[i])
        lofa.merge_(out, weight=-1.0)  # back to the base weights, untimed
    med = {k: statistics.median(v) for k, v in phases.items()}
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    rate, n_mm = measure_matmul_rate(device, dtype)
    bandwidth = measure_copy_bandwidth(device)
    f1, f2 = stage_flops(cfg, spec, valid, 1), stage_flops(cfg, spec, valid, 2)
    fm = merge_flops(cfg, spec)
    w_bytes = sum(t.shape[0] * t.shape[1] for t in spec.targets) * torch.finfo(dtype).bits // 8
    floors = {"stage1": f1["condition"] / rate, "stage2": f2["condition"] / rate,
              "merge": max(fm / rate, 2 * w_bytes / bandwidth)}
    floors["total"] = sum(floors.values())
    flops = {"stage1": f1["condition"], "stage2": f2["condition"], "merge": fm}
    flops["total"] = sum(flops.values())

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    shapes = sorted({t.shape for t in spec.targets})
    tok = lofa.stage2.backbone.tokenizer
    print(f"LoFA latency | preset {scale} | {name} | {str(dtype).replace('torch.', '')} | "
          f"torch.compile {'on' + (f' ({compile_mode})' if compile_mode else '') if use_compile else 'off'} | "
          f"attention {attention}")
    print(f"targets: {len(spec)} matrices {', '.join(f'{o}x{i}' for o, i in shapes)} -> {tok.seq_len} tokens each, "
          f"{len(spec) * tok.seq_len} per stage | condition {K} x {cfg.cond_dim}, {valid} valid -> {valid} keys")
    print(f"model: d_model {cfg.d_model}, {cfg.n_heads} heads, {cfg.depth} blocks, patch {cfg.patch}, rank "
          f"{cfg.rank} | params Stage I {n_params[0] / 1e6:.1f} M, Stage II {n_params[1] / 1e6:.1f} M")
    # GFLOP/s below 1 TFLOP/s: a CPU's rate printed as "0 TFLOP/s" says nothing
    matmul = f"{rate / 1e12:.0f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:.1f} GFLOP/s"
    print(f"measured: matmul {matmul} ({n_mm}^3), copy {bandwidth / 1e9:.0f} GB/s; "
          f"first call {first_call_s:.1f} s; compiled vs eager dW rel. error {rel_err:.2e}")
    print(f"{'phase':<34s}{'median ms':>10s}{'TFLOP':>9s}{'floor ms':>10s}{'x floor':>9s}")
    print(f"{'base prefix (once per base model)':<34s}{1e3 * prefix_s:10.2f}"
          f"{(f1['prefix'] + f2['prefix']) / 1e12:9.2f}{1e3 * (f1['prefix'] + f2['prefix']) / rate:10.2f}{'':>9s}")
    labels = {"stage1": "Stage I (map decoder skipped)", "stage2": "Stage II", "merge": "merge (fused, in place)",
              "total": "total (I + II + merge, wall)"}
    for k, label in labels.items():
        print(f"{label:<34s}{1e3 * med[k]:10.2f}{flops[k] / 1e12:9.2f}{1e3 * floors[k]:10.2f}"
              f"{med[k] / floors[k]:9.2f}")
    if peak is not None:
        print(f"peak GPU memory (timed runs): {peak / 2**30:.2f} GiB")
    print(f"median of {runs} runs after warm-up, device synchronised; floors: FLOP / measured matmul rate "
          "(merge: max of that and moving W twice at the measured copy rate)")

    if getattr(args, "json_out", None):
        write_json(args.json_out, {
            "preset": scale, "device": name, "dtype": str(dtype), "compile": use_compile,
            "compile_mode": compile_mode, "attention": attention, "runs": runs,
            "targets": len(spec), "tokens_per_matrix": tok.seq_len,
            "condition_tokens": K, "valid_condition_tokens": valid, "params": {"stage1": n_params[0],
                                                                            "stage2": n_params[1]},
            "median_ms": {k: 1e3 * v for k, v in med.items()}, "prefix_ms": 1e3 * prefix_s,
            "flops": flops, "prefix_flops": f1["prefix"] + f2["prefix"],
            "floor_ms": {k: 1e3 * v for k, v in floors.items()}, "matmul_tflops": rate / 1e12,
            "copy_gbs": bandwidth / 1e9, "peak_gib": None if peak is None else peak / 2**30,
            "first_call_s": first_call_s, "compiled_vs_eager_rel_error": rel_err,
            "samples_ms": {k: [1e3 * x for x in v] for k, v in phases.items()},
        })
    return 0


def _delta_rel_error(out, ref, spec: TargetSpec, cfg: HyperConfig, n: int = 8) -> float:
    """‖ΔW - ΔW_ref‖ / ‖ΔW_ref‖ over the first n targets (float32 products)."""
    num = den = 0.0
    for j, t in enumerate(spec.targets[:n]):
        o, i = t.shape
        d = out.B[0, j, :o].float() @ out.A[0, j, :, :i].float()
        r = ref.B[0, j, :o].float() @ ref.A[0, j, :, :i].float()
        num += float((d - r).square().sum())
        den += float(r.square().sum())
    return (num / den) ** 0.5 if den > 0 else float("nan")


if __name__ == "__main__":  # python -m lofa.bench.latency ARGS = lofa bench latency ARGS
    from lofa.cli import bench_main

    sys.exit(bench_main("latency"))
