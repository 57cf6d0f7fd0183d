"""The sequential-editing loop, top to bottom. `run(cfg)` is the whole job:

    config -> run dir -> model (+ world) -> edit stream -> editor.prepare
    for each batch: editor.compute -> apply -> weight telemetry -> immediate scores -> JSONL
    -> summary.json

Every side effect is visible here; probes, telemetry and sinks are small modules this file calls.
All run state lives in `RunState` so it can be saved and restored whole.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from seqedit.apply import NonFiniteDeltaError, apply_proposal
from seqedit.config import RunConfig, dump_yaml
from seqedit.io import atomic_write_json, atomic_write_text
from seqedit.metrics import evaluate_requests, mean_of
from seqedit.telemetry import JsonlSink
from seqedit.types import EditRequest
from seqedit.weights import WeightTracker

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    pass


def default_cache_dir(configured: str | None = None) -> Path:
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("SEQEDIT_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "seqedit"


@dataclass
class RunState:
    """Everything a resumed run needs besides the weights; saved as state.json."""

    run_id: str
    config_hash: str
    status: str = "created"  # created | running | finished | failed | preempted
    next_batch: int = 0
    edits_done: int = 0
    log_seq: int = 0  # sequence number of the last telemetry record
    message: str = ""
    started_at: float = field(default_factory=time.time)
    editor_state: dict[str, Any] = field(default_factory=dict)

    def save(self, run_dir: Path) -> None:
        atomic_write_json(run_dir / "state.json", dataclasses.asdict(self))


@dataclass(frozen=True)
class RunSummary:
    run_dir: Path
    run_id: str
    status: str
    n_edits: int
    seconds: float
    metrics: dict[str, float | None]


def make_run_dir(cfg: RunConfig) -> Path:
    """runs/<run_id>; an existing directory is never overwritten: a suffix -r2, -r3... is added instead."""
    root = Path(cfg.runs_dir)
    base = root / cfg.run_id
    candidate, k = base, 1
    while candidate.exists():
        k += 1
        candidate = root / f"{cfg.run_id}-r{k}"
    candidate.mkdir(parents=True)
    return candidate


def load_stream(cfg: RunConfig, loaded) -> tuple[list[EditRequest], dict[str, Any]]:
    from seqedit.data import load_requests, order_requests

    if cfg.data.source == "world":
        if loaded.world is None:
            raise RunError("data.source=world needs a world model (model.name=world:<preset>); "
                           f"model.name is {cfg.model.name!r}: set data.source to a CounterFact/zsRE file")
        source, fmt = str(loaded.world.counterfact_path), "counterfact"
    else:
        source, fmt = cfg.data.source, cfg.data.format
    result = load_requests(source, format=fmt, on_error=cfg.data.on_error)
    ordered = order_requests(result.requests, seed=cfg.data.seed, shuffle=cfg.data.shuffle, start=cfg.data.start,
                             stop=cfg.data.stop, unique_subjects=cfg.data.unique_subjects)
    if len(ordered) < cfg.n_edits:
        raise RunError(f"n_edits={cfg.n_edits} but the data stream from {source} holds only {len(ordered)} requests")
    info = {"source": source, "format": result.format, "available": len(ordered), "skipped": len(result.skipped)}
    return list(ordered[: cfg.n_edits]), info


def run(cfg: RunConfig, progress: Callable[[str], None] | None = None) -> RunSummary:
    say = progress or (lambda msg: None)
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    cache_dir = default_cache_dir(cfg.cache_dir)

    # -- run directory and resolved config --------------------------------------------------------------------
    run_dir = make_run_dir(cfg)
    atomic_write_text(run_dir / "config.yaml", f"# config_hash: {cfg.config_hash()}\n" + dump_yaml(cfg))
    state = RunState(run_id=run_dir.name, config_hash=cfg.config_hash())
    state.save(run_dir)
    say(f"run dir: {run_dir}")

    # -- model, data, editor ---------------------------------------------------------------------------------
    from seqedit.editors.base import EditorContext, make_editor
    from seqedit.model_io import load_model

    loaded = load_model(cfg.model, cache_dir=cache_dir, progress=say)
    model, tok = loaded.model, loaded.tokenizer
    stream, data_info = load_stream(cfg, loaded)
    atomic_write_json(run_dir / "data.json", {**data_info, "case_ids": [r.case_id for r in stream]})
    editor = make_editor(cfg.editor.name, cfg.editor.options)
    stats_text = (loaded.world.heldout_path,) if loaded.world is not None else ()
    ctx = EditorContext(arch=loaded.arch, seed=cfg.seed, run_dir=run_dir, cache_dir=cache_dir / "stats",
                        stats_text=stats_text)
    editor.prepare(model, tok, ctx)
    declared = editor.params(model)
    say(f"model {loaded.name} ({loaded.arch.name}), editor {editor.name} on {declared}, {len(stream)} edits")

    sink = JsonlSink(run_dir / "telemetry")
    tracker = WeightTracker()
    tracker.remember(model, declared)
    score = dict(paraphrase=cfg.eval.paraphrase, neighborhood=cfg.eval.neighborhood, batch_size=cfg.eval.batch_size)

    # -- pre-edit baseline of every request in the stream (what "unedited" scores look like) ----------------
    pre = evaluate_requests(model, tok, stream, **score)
    baseline = {f"pre/{k}": mean_of(pre, k) for k in ("efficacy", "paraphrase", "neighborhood", "prob_new")}
    sink.log("probes", {"edit/index": 0, "probe/name": "baseline", **baseline})

    # -- the loop ------------------------------------------------------------------------------------------------
    batches = [stream[i : i + cfg.batch_size] for i in range(0, len(stream), cfg.batch_size)]
    immediate: list = []
    state.status = "running"
    state.save(run_dir)
    bar = _progress_bar(len(stream))
    try:
        for b in range(state.next_batch, len(batches)):
            batch = batches[b]
            t0 = time.perf_counter()
            proposal = editor.compute(model, tok, batch)
            applied = apply_proposal(model, proposal, declared)
            edit_seconds = time.perf_counter() - t0
            state.edits_done += len(batch)
            state.next_batch = b + 1

            record: dict[str, Any] = {
                "edit/index": state.edits_done,  # edits applied so far, the x-axis of every curve
                "edit/batch": b,
                "edit/case_ids": [r.case_id for r in batch],
                "edit/seconds": edit_seconds,
            }
            record.update({f"editor/{k}": v for k, v in applied.stats.items()})
            wstats = tracker.stats(model, applied.deltas, applied.factors)
            record.update(wstats)
            if cfg.eval.immediate:
                outcomes = evaluate_requests(model, tok, batch, **score)
                immediate.extend(outcomes)
                for key in ("efficacy", "paraphrase", "neighborhood", "prob_new"):
                    record[f"immediate/{key}"] = mean_of(outcomes, key)
            state.log_seq += 1
            record["log/seq"] = state.log_seq
            sink.log("edits", record)
            bar.update(len(batch))

            bad = [k for k, v in wstats.items() if k.endswith("/nonfinite") and v > 0]
            if bad:
                raise NonFiniteDeltaError(f"non-finite weights after edit {state.edits_done}: {bad}")
        state.status = "finished"
    except NonFiniteDeltaError as e:
        state.status, state.message = "failed", str(e)
        sink.log("alerts", {"edit/index": state.edits_done, "alert/kind": "nonfinite", "alert/message": str(e)})
        raise RunError(f"{e} (run state saved in {run_dir})") from e
    except BaseException as e:
        state.status, state.message = ("preempted" if isinstance(e, KeyboardInterrupt) else "failed"), repr(e)
        raise
    finally:
        bar.close()
        state.editor_state = {}  # editor state_dict goes into checkpoints (durability issue), not state.json
        state.save(run_dir)
        sink.close()

    seconds = time.perf_counter() - t_start
    metrics = {f"immediate/{k}": mean_of(immediate, k) for k in ("efficacy", "paraphrase", "neighborhood", "prob_new")}
    # Final regime: every edit re-checked once after the last one.
    final = evaluate_requests(model, tok, stream, **score)
    metrics.update({f"final/{k}": mean_of(final, k) for k in ("efficacy", "paraphrase", "neighborhood", "prob_new")})
    metrics.update(baseline)
    metrics["edit/seconds_mean"] = _mean_edit_seconds(sink.path("edits"))
    summary = RunSummary(run_dir, run_dir.name, state.status, state.edits_done, seconds, metrics)
    atomic_write_json(run_dir / "summary.json", {**dataclasses.asdict(summary), "run_dir": str(run_dir)})
    return summary


def _mean_edit_seconds(path: Path) -> float | None:
    from seqedit.io import read_jsonl

    rows = read_jsonl(path)
    return sum(r["edit/seconds"] for r in rows) / len(rows) if rows else None


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="edit", desc="editing", disable=None, leave=False)  # None: off when not a TTY
