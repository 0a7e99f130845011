"""The `lofa` command. Each subcommand parses its arguments here and calls one library function; heavy modules are
imported only when their subcommand runs, so `lofa --help` is instant.

Every option has a help text with its default; a usage error prints one line and exits 2, as bad input found by
the library does (LofaError), and so does running out of GPU memory. Output piped into a reader that stops early
(`lofa response-map ... | head`) ends the command quietly, as Unix tools do.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from lofa.config import SCALES, TAU
from lofa.errors import LofaError

DEVICES = ["auto", "cpu", "cuda"]
# The paper's settings and tasks, as lofa.run.SETTINGS / TASKS name them (that module imports torch, too slow
# for --help; tests/test_cli_help.py checks the two agree). The library validates them with its own message.
SETTINGS = ["actions-text", "actions-pose", "styles", "identities"]
TASKS = ["actions", "styles", "identities"]
OVERRIDES_HELP = ("path of a YAML file whose top-level keys are config class names, e.g. a file holding "
                  "'{name}: {{{field}: {value}}}'")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, without "(default: None)" and "(default: False)" for unset options and
    flags, where it says nothing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return action.help or ""
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (what to do included) and exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Command:
    """The library function "module:function" a subcommand runs, imported when it runs (not at parse time)."""

    def __init__(self, target: str):
        self.module, self.function = target.split(":")

    def __call__(self, args: argparse.Namespace):
        return getattr(importlib.import_module(self.module), self.function)(args)


def _add_run_options(parser: argparse.ArgumentParser, device_help: str, root_help: str) -> None:
    """--scale, --device, --seed and --run-root, shared by the subcommands that make pipeline artifacts."""
    parser.add_argument("--scale", default="mini", choices=SCALES, help="scale preset of every config")
    parser.add_argument("--device", default="auto", choices=DEVICES, help=device_help)
    parser.add_argument("--seed", type=int, default=0, help="seed of the worlds, the splits and every training")
    parser.add_argument("--run-root", default="runs", metavar="DIR", help=root_help)


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    """--overrides YAML, shared by the subcommands that train with the scale's configs."""
    parser.add_argument("--overrides", metavar="YAML",
                        help="config overrides: " + OVERRIDES_HELP.format(name="Stage2TrainConfig", field="steps",
                                                                          value=300))


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="lofa", description="LoFA reproduction: pipeline, response maps, LoRA prediction and "
               "benchmarks. 'lofa COMMAND --help' describes each command.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("reproduce", help="run the pipeline notebooks through papermill at a scale",
                       description="Run the pipeline notebooks in order; a notebook whose cache is valid is skipped.")
    _add_run_options(r, "where the notebooks compute (auto: the GPU when torch sees one)",
                     "results go to RUN_ROOT/<scale>/")
    r.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="run only these notebooks (name or number, e.g. 03)")
    r.add_argument("--tasks", default="all", metavar="TASKS",
                   help=f"all, or a comma-separated list of {', '.join(TASKS)}: the tasks (and their settings) the "
                   "notebooks run, in RUN_ROOT/<scale>-<task>[+<task>]/ when not all; a `full` run takes one task "
                   "per GPU lease")
    r.add_argument("--force", action="store_true", help="rerun notebooks even when their cache is valid")
    r.add_argument("--log-output", action="store_true", help="stream the notebooks' output to the console")
    r.add_argument("--publish", action="store_true", help="copy the figures, manifest and executed notebooks to figures/<scale>/ "
                   "(figures/<scale>/<task>[+<task>]/ for some tasks)")
    r.set_defaults(func=_Command("lofa.commands:reproduce"))

    pt = sub.add_parser("pretrain", help="train the base generator and evaluators of a task and write the shipped "
                        "folder data/pretrained/<scale>/<task>/ (weights, config, manifest with sha256)",
                        description="Train (or resume) a task's base generator and evaluators and write the shipped "
                        "folder.")
    pt.add_argument("--task", required=True, metavar="TASK",
                    help=f"one of {', '.join(TASKS)}, or all (required)")
    _add_run_options(pt, "where to train (auto: the GPU when torch sees one)", "training artifacts go to "
                     "RUN_ROOT/<scale>/")
    pt.add_argument("--overrides", metavar="YAML",
                    help="recipe overrides: " + OVERRIDES_HELP.format(name="BaseTrainConfig", field="steps",
                                                                      value=4000))
    pt.add_argument("--retrain", action="store_true", help="train from scratch even if the run folder has models")
    pt.add_argument("--part", default="models", choices=["models", "zoo"],
                    help="models: the base generator and evaluators; zoo: the per-case LoRA zoo on the shipped base")
    pt.add_argument("--out", metavar="DIR", help="write DIR/<task>/ instead of data/pretrained/<scale>/<task>/")
    pt.add_argument("--workers", type=int, default=1, metavar="N",
                    help="train the tasks' bases and evaluators in N processes side by side (with --part models; on "
                    "one GPU too: the small models leave it idle between launches)")
    pt.set_defaults(func=_Command("lofa.commands:pretrain"))

    m = sub.add_parser("response-map", help="response map |ΔW/W| > τ of a LoRA file against its base model",
                       description="Relative change |ΔW| / |W| of every LoRA module and its response map above τ.")
    m.add_argument("--base", required=True, metavar="PATH",
                   help="base model: a diffusers model or pipeline folder, or one .safetensors file (required)")
    m.add_argument("--lora", required=True, metavar="PATH",
                   help="LoRA .safetensors file or folder, in diffusers/peft, Wan/DiffSynth or kohya naming (required)")
    m.add_argument("--tau", type=float, default=TAU, help="response threshold τ on |ΔW| / |W| (the paper's 2 %%)")
    m.add_argument("--json", action="store_true", help="print one JSON object instead of the readable summary")
    m.add_argument("--plot", metavar="FILE", help="also save a figure of the response map to FILE (PNG, PDF, ...)")
    m.set_defaults(func=_Command("lofa.commands:response_map"))

    t = sub.add_parser("train", help="train the hypernetwork of one setting (runs under accelerate launch too)",
                       description="Train one setting's Stage I (and Stage II) and whatever upstream artifact is "
                       "missing; the predictor goes to RUN_ROOT/<scale>/hypernet/<setting>/lofa/.")
    t.add_argument("--setting", required=True, metavar="SETTING",
                   help=f"a paper setting: one of {', '.join(SETTINGS)} (required)")
    t.add_argument("--stage", type=int, default=2, choices=[1, 2], help="1: Stage I only; 2: both stages")
    _add_run_options(t, "where to train (auto: the GPU when torch sees one)", "artifacts go to RUN_ROOT/<scale>/")
    _add_overrides(t)
    t.set_defaults(func=_Command("lofa.commands:train"))

    pr = sub.add_parser("predict", help="predict a LoRA from a condition with a trained LoFA checkpoint",
                        description="Predict one LoRA from one condition and write it as a diffusers-loadable "
                        "LoRA file. Checkpoints of the pipeline: runs/<scale>/hypernet/<setting>/lofa/. Give the "
                        "condition the checkpoint was trained on: --prompt (actions-text), --pose (actions-pose), "
                        "--image (styles, identities).")
    pr.add_argument("--checkpoint", required=True, metavar="DIR",
                    help="LoFA checkpoint folder (config.json, stage1/stage2.safetensors), e.g. "
                    "runs/mini/hypernet/actions-text/lofa (required)")
    cond = pr.add_mutually_exclusive_group(required=True)
    cond.add_argument("--prompt", metavar="TEXT", help="text condition (actions-text), not empty; tokens beyond the "
                      "checkpoint's text length (32 in the pipeline) are cut, with a warning")
    cond.add_argument("--image", metavar="FILE", help="reference image (styles, identities): PNG, JPEG, ... of any "
                      "mode and bit depth, centre-cropped and resized to the encoder's resolution")
    cond.add_argument("--pose", metavar="FILE", help="pose sequence (actions-pose): .npy, .pt or .safetensors tensor "
                      "[3, T, H, W] float in [-1, 1] at the encoder's T, H, W (mini: 8 x 32 x 32)")
    pr.add_argument("--out", required=True, metavar="FILE.safetensors",
                    help="LoRA file to write (diffusers naming, `transformer.` or `unet.` keys; required)")
    pr.add_argument("--device", default="auto", choices=DEVICES, help="where to predict (auto: the GPU when torch "
                    "sees one)")
    pr.set_defaults(func=_Command("lofa.commands:predict"))

    z = sub.add_parser("zoo", help="LoRA zoos (the LoRA collections LoFA trains on)",
                       description="LoRA zoos: index.json + loras/case_XXXXX.safetensors (lofa.lora.zoo).")
    zsub = z.add_subparsers(dest="zoo", required=True, metavar="ZOO_COMMAND")
    zi = zsub.add_parser("import", help="make a zoo of existing LoRA files and a JSONL of their conditions",
                         description="Import a folder of LoRA files (diffusers/peft, Wan/DiffSynth or kohya naming) "
                         "and a JSONL with one line per file, {\"file\": \"a.safetensors\", \"prompt\": \"...\"} "
                         "(or \"image\" / \"pose\": a path relative to the JSONL's folder), as a zoo: LoRAs "
                         "rewritten in diffusers naming, conditions copied, index.json with each LoRA's sha256, "
                         "rank, alpha and response-map density. Case id = line order. Written whole or not at all.")
    zi.add_argument("dir", metavar="DIR", help="folder of the LoRA .safetensors files; every one needs a line")
    zi.add_argument("--conditions", required=True, metavar="FILE.jsonl",
                    help="JSONL, one line per LoRA file: \"file\" and one of \"prompt\", \"image\", \"pose\" "
                    "(one kind per zoo; required)")
    zi.add_argument("--base", required=True, metavar="PATH",
                    help="base model the LoRAs adapt: a diffusers model or pipeline folder, or one .safetensors "
                    "file (required)")
    zi.add_argument("--out", required=True, metavar="ZOO_DIR", help="zoo folder to write (required)")
    zi.add_argument("--tau", type=float, default=TAU,
                    help="response threshold τ on |ΔW| / |W| of each LoRA's density in the index")
    zi.add_argument("--ranks", default="strict", choices=["strict", "pad", "truncate"],
                    help="LoRAs of different ranks: strict refuses them; pad zero-pads to the largest rank (ΔW "
                    "unchanged); truncate keeps the top --rank singular directions of each ΔW (changes ΔW; the "
                    "relative error is in the index)")
    zi.add_argument("--rank", type=int, metavar="R", help="the zoo's rank with --ranks truncate (required there)")
    zi.add_argument("--force", action="store_true", help="replace the --out folder if it exists")
    zi.set_defaults(func=_Command("lofa.commands:zoo_import"))
    zt = zsub.add_parser("train", help="train LoFA (Stage I, then Stage II) on an imported zoo of prompt LoRAs",
                         description="Train both stages on a zoo made by lofa zoo import (prompt conditions): the "
                         "pipeline's recipe and configs, the reconstruction term alone (the zoo holds no training "
                         "clips). The checkpoint names the base and the text encoder; lofa predict --checkpoint OUT "
                         "--prompt TEXT reads it. Resumes after an interruption.")
    zt.add_argument("zoo_dir", metavar="ZOO_DIR", help="zoo folder written by lofa zoo import")
    zt.add_argument("--out", required=True, metavar="DIR", help="LoFA checkpoint folder to write (required)")
    zt.add_argument("--base", metavar="PATH", help="the base model the zoo was imported against (default: the path "
                    "in the zoo's index; checked by fingerprint)")
    zt.add_argument("--text-encoder", metavar="DIR", help="local umT5 encoder (a Wan2.1 diffusers pipeline folder, "
                    "or one folder with the encoder and its tokenizer) to read prompts as Wan does (512 tokens); "
                    "default: the package's MiniLM")
    zt.add_argument("--heldout", type=int, default=0, metavar="N", help="keep the zoo's last N LoRAs out of "
                    "training; Stage II's history follows their ΔW fidelity")
    zt.add_argument("--scale", default="mini", choices=SCALES, help="config presets of the hypernetwork and its "
                    "training (paper: d_model 768, 8 blocks, patch 96)")
    zt.add_argument("--device", default="auto", choices=DEVICES, help="where to train (auto: the GPU when torch "
                    "sees one)")
    zt.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batches")
    _add_overrides(zt)
    zt.set_defaults(func=_Command("lofa.commands:zoo_train"))

    b = sub.add_parser("bench", help="benchmarks and experiments that print their figures",
                       description="Benchmarks and experiments that print their figures (lofa.bench, one module "
                       "each).")
    bsub = b.add_subparsers(dest="bench", required=True, metavar="BENCH")
    lat = bsub.add_parser("latency", help="Stage I + Stage II + merge latency at a preset's shapes",
                          description="Stage I + Stage II + merge latency at a preset's shapes, random weights.")
    lat.add_argument("--preset", default="paper", choices=SCALES,
                     help="shapes of the hypernetwork and its targets (paper / wan: 240 Wan2.1-1.3B matrices)")
    lat.add_argument("--device", default="cuda", choices=["cpu", "cuda"], help="device to time")
    lat.add_argument("--threads", type=int, default=1, metavar="N",
                     help="CPU only: torch intra-op threads, pinned for the run (more threads than idle cores make "
                     "every timing wait on the others)")
    lat.add_argument("--runs", type=int, default=20, metavar="N",
                     help="timed runs after warm-up (the median is reported; at least 20)")
    lat.add_argument("--no-compile", dest="compile", action="store_false",
                     help="eager mode (no torch.compile; the CPU always runs eager)")
    lat.add_argument("--compile-mode", default=None, metavar="MODE",
                     help="torch.compile mode, e.g. reduce-overhead (CUDA graphs); torch's default when unset")
    lat.add_argument("--attention", default="auto", choices=["auto", "cudnn", "flash"],
                     help="scaled-dot-product attention backend (auto: torch's choice)")
    lat.add_argument("--json-out", metavar="FILE", help="also write the figures and every sample to FILE (JSON)")
    lat.set_defaults(func=bench_latency)
    tr = bsub.add_parser("train", help="Stage I and Stage II training steps against a random-weight Wan2.1 DiT",
                         description="Seconds per step, LoRAs per second, peak GPU memory and the hours of 20,000 "
                         "steps for one Stage I and one Stage II training step (bf16 autocast, float32 master "
                         "weights), Stage II with the flow-matching term through the DiT on Wan-shaped latents.")
    tr.add_argument("--preset", default="paper", choices=SCALES, help="shapes of the hypernetwork and the DiT "
                    "(paper / wan: Wan2.1-T2V-1.3B, 240 targets)")
    tr.add_argument("--device", default="cuda", choices=["cpu", "cuda"], help="device to time")
    tr.add_argument("--clip", default="81x480x832", metavar="FxHxW", help="video clip of the flow-matching term, "
                    "frames x height x width (Wan's VAE makes a 16-channel latent 4x shorter, 8x smaller)")
    tr.add_argument("--steps", type=int, default=5, metavar="N", help="timed steps after 2 warm-up steps")
    tr.add_argument("--stage1-batch", type=int, metavar="N", help="LoRAs per Stage I step (default: the preset's)")
    tr.add_argument("--stage2-batch", type=int, metavar="N", help="LoRAs per Stage II step (default: the preset's)")
    tr.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in the hypernetwork")
    tr.add_argument("--no-dit-checkpointing", dest="dit_checkpointing", action="store_false",
                    help="keep the DiT's activations instead of recomputing its blocks in the backward pass")
    tr.add_argument("--json-out", metavar="FILE", help="also write the figures and every sample to FILE (JSON)")
    tr.set_defaults(func=_Command("lofa.bench.wan_training:cli_bench_train"))
    ac = bsub.add_parser("activate", help="from an encoded condition to a LoRA active in a live Wan transformer",
                         description="LoFA.activate per phase (Stage I, Stage II, the write into the peft adapter) "
                         "into a random-weight diffusers Wan transformer, and diffusers' hot-swap from a state dict.")
    ac.add_argument("--preset", default="paper", choices=SCALES, help="shapes (paper / wan: Wan2.1-T2V-1.3B)")
    ac.add_argument("--device", default="cuda", choices=["cpu", "cuda"], help="device to time")
    ac.add_argument("--runs", type=int, default=20, metavar="N", help="timed warm runs (the median is reported)")
    ac.add_argument("--no-compile", dest="compile", action="store_false", help="eager mode (no torch.compile)")
    ac.add_argument("--json-out", metavar="FILE", help="also write the figures and every sample to FILE (JSON)")
    ac.set_defaults(func=_Command("lofa.bench.wan_activation:cli_bench_activate"))
    th = bsub.add_parser("throughput", help="LoRAs per hour, batched multi-LoRA vs one-at-a-time peft training",
                         description="Throughput of LoRA-zoo collection: LoRAs per hour, batched multi-LoRA training "
                         "vs one-at-a-time peft training, same recipe, steps and cases (their final losses agree).")
    th.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device to time")
    th.add_argument("--task", default="actions", choices=TASKS, help="the world whose cases and recipe are trained")
    th.add_argument("--scale", default="mini", choices=SCALES, help="preset of the generator and the LoRA recipe")
    th.add_argument("--loras", type=int, metavar="N", help="LoRAs in the batched run (default: the preset's "
                    "group_size)")
    th.add_argument("--single", type=int, metavar="N", help="LoRAs trained one at a time (default 4 on cpu, 8 on "
                    "cuda)")
    th.add_argument("--steps", type=int, metavar="N", help="training steps per LoRA (default: the preset's)")
    th.add_argument("--base", metavar="DIR", help="a saved base generator (default: freshly initialised)")
    th.add_argument("--seed", type=int, default=0, help="seed of the fresh generator and of every LoRA's training")
    th.add_argument("--json-out", metavar="FILE", help="also write the figures to FILE (JSON)")
    th.set_defaults(func=_Command("lofa.bench.lora_throughput:cli_bench_throughput"))
    sw = bsub.add_parser("sweep", help="the LoRA recipe sweep: exact-case recognition of LoRA samples per recipe",
                         description="The LoRA recipe sweep: how often samples from a case's LoRA are recognised as "
                         "that exact case, as a fraction of how often ground-truth renders of it are, for several "
                         "recipes on every task (notebook 03's protocol on a run's own bases and evaluators). "
                         "Resumes: finished points in --out are skipped.")
    sw.add_argument("--run-dir", required=True, metavar="DIR",
                    help="a pipeline run folder (runs/<scale>): its bases and evaluators (required)")
    sw.add_argument("--scale", default="mini", choices=SCALES, help="scale preset of the run's configs")
    sw.add_argument("--device", default="auto", choices=DEVICES, help="where to train and score (auto: the GPU "
                    "when torch sees one)")
    sw.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="tasks to sweep")
    sw.add_argument("--steps", nargs="*", type=int, default=[100, 200, 400, 800], metavar="N",
                    help="step counts (may be none)")
    sw.add_argument("--knobs", action="store_true", help="also lr x 2.5, rank x 2, batch x 4 at the preset's steps")
    sw.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="LoraTrainConfig fields changed under every point, e.g. include_ffn=true batch_size=8")
    sw.add_argument("--cases", type=int, default=48, metavar="N", help="every held-out case of the zoo's "
                    "selection, then train cases up to this many (notebook 03's QUALITY_CASES)")
    sw.add_argument("--per-case", type=int, default=2, metavar="N", help="samples scored per case")
    sw.add_argument("--replicates", action="store_true",
                    help="also train each LoRA again on new renders: ΔW cosine of a case's two LoRAs vs other cases'")
    sw.add_argument("--seed", type=int, default=0, help="seed of the run, the case selection and every LoRA")
    sw.add_argument("--out", required=True, metavar="FILE.csv",
                    help="CSV of the points, rewritten after each one (required)")
    sw.set_defaults(func=_Command("lofa.bench.lora_sweep:cli_bench_sweep"))
    rp = bsub.add_parser("replicates", help="ΔW agreement of two LoRAs of one case vs LoRAs of different cases",
                         description="How much of a per-case LoRA is its case, and how much is training noise: each "
                         "case's LoRA trained twice with the task's zoo recipe, cos(ΔW) between a case's two "
                         "replicates and between different cases.")
    rp.add_argument("--run-dir", required=True, metavar="DIR",
                    help="a pipeline run folder holding the task's base generator (required)")
    rp.add_argument("--scale", default="mini", choices=SCALES, help="scale preset of the run's configs")
    rp.add_argument("--task", default="identities", choices=TASKS, help="the task whose base and recipe are used")
    rp.add_argument("--cases", type=int, default=4, metavar="N",
                    help="train cases compared (the first of the world's train split)")
    rp.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    rp.add_argument("--new-renders", action="store_true",
                    help="the second replicate also draws new renders of its case (what a condition can predict)")
    rp.add_argument("--seed", type=int, default=0, help="seed of the run and of both replicates' training")
    rp.set_defaults(func=_Command("lofa.bench.lora_replicates:cli_bench_replicates"))
    zs = bsub.add_parser("zoo-size", help="quality against the number of training LoRAs (the paper's Fig. 8)",
                         description="One zoo of a task, then LoFA, Text-to-LoRA and the single-stage ablation "
                         "trained on shares of its training LoRAs and scored beside the per-case LoRA and the "
                         "reference predictors on the same held-out cases (notebook 07's protocol). Resumes: each "
                         "size's run folder caches its trainings.")
    zs.add_argument("--scale", default="mini", choices=SCALES, help="scale preset of every config")
    zs.add_argument("--task", default="identities", choices=TASKS, help="the task swept")
    zs.add_argument("--n-cases", type=int, default=None, metavar="N",
                    help="cases of the identities world instead of the scale's (the mini world draws up to 800)")
    zs.add_argument("--fractions", nargs="+", type=float, default=[0.125, 0.25, 0.5, 1.0], metavar="F",
                    help="shares of the training LoRAs, each in (0, 1]")
    zs.add_argument("--cases", type=int, default=32, metavar="N",
                    help="held-out cases scored at every size, and as many training cases of each size's zoo")
    zs.add_argument("--per-case", type=int, default=4, metavar="N", help="samples per case and method")
    zs.add_argument("--device", default="auto", choices=DEVICES, help="where to train and score (auto: the GPU "
                    "when torch sees one)")
    zs.add_argument("--seed", type=int, default=0, help="seed of the world, the zoo, every training and the scoring")
    zs.add_argument("--workers", type=int, default=1, metavar="N",
                    help="sizes trained side by side, one process each")
    zs.add_argument("--overrides", default=None, metavar="YAML",
                    help="recipe overrides of every size's run (a YAML file: top-level keys are config class names)")
    zs.add_argument("--run-root", default="runs/zoo-size", metavar="DIR",
                    help="DIR/all holds the whole zoo, DIR/train-N each size's run")
    zs.add_argument("--out", required=True, metavar="FILE.csv",
                    help="the quality table; FILE_verdicts.csv beside it gets LoFA's paired differences (required)")
    zs.set_defaults(func=_Command("lofa.bench.zoo_size:cli_bench_zoo_size"))
    tb = bsub.add_parser("tau", help="Stage I's τ: the paper's 2 %% against a τ per task at the paper's sparsity",
                         description="LoFA trained twice on one zoo, Stage I on the response maps at the paper's τ "
                         "= 2 % and at each task's sparsity τ (a given share of the training LoRAs' entries below "
                         "it), then Stage I against the mean training map, the paper's map fidelity, and LoRA "
                         "quality beside the per-case LoRA and the reference predictors (notebook 07's protocol). "
                         "Resumes: the runs' folders cache every training.")
    tb.add_argument("--scale", default="mini", choices=SCALES, help="scale preset of every config")
    tb.add_argument("--settings", nargs="+", default=SETTINGS, choices=SETTINGS,
                    help="paper settings studied")
    tb.add_argument("--below", type=float, default=0.65, metavar="SHARE",
                    help="share of the training LoRAs' entries below each task's sparsity τ (the paper: 0.50-0.80)")
    tb.add_argument("--cases", type=int, default=24, metavar="N",
                    help="held-out cases scored per setting, and as many training cases")
    tb.add_argument("--per-case", type=int, default=2, metavar="N", help="samples per case and method")
    tb.add_argument("--device", default="auto", choices=DEVICES, help="where to train and score (auto: the GPU "
                    "when torch sees one)")
    tb.add_argument("--seed", type=int, default=0, help="seed of the zoo, every training and the scoring")
    tb.add_argument("--workers", type=int, default=1, metavar="N",
                    help="runs trained side by side and settings scored side by side, one process each")
    tb.add_argument("--overrides", default=None, metavar="YAML",
                    help="recipe overrides of both runs (a YAML file: top-level keys are config class names; not "
                    "HyperConfig.tau)")
    tb.add_argument("--run-root", default="runs/tau", metavar="DIR",
                    help="DIR/tau-paper holds the zoo and LoFA at τ = 2 %%, DIR/tau-TASK LoFA at each sparsity τ")
    tb.add_argument("--out", required=True, metavar="FILE.csv",
                    help="the quality table; FILE_verdicts.csv and FILE_maps.csv beside it (required)")
    tb.set_defaults(func=_Command("lofa.bench.tau:cli_bench_tau"))
    return p


def bench_latency(args: argparse.Namespace) -> int:
    """`lofa bench latency`: on the CPU, pin torch to --threads intra-op threads for the run and say so."""
    from lofa.bench.latency import cli_bench_latency

    if args.device != "cpu":
        return cli_bench_latency(args)
    if args.threads < 1:
        raise LofaError(f"--threads {args.threads}: give at least 1")
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    print(f"CPU benchmark: torch pinned to {args.threads} intra-op thread(s) (--threads; it had {before}), so the "
          "timings do not wait on threads that other processes keep busy")
    try:
        return cli_bench_latency(args)
    finally:
        torch.set_num_threads(before)


def bench_main(name: str) -> int:
    """`python -m lofa.bench.MODULE ARGS` = `lofa bench NAME ARGS`: each benchmark has one argument parser, here."""
    return main(["bench", name, *sys.argv[1:]])


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings on the command line as one line each (no source line): the user did not write that code."""
    print(f"lofa: warning: {message}", file=sys.stderr if file is None else file)


def _out_of_gpu_memory(error: BaseException) -> bool:
    """Whether `error` is torch's CUDA out-of-memory error. Without torch imported the command used no GPU (and
    importing it here would slow every other error down)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(error, torch.cuda.OutOfMemoryError)


def _command_name(args: argparse.Namespace) -> str:
    """"train", or with a command of subcommands "bench latency", "zoo import": what an error line names."""
    sub = getattr(args, args.command, None)  # the subcommand, where the command has subcommands (their dest)
    return f"{args.command} {sub}" if isinstance(sub, str) else args.command


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = _command_name(args)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            code = int(args.func(args) or 0)
            sys.stdout.flush()  # here, so that a reader gone before the last output is a BrokenPipeError below
            return code
        except LofaError as e:
            print(f"lofa {name}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"lofa {name}: interrupted; rerun the same command to resume", file=sys.stderr)
            return 130
        except BrokenPipeError:
            # The reader of stdout stopped early (`| head`): stop quietly. Python flushes stdout again at exit,
            # so point it at devnull first, as the Python docs recommend (signal module, "Note on SIGPIPE").
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 141  # 128 + SIGPIPE: the status of a tool the closed pipe stopped
        except Exception as e:
            if not _out_of_gpu_memory(e):
                raise
            if "overrides" in args:  # the recipe's batch sizes are the command's to change
                fix = "lower the batch size with --overrides or use --device cpu"
            elif "device" in args:
                fix = "use --device cpu"
            else:
                fix = "free GPU memory (other processes hold it) and rerun"
            print(f"lofa {name}: error: out of GPU memory in {name}; {fix}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
