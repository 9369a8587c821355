"""Stopping on a signal at a step boundary that every rank agrees on.

SIGINT (Ctrl-C) and SIGTERM (SLURM preemption, `kill`) only note the request. Ranks see signals at different
moments, and a rank that left the loop alone would leave its peers waiting in a collective, so the ranks agree
first: at every step boundary each rank reads the previous boundary's all-reduce (MAX) of the flags and starts
the next one, asynchronously on the gloo control group. Nobody waits (the reduction had a whole step to finish)
and every rank stops after the same iteration, one step after the earliest signal.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

_requested = 0  # the first signal received, or 0


def _note(signum: int, frame) -> None:
    global _requested
    _requested = _requested or signum


def listen() -> None:
    """From now on SIGINT and SIGTERM request a stop instead of ending the process."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _note)


class Interrupted(Exception):
    """The run stopped on a signal after `iteration` (None: before training started); `checkpoint`: the newest
    complete one, if any."""

    def __init__(self, signum: int, iteration: int | None = None, checkpoint: str | None = None):
        self.signum, self.iteration, self.checkpoint = signum, iteration, checkpoint
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


class StopAgreement:
    """`boundary()` at the end of every step: the signal every rank has agreed to stop on, or 0."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self.flag = torch.zeros(1, dtype=torch.int32)
        self.pending = None

    def boundary(self) -> int:
        if self.group is None:
            return _requested
        agreed = 0
        if self.pending is not None:
            self.pending.wait()
            agreed = int(self.flag.item())
        self.flag = torch.tensor([_requested], dtype=torch.int32)
        self.pending = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return agreed

    def finish(self) -> None:
        """Complete the last reduction (every rank does, after its last step)."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
