"""Graceful stop between edits: SIGTERM, SIGUSR2 (Slurm/submitit's pre-timeout signal) and SIGINT set a flag that the
driver checks after each editor call, so the run stops at an edit boundary with its state saved ("preempted") instead
of dying mid-write. A second SIGINT falls through to KeyboardInterrupt. Handlers are only installed in the main
thread and restored on exit.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR2", None), signal.SIGINT) if s)


class StopRequested(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(f"stop requested by {signal.Signals(signum).name}")
        self.signum = signum


class GracefulStop:
    def __init__(self) -> None:
        self.signum: int | None = None

    def check(self) -> None:
        if self.signum is not None:
            raise StopRequested(self.signum)


@contextlib.contextmanager
def graceful_stop() -> Iterator[GracefulStop]:
    stop = GracefulStop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if signum == signal.SIGINT and stop.signum is not None:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        stop.signum = signum

    previous = {s: signal.getsignal(s) for s in SIGNALS}
    try:
        for s in SIGNALS:
            signal.signal(s, handler)
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
