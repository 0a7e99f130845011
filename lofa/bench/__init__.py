"""Benchmarks and experiments, one module per `lofa bench` command; their argument parsers are in `lofa.cli`, and no
library module imports them.

    latency          `lofa bench latency`     Stage I + Stage II + merge time of a prediction at a preset's shapes
    wan_training     `lofa bench train`       Stage I and Stage II training steps against a random-weight Wan2.1 DiT
    wan_activation   `lofa bench activate`    encoded condition -> LoRA active in a live Wan transformer
    lora_throughput  `lofa bench throughput`  LoRAs per hour, batched multi-LoRA vs one-at-a-time peft training
    lora_sweep       `lofa bench sweep`       exact-case recognition of LoRA samples for several LoRA recipes
    lora_replicates  `lofa bench replicates`  ΔW agreement of two LoRAs of one case vs LoRAs of different cases

`python -m lofa.bench.MODULE ARGS` runs the same command.
"""
