"""Downstream tasks, each its own entry point: zero-shot WikiText-103 and LAMBADA (GPT)."""
