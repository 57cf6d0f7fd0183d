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


def truncate_streams(directory: str | Path, max_seq: int) -> int:
    """Cut every `<stream>.jsonl` under `directory` back to its lines with `log/seq` <= max_seq (and drop a partial
    last line): what a resume does before it continues from a snapshot taken at `max_seq`. Streams are append-only
    with increasing sequence numbers, so this keeps a prefix. Returns the number of lines removed."""
    import json

    from seqedit.io import atomic_write_text

    removed = 0
    for path in sorted(Path(directory).glob("*.jsonl")) if Path(directory).is_dir() else []:
        raw = path.read_bytes()
        keep: list[str] = []
        lines = raw.split(b"\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                seq = json.loads(line).get("log/seq")
            except ValueError:  # an interrupted last write
                removed += 1
                continue
            if seq is None or seq > max_seq:
                removed += 1
                continue
            keep.append(line.decode("utf-8") + "\n")
        text = "".join(keep)
        if text.encode("utf-8") != raw:
            atomic_write_text(path, text)
    return removed
