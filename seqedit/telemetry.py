"""Metric sinks. Local JSONL per stream is the source of truth (append-only, flushed per record, readable while the
run goes on); wandb and the console are views.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any, Protocol

from seqedit.io import dumps_line


class Sink(Protocol):
    def log(self, stream: str, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One append-only file per stream under `<run_dir>/telemetry/<stream>.jsonl`."""

    def __init__(self, directory: str | Path, fsync_every: int = 50) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fsync_every = fsync_every
        self._files: dict[str, IO[str]] = {}
        self._since_sync = 0

    def path(self, stream: str) -> Path:
        return self.directory / f"{stream}.jsonl"

    def log(self, stream: str, record: dict[str, Any]) -> None:
        f = self._files.get(stream)
        if f is None:
            f = self._files[stream] = open(self.path(stream), "a", encoding="utf-8")
        f.write(dumps_line(record))
        f.flush()
        self._since_sync += 1
        if self._since_sync >= self.fsync_every:
            self.sync()

    def sync(self) -> None:
        for f in self._files.values():
            os.fsync(f.fileno())
        self._since_sync = 0

    def close(self) -> None:
        self.sync()
        for f in self._files.values():
            f.close()
        self._files.clear()
