"""Model architectures, selected by model.arch."""

from __future__ import annotations

from megatron_exp.config import ModelConfig
from megatron_exp.models.bert import BERTModel
from megatron_exp.models.gpt import GPTModel
from megatron_exp.parallel.state import Group

ARCHITECTURES = {"gpt": GPTModel, "bert": BERTModel}


def build_model(cfg: ModelConfig, tp: Group | None = None, **options) -> GPTModel | BERTModel:
    """The model that `cfg.arch` names, on `tp` (default: the current grid's TP group)."""
    return ARCHITECTURES[cfg.arch](cfg, tp, **options)
