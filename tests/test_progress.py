"""Progress bars: whole lines at a readable rate when stderr is a log file, nothing when disabled,
the running postfix computed only when a line is drawn."""
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time

from vggjax.utils import progress
from vggjax.utils.progress import advance, progress_bar


def test_in_a_log_file_a_bar_prints_whole_lines_at_most_per_tenth_and_interval(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.05)
    calls = []

    def running():
        calls.append(1)
        return {"loss": f"{len(calls):.4f}"}

    with progress_bar(total=1000, desc="frozen 1/2", unit="img") as bar:
        for _ in range(100):
            time.sleep(0.002)
            advance(bar, 10, postfix=running)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and 2 <= len(lines) <= 11, lines  # no empty start line, no redraws
    assert all(re.fullmatch(r"frozen 1/2: +\d+%\|[# 0-9]{10}\| \d+/1000 \[.*img/s, loss=\d\.\d{4}\]", line)
               for line in lines), lines
    assert lines[-1].startswith("frozen 1/2: 100%|##########| 1000/1000")
    assert len(calls) == len(lines)  # the device sync only for the lines drawn (and the last)

    with progress_bar(range(3), desc="short") as bar:  # shorter than the interval: its end only
        list(bar)
    assert re.fullmatch(r"short: 100%\|##########\| 3/3 \[.*\]\n", capsys.readouterr().err)
    with progress_bar(total=5, desc="off", enabled=False) as bar:
        advance(bar, 5, postfix=running)
    assert capsys.readouterr().err == "" and len(calls) == len(lines)


def test_in_a_log_file_a_bar_ended_by_an_error_leaves_the_error_its_one_line(capsys):
    try:
        with progress_bar(total=2, desc="converting w.h5", unit="step") as bar:
            advance(bar, 1)
            raise ValueError("w.h5 is damaged")
    except ValueError:
        pass
    assert capsys.readouterr().err == ""  # the command prints "error: w.h5 is damaged", alone


def test_in_a_terminal_it_is_tqdm_s_live_bar():
    """Under a pseudo-terminal (80 columns) stderr is a tty: one line redrawn in place."""
    code = ("from vggjax.utils.progress import progress_bar\n"
            "with progress_bar(range(50), desc='tty') as bar:\n    list(bar)\n")
    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    child = subprocess.Popen([sys.executable, "-c", code], stdin=terminal, stdout=terminal, stderr=terminal)
    os.close(terminal)
    out = b""
    while chunk := _read(master):
        out += chunk
    assert child.wait(timeout=60) == 0
    os.close(master)
    text = out.decode()
    assert text.startswith("\r") and "tty: 100%" in text and "█" in text, text


def _read(fd) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # the terminal closed with the child
        return b""
