"""LoFA as an initialisation: per-case LoRA fine-tuning started from a predicted LoRA instead of the recipe's start.

The paper (and Prompt2Effect before it) reports that a predicted LoRA is also a good starting point: fine-tuning
from it reaches the per-case LoRA's quality in far fewer steps than training from B = 0. `finetune_from` trains
each case's LoRA from each start with the zoo's recipe and returns it after chosen numbers of steps, ready for
`lofa.evaluate.compare`:

    starts = {"recipe start": None, "LoFA": predict_cases(model, bank, cases), "mean LoRA": {c: mean for c in cases}}
    methods = finetune_from(gen, world, cases, starts, recipe, steps=(0, 25, 50, 100), seed=seeds.sample)
    table = compare(gen, world, evaluators, methods, cases, per_case=2, seeds=seeds)   # methods "LoFA @ 25", ...

Every start of one case sees the same renders, batches, t and noise (one seed per case), so the starts differ only
in where they begin.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from tqdm.auto import tqdm

from lofa.errors import LofaError
from lofa.lora.formats import LoraWeights
from lofa.lora.train import LoraTrainConfig, train_lora


def method_name(start: str, step: int) -> str:
    """The `compare` method name of start `start` after `step` fine-tuning steps, e.g. "LoFA @ 25"."""
    return f"{start} @ {step}"


def finetune_from(gen, world, case_ids: Sequence[int], starts: dict[str, dict[int, LoraWeights] | None],
                  recipe: LoraTrainConfig, steps: Sequence[int], seed: int, *, text=None, device="cpu",
                  progress: bool = True) -> dict[str, dict[int, LoraWeights]]:
    """Fine-tune every case's LoRA from every start with `recipe` for max(steps) steps.

    starts: {name: {case_id: LoraWeights} or None (the recipe's own start, B = 0)}; steps: the step counts to keep
    (0 is the start itself). The recipe is resolved for the world's task first (`LoraTrainConfig.for_task`).
    Returns {method_name(start, k): {case_id: LoraWeights after k steps}} for every start and k.
    """
    steps = sorted({int(k) for k in steps})
    if not steps or steps[0] < 0 or steps[-1] < 1:
        raise LofaError(f"steps must be step counts >= 0 with at least one >= 1, not {steps}")
    missing = [(name, c) for name, loras in starts.items() if loras is not None for c in case_ids if c not in loras]
    if missing:
        raise LofaError(f"start {missing[0][0]!r} has no LoRA for case {missing[0][1]}; give every start a LoRA per case")
    cfg = replace(recipe.for_task(world.task), steps=steps[-1])
    out: dict[str, dict[int, LoraWeights]] = {method_name(name, k): {} for name in starts for k in steps}
    jobs = [(name, case) for case in case_ids for name in starts]
    for name, case in tqdm(jobs, desc=f"fine-tune {world.task}", disable=not progress):
        init = None if starts[name] is None else starts[name][case]
        _, info = train_lora(gen, world, case, cfg, seed, device, text=text, init=init, snapshots=steps)
        for k in steps:
            out[method_name(name, k)][case] = info["snapshots"][k]
    return out


def initialisation_comparison(run, task: str, cases: int, per_case: int, fractions: Sequence[float], seeds, *,
                              seed: int = 0, text=None):
    """Notebook 08's study of one task: up to `cases` held-out cases (drawn with [seed, the task's index, 8]),
    each fine-tuned with the zoo's recipe (`run`'s LoraTrainConfig) from the recipe's start, the mean LoRA and
    LoFA's prediction of every setting of the task, kept after round(f · recipe steps) steps for f in `fractions`,
    and scored with the zoo's per-case LoRA by `lofa.evaluate.compare` (seeds: an EvalSeeds).

    Returns the `compare` table with start (the start's name; the method for per-case LoRA and ground truth),
    steps (fine-tuning steps; the recipe's for the per-case LoRA, NaN for ground truth), task and recipe_steps.
    """
    import numpy as np

    from lofa.baselines import mean_lora
    from lofa.evaluate import GenerateConfig, compare
    from lofa.hypernet.predictor import predict_cases
    from lofa.run import SETTINGS, TASKS

    world, zoo, gen = run.world(task), run.zoo(task), run.base(task)
    rng = np.random.default_rng([seed, TASKS.index(task), 8])
    heldout = zoo.case_ids("heldout")
    cases = sorted(int(c) for c in rng.choice(heldout, min(cases, len(heldout)), replace=False))
    mean, _ = mean_lora(zoo, device=str(run.device))
    starts = {"recipe start": None, "mean LoRA": {c: mean for c in cases}}
    for setting, setting_task, _ in SETTINGS:
        if setting_task == task:
            starts[f"LoFA ({setting})"] = predict_cases(run.hypernet(setting), run.triplets(setting).conditions("eval"),
                                                        cases)
    recipe = run.config(LoraTrainConfig)
    full_steps = recipe.for_task(task).steps
    steps = sorted({round(f * full_steps) for f in fractions})
    # the cases fine-tuned side by side on a CPU (`Run.map`), two cases to a job: each case's LoRAs depend only on it
    chunks = [tuple(cases[i:i + 2]) for i in range(0, len(cases), 2)]
    methods: dict[str, dict[int, LoraWeights]] = {}
    for part in run.map(_finetune_chunk, chunks, task, starts, recipe, steps, seeds.sample, text=text):
        for name, loras in part.items():
            methods.setdefault(name, {}).update(loras)
    methods["per-case LoRA"] = {c: zoo.load(c)[0] for c in cases}
    table = compare(gen, world, run.evaluators(task), methods, cases, per_case=per_case, seeds=seeds,
                    cfg=run.config(GenerateConfig), text=text)
    start_of = {method_name(s, k): (s, k) for s in starts for k in steps}
    table["start"] = [start_of.get(m, (m, np.nan))[0] for m in table.method]
    table["steps"] = [start_of.get(m, (m, full_steps))[1] for m in table.method]
    return table.assign(task=task, recipe_steps=full_steps)


def _finetune_chunk(run, cases: tuple[int, ...], task: str, starts: dict, recipe: LoraTrainConfig,
                    steps: Sequence[int], seed: int, *, text=None) -> dict[str, dict[int, LoraWeights]]:
    """`finetune_from` for some of the cases (a `Run.map` job), on the run's base and world of `task`."""
    chunk_starts = {name: None if loras is None else {c: loras[c] for c in cases} for name, loras in starts.items()}
    return finetune_from(run.base(task), run.world(task), list(cases), chunk_starts, recipe, steps, seed=seed,
                         text=text, device=str(run.device), progress=False)


def steps_to_reach(quality, metric: str = "acc"):
    """Per task and fine-tuning start of `quality` (`lofa.evaluate.summarize` by task, start, steps), the fewest
    steps whose mean `metric` reaches the per-case LoRA's -> columns task, start, per_case_lora_acc, acc_at_0,
    steps_to_reach (NaN: not within the recipe's steps), recipe_steps."""
    import numpy as np
    import pandas as pd

    rows = []
    for task, block in quality[quality.metric == metric].groupby("task", sort=False):
        by_start = block.set_index(["start", "steps"])["mean"]
        target = by_start.loc["per-case LoRA"].iloc[0]
        for start in block[~block.start.isin(["per-case LoRA", "ground truth"])].start.unique():
            series = by_start.loc[start].sort_index()
            hit = series[series >= target]
            rows.append({"task": task, "start": start, "per_case_lora_acc": target, "acc_at_0": series.iloc[0],
                         "steps_to_reach": hit.index[0] if len(hit) else np.nan, "recipe_steps": series.index.max()})
    return pd.DataFrame(rows)
