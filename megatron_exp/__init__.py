"""megatron-exp: Megatron-style model-parallel training experiments in plain PyTorch."""
