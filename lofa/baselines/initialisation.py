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
