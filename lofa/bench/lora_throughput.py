"""`lofa bench throughput`: LoRAs per hour of LoRA-zoo collection, batched multi-LoRA training vs one-at-a-time peft
training.

    lofa bench throughput --device cpu|cuda [--task actions] [--scale mini] [--loras 32] [--single 4]
                          [--steps N] [--base DIR] [--json-out FILE]      # or: python -m lofa.bench.lora_throughput ...

Both trainers run the same recipe for the same number of steps on the same cases; because the batched trainer is
exactly equivalent, the LoRAs they share end at the same final loss (printed as a check). The wall time of each
LoRA includes its data (renders, captions). Without --base the generator is freshly initialised (throughput does
not depend on the weights).
"""
from __future__ import annotations

import dataclasses
import sys
import time

import torch

from lofa.config import preset
from lofa.io import write_json
from lofa.lora.batched import train_lora_batch
from lofa.lora.train import LoraTrainConfig, train_lora
from lofa.models.train_base import KIND_BY_MODALITY


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run(task: str = "actions", scale: str = "mini", device: str = "cpu", n_batched: int | None = None,
        n_single: int | None = None, steps: int | None = None, base: str | None = None, seed: int = 0) -> dict:
    """Train n_single LoRAs one at a time (peft) and n_batched in one batch; return the figures."""
    from lofa.models import Generator, TextEncoder
    from lofa.worlds import make_world

    world = make_world(task, scale)
    torch.manual_seed(seed)
    gen = (Generator.load(base, device) if base else
           Generator.build(KIND_BY_MODALITY[world.modality], scale, {"zero_init_output": False}).to(device))
    cfg = preset(LoraTrainConfig, scale).for_task(task)  # the world's recipe, then this benchmark's steps
    cfg = dataclasses.replace(cfg, steps=steps or cfg.steps)
    n_batched = min(n_batched or cfg.group_size, len(world.cases))
    n_single = min(n_single or (4 if torch.device(device).type == "cpu" else 8), n_batched)
    cfg = dataclasses.replace(cfg, group_size=n_batched)
    cases = [c.id for c in world.cases][:n_batched]
    text = TextEncoder(device)
    text.encode([world.prompt(c, 0) for c in cases])  # load the text model outside the timings

    warm = dataclasses.replace(cfg, steps=2)
    train_lora(gen, world, cases[0], warm, seed, device, text=text)
    train_lora_batch(gen, world, cases[:2], warm, seed, device, text=text)
    _sync(device)

    def singles():
        out = [train_lora(gen, world, c, cfg, seed, device, text=text)[1] for c in cases[:n_single]]
        _sync(device)
        return out

    def batch():
        out = [info for _, info in train_lora_batch(gen, world, cases, cfg, seed, device, text=text)]
        _sync(device)
        return out

    single_info, single_s = _timed(singles)
    batch_info, batch_s = _timed(batch)
    common = range(n_single)
    single_loss = [single_info[i]["final_loss"] for i in common]
    batch_loss = [batch_info[i]["final_loss"] for i in common]
    return {
        "task": task, "scale": scale, "device": _device_name(device), "torch_threads": torch.get_num_threads(),
        "steps": cfg.steps, "batch_size": cfg.batch_size, "rank": cfg.rank, "targets": len(gen.lora_target_modules()),
        "single": {"loras": n_single, "wall_s": single_s, "loras_per_hour": 3600 * n_single / single_s,
                   "mean_final_loss": sum(single_loss) / n_single},
        "batched": {"loras": n_batched, "wall_s": batch_s, "loras_per_hour": 3600 * n_batched / batch_s,
                    "mean_final_loss_common": sum(batch_loss) / n_single,
                    "mean_final_loss_all": sum(i["final_loss"] for i in batch_info) / n_batched},
        "speedup": (n_batched / batch_s) / (n_single / single_s),
        "max_final_loss_diff": max(abs(a - b) for a, b in zip(single_loss, batch_loss)),
    }


def _device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return "cpu"


def report(r: dict) -> str:
    head = (f"LoRA training throughput: task {r['task']}, scale {r['scale']}, {r['device']} "
            f"({r['torch_threads']} threads), {r['steps']} steps x batch {r['batch_size']}, rank {r['rank']}, "
            f"{r['targets']} target modules")
    s, b = r["single"], r["batched"]
    rows = [("trainer", "LoRAs", "wall s", "s / LoRA", "LoRAs / hour", "final loss*"),
            ("peft, one at a time", s["loras"], f"{s['wall_s']:.1f}", f"{s['wall_s'] / s['loras']:.2f}",
             f"{s['loras_per_hour']:.0f}", f"{s['mean_final_loss']:.5f}"),
            (f"batched (G={b['loras']})", b["loras"], f"{b['wall_s']:.1f}", f"{b['wall_s'] / b['loras']:.2f}",
             f"{b['loras_per_hour']:.0f}", f"{b['mean_final_loss_common']:.5f}")]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = [head, ""] + ["  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in
                                    enumerate(zip(row, widths))) for row in rows]
    lines += ["", f"speed-up (LoRAs / hour): {r['speedup']:.2f}x",
              f"* mean final loss over the {s['loras']} LoRAs both trained; largest difference "
              f"{r['max_final_loss_diff']:.2e} (equal steps, equivalent training)"]
    return "\n".join(lines)


def cli_bench_throughput(args) -> int:
    """`lofa bench throughput`: args.task, scale, device, loras, single, steps, base, seed, json_out."""
    r = run(args.task, args.scale, args.device, args.loras, args.single, args.steps, args.base, args.seed)
    print(report(r))
    if args.json_out:
        write_json(args.json_out, r)
    return 0


if __name__ == "__main__":  # python -m lofa.bench.lora_throughput ARGS = lofa bench throughput ARGS
    from lofa.cli import bench_main

    sys.exit(bench_main("throughput"))
