"""Run directories from the outside: find the one to resume, report status, export the edited model at any
committed edit (base model + ledger). Nothing here runs the loop; the driver does.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from seqedit.checkpoint import RunLock, list_snapshots
from seqedit.config import RunConfig, load_config
from seqedit.driver import RunError, RunState, default_cache_dir
from seqedit.io import atomic_write_json, file_sha256, read_jsonl
from seqedit.ledger import Ledger

LIVE_STATES = ("created", "running", "finalizing")


def candidates(cfg: RunConfig) -> list[Path]:
    """The run directories of this config's run id (<run_id>, <run_id>-r2, ...), oldest first."""
    root = Path(cfg.runs_dir)
    out = []
    if (root / cfg.run_id).is_dir():
        out.append(root / cfg.run_id)
    prefix = f"{cfg.run_id}-r"
    more = [p for p in root.glob(f"{cfg.run_id}-r*") if p.is_dir() and p.name[len(prefix):].isdigit()]
    out.extend(sorted(more, key=lambda p: int(p.name[len(prefix):])))
    return [p for p in out if (p / "state.json").is_file()]


def find_resumable(cfg: RunConfig) -> Path | None:
    """The newest run directory of this config (what a requeued job continues), or None for a first start."""
    found = candidates(cfg)
    return found[-1] if found else None


def resume_config(run_dir: Path, overrides: list[str] = ()) -> RunConfig:
    """The config a run directory was started with, with `overrides` applied (checked by the driver: only
    resume-safe keys may differ)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a seqedit run directory (no config.yaml)")
    return load_config(path, overrides)


@dataclass(frozen=True)
class RunStatus:
    run_dir: Path
    state: str
    edits_done: int
    total: int
    heartbeat_age_s: float | None
    last_snapshot: int | None
    alerts: int
    last_alert: str
    eta_s: float | None
    message: str

    def row(self) -> list[str]:
        age = f"{self.heartbeat_age_s:.0f}s" if self.heartbeat_age_s is not None else "-"
        eta = f"{self.eta_s:.0f}s" if self.eta_s is not None and self.state == "running" else "-"
        snap = str(self.last_snapshot) if self.last_snapshot is not None else "-"
        return [self.run_dir.name, self.state, f"{self.edits_done}/{self.total}", age, snap,
                f"{self.alerts}" + (f" ({self.last_alert})" if self.last_alert else ""), eta, self.message[:60]]


def run_status(run_dir: Path) -> RunStatus:
    run_dir = Path(run_dir)
    state = RunState.load(run_dir)
    status = state.status
    if status in LIVE_STATES and not RunLock.is_locked(run_dir):
        status = f"{status}?"  # says running but no process holds the run: killed; `seqedit resume` continues it
    try:
        total = int(resume_config(run_dir).n_edits)
    except Exception:  # noqa: BLE001 - a status table must not fail on one bad directory
        total = -1
    beat_path = run_dir / "heartbeat.json"
    beat = json.loads(beat_path.read_text()) if beat_path.is_file() else {}
    age = time.time() - beat["time"] if "time" in beat else None
    alerts = read_jsonl(run_dir / "telemetry" / "alerts.jsonl")
    snaps = list_snapshots(run_dir)
    ledger = Ledger.open(run_dir / "ledger", verify=False, readonly=True)
    done = ledger.records[-1].edit_index if ledger.records else 0  # committed edits: ahead of state.json after a kill
    return RunStatus(run_dir, status, max(done, state.edits_done), total, age,
                     int(snaps[-1].name.split("-")[1]) if snaps else None, len(alerts),
                     alerts[-1]["alert/kind"] if alerts else "", beat.get("eta_s"), state.message)


def format_status(rows: list[RunStatus]) -> str:
    header = ["run", "state", "edits", "heartbeat", "snapshot", "alerts", "eta", "message"]
    table = [header] + [r.row() for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table)


def export(run_dir: Path, out: Path, at_edit: int | None = None,
           progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the edited model at committed edit `at_edit` (default: the last committed one) to `out` with
    `save_pretrained`: the base model plus the ledger's records up to that edit, each added exactly as in the run."""
    from seqedit.apply import apply_added
    from seqedit.editors.base import make_editor
    from seqedit.model_io import load_model, model_fingerprint

    say = progress or (lambda msg: None)
    run_dir, out = Path(run_dir), Path(out)
    cfg = resume_config(run_dir)
    state = RunState.load(run_dir)
    ledger = Ledger.open(run_dir / "ledger", readonly=True)  # verified; the run may still be live
    committed = [0] + [r.edit_index for r in ledger.records]
    target = committed[-1] if at_edit is None else int(at_edit)
    if target not in committed:
        below = max((c for c in committed if c < target), default=None)
        above = min((c for c in committed if c > target), default=None)
        near = ", ".join(str(c) for c in (below, above) if c is not None)
        raise RunError(f"--at-edit {target}: not a committed edit index of {run_dir} (committed: 0..{committed[-1]} "
                       f"in steps of batch_size={cfg.batch_size}; nearest: {near})")
    if out.exists() and any(out.iterdir()):
        raise RunError(f"--out {out} exists and is not empty; give a new directory")
    if ledger.problems:
        say("\n".join(ledger.problems))
    loaded = load_model(cfg.model, cache_dir=default_cache_dir(cfg.cache_dir), progress=say)
    model = loaded.model
    declared = make_editor(cfg.editor.name, cfg.editor.options).params(model)
    base = model_fingerprint(model, declared)
    if state.base_fingerprint and base != state.base_fingerprint:
        raise RunError(f"the base model {cfg.model.name!r} is not the one the run edited (touched parameters hash "
                       f"{base[:12]}, the run recorded {state.base_fingerprint[:12]})")
    calls = rejected = 0
    for rec in ledger.records:
        if rec.edit_index > target:
            break
        if rec.status == "applied":
            apply_added(model, ledger.read(rec.batch))
            calls += 1
        else:
            rejected += 1
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(out)
    info = {
        "run_dir": str(run_dir), "run_id": state.run_id, "config_hash": state.config_hash, "at_edit": target,
        "calls_applied": calls, "calls_rejected": rejected, "base_model": cfg.model.name,
        "base_fingerprint": base, "edited_params": declared, "weights_sha256": model_fingerprint(model, declared),
        "files": {p.name: file_sha256(p) for p in sorted(out.iterdir()) if p.is_file()},
    }
    atomic_write_json(out / "export.json", info)
    return info
