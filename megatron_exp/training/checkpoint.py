"""Checkpoints: every rank saves its own shard, and a checkpoint appears whole or not at all.

Layout: <run_dir>/checkpoints/iter_0000100/{rank_00000.pt, ..., meta.json}, plus a `latest` file naming the newest.
A save writes into a hidden temporary directory; once every rank has written, rank 0 adds meta.json, renames the
directory into place and only then updates `latest`. A crash at any point leaves the previous checkpoint as the
newest complete one; leftovers are ignored with a warning. Files are read with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_exp.config import ConfigError, ModelConfig
from megatron_exp.models import build_model
from megatron_exp.models.transformer import TransformerModel
from megatron_exp.parallel.sharding import merge_state_dicts, shard_specs
from megatron_exp.parallel.state import ProcessGrid

log = logging.getLogger(__name__)

LATEST = "latest"
META = "meta.json"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used (a bad input: exit 2 before any worker starts, where it is found there);
    the message names the file and what to do."""


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rank_file(directory: Path, rank: int) -> Path:
    return directory / f"rank_{rank:05d}.pt"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_rank(directory: Path, rank: int, state: dict) -> None:
    path = rank_file(directory, rank)
    try:
        with open(path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as error:
        raise CheckpointError(f"{_os_reason(error)} writing {path}: the previous checkpoint is kept") from error


def _os_reason(error: BaseException) -> str:
    """What the operating system said ("no space left on device"), which torch.save wraps in a C++ message."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    if error is None or error.errno is None:
        return "the write failed"
    return os.strerror(error.errno).lower()


def _commit(tmp: Path, final: Path, meta: dict, keep: int) -> None:
    """Make a fully written temporary directory the newest checkpoint (rank 0 / a single process only)."""
    _write_atomically(tmp / META, json.dumps(meta, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _write_atomically(final.parent / LATEST, final.name)
    for old in complete_checkpoints(final.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint: saved %s", final)


def _paths(run_dir: str | Path, iteration: int) -> tuple[Path, Path]:
    final = checkpoints_root(run_dir) / f"iter_{iteration:07d}"
    return final.with_name(f".tmp_{final.name}"), final


def save(run_dir: str | Path, iteration: int, state: dict, rank: int, meta: dict, keep: int) -> Path:
    """Save this rank's `state` as part of the checkpoint of `iteration` (every rank must call it)."""
    tmp, final = _paths(run_dir, iteration)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    _write_rank(tmp, rank, state)
    _barrier()
    if rank == 0:
        _commit(tmp, final, {"iteration": iteration, **meta}, keep)
    _barrier()
    return final


def save_all(run_dir: str | Path, iteration: int, states: list[dict], meta: dict) -> Path:
    """Save every rank's state from one process (conversion), with the same layout and atomicity."""
    tmp, final = _paths(run_dir, iteration)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for rank, state in enumerate(states):
        _write_rank(tmp, rank, state)
    _commit(tmp, final, {"iteration": iteration, "world_size": len(states), **meta}, keep=0)
    return final


def read_meta(directory: Path) -> dict:
    path = Path(directory) / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"{path} cannot be read ({type(error).__name__}: {error}): the checkpoint's description is damaged; "
            "use another checkpoint of the run"
        ) from None
    if not isinstance(meta, dict) or "world_size" not in meta or "model" not in meta:
        raise CheckpointError(f"{path} is not a megatron-exp checkpoint description (no world_size/model keys)")
    return meta


def missing_files(directory: Path) -> list[Path]:
    """What a checkpoint directory lacks to be complete: meta.json (written last) or some rank's shard."""
    if not (directory / META).is_file():
        return [directory / META]
    world_size = read_meta(directory)["world_size"]
    return [rank_file(directory, r) for r in range(world_size) if not rank_file(directory, r).is_file()]


def is_complete(directory: Path) -> bool:
    try:
        return not missing_files(directory)
    except CheckpointError as error:
        log.warning("checkpoint: skipping %s: %s", directory, error)
        return False


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    return sorted(d for d in root.glob("iter_*") if d.is_dir() and is_complete(d))


def find_latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, skipping (with a warning) anything a crash left half-written."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return None
    for leftover in root.glob(".tmp_iter_*"):
        log.warning("checkpoint: ignoring %s, left half-written by an interrupted save", leftover)
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named.is_dir() and is_complete(named):
            return named
        log.warning("checkpoint: %s names %s, which is incomplete; using the newest complete one", pointer, named)
    complete = complete_checkpoints(root)
    return complete[-1] if complete else None


def resolve(path: str | Path) -> Path | None:
    """The checkpoint that `path` names: a checkpoint directory itself, or the newest complete one of a run
    directory (or of its checkpoints/ folder)."""
    path = Path(path).expanduser()
    if (path / META).is_file():
        missing = missing_files(path)
        if missing:
            raise CheckpointError(f"{missing[0]} is missing: the checkpoint {path} is incomplete; use another one")
        return path
    return find_latest(path.parent if path.name == "checkpoints" else path)


def require(path: str | Path, key: str) -> Path:
    """`resolve` for a config value: the checkpoint, or a ConfigError naming `key` and what is wrong."""
    try:
        directory = resolve(path)
    except CheckpointError as error:
        raise ConfigError(f"{key}={path}: {error}") from error
    if directory is None:
        raise ConfigError(f"{key}={path} holds no complete checkpoint (expected <run dir>/checkpoints/iter_*)")
    return directory


def load_rank(directory: Path, rank: int) -> dict:
    """This rank's saved state, on the CPU."""
    path = rank_file(directory, rank)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint in {directory} is incomplete; resume from another")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"{path} cannot be read ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}): "
            "it is corrupt or not a megatron-exp checkpoint; delete that checkpoint directory to use an earlier one"
        ) from error


def load_into(module_or_optimizer, state: dict, path: Path, what: str) -> None:
    """load_state_dict with an error that names the file when the shapes or keys do not fit."""
    try:
        module_or_optimizer.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()
        raise CheckpointError(
            f"{path}: its {what} does not fit this run ({' '.join(first[:2])}): the checkpoint was saved with "
            "another model shape or parallel layout; use the same config, or convert the checkpoint"
        ) from error


def model_config_of(directory: Path) -> ModelConfig:
    return ModelConfig(**read_meta(directory)["model"])


def layout_of(meta: dict) -> tuple[int, int, int]:
    """(tp, pp, virtual stages) a checkpoint was saved at (older ones had no pipeline)."""
    return meta["tp"], meta.get("pp", 1), meta.get("virtual_stages", 1)


def stage_ranks(meta: dict, stage: int) -> list[int]:
    """The global ranks holding DP replica 0 of pipeline stage `stage`, in TP order (the grid is (pp, dp, tp))."""
    tp, dp = meta["tp"], meta["dp"]
    return [(stage * dp) * tp + t for t in range(tp)]


def load_serial_model_state(directory: Path) -> dict:
    """The whole model as a serial (TP=1, one stage) state dict: each stage's TP shards merged, the stages
    joined (the last stage's copy of the tied embedding equals the first stage's)."""
    meta = read_meta(directory)
    with torch.device("meta"):
        specs = shard_specs(build_model(model_config_of(directory)))
    serial = {}
    for stage in range(layout_of(meta)[1]):
        shards = [load_rank(directory, rank)["model"] for rank in stage_ranks(meta, stage)]
        unknown = set(shards[0]) - set(specs)
        if unknown:
            raise CheckpointError(f"{directory}: stage {stage} holds {sorted(unknown)[:3]}, which the model has not")
        serial |= merge_state_dicts(shards, {name: specs[name] for name in shards[0]})
    missing = set(specs) - set(serial)
    if missing:
        raise CheckpointError(f"{directory}: no stage holds {sorted(missing)[:3]}: the checkpoint is incomplete")
    return serial


def load_model_state(directory: Path, model: TransformerModel, grid: ProcessGrid) -> dict:
    """The weights of `model` (this rank's TP shard of its pipeline stage) from a checkpoint saved at any layout:
    read directly when the layout is the same, else merged to serial and re-split."""
    meta = read_meta(directory)
    if layout_of(meta) == (grid.tp.size, grid.pp.size, model.part.count // grid.pp.size):
        return load_rank(directory, stage_ranks(meta, grid.pp.rank)[grid.tp.rank])["model"]
    serial, specs = load_serial_model_state(directory), shard_specs(model)
    return {name: specs[name].shard(serial[name], grid.tp.size, grid.tp.rank, name) for name in specs}
