"""The LoFA hypernetwork: weight tokenizer, Stage I (response maps), Stage II (LoRA), training and prediction.

    spec = TargetSpec.from_module(generator.net)              # which matrices, any base model
    base = BaseWeights(spec, {n: generator.net.get_submodule(n).weight for n in spec.names})
    stage1 = Stage1(preset(HyperConfig, "mini"), spec)        # trained with train.fit(stage1, Stage1Objective(...))
    stage2 = Stage2.from_stage1(stage1)                       # trained with train.fit(stage2, Stage2Objective(...))
    save_pretrained(dir, stage2, stage1, condition_encoder={"kind": "text"}, base=path)
    lora = LoFA.from_pretrained(dir).predict(tokens, mask)    # {module name: LoraFactor}
"""
from lofa.hypernet.config import HyperConfig
from lofa.hypernet.model import Stage1, Stage1Output, Stage2, Stage2Output
from lofa.hypernet.predictor import LoFA, merge_lora_, save_pretrained
from lofa.hypernet.tokenizer import BaseWeights, TargetSpec, WeightTokenizer

__all__ = ["HyperConfig", "Stage1", "Stage1Output", "Stage2", "Stage2Output", "LoFA", "merge_lora_",
           "save_pretrained", "BaseWeights", "TargetSpec", "WeightTokenizer"]
