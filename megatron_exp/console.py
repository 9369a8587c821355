"""What the console and a run's log file look like, in every process of a run.

One prefix per line. The launching process and global rank 0 write `HH:MM:SS message` (`HH:MM:SS warning: ...`
for warnings and errors); rank 0 also appends its records to the run's log file, which the launching process
writes too, so `train.log` holds the whole run as rank 0 saw it. Other ranks keep their full output in their own
files (logs/<job>/attempt_0/<rank>/), and only what matters there (warnings, errors, tracebacks: their stderr)
reaches the console, marked `[rank r]` once.

Progress bars (tqdm) draw on a terminal. Anywhere else (a file, a pipe, a SLURM log, and always in a worker, whose
output is a file) a bar becomes a log line every `LINE_INTERVAL_S` seconds and one when it ends, with no
carriage returns.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

LINE_INTERVAL_S = 30.0  # a progress line at most this often when the console is not a terminal
_LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt}{unit} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}]"

log = logging.getLogger("megatron_exp.progress")


class Formatter(logging.Formatter):
    """`HH:MM:SS message`, `HH:MM:SS warning: message` at WARNING and above, and `[rank r] ` first on ranks
    other than 0 (None: the launching process, which needs no mark)."""

    def __init__(self, rank: int | None = None):
        super().__init__(datefmt="%H:%M:%S")
        self.mark = f"[rank {rank}] " if rank else ""

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        text = f"{self.mark}{self.formatTime(record, self.datefmt)} {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def _handler(handler: logging.Handler, formatter: logging.Formatter, level: int) -> logging.Handler:
    handler.setFormatter(formatter)
    handler.setLevel(level)
    return handler


def setup_rank(rank: int, log_file: Path | None, spawned: bool) -> None:
    """This rank's logging. Rank 0: INFO and above to stdout and appended to `log_file`. Other ranks: warnings and
    errors to stderr; when `spawned` (stdout is this rank's file, not the console) INFO to stdout as well."""
    formatter = Formatter(rank)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.setLevel(logging.INFO)
    if rank == 0:
        root.addHandler(_handler(logging.StreamHandler(sys.stdout), formatter, logging.INFO))
        if log_file is not None:
            root.addHandler(_handler(logging.FileHandler(log_file, mode="a", encoding="utf-8"), formatter, 0))
        return
    root.addHandler(_handler(logging.StreamHandler(sys.stderr), formatter, logging.WARNING))
    if spawned:
        info = _handler(logging.StreamHandler(sys.stdout), formatter, logging.INFO)
        info.addFilter(_Below(logging.WARNING))
        root.addHandler(info)


def log_to(log_file: Path) -> None:
    """Point this process's log file at `log_file` (a resumed run continues the log of the run it resumes)."""
    root = logging.getLogger()
    for handler in root.handlers[:]:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename) != Path(log_file).resolve():
            root.removeHandler(handler)
            handler.close()
            root.addHandler(_handler(logging.FileHandler(log_file, mode="a", encoding="utf-8"), handler.formatter, 0))


def is_terminal() -> bool:
    """Whether progress bars can redraw in place (tqdm draws on stderr)."""
    return sys.stderr.isatty()


class LogLines:
    """A file for tqdm that turns its redraws (a carriage return, then the status) into log lines: at most one
    every `interval` seconds, and the last status when the bar ends (a newline right after it). A line of other
    text goes on to `passthrough` (a warning printed while a library's bar runs)."""

    def __init__(self, interval: float = LINE_INTERVAL_S, passthrough: TextIO | None = None):
        self.interval, self.passthrough = interval, passthrough
        self.logged_at = time.monotonic()  # the bar's first status (nothing done yet) is not worth a line
        self.logged = ""
        self.status = ""  # the newest redraw not yet logged
        self.text = ""  # other text since the last newline

    def write(self, data: str) -> int:
        *ended, rest = data.split("\n")
        for line in ended:
            self._take(line)
            if self.text and self.passthrough is not None:
                self.passthrough.write(self.text + "\n")
            elif not self.text:
                self._log()
            self.text = ""
        self._take(rest)
        return len(data)

    def _take(self, text: str) -> None:
        first, *redraws = text.split("\r")
        self.text += first
        for redraw in redraws:
            self.status = redraw.strip() or self.status
            if time.monotonic() - self.logged_at >= self.interval:
                self._log()

    def _log(self) -> None:
        if self.status and self.status != self.logged:
            log.info(self.status)
            self.logged, self.logged_at = self.status, time.monotonic()
        self.status = ""

    def flush(self) -> None:
        if self.passthrough is not None:
            self.passthrough.flush()

    def isatty(self) -> bool:
        return False


def progress(iterable: Iterable, *, desc: str, unit: str = "it", enabled: bool = True):
    """`iterable` with a progress bar: drawn on a terminal, else logged as lines (see LogLines)."""
    if not enabled:
        return tqdm(iterable, disable=True)
    unit = f" {unit}"  # tqdm writes it right after the numbers: "3/7 batches", "2.5 batches/s"
    if is_terminal():
        return tqdm(iterable, desc=desc, unit=unit, mininterval=0.5, dynamic_ncols=True)
    return tqdm(iterable, desc=desc, unit=unit, file=LogLines(), mininterval=1.0, bar_format=_LINE_FORMAT)


@contextlib.contextmanager
def library_bars_as_lines():
    """Within it, the progress bars that libraries (datasets) draw on stderr become log lines, unless stderr is a
    terminal."""
    if is_terminal():
        yield
        return
    lines = LogLines(passthrough=sys.stderr)
    with contextlib.redirect_stderr(lines):
        yield


class Echo:
    """Copies what spawned workers write into their files onto this console while they run: rank 0's stdout and
    stderr as they are, other ranks' stderr with `[rank r] ` before each line that lacks it. A line shows what a
    terminal would: its text after the last carriage return."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.files: list[_Followed] = []
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._follow, name="megatron-exp-echo", daemon=True)

    def add(self, rank: int, stdout: str | None, stderr: str | None) -> None:
        if rank == 0 and stdout:
            self.files.append(_Followed(Path(stdout), sys.stdout, ""))
        if stderr:
            self.files.append(_Followed(Path(stderr), sys.stderr, f"[rank {rank}] " if rank else ""))

    def __enter__(self) -> Echo:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.finished.set()
        self.thread.join()

    def _follow(self) -> None:
        while True:
            last_pass = self.finished.is_set()  # read before the pass: it then drains everything written
            moved = [followed.pump(last_pass) for followed in list(self.files)]
            if last_pass:
                return
            if not any(moved):
                time.sleep(self.interval)


class _Followed:
    def __init__(self, path: Path, stream: TextIO, mark: str):
        self.path, self.stream, self.mark = path, stream, mark
        self.file: TextIO | None = None
        self.partial = ""

    def pump(self, last: bool) -> bool:
        """Echo the lines written since the last call (and with `last`, an unfinished one); whether there were."""
        if self.file is None:
            if not self.path.is_file():
                return False
            self.file = open(self.path, encoding="utf-8", errors="replace", newline="")  # noqa: SIM115 - kept open
        chunk = self.file.read()
        *lines, self.partial = (self.partial + chunk).split("\n")
        if last and self.partial:
            lines, self.partial = [*lines, self.partial], ""
        for line in lines:
            shown = line.rstrip("\r").rsplit("\r", 1)[-1]
            self.stream.write(shown + "\n" if shown.startswith(self.mark) else f"{self.mark}{shown}\n")
        if lines:
            self.stream.flush()
        if last:
            self.file.close()
        return bool(chunk)
