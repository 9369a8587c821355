"""`python -m megatron_exp.convert`: reshard a checkpoint to another TP x PP (x DP) layout, or move GPT-2 weights
to and from the Hugging Face `transformers` layout. Every path goes through the serial (TP=1) state dict: merge
the shards, convert or re-split, save. The tokenizer travels (tokenizer.json beside the output, for the
evaluations; to=hf also writes what GPT2TokenizerFast loads). A training checkpoint keeps its whole training
state (training/reshard.py): Adam's moments, the loss scale, the iteration; the dropout streams of each layout the
checkpoint has been converted from are kept with it, so converting back restores them bit for bit. A layout it
has never been at gets what a resume there would get: the replicated streams where the stages are the same, the
rest re-derived when training resumes.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig
from tokenizers import Tokenizer

from megatron_exp import entry
from megatron_exp.config import ConfigError, ConvertConfig, ModelConfig, TokenizerConfig, check_ranges
from megatron_exp.data import tokenizer as tokenizers
from megatron_exp.models import build_model, hf_gpt2
from megatron_exp.parallel import state
from megatron_exp.parallel.pipeline import ModelPart, PipelineLayout
from megatron_exp.parallel.sharding import shard_specs, split_state_dict
from megatron_exp.training import checkpoint, reshard
from megatron_exp.training.distributed_optimizer import is_shard

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
    directory = _training_checkpoint(cfg.source)
    if directory is None:
        if cfg.dp > 1 or cfg.verify:
            raise ConfigError(f"dp= and verify= convert training checkpoints; {cfg.source} holds weights only")
        return _write_weights(cfg, serial, model_cfg, layout, tokenizer)
    written = _write_training_state(cfg, directory, serial, model_cfg, layout)
    if tokenizer is not None:
        tokenizer.save(str(output / "tokenizer.json"))  # where the evaluations look for it
    if cfg.verify:
        _verify(directory, written)
    return written


def _write_weights(cfg, serial, model_cfg, layout, tokenizer) -> Path:
    shards = []  # global rank order: stage-major, TP inside (one DP replica)
    for stage in range(cfg.pp):
        specs = shard_specs(_meta_model(model_cfg, layout.part(stage)))
        shards += split_state_dict({name: serial[name] for name in specs}, specs, cfg.tp)
    meta = {
        "tp": cfg.tp, "pp": cfg.pp, "virtual_stages": cfg.virtual_stages, "dp": 1, "model": asdict(model_cfg),
        "source": cfg.source, "weights_only": True,
    }  # fmt: skip
    output = Path(cfg.output)
    directory = checkpoint.save_all(output, 0, [{"iteration": 0, "model": shard} for shard in shards], meta)
    if tokenizer is not None:
        tokenizer.save(str(output / "tokenizer.json"))  # where the evaluations look for it
    log.info("saved %s as %d TP x %d pipeline shards to %s", cfg.source, cfg.tp, cfg.pp, directory)
    return directory


def _training_checkpoint(source: str) -> Path | None:
    """The checkpoint directory of `source` if it holds a training state (not converted weights only)."""
    if _hugging_face_name(source) is not None:
        return None
    directory = checkpoint.resolve(source)
    if checkpoint.read_meta(directory).get("weights_only"):
        return None
    return directory if "optimizer" in checkpoint.load_rank(directory, 0, mmap=True) else None  # keys, not tensors


def layout_key(tp: int, pp: int, virtual: int, dp: int) -> str:
    return f"tp{tp}_pp{pp}_v{virtual}_dp{dp}"


def _write_training_state(cfg: ConvertConfig, directory: Path, serial: dict, model_cfg, layout) -> Path:
    """Every rank's training state at the output layout, in global rank order (pp, dp, tp)."""
    saved = checkpoint.SavedShards(directory)
    meta, first = saved.meta, saved.rank_state(0)
    carried = dict(first.get("rng_by_layout") or {})
    carried[layout_key(*checkpoint.layout_of(meta), meta["dp"])] = [
        saved.rank_state(rank)["rng"] for rank in range(meta["world_size"])
    ]
    target = layout_key(cfg.tp, cfg.pp, cfg.virtual_stages, cfg.dp)
    moments = dict(reshard.SavedAdam(saved))  # each parameter merged once, cut for every output rank
    groups = first["optimizer"]["param_groups"]
    states = []
    for stage in range(cfg.pp):
        with state.use(state.virtual(cfg.tp, pp=cfg.pp, pp_rank=stage)):
            part = _meta_model(model_cfg, layout.part(stage))
        specs = shard_specs(part)
        replicated = reshard.replicated_stream(saved, cfg.pp, cfg.virtual_stages, stage)
        for _ in range(cfg.dp):
            for tp_rank in range(cfg.tp):
                tp = state.Group(size=cfg.tp, rank=tp_rank)
                model = {name: specs[name].shard(serial[name], cfg.tp, tp_rank, name).clone() for name in specs}
                rank = len(states)
                states.append({
                    "iteration": first["iteration"],
                    "model": model,
                    "optimizer": reshard.shard_optimizer_state(moments, part, tp, groups),
                    "loss_scaler": first["loss_scaler"],
                    "rng": carried[target][rank] if target in carried else replicated,
                })  # fmt: skip
    states[0]["rng_by_layout"] = {key: rngs for key, rngs in carried.items() if key != target}
    new_meta = {**meta, "tp": cfg.tp, "pp": cfg.pp, "virtual_stages": cfg.virtual_stages, "dp": cfg.dp,
                "world_size": len(states), "source": cfg.source}  # fmt: skip
    written = checkpoint.save_all(Path(cfg.output), first["iteration"], states, new_meta)
    log.info(
        "saved the training state of %s (iteration %d) at tp=%d pp=%d (virtual %d) dp=%d to %s%s",
        directory, first["iteration"], cfg.tp, cfg.pp, cfg.virtual_stages, cfg.dp, written,
        "" if target in carried else "; dropout streams not carried over are re-derived when training resumes",
    )  # fmt: skip
    return written


def state_differences(a, b, where: str) -> list[str]:
    """Where two saved states differ (tensors bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
        return [] if same and a.dtype == b.dtype and torch.equal(a, b) else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b), key=str)
        return [d for k in keys for d in state_differences(a.get(k), b.get(k), f"{where}.{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in state_differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


def _verify(source: Path, written: Path) -> None:
    """Convert `written` back to the layout of `source` and compare every rank's whole state with the source's.
    A distributed-optimizer source holds each DP rank's slice of a flat buffer, which conversion merges: its Adam
    state is compared as the whole model's moments, parameter by parameter, bit for bit."""
    meta = checkpoint.read_meta(source)
    sliced = is_shard(checkpoint.load_rank(source, 0)["optimizer"])
    tp, pp, virtual = checkpoint.layout_of(meta)
    with tempfile.TemporaryDirectory() as scratch:
        back_cfg = ConvertConfig(source=str(written), tp=tp, pp=pp, virtual_stages=virtual, dp=meta["dp"],
                                 output=scratch)  # fmt: skip
        back = _write_training_state(back_cfg, written, *_load_source(str(written))[:2],
                                     PipelineLayout(pp, virtual, meta["model"]["layers"]))  # fmt: skip
        differ = []
        for rank in range(meta["world_size"]):
            original, returned = checkpoint.load_rank(source, rank), checkpoint.load_rank(back, rank)
            for saved in (original, returned):
                saved.pop("rng_by_layout", None)
                if sliced:
                    saved.pop("optimizer")
            differ += state_differences(original, returned, f"rank {rank}")
        if sliced:
            merged = reshard.serial_optimizer_state(source), reshard.serial_optimizer_state(back)
            differ += state_differences(*merged, "Adam state")
    if differ:
        raise ConfigError(
            f"verify=true: converting {written} back to the source's layout differs from {source} in "
            f"{len(differ)} place(s), e.g. {', '.join(differ[:5])}"
        )
    log.info("verify=true: %s converted back equals %s in every tensor of every rank", written, source)


def _meta_model(cfg: ModelConfig, part: ModelPart) -> torch.nn.Module:
    with torch.device("meta"):
        return build_model(cfg, part=part)


@entry.hydra_app("convert")
def main(raw: DictConfig) -> None:
    entry.run_here(raw, ConvertConfig, convert)


if __name__ == "__main__":
    main()
