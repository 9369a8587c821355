"""Naming the real cause when workers fail.

When one rank fails, its peers fail too, a moment later, with errors about the peer that vanished ("Connection
closed by peer") or a collective that timed out. The launcher sees whichever process it polls first, so without
care the report blames a bystander. Here every rank's error file is read and the failures are sorted: a rank's own
error (a missing file, a full disk, a diverged loss) is the cause; errors about a lost peer are consequences.

A rank that freezes raises nothing: its peers time out waiting for it. Each rank that hits a collective timeout
therefore checks in at a monitored barrier on a side group before giving up: rank 0 learns which ranks never
arrived and reports them as the ones that stopped answering (`PeerStopped`); a rank that cannot reach rank 0 says
so of rank 0.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

# Errors that are about another process, not this one.
_PEER_LOST = re.compile(
    r"closed by peer|reset by peer|broken pipe|remote (worker|process)|timed out|timeout|connection refused|"
    r"DistNetworkError|DistBackendError|NCCL.*(abort|remote)",
    re.IGNORECASE,
)


class PeerStopped(RuntimeError):
    """A collective timed out because these ranks stopped answering."""


def is_collective_timeout(error: BaseException) -> bool:
    return bool(re.search(r"timed out|timeout", str(error), re.IGNORECASE))


def diagnose_timeout(group: dist.ProcessGroup, seconds: float) -> None:
    """After a collective timed out on this rank: find out who stopped answering, and raise PeerStopped naming
    them (rank 0 knows who never arrived; another rank knows only whether rank 0 answered). Returns silently if
    every rank answered (the timeout was not a rank stopping)."""
    try:
        dist.monitored_barrier(group=group, timeout=timedelta(seconds=seconds), wait_all_ranks=True)
    except RuntimeError as error:
        if dist.get_rank() == 0:
            missing = re.findall(r"\d+", str(error).split("Ranks", 1)[-1].split("failed", 1)[0])
            who = f"rank {', '.join(missing)}" if missing else "a rank"
            raise PeerStopped(f"{who} stopped answering: this rank timed out waiting for it in a collective") from None
        raise PeerStopped("rank 0 stopped answering: a collective timed out and rank 0 did not reply") from None


def _error_message(path: Path) -> tuple[str, int]:
    """(the 'Type: message' first line of a rank's error file, its timestamp)."""
    record = json.loads(path.read_text())["message"]
    if isinstance(record, str):
        return record.strip().splitlines()[0], 0
    message = str(record.get("message", "")).strip()
    return message.splitlines()[0] if message else "", int(record.get("extraInfo", {}).get("timestamp", 0))


def root_cause(failure: ChildFailedError, workers: int) -> str:
    """The failure that started it, and which ranks only followed: for WorkerFailed's one line."""
    first_rank, first = failure.get_first_failure()
    errors = {}
    attempt = Path(first.error_file).parents[1] if first.error_file else None
    for path in sorted(attempt.glob("*/error.json")) if attempt and attempt.is_dir() else []:
        try:
            errors[int(path.parent.name)] = _error_message(path)
        except (OSError, ValueError, KeyError, IndexError):
            continue
    own = {rank: e for rank, e in errors.items() if "PeerStopped" in e[0] or not _PEER_LOST.search(e[0])}
    followers = sorted(r for r in errors if r not in own)
    if own:
        rank = min(own, key=lambda r: (own[r][1], r))
        text = f"worker rank {rank} failed: {own[rank][0]}"
    elif first.exitcode < 0:  # killed by a signal (no error file of its own)
        text = f"worker rank {first_rank} was killed ({first.signal_name()}, exit code {first.exitcode})"
        followers = [r for r in followers if r != first_rank]
    else:
        silent = sorted(set(range(workers)) - set(errors))
        who = f"rank {', '.join(map(str, silent))} (no error of its own)" if silent else "a peer"
        seen = errors[first_rank][0] if first_rank in errors else f"rank {first_rank} exited with {first.exitcode}"
        return f"{who} stopped; the other ranks lost it as a peer: {seen}"
    if followers:
        text += f" (then rank{'s' if len(followers) > 1 else ''} {', '.join(map(str, followers))} lost it as a peer)"
    return text
