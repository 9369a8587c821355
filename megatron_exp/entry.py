"""The shell of every entry point: Hydra composes the config, the entry point resolves it into a `RunSpec`, the
workers run (spawned here, or this process as one rank of a torchrun/SLURM job), rank 0 reports, and every way of
failing ends as one line and an exit code.

Exit codes: 0 done; 1 a worker failed (its rank and error are printed; every rank's log is in the run directory);
2 the configuration or an input cannot run (one line names the key or file and a fix), before any worker starts.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from megatron_exp import console, launch
from megatron_exp.config import ConfigError, RunSpec, from_composed, register_schemas, unknown_key
from megatron_exp.parallel.state import ProcessGrid
from megatron_exp.training.metrics import wandb_pointer, write_json
from megatron_exp.training.stop import Interrupted

log = logging.getLogger("megatron_exp")

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


_claimed: dict[str, str] = {}  # run directories this process has claimed, by the name asked for


def unique_dir(name: str) -> str:
    """Create the run directory `name`, or `name`-2, -3, ... if another run holds it; the same answer each time
    this process asks (Hydra resolves its run directory more than once). os.mkdir is atomic: two runs started in
    the same second never share a directory."""
    if name not in _claimed:
        for attempt in itertools.count(1):
            candidate = name if attempt == 1 else f"{name}-{attempt}"
            Path(candidate).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.mkdir(candidate)
            except FileExistsError:
                continue
            _claimed[name] = candidate
            break
    return _claimed[name]


def run_label(*, _root_: DictConfig) -> str:
    """What a run directory is named after: <model>_tp<k>[_pp<k>] for training, <job type>_<task> for the tasks,
    generate_tp<k>[_pp<k>] for generation."""
    if "model" in _root_ or "prompt" in _root_:
        pp = _root_.parallel.pp
        layout = f"tp{_root_.parallel.tp}" + (f"_pp{pp}" if pp > 1 else "")
        return f"{_root_.model.name}_{layout}" if "model" in _root_ else f"generate_{layout}"
    return f"{_root_.logger.job_type}_{_root_.task.name}"


def _register() -> None:
    register_schemas()
    OmegaConf.register_new_resolver("unique_dir", unique_dir, replace=True)
    OmegaConf.register_new_resolver("run_label", run_label, replace=True)


def hydra_app(config_name: str) -> Callable:
    """`@hydra.main` for this project's entry points: the schemas are registered first, and a composition error
    (an unknown key or preset, a wrong type) exits 2 with a short message instead of Hydra's exit 1."""

    def decorate(task: Callable[[DictConfig], object]) -> Callable[[], None]:
        main = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)(task)

        @functools.wraps(task)
        def app() -> None:
            _register()
            wants_trace = "HYDRA_FULL_ERROR" in os.environ
            os.environ["HYDRA_FULL_ERROR"] = "1"  # let composition errors reach us instead of being printed
            try:
                main()
            except (HydraException, OmegaConfBaseException) as error:
                if wants_trace:
                    raise
                print(f"error: {composition_error(error)}", file=sys.stderr)
                sys.exit(EXIT_BAD_INPUT)
            finally:
                if not wants_trace:
                    os.environ.pop("HYDRA_FULL_ERROR", None)

        return app

    return decorate


def composition_error(error: Exception) -> str:
    """Hydra's message on one line, its list of available options kept."""
    cause = error.__cause__
    unknown = isinstance(cause, ConfigKeyError | ConfigAttributeError) and cause.full_key
    if unknown and dataclasses.is_dataclass(cause.object_type):
        return unknown_key(cause.full_key, cause.object_type)  # not Hydra's advice to append it with '+'
    if isinstance(error, MissingConfigException) and error.options:
        first = str(error).strip().splitlines()[0]
        return f"{first.removeprefix('In ')} (available: {', '.join(error.options)})"
    lines = [line.strip() for part in (error, error.__cause__) if part for line in str(part).splitlines()]
    return "; ".join(dict.fromkeys(line for line in lines if line and not line.startswith(("full_key", "object_type"))))


def _fail(code: int, message: str) -> None:
    """The error (one line per problem); a sweep goes on past a failed job (recorded in its failed.json), a single
    run exits."""
    log.error("%s", message)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        record = {"failed": True, "exit_code": code, "error": message}
        write_json(Path(HydraConfig.get().runtime.output_dir) / "failed.json", record)
        return
    sys.exit(code)


def run(
    raw: DictConfig,
    schema: type,
    prepare: Callable[..., RunSpec],
    work: Callable[[RunSpec, ProcessGrid], dict | None],
    report: Callable[[RunSpec, dict], dict] | None = None,
) -> dict | None:
    """The body of an entry point that starts workers: `prepare(cfg, run_dir, joined)` resolves the spec (and its
    inputs), `work(spec, grid)` runs on every rank, `report(spec, result)` turns rank 0's result into
    results.json. Returns that result (None on other ranks of a joined job, or after a failure in a sweep)."""
    try:
        cfg = from_composed(raw, schema)
        run_dir = HydraConfig.get().runtime.output_dir
        joined = launch.joins_existing_job()
        if joined:
            launch.init_joined_job(cfg.hardware, cfg.parallel)
            run_dir = launch.agree_on_run_dir(run_dir)
            console.setup_rank(int(os.environ["RANK"]), _log_file(run_dir), spawned=False)
        spec = prepare(cfg, run_dir, joined)
    except ConfigError as error:
        return _fail(EXIT_BAD_INPUT, str(error))
    except KeyboardInterrupt:
        log.error("interrupted before any worker started (SIGINT)")
        sys.exit(128 + signal.SIGINT)
    log_file = _log_file(spec.run_dir)
    console.log_to(log_file)  # a resumed run's directory is not the one Hydra made for this invocation
    log.info("run directory: %s", spec.run_dir)
    try:
        result = launch.run(spec, work, log_file)
    except launch.WorkerFailed as error:
        return _fail(EXIT_FAILED, str(error))
    except Interrupted as stopped:
        where = "before training started" if stopped.iteration is None else f"at iteration {stopped.iteration}"
        resume = ""
        if hasattr(spec.config, "resume"):
            resume = (
                f"; continue with resume={spec.run_dir}"
                if stopped.checkpoint
                else "; no checkpoint to resume from yet (checkpoint.on_signal=true saves one on a signal)"
            )
        log.error("interrupted %s (%s)%s", where, signal.Signals(stopped.signum).name, resume)
        sys.exit(stopped.exit_code)
    if result is None:
        return None
    if report:
        result = report(spec, result)
    results = Path(spec.run_dir) / "results.json"
    write_json(results, result)
    log.info("results: %s%s", results, wandb_pointer(spec.wandb))
    return result


def _log_file(run_dir: str) -> Path:
    """The run's log: the launching process's (Hydra names it after the entry point, e.g. train.log), which rank 0
    appends to."""
    return Path(run_dir) / f"{HydraConfig.get().job.name}.log"


def run_here(raw: DictConfig, schema: type, body: Callable) -> object:
    """The body of an entry point that runs in this process only (convert, plan, analyze): `body(cfg)`, with a
    ConfigError as one line and exit 2."""
    try:
        return body(from_composed(raw, schema))
    except ConfigError as error:
        return _fail(EXIT_BAD_INPUT, str(error))
