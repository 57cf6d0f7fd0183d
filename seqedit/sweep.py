"""Sweeps: one base config x a grid of overrides -> runs with stable ids, one sweep directory, one wandb group.

    seqedit sweep CONFIG [overrides] --grid editor.name=ft,rome --grid seed=0,1 [--executor serial|pool|
        submitit-local|slurm] [--partition P --time MIN --gpus N --cpus N --mem-gb G --account A --constraint C
        --signal-delay-s S]
    seqedit sweep --status SWEEP_DIR [--resubmit-failed]

A grid can also live in the config file, beside the run's own keys:

    sweep:
      grid:
        seed: [0, 1]
        editor: [{name: rome, value: {num_grad_steps: 5}}, {name: ft, num_steps: 3}]   # whole sections are values too
      executor: {kind: slurm, partition: gpu, time_min: 240, gpus: 1, cpus: 8, mem_gb: 64}

Every point of the grid is built and preflighted (unknown keys with a did-you-mean, wrong values named) before
anything is written. A point's run is the driver's run of that config, in `SWEEP_DIR/runs/<run_id>`: the run id is
the config hash, so a relaunch of the same sweep (or a requeued job) finds and continues the same directories
through the driver's resume (`runs.find_resumable`). The sweep id hashes the axes and the points' config hashes.
Nothing here runs an edit loop: each job is `driver.run(cfg, run_dir=find_resumable(cfg))`.

Executors: `serial` (in this process, one after another), `pool` (a local process pool of `workers`),
`submitit-local` (submitit's LocalExecutor: one process per run, the same requeue machinery as Slurm; for tests) and
`slurm` (submitit's SlurmExecutor: one job array). A job is a submitit `Checkpointable`: on the pre-timeout or
preemption signal (USR2, `--signal=USR2@signal_delay_s`) the loop stops at its next safe point (state saved,
snapshot at the boundary), then submitit checkpoints the job (the same job again) and requeues it; the requeued job
resumes the run bit-exactly from its snapshot + ledger.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seqedit.config import (ConfigError, EditorSection, RunConfig, apply_overrides, build_dataclass, dump_yaml,
                            from_dict, load_config, parse_override, read_tree, set_dotted)
from seqedit.io import atomic_write_json, atomic_write_text
from seqedit.paths import expand_user
from seqedit.registry import did_you_mean

EXECUTORS = ("serial", "pool", "submitit-local", "slurm")
# Set by the sweep for every run: a grid over them would put runs outside the sweep or break its wandb group.
SWEEP_OWNED = ("runs_dir", "wandb.group", "wandb.tags")
SWEEP_SECTION_KEYS = ("grid", "executor", "name")
FAILED_STATES = ("failed", "preempted", "created?", "running?", "finalizing?")


class SweepError(ConfigError):
    """Bad sweep input; raised before anything is created."""


@dataclass(frozen=True)
class ExecutorConfig:
    kind: str = "serial"  # serial | pool | submitit-local | slurm
    workers: int = 2  # pool size (local process pool)
    # Slurm (sbatch) resources, one job per run, submitted as one array
    partition: str | None = None
    time_min: float = 240  # --time (minutes, rounded up for Slurm); past it a job is signalled, stops, requeues, resumes
    gpus: int = 0  # --gpus-per-node
    cpus: int = 1  # --cpus-per-task (set the run's `threads` to match)
    mem_gb: float | None = None  # --mem
    account: str | None = None
    constraint: str | None = None
    qos: str | None = None
    signal_delay_s: int = 120  # --signal=USR2@N: the warning before the time limit; the loop stops at a safe point
    max_requeues: int = 3  # timeouts after which a job is not requeued again (submitit's max_num_timeout)
    array_parallelism: int = 64  # runs of the array at once
    setup: tuple[str, ...] = ()  # shell lines before the job (module load ..., source .venv/bin/activate)
    extra: Mapping[str, Any] = field(default_factory=dict)  # further sbatch options, e.g. {exclude: node7}


@dataclass(frozen=True)
class Axis:
    key: str
    values: tuple[Any, ...]
    source: str  # where it was given, for messages: "--grid" or "sweep.grid"


@dataclass(frozen=True)
class Point:
    point_id: str  # sha256 of the point's resolved overrides (its axis assignment)
    assignment: tuple[tuple[str, Any], ...]  # (key, value) per axis, in axis order
    run_id: str  # the driver's run id of the built config (name-hash8-sSEED)
    config_hash: str
    tags: tuple[str, ...]

    def label(self) -> str:
        return " ".join(f"{k}={_short(v)}" for k, v in self.assignment)


@dataclass(frozen=True)
class SweepPlan:
    sweep_id: str
    name: str
    sweep_dir: Path
    source: Mapping[str, Any]  # config path and overrides it was made from (in the manifest)
    axes: tuple[Axis, ...]
    points: tuple[Point, ...]
    configs: Mapping[str, RunConfig]  # point_id -> built config (runs_dir, wandb group/tags set)
    executor: ExecutorConfig
    wandb_group: str

    @property
    def runs_dir(self) -> Path:
        return self.sweep_dir / "runs"


# -- grid parsing and validation --------------------------------------------------------------------------------

def split_values(raw: str) -> list[str]:
    """'a,[1,2],{x: 1, y: 2}' -> ['a', '[1,2]', '{x: 1, y: 2}']: commas inside brackets or quotes do not split."""
    out, depth, quote, cur = [], 0, "", []
    for ch in raw:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur))
    return out


def parse_grid_arg(text: str) -> Axis:
    """`key=v1,v2,...` (each value read as YAML, as overrides are) -> Axis."""
    if "=" not in text:
        raise SweepError(f"--grid {text!r} must look like key=v1,v2 (e.g. --grid seed=0,1,2)")
    key, _, raw = text.partition("=")
    key = key.strip()
    pieces = split_values(raw)
    if not key or any(not p.strip() for p in pieces):
        raise SweepError(f"--grid {text!r}: a key and non-empty comma-separated values are needed (e.g. seed=0,1)")
    values = tuple(parse_override(f"{key}={p.strip()}")[1] for p in pieces)
    return Axis(key, values, "--grid")


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _short(value: Any) -> str:
    """A tag-sized rendering of an axis value (a section value shows its name)."""
    if isinstance(value, Mapping):
        text = str(value.get("name", "")) or _canon(value)
        rest = {k: v for k, v in value.items() if k != "name"}
        if rest and "name" in value:
            text += "+" + hashlib.sha256(_canon(rest).encode()).hexdigest()[:6]
    elif isinstance(value, str):
        text = value
    else:
        text = _canon(value)
    return text[:48]


def _editor_names(axes: Sequence[Axis], tree: Mapping[str, Any], overrides: Sequence[str] = ()) -> list[str]:
    """The editors a sweep will build: from an editor.name / editor axis, else an editor.name override, else the
    base config's."""
    default = EditorSection().name
    for ax in axes:
        if ax.key == "editor.name":
            return [str(v) for v in ax.values]
        if ax.key == "editor":
            return [str(v.get("name", default)) if isinstance(v, Mapping) else str(v) for v in ax.values]
    named = [o.split("=", 1)[1].strip() for o in overrides if o.split("=", 1)[0].strip() == "editor.name"]
    if named:
        return [named[-1]]  # the last override wins, as in load_config
    ed = tree.get("editor", default)
    return [str(ed.get("name", default)) if isinstance(ed, Mapping) else str(ed)]


def check_key(axis: Axis, editor_names: Sequence[str]) -> None:
    """The axis key names a config key (did-you-mean otherwise) that a sweep may vary."""
    import typing

    key = axis.key
    where = f"{axis.source} {key!r}"
    if key in SWEEP_OWNED or any(key.startswith(k + ".") for k in SWEEP_OWNED) or key in ("wandb",):
        raise SweepError(f"{where}: the sweep sets {', '.join(SWEEP_OWNED)} for every run; it cannot be an axis")
    parts = key.split(".")
    cls: Any = RunConfig
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        if cls is EditorSection:
            from seqedit.editors.base import make_editor

            allowed: set[str] = {"name"}
            for name in editor_names:
                try:
                    allowed |= {f.name for f in dataclasses.fields(make_editor(name, {}).config)}
                except KeyError as e:
                    raise SweepError(f"{where}: {e}") from None
            if part not in allowed:
                raise SweepError(f"{where}: unknown config key {here!r} for editor(s) {', '.join(editor_names)}; "
                                 f"{did_you_mean(part, allowed)}")
            if i != len(parts) - 1:
                raise SweepError(f"{where}: {here!r} is an editor option, not a section")
            return
        if cls is None or not dataclasses.is_dataclass(cls):
            raise SweepError(f"{where}: {'.'.join(parts[:i])!r} is not a section")
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        if part not in fields:
            raise SweepError(f"{where}: unknown config key {here!r}; {did_you_mean(part, fields)}")
        tp = hints[part]
        cls = tp if dataclasses.is_dataclass(tp) else None


def check_axes(axes: Sequence[Axis], overrides: Sequence[str], tree: Mapping[str, Any]) -> None:
    """Unknown keys, owned keys, duplicate or overlapping axes, axes also given as overrides, empty or repeated
    values: refused, naming the key."""
    editors = _editor_names(axes, tree, overrides)
    seen: dict[str, Axis] = {}
    for ax in axes:
        if ax.key in seen:
            raise SweepError(f"axis {ax.key!r} is given twice ({seen[ax.key].source} and {ax.source}); give it once "
                             "with all its values")
        for other in seen:
            if other.startswith(ax.key + ".") or ax.key.startswith(other + "."):
                raise SweepError(f"axes {other!r} and {ax.key!r} overlap (one is inside the other); vary the whole "
                                 f"section or its key, not both")
        seen[ax.key] = ax
        if not ax.values:
            raise SweepError(f"{ax.source} {ax.key!r}: no values")
        canon = [_canon(v) for v in ax.values]
        dups = sorted({c for c in canon if canon.count(c) > 1})
        if dups:
            raise SweepError(f"{ax.source} {ax.key!r}: value(s) {', '.join(dups)} given more than once")
        check_key(ax, editors)
    for ov in overrides:
        key = parse_override(ov)[0]
        for ax in axes:
            if key == ax.key or key.startswith(ax.key + ".") or ax.key.startswith(key + "."):
                raise SweepError(f"override {ov!r} conflicts with the axis {ax.key!r} ({ax.source}): a key is "
                                 "either fixed or varied")


# -- planning (validates everything, creates nothing) ----------------------------------------------------------

def point_id(assignment: Sequence[tuple[str, Any]]) -> str:
    return hashlib.sha256(_canon(sorted((k, v) for k, v in assignment)).encode()).hexdigest()[:10]


def plan_sweep(config: str | Path | None, overrides: Sequence[str] = (), grid: Sequence[str] = (),
               executor: Mapping[str, Any] | None = None, sweep_dir: str | Path | None = None,
               name: str | None = None, check_runs: bool = True) -> SweepPlan:
    """Expand and validate the sweep: every point's config is built and preflighted; nothing is written."""
    from seqedit.preflight import preflight

    tree = read_tree(config)
    section = tree.pop("sweep", None) or {}
    if not isinstance(section, Mapping):
        raise SweepError(f"sweep: expected a mapping with {', '.join(SWEEP_SECTION_KEYS)}, got {section!r}")
    for k in section:
        if k not in SWEEP_SECTION_KEYS:
            raise SweepError(f"unknown config key 'sweep.{k}'; {did_you_mean(str(k), SWEEP_SECTION_KEYS)}")
    yaml_grid = section.get("grid") or {}
    if not isinstance(yaml_grid, Mapping):
        raise SweepError(f"sweep.grid: expected a mapping of key -> list of values, got {yaml_grid!r}")
    axes = []
    for key, values in yaml_grid.items():
        if not isinstance(values, (list, tuple)):
            raise SweepError(f"sweep.grid {key!r}: expected a list of values, got {values!r}")
        axes.append(Axis(str(key), tuple(values), "sweep.grid"))
    axes += [parse_grid_arg(g) for g in grid]
    if not axes:
        raise SweepError("a sweep needs at least one axis: --grid key=v1,v2 or a sweep.grid section")
    check_axes(axes, overrides, tree)
    base = apply_overrides(tree, overrides)

    exec_tree = {**(section.get("executor") or {}), **(executor or {})}
    ex = build_dataclass(ExecutorConfig, exec_tree, "sweep.executor")
    if ex.kind not in EXECUTORS:
        raise SweepError(f"sweep.executor.kind: {ex.kind!r} is not allowed; allowed: {', '.join(EXECUTORS)}")
    if not ex.time_min > 0:
        raise SweepError(f"sweep.executor.time_min: {ex.time_min} must be > 0")
    for k in ("workers", "cpus", "max_requeues", "array_parallelism"):
        if getattr(ex, k) < 1:
            raise SweepError(f"sweep.executor.{k}: {getattr(ex, k)} must be >= 1")
    if ex.gpus < 0 or ex.signal_delay_s < 0:
        raise SweepError("sweep.executor.gpus and signal_delay_s must be >= 0")
    if ex.signal_delay_s >= 60 * ex.time_min:
        raise SweepError(f"sweep.executor.signal_delay_s ({ex.signal_delay_s}) must be shorter than the time limit "
                         f"({ex.time_min} min)")
    if ex.kind in ("submitit-local", "slurm"):
        require_submitit()

    configs: dict[str, RunConfig] = {}
    points: list[Point] = []
    by_hash: dict[str, Point] = {}
    for combo in itertools.product(*[[(ax.key, v) for v in ax.values] for ax in axes]):
        point_tree = copy.deepcopy(base)
        for key, value in combo:
            set_dotted(point_tree, key, copy.deepcopy(value))
        label = " ".join(f"{k}={_short(v)}" for k, v in combo)
        try:
            cfg = from_dict(point_tree)
            if check_runs:
                preflight(cfg)
        except (ValueError, KeyError) as e:
            raise SweepError(f"sweep point {label}: {e}") from None
        pid = point_id(combo)
        tags = tuple(f"{k}={_short(v)}"[:64] for k, v in combo)
        p = Point(pid, tuple(combo), cfg.run_id, cfg.config_hash(), tags)
        if p.config_hash in by_hash:
            raise SweepError(f"sweep points {by_hash[p.config_hash].label()} and {label} build the same run (they "
                             "differ only in resume-safe keys or in how a value is written); drop one")
        by_hash[p.config_hash] = p
        configs[pid] = cfg
        points.append(p)

    sweep_name = name or section.get("name") or str(base.get("name", "sweep"))
    digest = hashlib.sha256(_canon({"axes": [[a.key, list(a.values)] for a in axes],
                                    "runs": [p.config_hash for p in points]}).encode()).hexdigest()[:8]
    sweep_id = f"{sweep_name}-{digest}"
    # base is the raw tree: its runs_dir has not been through RunConfig, so ~ is expanded here (seqedit.paths)
    root = (Path(expand_user(str(sweep_dir))) if sweep_dir is not None
            else Path(expand_user(str(base.get("runs_dir", "runs")))) / "sweeps" / sweep_id)
    root = root.absolute()
    # one wandb group per sweep (an explicit wandb.group is kept; it cannot be an axis, so all points share it)
    group = configs[points[0].point_id].wandb.group or sweep_id
    for p in points:
        cfg = configs[p.point_id]
        configs[p.point_id] = dataclasses.replace(
            cfg, runs_dir=str(root / "runs"),
            wandb=dataclasses.replace(cfg.wandb, group=group, tags=(*cfg.wandb.tags, *p.tags)))
    source = {"config": str(config) if config is not None else None, "overrides": list(overrides),
              "grid": list(grid)}
    return SweepPlan(sweep_id, sweep_name, root, source, tuple(axes), tuple(points), configs, ex, group)


# -- the sweep directory ----------------------------------------------------------------------------------------

def manifest_path(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / "sweep.json"


def read_manifest(sweep_dir: str | Path) -> dict[str, Any]:
    path = manifest_path(Path(sweep_dir))
    if not path.is_file():
        raise SweepError(f"{sweep_dir} is not a sweep directory (no sweep.json)")
    return json.loads(path.read_text())


def write_sweep(plan: SweepPlan) -> dict[str, Any]:
    """Create (or find again) the sweep directory: one config per point and the manifest, written atomically."""
    old = None
    if manifest_path(plan.sweep_dir).is_file():
        old = read_manifest(plan.sweep_dir)
        if old["sweep_id"] != plan.sweep_id:
            raise SweepError(f"{plan.sweep_dir} holds sweep {old['sweep_id']}, not {plan.sweep_id}; give another "
                             "--sweep-dir")
    for p in plan.points:
        atomic_write_text(plan.sweep_dir / "configs" / f"{p.point_id}.yaml",
                          f"# sweep {plan.sweep_id} point {p.point_id}: {p.label()}\n"
                          f"# config_hash: {p.config_hash}\n" + dump_yaml(plan.configs[p.point_id]))
    (plan.sweep_dir / "runs").mkdir(parents=True, exist_ok=True)
    manifest = {
        "sweep_id": plan.sweep_id, "name": plan.name, "created_at": old["created_at"] if old else time.time(),
        "source": dict(plan.source), "wandb_group": plan.wandb_group,
        "axes": [{"key": a.key, "values": list(a.values), "source": a.source} for a in plan.axes],
        "executor": dataclasses.asdict(plan.executor),
        "points": [{"point_id": p.point_id, "assignment": dict(p.assignment), "label": p.label(),
                    "run_id": p.run_id, "config_hash": p.config_hash, "tags": list(p.tags),
                    "config": f"configs/{p.point_id}.yaml"} for p in plan.points],
        "launches": old.get("launches", []) if old else [],
    }
    atomic_write_json(manifest_path(plan.sweep_dir), manifest)
    return manifest


def _record_launch(sweep_dir: Path, executor: str, job_ids: Mapping[str, str]) -> None:
    manifest = read_manifest(sweep_dir)  # only the launcher writes the manifest; jobs write jobs/<point>.json
    manifest["launches"].append({"time": time.time(), "executor": executor, "job_ids": dict(job_ids)})
    atomic_write_json(manifest_path(sweep_dir), manifest)


def point_config(sweep_dir: str | Path, pid: str) -> RunConfig:
    """A point's built config, with runs_dir pointing into this sweep directory (wherever it now is)."""
    sweep_dir = Path(sweep_dir)
    cfg = load_config(sweep_dir / "configs" / f"{pid}.yaml")
    return dataclasses.replace(cfg, runs_dir=str(sweep_dir / "runs"))


# -- the job ----------------------------------------------------------------------------------------------------

def require_submitit():
    try:
        import submitit
    except ImportError:
        raise SweepError("the submitit-local and slurm executors need submitit: pip install 'seqedit[slurm]' "
                         "(or use --executor serial / pool)") from None
    return submitit


def _job_id() -> str:
    if os.environ.get("SUBMITIT_EXECUTOR"):
        try:
            import submitit

            return str(submitit.JobEnvironment().job_id)
        except Exception:  # noqa: BLE001 - the id is informational
            pass
    return os.environ.get("SLURM_JOB_ID", "") or f"pid{os.getpid()}"


@contextmanager
def _submitit_preemption() -> Iterator[dict[str, Any]]:
    """Under submitit, in the job's main thread: the preemption/timeout signal (USR2) asks the driver loop to stop
    at its next safe point instead of exiting wherever it is; once the run has stopped (state 'preempted', snapshot
    at the step boundary), submitit's own handler checkpoints and requeues (`requeue()`). SIGTERM (scancel, or
    Slurm's own preemption, which requeues by itself) stops the loop the same way, without a requeue.
    Elsewhere (serial, pool) the driver's own handlers do all this."""
    hooks: dict[str, Any] = {"requeue": None}
    if not os.environ.get("SUBMITIT_EXECUTOR") or threading.current_thread() is not threading.main_thread():
        yield hooks
        return
    from submitit.core.job_environment import JobEnvironment

    from seqedit.signals import request_stop

    usr = JobEnvironment._usr_sig()
    theirs = signal.getsignal(usr)
    previous_term = signal.getsignal(signal.SIGTERM)

    def on_usr(signum, frame):
        if callable(theirs):
            hooks["requeue"] = lambda: theirs(signum, None)
        if not request_stop(signum) and callable(theirs):
            theirs(signum, frame)  # no loop listening (start-up, or done): submitit's behaviour, at once

    def on_term(signum, frame):
        request_stop(signum)

    signal.signal(usr, on_usr)
    signal.signal(signal.SIGTERM, on_term)
    try:
        yield hooks
    finally:
        signal.signal(usr, theirs)
        signal.signal(signal.SIGTERM, previous_term)


try:  # a job is a submitit Checkpointable when submitit is installed (the serial/pool executors need neither)
    from submitit.helpers import Checkpointable as _JobBase
except ImportError:  # pragma: no cover - exercised where seqedit[slurm] is not installed
    _JobBase = object  # type: ignore[misc,assignment]


@dataclass(frozen=True)
class SweepJob(_JobBase):
    """One point of a sweep: run (or continue) its config through the driver. Stateless: everything it needs is on
    disk, so a requeued copy resumes exactly where the stopped one left off."""

    sweep_dir: str
    point_id: str

    def __call__(self) -> dict[str, Any]:
        from seqedit.driver import run
        from seqedit.runs import find_resumable
        from seqedit.signals import StopRequested

        from seqedit.checkpoint import RunLock

        sweep_dir = Path(self.sweep_dir)
        cfg = point_config(sweep_dir, self.point_id)
        run_dir = find_resumable(cfg)  # a relaunch or a requeued job continues the same directory
        if run_dir is not None and RunLock.is_locked(run_dir):  # a duplicate job: leave the live one's record alone
            raise SweepError(f"point {self.point_id}: {run_dir} is being run by another process")
        rec = _job_record(sweep_dir, self.point_id, started=True)

        def say(msg: str) -> None:
            print(f"[{self.point_id}] {msg}", file=sys.stderr, flush=True)

        with _submitit_preemption() as hooks:
            if run_dir is not None:
                say(f"continuing {run_dir}")
            try:
                summary = run(cfg, progress=say, run_dir=run_dir)
            except StopRequested:
                _job_record(sweep_dir, self.point_id, status="preempted", attempt=rec["attempt"])
                if hooks["requeue"] is not None:
                    hooks["requeue"]()  # submitit: checkpoint() -> this job again, requeue, exit
                raise
            except BaseException as e:
                _job_record(sweep_dir, self.point_id, status="failed", attempt=rec["attempt"],
                            message=f"{type(e).__name__}: {e}"[:500])
                raise
        sha = json.loads((summary.run_dir / "summary.json").read_text()).get("weights_sha256")
        _job_record(sweep_dir, self.point_id, status=summary.status, attempt=rec["attempt"])
        return {"point_id": self.point_id, "run_dir": str(summary.run_dir), "status": summary.status,
                "n_edits": summary.n_edits, "weights_sha256": sha}

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's requeue hook: the same (stateless) job; it resumes the run from its snapshot + ledger."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(SweepJob(self.sweep_dir, self.point_id))


def _job_record(sweep_dir: Path, pid: str, started: bool = False, **fields: Any) -> dict[str, Any]:
    """jobs/<point>.json: the job id (Slurm array id), host, pid and attempt of the job working on a point."""
    path = Path(sweep_dir) / "jobs" / f"{pid}.json"
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        rec = {"attempt": 0}
    if started:
        rec.update(attempt=int(rec.get("attempt", 0)) + 1, job_id=_job_id(), host=socket.gethostname(),
                   pid=os.getpid(), started_at=time.time(), status="running",
                   executor=os.environ.get("SUBMITIT_EXECUTOR") or "local")
        rec.pop("message", None)
    rec.update(fields, updated_at=time.time())
    atomic_write_json(path, rec)
    return rec


# -- executors --------------------------------------------------------------------------------------------------

def slurm_parameters(ex: ExecutorConfig, name: str) -> dict[str, Any]:
    """ExecutorConfig -> submitit.SlurmExecutor parameters (sbatch options)."""
    params: dict[str, Any] = {"job_name": f"seqedit-{name}", "time": math.ceil(ex.time_min), "cpus_per_task": ex.cpus,
                              "signal_delay_s": int(ex.signal_delay_s), "array_parallelism": ex.array_parallelism}
    if ex.gpus:
        params["gpus_per_node"] = ex.gpus
    if ex.mem_gb is not None:
        params["mem"] = f"{int(ex.mem_gb)}GB" if float(ex.mem_gb).is_integer() else f"{int(ex.mem_gb * 1024)}MB"
    for key in ("partition", "account", "constraint", "qos"):
        if getattr(ex, key):
            params[key] = getattr(ex, key)
    if ex.setup:
        params["setup"] = list(ex.setup)
    if ex.extra:
        params["additional_parameters"] = dict(ex.extra)
    return params


def _slurm_executor(folder: Path, ex: ExecutorConfig, name: str, check: bool = True):
    submitit = require_submitit()
    cls = submitit.SlurmExecutor
    if not check:  # render the sbatch script on a machine without Slurm (dry run, tests)
        class _Offline(submitit.SlurmExecutor):
            @classmethod
            def affinity(cls) -> int:
                return 2

        cls = _Offline
    else:
        check_can_submit(ex)
    executor = cls(folder=str(folder), max_num_timeout=ex.max_requeues)
    try:
        executor.update_parameters(**slurm_parameters(ex, name))
    except ValueError as e:
        raise SweepError(f"sweep.executor: {e}") from None
    return executor


def check_can_submit(ex: ExecutorConfig) -> None:
    """Refuse a Slurm sweep where there is no Slurm, before the sweep directory is created."""
    if ex.kind == "slurm" and shutil.which("sbatch") is None:
        raise SweepError("--executor slurm: sbatch is not on PATH (not a Slurm login node?); use --dry-run to see "
                         "the sbatch script, or --executor submitit-local / pool / serial")


def sbatch_script(plan: SweepPlan, n_jobs: int | None = None) -> str:
    """The sbatch script submitit writes for this sweep's job array (rendered without Slurm)."""
    executor = _slurm_executor(plan.sweep_dir / "submitit", plan.executor, plan.name, check=False)
    n = len(plan.points) if n_jobs is None else n_jobs
    if n > 1:
        executor.parameters["map_count"] = n  # what submitit sets for an array submission
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


def _call(job: Callable[[], Any]) -> Any:
    return job()


@dataclass(frozen=True)
class Executed:
    job_ids: Mapping[str, str]  # key -> submitit job id ("" for serial / pool)
    results: Mapping[str, Any]  # key -> the job's return value, or {"status": "failed", "error": ...}
    handles: Mapping[str, Any]  # key -> submitit Job (submitit executors)
    seconds: float


def submitit_executor(ex: ExecutorConfig, folder: Path, name: str):
    """The submitit executor of `ex.kind` (submitit-local or slurm), its parameters set."""
    submitit = require_submitit()
    if ex.kind == "slurm":
        return _slurm_executor(folder, ex, name)
    executor = submitit.LocalExecutor(folder=str(folder), max_num_timeout=ex.max_requeues)
    executor.update_parameters(timeout_min=ex.time_min, signal_delay_s=ex.signal_delay_s,
                               **({"setup": list(ex.setup)} if ex.setup else {}))
    return executor


def execute(jobs: Mapping[str, Callable[[], Any]], ex: ExecutorConfig, folder: Path, name: str,
            wait: bool = True, on_done: Callable[[str, Any], None] | None = None,
            on_submitted: Callable[[Mapping[str, str]], None] | None = None) -> Executed:
    """Run picklable zero-argument callables with the executor `ex` (submitit jobs get their logs and pickles in
    `folder`; a Slurm batch is one job array). A failing job does not stop the others; Ctrl-C / SIGTERM in a
    serial sweep stops it (the run is saved as preempted). `on_submitted(job_ids)` is called once the jobs are
    handed to the executor, `on_done(key, result)` as they finish."""
    from seqedit.signals import StopRequested

    done = on_done or (lambda key, result: None)
    results: dict[str, Any] = {}
    job_ids: dict[str, str] = {k: "" for k in jobs}
    handles: dict[str, Any] = {}
    t0 = time.perf_counter()

    def failed(e: BaseException) -> dict[str, Any]:
        return {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]}

    submitted_cb = on_submitted or (lambda ids: None)
    if ex.kind == "serial":
        submitted_cb(job_ids)
        for key, job in jobs.items():
            try:
                results[key] = job()
            except StopRequested:
                raise
            except Exception as e:  # noqa: BLE001 - one failed run does not stop the sweep
                results[key] = failed(e)
            done(key, results[key])
    elif ex.kind == "pool":
        import concurrent.futures as cf
        import multiprocessing as mp

        # spawn: no forked copy of this process's torch threads / open files; each worker imports afresh
        with cf.ProcessPoolExecutor(max_workers=ex.workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_call, job): key for key, job in jobs.items()}
            submitted_cb(job_ids)
            for fut in cf.as_completed(futures):
                key = futures[fut]
                try:
                    results[key] = fut.result()
                except Exception as e:  # noqa: BLE001
                    results[key] = failed(e)
                done(key, results[key])
    else:
        executor = submitit_executor(ex, folder, name)
        if jobs:
            with executor.batch():  # one job array on Slurm
                submitted = [executor.submit(job) for job in jobs.values()]
            for key, handle in zip(jobs, submitted):
                handles[key] = handle
                job_ids[key] = str(handle.job_id)
        submitted_cb(job_ids)
        if wait:
            for key, handle in handles.items():
                try:
                    results[key] = handle.result()
                except Exception as e:  # noqa: BLE001
                    results[key] = failed(e)
                done(key, results[key])
    return Executed(job_ids, results, handles, time.perf_counter() - t0)


def launch(plan: SweepPlan, point_ids: Sequence[str] | None = None, wait: bool | None = None,
           progress: Callable[[str], None] | None = None) -> Executed:
    """Run the sweep's points (all, or `point_ids`) with its executor; waits by default except on Slurm. Points
    whose run has finished are not launched again (a relaunch only continues what is left)."""
    from seqedit.runs import find_resumable

    say = progress or (lambda msg: None)
    ex = plan.executor
    todo = [p for p in plan.points if point_ids is None or p.point_id in point_ids]
    from seqedit.checkpoint import RunLock

    finished, jobs = {}, {}
    for p in todo:
        found = find_resumable(plan.configs[p.point_id])
        if found is not None and (found / "summary.json").is_file():
            finished[p.point_id] = {"status": "finished", "run_dir": str(found), "skipped": True}
        elif found is not None and RunLock.is_locked(found):
            finished[p.point_id] = {"status": "running", "run_dir": str(found), "skipped": True}
            say(f"sweep: {p.point_id} is running already ({found}); not launched again")
        else:
            jobs[p.point_id] = SweepJob(str(plan.sweep_dir), p.point_id)
    labels = {p.point_id: p.label() for p in plan.points}
    say(f"sweep {plan.sweep_id}: {len(jobs)} run(s) to go ({ex.kind}), {len(finished)} finished already")
    wait = ex.kind != "slurm" if wait is None else wait
    out = execute(jobs, ex, plan.sweep_dir / "submitit", plan.name, wait=wait,
                  on_done=lambda pid, r: say(f"sweep: {pid} ({labels[pid]}) {r.get('status')}"
                                             + (f": {r['error']}" if r.get("error") else "")),
                  on_submitted=lambda ids: _record_launch(plan.sweep_dir, ex.kind, ids))
    return Executed(out.job_ids, {**finished, **out.results}, out.handles, out.seconds)


# -- status, resubmission, report -------------------------------------------------------------------------------

@dataclass(frozen=True)
class PointStatus:
    point_id: str
    label: str
    run_dir: Path | None
    state: str
    edits: str
    heartbeat: str
    alerts: str
    job_id: str
    message: str

    def row(self) -> list[str]:
        return [self.point_id, self.label, self.run_dir.name if self.run_dir else "-", self.state, self.edits,
                self.heartbeat, self.alerts, self.job_id or "-", self.message[:50]]


def _point_run_dir(sweep_dir: Path, run_id: str) -> Path | None:
    root = sweep_dir / "runs"
    found = [p for p in [root / run_id, *sorted(root.glob(f"{run_id}-r*"))] if (p / "state.json").is_file()]
    return found[-1] if found else None


def sweep_status(sweep_dir: str | Path) -> list[PointStatus]:
    """One row per point from its run's state.json / heartbeat / alerts and its job record."""
    from seqedit.runs import run_status

    sweep_dir = Path(sweep_dir)
    manifest = read_manifest(sweep_dir)
    submitted: dict[str, str] = {}
    for launch_rec in manifest.get("launches", []):
        submitted.update({k: v for k, v in launch_rec.get("job_ids", {}).items() if v})
    rows = []
    for p in manifest["points"]:
        pid = p["point_id"]
        try:
            job = json.loads((sweep_dir / "jobs" / f"{pid}.json").read_text())
        except (OSError, ValueError):
            job = {}
        job_id = str(job.get("job_id") or submitted.get(pid, ""))
        if job.get("attempt", 0) > 1:
            job_id += f" (attempt {job['attempt']})"
        run_dir = _point_run_dir(sweep_dir, p["run_id"])
        if run_dir is None:
            state = "submitted" if pid in submitted else "not started"
            rows.append(PointStatus(pid, p["label"], None, state, "-", "-", "-", job_id, job.get("message", "")))
            continue
        try:
            st = run_status(run_dir)
        except (RuntimeError, OSError, ValueError) as e:
            rows.append(PointStatus(pid, p["label"], run_dir, "unreadable", "-", "-", "-", job_id, str(e)))
            continue
        age = f"{st.heartbeat_age_s:.0f}s ago" if st.heartbeat_age_s is not None else "-"
        alerts = f"{st.alerts}" + (f" ({st.last_alert})" if st.last_alert else "")
        message = "" if st.state == "finished" else st.message or job.get("message", "")  # (a past stop's reason)
        rows.append(PointStatus(pid, p["label"], run_dir, st.state, f"{st.edits_done}/{st.total}", age, alerts,
                                job_id, message))
    return rows


def format_sweep_status(rows: Sequence[PointStatus]) -> str:
    header = ["point", "axes", "run", "state", "edits", "heartbeat", "alerts", "job", "message"]
    table = [header] + [r.row() for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    return "\n".join(lines + [", ".join(f"{n} {s}" for s, n in sorted(counts.items()))])


def plan_from_manifest(sweep_dir: str | Path, executor: Mapping[str, Any] | None = None) -> SweepPlan:
    """The plan of an existing sweep directory (for --resubmit-failed), its executor settings updated."""
    sweep_dir = Path(sweep_dir).absolute()
    m = read_manifest(sweep_dir)
    ex = build_dataclass(ExecutorConfig, {**m["executor"], **(executor or {})}, "sweep.executor")
    if ex.kind not in EXECUTORS:
        raise SweepError(f"sweep.executor.kind: {ex.kind!r} is not allowed; allowed: {', '.join(EXECUTORS)}")
    points = tuple(Point(p["point_id"], tuple(p["assignment"].items()), p["run_id"], p["config_hash"],
                         tuple(p["tags"])) for p in m["points"])
    configs = {p.point_id: point_config(sweep_dir, p.point_id) for p in points}
    axes = tuple(Axis(a["key"], tuple(a["values"]), a["source"]) for a in m["axes"])
    return SweepPlan(m["sweep_id"], m["name"], sweep_dir, m["source"], axes, points, configs, ex, m["wandb_group"])


def failed_points(sweep_dir: str | Path) -> list[str]:
    """Points to resubmit: failed, preempted and not held by any process, killed (`running?`), or never started
    although submitted (the job died before the run directory existed); on Slurm not those whose job is still
    queued or running (a requeued job waiting for a node)."""
    out = []
    for r in sweep_status(sweep_dir):
        if r.state in FAILED_STATES or r.state == "submitted" and _job_dead(Path(sweep_dir), r.point_id):
            if not _slurm_job_alive(Path(sweep_dir), r.job_id.split(" ")[0]):
                out.append(r.point_id)
    return out


SLURM_ALIVE = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
               "SUSPENDED", "RESIZING", "STAGE_OUT", "SIGNALING")


def _slurm_job_alive(sweep_dir: Path, job_id: str) -> bool:
    if not job_id or job_id.startswith("pid") or shutil.which("sacct") is None:
        return False  # not a Slurm job (or no Slurm here): a run not held by a process is not alive
    try:
        import submitit

        state = submitit.SlurmJob(folder=str(sweep_dir / "submitit"), job_id=job_id).state
    except Exception:  # noqa: BLE001 - unknown: let the user decide with the table
        return False
    return str(state).upper() in SLURM_ALIVE


def _job_dead(sweep_dir: Path, pid: str) -> bool:
    try:
        job = json.loads((sweep_dir / "jobs" / f"{pid}.json").read_text())
    except (OSError, ValueError):
        return False  # never started: still queued as far as we know
    return job.get("status") in ("failed", "preempted")


def sweep_report(sweep_dir: str | Path, out: str | Path | None = None,
                 progress: Callable[[str], None] | None = None) -> Path | None:
    """`seqedit report` over the sweep's finished runs (seeds aggregated), into SWEEP_DIR/report."""
    from seqedit.analysis.report import write_report

    sweep_dir = Path(sweep_dir)
    done = [r.run_dir for r in sweep_status(sweep_dir) if r.run_dir is not None and r.state == "finished"]
    if not done:
        return None
    return write_report(done, out or sweep_dir / "report", progress=progress)
