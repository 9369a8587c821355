"""The console's lines: one prefix each, progress bars as clean lines in a file, workers' output echoed once."""

import io
import logging
import re

import pytest

from megatron_exp import console

TIME = r"\d\d:\d\d:\d\d"


def _record(level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord("megatron_exp", level, __file__, 1, message, None, None)


def test_rank_0_lines_are_plain_with_the_time_and_other_ranks_say_which_they_are():
    assert re.fullmatch(f"{TIME} loss 5.0", console.Formatter(0).format(_record(logging.INFO, "loss 5.0")))
    assert re.fullmatch(f"{TIME} loss 5.0", console.Formatter().format(_record(logging.INFO, "loss 5.0")))
    warned = console.Formatter(0).format(_record(logging.WARNING, "W&B could not start"))
    assert re.fullmatch(f"{TIME} warning: W&B could not start", warned)
    failed = console.Formatter(3).format(_record(logging.ERROR, "disk full"))
    assert re.fullmatch(rf"\[rank 3\] {TIME} error: disk full", failed)


def test_redraws_become_a_line_per_interval_and_the_last_one_when_the_bar_ends(caplog):
    passthrough = io.StringIO()
    lines = console.LogLines(interval=3600, passthrough=passthrough)
    with caplog.at_level(logging.INFO, logger="megatron_exp.progress"):
        for n in range(5):
            lines.write(f"\rtokenizing: {n}/4")
        assert caplog.messages == []  # within the interval: no line yet
        lines.write("a warning from the library\n")  # not a redraw: passed on as it is
        lines.write("\rtokenizing: 4/4   ")
        lines.write("\n")  # the bar ends
    assert caplog.messages == ["tokenizing: 4/4"] and passthrough.getvalue() == "a warning from the library\n"

    every = console.LogLines(interval=0)
    with caplog.at_level(logging.INFO, logger="megatron_exp.progress"):
        every.write("\rstep 1")
        every.write("\rstep 2")
    assert caplog.messages[-2:] == ["step 1", "step 2"]


def test_a_progress_bar_off_a_terminal_logs_lines_without_carriage_returns(caplog, monkeypatch):
    monkeypatch.setattr(console, "is_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="megatron_exp.progress"):
        assert list(console.progress(range(7), desc="wikitext103", unit="batches")) == list(range(7))
        assert list(console.progress(range(3), desc="hidden", enabled=False)) == [0, 1, 2]
    (line,) = caplog.messages
    assert re.fullmatch(r"wikitext103: 7/7 batches \(100%\) \[00:00<00:00, .* batches/s\]", line), line
    assert "\r" not in caplog.text


def test_library_bars_become_lines_off_a_terminal(caplog, monkeypatch, capsys):
    from tqdm import tqdm

    monkeypatch.setattr(console, "is_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="megatron_exp.progress"), console.library_bars_as_lines():
        for _ in tqdm(range(50), desc="Map"):  # a library's bar: tqdm's defaults, drawn on stderr
            pass
    assert len(caplog.messages) == 1 and caplog.messages[0].startswith("Map: 100%") and "50/50" in caplog.messages[0]
    assert "\r" not in capsys.readouterr().err


def test_workers_output_is_echoed_with_one_prefix_per_line(tmp_path, capsys):
    files = {name: tmp_path / name for name in ("out0", "err0", "out1", "err1")}
    with console.Echo(interval=0.01) as echo:
        echo.add(0, str(files["out0"]), str(files["err0"]))
        echo.add(1, str(files["out1"]), str(files["err1"]))
        files["out0"].write_text("12:00:00 iter 1/2 | loss 5.0\n12:00:01 eval: 3/9\r12:00:02 eval: 9/9\n")
        files["err0"].write_text("wandb: offline\n")
        files["out1"].write_text("[rank 1] 12:00:00 rank 1 of 2: pid 42 on host\n")  # its file only
        files["err1"].write_text("[rank 1] 12:00:00 warning: slow disk\nTraceback (most recent call last):\n  x")
    out, err = capsys.readouterr()
    assert out.splitlines() == ["12:00:00 iter 1/2 | loss 5.0", "12:00:02 eval: 9/9"]
    assert sorted(err.splitlines()) == [  # each file's lines in order; the files' lines may interleave
        "[rank 1]   x",  # an unfinished last line is shown when the workers are done
        "[rank 1] 12:00:00 warning: slow disk",
        "[rank 1] Traceback (most recent call last):",
        "wandb: offline",
    ]


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_logs_to_the_console_and_rank_0_to_the_run_log_too(tmp_path, capsys, rank):
    log_file = tmp_path / "train.log"
    log_file.write_text("12:00:00 run directory: x\n")  # the launching process's lines come first
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        console.setup_rank(rank, log_file, spawned=True)
        logging.getLogger("megatron_exp.training").info("iter 1/2")
        logging.getLogger("megatron_exp.training").warning("slow")
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
            handler.close()
        root.handlers[:], root.level = saved
    out, err = capsys.readouterr()
    if rank == 0:
        assert re.fullmatch(f"{TIME} iter 1/2\n{TIME} warning: slow\n", out) and err == ""
        assert re.fullmatch(f"12:00:00 run directory: x\n{TIME} iter 1/2\n{TIME} warning: slow\n", log_file.read_text())
    else:  # INFO stays in the rank's own stdout file; the warning reaches the console through stderr
        assert re.fullmatch(rf"\[rank 1\] {TIME} iter 1/2\n", out)
        assert re.fullmatch(rf"\[rank 1\] {TIME} warning: slow\n", err)
        assert log_file.read_text() == "12:00:00 run directory: x\n"
