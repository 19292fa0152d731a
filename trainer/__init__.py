"""The trainer: RL and hint-guided distillation on LoRA adapters, published as numbered versions (docs/trainer.md)."""
