"""Reference predictors (mean LoRA, nearest LoRA, oracle, mean train map) and the paper's baselines and ablations."""
from lofa.baselines.reference import (mean_lora, mean_train_map, nearest_cases, nearest_lora, oracle_case,
                                      oracle_lora, pool_condition)

__all__ = ["mean_lora", "mean_train_map", "nearest_cases", "nearest_lora", "oracle_case", "oracle_lora",
           "pool_condition"]
