"""Durability end to end: SIGKILL at any point then resume is bit-identical to an uninterrupted run; SIGTERM in every
phase; damaged snapshots and ledger shards; export at any committed edit; guard policies; config-change refusal; the
run lock; `run --resume`; `status`."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _world_fixtures import tiny_cache_dir, tiny_world  # noqa: F401  (tiny_world is a fixture)

from seqedit.checkpoint import RunLock, RunLocked, list_snapshots
from seqedit.cli import main
from seqedit.config import load_config
from seqedit.driver import RunError, RunState, run
from seqedit.io import read_jsonl
from seqedit.ledger import Ledger
from seqedit.runs import export, run_status
from seqedit.signals import StopRequested
from tests_support import write_driver_assets

ROOT = Path(__file__).resolve().parents[1]
KILLER = ROOT / "tests" / "_kill_run.py"
WALL_CLOCK = ("log/time", "system/")  # fields that legitimately differ between an interrupted and a straight run


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("durable-assets")
    write_driver_assets(root)
    return root


def gpt2_args(assets, runs, editor="random", *extra):
    """CLI overrides of a 10-edit run on the tiny GPT-2: snapshots every 3 calls, retention every 2 edits."""
    ed = {"random": ["editor.name=random", "editor.spike_probability=0.2"],
          "ft": ["editor.name=ft", "editor.num_steps=3"]}[editor]
    return [f"model.name={assets / 'model'}", f"data.source={assets / 'cf.json'}", f"runs_dir={runs}",
            f"cache_dir={assets / 'cache'}", "threads=1", "n_edits=10", "checkpoint.snapshot_every=3",
            "probes=[{name: retention, schedule: 'every:2'}]", *ed, *extra]


def world_args(cache, runs, editor, *extra):
    """A 9-edit ROME-family run on world:tiny (statistics from the world's held-out text, cached once)."""
    return ["model.name=world:tiny", f"cache_dir={cache}", f"runs_dir={runs}", "threads=1", "n_edits=9",
            f"editor.name={editor}", "checkpoint.snapshot_every=2", "editor.value.num_grad_steps=5",
            "probes=[{name: retention, schedule: 'every:3'}]", *extra]


def only_run(runs: Path) -> Path:
    (d,) = [p for p in Path(runs).iterdir() if p.is_dir()]
    return d


def telemetry(run_dir: Path) -> dict[str, list[dict]]:
    """Every stream, with wall-clock fields removed (durations, times, memory)."""
    out = {}
    for path in sorted((run_dir / "telemetry").glob("*.jsonl")):
        out[path.stem] = [{k: v for k, v in r.items()
                           if not (k.startswith(WALL_CLOCK) or "seconds" in k)} for r in read_jsonl(path)]
    return out


def ledger_view(run_dir: Path) -> list[tuple]:
    return [(r.batch, r.edit_index, r.case_ids, r.status, r.sha256, r.norm,
             tuple(sorted((k, v) for k, v in r.stats.items() if "seconds" not in k)))
            for r in Ledger.open(run_dir / "ledger", readonly=True).records]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def kill_run(spec: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    return subprocess.run([sys.executable, str(KILLER), spec, "run", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def assert_same_run(resumed: Path, reference: Path) -> None:
    a, b = summary(resumed), summary(reference)
    assert a["status"] == "finished" and a["weights_sha256"] == b["weights_sha256"]
    assert a["metrics"] | {"edit/seconds_mean": None} == b["metrics"] | {"edit/seconds_mean": None}
    assert ledger_view(resumed) == ledger_view(reference)
    ta, tb = telemetry(resumed), telemetry(reference)
    assert ta.keys() == tb.keys()
    for stream in tb:
        assert ta[stream] == tb[stream], stream


def kill_and_resume(args: list[str], spec: str, reference: Path, runs: Path) -> Path:
    proc = kill_run(spec, args)
    assert proc.returncode == -signal.SIGKILL, (spec, proc.returncode, proc.stderr[-2000:])
    run_dir = only_run(runs)
    assert not (run_dir / "summary.json").exists()
    assert RunState.load(run_dir).status in ("created", "running", "finalizing")  # what the killed process left
    assert run_status(run_dir).state.endswith("?")  # ... and status sees that no process holds it
    assert main(["resume", str(run_dir)]) == 0
    assert_same_run(run_dir, reference)
    return run_dir


@pytest.fixture(scope="module")
def gpt2_reference(assets, tmp_path_factory):
    refs = {}
    for editor in ("random", "ft"):
        runs = tmp_path_factory.mktemp(f"ref-{editor}")
        assert main(["run", *gpt2_args(assets, runs, editor)]) == 0
        refs[editor] = only_run(runs)
    return refs


@pytest.fixture(scope="module")
def world_reference(tiny_world, tmp_path_factory):
    cache = tiny_cache_dir(tmp_path_factory)
    return cache, WorldReferences(cache, tmp_path_factory)


class WorldReferences(dict):
    """Uninterrupted reference runs on world:tiny, made the first time an editor's is asked for."""

    def __init__(self, cache: Path, factory: pytest.TempPathFactory) -> None:
        super().__init__()
        self.cache, self.factory = cache, factory

    def __missing__(self, editor: str) -> Path:
        runs = self.factory.mktemp(f"ref-{editor}")
        assert main(["run", *world_args(self.cache, runs, editor, *BATCHED.get(editor, ()))]) == 0
        self[editor] = only_run(runs)
        return self[editor]


# Editors whose state grows with every applied call (caches of edit keys): the resume rebuilds it from the snapshot
# plus the ledger replay. ENCORE in batches of 3 (3 calls; killed after the 2nd commit: both calls replayed).
BATCHED = {"encore": ("batch_size=3",)}


# -- SIGKILL + resume: bit-identical ------------------------------------------------------------------------------

@pytest.mark.parametrize("editor,spec", [("random", "commit:5"), ("ft", "snapshot:2")])
def test_sigkill_then_resume_is_bit_identical_gpt2(assets, gpt2_reference, tmp_path, editor, spec):
    kill_and_resume(gpt2_args(assets, tmp_path, editor), spec, gpt2_reference[editor], tmp_path)


@pytest.mark.parametrize("editor,spec", [
    ("rome", "compute:4"), pytest.param("r-rome", "probe:3", marks=pytest.mark.slow),
    pytest.param("alphaedit", "compute:4", marks=pytest.mark.slow), ("encore", "commit:2")])
def test_sigkill_then_resume_is_bit_identical_rome(world_reference, tmp_path, editor, spec):
    cache, refs = world_reference
    kill_and_resume(world_args(cache, tmp_path, editor, *BATCHED.get(editor, ())), spec, refs[editor], tmp_path)


POINTS = ("compute", "commit", "snapshot", "probe")


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(6))
@pytest.mark.parametrize("editor", ["random", "ft"])
def test_sigkill_at_random_points_gpt2(assets, gpt2_reference, tmp_path, editor, trial):
    rng = random.Random(f"{editor}-{trial}")
    point = rng.choice((*POINTS, "final"))
    n = 1 if point == "final" else rng.randint(1, {"compute": 10, "commit": 10, "snapshot": 5, "probe": 5}[point])
    kill_and_resume(gpt2_args(assets, tmp_path, editor), f"{point}:{n}", gpt2_reference[editor], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(4))
@pytest.mark.parametrize("editor", ["rome", "r-rome"])
def test_sigkill_at_random_points_rome(world_reference, tmp_path, editor, trial):
    cache, refs = world_reference
    rng = random.Random(f"{editor}-{trial}")
    point = rng.choice((*POINTS, "final"))
    n = 1 if point == "final" else rng.randint(1, {"compute": 9, "commit": 9, "snapshot": 5, "probe": 4}[point])
    kill_and_resume(world_args(cache, tmp_path, editor), f"{point}:{n}", refs[editor], tmp_path)


def test_killed_twice_then_resumed(assets, gpt2_reference, tmp_path):
    """Two kills in a row (the second one during the replay of the first's ledger tail) still end identical."""
    args = gpt2_args(assets, tmp_path)
    assert kill_run("commit:8", args).returncode == -signal.SIGKILL
    run_dir = only_run(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.run([sys.executable, str(KILLER), "probe:2", "resume", str(run_dir)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert main(["resume", str(run_dir)]) == 0
    assert_same_run(run_dir, gpt2_reference["random"])
    assert summary(run_dir)["resumes"] == 2


# -- SIGTERM in every phase ---------------------------------------------------------------------------------------

def _sigterm_when(monkeypatch, target, attr, nth=1):
    real = getattr(target, attr)
    calls = {"n": 0}

    def wrapper(*a, **k):
        calls["n"] += 1
        if calls["n"] == nth:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(target, attr, wrapper)


@pytest.mark.parametrize("phase", ["startup", "baseline", "probe", "edit", "final"])
def test_sigterm_in_each_phase_then_resume(assets, gpt2_reference, tmp_path, monkeypatch, phase):
    import seqedit.driver as drv
    import seqedit.model_io as model_io
    from seqedit.editors.random import RandomEditor
    from seqedit.probes import RetentionProbe

    cfg = load_config(None, gpt2_args(assets, tmp_path))
    with monkeypatch.context() as m:
        if phase == "startup":
            _sigterm_when(m, model_io, "load_model")
        elif phase == "baseline":
            _sigterm_when(m, drv, "evaluate_requests")
        elif phase == "probe":
            _sigterm_when(m, RetentionProbe, "__call__", nth=3)
        elif phase == "edit":
            _sigterm_when(m, RandomEditor, "compute", nth=5)  # no probe due at edit 5: stops at the step end
        else:
            _sigterm_when(m, drv, "evaluate_requests", nth=12)  # baseline + 10 immediate + the final scores
        with pytest.raises(StopRequested):
            run(cfg)
    run_dir = only_run(tmp_path)
    state = RunState.load(run_dir)
    assert state.status == "preempted" and "SIGTERM" in state.message
    assert not (run_dir / "summary.json").exists()
    events = [e["event"] for e in read_jsonl(run_dir / "events.jsonl")]
    assert events[-1] == "preempted"
    if phase == "edit":  # stopped at the step boundary: a snapshot there, nothing to replay
        assert state.next_batch == 5 and state.last_snapshot == 5
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert main(["resume", str(run_dir)]) == 0
    assert_same_run(run_dir, gpt2_reference["random"])


# -- damage: snapshots and ledger shards ----------------------------------------------------------------------------

def _preempt_after(assets, runs, n_calls):
    """A 10-edit random run stopped by SIGTERM arriving in its n-th editor call."""
    from seqedit.editors.random import RandomEditor

    cfg = load_config(None, gpt2_args(assets, runs))
    real = RandomEditor.compute
    calls = {"n": 0}

    def compute(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == n_calls:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a, **k)

    RandomEditor.compute = compute
    try:
        with pytest.raises(StopRequested):
            run(cfg)
    finally:
        RandomEditor.compute = real
    return only_run(runs)


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest"])
def test_damaged_snapshot_falls_back_to_the_previous_one(assets, gpt2_reference, tmp_path, damage, capsys):
    run_dir = _preempt_after(assets, tmp_path, 7)  # snapshots at calls 0, 3, 6 and the stop at 7 (keep_last=2)
    newest = list_snapshots(run_dir)[-1]
    assert newest.name == "snap-00000007"
    target = newest / ("manifest.json" if damage == "manifest" else "params.safetensors")
    blob = bytearray(target.read_bytes())
    if damage == "flip":
        blob[len(blob) // 2] ^= 0xFF
    elif damage == "truncate":
        blob = blob[: len(blob) // 2]
    else:
        blob = blob[:10]
    target.write_bytes(bytes(blob))
    assert main(["resume", str(run_dir)]) == 0
    err = capsys.readouterr().err
    assert "snap-00000007" in err and "using an earlier snapshot" in err
    resumed = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "resumed"][-1]
    assert resumed["snapshot"] == "snap-00000006" and resumed["replay_calls"] == 1
    assert any("snap-00000007" in p for p in resumed["problems"])
    assert_same_run(run_dir, gpt2_reference["random"])


def test_corrupt_ledger_record_is_cut_and_recomputed(assets, gpt2_reference, tmp_path, capsys):
    run_dir = _preempt_after(assets, tmp_path, 8)
    for snap in list_snapshots(run_dir)[1:]:  # only the baseline snapshot is left: the ledger must carry it
        import shutil

        shutil.rmtree(snap)
    led = Ledger.open(run_dir / "ledger", readonly=True)
    rec = led.records[5]
    shard = led.shard_path(rec.shard)
    blob = bytearray(shard.read_bytes())
    blob[rec.offset + rec.nbytes - 3] ^= 0x01
    shard.write_bytes(bytes(blob))
    assert main(["resume", str(run_dir)]) == 0
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "batch 5" in err
    resumed = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "resumed"][-1]
    assert resumed["snapshot"] == "snap-00000000" and resumed["replay_calls"] == 5  # calls 0-4; 5+ recomputed
    assert summary(run_dir)["weights_sha256"] == summary(gpt2_reference["random"])["weights_sha256"]
    assert ledger_view(run_dir) == ledger_view(gpt2_reference["random"])


# -- export ---------------------------------------------------------------------------------------------------------

def test_export_at_edit_equals_a_run_stopped_there(assets, gpt2_reference, tmp_path):
    from transformers import AutoModelForCausalLM

    ref = gpt2_reference["random"]
    out = tmp_path / "at4"
    assert main(["export", str(ref), "--out", str(out), "--at-edit", "4"]) == 0
    info = json.loads((out / "export.json").read_text())
    assert info["at_edit"] == 4 and info["calls_applied"] == 4
    short = tmp_path / "short"
    assert main(["run", *gpt2_args(assets, short), "n_edits=4"]) == 0
    assert info["weights_sha256"] == summary(only_run(short))["weights_sha256"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    (name,) = info["edited_params"]
    short_snap = list_snapshots(only_run(short))[-1]
    from safetensors.torch import load_file

    assert torch.equal(reloaded.get_parameter(name), load_file(short_snap / "params.safetensors")[name])
    # the last committed edit is the run's final model
    full = export(ref, tmp_path / "final")
    assert full["at_edit"] == 10 and full["weights_sha256"] == summary(ref)["weights_sha256"]


def test_export_refuses_an_uncommitted_edit_and_a_used_folder(assets, tmp_path, capsys):
    assert main(["run", *gpt2_args(assets, tmp_path / "r"), "batch_size=2"]) == 0
    run_dir = only_run(tmp_path / "r")
    assert main(["export", str(run_dir), "--out", str(tmp_path / "x"), "--at-edit", "3"]) == 2
    assert "--at-edit 3: not a committed edit index" in capsys.readouterr().err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "f").write_text("x")
    assert main(["export", str(run_dir), "--out", str(tmp_path / "used")]) == 2
    assert "is not empty" in capsys.readouterr().err


# -- guard ----------------------------------------------------------------------------------------------------------

def test_guard_reject_rolls_back_exactly_and_records_it(assets, tmp_path):
    from seqedit.model_io import model_fingerprint
    from transformers import AutoModelForCausalLM

    # a bound below every update: every call is rejected, so the weights must end bit-equal to the base model
    s = run(load_config(None, gpt2_args(assets, tmp_path, "random", "guard.policy=reject",
                                        "guard.max_update_rel=1e-9")))
    assert s.status == "finished"
    base = AutoModelForCausalLM.from_pretrained(assets / "model")
    name = "transformer.h.0.mlp.c_proj.weight"  # the random editor's default layer on the 2-layer model
    assert summary(s.run_dir)["weights_sha256"] == model_fingerprint(base, [name])
    assert summary(s.run_dir)["rejected"] == 10
    assert {r.status for r in Ledger.open(s.run_dir / "ledger", readonly=True).records} == {"rejected"}
    edits = read_jsonl(s.run_dir / "telemetry" / "edits.jsonl")
    assert [e["edit/status"] for e in edits] == ["rejected"] * 10
    alerts = read_jsonl(s.run_dir / "telemetry" / "alerts.jsonl")
    assert [a["alert/kind"] for a in alerts] == ["update_norm"] * 10 and "max_update_rel" in alerts[0]["alert/message"]


def test_guard_reject_of_spikes_survives_a_kill(assets, tmp_path):
    """Only the spikes (10x norm) are rejected; a kill after a rejected call resumes to the same weights."""
    extra = ["editor.relative_norm=0.01", "editor.spike_factor=100", "guard.policy=reject",
             "guard.max_update_rel=0.1"]
    ref = run(load_config(None, gpt2_args(assets, tmp_path / "ref", "random", *extra)))
    statuses = [r.status for r in Ledger.open(ref.run_dir / "ledger", readonly=True).records]
    assert "rejected" in statuses and "applied" in statuses, statuses
    first_rejected = statuses.index("rejected") + 1
    args = gpt2_args(assets, tmp_path / "k", "random", *extra)
    assert kill_run(f"commit:{first_rejected}", args).returncode == -signal.SIGKILL
    run_dir = only_run(tmp_path / "k")
    assert main(["resume", str(run_dir)]) == 0
    assert_same_run(run_dir, ref.run_dir)


def test_guard_allow_keeps_nonfinite_but_never_snapshots_it(assets, tmp_path, monkeypatch):
    from seqedit.editors.random import RandomEditor
    from seqedit.types import EditProposal

    real = RandomEditor.compute
    calls = {"n": 0}

    def poisoned(self, model, tok, reqs):
        calls["n"] += 1
        prop = real(self, model, tok, reqs)
        if calls["n"] == 5:
            return EditProposal({k: v * float("inf") for k, v in prop.deltas.items()}, prop.stats)
        return prop

    monkeypatch.setattr(RandomEditor, "compute", poisoned)
    s = run(load_config(None, gpt2_args(assets, tmp_path, "random", "guard.policy=allow", "probes=[]")))
    kinds = [a["alert/kind"] for a in read_jsonl(s.run_dir / "telemetry" / "alerts.jsonl")]
    assert "nonfinite" in kinds and "snapshot_skipped" in kinds
    assert [int(p.name.split("-")[1]) for p in list_snapshots(s.run_dir)] == [0, 3]  # 6, 9 and 10 skipped
    assert summary(s.run_dir)["status"] == "finished"


def test_guard_stop_rolls_back_and_fails(assets, tmp_path):
    with pytest.raises(RunError, match="max_update_norm"):
        run(load_config(None, gpt2_args(assets, tmp_path, "random", "guard.max_update_norm=1e-9")))
    state = RunState.load(only_run(tmp_path))
    assert state.status == "failed" and "max_update_norm" in state.message and state.next_batch == 0


# -- config changes, lock, --resume, status ---------------------------------------------------------------------

def test_resume_refuses_breaking_changes_and_records_safe_ones(assets, tmp_path, capsys):
    run_dir = _preempt_after(assets, tmp_path, 5)
    assert main(["resume", str(run_dir), "editor.relative_norm=0.5", "n_edits=11"]) == 2
    err = capsys.readouterr().err
    assert "editor.relative_norm" in err and "n_edits" in err and "refusing to resume" in err
    assert RunState.load(run_dir).status == "preempted"
    assert main(["resume", str(run_dir), "threads=2", "checkpoint.snapshot_every=5"]) == 0
    started = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "started"][-1]
    assert started["safe_changes"] == {"threads": 2, "checkpoint.snapshot_every": 5}


def test_a_locked_run_is_refused(assets, tmp_path, capsys):
    run_dir = _preempt_after(assets, tmp_path, 3)
    with RunLock(run_dir):
        assert RunLock.is_locked(run_dir)
        with pytest.raises(RunLocked, match="in use by another process"):
            run(load_config(run_dir / "config.yaml"), run_dir=run_dir)
        assert main(["resume", str(run_dir)]) == 2
        assert "in use by another process" in capsys.readouterr().err
    assert not RunLock.is_locked(run_dir)
    assert RunState.load(run_dir).status == "preempted"


def test_run_with_resume_continues_the_same_directory(assets, gpt2_reference, tmp_path, capsys):
    args = gpt2_args(assets, tmp_path)
    assert kill_run("commit:4", args).returncode == -signal.SIGKILL
    assert main(["run", *args, "--resume"]) == 0  # what a requeued job runs: the same command
    run_dir = only_run(tmp_path)  # no -r2
    assert_same_run(run_dir, gpt2_reference["random"])
    capsys.readouterr()
    assert main(["run", *args, "--resume"]) == 0  # finished: report, do not redo
    out = capsys.readouterr().out
    assert "finished, 10 edits" in out and len(list(tmp_path.iterdir())) == 1
    assert main(["run", *args]) == 0  # without --resume: a new directory
    assert len(list(tmp_path.iterdir())) == 2


def test_status_table(assets, gpt2_reference, tmp_path, capsys):
    preempted = _preempt_after(assets, tmp_path, 4)
    assert main(["status", str(gpt2_reference["random"]), str(preempted), str(tmp_path / "nope")]) == 2
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["run", "state", "edits", "heartbeat", "snapshot"]
    assert lines[1].split()[1:3] == ["finished", "10/10"]
    assert lines[2].split()[1:3] == ["preempted", "4/10"] and "SIGTERM" in lines[2]
    assert "nope" in err and "not a seqedit run directory" in err


def test_state_is_small_and_snapshots_are_pruned(assets, tmp_path):
    s = run(load_config(None, gpt2_args(assets, tmp_path, "random", "n_edits=12", "checkpoint.snapshot_every=2",
                                        "checkpoint.milestones=every:4")))
    state = json.loads((s.run_dir / "state.json").read_text())
    assert all(not isinstance(v, list) or len(v) <= 2 for v in state.values())  # no per-edit history
    assert "update_norms" not in state
    # keep_last=2 (10, 12) plus milestones (the baseline, 4, 8)
    assert [int(p.name.split("-")[1]) for p in list_snapshots(s.run_dir)] == [0, 4, 8, 10, 12]
    events = [e["event"] for e in read_jsonl(s.run_dir / "events.jsonl")]
    assert events == ["created", "started", "finished"]


def test_concurrent_identical_runs_each_finish_in_their_own_directory(assets, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    args = [sys.executable, "-m", "seqedit.cli", "run", *gpt2_args(assets, tmp_path), "n_edits=3", "probes=[]"]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-500:] for o in outs]
    dirs = sorted(p.name for p in tmp_path.iterdir())
    assert len(dirs) == 3 and all(summary(tmp_path / d)["status"] == "finished" for d in dirs)


@pytest.mark.parametrize("bad,message", [
    ("editor.layers=[7]", "layer 7"),
    ("data.source=/nonexistent/cf.json", "/nonexistent/cf.json"),
    ("model.name=/nonexistent/model", "/nonexistent/model"),
    ("probes=[{name: downstream, tasks: [no_such_task]}]", "no_such_task"),
    ("telemetry.state_every=0", "state_every"),
    ("checkpoint.snapshot_every=0", "snapshot_every"),
    ("guard.policy=ignore", "guard.policy"),
    ("editor.relative_nrom=0.1", "relative_norm"),  # did-you-mean
])
def test_bad_input_exits_2_before_any_run_directory(assets, tmp_path, capsys, bad, message):
    runs = tmp_path / "runs"
    assert main(["run", *gpt2_args(assets, runs), bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seqedit: error:") and message in err, err
    assert not runs.exists() or not any(runs.iterdir())


def test_resume_refuses_a_changed_base_model_or_stream_and_keeps_the_state(assets, tmp_path, capsys):
    import shutil

    from transformers import AutoModelForCausalLM

    mine = tmp_path / "assets"
    shutil.copytree(assets, mine)
    run_dir = _preempt_after(mine, tmp_path / "runs", 4)
    before = RunState.load(run_dir)

    model = AutoModelForCausalLM.from_pretrained(mine / "model")
    with torch.no_grad():
        model.get_parameter("transformer.h.0.mlp.c_proj.weight")[0, 0] += 1.0
    model.save_pretrained(mine / "model")
    assert main(["resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "base model" in err and "changed since the run started" in err
    assert RunState.load(run_dir).status == "preempted" == before.status

    shutil.copytree(assets / "model", mine / "model", dirs_exist_ok=True)  # the model back, the data changed
    records = json.loads((mine / "cf.json").read_text())
    records[0]["case_id"] = 999
    (mine / "cf.json").write_text(json.dumps(records))
    assert main(["resume", str(run_dir)]) == 2
    assert "edit stream changed" in capsys.readouterr().err
    after = RunState.load(run_dir)
    assert after.status == "preempted" and after.next_batch == before.next_batch
    assert [e["event"] for e in read_jsonl(run_dir / "events.jsonl")][-4:] == ["started", "resume_refused"] * 2
