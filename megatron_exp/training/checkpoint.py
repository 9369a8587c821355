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
from torch import nn

from megatron_exp.config import ConfigError, ModelConfig
from megatron_exp.models import build_model
from megatron_exp.models.transformer import TransformerModel
from megatron_exp.parallel import state
from megatron_exp.parallel.pipeline import PipelineLayout
from megatron_exp.parallel.sharding import shard_specs
from megatron_exp.parallel.state import Group, ProcessGrid

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
    for rank, saved in enumerate(states):
        _write_rank(tmp, rank, saved)
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


def load_rank(directory: Path, rank: int, mmap: bool = False) -> dict:
    """This rank's saved state, on the CPU; `mmap`: its tensors map the file and are read where they are used."""
    path = rank_file(directory, rank)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint in {directory} is incomplete; resume from another")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
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


class SavedShards:
    """A checkpoint read at another layout: DP replica 0's rank files, each opened once and memory-mapped, and
    every parameter's serial value merged from its saved stage's TP shards one parameter at a time. A rank of the
    new layout so reads the pieces of its own parameters, never the whole model (an 8B model's files hold ~128 GB
    of weights and Adam state, and every rank of a node resumes at once)."""

    def __init__(self, directory: Path):
        self.directory, self.meta = directory, read_meta(directory)
        self.cfg = model_config_of(directory)
        tp, pp, virtual = layout_of(self.meta)
        layout = PipelineLayout(pp, virtual, self.cfg.layers)
        self.parts = []  # each saved stage's model on the meta device: its parameter names and optimizer order
        for stage in range(pp):
            with torch.device("meta"), state.use(state.virtual(tp, pp=pp, pp_rank=stage)):
                self.parts.append(build_model(self.cfg, part=layout.part(stage)))
        self.specs = [shard_specs(part) for part in self.parts]
        self.stage_of: dict[str, int] = {}  # the first stage holding a name: stage 0's tied word embedding
        for stage, specs in enumerate(self.specs):
            for name in specs:
                self.stage_of.setdefault(name, stage)
        self._files: dict[int, dict] = {}

    def rank_state(self, rank: int) -> dict:
        if rank not in self._files:
            self._files[rank] = loaded = load_rank(self.directory, rank, mmap=True)
            if "model" in loaded:
                self._check_names(rank, loaded["model"])
        return self._files[rank]

    def any_rank_state(self) -> dict:
        """A rank file already opened (else rank 0's), for what every rank saves alike: iteration, loss scale."""
        return next(iter(self._files.values()), None) or self.rank_state(0)

    def _check_names(self, rank: int, saved: dict) -> None:
        stage = rank // (self.meta["tp"] * self.meta["dp"])  # the grid is (pp, dp, tp)
        expected = set(self.specs[stage])
        if set(saved) != expected:
            odd = sorted(set(saved) ^ expected)[:3]
            raise CheckpointError(
                f"{rank_file(self.directory, rank)}: its weights do not match stage {stage} of the model saved in "
                f"{META} (missing or unexpected: {odd}): the checkpoint is incomplete or mixes runs; use another"
            )

    def weight(self, name: str) -> torch.Tensor:
        """The serial value of one parameter (vocabulary padded for TP=1)."""
        stage = self.stage_of[name]
        return self.specs[stage][name].merge(
            [self.rank_state(rank)["model"][name] for rank in stage_ranks(self.meta, stage)], name
        )

    def weights_for(self, model: nn.Module, tp: Group) -> dict:
        """The state dict of `model` (a TP shard of a stage of the new layout), cut from the serial values."""
        return {
            name: spec.shard(self.weight(name), tp.size, tp.rank, name).clone()
            for name, spec in shard_specs(model).items()
        }


def load_serial_model_state(directory: Path) -> dict:
    """The whole model as a serial (TP=1, one stage) state dict: each stage's TP shards merged, the stages
    joined (the last stage's copy of the tied embedding equals the first stage's)."""
    saved = SavedShards(directory)
    with torch.device("meta"):
        names = list(shard_specs(build_model(saved.cfg)))
    missing = set(names) - set(saved.stage_of)
    if missing:
        raise CheckpointError(f"{directory}: no stage holds {sorted(missing)[:3]}: the checkpoint is incomplete")
    return {name: saved.weight(name).clone() for name in names}


def load_model_state(directory: Path, model: TransformerModel, grid: ProcessGrid) -> dict:
    """The weights of `model` (this rank's TP shard of its pipeline stage) from a checkpoint saved at any layout:
    read directly when the layout is the same, else merged to serial and re-split a parameter at a time."""
    meta = read_meta(directory)
    if layout_of(meta) == (grid.tp.size, grid.pp.size, model.part.count // grid.pp.size):
        return load_rank(directory, stage_ranks(meta, grid.pp.rank)[grid.tp.rank])["model"]
    return SavedShards(directory).weights_for(model, grid.tp)
