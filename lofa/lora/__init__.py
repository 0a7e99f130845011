"""LoRA zoo: per-case LoRA training, batched multi-LoRA training, the zoo index, and LoRA file formats."""
