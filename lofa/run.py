"""The pipeline's artifacts, one cached step each, for the notebooks to call.

    run = Run(scale, device, seed, run_dir)          # the four parameters every notebook receives
    world = run.world("actions")                     # procedural, nothing stored
    gen = run.base("actions")                        # runs/<scale>/base/actions/      (notebook 02)
    ev = run.evaluators("actions")                   # runs/<scale>/evaluators/actions/ (notebook 02)
    enc = run.condition_encoder("actions")           # runs/<scale>/encoders/actions/  (pose / image encoders)
    zoo = run.zoo("actions")                         # runs/<scale>/zoo/actions/        (notebook 03)
    lofa = run.hypernet("actions-text")              # runs/<scale>/hypernet/actions-text/lofa/ (notebooks 05, 06)
    run.fig("02_base_samples.png")                   # runs/<scale>/figures/02_base_samples.png

Each step trains what is missing and loads what is complete (the step functions resume after an interruption),
so a notebook can ask for any upstream artifact. Configs are the scale's presets with optional overrides from a
YAML file whose top-level keys are config class names, e.g. `LoraTrainConfig: {steps: 300}`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from pathlib import Path
from typing import Sequence

import torch

from lofa import seeds
from lofa.config import TASKS, load_overrides, preset
from lofa.errors import LofaError

# The paper's four personalisation settings: (name, world task, condition kind).
SETTINGS = (("actions-text", "actions", "text"), ("actions-pose", "actions", "pose"),
            ("styles", "styles", "image"), ("identities", "identities", "image"))
# Held-out and training cases whose ΔW fidelity Stage II's learning curves follow (`Triplets.monitor_batches`)
MONITOR_CASES = 16
# Contrastive steps of the condition encoders per scale (other scales: 2000); tests/test_seeds.py reads them to check
# the "encoder.pairs" stream against the scored ones.
ENCODER_STEPS = {"smoke": 20, "mini": 400}


class Run:
    """The artifacts of one pipeline run at one scale. Cheap to build; every artifact is loaded lazily."""

    def __init__(self, scale: str = "mini", device: str = "cpu", seed: int = 0, run_dir: str | Path | None = None,
                 overrides: str | Path | dict | None = None, pretrained: bool = True,
                 tasks: str | Sequence[str] = "all"):
        self.scale, self.device, self.seed = scale, torch.device(device), seed
        # The tasks a notebook loops over (`self.tasks`, `self.settings`): all three, or the one a `full` run on one
        # GPU lease can afford. Any step can still be asked for any task.
        self.tasks = select_tasks(tasks)
        self.settings = tuple(s for s in SETTINGS if s[1] in self.tasks)
        self.pretrained = pretrained  # install shipped bases and evaluators whose recipe matches (lofa.models.pretrained)
        self.dir = Path(run_dir) if run_dir else Path("runs") / scale
        self.overrides = load_overrides(overrides)  # a typo fails here, before anything is trained
        (self.dir / "figures").mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ configs and paths
    def config(self, cls):
        """`cls` at this run's scale, with this run's overrides for it."""
        return preset(cls, self.scale, self.overrides.get(cls.__name__))

    def one_thread_on_cpu(self) -> None:
        """On the CPU, let torch use one intra-op thread. The models are tiny: on a shared CPU a second intra-op
        thread that is not scheduled stalls every op (2-core dev machine under load: a Stage I step at mini 0.09 s
        with one thread, 1-11 s with two; a Stage II step 0.5 s with one, 5 s with two; batched LoRA training at
        smoke 17-32 ms per LoRA-step with one, 130-700 ms with two)."""
        if self.device.type == "cpu":
            torch.set_num_threads(1)

    def fig(self, name: str) -> Path:
        return self.dir / "figures" / name

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    # ------------------------------------------------------------------ several steps at once
    def build(self, jobs: list[tuple[str, str]], workers: int | None = None) -> None:
        """Make sure the artifacts of `jobs` [(step, key), ...] exist, e.g. `[("base", "actions"), ("evaluators",
        "styles")]` or `[("stage2", "actions-text")]` (steps: `_BUILD_STEPS`); independent jobs only (none may need
        another's output, and two jobs must not write one artifact: build shared upstream steps first).

        On the CPU each job runs in its own single-threaded worker process, `workers` at a time (default: one per
        core): the mini models are too small for torch's intra-op threads to use two cores, two processes do.
        On a GPU, or with one worker, the jobs run here in turn. Artifacts are loaded afterwards by the usual calls.
        A worker whose parent dies (a killed notebook kernel or orchestrator) exits within a second
        (`lofa.workers`).
        """
        from concurrent.futures import as_completed

        from tqdm.auto import tqdm

        from lofa.workers import process_pool

        for step, _ in jobs:
            if step not in _BUILD_STEPS:
                raise LofaError(f"Run.build: unknown step {step!r}; choose from {', '.join(_BUILD_STEPS)}")
        if workers is None:
            workers = (os.cpu_count() or 1) if self.device.type == "cpu" else 1
        workers = min(workers, len(jobs))
        if workers <= 1:
            for step, key in tqdm(jobs, desc="build"):
                _BUILD_STEPS[step](self, key)
            return
        with process_pool(workers) as pool:  # spawn workers that end themselves if this process dies
            futures = {pool.submit(_build_job, self.args(), step, key): (step, key) for step, key in jobs}
            bar = tqdm(total=len(jobs), desc=f"build ({workers} worker processes)")
            for future in as_completed(futures):
                future.result()  # re-raises a worker's error here
                bar.update()
                bar.set_postfix_str("/".join(futures[future]))
            bar.close()

    def map(self, fn, keys: Sequence[str], *args, workers: int | None = None, **kwargs) -> list:
        """[fn(run, key, *args, **kwargs) for key in keys], in that order: on the CPU in worker processes (default
        one per core), each with one intra-op thread and its own Run of this run's folder, so that a notebook's
        per-setting scoring uses both cores of a 2-core machine; on a GPU, or with one worker, here in turn.

        fn: a module-level function (spawn workers import it) that only reads artifacts that exist (build them
        first); its arguments and result must pickle. Each worker computes exactly what this process would: the
        scoring seeds are explicit and a single-threaded op gives the same bits in any process. A worker whose
        parent dies exits within a second (`lofa.workers`)."""
        from lofa.workers import process_pool

        if workers is None:
            workers = (os.cpu_count() or 1) if self.device.type == "cpu" else 1
        workers = min(workers, len(keys))
        if workers <= 1:
            return [fn(self, key, *args, **kwargs) for key in keys]
        with process_pool(workers) as pool:
            futures = [pool.submit(_map_job, self.args(), fn, key, args, kwargs) for key in keys]
            return [future.result() for future in futures]  # re-raises a worker's error here

    def args(self) -> tuple:
        """What a worker process needs to open this run: (scale, device, seed, run_dir, overrides, pretrained,
        tasks)."""
        return self.scale, str(self.device), self.seed, str(self.dir), self.overrides, self.pretrained, self.tasks

    # ------------------------------------------------------------------ steps
    @functools.cache
    def world(self, task: str):
        from lofa.worlds import make_world

        _check_task(task)
        return make_world(task, "smoke" if self.scale == "smoke" else ("full" if self.scale == "full" else "mini"),
                          seed=seeds.stream(self.seed, "world"), overrides=self.overrides.get(f"world.{task}"))

    @functools.cache
    def base(self, task: str, progress: bool = True):
        """The base generator of `task`, trained on coarse captions: the shipped one (data/pretrained/) when
        its recipe and seed match this run's, else trained here (or resumed, or loaded from the run folder)."""
        from lofa.models import pretrained
        from lofa.models.train_base import BaseTrainConfig, is_complete, record, train_base

        cfg, out = self.config(BaseTrainConfig).for_task(task), self.path("base", task)
        if self.pretrained and not is_complete(out, cfg, self.seed):
            pretrained.install_base(self.scale, task, out, record(cfg), self.seed)
        return train_base(self.world(task), cfg, out, self.device, seed=self.seed, progress=progress)

    @functools.cache
    def evaluators(self, task: str):
        """Evaluators trained on ground-truth renders only, with their own seed (the "evaluators" stream of
        lofa.seeds, run seed + 10,000): the shipped ones when world, config and seed match, else trained here."""
        from lofa.metrics.evaluators import EvalConfig, fingerprint, is_complete, train_evaluators
        from lofa.models import pretrained

        world, cfg, out, seed = self.world(task), self.config(EvalConfig), self.path("evaluators", task), \
            seeds.stream(self.seed, "evaluators")
        if self.pretrained and not is_complete(out, world, cfg, seed):
            pretrained.install_evaluators(self.scale, task, out, fingerprint(world, cfg, seed))
        return train_evaluators(world, cfg, out, self.device, seed=seed)

    @functools.cache
    def condition_encoder(self, task: str, progress: bool = True):
        """The pose (actions) or reference-image (styles, identities) encoder, contrastively pre-trained in the
        world on training cases; the paper's 3D-conv pose encoder / CLIP-ViT-L + MLP stand-in."""
        from lofa.io import write_json
        from lofa.models.cond_encoders import (encoder_for_world, load_condition_encoder, train_condition_encoder,
                                               world_pairs)

        out = self.path("encoders", task)
        if (out / "encoder.safetensors").exists() and (out / "summary.json").exists():
            return load_condition_encoder(out / "encoder.safetensors", self.device)
        world = self.world(task)
        # Initial weights from the run's seed, not from whatever the global generator holds: Run.build trains the
        # encoders in worker processes that take jobs in no fixed order, so an unseeded encoder came out differently
        # from run to run (and with it every result that reads a pose or image condition).
        torch.manual_seed(seeds.stream(self.seed, "encoder.init"))
        enc = encoder_for_world(world, self.scale).to(self.device)
        steps = ENCODER_STEPS.get(self.scale, 2000)
        log = train_condition_encoder(enc, world_pairs(world), world.ids("train"), steps=steps, seed=self.seed,
                                      device=self.device, eval_ids=world.ids("heldout"), progress=progress)
        enc.save(out / "encoder.safetensors")
        write_json(out / "summary.json", log)
        return enc.eval()

    @functools.cache
    def zoo(self, task: str, progress: bool = True, shard: tuple[int, int] | None = None):
        """One LoRA per selected case (`ZooConfig`): every held-out case — held-out LoRAs are the per-case
        baseline — and train cases up to the cap, if any: the shipped zoo (data/pretrained/) when its recipe, seed
        and base match, trained here otherwise. shard=(i, n) trains the i-th of n shares and returns
        None (`build_zoo`; `Run.build` steps "zoo_shard", key "task:i/n"); the plain call then completes it."""
        from lofa.lora.train import LoraTrainConfig
        from lofa.lora.zoo import ZooConfig, build_zoo, select_cases

        world, gen, cfg = self.world(task), self.base(task), self.config(LoraTrainConfig)
        case_ids = select_cases(world, self.config(ZooConfig).max_cases, self.seed)
        self.install_zoo(task)
        return build_zoo(world, gen, cfg, self.path("zoo", task), self.device, seed=seeds.stream(self.seed, "lora"),
                         case_ids=case_ids, progress=progress, shard=shard)

    def install_zoo(self, task: str) -> bool:
        """Install the shipped zoo of `task` (data/pretrained/) into the run when it holds every case this run's
        zoo selects, with this run's recipe, seed and base; returns whether the run's zoo is the shipped one."""
        from lofa.lora.train import LoraTrainConfig
        from lofa.io import read_json
        from lofa.lora.zoo import INDEX, ZooConfig, select_cases, same_zoo, zoo_header
        from lofa.models import pretrained

        world = self.world(task)
        if not self.pretrained or select_cases(world, self.config(ZooConfig).max_cases, self.seed) != \
                [c.id for c in world.cases]:
            return False
        header = zoo_header(world, self.base(task), self.config(LoraTrainConfig), seeds.stream(self.seed, "lora"))
        out = self.path("zoo", task)
        pretrained.install_zoo(self.scale, task, out, header)
        index = read_json(out / INDEX)
        return index is not None and same_zoo(index, header) and len(index["loras"]) == len(world.cases)

    def zoos(self, tasks: tuple[str, ...] = TASKS, shares: int = 2) -> dict:
        """{task: Zoo} of several tasks: shipped zoos installed (`install_zoo`), the others trained side by side in
        `shares` worker processes a task (`build`, step "zoo_shard") and then completed and indexed by `zoo`."""
        to_train = [task for task in tasks if not self.install_zoo(task)]
        if to_train:
            self.build([("zoo_shard", f"{task}:{i}/{shares}") for task in to_train for i in range(shares)])
        return {task: self.zoo(task) for task in tasks}

    # ------------------------------------------------------------------ the LoFA hypernetwork (notebooks 05, 06)
    @functools.cache
    def triplets(self, setting: str):
        """The (condition, LoRA, base weights) triplets of a paper setting (`SETTINGS`) from its task's zoo."""
        from lofa.hypernet.data import TripletConfig, Triplets
        from lofa.models.text import TextEncoder

        _, task, kind = parse_setting(setting)
        encoder = None if kind == "text" else self.condition_encoder(task)
        text = TextEncoder(self.device) if kind == "text" else None
        return Triplets(self.world(task), self.zoo(task), self.base(task), kind, self.config(TripletConfig),
                        encoder=encoder, text=text, seed=seeds.stream(self.seed, "hypernet"))

    def hypernet_config(self, setting: str):
        """HyperConfig of a setting: the scale's preset, with the LoRA rank and alpha of the zoo and the width and
        length of the condition tokens; this run's overrides for HyperConfig win over all of these."""
        from lofa.hypernet.config import HyperConfig

        data = self.triplets(setting)
        bank = data.conditions("train")
        fields = {"rank": data.rank, "alpha": data.alpha_value, "cond_dim": bank.dim, "cond_len": bank.tokens.shape[2]}
        return preset(HyperConfig, self.scale, {**fields, **(self.overrides.get("HyperConfig") or {})})

    @functools.cache
    def hypernet(self, setting: str, stage: int = 2, variant: str = "lofa", progress: bool = True):
        """LoFA for a paper setting: stage 1 -> the trained Stage I (response maps); stage 2 -> the `LoFA` predictor
        (Stage I, then Stage II initialised from it), saved with `save_pretrained` in runs/<scale>/hypernet/
        <setting>/<variant>/ (`lofa predict --checkpoint` reads it). Variants (HYPERNET_VARIANTS) change Stage II's
        training only; their Stage II starts from the one Stage I in <setting>/lofa/stage1 and sees the same batches.
        The ablations of the paper's Table 4 ("no_response", "lightweight", "prompt_input": `recipe.train_ablation`)
        train no Stage I on the response maps: each is trained by Stage II's loop alone, on the same batches, and
        has stage 2 only.

        Trained on the zoo's train-split LoRAs with `TrainConfig` (Stage I) and `Stage2TrainConfig` (Stage II, with
        the flow-matching term through the frozen base generator when lambda_diff > 0); each stage resumes from its
        checkpoints in stage1/ and stage2/, and a complete folder is only loaded.
        """
        from lofa.hypernet import LoFA, save_pretrained
        from lofa.hypernet.data import DiffusionLoss
        from lofa.hypernet.predictor import CONFIG_FILE
        from lofa.hypernet.recipe import train_ablation, train_stage1, train_stage2
        from lofa.hypernet.train import Stage2TrainConfig, TrainConfig
        from lofa.models.text import TextEncoder

        _, task, kind = parse_setting(setting)
        if variant not in HYPERNET_VARIANTS:
            raise LofaError(f"unknown hypernetwork variant {variant!r}; choose one of {', '.join(HYPERNET_VARIANTS)}")
        if stage not in (1, 2):
            raise LofaError(f"stage must be 1 (response maps) or 2 (LoRA), not {stage!r}")
        changes = dict(HYPERNET_VARIANTS[variant])
        ablation = changes.pop("ablation", None)
        if ablation is not None and stage == 1:
            raise LofaError(f"the {variant} ablation has no Stage I trained on response maps; ask for stage 2")
        out = self.path("hypernet", setting, variant)
        if (out / CONFIG_FILE).exists():
            lofa = LoFA.from_pretrained(out, device=self.device, dtype=torch.float32)
            return lofa.stage1 if stage == 1 else lofa
        launch = launched()
        with launch.main_process_first() if launch else contextlib.nullcontext():
            data = self.triplets(setting)  # under a multi-process launch the main process builds what is missing
        cfg = self.hypernet_config(setting)
        if ablation is None:
            stage1 = train_stage1(data, cfg, self.config(TrainConfig),
                                  self.path("hypernet", setting, "lofa", "stage1"), device=str(self.device),
                                  seed=self.seed, progress=progress)
            if stage == 1:
                return stage1
        lora_head = changes.pop("lora_head", None)
        train2 = dataclasses.replace(self.config(Stage2TrainConfig), **changes)
        diffusion = None
        if train2.lambda_diff:
            diffusion = DiffusionLoss(self.base(task), data.world, data.text or TextEncoder(self.device), data.cfg,
                                      seed=seeds.stream(self.seed, "hypernet"))
        if ablation is None:
            stage2 = train_stage2(data, stage1, train2, out / "stage2", device=str(self.device), seed=self.seed,
                                  lora_head=lora_head, diffusion=diffusion, monitor_cases=MONITOR_CASES,
                                  progress=progress)
        else:
            stage2, stage1 = train_ablation(ablation, data, cfg, train2, out / "stage2", device=str(self.device),
                                            seed=self.seed, diffusion=diffusion, monitor_cases=MONITOR_CASES,
                                            progress=progress)
        encoder = data.encoder if data.encoder is not None else {"kind": "text", "max_length": data.text.max_length}
        if launch is None or launch.is_main_process:
            save_pretrained(out, stage2, stage1, condition_encoder=encoder,
                            base=os.path.relpath(self.path("base", task, "generator"), out))
        if launch is not None:
            launch.wait_for_everyone()
        return LoFA.from_pretrained(out, device=self.device, dtype=torch.float32)

    @functools.cache
    def text_to_lora(self, setting: str, progress: bool = True):
        """The Text-to-LoRA baseline of a paper setting (`lofa.baselines.text_to_lora`), trained on the same zoo,
        training cases and condition tokens as LoFA, with Stage II's loop: the steps, LoRAs per step, learning rate,
        schedule and reconstruction term of `Stage2TrainConfig` (its diffusion term and start are LoFA's and unused;
        the network's own start is `TextToLoraConfig.start`). Saved in runs/<scale>/baselines/<setting>/text-to-lora/
        (checkpoints resume; a complete folder is only loaded)."""
        from lofa.baselines.text_to_lora import TextToLoraConfig

        return self._condition_mlp(setting, "text-to-lora", self.config(TextToLoraConfig), progress)

    def hyper_dreambooth(self, setting: str, progress: bool = True):
        """The HyperDreamBooth-style baseline's hypernetwork of a setting (`lofa.baselines.hyper_dreambooth`):
        Text-to-LoRA's network at `HyperDreamBoothConfig.rank` (start B = 0), trained like `text_to_lora` on the
        same zoo, batches and loop; saved in runs/<scale>/baselines/<setting>/hyper-dreambooth/."""
        from lofa.baselines.hyper_dreambooth import HyperDreamBoothConfig
        from lofa.baselines.text_to_lora import TextToLoraConfig

        cfg = dataclasses.replace(self.config(TextToLoraConfig), rank=self.config(HyperDreamBoothConfig).rank,
                                  start="zero")
        return self._condition_mlp(setting, "hyper-dreambooth", cfg, progress)

    def _condition_mlp(self, setting: str, folder: str, cfg, progress: bool):
        """Text-to-LoRA's network with `cfg` (a TextToLoraConfig) for a setting, in baselines/<setting>/<folder>/:
        loaded when complete, else trained with Stage II's loop and batches (checkpoints resume)."""
        from lofa.baselines.text_to_lora import CONFIG_FILE, TextToLora, train_text_to_lora
        from lofa.hypernet.train import Stage2TrainConfig

        parse_setting(setting)
        out = self.path("baselines", setting, folder)
        if (out / CONFIG_FILE).exists():
            return TextToLora.from_pretrained(out, device=self.device)
        train = self.config(Stage2TrainConfig)
        seed = seeds.stream(self.seed + train.seed, "hypernet.stage2")  # Stage II's batches: LoFA's, one by one
        model, _ = train_text_to_lora(self.triplets(setting), cfg, train, out, device=str(self.device), seed=seed,
                                      progress=progress)
        return model

    def diff_lora(self, setting: str, progress: bool = True):
        """The DiffLoRA-style baseline of a setting (`lofa.baselines.diff_lora`): the LoRA autoencoder and the
        latent diffusion model, fitted on the same zoo and training cases as LoFA; saved in
        runs/<scale>/baselines/<setting>/diff-lora/ (a complete folder is only loaded)."""
        from lofa.baselines.diff_lora import CONFIG_FILE, DiffLora, DiffLoraConfig, train_diff_lora

        parse_setting(setting)
        out = self.path("baselines", setting, "diff-lora")
        if (out / CONFIG_FILE).exists():
            return DiffLora.from_pretrained(out, device=self.device)
        model, _ = train_diff_lora(self.triplets(setting), self.config(DiffLoraConfig),
                                   seed=seeds.stream(seeds.stream(self.seed, "hypernet"), "diff_lora.train"),
                                   device=str(self.device), progress=progress)
        model.save_pretrained(out)
        return model

    def hypernet_history(self, setting: str, stage: int, variant: str = "lofa"):
        """Training history of one stage (pandas DataFrame, one row per step: loss, lr, grad_norm and the
        objective's metrics), as `hypernet` wrote it."""
        import pandas as pd

        from lofa.io import read_json

        folder = "lofa" if stage == 1 else variant  # one Stage I serves every variant
        history = read_json(self.path("hypernet", setting, folder, f"stage{stage}", "history.json"))
        if history is None:
            raise LofaError(f"no Stage {stage} history for {setting}/{variant}; run run.hypernet({setting!r}, {stage}) "
                            "first")
        return pd.DataFrame(history)


def launched():
    """accelerate's PartialState under a multi-process launch (`accelerate launch`, torchrun), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    # cpu=True where there is no GPU: without it accelerate sets up a single-process state under torchrun
    return PartialState(cpu=not torch.cuda.is_available())


# Run.build's steps: name -> the call that makes (or loads) the artifact of one key (a task, or for the
# hypernetwork stages a paper setting).
def _build_base(run: Run, key: str) -> None:
    run.base(key, progress=False)


def _build_evaluators(run: Run, key: str) -> None:
    run.evaluators(key)


def _build_condition_encoder(run: Run, key: str) -> None:
    run.condition_encoder(key, progress=False)


def _build_zoo(run: Run, key: str) -> None:
    run.zoo(key, progress=False)


def _build_zoo_shard(run: Run, key: str) -> None:
    task, shard = _zoo_shard(key)
    run.zoo(task, progress=False, shard=shard)


def _build_stage1(run: Run, key: str) -> None:
    run.hypernet(key, 1, progress=False)


def _build_stage2(run: Run, key: str) -> None:
    """key: a setting ("identities") or a setting and a variant ("identities/recon_l1")."""
    setting, _, variant = key.partition("/")
    run.hypernet(setting, 2, variant or "lofa", progress=False)


def _build_hyper_dreambooth(run: Run, key: str) -> None:
    run.hyper_dreambooth(key, progress=False)


def _build_diff_lora(run: Run, key: str) -> None:
    run.diff_lora(key, progress=False)


def _build_text_to_lora(run: Run, key: str) -> None:
    run.text_to_lora(key, progress=False)


_BUILD_STEPS = {"base": _build_base, "evaluators": _build_evaluators, "condition_encoder": _build_condition_encoder,
                "zoo": _build_zoo, "zoo_shard": _build_zoo_shard, "stage1": _build_stage1, "stage2": _build_stage2,
                "text_to_lora": _build_text_to_lora, "hyper_dreambooth": _build_hyper_dreambooth,
                "diff_lora": _build_diff_lora}


def _build_job(args: tuple, step: str, key: str) -> None:
    """One `Run.build` job in a worker process (module level, so that spawn can import it)."""
    torch.set_num_threads(1)
    _BUILD_STEPS[step](Run(*args), key)


def _map_job(args: tuple, fn, key: str, fn_args: tuple, fn_kwargs: dict):
    """One `Run.map` call in a worker process (module level, so that spawn can import it)."""
    torch.set_num_threads(1)
    return fn(Run(*args), key, *fn_args, **fn_kwargs)


# Hypernetwork variants run.hypernet trains, each Stage II from the one Stage I of its setting -> Stage2TrainConfig
# fields (and "lora_head", HyperConfig's): LoFA as configured, and ablations of its reconstruction term (the L1 on
# ΔW; the L1 on the factors A and B, the paper's wording), of its start (ΔW = 0, the paper's head, instead of the mean
# training LoRA) and of its LoRA head (the paper's shared head where the scale's preset has per-target layers).
# "ablation" names one of the paper's Table 4 (`lofa.hypernet.recipe.train_ablation`), trained without LoFA's Stage I
# by Stage II's loop: w/o response (a single stage from scratch), lightweight (Stage I trained only through Stage
# II's loss) and prompt input (a single stage reading the condition, never the base weights).
HYPERNET_VARIANTS = {"lofa": {}, "recon_l1": {"recon": "delta"}, "recon_factors": {"recon": "factors"},
                     "zero_start": {"start": "zero"}, "shared_head": {"lora_head": "shared"},
                     "no_response": {"ablation": "no_response"}, "lightweight": {"ablation": "lightweight"},
                     "prompt_input": {"ablation": "prompt_input"}}


def parse_setting(name: str) -> tuple[str, str, str]:
    """(setting, task, condition kind) of a paper setting name."""
    for setting in SETTINGS:
        if setting[0] == name:
            return setting
    raise LofaError(f"unknown setting {name!r}; choose one of {', '.join(s[0] for s in SETTINGS)}")


def _zoo_shard(key: str) -> tuple[str, tuple[int, int]]:
    """ "actions:0/2" -> ("actions", (0, 2))"""
    try:
        task, share = key.split(":")
        i, n = (int(x) for x in share.split("/"))
    except ValueError:
        raise LofaError(f"zoo_shard key {key!r}: write TASK:I/N, e.g. actions:0/2") from None
    return task, (i, n)


def select_tasks(tasks: str | Sequence[str] = "all") -> tuple[str, ...]:
    """The tasks named by `tasks`, in TASKS order: "all", a comma-separated string ("actions,styles") or a
    sequence of names; an unknown or empty selection is a LofaError."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return TASKS
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise LofaError(f"unknown task selection {tasks!r}; choose all or a comma-separated list of "
                        f"{', '.join(TASKS)}")
    return tuple(t for t in TASKS if t in names)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise LofaError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
