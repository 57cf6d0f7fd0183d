"""Snapshots of the touched parameters and the whole run state, RNG capture, and the run-directory lock.

A snapshot is a directory `snapshots/snap-<edits:08d>/` with `params.safetensors` (touched parameters only, never the
whole model), `extra.pt` (editor `state_dict`, RNG states, probe states) and `manifest.json` (cursor, run state,
sha256 of both files), written into a temporary directory and renamed into place: a kill leaves the old set of
snapshots or the new one. `latest_good` verifies manifests and checksums and falls back to the previous snapshot when
one is damaged. Keep-last-K plus milestones bound the disk use.
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import random
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from seqedit.io import atomic_write_json, file_sha256, fsync_dir

SNAP_PREFIX = "snap-"


class SnapshotError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# RNG


def capture_rng() -> dict[str, Any]:
    """python, numpy and torch (CPU + every CUDA device) generator states, in a torch.load(weights_only) safe form."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": _plain(random.getstate()),
        "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_rngs(seed: int, batch: int) -> None:
    """Reseed every global generator from (run seed, editor-call number) before each call: the random state an
    editor sees is then a function of the cursor alone, so a ledger replay past a snapshot continues exactly."""
    s = (seed * 1_000_003 + batch * 7_919 + 17) % (2**32)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)  # seeds CUDA devices too


def _plain(x: Any) -> Any:
    return [_plain(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


# ---------------------------------------------------------------------------------------------------------------
# Snapshots


@dataclass(frozen=True)
class Snapshot:
    path: Path
    manifest: Mapping[str, Any]

    @property
    def edits_done(self) -> int:
        return int(self.manifest["edits_done"])

    @property
    def next_batch(self) -> int:
        return int(self.manifest["next_batch"])

    def params(self) -> dict[str, torch.Tensor]:
        return st_load((self.path / "params.safetensors").read_bytes())

    def extra(self) -> dict[str, Any]:
        return torch.load(io.BytesIO((self.path / "extra.pt").read_bytes()), weights_only=True)


def snapshot_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "snapshots"


def write_snapshot(run_dir: Path, params: Mapping[str, torch.Tensor], extra: Mapping[str, Any],
                   manifest: Mapping[str, Any]) -> Snapshot:
    """Write one snapshot atomically. `manifest` must hold edits_done and next_batch; checksums are added here."""
    root = snapshot_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"{SNAP_PREFIX}{int(manifest['edits_done']):08d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    blobs = {
        "params.safetensors": st_save({k: v.detach().contiguous().cpu() for k, v in params.items()}),
        "extra.pt": _torch_bytes(extra),
    }
    for fname, blob in blobs.items():
        with open(tmp / fname, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
    files = {fname: {"sha256": file_sha256(tmp / fname), "bytes": len(blob)} for fname, blob in blobs.items()}
    atomic_write_json(tmp / "manifest.json", {**manifest, "files": files})
    if final.exists():  # the same cursor again (e.g. a stop right after a scheduled snapshot): replace it
        old = root / f".old-{name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    return Snapshot(final, json.loads((final / "manifest.json").read_text()))


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def verify_snapshot(path: Path) -> tuple[Snapshot | None, str | None]:
    """(snapshot, None) when the manifest and both files check out, else (None, what is wrong)."""
    mpath = path / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        int(manifest["edits_done"]), int(manifest["next_batch"])
    except FileNotFoundError:
        return None, f"snapshot {path.name}: manifest.json is missing"
    except (ValueError, KeyError, TypeError) as e:
        return None, f"snapshot {path.name}: manifest.json is unreadable ({e})"
    for fname, info in files.items():
        f = path / fname
        if not f.exists():
            return None, f"snapshot {path.name}: {fname} is missing"
        if f.stat().st_size != info["bytes"]:
            return None, f"snapshot {path.name}: {fname} is truncated ({f.stat().st_size} of {info['bytes']} bytes)"
        if file_sha256(f) != info["sha256"]:
            return None, f"snapshot {path.name}: {fname} fails its checksum"
    return Snapshot(path, manifest), None


def list_snapshots(run_dir: Path) -> list[Path]:
    root = snapshot_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(SNAP_PREFIX)),
                  key=lambda p: int(p.name[len(SNAP_PREFIX):]))


def latest_good(run_dir: Path, max_batch: int | None = None,
                report: Callable[[str], None] | None = None) -> Snapshot | None:
    """The newest snapshot that verifies and whose cursor is at most `max_batch` (the ledger's length); damaged
    ones are reported and skipped, in favour of the previous good one."""
    for path in reversed(list_snapshots(run_dir)):
        snap, problem = verify_snapshot(path)
        if snap is None:
            if report:
                report(problem + "; using an earlier snapshot")
            continue
        if max_batch is not None and snap.next_batch > max_batch:
            if report:
                report(f"snapshot {path.name} is ahead of the verified ledger ({snap.next_batch} > {max_batch} "
                       "calls); using an earlier snapshot")
            continue
        return snap
    return None


def prune(run_dir: Path, keep_last: int, is_milestone: Callable[[int], bool]) -> list[Path]:
    """Delete snapshots beyond the newest `keep_last`, except milestones; leftovers of interrupted writes too."""
    root = snapshot_dir(run_dir)
    removed = []
    for p in root.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    snaps = list_snapshots(run_dir)
    for p in snaps[: max(0, len(snaps) - keep_last)]:
        if not is_milestone(int(p.name[len(SNAP_PREFIX):])):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------------------------------
# The run-directory lock: one live process per run directory


class RunLocked(RuntimeError):
    pass


class RunLock:
    """An exclusive, non-blocking flock on `<run_dir>/.lock`, held for the life of the process's work on the run.
    The kernel drops it when the process dies (SIGKILL included), so a stale lock never blocks a resume."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 100).decode(errors="replace").strip()
            finally:
                os.close(fd)
            raise RunLocked(f"run directory {self.path.parent} is in use by another process ({holder or 'unknown'})"
                            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @staticmethod
    def is_locked(run_dir: Path) -> bool:
        path = Path(run_dir) / ".lock"
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False
