"""Ctrl-C and SIGTERM as exceptions that cleanup code sees, deferred around writes that must not be
cut (other threads' writes, a rename and its record), never lost, and the one-line end with status
130 / 143 of a command they interrupt (`command`, `run_command`).

Each signal is recorded when it arrives. It raises `Interrupted` at once, unless deferred
(`signals_deferred`) or while an earlier one is still unwinding (cleanup is not cut short); a
recorded one raises at the next safe point (`check`). Python swallows a KeyboardInterrupt raised
inside a gc callback (JAX's `_xla_gc_callback`: "Exception ignored in ..."): that one is recorded
too, so the write it should have stopped is stopped before its rename.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator, NoReturn

from vggjax.utils import temps


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, as an exception that cleanup code sees like Ctrl-C; `status` is the
    exit status a command reports for it (130 or 143); `written`, an output that was completed
    (renamed into place) before the interrupt took effect, else None."""

    def __init__(self, signum: int, written: Path | None = None):
        super().__init__(signal.Signals(signum).name)
        self.status = 128 + signum
        self.written = written


class _State:
    depth = 0  # nested `handling` blocks
    deferred = 0  # nested `signals_deferred` blocks
    unwinding = False  # an Interrupted was raised and not swallowed
    pending: list[int] = []  # signals received and not yet acted on
    previous: dict = {}  # handlers and hooks to put back
    process = None  # the `handling` block of a command (`command`)
    message: str | None = None  # a command's "error: interrupted; <message>" (`command`)


def _handler(signum, frame):
    _State.pending.append(signum)
    if not (_State.deferred or _State.unwinding):
        _State.unwinding = True
        raise Interrupted(signum)


def _unraisable(unraisable):
    if _State.depth and isinstance(unraisable.exc_value, KeyboardInterrupt):
        _State.unwinding = False  # swallowed: `check` raises it at the next safe point
        return
    _State.previous["unraisablehook"](unraisable)


def check() -> None:
    """Raise Interrupted for a signal received and not acted on (deferred, or swallowed)."""
    if _State.pending and threading.current_thread() is threading.main_thread():
        _State.unwinding = True
        raise Interrupted(_State.pending[0])


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Within the block, SIGTERM raises Interrupted (exit status 143) so the cleanup above runs,
    as Ctrl-C does, and interrupts are recorded as the module docstring says. Handlers that are
    not Python's defaults (a notebook's) are left alone. Signal handlers live in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _State.depth == 0:
        _State.previous = {"unraisablehook": sys.unraisablehook}
        for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            if signal.getsignal(sig) == default:
                _State.previous[sig] = signal.signal(sig, _handler)
                # SA_RESTART: a system call that the signal lands in (any thread's: TensorStore's
                # reads) resumes instead of failing with EINTR, which C++ libraries report as a
                # damaged file ("initialization failed"). Python retries its own calls anyway.
                signal.siginterrupt(sig, False)
        sys.unraisablehook = _unraisable
    _State.depth += 1
    try:
        yield
    finally:
        _State.depth -= 1
        if _State.depth == 0:
            for sig in (signal.SIGINT, signal.SIGTERM):
                if sig in _State.previous:
                    signal.signal(sig, _State.previous[sig])
            if sys.unraisablehook is _unraisable:
                sys.unraisablehook = _State.previous["unraisablehook"]
            _State.pending.clear()
            _State.unwinding = False


@contextlib.contextmanager
def signals_deferred(written: Path | None = None) -> Iterator[None]:
    """SIGINT and SIGTERM that arrive within the block take effect when it ends (Interrupted,
    with `written`: what the block completed, for the message).

    For writes done by other threads (Orbax, TensorStore): interrupting the main thread while
    they run lets Python exit under them ("terminate called", "Event loop is closed", thread
    tracebacks) and leaves their files behind. A few seconds' delay is the price of a clean exit.
    """
    if threading.current_thread() is not threading.main_thread():  # signals reach the main one only
        yield
        return
    with handling():  # also over a notebook's own handlers, for the block
        replaced = {sig: signal.signal(sig, _handler) for sig in (signal.SIGINT, signal.SIGTERM)
                    if signal.getsignal(sig) is not _handler}
        _State.deferred += 1
        try:
            yield
        finally:
            _State.deferred -= 1
            for sig, handler in replaced.items():
                signal.signal(sig, handler)
        if _State.pending and not _State.deferred:
            _State.unwinding = True
            raise Interrupted(_State.pending[0], written)


def command(interrupted: str) -> None:
    """Make this process a vggjax command: call first in its `__main__` block, before the imports
    that take seconds (JAX), so that Ctrl-C or SIGTERM at any instant ends it with one line,
    "error: interrupted; <interrupted>", and status 130 / 143 (one during the imports takes
    effect as `run_command` starts); remove the temporaries that killed vggjax processes left
    (`temps.sweep`)."""
    _State.message = interrupted
    previous_hook = sys.excepthook

    def excepthook(kind, value, traceback):  # an interrupt outside `run_command` (an import)
        if isinstance(value, KeyboardInterrupt):
            _end(getattr(value, "status", 130))
        previous_hook(kind, value, traceback)

    sys.excepthook = excepthook
    if _State.depth == 0:  # for the life of the process (kept: collecting it would end it)
        _State.process = handling()
        _State.process.__enter__()
        # Deferred until `run_command` starts: an exception raised inside an extension module's
        # initialisation (JAX's, TensorFlow's) can crash the interpreter (SIGSEGV) before any line.
        _State.deferred += 1
    temps.sweep()


def run_command(main: Callable[[], int], interrupted: str) -> NoReturn:
    """End the process with the status `main()` returns: a command's `__main__`.

    Ctrl-C or SIGTERM that `main` leaves uncaught prints "error: interrupted; <interrupted>" (one
    line; or, when it came as an output was completed, that it was) and gives status 130 / 143,
    as does one that arrives after `main` returned (then saying that its output is complete).
    After an interrupt the process ends without the interpreter's shutdown (os._exit): an XLA
    compilation the interrupt cut short can crash that (SIGSEGV) after the message. Files are
    complete or removed by then (`atomic.writing`, `temps.remove_mine`).
    """
    command(interrupted)
    status = None
    try:
        if _State.process is not None and _State.deferred:  # the imports are done
            _State.deferred -= 1
            check()
        status = main()
        _State.unwinding = True  # from here a signal is only recorded: the work is done
        if status != 0 and _State.pending:  # it failed and said so, as the signal came
            _end(128 + _State.pending[0], message=False)
        # Ignored from here: Python's shutdown would reset vggjax's handlers to the default, under
        # which SIGTERM kills silently (-15). What came before is acted on below.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        check()
    except KeyboardInterrupt as err:
        _State.unwinding = True
        if getattr(err, "written", None) is not None:
            _State.message = f"{err.written} was complete before it stopped"
        elif status is not None:
            _State.message = "what it printed above is complete"
        _end(getattr(err, "status", 130))
    if status in (130, 143):
        _end(status, message=False)
    sys.exit(status)


def _end(status: int, message: bool = True) -> NoReturn:
    if message:
        print(f"error: interrupted; {_State.message}", file=sys.stderr)
    temps.remove_mine()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
