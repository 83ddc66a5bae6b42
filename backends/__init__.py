"""Translation layer: plan -> Megatron-core groups and TP layers; plan -> DeepSpeed config and engine."""
