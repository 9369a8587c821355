"""`python -m megatron_exp.convert`: reshard a checkpoint to another TP degree, or move GPT-2 weights to and
from the Hugging Face `transformers` layout. Every path goes through the serial (TP=1) state dict: merge the
shards, convert or re-split, save. Weights and the tokenizer travel (tokenizer.json beside the output, for the
evaluations; to=hf also writes what GPT2TokenizerFast loads); the optimizer state does not.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig
from tokenizers import Tokenizer

from megatron_exp import entry
from megatron_exp.config import ConfigError, ConvertConfig, ModelConfig, TokenizerConfig, check_ranges
from megatron_exp.data import tokenizer as tokenizers
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


# A directory is a Hugging Face model when it holds config.json and one of these (what save_pretrained writes).
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _hugging_face_name(source: str) -> str | None:
    """What transformers should load for `source`: hf:<name or directory>, or a Hugging Face model directory."""
    if source.startswith("hf:"):
        return source.removeprefix("hf:")
    path = Path(source).expanduser()
    if (path / "config.json").is_file() and any((path / name).is_file() for name in HF_WEIGHTS):
        return str(path)
    return None


def _hf_tokenizer(transformers, name: str, model_cfg: ModelConfig) -> Tokenizer | None:
    """The tokenizer saved with a Hugging Face model (transformers reads an absent one as an empty one, or fails),
    else GPT-2's for GPT-2's vocabulary, else None."""
    try:
        fast = transformers.GPT2TokenizerFast.from_pretrained(name)
    except OSError:
        fast = None
    if fast is not None and fast.backend_tokenizer.get_vocab_size(with_added_tokens=False) > 0:
        return fast.backend_tokenizer
    if model_cfg.vocab_size == tokenizers.GPT2_VOCAB:
        return tokenizers.gpt2(TokenizerConfig(kind="gpt2", vocab_size=tokenizers.GPT2_VOCAB))
    return None


def _load_source(source: str) -> tuple[dict, ModelConfig, Tokenizer | None]:
    """The serial state dict, model config and tokenizer (None when there is none) of a checkpoint of this project
    or of a Hugging Face GPT-2."""
    name = _hugging_face_name(source)
    if name is not None:
        transformers = _transformers()
        try:
            model = transformers.GPT2LMHeadModel.from_pretrained(name)
        except OSError as error:
            raise ConfigError(f"source={source} could not be loaded by transformers: {error}") from error
        cfg = hf_gpt2.model_config(model.config, name=Path(name).name)
        return hf_gpt2.from_hf(model.state_dict(), cfg), cfg, _hf_tokenizer(transformers, name, cfg)
    try:
        directory = checkpoint.resolve(source)
    except checkpoint.CheckpointError as error:
        raise ConfigError(f"source={source}: {error}") from error
    if directory is None:
        raise ConfigError(
            f"source={source} holds no complete checkpoint (<run dir>/checkpoints/iter_*) and is not a Hugging Face "
            "model directory (config.json and weights): give one of those, or source=hf:<hub name> for a hub model"
        )
    cfg = checkpoint.model_config_of(directory)
    run_dir = directory.parents[1]
    return checkpoint.load_serial_model_state(directory), cfg, tokenizers.kept_with(run_dir, cfg.vocab_size)


def convert(cfg: ConvertConfig) -> Path:
    """Convert, and write the source's tokenizer beside the weights, so that the output evaluates as it is."""
    check_ranges(cfg)
    serial, model_cfg, tokenizer = _load_source(cfg.source)
    output = Path(cfg.output)
    if tokenizer is None:
        log.warning("%s has no tokenizer to copy: evaluating the output needs tokenizer=<tokenizer.json>", cfg.source)
    if cfg.to == "hf":
        if model_cfg.arch != "gpt":
            raise ConfigError(f"to=hf converts GPT-2 models; {cfg.source} holds a {model_cfg.arch} model")
        transformers = _transformers()
        model = transformers.GPT2LMHeadModel(hf_gpt2.hf_config(model_cfg))
        model.load_state_dict(hf_gpt2.to_hf(serial, model_cfg))
        model.save_pretrained(output)
        if tokenizer is not None:  # tokenizer.json and tokenizer_config.json, as GPT2TokenizerFast loads them
            fast = transformers.GPT2TokenizerFast(tokenizer_object=tokenizer, model_max_length=model_cfg.seq_len)
            fast.save_pretrained(output)
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
    if tokenizer is not None:
        tokenizer.save(str(output / "tokenizer.json"))  # where the evaluations look for it
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
