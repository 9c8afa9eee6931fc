"""Ctrl-C and SIGTERM as exceptions that cleanup code sees, deferred around other threads' writes,
and the one-line end with status 130 / 143 of a command they interrupt (`run_command`)."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator, NoReturn


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, as an exception that cleanup code sees like Ctrl-C; `status` is the
    exit status a command reports for it (130 or 143)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.status = 128 + signum


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises Interrupted (exit status 143) so the cleanup above runs;
    Ctrl-C already raises KeyboardInterrupt. Signal handlers live in the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        raise Interrupted(signum)

    if previous == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        if previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive within the block take effect when it ends (Interrupted).

    For writes done by other threads (Orbax, TensorStore): interrupting the main thread while
    they run lets Python exit under them ("terminate called", SIGABRT, thread tracebacks) and
    leaves their files behind. A few seconds' delay is the price of a clean exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if pending:
        raise Interrupted(pending[0])


def run_command(main: Callable[[], int], interrupted: str) -> NoReturn:
    """End the process with the status `main()` returns: a command's `__main__`.

    Ctrl-C or SIGTERM that `main` leaves uncaught prints "error: interrupted; <interrupted>" (one
    line) and gives status 130 / 143. After an interrupt the process ends without the
    interpreter's shutdown (os._exit): an XLA compilation the interrupt cut short can crash that
    (SIGSEGV) after the message. Files are complete or removed by then (`writing`).
    """
    try:
        with sigterm_interrupts():
            status = main()
    except KeyboardInterrupt as err:
        print(f"error: interrupted; {interrupted}", file=sys.stderr)
        status = getattr(err, "status", 130)
    if status in (130, 143):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
