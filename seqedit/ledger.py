"""The edit ledger: every editor call's applied change, append-only and checksummed, so that the base model plus the
ledger rebuilds the edited weights bit for bit at any committed edit (resume, `seqedit export --at-edit N`).

Layout under `<run_dir>/ledger/`:
    shard-00000.bin, ...   records appended back to back; each record is one safetensors blob of the tensors that
                           reproduce the added delta (low-rank factors when they reproduce it exactly, else dense)
    index.jsonl            one line per record: batch, edit index, request ids, status, shard, offset, nbytes,
                           sha256, per-parameter encoding, and the update norm (the spike detector's history)

Commit order: bytes to the shard -> fsync -> index line -> fsync. A record is committed once its index line is durable;
a kill before that leaves trailing shard bytes or a partial index line, which `open` cuts away. A record whose bytes
do not match its checksum ends the usable ledger there: it and every later record are cut, and the caller re-computes
from the last good point.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from seqedit.apply import materialise
from seqedit.io import atomic_write_text, dumps_line

SHARD_BYTES = 256 * 2**20  # a new shard after this many bytes: a damaged file loses at most one shard's tail


class LedgerError(RuntimeError):
    pass


@dataclass(frozen=True)
class LedgerRecord:
    """One index line. `params[name]` = {"kind": "factors" | "dense", "dtype": ..., "shape": [...]}."""

    batch: int
    edit_index: int  # stream position after this call (the `edit/index` of its telemetry)
    case_ids: tuple[str, ...]
    status: str  # applied | rejected
    shard: int
    offset: int
    nbytes: int
    sha256: str
    norm: float  # max ‖ΔW‖_F over the touched parameters (0 for a rejected call)
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    reason: str = ""  # why a call was rejected by the guard
    stats: Mapping[str, float] = field(default_factory=dict)  # the editor's diagnostics (replayed into telemetry)
    seconds: float = 0.0  # the editor call's wall time

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "LedgerRecord":
        return cls(**{**d, "case_ids": tuple(d["case_ids"])})


def encode(added: Mapping[str, torch.Tensor],
           factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The tensors to store for one call: per parameter the factors when `materialise` reproduces the added tensor
    bit for bit and they are smaller, else the dense added tensor itself."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict[str, Any]] = {}
    for name, a in added.items():
        f = (factors or {}).get(name)
        info = {"dtype": str(a.dtype).removeprefix("torch."), "shape": list(a.shape)}
        if f is not None and f[0].numel() + f[1].numel() < a.numel():
            left, right = (t.detach() for t in f)
            if torch.equal(materialise(left, right, a.dtype).to(a.device), a):
                tensors[f"{name}::left"] = left.contiguous().cpu()
                tensors[f"{name}::right"] = right.contiguous().cpu()
                meta[name] = {"kind": "factors", **info}
                continue
        tensors[f"{name}::dense"] = a.detach().contiguous().cpu()
        meta[name] = {"kind": "dense", **info}
    return tensors, meta


def decode(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """The added tensors of one record (CPU), exactly as they were added."""
    return decode_with_factors(tensors, meta)[0]


def decode_with_factors(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Mapping[str, Any]]
                        ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(added tensors, the factors of the parameters stored as factors)."""
    out, factors = {}, {}
    for name, info in meta.items():
        dtype = getattr(torch, info["dtype"])
        if info["kind"] == "factors":
            factors[name] = (tensors[f"{name}::left"], tensors[f"{name}::right"])
            out[name] = materialise(*factors[name], dtype)
        else:
            out[name] = tensors[f"{name}::dense"]
        if list(out[name].shape) != list(info["shape"]):
            raise LedgerError(f"ledger record for {name!r}: shape {list(out[name].shape)}, index says {info['shape']}")
    return out, factors


def _fsync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


class Ledger:
    """Append-only ledger of one run. `open` verifies what is on disk and cuts damage; `append` commits one call."""

    def __init__(self, directory: str | Path, fsync: bool = True) -> None:
        self.dir = Path(directory)
        self.fsync = fsync
        self.records: list[LedgerRecord] = []
        self.problems: list[str] = []  # what `open` found and cut (reported by the caller)
        self._shard: int = 0
        self._shard_size: int = 0

    # -- reading -------------------------------------------------------------------------------------------------

    @property
    def index_path(self) -> Path:
        return self.dir / "index.jsonl"

    def shard_path(self, k: int) -> Path:
        return self.dir / f"shard-{k:05d}.bin"

    @classmethod
    def open(cls, directory: str | Path, fsync: bool = True, verify: bool = True,
             readonly: bool = False) -> "Ledger":
        """Read the index, verify every record's checksum (when `verify`) and cut the ledger at the first record that
        is missing, truncated or corrupt; trailing bytes of an interrupted append are cut too. `readonly` (export,
        status: the run may be live) keeps the good prefix in memory and changes no file."""
        led = cls(directory, fsync)
        if readonly and not led.dir.is_dir():
            return led
        led.dir.mkdir(parents=True, exist_ok=True)
        lines = led.index_path.read_bytes().split(b"\n") if led.index_path.exists() else []
        good: list[LedgerRecord] = []
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            try:
                rec = LedgerRecord.from_json(json.loads(raw))
            except (ValueError, KeyError, TypeError):
                if i != len(lines) - 1:  # a partial last line is an interrupted append, not damage
                    led.problems.append(f"ledger index {led.index_path}: line {i + 1} unreadable; the ledger is cut there")
                break
            expected_batch = good[-1].batch + 1 if good else 0
            if rec.batch != expected_batch:
                led.problems.append(f"ledger index {led.index_path}: line {i + 1} holds batch {rec.batch}, expected "
                                    f"{expected_batch}; the ledger is cut there")
                break
            if verify:
                problem = led._check(rec)
                if problem:
                    led.problems.append(problem + "; this record and every later one are dropped")
                    break
            good.append(rec)
        if readonly:
            led.records = good
        else:
            led._cut(good)
        return led

    def _check(self, rec: LedgerRecord) -> str | None:
        if rec.nbytes == 0:  # a rejected call stores no tensors (and may precede the first shard)
            return None if rec.sha256 == hashlib.sha256(b"").hexdigest() else (
                f"ledger record of batch {rec.batch}: empty record with a non-empty checksum")
        path = self.shard_path(rec.shard)
        try:
            with open(path, "rb") as f:
                f.seek(rec.offset)
                blob = f.read(rec.nbytes)
        except FileNotFoundError:
            return f"ledger record of batch {rec.batch}: shard {path.name} is missing"
        if len(blob) != rec.nbytes:
            return f"ledger record of batch {rec.batch}: shard {path.name} is truncated ({len(blob)} of {rec.nbytes} bytes)"
        if hashlib.sha256(blob).hexdigest() != rec.sha256:
            return f"ledger record of batch {rec.batch}: checksum mismatch in {path.name} at offset {rec.offset}"
        return None

    def _cut(self, good: list[LedgerRecord]) -> None:
        """Make the files hold exactly `good`: rewrite the index if it had more, truncate shard tails, drop shards."""
        self.records = good
        text = "".join(dumps_line(r.to_json()) for r in good)
        if not self.index_path.exists() or self.index_path.read_text(errors="replace") != text:
            atomic_write_text(self.index_path, text)
        last = good[-1] if good else None
        self._shard = last.shard if last else 0
        self._shard_size = last.offset + last.nbytes if last else 0
        for path in sorted(self.dir.glob("shard-*.bin")):
            k = int(path.stem.split("-")[1])
            if k > self._shard:
                path.unlink()
            elif k == self._shard and path.stat().st_size > self._shard_size:
                with open(path, "r+b") as f:
                    f.truncate(self._shard_size)
                    _fsync(f)

    def __len__(self) -> int:
        return len(self.records)

    def read(self, batch: int) -> dict[str, torch.Tensor]:
        """The added tensors of call `batch` (CPU), verified against the checksum."""
        return self.read_with_factors(batch)[0]

    def read_with_factors(self, batch: int
                          ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """(added tensors, stored factors) of call `batch` (CPU); the replay uses the factors for telemetry exactly
        as the live call did."""
        rec = self.records[batch]
        if rec.status != "applied":
            return {}, {}
        with open(self.shard_path(rec.shard), "rb") as f:
            f.seek(rec.offset)
            blob = f.read(rec.nbytes)
        if hashlib.sha256(blob).hexdigest() != rec.sha256:
            raise LedgerError(f"ledger record of batch {batch}: checksum mismatch (the ledger changed while reading)")
        return decode_with_factors(st_load(blob), rec.params)

    def sync(self) -> None:
        """fsync the current shard and the index (before a snapshot that says these records exist)."""
        for path in (self.shard_path(self._shard), self.index_path):
            if path.exists():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.records) + (self.index_path.stat().st_size if self.index_path.exists() else 0)

    # -- writing -------------------------------------------------------------------------------------------------

    def append(self, batch: int, edit_index: int, case_ids: Sequence[str], added: Mapping[str, torch.Tensor],
               factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None, *, norm: float,
               status: str = "applied", reason: str = "", stats: Mapping[str, float] | None = None,
               seconds: float = 0.0) -> LedgerRecord:
        if batch != len(self.records):
            raise LedgerError(f"ledger append of batch {batch}, but {len(self.records)} records are committed")
        tensors, meta = encode(added, factors) if status == "applied" else ({}, {})
        blob = st_save(tensors) if tensors else b""
        if self._shard_size and self._shard_size + len(blob) > SHARD_BYTES:
            if not self.fsync:
                self.sync()  # the finished shard reaches the disk before records go to the next one
            self._shard, self._shard_size = self._shard + 1, 0
        offset = self._shard_size
        if blob:
            with open(self.shard_path(self._shard), "ab") as f:
                if f.tell() != offset:  # never append after bytes the index does not know
                    f.truncate(offset)
                f.write(blob)
                if self.fsync:
                    _fsync(f)
                else:
                    f.flush()
        rec = LedgerRecord(batch, edit_index, tuple(case_ids), status, self._shard, offset, len(blob),
                           hashlib.sha256(blob).hexdigest(), float(norm), meta, reason,
                           {k: float(v) for k, v in (stats or {}).items()}, float(seconds))
        with open(self.index_path, "a", encoding="utf-8") as f:
            f.write(dumps_line(rec.to_json()))
            if self.fsync:
                _fsync(f)
            else:
                f.flush()
        self._shard_size += len(blob)
        self.records.append(rec)
        return rec
