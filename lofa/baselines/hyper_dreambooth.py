"""HyperDreamBooth-style baseline (Ruiz et al., CVPR 2024): a compressed LoRA predicted from the reference image,
then a short rank-relaxed fine-tune.

HyperDreamBooth's hypernetwork reads a face image and predicts a low-rank "lightweight DreamBooth" LoRA (rank 1);
"rank-relaxed fast fine-tuning" then trains the prediction for a few dozen steps at a higher rank. Here the
hypernetwork is Text-to-LoRA's MLP (`lofa.baselines.text_to_lora`: it reads only the encoded condition, never the
base weights) predicting rank `HyperDreamBoothConfig.rank` factors, trained by reconstruction on the same zoo and
batches as LoFA; `relax_rank` pads the prediction to the zoo recipe's rank without changing its ΔW (the new
directions start as a recipe LoRA does: peft's initial A, B = 0), and `lofa.baselines.initialisation.finetune_from`
fine-tunes it for `finetune_steps` steps of the zoo's recipe on the case's renders.

    model = run.hyper_dreambooth("identities")                    # trained once, cached in the run folder
    compressed = predict_cases(model, bank, cases)                # {case_id: rank-1 LoraWeights}
    relaxed = {c: relax_rank(compressed[c], recipe, seed) for c in cases}
    tuned = finetune_from(gen, world, cases, {"HDB": relaxed}, recipe, [cfg.finetune_steps], seed=...)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lofa.errors import LofaError
from lofa.lora.formats import LoraFactor, LoraWeights
from lofa.lora.train import LoraTrainConfig, init_factors, shared_init_seed

METHOD = "HyperDreamBooth-style"
FINETUNED = f"{METHOD} + fine-tune"


@dataclass
class HyperDreamBoothConfig:
    """The compressed prediction and the fine-tune of the HyperDreamBooth-style baseline."""

    rank: int = field(default=1, metadata={
        "help": "Rank of the predicted (compressed) LoRA; HyperDreamBooth predicts rank 1."})
    finetune_steps: int = field(default=40, metadata={
        "help": "Steps of the rank-relaxed fine-tune with the zoo's recipe (HyperDreamBooth: 40)."})

    PRESETS = {"smoke": {"finetune_steps": 4}, "mini": {}, "full": {}, "wan": {}, "paper": {}}

    def __post_init__(self):
        if self.rank < 1 or self.finetune_steps < 1:
            raise LofaError(f"HyperDreamBoothConfig: rank {self.rank} and finetune_steps {self.finetune_steps} must "
                            "be positive")


@torch.no_grad()
def relax_rank(lora: LoraWeights, recipe: LoraTrainConfig, seed: int,
               start: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> LoraWeights:
    """`lora` (rank k) as a LoRA of the recipe's rank r >= k and alpha with the same ΔW: A's first k rows are the
    prediction's and its other rows peft's initial A (drawn from `shared_init_seed(seed)`, the zoo's init stream),
    B's first k columns the prediction's rescaled to the new alpha / r and its other columns zero. start: that
    initial (A, B) per module when already drawn (`relax_start`), to relax many predictions."""
    if start is None:
        start = relax_start(lora, recipe, seed)
    relaxed = {}
    for name, factor in lora.items():
        k = factor.rank
        if k > recipe.rank:
            raise LofaError(f"{name}: a rank-{k} prediction cannot be relaxed to the recipe's lower rank {recipe.rank}")
        a0, _ = start[name]
        A = torch.cat([factor.A.float().cpu(), a0[k:].float()])
        B = torch.zeros(factor.B.shape[0], recipe.rank)
        B[:, :k] = factor.B.float().cpu() * (factor.scale / (recipe.alpha / recipe.rank))
        relaxed[name] = LoraFactor(A, B, recipe.alpha)
    return relaxed


def relax_start(lora: LoraWeights, recipe: LoraTrainConfig, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """peft's initial (A [r, in], B [out, r]) of the recipe's rank for `lora`'s modules, drawn from
    `shared_init_seed(seed)`: where `relax_rank`'s new directions start."""
    g = torch.Generator().manual_seed(shared_init_seed(seed))
    return init_factors({name: factor.shape for name, factor in lora.items()}, recipe.rank, g)


# The settings the paper compares HyperDreamBooth on (Table 3, identity images).
PAPER_SETTINGS = ("identities",)


def hyper_dreambooth_loras(run, setting: str, case_ids, seed: int) -> tuple[dict, float]:
    """The baseline's LoRAs for `case_ids` (eval conditions, view 0) -> ({METHOD: {case: compressed LoRA},
    FINETUNED: {case: LoRA after the rank-relaxed fine-tune}}, the median seconds of one case's fine-tune). `seed`
    seeds the fine-tunes' renders, batches, t and noise (`finetune_from`)."""
    import time

    import numpy as np

    from lofa.baselines.initialisation import finetune_from, method_name
    from lofa.hypernet.predictor import predict_cases
    from lofa.run import parse_setting

    _, task, _ = parse_setting(setting)
    model, bank = run.hyper_dreambooth(setting), run.triplets(setting).conditions("eval")
    recipe, cfg = run.config(LoraTrainConfig).for_task(task), run.config(HyperDreamBoothConfig)
    compressed = predict_cases(model, bank, list(case_ids))
    tuned, seconds = {}, []
    start_factors = relax_start(compressed[case_ids[0]], recipe, seed) if len(case_ids) else {}
    for case in case_ids:
        start = time.perf_counter()
        relaxed = {case: relax_rank(compressed[case], recipe, seed, start_factors)}
        out = finetune_from(run.base(task), run.world(task), [case], {METHOD: relaxed}, recipe,
                            [cfg.finetune_steps], seed=seed, device=str(run.device), progress=False)
        tuned[case] = out[method_name(METHOD, cfg.finetune_steps)][case]
        seconds.append(time.perf_counter() - start)
    return {METHOD: compressed, FINETUNED: tuned}, float(np.median(seconds))
