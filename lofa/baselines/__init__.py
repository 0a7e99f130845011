"""Reference predictors (mean LoRA, nearest LoRA, ridge LoRA, the oracles, mean train map), norm matching of a
predicted LoRA, and the paper's baselines and ablations (Text-to-LoRA)."""
from lofa.baselines.magnitude import NORM_MATCHED, delta_norm, match_norms, module_norms
from lofa.baselines.reference import (REFERENCES, RidgeLora, attribute_features, mean_lora, mean_train_map,
                                      nearest_cases, nearest_lora, oracle_case, oracle_lora, pool_condition,
                                      reference_loras)
from lofa.baselines.text_to_lora import (TextToLora, TextToLoraConfig, TextToLoraObjective, factor_units,
                                         train_text_to_lora)

__all__ = ["NORM_MATCHED", "delta_norm", "match_norms", "module_norms", "REFERENCES", "reference_loras", "RidgeLora",
           "attribute_features", "mean_lora", "mean_train_map", "nearest_cases", "nearest_lora", "oracle_case",
           "oracle_lora", "pool_condition", "TextToLora", "TextToLoraConfig", "TextToLoraObjective", "factor_units",
           "train_text_to_lora"]
