"""The sequential-editing loop, top to bottom. `run(cfg)` is the whole job:

    config -> run dir -> model (+ world) -> edit stream -> editor.prepare -> sinks
    baseline probes
    for each batch: editor.compute -> apply -> weight telemetry -> spike signal -> immediate scores
                    -> due probes -> JSONL (+ wandb) -> heartbeat / state
    final scores -> retention matrix (+ wandb table and files) -> summary.json

Every side effect is visible here; probes, schedules, telemetry and sinks are small modules this file calls. All run
state lives in `RunState` so it can be saved and restored whole.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from seqedit.apply import NonFiniteDeltaError, apply_proposal
from seqedit.config import RunConfig, dump_yaml
from seqedit.io import atomic_write_json, atomic_write_text, read_jsonl
from seqedit.metrics import evaluate_requests, mean_of
from seqedit.probe_api import ProbeContext, make_probe
from seqedit.schedule import parse_schedule
from seqedit.signals import StopRequested, graceful_stop
from seqedit.telemetry import JsonlSink
from seqedit.types import EditRequest
from seqedit.wandb_sink import WandbSink
from seqedit.weights import WeightTracker

log = logging.getLogger(__name__)
SCORES = ("efficacy", "paraphrase", "neighborhood", "prob_new")


class RunError(RuntimeError):
    pass


def default_cache_dir(configured: str | None = None) -> Path:
    """`cache_dir` from the config, else the same root `seqedit world build` uses."""
    from seqedit.world.build import default_cache_dir as world_default

    return Path(configured).expanduser() if configured else world_default()


@dataclass
class RunState:
    """Everything a resumed run needs besides the weights; saved atomically as state.json."""

    run_id: str
    config_hash: str
    wandb_id: str
    status: str = "created"  # created | running | finished | failed | preempted
    next_batch: int = 0
    edits_done: int = 0
    log_seq: int = 0  # sequence number of the last telemetry record (explicit wandb steps for offline replays)
    update_norms: list[float] = field(default_factory=list)  # per-call max ‖ΔW‖_F, for the spike detector
    probe_seconds: dict[str, float] = field(default_factory=dict)
    loop_seconds: float = 0.0  # wall time of the edit loop (probes included), for overhead benchmarks
    message: str = ""
    started_at: float = field(default_factory=time.time)

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


class Sinks:
    """JSONL (truth) + wandb (view), with sequence numbers on every record."""

    def __init__(self, jsonl: JsonlSink, wandb: WandbSink, state: RunState) -> None:
        self.jsonl, self.wandb, self.state = jsonl, wandb, state

    def log(self, stream: str, record: dict[str, Any]) -> None:
        self.state.log_seq += 1
        record = {**record, "log/seq": self.state.log_seq, "log/time": time.time()}
        self.jsonl.log(stream, record)
        self.wandb.log(stream, record)

    def alert(self, edit_index: int, kind: str, message: str) -> None:
        log.warning("alert at edit %d: %s: %s", edit_index, kind, message)
        self.log("alerts", {"edit/index": edit_index, "alert/kind": kind, "alert/message": message})

    def close(self, ok: bool) -> None:
        self.jsonl.close()
        self.wandb.close(exit_code=0 if ok else 1)


def make_run_dir(cfg: RunConfig) -> Path:
    """runs/<run_id>; an existing directory is never overwritten: a suffix -r2, -r3... is added instead."""
    root = Path(cfg.runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    k = 1
    while True:  # mkdir is the atomic claim: identical runs started together each get their own directory
        candidate = root / (cfg.run_id if k == 1 else f"{cfg.run_id}-r{k}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            k += 1


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
    info = {"source": source, "format": result.format, "available": len(ordered),
            "skipped": [dataclasses.asdict(s) for s in result.skipped]}
    return list(ordered[: cfg.n_edits]), info


def is_spike(norms: list[float], factor: float, warmup: int) -> bool:
    """The last update norm is >= factor x the median of the earlier ones (after `warmup` earlier updates)."""
    if len(norms) <= warmup:
        return False
    med = statistics.median(norms[:-1])
    return med > 0 and norms[-1] >= factor * med


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    except ImportError:  # pragma: no cover - non-Unix
        return float("nan")


def rss_mb() -> float:
    """Current resident set size (Linux /proc; NaN elsewhere): the memory-growth signal of long runs."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def run(cfg: RunConfig, progress: Callable[[str], None] | None = None) -> RunSummary:
    say = progress or (lambda msg: None)
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    cache_dir = default_cache_dir(cfg.cache_dir)

    # -- everything checkable without weights, before a run directory exists -----------------------------------
    from seqedit.preflight import preflight

    checked = preflight(cfg)

    # -- run directory, resolved config, state ----------------------------------------------------------------
    run_dir = make_run_dir(cfg)
    atomic_write_text(run_dir / "config.yaml", f"# config_hash: {cfg.config_hash()}\n" + dump_yaml(cfg))
    state = RunState(run_id=run_dir.name, config_hash=cfg.config_hash(), wandb_id=run_dir.name)
    state.save(run_dir)
    say(f"run dir: {run_dir}")

    # -- model, data, editor, probes ------------------------------------------------------------------------
    from seqedit.editors.base import EditorContext, make_editor
    from seqedit.model_io import load_model

    loaded = load_model(cfg.model, cache_dir=cache_dir, progress=say)
    model, tok = loaded.model, loaded.tokenizer
    if checked.requests is not None:  # a file source: preflight already read, ordered and counted it
        stream, data_info = list(checked.requests), checked.data_info
    else:  # the world's records exist once the world is built
        stream, data_info = load_stream(cfg, loaded)
    atomic_write_json(run_dir / "data.json", {**data_info, "case_ids": [r.case_id for r in stream]})
    editor = make_editor(cfg.editor.name, cfg.editor.options)
    stats_text = (loaded.world.heldout_path,) if loaded.world is not None else ()
    ctx = EditorContext(arch=loaded.arch, seed=cfg.seed, run_dir=run_dir, cache_dir=cache_dir / "stats",
                        stats_text=stats_text)
    editor.prepare(model, tok, ctx)
    declared = editor.params(model)
    probes = [(spec.name, make_probe(spec.name, spec.options), parse_schedule(spec.schedule)) for spec in cfg.probes]
    for name, probe, _ in probes:
        if hasattr(probe, "check"):  # e.g. downstream data must be local before hours of editing start
            probe.check(loaded)
    say(f"model {loaded.name} ({loaded.arch.name}), editor {editor.name} on {declared}, {len(stream)} edits, "
        f"probes {[p[0] for p in probes] or 'none'}")

    sinks = Sinks(
        JsonlSink(run_dir / "telemetry"),
        WandbSink(run_id=state.wandb_id, run_dir=run_dir, mode=cfg.wandb.mode, project=cfg.wandb.project,
                  entity=cfg.wandb.entity, group=cfg.wandb.group,
                  tags=(*cfg.wandb.tags, editor.name, loaded.name, f"seed{cfg.seed}"),
                  config={**cfg.to_dict(), "config_hash": cfg.config_hash()}, name=run_dir.name),
        state,
    )
    tracker = WeightTracker()
    tracker.remember(model, declared)
    score = dict(paraphrase=cfg.eval.paraphrase, neighborhood=cfg.eval.neighborhood, batch_size=cfg.eval.batch_size)
    applied: list[EditRequest] = []

    def run_probes(edit_index: int, signals: set[str], previous: int | None, force: bool = False) -> dict[str, Any]:
        due = [(n, p) for n, p, sched in probes if force or sched.due(edit_index, signals, previous)]
        if not due:
            return {}
        out: dict[str, Any] = {}
        pctx = ProbeContext(model=model, tokenizer=tok, edit_index=edit_index, applied=tuple(applied),
                            run_dir=run_dir, world=loaded.world, seed=cfg.seed, edited_params=tuple(declared),
                            stream=tuple(stream))
        for name, probe in due:
            t0 = time.perf_counter()
            result = probe(pctx)
            seconds = time.perf_counter() - t0
            state.probe_seconds[name] = state.probe_seconds.get(name, 0.0) + seconds
            record = {"edit/index": edit_index, "probe/name": name, f"probe/{name}/seconds": seconds,
                      "eval/protocol": "retention" if name == "retention" else "probe", **result.metrics}
            sinks.log("probes", record)
            for row in result.rows:
                sinks.jsonl.log(f"items-{name}", {"edit/index": edit_index, **row})
            out.update(result.metrics)
        return out

    # -- before the first edit: baseline of every request in the stream, and every probe once ------------------
    pre = evaluate_requests(model, tok, stream, **score)
    baseline = {f"pre/{k}": mean_of(pre, k) for k in SCORES}
    sinks.log("probes", {"edit/index": 0, "probe/name": "baseline", "eval/protocol": "pre", **baseline})
    run_probes(0, set(), None, force=True)

    # -- the loop ------------------------------------------------------------------------------------------------
    batches = [stream[i : i + cfg.batch_size] for i in range(0, len(stream), cfg.batch_size)]
    immediate: list = []
    edit_seconds_all: list[float] = []
    state.status = "running"
    state.save(run_dir)
    bar = _progress_bar(len(stream))
    t_loop = time.perf_counter()
    last_beat = 0.0
    ok = False
    with graceful_stop() as stop:  # SIGTERM/SIGUSR2/SIGINT: finish the current edit, then stop
        try:
            for b in range(state.next_batch, len(batches)):
                batch = batches[b]
                previous = state.edits_done
                t0 = time.perf_counter()
                proposal = editor.compute(model, tok, batch)
                result = apply_proposal(model, proposal, declared)
                edit_seconds = time.perf_counter() - t0
                edit_seconds_all.append(edit_seconds)
                applied.extend(batch)
                state.edits_done += len(batch)
                state.next_batch = b + 1

                record: dict[str, Any] = {
                    "edit/index": state.edits_done,  # edits applied so far: the x-axis of every curve
                    "edit/batch": b,
                    "edit/case_ids": [r.case_id for r in batch],
                    "edit/seconds": edit_seconds,
                    "system/rss_mb": rss_mb(),
                    "system/peak_memory_mb": peak_memory_mb(),
                }
                record.update({f"editor/{k}": v for k, v in result.stats.items()})
                wstats = tracker.stats(model, result.deltas, result.factors)
                record.update(wstats)

                # Disabling-edit early warning: one update far above the running median.
                signals: set[str] = set()
                state.update_norms.append(max((v for k, v in wstats.items() if k.endswith("/delta_fro")), default=0.0))
                if is_spike(state.update_norms, cfg.telemetry.spike_factor, cfg.telemetry.spike_warmup):
                    signals.add("norm_spike")
                    record["edit/norm_spike"] = 1.0
                    message = (f"update norm {state.update_norms[-1]:.4g} >= {cfg.telemetry.spike_factor}x the "
                               f"running median; case ids {record['edit/case_ids']}")
                    sinks.alert(state.edits_done, "norm_spike", message)

                if cfg.eval.immediate:
                    outcomes = evaluate_requests(model, tok, batch, **score)
                    immediate.extend(outcomes)
                    record.update({f"immediate/{k}": mean_of(outcomes, k) for k in SCORES})
                    record["eval/protocol"] = "immediate"
                sinks.log("edits", record)

                bad = [k for k, v in wstats.items() if k.endswith("/nonfinite") and v > 0]
                if bad:
                    raise NonFiniteDeltaError(f"non-finite weights after edit {state.edits_done}: {bad}")

                due = run_probes(state.edits_done, signals, previous)
                bar.update(len(batch))
                now = time.time()
                if now - last_beat >= cfg.telemetry.heartbeat_seconds or b == len(batches) - 1:
                    last_beat = now
                    _heartbeat(run_dir, state, len(stream), t_start, due, say)
                if (b + 1) % cfg.telemetry.state_every == 0:
                    state.save(run_dir)
                stop.check()  # a SIGTERM/SIGUSR2/SIGINT during this edit stops here, at an edit boundary
            state.status = "finished"
            state.loop_seconds = time.perf_counter() - t_loop
            ok = True
        except NonFiniteDeltaError as e:
            state.status, state.message = "failed", str(e)
            sinks.alert(state.edits_done, "nonfinite", str(e))
            raise RunError(f"{e} (run state saved in {run_dir})") from e
        except (KeyboardInterrupt, StopRequested) as e:
            state.status, state.message = "preempted", str(e) or repr(e)
            sinks.alert(state.edits_done, "preempted", state.message)
            raise
        except BaseException as e:
            state.status, state.message = "failed", repr(e)
            raise
        finally:
            bar.close()
            state.save(run_dir)
            _heartbeat(run_dir, state, len(stream), t_start, {}, None)
            if not ok:
                sinks.close(ok=False)

    # -- final regime: every edit re-checked once after the last one -----------------------------------------
    metrics: dict[str, float | None] = {f"immediate/{k}": mean_of(immediate, k) for k in SCORES}
    if cfg.eval.final:
        final = evaluate_requests(model, tok, stream, **score)
        for o in final:
            sinks.jsonl.log("items-final", {"edit/index": state.edits_done, **o.as_dict()})
        metrics.update({f"final/{k}": mean_of(final, k) for k in SCORES})
        sinks.log("probes", {"edit/index": state.edits_done, "probe/name": "final", "eval/protocol": "final",
                             **{k: v for k, v in metrics.items() if k.startswith("final/")}})
    metrics.update(baseline)
    write_retention_matrix(run_dir)
    sinks.wandb.attach_outputs(run_dir, state.edits_done)
    sinks.close(ok=True)
    state.save(run_dir)
    metrics["edit/seconds_mean"] = sum(edit_seconds_all) / len(edit_seconds_all) if edit_seconds_all else None
    summary = RunSummary(run_dir, run_dir.name, state.status, state.edits_done, time.perf_counter() - t_start,
                         metrics)
    atomic_write_json(run_dir / "summary.json", {**dataclasses.asdict(summary), "run_dir": str(run_dir),
                                                 "probe_seconds": state.probe_seconds})
    return summary


def write_retention_matrix(run_dir: Path) -> Path | None:
    """Edit x check matrix of retention efficacy (rows: edit position, columns: edit index of the check) as CSV."""
    rows = read_jsonl(run_dir / "telemetry" / "items-retention.jsonl")
    if not rows:
        return None
    import pandas as pd

    df = pd.DataFrame(rows)
    matrix = df.pivot_table(index=["position", "case_id"], columns="edit/index", values="efficacy", aggfunc="last")
    path = run_dir / "retention_matrix.csv"
    atomic_write_text(path, matrix.to_csv())
    return path


def _heartbeat(run_dir: Path, state: RunState, total: int, t_start: float, latest: dict[str, Any],
               say: Callable[[str], None] | None) -> None:
    elapsed = time.perf_counter() - t_start
    rate = state.edits_done / elapsed if elapsed > 0 else 0.0
    eta = (total - state.edits_done) / rate if rate > 0 else None
    beat = {"state": state.status, "edit": state.edits_done, "total": total, "rate_per_s": rate, "eta_s": eta,
            "time": time.time(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
            **{k: v for k, v in latest.items() if isinstance(v, (int, float))}}
    atomic_write_json(run_dir / "heartbeat.json", beat)
    if say is not None:
        extra = " ".join(f"{k.split('/', 1)[-1]}={v:.3g}" for k, v in latest.items()
                         if isinstance(v, float) and not k.endswith("seconds"))
        say(f"edit={state.edits_done}/{total} rate={rate:.2f}/s eta={eta or 0:.0f}s {extra}".rstrip())


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="edit", desc="editing", disable=None, leave=False)  # None: off when not a TTY
