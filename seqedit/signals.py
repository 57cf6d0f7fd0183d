"""Graceful stop: SIGTERM, SIGUSR1, SIGUSR2 (Slurm's `--signal` pre-timeout warning) and SIGINT set a flag that the
driver checks at every safe point (between edits, between probes, in start-up, between final-scoring chunks), so a
run stops with its state saved ("preempted") instead of dying mid-write. A second SIGINT falls through to
KeyboardInterrupt. Handlers are only installed in the main thread and restored on exit.

Under submitit (`SUBMITIT_EXECUTOR` set) the handlers stand down: submitit's own SIGUSR2/SIGTERM handling checkpoints
and requeues the job, and the requeued job resumes from the ledger. A cluster plugin that wants the loop to stop at
the next safe point instead (e.g. from a `Checkpointable.checkpoint()`) calls `request_stop()`.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None),
                            getattr(signal, "SIGUSR2", None), signal.SIGINT) if s)
SUBMITIT_OWNED = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR2", None)) if s)


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


_ACTIVE: list[GracefulStop] = []


def request_stop(signum: int = signal.SIGUSR2) -> bool:
    """Ask the running loop (if any) to stop at its next safe point, as if `signum` had arrived. True if a run
    was listening."""
    if not _ACTIVE:
        return False
    _ACTIVE[-1].signum = signum
    return True


def under_submitit() -> bool:
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


@contextlib.contextmanager
def graceful_stop() -> Iterator[GracefulStop]:
    stop = GracefulStop()
    _ACTIVE.append(stop)
    try:
        if threading.current_thread() is not threading.main_thread():
            yield stop
            return

        def handler(signum, frame):
            if signum == signal.SIGINT and stop.signum is not None:
                raise KeyboardInterrupt  # second Ctrl-C: stop now
            stop.signum = signum

        ours = [s for s in SIGNALS if not (under_submitit() and s in SUBMITIT_OWNED)]
        previous = {s: signal.getsignal(s) for s in ours}
        try:
            for s in ours:
                signal.signal(s, handler)
            yield stop
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
    finally:
        _ACTIVE.remove(stop)
