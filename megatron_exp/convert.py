"""`python -m megatron_exp.convert`: reshard a checkpoint to another TP degree, or move GPT-2 weights to and
from the Hugging Face `transformers` layout. Every path goes through the serial (TP=1) state dict: merge the
shards, convert or re-split, save. Weights only: the optimizer state does not travel.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig

from megatron_exp import entry
from megatron_exp.config import ConfigError, ConvertConfig, ModelConfig, check_ranges
from megatron_exp.models import build_model, hf_gpt2
from megatron_exp.parallel.pipeline import ModelPart, PipelineLayout
from megatron_exp.parallel.sharding import shard_specs, split_state_dict
from megatron_exp.training import checkpoint

log = logging.getLogger("megatron_exp.convert")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError('Hugging Face conversion needs transformers: pip install -e ".[hf]"') from None
    return transformers


def _load_source(source: str) -> tuple[dict, ModelConfig]:
    """The serial state dict and model config of a checkpoint, or of a Hugging Face GPT-2."""
    if source.startswith("hf:"):
        name = source.removeprefix("hf:")
        try:
            model = _transformers().GPT2LMHeadModel.from_pretrained(name)
        except OSError as error:
            raise ConfigError(f"source={source} could not be loaded by transformers: {error}") from error
        cfg = hf_gpt2.model_config(model.config, name=Path(name).name)
        return hf_gpt2.from_hf(model.state_dict(), cfg), cfg
    directory = checkpoint.require(source, "source")
    return checkpoint.load_serial_model_state(directory), checkpoint.model_config_of(directory)


def convert(cfg: ConvertConfig) -> Path:
    check_ranges(cfg)
    serial, model_cfg = _load_source(cfg.source)
    output = Path(cfg.output)
    if cfg.to == "hf":
        if model_cfg.arch != "gpt":
            raise ConfigError(f"to=hf converts GPT-2 models; {cfg.source} holds a {model_cfg.arch} model")
        transformers = _transformers()
        model = transformers.GPT2LMHeadModel(hf_gpt2.hf_config(model_cfg))
        model.load_state_dict(hf_gpt2.to_hf(serial, model_cfg))
        model.save_pretrained(output)
        log.info("saved a transformers GPT2LMHeadModel to %s", output)
        return output
    model_cfg.validate(cfg.tp)
    layout = PipelineLayout(cfg.pp, cfg.virtual_stages, model_cfg.layers)
    if model_cfg.layers % layout.chunks:
        raise ConfigError(
            f"pp x virtual_stages = {cfg.pp} x {cfg.virtual_stages} does not divide the model's {model_cfg.layers} "
            "layers: every chunk needs the same number of layers"
        )
    shards = []  # global rank order: stage-major, TP inside (one DP replica)
    for stage in range(cfg.pp):
        specs = shard_specs(_meta_model(model_cfg, layout.part(stage)))
        shards += split_state_dict({name: serial[name] for name in specs}, specs, cfg.tp)
    meta = {
        "tp": cfg.tp, "pp": cfg.pp, "virtual_stages": cfg.virtual_stages, "dp": 1, "model": asdict(model_cfg),
        "source": cfg.source, "weights_only": True,
    }  # fmt: skip
    directory = checkpoint.save_all(output, 0, [{"iteration": 0, "model": shard} for shard in shards], meta)
    log.info("saved %s as %d TP x %d pipeline shards to %s", cfg.source, cfg.tp, cfg.pp, directory)
    return directory


def _meta_model(cfg: ModelConfig, part: ModelPart) -> torch.nn.Module:
    with torch.device("meta"):
        return build_model(cfg, part=part)


@entry.hydra_app("convert")
def main(raw: DictConfig) -> None:
    entry.run_here(raw, ConvertConfig, convert)


if __name__ == "__main__":
    main()
