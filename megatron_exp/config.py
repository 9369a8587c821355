"""Typed configuration schema and the checks that run before any worker starts.

Hydra's YAML presets in conf/ are merged onto these dataclasses, so an unknown key or a wrongly typed value is
an error at composition time. `ConfigError` messages are one line that names the key and a fix.
"""

from __future__ import annotations

from dataclasses import dataclass


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and how to fix it."""


@dataclass
class ModelConfig:
    """A GPT-2-style decoder (pre-LN, learned positions, tied embeddings, 4h GELU MLP)."""

    arch: str = "gpt"
    hidden: int = 64
    heads: int = 4
    layers: int = 2
    vocab_size: int = 50257  # real entries; padded to a multiple of 128 x TP inside the model
    seq_len: int = 128  # number of learned positions = longest sequence
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_std: float = 0.02  # output projections use init_std / sqrt(2 * layers)
    layernorm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def ffn_hidden(self) -> int:
        return 4 * self.hidden

    def validate(self, tp: int = 1) -> None:
        positive = {"model.hidden": self.hidden, "model.heads": self.heads, "model.layers": self.layers}
        positive |= {"model.vocab_size": self.vocab_size, "model.seq_len": self.seq_len}
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key}={value} must be positive")
        if self.hidden % self.heads:
            raise ConfigError(
                f"model.hidden={self.hidden} is not divisible by model.heads={self.heads}: "
                f"choose heads dividing the hidden size (e.g. {_divisors_near(self.hidden, self.heads)})"
            )
        if self.heads % tp:
            raise ConfigError(
                f"model.heads={self.heads} is not divisible by parallel.tp={tp}: "
                f"use a TP degree that divides the head count ({', '.join(map(str, _divisors(self.heads)))})"
            )
        for key in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be in [0, 1)")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _divisors_near(n: int, target: int) -> str:
    return ", ".join(str(d) for d in sorted(_divisors(n), key=lambda d: abs(d - target))[:3])
