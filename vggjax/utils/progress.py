"""Progress bars for every long job, in the form that suits where they show: a live bar in a
terminal, a widget in Jupyter (`tqdm.auto`), and whole lines at a readable rate in a log file.

    with progress_bar(total=images, desc="frozen 1/30", unit="img") as bar:
        for batch in batches:
            ...
            advance(bar, len(batch["label"]), postfix=lambda: {"loss": ...})

`enabled=False` (the API's `progress=False`, the command lines' `--quiet`) gives a bar that
draws nothing.
"""
from __future__ import annotations

import sys
from typing import Callable, Iterable, Mapping

from tqdm import auto, std

# In a log file (stderr not a terminal): a line when a bar starts and ends, and between them at
# most one line per tenth of the total and per LOG_INTERVAL_S seconds (Keras' verbose=2 is one
# line per epoch; a bar per step would bury the log).
LOG_INTERVAL_S = 10.0
LOG_LINES = 10


class _Lines:
    """A file for tqdm that turns its carriage-return redraws into whole lines. The first one, the
    empty bar tqdm draws when it starts, is left out: the log line before says what starts."""

    encoding = "utf-8"

    def __init__(self, stream):
        self.stream, self.started = stream, False

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line and self.started:
            self.stream.write(line + "\n")
        self.started = self.started or bool(line)


class _LogBar(std.tqdm):
    """tqdm for a log file (`_Lines`): its last state printed once when it closes."""

    def close(self) -> None:
        if not self.disable and self.n == self.last_print_n:  # already printed: no second copy
            self.leave = False  # tqdm then only "clears" the line, which `_Lines` drops
        super().close()

    def flush(self) -> None:
        self.stream.flush()

    def __exit__(self, kind, value, traceback):
        if kind is not None:  # an error or an interrupt ends it: its own line says where and why
            self.leave = False
        return super().__exit__(kind, value, traceback)


def in_notebook() -> bool:
    """True inside a Jupyter kernel with widgets, where `tqdm.auto` draws an HTML bar."""
    return any(c.__module__ == "tqdm.notebook" for c in auto.tqdm.__mro__)


def progress_bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "",
        unit: str = "it", enabled: bool = True, **kwargs) -> std.tqdm:
    """A tqdm bar over `iterable` (or updated by hand up to `total`) on stderr, in the form that
    suits it: Jupyter widget, terminal bar, or log-file lines (see LOG_INTERVAL_S). Use it as a
    context manager (or close it) so its last state is shown. `enabled=False`: draws nothing."""
    if not enabled:
        return std.tqdm(iterable, total=total, disable=True)
    options = dict(total=total, desc=desc, unit=unit, dynamic_ncols=True, **kwargs)
    if in_notebook() or sys.stderr.isatty():
        return auto.tqdm(iterable, **options)
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    options.update(total=total, dynamic_ncols=False, ascii=True, leave=True, file=_Lines(sys.stderr),
                   mininterval=LOG_INTERVAL_S, miniters=max(1, int((total or 0) // LOG_LINES)))
    return _LogBar(iterable, **options)


def advance(progress: std.tqdm, n: float = 1, postfix: Callable[[], Mapping] | None = None) -> None:
    """Advance `progress` by `n`; `postfix()` (e.g. running loss and accuracy, which costs a
    device sync) is called only when the bar is about to redraw, and for its last step."""
    if postfix is not None and not progress.disable:
        now, last = progress._time(), progress.last_print_t
        due = (progress.n + n - progress.last_print_n >= (progress.miniters or 0)
               and now - last >= progress.mininterval)
        if due or (progress.total is not None and progress.n + n >= progress.total):
            progress.set_postfix(postfix(), refresh=False)
    progress.update(n)
