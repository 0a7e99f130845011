"""lofa — reproduction package for LoFA (CVPR 2026): predicting personalized LoRA priors with a two-stage
transformer hypernetwork. See README.md for the pipeline; the library is what the notebooks call.

The entry points a researcher needs, importable from `lofa` itself:

    LoFA              trained predictor: LoFA.from_pretrained(DIR) -> encode_condition(prompt= | image= | pose=)
                      -> (tokens [1, K, Dc], mask [1, K]) -> predict(tokens, mask) -> LoraWeights
    load_lora         LoRA file (diffusers/peft, Wan/DiffSynth or kohya naming) -> (LoraWeights, metadata dict)
    save_lora         LoraWeights -> a LoRA file diffusers loads (`transformer.` / `unet.` keys by model family)
    LoraFactor        one module of LoraWeights: A [r, in], B [out, r], alpha; delta_w = (alpha / r) B A [out, in]
    response_map      (ΔW [out, in], W [out, in], tau=0.02) -> bool [out, in], |ΔW| / (|W| + 1e-8) > tau
    lora_response     ({name: W}, LoraWeights, tau) -> {name: ModuleResponse} over a whole LoRA
    Run               the pipeline's artifacts at a scale: run.world / base / zoo / hypernet(setting) ...
    make_world        a procedural world of a paper task ("actions", "styles", "identities")
    LofaError         the one exception for bad input (its message is one line saying what to do)

They are imported on first use (PEP 562), so `import lofa` does not import torch or diffusers.
"""

import importlib

__version__ = "0.1.0"

# name -> module that defines it. Strings, not import statements: importing the package stays instant, and the
# notebooks' cache keys (lofa.reproduce follows import statements) do not grow by every module listed here.
_EXPORTS = {
    "LoFA": "lofa.hypernet.predictor",
    "load_lora": "lofa.lora.formats",
    "save_lora": "lofa.lora.formats",
    "LoraFactor": "lofa.lora.formats",
    "response_map": "lofa.analysis",
    "lora_response": "lofa.analysis",
    "Run": "lofa.run",
    "make_world": "lofa.worlds",
    "LofaError": "lofa.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lofa' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # the next access is a plain attribute lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
