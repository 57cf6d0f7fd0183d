"""The sequential-editing loop, top to bottom. `run(cfg)` is the whole job, new or resumed:

    preflight (no run dir, no weights) -> run dir + lock -> model (+ world) -> edit stream -> editor.prepare
    resume: ledger verified, newest good snapshot restored, telemetry cut back to the snapshot
    baseline probes -> snapshot 0                                                     (a new run only)
    for each call b: reseed -> editor.compute (or replay ledger[b]) -> guard -> apply -> ledger commit -> editor.applied
                     -> weight telemetry -> spike signal -> immediate scores -> due probes -> JSONL (+ wandb)
                     -> heartbeat / state -> snapshot every checkpoint.snapshot_every calls
    finalizing: final scores -> retention matrix (+ wandb table and files) -> summary.json -> finished

An editor call is committed once its ledger record is durable; everything after it in the step (telemetry, probes)
is a function of the weights and is recomputed on resume. A resume restores the newest good snapshot (touched
parameters, editor state, RNG, run state), cuts every telemetry stream back to the snapshot's log sequence number,
replays the committed calls after it from the ledger (no editor call) and continues: the final weights are
bit-identical to an uninterrupted run and the telemetry equal except wall-clock fields. Lifecycle events (start,
resume, stop, failure) go to `events.jsonl`, not to telemetry.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from seqedit.apply import apply_added, apply_proposal, revert
from seqedit.checkpoint import RunLock, capture_rng, latest_good, prune, restore_rng, seed_rngs, write_snapshot
from seqedit.config import RESUME_SAFE, RunConfig, config_diff, dump_yaml, flatten
from seqedit.io import atomic_write_json, atomic_write_text, dumps_line, read_jsonl
from seqedit.ledger import Ledger
from seqedit.metrics import evaluate_requests
from seqedit.probe_api import ProbeContext, make_probe
from seqedit.schedule import parse_schedule
from seqedit.signals import StopRequested, graceful_stop
from seqedit.telemetry import JsonlSink, truncate_streams
from seqedit.types import EditRequest
from seqedit.wandb_sink import WandbSink
from seqedit.weights import WeightTracker

log = logging.getLogger(__name__)
SCORES = ("efficacy", "paraphrase", "neighborhood", "prob_new")
FINAL_CHUNK = 64  # requests per final-scoring chunk: a stop request is honoured between chunks


class RunError(RuntimeError):
    pass


class ResumeRefused(RunError):
    """A resume found that the base model or the edit stream changed: nothing was touched, the run keeps its state."""


def default_cache_dir(configured: str | None = None) -> Path:
    """`cache_dir` from the config, else the same root `seqedit world build` uses."""
    from seqedit.world.build import default_cache_dir as world_default

    return Path(configured).expanduser() if configured else world_default()


@dataclass
class RunState:
    """Everything a resumed run needs besides the weights, the editor state and the ledger; O(1) in the number of
    edits (the update-norm history lives in the ledger index). Saved atomically as state.json and in every snapshot."""

    run_id: str
    config_hash: str
    wandb_id: str
    status: str = "created"  # created | running | finalizing | finished | failed | preempted
    next_batch: int = 0  # editor calls done (the cursor)
    edits_done: int = 0  # stream position: requests consumed (applied or rejected)
    rejected: int = 0  # requests whose call the guard rejected
    log_seq: int = 0  # sequence number of the last telemetry record
    immediate_sums: dict[str, list[float]] = field(default_factory=dict)  # score -> [sum, count] of immediate scores
    baseline: dict[str, float | None] = field(default_factory=dict)  # pre-edit means (pre/<score>)
    probe_seconds: dict[str, float] = field(default_factory=dict)
    edit_seconds: float = 0.0  # editor-call time summed over live calls
    edit_calls: int = 0  # live editor calls (replays excluded)
    loop_seconds: float = 0.0  # wall time of the edit loop (probes included), summed over sessions
    ledger_seconds: float = 0.0  # time spent committing ledger records (live calls)
    snapshot_seconds: float = 0.0  # time spent writing and pruning snapshots
    snapshots_written: int = 0
    base_fingerprint: str = ""  # sha256 of the touched parameters of the unedited model
    world: dict[str, Any] = field(default_factory=dict)  # World.identity() of a world model: preset, build id, source
    last_snapshot: int | None = None  # edits_done of the newest snapshot
    resumes: int = 0
    stopped_early: str = ""  # why editing ended before n_edits (telemetry.stop_on_collapse), else ""
    message: str = ""
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    def save(self, run_dir: Path) -> None:
        self.updated_at = time.time()
        atomic_write_json(run_dir / "state.json", dataclasses.asdict(self))

    @classmethod
    def load(cls, run_dir: Path) -> "RunState":
        path = Path(run_dir) / "state.json"
        if not path.is_file():
            raise RunError(f"{run_dir} is not a seqedit run directory (no state.json)")
        data = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


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

    def items(self, stream: str, rows: list[dict[str, Any]]) -> None:
        """Per-item rows (JSONL only), stamped with the sequence number of the record they belong to (logged just
        before), so a resume cuts them back together with it."""
        for row in rows:
            self.jsonl.log(stream, {**row, "log/seq": self.state.log_seq})

    def alert(self, edit_index: int, kind: str, message: str) -> None:
        log.warning("alert at edit %d: %s: %s", edit_index, kind, message)
        self.log("alerts", {"edit/index": edit_index, "alert/kind": kind, "alert/message": message})

    def close(self, ok: bool) -> None:
        self.jsonl.close()
        self.wandb.close(exit_code=0 if ok else 1)


def event(run_dir: Path, kind: str, **fields: Any) -> None:
    """One lifecycle line in `<run_dir>/events.jsonl` (durable: fsync'd)."""
    line = dumps_line({"event": kind, "time": time.time(), "pid": os.getpid(), "host": socket.gethostname(),
                       "slurm_job": os.environ.get("SLURM_JOB_ID"), **fields})
    with open(Path(run_dir) / "events.jsonl", "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


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
            "skipped": [dataclasses.asdict(s) for s in result.skipped],
            "dropped": [dataclasses.asdict(s) for s in result.dropped]}
    return list(ordered[: cfg.n_edits]), info


def spike_detector(cfg: RunConfig):
    """The online disabling-edit detector the config asks for (seqedit.analysis.detect)."""
    from seqedit.analysis.detect import SpikeConfig, SpikeDetector

    t = cfg.telemetry
    return SpikeDetector(SpikeConfig(window=t.spike_window, min_history=min(t.spike_warmup, t.spike_window),
                                     z=t.spike_z, min_ratio=t.spike_factor))


def guard_verdict(cfg: RunConfig, deltas: dict[str, torch.Tensor], w0_norm: dict[str, float],
                  model: torch.nn.Module) -> tuple[str, str] | None:
    """(alert kind, message) when an applied update breaks the guard: non-finite values in the delta or in the
    weights it leaves, or a norm beyond `guard.max_update_norm` / `guard.max_update_rel`; else None."""
    for name, d in deltas.items():
        # a finite float64 norm <=> every entry finite (float32 squares cannot overflow float64)
        norm = float(torch.linalg.vector_norm(d, dtype=torch.float64))
        weights = float(torch.linalg.vector_norm(model.get_parameter(name).detach(), dtype=torch.float64))
        if not (math.isfinite(norm) and math.isfinite(weights)):
            return "nonfinite", f"non-finite values in the update of {name} or in the weights it leaves"
        if cfg.guard.max_update_norm is not None and norm > cfg.guard.max_update_norm:
            return "update_norm", f"‖ΔW‖_F of {name} = {norm:.4g} > guard.max_update_norm={cfg.guard.max_update_norm}"
        rel = norm / w0_norm[name] if w0_norm.get(name) else float("inf")
        if cfg.guard.max_update_rel is not None and rel > cfg.guard.max_update_rel:
            return "update_norm", (f"‖ΔW‖_F/‖W0‖_F of {name} = {rel:.4g} > "
                                   f"guard.max_update_rel={cfg.guard.max_update_rel}")
    return None


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


def saved_config(run_dir: Path) -> dict[str, Any]:
    """The resolved config a run directory was started with (config.yaml), as a plain tree."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a seqedit run directory (no config.yaml)")
    return yaml.safe_load(path.read_text()) or {}


def read_summary(run_dir: Path) -> RunSummary:
    d = json.loads((Path(run_dir) / "summary.json").read_text())
    return RunSummary(Path(run_dir), d["run_id"], d["status"], d["n_edits"], d["seconds"], d["metrics"])


def run(cfg: RunConfig, progress: Callable[[str], None] | None = None, run_dir: Path | None = None) -> RunSummary:
    """Run `cfg` in a new run directory, or continue the run in `run_dir` (whose config hash must equal cfg's;
    `seqedit resume` and `seqedit run --resume` check the differing keys by name first)."""
    def say(msg: str) -> None:
        try:
            if progress is not None:
                progress(msg)
        except OSError:  # a closed terminal or pipe (the launching process died) must not fail hours of editing
            pass
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    cache_dir = default_cache_dir(cfg.cache_dir)

    # -- everything checkable without weights, before a run directory exists -----------------------------------
    from seqedit.preflight import preflight

    checked = preflight(cfg)

    # -- run directory (claimed and locked), resolved config, state -------------------------------------------
    resuming = run_dir is not None
    if resuming:
        run_dir = Path(run_dir)
        lock = RunLock(run_dir).acquire()  # RunLocked if another process works on it
        state = RunState.load(run_dir)
        breaking, safe_changes = config_diff(saved_config(run_dir), cfg.to_dict())
        if breaking or state.config_hash != cfg.config_hash():
            lock.release()
            raise RunError(f"refusing to resume {run_dir}: the config differs in keys that change what the run "
                           f"computes: {', '.join(breaking) or '(config hash)'}; resume-safe keys are "
                           f"{', '.join(RESUME_SAFE)}")
        if state.status == "finished":
            lock.release()
            return read_summary(run_dir)
        state.resumes += 1
        say(f"resuming {run_dir} ({state.status} at edit {state.edits_done})")
    else:
        run_dir = make_run_dir(cfg)
        lock = RunLock(run_dir).acquire()
        atomic_write_text(run_dir / "config.yaml", f"# config_hash: {cfg.config_hash()}\n" + dump_yaml(cfg))
        state = RunState(run_id=run_dir.name, config_hash=cfg.config_hash(), wandb_id=run_dir.name)
        state.save(run_dir)
        event(run_dir, "created", config_hash=state.config_hash)
        say(f"run dir: {run_dir}")

    sinks: Sinks | None = None
    snapshot: Callable[[], None] | None = None
    session_start = state.edits_done  # for this session's rate and ETA
    ok = False
    at_boundary = False  # True between steps: a stop there can snapshot a consistent state
    with lock, graceful_stop() as stop:  # SIGTERM/SIGUSR1/SIGUSR2/SIGINT: stop at the next check
        try:
            event(run_dir, "started", resume=resuming, status_before=state.status,
                  safe_changes={k: flatten(cfg.to_dict()).get(k) for k in safe_changes} if resuming else {})

            # -- model, data, editor, probes -----------------------------------------------------------------
            from seqedit.editors.base import EditorContext, make_editor
            from seqedit.model_io import load_model, model_fingerprint

            loaded = load_model(cfg.model, cache_dir=cache_dir, progress=say)
            model, tok = loaded.model, loaded.tokenizer
            if loaded.world is not None:  # exactly which build: results of two builds never share a run
                identity = loaded.world.identity()
                if resuming and state.world and state.world.get("build_id") != identity["build_id"]:
                    raise ResumeRefused(
                        f"the world {cfg.model.name!r} is another build than the run started with (build "
                        f"{identity['build_id']} ({identity['source']}), the run recorded {state.world.get('build_id')} "
                        f"({state.world.get('source')})): refusing to resume {run_dir}")
                state.world = identity
            stop.check()
            if checked.requests is not None:  # a file source: preflight already read, ordered and counted it
                stream, data_info = list(checked.requests), checked.data_info
            else:  # the world's records exist once the world is built
                stream, data_info = load_stream(cfg, loaded)
            case_ids = [r.case_id for r in stream]
            if data_info.get("skipped") or data_info.get("dropped"):  # said once, listed in data.json
                say(f"data {data_info.get('source')}: skipped {len(data_info.get('skipped') or [])} malformed "
                    f"record(s), left out {len(data_info.get('dropped') or [])} empty optional value(s) of kept "
                    f"records (listed in data.json)")
            if resuming and (run_dir / "data.json").is_file():
                saved_ids = json.loads((run_dir / "data.json").read_text()).get("case_ids")
                if saved_ids != case_ids:
                    raise ResumeRefused(f"the edit stream changed since the run started ({data_info.get('source')} now "
                                   f"gives other requests or another order): refusing to resume {run_dir}")
            else:
                atomic_write_json(run_dir / "data.json", {**data_info, "case_ids": case_ids})
            editor = make_editor(cfg.editor.name, cfg.editor.options)
            stats_text = (loaded.world.heldout_path,) if loaded.world is not None else ()
            ctx = EditorContext(arch=loaded.arch, seed=cfg.seed, run_dir=run_dir, cache_dir=cache_dir / "stats",
                                stats_text=stats_text)
            editor.prepare(model, tok, ctx)  # always on the unedited model, as in the first session
            declared = editor.params(model)
            probes = [(spec.name, make_probe(spec.name, spec.options), parse_schedule(spec.schedule))
                      for spec in cfg.probes]
            for name, probe, _ in probes:
                if hasattr(probe, "check"):  # e.g. downstream data must be local before hours of editing start
                    probe.check(loaded)
                for note in getattr(probe, "notes", ()):  # what the check changed in the user's input (mappings)
                    say(f"probe {name}: {note}")
                    event(run_dir, "input_mapped", probe=name, note=note)
            tracker = WeightTracker()
            tracker.remember(model, declared)  # W0 from the base model, also on resume
            fingerprint = model_fingerprint(model, declared)
            if resuming and state.base_fingerprint and fingerprint != state.base_fingerprint:
                raise ResumeRefused(f"the base model {cfg.model.name!r} changed since the run started (touched "
                               f"parameters {declared} hash {fingerprint[:12]}, the run recorded "
                               f"{state.base_fingerprint[:12]}): refusing to resume {run_dir}")
            state.base_fingerprint = fingerprint
            stop.check()

            # -- ledger and snapshot: where this session starts ---------------------------------------------
            ledger = Ledger.open(run_dir / "ledger", fsync=cfg.checkpoint.fsync == "commit")
            problems = list(ledger.problems)
            snap = latest_good(run_dir, max_batch=len(ledger), report=problems.append) if resuming else None
            applied: list[EditRequest] = []
            detector = spike_detector(cfg)
            from seqedit.analysis.phases import CollapseMonitor

            collapse = CollapseMonitor(cfg.telemetry.collapse_margin)
            if snap is not None:
                extra = snap.extra()
                with torch.no_grad():
                    for name, value in snap.params().items():
                        model.get_parameter(name).copy_(value)
                editor.load_state_dict(extra["editor"])
                restore_rng(extra["rng"])
                saved = snap.manifest["state"]
                for key in ("next_batch", "edits_done", "rejected", "log_seq", "immediate_sums", "baseline",
                            "probe_seconds", "edit_seconds", "edit_calls", "loop_seconds", "ledger_seconds",
                            "snapshot_seconds", "snapshots_written", "stopped_early"):
                    setattr(state, key, saved[key])
                state.last_snapshot = snap.edits_done
                for rec in ledger.records[: state.next_batch]:
                    if rec.status == "applied":
                        applied.extend(stream[rec.edit_index - len(rec.case_ids) : rec.edit_index])
            elif resuming:  # nothing usable: start over in the same directory, the ledger replays what it holds
                for key in ("next_batch", "edits_done", "rejected", "log_seq", "edit_calls"):
                    setattr(state, key, 0)
                state.immediate_sums, state.baseline, state.probe_seconds = {}, {}, {}
                state.edit_seconds = state.loop_seconds = state.ledger_seconds = state.snapshot_seconds = 0.0
                state.snapshots_written = 0
                state.stopped_early = ""
                state.last_snapshot = None
            if resuming:
                cut = truncate_streams(run_dir / "telemetry", state.log_seq)
                for rec in read_jsonl(run_dir / "telemetry" / "edits.jsonl"):  # the detector's window, as it was
                    if rec.get("edit/status") == "applied":
                        detector.update(_update_norms(rec))
                for rec in read_jsonl(run_dir / "telemetry" / "probes.jsonl"):  # the collapse monitor, as it was
                    collapse.update(int(rec["edit/index"]), rec)
                replay = len(ledger) - state.next_batch
                event(run_dir, "resumed", snapshot=snap.path.name if snap else None, next_batch=state.next_batch,
                      replay_calls=replay, telemetry_lines_cut=cut, problems=problems,
                      seconds_since_start=time.perf_counter() - t_start)
                say(f"restored {snap.path.name if snap else 'nothing (no good snapshot)'}; {replay} committed "
                    f"calls to replay from the ledger" + "".join(f"\n  {p}" for p in problems))
            say(f"model {loaded.name} ({loaded.arch.name}), editor {editor.name} on {declared}, {len(stream)} edits, "
                f"probes {[p[0] for p in probes] or 'none'}")

            sinks = Sinks(
                JsonlSink(run_dir / "telemetry"),
                WandbSink(run_id=state.wandb_id, run_dir=run_dir, mode=cfg.wandb.mode, project=cfg.wandb.project,
                          entity=cfg.wandb.entity, group=cfg.wandb.group, init_timeout_s=cfg.wandb.init_timeout_s,
                          tags=(*cfg.wandb.tags, editor.name, loaded.name, f"seed{cfg.seed}"),
                          config={**cfg.to_dict(), "config_hash": cfg.config_hash(),
                                  **({"world": state.world} if state.world else {})}, name=run_dir.name),
                state,
            )
            if sinks.wandb.note:  # e.g. online init timed out: logging offline, push later
                say(sinks.wandb.note)
                event(run_dir, "wandb_offline", note=sinks.wandb.note)
            score = dict(paraphrase=cfg.eval.paraphrase, neighborhood=cfg.eval.neighborhood,
                         batch_size=cfg.eval.batch_size)
            milestone = parse_schedule(cfg.checkpoint.milestones)
            spacing = cfg.batch_size * cfg.checkpoint.snapshot_every

            def snapshot() -> None:
                """Touched parameters + editor state + RNG + run state at a step boundary; never non-finite."""
                params = {n: model.get_parameter(n).detach() for n in declared}
                if not all(math.isfinite(float(torch.linalg.vector_norm(p, dtype=torch.float64)))
                           for p in params.values()):
                    sinks.alert(state.edits_done, "snapshot_skipped", "non-finite weights are never snapshotted")
                    return
                if state.last_snapshot == state.edits_done and (run_dir / "snapshots").is_dir():
                    return  # this cursor is already saved
                t0 = time.perf_counter()
                ledger.sync()  # the snapshot's cursor must never be ahead of the durable ledger
                sinks.jsonl.sync()  # the streams must hold every line up to log_seq before the snapshot says so
                state.last_snapshot = state.edits_done
                state.snapshots_written += 1
                write_snapshot(run_dir, params, {"editor": editor.state_dict(), "rng": capture_rng()},
                               {"edits_done": state.edits_done, "next_batch": state.next_batch,
                                "log_seq": state.log_seq, "config_hash": state.config_hash,
                                "state": dataclasses.asdict(state)})
                prune(run_dir, cfg.checkpoint.keep_last,
                      lambda e: e == 0 or milestone.due(e, (), max(0, e - spacing)))
                state.snapshot_seconds += time.perf_counter() - t0
                state.save(run_dir)

            def run_probes(edit_index: int, signals: set[str], previous: int | None,
                           force: bool = False) -> dict[str, Any]:
                due = [(n, p) for n, p, sched in probes if force or sched.due(edit_index, signals, previous)]
                out: dict[str, Any] = {}
                if not due:
                    return out
                pctx = ProbeContext(model=model, tokenizer=tok, edit_index=edit_index, applied=tuple(applied),
                                    run_dir=run_dir, world=loaded.world, seed=cfg.seed,
                                    edited_params=tuple(declared), stream=tuple(stream))
                for name, probe in due:
                    stop.check()  # between probes: a long downstream evaluation is not waited for
                    t0 = time.perf_counter()
                    result = probe(pctx)
                    seconds = time.perf_counter() - t0
                    state.probe_seconds[name] = state.probe_seconds.get(name, 0.0) + seconds
                    record = {"edit/index": edit_index, "probe/name": name, f"probe/{name}/seconds": seconds,
                              "eval/protocol": "retention" if name == "retention" else "probe", **result.metrics}
                    sinks.log("probes", record)
                    sinks.items(f"items-{name}", [{"edit/index": edit_index, **row} for row in result.rows])
                    out.update(result.metrics)
                    for curve, value, base in collapse.update(edit_index, result.metrics):
                        sinks.alert(edit_index, "collapse", f"{curve} fell to {value:.3g} (pre-edit {base:.3g}), "
                                    f"within {cfg.telemetry.collapse_margin:g} of chance")
                return out

            # -- before the first edit: baseline of every request in the stream, every probe once ----------
            if snap is None:
                state.status = "running"
                state.save(run_dir)
                pre = evaluate_requests(model, tok, stream, **score)
                state.baseline = {f"pre/{k}": _mean([getattr(o, k) for o in pre]) for k in SCORES}
                sinks.log("probes", {"edit/index": 0, "probe/name": "baseline", "eval/protocol": "pre",
                                     **state.baseline})
                stop.check()
                run_probes(0, set(), None, force=True)
                at_boundary = True
                snapshot()

            # -- the loop ------------------------------------------------------------------------------------
            batches = [stream[i : i + cfg.batch_size] for i in range(0, len(stream), cfg.batch_size)]
            state.status = "running"
            state.save(run_dir)
            bar = _progress_bar(len(stream), state.edits_done)
            t_loop = time.perf_counter()
            loop_before = state.loop_seconds
            last_beat = 0.0
            replay_from = state.next_batch if state.next_batch < len(ledger) else None
            t_replay = time.perf_counter()

            def replayed() -> None:
                nonlocal replay_from
                if replay_from is not None:
                    event(run_dir, "replayed", calls=min(len(ledger), len(batches)) - replay_from,
                          seconds=time.perf_counter() - t_replay)
                    replay_from = None

            try:
                for b in range(state.next_batch, len(batches)):
                    if state.stopped_early:
                        break
                    at_boundary = False
                    batch = batches[b]
                    previous = state.edits_done
                    position = previous + len(batch)  # stream position after this call: the x-axis of every curve
                    ids = [r.case_id for r in batch]
                    seed_rngs(cfg.seed, b)  # the editor's randomness is a function of the cursor alone
                    verdict: tuple[str, str] | None = None
                    if b < len(ledger):  # committed in an earlier session: replay it, no editor call
                        rec = ledger.records[b]
                        editor_stats, edit_seconds = dict(rec.stats), rec.seconds
                        if rec.status == "applied":
                            added, factors = ledger.read_with_factors(b)
                            result = apply_added(model, added, editor_stats, factors)
                            editor.applied(model, tok, batch, result.added)
                        else:
                            result, verdict = None, (rec.reason.split(":", 1)[0], rec.reason.split(": ", 1)[-1])
                    else:
                        replayed()
                        t0 = time.perf_counter()
                        proposal = editor.compute(model, tok, batch)
                        edit_seconds = time.perf_counter() - t0
                        state.edit_seconds += edit_seconds
                        state.edit_calls += 1
                        editor_stats = dict(proposal.stats)
                        result = apply_proposal(model, proposal, declared, allow_nonfinite=True)
                        verdict = guard_verdict(cfg, dict(result.deltas), tracker.w0_norm, model)
                        norm = max((float(torch.linalg.vector_norm(d, dtype=torch.float64))
                                    for d in result.deltas.values()), default=0.0)
                        if verdict is not None and cfg.guard.policy != "allow":
                            revert(model, result)  # exact: the pre-edit values are copied back
                            if cfg.guard.policy == "stop":
                                sinks.alert(position, verdict[0], f"{verdict[1]}; case ids {ids}; rolled back, "
                                            "run stopped (guard.policy=stop)")
                                raise RunError(f"{verdict[1]} at edit {position} (case ids {ids}); the update was "
                                               f"rolled back and the run stopped (guard.policy=stop)")
                            t1 = time.perf_counter()
                            ledger.append(b, position, ids, {}, norm=norm, status="rejected",
                                          reason=f"{verdict[0]}: {verdict[1]}", stats=editor_stats,
                                          seconds=edit_seconds)
                            state.ledger_seconds += time.perf_counter() - t1
                            result = None
                        else:
                            t1 = time.perf_counter()
                            rec = ledger.append(b, position, ids, result.added, proposal.factors, norm=norm,
                                                stats=editor_stats, seconds=edit_seconds)
                            state.ledger_seconds += time.perf_counter() - t1
                            # telemetry uses the factors as the ledger holds them, so a replay reports the same
                            factors = {n: (f[0].detach().cpu(), f[1].detach().cpu())
                                       for n, f in proposal.factors.items() if rec.params[n]["kind"] == "factors"}
                            editor.applied(model, tok, batch, result.added)
                    # -- committed: from here on everything is a function of the weights --------------------
                    state.edits_done = position
                    state.next_batch = b + 1
                    record: dict[str, Any] = {
                        "edit/index": position,
                        "edit/batch": b,
                        "edit/case_ids": ids,
                        "edit/seconds": edit_seconds,
                        "edit/status": "applied" if result is not None else "rejected",
                        "system/rss_mb": rss_mb(),
                        "system/peak_memory_mb": peak_memory_mb(),
                    }
                    record.update({f"editor/{k}": v for k, v in editor_stats.items()})
                    signals: set[str] = set()
                    if result is None:
                        state.rejected += len(batch)
                        sinks.alert(position, verdict[0], f"{verdict[1]}; case ids {ids}; rolled back and "
                                    "rejected (guard.policy=reject)")
                        sinks.log("edits", record)
                    else:
                        applied.extend(batch)
                        wstats = tracker.stats(model, result.deltas, factors)
                        record.update(wstats)
                        # Disabling-edit early warning: an update far above the running window of its parameter.
                        spikes = detector.update(_update_norms(wstats))
                        if spikes:
                            s = spikes[0]
                            signals.add("norm_spike")
                            record["edit/norm_spike"] = 1.0
                            sinks.alert(position, "norm_spike",
                                        f"update norm of {s.param} {s.norm:.4g} = {s.ratio:.3g}x the median of the "
                                        f"previous {cfg.telemetry.spike_window} (robust z {s.z:.1f}); case ids {ids}")
                        if verdict is not None:  # guard.policy=allow: kept, but said
                            sinks.alert(position, verdict[0], f"{verdict[1]}; case ids {ids}; kept "
                                        "(guard.policy=allow)")
                        outcomes = []
                        if cfg.eval.immediate:
                            outcomes = evaluate_requests(model, tok, batch, **score)
                            for k in SCORES:
                                values = [getattr(o, k) for o in outcomes if getattr(o, k) is not None]
                                acc = state.immediate_sums.setdefault(k, [0.0, 0])
                                for v in values:
                                    acc[0] += v
                                acc[1] += len(values)
                                record[f"immediate/{k}"] = _mean(values)
                            record["eval/protocol"] = "immediate"
                        sinks.log("edits", record)
                        sinks.items("items-immediate", [{"edit/index": position, **o.as_dict()} for o in outcomes])
                    due = run_probes(position, signals, previous)
                    bar.update(len(batch))
                    at_boundary = True
                    if cfg.telemetry.stop_on_collapse and collapse.fired and not state.stopped_early:
                        state.stopped_early = "collapse: " + ", ".join(f"{c} at edit {i}"
                                                                       for c, i in collapse.fired.items())
                        event(run_dir, "stopped_early", reason=state.stopped_early, edits_done=position)
                        say(f"stopping early (telemetry.stop_on_collapse): {state.stopped_early}")
                    now = time.time()
                    if now - last_beat >= cfg.telemetry.heartbeat_seconds or b == len(batches) - 1:
                        last_beat = now
                        _heartbeat(run_dir, state, len(stream), t_start, session_start, due, say)
                    if (b + 1) % cfg.checkpoint.snapshot_every == 0:
                        state.loop_seconds = loop_before + time.perf_counter() - t_loop
                        snapshot()
                    elif (b + 1) % cfg.telemetry.state_every == 0:
                        state.save(run_dir)
                    stop.check()  # a stop request during this step is honoured here, at a step boundary
                replayed()
            finally:
                bar.close()
                state.loop_seconds = loop_before + time.perf_counter() - t_loop

            # -- final regime: every edit re-checked once after the last one --------------------------------
            at_boundary = True
            snapshot()
            at_boundary = False  # the final phase writes telemetry after the snapshot: redone on resume
            state.status = "finalizing"
            state.save(run_dir)
            metrics: dict[str, float | None] = {
                f"immediate/{k}": (s[0] / s[1] if s[1] else None)
                for k, s in ((k, state.immediate_sums.get(k, [0.0, 0])) for k in SCORES)}
            if cfg.eval.final:
                final = []
                done = stream[: state.edits_done]  # every request of the stream the run got to
                for i in range(0, len(done), FINAL_CHUNK):
                    stop.check()
                    final.extend(evaluate_requests(model, tok, done[i : i + FINAL_CHUNK], **score))
                stop.check()
                metrics.update({f"final/{k}": _mean([getattr(o, k) for o in final]) for k in SCORES})
                sinks.log("probes", {"edit/index": state.edits_done, "probe/name": "final", "eval/protocol": "final",
                                     **{k: v for k, v in metrics.items() if k.startswith("final/")}})
                sinks.items("items-final", [{"edit/index": state.edits_done, **o.as_dict()} for o in final])
            metrics.update(state.baseline)
            metrics["edit/seconds_mean"] = state.edit_seconds / state.edit_calls if state.edit_calls else None
            write_retention_matrix(run_dir)
            if sinks.wandb.active:  # detection results into the wandb view (the report itself is `seqedit report`)
                sinks.jsonl.sync()
                try:
                    from seqedit.analysis.load import load_run
                    from seqedit.analysis.report import analyse

                    found = analyse(load_run(run_dir))
                    sinks.wandb.attach_analysis(found.summary, found.evidence)
                except Exception as e:  # noqa: BLE001 - a view must never fail the run
                    log.warning("analysis for wandb failed: %s", e)
            sinks.wandb.attach_outputs(run_dir, state.edits_done)
            sinks.close(ok=True)
            summary = RunSummary(run_dir, run_dir.name, "finished", state.edits_done, time.perf_counter() - t_start,
                                 metrics)
            atomic_write_json(run_dir / "summary.json", {
                **dataclasses.asdict(summary), "run_dir": str(run_dir), "probe_seconds": state.probe_seconds,
                "rejected": state.rejected, "resumes": state.resumes, "stopped_early": state.stopped_early,
                "world": state.world, "weights_sha256": model_fingerprint(model, declared), "ledger_bytes": ledger.nbytes()})
            state.status = "finished"  # only now: summary.json is on disk
            state.save(run_dir)
            _heartbeat(run_dir, state, len(stream), t_start, session_start, {}, None)
            event(run_dir, "finished", edits_done=state.edits_done)
            ok = True
            return summary
        except (KeyboardInterrupt, StopRequested) as e:
            state.status, state.message = "preempted", str(e) or repr(e)
            if sinks is not None:  # (a lifecycle event, not telemetry: a resumed run's streams equal a straight one's)
                if at_boundary and snapshot is not None:
                    try:
                        snapshot()
                    except Exception as snap_err:  # noqa: BLE001 - the stop must still be recorded
                        log.warning("snapshot at stop failed: %s", snap_err)
            event(run_dir, "preempted", message=state.message, edits_done=state.edits_done)
            raise
        except ResumeRefused as e:
            event(run_dir, "resume_refused", message=str(e))
            state = RunState.load(run_dir)  # unchanged on disk: the finally below rewrites it as it was
            raise
        except BaseException as e:
            state.status, state.message = "failed", str(e) or repr(e)
            event(run_dir, "failed", message=state.message, error=type(e).__name__, edits_done=state.edits_done)
            if isinstance(e, RunError):
                raise RunError(f"{e} (run state saved in {run_dir})") from e
            raise
        finally:
            state.save(run_dir)
            _heartbeat(run_dir, state, cfg.n_edits, t_start, session_start, {}, None)
            if sinks is not None and not ok:
                sinks.close(ok=False)


def _update_norms(record: dict[str, Any]) -> dict[str, float]:
    """{param: ‖ΔW‖_F} from weights/<param>/delta_fro keys (a live wstats dict or an edits.jsonl record)."""
    return {k[len("weights/"): -len("/delta_fro")]: float(v) for k, v in record.items()
            if k.startswith("weights/") and k.endswith("/delta_fro") and isinstance(v, (int, float))}


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


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


def _heartbeat(run_dir: Path, state: RunState, total: int, t_start: float, session_start: int,
               latest: dict[str, Any], say: Callable[[str], None] | None) -> None:
    elapsed = time.perf_counter() - t_start
    rate = (state.edits_done - session_start) / elapsed if elapsed > 0 else 0.0
    eta = (total - state.edits_done) / rate if rate > 0 else None
    beat = {"state": state.status, "edit": state.edits_done, "total": total, "rate_per_s": rate, "eta_s": eta,
            "time": time.time(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
            **{k: v for k, v in latest.items() if isinstance(v, (int, float))}}
    atomic_write_json(run_dir / "heartbeat.json", beat)
    if say is not None:
        extra = " ".join(f"{k.split('/', 1)[-1]}={v:.3g}" for k, v in latest.items()
                         if isinstance(v, float) and not k.endswith("seconds"))
        say(f"edit={state.edits_done}/{total} rate={rate:.2f}/s eta={eta or 0:.0f}s {extra}".rstrip())


def _progress_bar(total: int, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="edit", desc="editing", disable=None, leave=False)
