"""Faults in a spawned job: one worker killed with SIGKILL ends the whole job, quickly and cleanly."""

import logging
import os
import re
import signal
import time
from pathlib import Path

import pytest

from megatron_exp import launch
from megatron_exp.config import Config, HardwareConfig, ParallelConfig, RunSpec
from tests.test_train import TINY, _start, _wait_for, records


def _descendants(pid: int) -> set[int]:
    children = {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    return children.union(*(_descendants(c) for c in children)) if children else set()


def _worker_pids(run_dir: Path) -> dict[int, int]:
    """{rank: pid} from the line each worker logs first into its stdout (logs/<job>/attempt_0/<rank>/)."""
    pids = {}
    for log in run_dir.glob("logs/*/attempt_0/*/stdout.log"):
        match = re.search(r"rank (\d+) of \d+: pid (\d+) on ", log.read_text())
        if match:
            pids[int(match[1])] = int(match[2])
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
    return ") Z " not in stat  # a zombie has exited


@pytest.mark.slow
def test_killing_one_worker_ends_every_process_and_names_the_rank(tmp_path, shared_cache):
    overrides = [*TINY, "parallel.tp=2", "parallel.dp=2", "train.iterations=100000", "logger.wandb=false"]
    job = _start(tmp_path, *overrides, cache=shared_cache)
    try:
        _wait_for(lambda: (tmp_path / "metrics.jsonl").is_file() and records(tmp_path), 240, "training to start")
        workers = _worker_pids(tmp_path)
        assert sorted(workers) == [0, 1, 2, 3] and set(workers.values()) <= _descendants(job.pid)
        everything = _descendants(job.pid) | {job.pid}
        os.kill(workers[2], signal.SIGKILL)
        start = time.monotonic()
        output, _ = job.communicate(timeout=120)
        assert time.monotonic() - start < 120
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 1
    assert "error: worker rank 2 was killed (SIGKILL" in output, output[-2000:]
    time.sleep(1)
    assert not [pid for pid in everything if _alive(pid)], "orphan processes remain"


def _chatty(spec, grid):
    """Every rank logs a line; rank 1 also warns."""
    log = logging.getLogger("megatron_exp.test")
    log.info("rank %d at work", grid.rank)
    if grid.rank == 1:
        log.warning("rank 1 is slow")
    return {"done": True}


def test_a_spawned_job_shows_one_prefix_per_line_and_rank_0_appends_to_the_run_log(tmp_path, capsys):
    cfg = Config(hardware=HardwareConfig(name="cpu", device="cpu", backend="gloo", precision="fp32"),
                 parallel=ParallelConfig(dp=2))  # fmt: skip
    log_file = tmp_path / "train.log"
    log_file.write_text("12:00:00 run directory: ...\n")  # what the launching process logged first
    assert launch.run(RunSpec(cfg, str(tmp_path), workers=2), _chatty, log_file) == {"done": True}
    out, err = capsys.readouterr()
    clock = r"\d\d:\d\d:\d\d"
    assert re.fullmatch(rf"{clock} rank 0 of 2: pid \d+ on .+\n{clock} rank 0 at work\n", out), out  # rank 0: plain
    assert re.fullmatch(rf"\[rank 1\] {clock} warning: rank 1 is slow\n", err), err  # another rank: what matters
    assert log_file.read_text().splitlines()[1:] == out.splitlines()  # rank 0's lines, after the launcher's
    (rank1,) = tmp_path.glob("logs/*/attempt_0/1/stdout.log")
    assert re.search(rf"\[rank 1\] {clock} rank 1 at work", rank1.read_text())  # the rest is in its own file


def test_ranks_started_by_slurm_get_torch_distributed_variables():
    from megatron_exp.launch import first_host, slurm_environment

    assert first_host("gpu[003-005,9],cpu1") == "gpu003"
    assert first_host("node7,node8") == "node7" and first_host("single") == "single"
    env = {"SLURM_PROCID": "13", "SLURM_LOCALID": "5", "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": "dgx[12-13]", "SLURM_JOB_ID": "4242"}  # fmt: skip
    assert slurm_environment(env) == {
        "RANK": "13", "LOCAL_RANK": "5", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "dgx12", "MASTER_PORT": str(20000 + 4242),
    }  # fmt: skip


def test_a_multi_task_slurm_job_is_joined_and_a_single_task_spawns(monkeypatch):
    # A private environment for the test: joining writes torch.distributed's variables into it.
    monkeypatch.setattr(launch.os, "environ", {"SLURM_NTASKS": "1", "SLURM_PROCID": "0"})
    assert launch.joins_existing_job() is False  # e.g. an interactive srun of one task: spawn workers here
    env = {"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "2", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_ID": "7"}  # fmt: skip
    monkeypatch.setattr(launch.os, "environ", env)
    assert launch.joins_existing_job() is True
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("2", "4", "2", "n1")


def test_the_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm extra is not installed")
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=8"],
                      return_hydra_config=True)  # fmt: skip
    launcher = cfg.hydra.launcher
    assert "SlurmLauncher" in launcher._target_
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node, launcher.timeout_min) == (8, 8, 8, 240)
