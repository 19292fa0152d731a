"""The trainer: RL and hint-guided distillation on LoRA adapters (built in the Trainer issue)."""
