"""SIGTERM and Ctrl-C (SIGINT), handled in one place.

Outside training a program stops at once: `sigterm_raises()` makes SIGTERM raise `Stopped` in
the main thread (as SIGINT raises KeyboardInterrupt), the `finally` blocks on the way out
release locks and close files, and `stop_status` gives the one line and the exit status
(143 / 130: 128 + the signal number). While a trainer runs, `StopRequest` takes both signals
over: they finish the step, save a checkpoint and stop; a second Ctrl-C stops at once.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable

STOPPED_BY = {signal.SIGTERM: 143, signal.SIGINT: 130}  # 128 + the signal number


class Stopped(BaseException):
    """Raised in the main thread by SIGTERM (as KeyboardInterrupt is by SIGINT)."""


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_stopped(signum, frame):
    raise Stopped()


@contextmanager
def sigterm_raises():
    """SIGTERM raises Stopped in the main thread while the block runs (elsewhere: no change)."""
    old = signal.signal(signal.SIGTERM, _raise_stopped) if _in_main_thread() else None
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def stop_status(error: BaseException) -> tuple[int, str] | None:
    """(exit status, one line) of a program stopped by `error`; None if it is no stop."""
    if isinstance(error, Stopped):
        return STOPPED_BY[signal.SIGTERM], "stopped by SIGTERM; what was finished is kept " \
                                           "(rerun the same command to continue)"
    if isinstance(error, KeyboardInterrupt):
        return STOPPED_BY[signal.SIGINT], "interrupted; what was finished is kept (rerun the same command to continue)"
    return None


def exit_status(stopped_by: str | None) -> int:
    """The exit status of a run that a stop request ended: 130 after Ctrl-C, else 143."""
    return STOPPED_BY[signal.SIGINT if stopped_by == "SIGINT" else signal.SIGTERM]


class StopRequest:
    """While in the block (main thread only), SIGTERM and SIGINT only record themselves in `by`
    ("SIGTERM" / "SIGINT"), for the loop to finish the step, save and stop; a second Ctrl-C raises
    KeyboardInterrupt. `on_interrupt` is called at the first Ctrl-C. The previous handlers come back
    on leaving."""

    def __init__(self, on_interrupt: Callable[[], None] = lambda: None):
        self.by: str | None = None
        self.on_interrupt, self._old = on_interrupt, {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.by == "SIGINT":
            raise KeyboardInterrupt
        if name == "SIGINT" and self.by is None:
            self.on_interrupt()
        self.by = self.by or name

    def __enter__(self) -> "StopRequest":
        if _in_main_thread():
            self._old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}
