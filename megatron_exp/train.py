"""`python -m megatron_exp.train [group=option ...] [key=value ...]`: compose the config with Hydra, check it,
prepare the data once, then start tp x dp workers (or join the torchrun job that started this process).

Exit codes: 0 done; 2 the configuration or data cannot run (one line says which key and how to fix it);
1 a worker failed (its rank and error are printed; every rank's log is in the run directory).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import hydra
import torch.distributed as dist
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from megatron_exp import launch, preflight
from megatron_exp.config import Config, ConfigError
from megatron_exp.data import token_store
from megatron_exp.training import checkpoint, trainer

log = logging.getLogger("megatron_exp.train")

ConfigStore.instance().store(name="schema", node=Config)


def _prepare_data(cfg: Config) -> None:
    """Build (or find) the token cache, check the model's vocabulary holds the tokenizer's, and keep the
    tokenizer with the run (the evaluation tasks read text with it)."""
    path = token_store.prepare(cfg.data, by_sentence=cfg.model.arch == "bert")
    shutil.copyfile(path / "tokenizer.json", Path(cfg.run_dir) / "tokenizer.json")
    tokenizer_vocab = token_store.read_meta(path)["vocab_size"]
    if tokenizer_vocab > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer_vocab} entries: "
            f"set model.vocab_size={tokenizer_vocab} (or leave it to follow data.tokenizer.vocab_size)"
        )


def _newest_run_with_checkpoint(outputs: Path) -> Path:
    pointers = sorted(outputs.glob("**/checkpoints/latest"), key=lambda p: p.stat().st_mtime)
    if not pointers:
        raise ConfigError(f"resume=true but no run under {outputs.resolve()} has a checkpoint: give resume=<run dir>")
    return pointers[-1].parents[1]


def _differences(cfg: Config, meta: dict, keys: dict[str, object]) -> list[str]:
    saved = {
        f"model.{k}": v for k, v in meta["model"].items() if k not in ("name", "hidden_dropout", "attention_dropout")
    }
    saved |= keys
    ours = {"parallel.tp": cfg.parallel.tp, "parallel.dp": cfg.parallel.dp}
    ours |= {f"model.{k}": v for k, v in asdict(cfg.model).items()}
    return [f"{key}={ours.get(key)} (checkpoint: {value})" for key, value in saved.items() if ours.get(key) != value]


def _resolve_init_from(cfg: Config) -> None:
    directory = checkpoint.require(Path(cfg.checkpoint.init_from).expanduser(), "checkpoint.init_from")
    differ = _differences(cfg, checkpoint.read_meta(directory), {})
    if differ:
        raise ConfigError(
            f"checkpoint.init_from={cfg.checkpoint.init_from}: the model differs: {', '.join(differ)}; set model.* "
            "to the checkpoint's (its meta.json lists them)"
        )
    cfg.checkpoint.init_from = str(directory.resolve())


def _resolve_resume(cfg: Config) -> None:
    """Point cfg.resume at the checkpoint to load and cfg.run_dir at its run; check that it fits this config."""
    target = Path(cfg.resume).expanduser()
    if cfg.resume.lower() in ("true", "latest"):
        target = _newest_run_with_checkpoint(Path("outputs"))
    directory = checkpoint.require(target, "resume")
    run_dir = directory.parents[1]
    meta = checkpoint.read_meta(directory)
    differ = _differences(cfg, meta, {"parallel.tp": meta["tp"], "parallel.dp": meta["dp"]})
    if differ:
        raise ConfigError(
            f"resume={cfg.resume}: {directory} was saved with another setup: {', '.join(differ)}; pass the run's "
            "original overrides (see its config.yaml), or convert the checkpoint with python -m megatron_exp.convert"
        )
    launch.remove_if_only_hydra_files(Path(cfg.run_dir))  # this invocation's fresh directory is not needed
    cfg.resume, cfg.run_dir = str(directory.resolve()), str(run_dir.resolve())


def _save_config(cfg: Config) -> None:
    run_dir = Path(cfg.run_dir)
    name = "config.yaml" if not cfg.resume else f"config.resume-{Path(cfg.resume).name}.yaml"
    (run_dir / name).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


class JobFailed(Exception):
    """This job cannot run or did not finish; `exit_code` 2 for the config or data, 1 for a worker."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code


def _group_sweep_jobs(cfg: Config) -> None:
    """In a multirun, every job joins one W&B group named after the sweep, tagged with its overrides."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    sweep = Path(hydra_cfg.sweep.dir)
    cfg.logger.group = cfg.logger.group or f"sweep-{sweep.parent.name}-{sweep.name}"
    cfg.logger.tags = [*cfg.logger.tags, *hydra_cfg.overrides.task]


def run(cfg: Config) -> dict:
    """One training job: check, prepare the data, start (or join) the workers. Raises JobFailed."""
    joined = launch.joins_existing_job()
    world_size = int(os.environ["WORLD_SIZE"]) if joined else None
    cfg.run_dir = HydraConfig.get().runtime.output_dir
    _group_sweep_jobs(cfg)
    if joined:
        launch.init_joined_job(cfg.hardware, cfg.parallel)
        cfg.run_dir = launch.agree_on_run_dir(cfg.run_dir)
    try:
        preflight.resolve(cfg, world_size)
        preflight.validate(cfg, world_size)
        if cfg.resume:
            _resolve_resume(cfg)
        elif cfg.checkpoint.init_from:
            _resolve_init_from(cfg)
        first_on_node = not joined or int(os.environ["LOCAL_RANK"]) == 0
        if first_on_node:  # each node's local rank 0 builds the data cache; the others then find it
            _prepare_data(cfg)
        if joined:
            dist.barrier()
        if not first_on_node:
            _prepare_data(cfg)
    except ConfigError as error:
        raise JobFailed(2, str(error)) from error
    if not joined or int(os.environ["RANK"]) == 0:
        _save_config(cfg)
    log.info("run directory: %s", cfg.run_dir)
    try:
        payload = asdict(cfg)
        workers = cfg.parallel.tp * cfg.parallel.dp * cfg.parallel.pp
        result = trainer.worker(payload) if joined else launch.spawn(trainer.worker, payload, workers, cfg.run_dir)
    except launch.WorkerFailed as error:
        raise JobFailed(1, str(error)) from error
    if result:
        (Path(cfg.run_dir) / "results.json").write_text(json.dumps(result, indent=2))
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(raw: DictConfig) -> dict | None:
    cfg: Config = OmegaConf.to_object(raw)
    try:
        return run(cfg)
    except JobFailed as failure:
        log.error("error: %s", failure)
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            sys.exit(failure.exit_code)
        # A sweep goes on past a failed job; the failure stays on record in its run directory.
        record = {"failed": True, "exit_code": failure.exit_code, "error": str(failure)}
        (Path(HydraConfig.get().runtime.output_dir) / "failed.json").write_text(json.dumps(record, indent=2))
        return None


if __name__ == "__main__":
    main()
