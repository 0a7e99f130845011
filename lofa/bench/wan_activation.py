"""`lofa bench activate`: from an encoded condition to a LoRA active in a random-weight diffusers Wan transformer at
a preset's shapes (paper: Wan2.1-T2V-1.3B, 240 targets), in memory.

Times `LoFA.activate` per phase (Stage I, Stage II, one fused copy into the peft adapter); beside it diffusers'
`load_lora_adapter(state_dict, hotswap=True)` from the same prediction, the ecosystem's in-memory route.

    lofa bench activate --preset paper --device cuda     # or: python -m lofa.bench.wan_activation ...
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from lofa.bench.latency import randomise_zero_inits
from lofa.bench.wan_training import PROMPT_TOKENS, random_wan
from lofa.config import preset
from lofa.errors import LofaError
from lofa.hypernet.config import HyperConfig
from lofa.hypernet.data import target_spec
from lofa.hypernet.model import Stage1, Stage2
from lofa.hypernet.predictor import LoFA
from lofa.io import write_json


def cli_bench_activate(args) -> int:
    """`lofa bench activate`: args.preset, device, runs, compile, json_out."""
    if args.runs < 5:
        raise LofaError(f"--runs {args.runs}: time at least 5 runs (the median is reported)")
    device, dtype, gen = random_wan(args)
    net = gen.net.to(dtype).eval().requires_grad_(False)
    spec = target_spec(gen, gen.lora_target_modules())
    cfg = preset(HyperConfig, args.preset, {"cond_dim": gen.context_dim})
    stage1 = Stage1(cfg, spec)
    stage2 = Stage2.from_stage1(stage1)
    randomise_zero_inits(stage2, torch.Generator().manual_seed(0))
    lofa = LoFA(stage2, stage1).to(device, dtype)
    lofa.set_base({n: net.get_submodule(n).weight for n in spec.names})
    if args.compile and device.type == "cuda":
        lofa.compile(dynamic=False)
    tokens = torch.randn(1, 512, cfg.cond_dim, dtype=dtype)
    tokens[:, PROMPT_TOKENS:] = 0
    mask = torch.zeros(1, 512, dtype=torch.bool)
    mask[:, :PROMPT_TOKENS] = True

    t0 = time.perf_counter()
    lofa.activate(net, tokens, mask)
    first = {"first_call_ms": 1e3 * (time.perf_counter() - t0), **lofa.timings}
    phases = {"stage1_ms": [], "stage2_ms": [], "write_ms": [], "total_ms": [], "hotswap_ms": []}
    for run in range(args.runs + 2):
        t0 = time.perf_counter()
        lofa.activate(net, tokens, mask)
        total = 1e3 * (time.perf_counter() - t0)
        if run >= 2:
            for k in ("stage1_ms", "stage2_ms", "write_ms"):
                phases[k].append(lofa.timings[k])
            phases["total_ms"].append(total)
    # diffusers' route from the same prediction: a state dict in its naming, hot-swapped into the adapter
    # (the adapter's alpha and rank are the prediction's, so B goes in as predicted)
    state = {}
    for name, f in lofa.predict(tokens, mask).items():
        state[f"transformer.{name}.lora_A.weight"] = f.A.to(device, dtype)
        state[f"transformer.{name}.lora_B.weight"] = f.B.to(device, dtype)
    hotswap_error = None
    try:
        for run in range(args.runs + 2):
            t0 = time.perf_counter()
            net.load_lora_adapter(state, prefix="transformer", adapter_name="lofa", hotswap=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if run >= 2:
                phases["hotswap_ms"].append(1e3 * (time.perf_counter() - t0))
    except Exception as err:  # the comparison line is optional: report why it could not run, keep LoFA's figures
        hotswap_error = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        phases.pop("hotswap_ms")
    med = {k: statistics.median(v) for k, v in phases.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"LoFA into a live Wan transformer | preset {args.preset} | {name} | {str(dtype).replace('torch.', '')} | "
          f"torch.compile {'on' if args.compile and device.type == 'cuda' else 'off'} | {len(spec)} targets, "
          f"rank {cfg.rank}")
    print(f"first call (compile, add_adapter {first.get('add_adapter_ms', 0):.0f} ms): {first['first_call_ms']:.0f} ms")
    labels = {"stage1_ms": "Stage I", "stage2_ms": "Stage II", "write_ms": "write into the adapter (fused copy)",
              "total_ms": "encoded condition -> active adapter",
              "hotswap_ms": "diffusers load_lora_adapter(hotswap=True)"}
    for k, label in labels.items():
        if k in med:
            print(f"  {label:<40s}{med[k]:9.2f} ms")
    if hotswap_error:
        print(f"  diffusers load_lora_adapter(hotswap=True) failed: {hotswap_error}")
    print(f"median of {args.runs} warm runs; the last line is the alternative to the write, from a state dict")
    if args.json_out:
        write_json(args.json_out, {"preset": args.preset, "device": name, "dtype": str(dtype),
                                   "compile": bool(args.compile and device.type == "cuda"), "targets": len(spec),
                                   "rank": cfg.rank, "runs": args.runs, "first": first, "median_ms": med,
                                   "hotswap_error": hotswap_error, "samples_ms": phases})
    return 0


if __name__ == "__main__":  # python -m lofa.bench.wan_activation ARGS = lofa bench activate ARGS
    from lofa.cli import bench_main

    sys.exit(bench_main("activate"))
