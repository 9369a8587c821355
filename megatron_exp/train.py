"""`python -m megatron_exp.train [group=option ...] [key=value ...]`: compose the config with Hydra, check it,
prepare the data once, then start tp x dp workers (or join the torchrun job that started this process).

Exit codes: see megatron_exp/entry.py (0 done, 1 a worker failed, 2 the configuration or data cannot run).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from megatron_exp import entry, launch, preflight
from megatron_exp.config import Config, ConfigError, RunSpec
from megatron_exp.data import token_store
from megatron_exp.training import checkpoint, trainer
from megatron_exp.training.metrics import wandb_settings

log = logging.getLogger("megatron_exp.train")


def _prepare_data(cfg: Config, run_dir: str) -> None:
    """Build (or find) the token cache, check the model's vocabulary holds the tokenizer's, and keep the
    tokenizer with the run (the evaluation tasks read text with it)."""
    path = token_store.prepare(cfg.data, by_sentence=cfg.model.arch == "bert")
    if cfg.resume:
        _check_same_tokenizer(cfg.resume, path / "tokenizer.json", Path(run_dir) / "tokenizer.json")
    shutil.copyfile(path / "tokenizer.json", Path(run_dir) / "tokenizer.json")
    tokenizer_vocab = token_store.read_meta(path)["vocab_size"]
    if tokenizer_vocab > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer_vocab} entries: "
            f"set model.vocab_size={tokenizer_vocab} (or leave it to follow data.tokenizer.vocab_size)"
        )
    trainer.load_samples(cfg)  # every split holds at least one sample (else one line here, not in every worker)


def _check_same_tokenizer(resume: str, ours: Path, the_runs: Path) -> None:
    """A resumed run reads its text with the run's vocabulary: the same token ids for the same strings (the
    model's vocab_size alone does not show a tokenizer trained on other text, or another kind)."""
    if not the_runs.is_file():
        return
    mine, theirs = (json.loads(path.read_text(encoding="utf-8"))["model"] for path in (ours, the_runs))
    if mine != theirs:
        words, kept = mine.get("vocab") or {}, theirs.get("vocab") or {}
        moved = sum(words.get(token) != index for token, index in kept.items()) + len(set(words) - set(kept))
        how = f"{moved} vocabulary entries differ or move" if moved else "the same vocabulary, other merges or rules"
        raise ConfigError(
            f"resume={resume}: the data's tokenizer is not the run's ({the_runs}: {how}): resume with the run's "
            "data.* and data.tokenizer.* overrides (see its config.yaml)"
        )


def _newest_matching_checkpoint(cfg: Config, outputs: Path) -> Path:
    """resume=true: the newest checkpoint under `outputs` whose model and layout are this config's."""
    pointers = sorted(outputs.glob("**/checkpoints/latest"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not pointers:
        raise ConfigError(f"resume=true but no run under {outputs.resolve()} has a checkpoint: give resume=<run dir>")
    nearest = None
    for pointer in pointers:
        directory = checkpoint.find_latest(pointer.parents[1])
        if directory is None:
            continue
        differ = _differences(cfg, checkpoint.read_meta(directory))
        if not differ:
            log.info("resume=true: continuing %s, the newest run with this model and layout", directory.parents[1])
            return directory
        nearest = nearest or (directory, differ)
    where = f"; the newest, {nearest[0].parents[1]}, has {', '.join(nearest[1])}" if nearest else ""
    raise ConfigError(
        f"resume=true but no run under {outputs.resolve()} has a checkpoint of this model and layout{where}: give "
        "resume=<run dir>, or the overrides of the run to continue"
    )


def _differences(cfg: Config, meta: dict, layout: bool = True) -> list[str]:
    """What differs between this config and a checkpoint's meta.json: the model (dropout aside), and the layout."""
    saved = {
        f"model.{k}": v for k, v in meta["model"].items() if k not in ("name", "hidden_dropout", "attention_dropout")
    }
    if layout:
        tp, pp, virtual = checkpoint.layout_of(meta)
        saved |= {"parallel.tp": tp, "parallel.pp": pp, "parallel.virtual_stages": virtual, "parallel.dp": meta["dp"]}
    par = cfg.parallel
    ours = {"parallel.tp": par.tp, "parallel.pp": par.pp, "parallel.virtual_stages": par.virtual_stages}
    ours["parallel.dp"] = par.dp
    ours |= {f"model.{k}": v for k, v in asdict(cfg.model).items()}
    return [f"{key}={ours.get(key)} (checkpoint: {value})" for key, value in saved.items() if ours.get(key) != value]


def _resolve_init_from(cfg: Config) -> str:
    """The checkpoint directory that checkpoint.init_from names, checked against this config's model."""
    directory = checkpoint.require(Path(cfg.checkpoint.init_from).expanduser(), "checkpoint.init_from")
    differ = _differences(cfg, checkpoint.read_meta(directory), layout=False)
    if differ:
        raise ConfigError(
            f"checkpoint.init_from={cfg.checkpoint.init_from}: the model differs: {', '.join(differ)}; set model.* "
            "to the checkpoint's (its meta.json lists them)"
        )
    return str(directory.resolve())


def _resolve_resume(cfg: Config, run_dir: str) -> tuple[str, str]:
    """(the checkpoint directory to load, its run directory), checked against this config."""
    if cfg.resume.lower() in ("true", "latest"):
        directory = _newest_matching_checkpoint(cfg, Path("outputs"))
    else:
        directory = checkpoint.require(Path(cfg.resume).expanduser(), "resume")
    meta = checkpoint.read_meta(directory)
    differ = _differences(cfg, meta, layout=False)
    if meta.get("global_batch", cfg.parallel.global_batch) != cfg.parallel.global_batch:
        differ.append(f"parallel.global_batch={cfg.parallel.global_batch} (checkpoint: {meta['global_batch']})")
    if differ:
        raise ConfigError(
            f"resume={cfg.resume}: {directory} was saved with another setup: {', '.join(differ)}; pass the run's "
            "original overrides (see its config.yaml): only the parallel layout may change on resume"
        )
    moved = _differences(cfg, meta)
    if moved:
        log.info(
            "resume=%s: continuing at another layout from global sample %s: %s",
            cfg.resume, meta.get("consumed_samples", meta["iteration"] * cfg.parallel.global_batch), ", ".join(moved),
        )  # fmt: skip
    if meta["iteration"] >= cfg.train.iterations:
        raise ConfigError(
            f"resume={cfg.resume}: {directory} is at iteration {meta['iteration']}, already train.iterations="
            f"{cfg.train.iterations}: nothing to train; to go on, raise train.iterations (e.g. "
            f"train.iterations={2 * meta['iteration']})"
        )
    launch.remove_if_only_hydra_files(Path(run_dir))  # this invocation's fresh directory is not needed
    return str(directory.resolve()), str(directory.parents[1].resolve())


def _sweep_logger(cfg: Config) -> None:
    """In a multirun, every job joins one W&B group named after the sweep, tagged with its overrides."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    sweep = Path(hydra_cfg.sweep.dir)
    cfg.logger.group = cfg.logger.group or f"sweep-{sweep.parent.name}-{sweep.name}"
    cfg.logger.tags = [*cfg.logger.tags, *hydra_cfg.overrides.task]


def prepare(composed: Config, run_dir: str, joined: bool) -> RunSpec[Config]:
    """Check the config, resolve resume/init paths, build the data cache: the job's spec, before any worker."""
    world_size = int(os.environ["WORLD_SIZE"]) if joined else None
    cfg = preflight.resolve(composed, world_size)
    _sweep_logger(cfg)
    preflight.validate(cfg, world_size)
    if cfg.resume:
        cfg.resume, run_dir = _resolve_resume(cfg, run_dir)
    elif cfg.checkpoint.init_from:
        cfg.checkpoint.init_from = _resolve_init_from(cfg)
    first_on_node = not joined or int(os.environ["LOCAL_RANK"]) == 0
    if first_on_node:  # each node's local rank 0 builds the data cache; the others then find it
        _prepare_data(cfg, run_dir)
    if joined:
        dist.barrier()
    if not first_on_node:
        _prepare_data(cfg, run_dir)
    rank0 = not joined or int(os.environ["RANK"]) == 0
    if rank0:
        name = "config.yaml" if not cfg.resume else f"config.resume-{Path(cfg.resume).name}.yaml"
        (Path(run_dir) / name).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    workers = cfg.parallel.tp * cfg.parallel.dp * cfg.parallel.pp
    wandb = wandb_settings(cfg.logger, run_dir, asdict(cfg), gpu=cfg.hardware.device == "cuda") if rank0 else None
    return RunSpec(cfg, run_dir, workers, joined, wandb)


@entry.hydra_app("config")
def main(raw: DictConfig) -> dict | None:
    return entry.run(raw, Config, prepare, trainer.train)


if __name__ == "__main__":
    main()
