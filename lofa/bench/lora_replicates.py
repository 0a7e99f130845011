"""`lofa bench replicates`: how much of a per-case LoRA is its case, and how much is training noise.

Trains each case's LoRA twice — same initial A (the zoo's shared init), two draws of the training stream (batches,
t, noise), and with `new_renders` two draws of the case's renders too — and compares ΔW / rms(W) over all adapted
matrices by cosine: between the two replicates of one case, and between LoRAs of different cases. A hypernetwork
that regresses ΔW from the condition can at best predict the part that replicates with new renders share (the
renders' pose, lighting and background are not in the condition); if replicates of one case are far apart, the
loss on ΔW mostly asks for their mean.

    lofa bench replicates --run-dir runs/mini --task identities [--cases 4] [--new-renders] [--device cpu]
    python -m lofa.bench.lora_replicates ...      # the same command
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

from lofa.errors import LofaError
from lofa.lora.batched import train_lora_batch
from lofa.lora.formats import LoraWeights


def delta_vector(lora: LoraWeights, net) -> torch.Tensor:
    """ΔW / rms(W) of every module of `lora`, flattened and concatenated (sorted by name) -> [Σ out·in]."""
    parts = []
    for name in sorted(lora):
        w = net.get_submodule(name).weight.detach().float()
        parts.append((lora[name].delta_w / w.pow(2).mean().sqrt().clamp_min(1e-12)).flatten().cpu())
    return torch.cat(parts)


def replicate_cosine(gen, world, case_ids: list[int], cfg, seed: int = 0, device="cpu", *, text=None,
                     new_renders: bool = False, first: list[LoraWeights] | None = None) -> dict[str, float]:
    """{"same_case": mean cosine of a case's two replicates, "other_case": mean cosine between different cases
    (same replicate), "cases": n} for LoRAs trained with recipe `cfg` (a LoraTrainConfig) on `gen`.

    new_renders: the second replicate also draws new renders of its case. first: the cases' LoRAs of replicate 0
    when already trained (with this recipe and seed), in case order; only replicate 1 is trained then.
    """
    if len(case_ids) < 2:
        raise LofaError("replicate_cosine needs at least two cases (it also compares different cases)")
    if first is not None and len(first) != len(case_ids):
        raise LofaError(f"first holds {len(first)} LoRAs for {len(case_ids)} cases; give one per case, in order")
    vectors = {}
    for r in (0, 1):
        if r == 0 and first is not None:
            trained = first
        else:
            trained = [w for w, _ in train_lora_batch(gen, world, case_ids, cfg, seed, device, text=text,
                                                      replicate=r, new_renders=new_renders)]
        for i, weights in enumerate(trained):
            vectors[(r, i)] = delta_vector(weights, gen.net)

    def cos(a, b):
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

    n = len(case_ids)
    same = [cos(vectors[(0, i)], vectors[(1, i)]) for i in range(n)]
    other = [cos(vectors[(r, i)], vectors[(r, j)]) for r in (0, 1) for i, j in itertools.combinations(range(n), 2)]
    return {"same_case": sum(same) / n, "other_case": sum(other) / len(other), "cases": n}


def cli_bench_replicates(args) -> int:
    """`lofa bench replicates`: args.run_dir, scale, task, cases, device, new_renders, seed."""
    from lofa.lora.train import LoraTrainConfig
    from lofa.run import Run

    if not (Path(args.run_dir) / "base" / args.task / "summary.json").exists():
        raise LofaError(f"no trained {args.task} base in {args.run_dir}; run the pipeline (notebook 02) first")
    run = Run(args.scale, args.device, args.seed, args.run_dir)
    cfg = run.config(LoraTrainConfig).for_task(args.task)  # the recipe the task's zoo is trained with
    world = run.world(args.task)
    result = replicate_cosine(run.base(args.task, progress=False), world, world.ids("train")[: args.cases],
                              cfg, args.seed, args.device, new_renders=args.new_renders)
    print(f"{args.task} ({args.scale}, rank {cfg.rank}, {cfg.steps} steps, batch {cfg.batch_size}, lr {cfg.lr}, "
          f"FFN {cfg.include_ffn}, shared init {cfg.shared_init}, new renders {args.new_renders}): cos(ΔW) between "
          f"two replicates of one case {result['same_case']:.3f}, "
          f"between different cases {result['other_case']:.3f} ({result['cases']} cases)")
    return 0


if __name__ == "__main__":  # python -m lofa.bench.lora_replicates ARGS = lofa bench replicates ARGS
    from lofa.cli import bench_main

    sys.exit(bench_main("replicates"))
