"""The `lofa` command. Each subcommand parses its arguments here and calls one library function; heavy modules are
imported only when their subcommand runs, so `lofa --help` is instant."""
from __future__ import annotations

import argparse
import importlib
import sys

from lofa.errors import LofaError


SCALES = ["smoke", "mini", "full", "wan", "paper"]


def _call(target: str):
    module, func = target.split(":")
    return lambda args: getattr(importlib.import_module(module), func)(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lofa", description="LoFA reproduction: pipeline, response maps, LoRA "
                                "prediction and benchmarks.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("reproduce", help="run the pipeline notebooks through papermill at a scale")
    r.add_argument("--scale", default="mini", choices=SCALES)
    r.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="run only these notebooks (name or number)")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    r.add_argument("--force", action="store_true", help="rerun notebooks even when their cache is valid")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--run-root", default="runs", help="results go to RUN_ROOT/<scale>/ (default: runs)")
    r.add_argument("--log-output", action="store_true", help="stream the notebooks' output to the console")
    r.add_argument("--publish", action="store_true", help="copy the figures and manifest to figures/<scale>/")
    r.set_defaults(func=_call("lofa.reproduce:cli_reproduce"))

    pt = sub.add_parser("pretrain", help="train the base generator and evaluators of a task and write the shipped "
                        "folder data/pretrained/<scale>/<task>/ (weights, config, manifest with sha256)")
    pt.add_argument("--scale", default="mini", choices=SCALES)
    pt.add_argument("--task", required=True, help="actions, styles, identities, or all")
    pt.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--run-root", default="runs", help="training artifacts in RUN_ROOT/<scale>/ (default: runs)")
    pt.add_argument("--overrides", metavar="YAML", help="recipe overrides, e.g. {BaseTrainConfig: {steps: 4000}}")
    pt.add_argument("--retrain", action="store_true", help="train from scratch even if the run folder has models")
    pt.add_argument("--part", default="models", choices=["models", "zoo"],
                    help="models: the base generator and evaluators; zoo: the per-case LoRA zoo on the shipped base")
    pt.add_argument("--out", metavar="DIR", help="write DIR/<task>/ instead of data/pretrained/<scale>/<task>/")
    pt.set_defaults(func=_call("lofa.models.pretrained:cli_pretrain"))

    m = sub.add_parser("response-map", help="response map |ΔW/W| > τ of a LoRA file against its base model")
    m.add_argument("--base", required=True, help="diffusers model folder or one .safetensors file")
    m.add_argument("--lora", required=True, help="LoRA .safetensors (diffusers/peft, Wan/DiffSynth or kohya)")
    m.add_argument("--tau", type=float, default=0.02)
    m.add_argument("--json", action="store_true", help="print one JSON object")
    m.add_argument("--plot", metavar="FILE", help="save a figure of the response map")
    m.set_defaults(func=_call("lofa.analysis:cli_response_map"))

    t = sub.add_parser("train", help="train the hypernetwork of one setting (runs under accelerate launch too)")
    t.add_argument("--setting", required=True, help="a paper setting: actions-text, actions-pose, styles, identities")
    t.add_argument("--stage", type=int, default=2, choices=[1, 2], help="1: Stage I only; 2: both stages")
    t.add_argument("--scale", default="mini", choices=SCALES)
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--run-root", default="runs", help="artifacts in RUN_ROOT/<scale>/ (default: runs)")
    t.add_argument("--overrides", metavar="YAML", help="config overrides, e.g. {Stage2TrainConfig: {steps: 300}}")
    t.set_defaults(func=_call("lofa.pipeline:cli_train"))

    pr = sub.add_parser("predict", help="predict a LoRA from a condition with a trained LoFA checkpoint")
    pr.add_argument("--checkpoint", required=True, metavar="DIR")
    cond = pr.add_mutually_exclusive_group(required=True)
    cond.add_argument("--prompt", metavar="TEXT")
    cond.add_argument("--image", metavar="FILE")
    cond.add_argument("--pose", metavar="FILE")
    pr.add_argument("--out", required=True, metavar="FILE.safetensors")
    pr.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    pr.set_defaults(func=_call("lofa.hypernet.predictor:cli_predict"))

    b = sub.add_parser("bench", help="benchmarks that print their figures")
    bsub = b.add_subparsers(dest="bench", required=True, metavar="BENCH")
    lat = bsub.add_parser("latency", help="Stage I + Stage II + merge latency at a preset's shapes")
    lat.add_argument("--preset", default="paper")
    lat.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    lat.add_argument("--runs", type=int, default=20)
    lat.add_argument("--no-compile", dest="compile", action="store_false", help="eager mode (no torch.compile)")
    lat.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    lat.add_argument("--attention", default="auto", choices=["auto", "cudnn", "flash"],
                     help="scaled-dot-product attention backend (auto: torch's choice)")
    lat.add_argument("--json-out", metavar="FILE")
    lat.set_defaults(func=_call("lofa.hypernet.bench:cli_bench_latency"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LofaError as e:
        print(f"lofa {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lofa {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
