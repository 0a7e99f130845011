"""The `lofa` command's handlers, one per subcommand, in one place (the parser is `lofa.cli`).

Each handler takes the parsed arguments, checks them before anything is written, calls the library, prints what
a user needs, and returns the exit code; a bad input raises LofaError, which `lofa.cli.main` prints as one line
(exit 2). The library is imported inside each handler, so `lofa --help` starts without loading torch. The
benchmarks' handlers live with their benchmarks, one module each in `lofa.bench`.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from lofa.errors import LofaError


def _check_overrides(path: str | None) -> None:
    """--overrides, when given, must name a file (checked before any work)."""
    if path and not Path(path).is_file():
        raise LofaError(f"overrides file {path} not found; give a YAML file of {{ConfigClass: {{field: value}}}}")


def reproduce(args) -> int:
    """`lofa reproduce`: the pipeline notebooks at a scale, then the per-notebook status and the results summary."""
    from lofa.publish import publish
    from lofa.reproduce import run, run_folder
    from lofa.summary import results_summary

    results = run(scale=args.scale, only=args.only, device=args.device, force=args.force, seed=args.seed,
                  run_root=args.run_root, log_output=args.log_output, tasks=args.tasks)
    run_dir = run_folder(args.run_root, args.scale, args.tasks)
    for r in results:
        print(f"  {r.name:<28} {r.status:<7} {r.seconds:8.1f} s" + (f"  ({r.reason})" if r.reason else ""))
    for line in results_summary(run_dir / "figures"):
        print(line)
    print(f"results: {run_dir}  (figures and tables in {run_dir / 'figures'}, manifest "
          f"{run_dir / 'figures' / 'manifest.json'}, executed notebooks in {run_dir / 'notebooks'})")
    if args.publish:
        print(f"published to {publish(args.scale, args.run_root, tasks=args.tasks)}")
    return 0


def pretrain(args) -> int:
    """`lofa pretrain`: --part models trains (or resumes) the base generator and evaluators of one task at one scale,
    measures notebook 02's quality numbers and writes the shipped folder (default data/pretrained/<scale>/<task>/);
    --part zoo trains the per-case LoRA zoo on the shipped base and adds it to that folder."""
    from lofa.config import resolve_device
    from lofa.models.pretrained import export, export_zoo, folder, quality_numbers
    from lofa.run import TASKS, Run

    tasks = TASKS if args.task == "all" else (args.task,)
    for task in tasks:
        if task not in TASKS:
            raise LofaError(f"unknown task {task!r}; choose one of {', '.join(TASKS)} or all")
    _check_overrides(args.overrides)
    workers = getattr(args, "workers", 1)
    if workers < 1:
        raise LofaError(f"--workers {workers}: give at least 1")
    part = getattr(args, "part", "models")
    device = resolve_device(args.device)
    run = Run(args.scale, device, args.seed, Path(args.run_root) / args.scale, args.overrides,
              pretrained=part == "zoo")
    command = f"lofa pretrain --scale {args.scale} --task {args.task} --device {args.device}" + \
        (f" --part {part}" if part != "models" else "") + (f" --seed {args.seed}" if args.seed else "") + \
        (f" --overrides {args.overrides}" if args.overrides else "")
    if part == "models":
        if args.retrain:
            for task in tasks:
                for name in ("base", "evaluators"):
                    shutil.rmtree(run.path(name, task), ignore_errors=True)
        if workers > 1:  # the small models leave a GPU idle between launches: several processes share it
            run.build([(step, task) for task in tasks for step in ("base", "evaluators")], workers=workers)
    for task in tasks:
        dest = Path(args.out) / task if args.out else folder(args.scale, task)
        if part == "zoo":
            if args.retrain:
                shutil.rmtree(run.path("zoo", task), ignore_errors=True)
            manifest = export_zoo(run, task, dest, command)
            print(f"{task}: wrote {dest / 'zoo'}  {manifest['zoo']['loras']} LoRAs, float16 factors (largest "
                  f"relative ΔW error {manifest['zoo']['float16_max_relative_delta_error']:.1e})")
            continue
        run.base(task)
        run.evaluators(task)
        quality = quality_numbers(run, task)
        export(run, task, dest, quality, command)
        print(f"{task}: wrote {dest}  coarse accuracy {quality['coarse_acc_base']:.2f}, Fréchet distance "
              f"{quality['fd_base_vs_renders']:.2f} = {quality['fd_over_other_cases_floor']:.1f}x the other-cases "
              f"floor, held-out exact-case accuracy {quality['exact_acc_base_heldout']:.2f}")
    return 0


def response_map(args) -> int:
    """`lofa response-map --base PATH --lora PATH [--tau 0.02] [--json] [--plot FILE]`.

    args: .base, .lora, .tau, .json (bool), .plot (path or None). Prints the JSON summary (`response_summary`)
    or a readable table; writes the plot atomically. Every bad input raises LofaError before anything is written.
    """
    from lofa.analysis import (PLOT_POOL, describe_lora, lora_response, plot_format, plot_response_map,
                               response_summary, response_text)
    from lofa.lora.formats import BaseWeightsFile, detect_format, load_lora

    tau = float(args.tau)
    if not (math.isfinite(tau) and tau >= 0):
        raise LofaError(f"--tau {args.tau}: must be a finite number >= 0 (the paper uses 0.02)")
    if args.plot:
        plot_format(args.plot)
    base = BaseWeightsFile(args.base)
    lora, _ = load_lora(args.lora, module_names=list(base))
    responses = lora_response(base, lora, tau, pool=PLOT_POOL if args.plot else None)
    if args.json:
        print(json.dumps(response_summary(responses, tau), indent=2))
    else:
        print(f"LoRA  {args.lora}  ({detect_format(args.lora)} naming, {describe_lora(lora)})")
        print(f"base  {args.base}")
        print(response_text(responses, tau))
    if args.plot:
        plot_response_map(responses, args.plot, tau, title=Path(args.lora).name)
    return 0


def train(args) -> int:
    """`lofa train`: Stage I (--stage 1) or both stages of one setting, with whatever upstream artifacts are missing.

    One process, or several under `accelerate launch --num_processes N $(which lofa) train ...`: each process
    trains on its own batches (batch_fn(step, process_index)) and gradients are averaged; the main process builds
    the upstream artifacts and writes the checkpoints and the predictor folder.
    """
    from lofa.config import resolve_device
    from lofa.run import Run, launched, parse_setting

    parse_setting(args.setting)  # bad input fails before anything is written
    _check_overrides(args.overrides)
    device = resolve_device(args.device)
    launch = launched()
    if launch is not None:
        device = str(launch.device)  # this process's GPU (or the CPU), not cuda:0 for every process
    run = Run(args.scale, device, args.seed, Path(args.run_root) / args.scale, args.overrides)
    run.hypernet(args.setting, args.stage)
    if launch is None or launch.is_main_process:
        print(f"trained {args.setting} (stage {args.stage}) in {run.path('hypernet', args.setting, 'lofa')}"
              + (f" on {launch.num_processes} processes" if launch else ""))
    return 0


def _check_lora_out(out: Path) -> None:
    """--out must be a new or existing .safetensors file in an existing folder (checked before any work)."""
    if out.suffix != ".safetensors":
        raise LofaError(f"--out {out}: give a file name ending in .safetensors")
    if out.is_dir():
        raise LofaError(f"--out {out} is a folder; give a file name ending in .safetensors")
    if not out.parent.is_dir():
        raise LofaError(f"--out {out}: folder {out.parent} does not exist; create it first")


def predict(args) -> int:
    """`lofa predict --checkpoint DIR (--prompt TEXT | --image FILE | --pose FILE) --out FILE.safetensors`: one
    LoRA from one condition, written as a diffusers-loadable file, with each phase's time."""
    import torch

    from lofa.config import resolve_device
    from lofa.hypernet.predictor import LoFA
    from lofa.lora.formats import save_lora

    _check_lora_out(Path(args.out))
    if not Path(args.checkpoint).is_dir():
        raise LofaError(f"--checkpoint {args.checkpoint}: no such folder; the pipeline writes each setting's "
                        "checkpoint to runs/<scale>/hypernet/<setting>/lofa/ (lofa train --setting SETTING)")
    device = torch.device(resolve_device(getattr(args, "device", "auto")))
    t0 = time.perf_counter()
    lofa = LoFA.from_pretrained(args.checkpoint, device=device)
    if lofa.base is None:
        raise LofaError(f"{args.checkpoint} names no base model; re-save it with save_pretrained(..., base=PATH)")
    times = {"load + base prefix": time.perf_counter() - t0}
    t0 = time.perf_counter()
    tokens, mask = lofa.encode_condition(args.prompt, args.image, args.pose)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times["encode"] = time.perf_counter() - t0
    lora = lofa.predict(tokens, mask)
    times["stage I"] = lofa.timings["stage1_ms"] / 1e3
    times["stage II"] = lofa.timings["stage2_ms"] / 1e3
    t0 = time.perf_counter()
    condition = args.prompt if args.prompt is not None else str(args.image or args.pose)
    save_lora(args.out, {k: type(f)(A=f.A.cpu(), B=f.B.cpu(), alpha=f.alpha) for k, f in lora.items()},
              metadata={"source": "lofa predict", "checkpoint": str(args.checkpoint), "condition": condition})
    times["write"] = time.perf_counter() - t0
    n = sum(f.A.numel() + f.B.numel() for f in lora.values())
    print(f"wrote {args.out}: {len(lora)} modules, rank {lofa.cfg.rank}, alpha {lofa.cfg.alpha:g}, "
          f"{n / 1e6:.2f} M numbers ({device})")
    for phase, seconds in times.items():
        print(f"  {phase:<20s} {1e3 * seconds:9.1f} ms")
    print(f"  {'total':<20s} {1e3 * sum(times.values()):9.1f} ms")
    return 0


def zoo_import(args) -> int:
    """`lofa zoo import DIR --conditions FILE.jsonl --base PATH --out ZOO_DIR [--tau] [--ranks] [--rank]
    [--force]`: import, then print one summary line."""
    from lofa.lora.zoo import INDEX
    from lofa.lora.zoo_import import import_zoo

    out = import_zoo(args.dir, args.conditions, args.base, args.out, tau=args.tau, ranks=args.ranks,
                     rank=args.rank, force=args.force)
    index = json.loads((out / INDEX).read_text())
    loras = index["loras"]
    errors = [e["truncation_error"] for e in loras if "truncation_error" in e]
    note = f", truncation error up to {max(errors):.3g}" if errors else ""
    print(f"imported {len(loras)} LoRAs ({index['condition_kind']} conditions, {len(index['modules'])} modules, "
          f"rank {index['rank']}, --ranks {index['ranks']}{note}) into {out}; base fingerprint {index['base']}")
    return 0


def zoo_train(args) -> int:
    """`lofa zoo train ZOO --out DIR [--base PATH] [--text-encoder DIR] [--scale] [--overrides] [--heldout N]`."""
    from lofa.hypernet.imported import train_on_zoo

    _check_overrides(args.overrides)
    lofa = train_on_zoo(args.zoo_dir, args.out, base=args.base, text_encoder=args.text_encoder, scale=args.scale,
                        overrides=args.overrides, heldout=args.heldout, device=args.device, seed=args.seed)
    print(f"trained LoFA on {args.zoo_dir} ({len(lofa.spec)} modules, rank {lofa.cfg.rank}) in {args.out}; "
          f"predict with lofa predict --checkpoint {args.out} --prompt TEXT --out FILE.safetensors")
    return 0
