"""Sweeps: grid expansion (stable ids, refusals before anything exists), the submitit local executor with a job
preempted mid-run by its signal, requeued, and resumed to the weights of a straight run, the Slurm sbatch script
(golden file), status / resubmission."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from _world_fixtures import tiny_cache_dir, tiny_world  # noqa: F401  (tiny_world is a fixture)

from seqedit import sweep as sw
from seqedit.cli import main
from seqedit.driver import run
from seqedit.io import read_jsonl

GOLDEN = Path(__file__).resolve().parent / "golden" / "sweep_sbatch.txt"


def base_args(cache: Path, runs: Path, n_edits: int = 6) -> list[str]:
    """world:tiny, a few edits, one thread (bit-identity holds for a fixed thread count), snapshots every 2 calls."""
    return ["model.name=world:tiny", f"cache_dir={cache}", f"runs_dir={runs}", "threads=1", f"n_edits={n_edits}",
            "checkpoint.snapshot_every=2", "probes=[{name: retention, schedule: 'every:3'}]"]


@pytest.fixture(scope="module")
def cache(tiny_world, tmp_path_factory):
    return tiny_cache_dir(tmp_path_factory)


# -- grid expansion -----------------------------------------------------------------------------------------------

def test_grid_ids_are_stable_and_independent_of_axis_order(cache, tmp_path):
    a = sw.plan_sweep(None, base_args(cache, tmp_path), ["editor.name=random,ft", "seed=0,1"])
    b = sw.plan_sweep(None, base_args(cache, tmp_path), ["editor.name=random,ft", "seed=0,1"])
    c = sw.plan_sweep(None, base_args(cache, tmp_path), ["seed=0,1", "editor.name=random,ft"])
    assert len(a.points) == 4 and a.sweep_id == b.sweep_id
    assert [(p.point_id, p.run_id) for p in a.points] == [(p.point_id, p.run_id) for p in b.points]
    assert {p.point_id for p in a.points} == {p.point_id for p in c.points}  # same resolved overrides, same ids
    assert len({p.run_id for p in a.points}) == 4
    # the run id is the driver's: the sweep's run directories are the ones `seqedit run --resume` would find
    for p in a.points:
        cfg = a.configs[p.point_id]
        assert cfg.run_id == p.run_id and cfg.runs_dir == str(a.sweep_dir / "runs")
        assert cfg.wandb.group == a.sweep_id and set(p.tags) <= set(cfg.wandb.tags)
    assert {t for p in a.points for t in p.tags} == {"editor.name=random", "editor.name=ft", "seed=0", "seed=1"}
    assert not tmp_path.joinpath("sweeps").exists()  # planning creates nothing
    d = sw.plan_sweep(None, base_args(cache, tmp_path), ["editor.name=random,ft", "seed=0,2"])
    assert d.sweep_id != a.sweep_id


def test_grid_values_split_outside_brackets_and_sections_are_axes(cache, tmp_path):
    ax = sw.parse_grid_arg("editor={name: ft, num_steps: 3},{name: random}")
    assert ax.values == ({"name": "ft", "num_steps": 3}, {"name": "random"})
    assert sw.parse_grid_arg("editor.layers=[0],[0,1]").values == ([0], [0, 1])
    plan = sw.plan_sweep(None, base_args(cache, tmp_path), [f"editor={{name: ft, num_steps: 3}},{{name: random}}"])
    assert sorted(plan.configs[p.point_id].editor.name for p in plan.points) == ["ft", "random"]
    ft = next(plan.configs[p.point_id] for p in plan.points if plan.configs[p.point_id].editor.name == "ft")
    assert ft.editor.options["num_steps"] == 3


def test_grid_in_yaml_with_executor_section(cache, tmp_path):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text("name: yamlsweep\nn_edits: 3\nsweep:\n  grid:\n    seed: [0, 1, 2]\n"
                   "  executor: {kind: pool, workers: 3}\n")
    plan = sw.plan_sweep(cfg, [f"model.name=world:tiny", f"cache_dir={cache}", f"runs_dir={tmp_path}"])
    assert [p.assignment for p in plan.points] == [(("seed", 0),), (("seed", 1),), (("seed", 2),)]
    assert plan.executor.kind == "pool" and plan.executor.workers == 3 and plan.name == "yamlsweep"
    assert plan.sweep_id.startswith("yamlsweep-")
    with pytest.raises(ValueError, match="holds a 'sweep:' section"):  # `seqedit run` refuses a sweep file
        from seqedit.config import load_config
        load_config(cfg)


@pytest.mark.parametrize("grid,overrides,message", [
    (["edtor.name=random,ft"], [], r"unknown config key 'edtor'.*Did you mean 'editor'"),
    (["editor.num_step=1,2"], ["editor.name=ft"], r"unknown config key 'editor.num_step' for editor\(s\) ft.*Did you mean 'num_steps'"),
    (["model.nme=a,b"], [], r"unknown config key 'model.nme'.*Did you mean 'name'"),
    (["seed=0,1", "seed=2"], [], r"axis 'seed' is given twice"),
    (["editor=ft,random", "editor.name=ft,rome"], [], r"axes 'editor' and 'editor.name' overlap"),
    (["seed=0,1"], ["seed=3"], r"override 'seed=3' conflicts with the axis 'seed'"),
    (["seed=0,0"], [], r"value\(s\) 0 given more than once"),
    (["runs_dir=a,b"], [], r"the sweep sets runs_dir"),
    (["checkpoint.keep_last=2,3"], [], r"build the same run"),
    (["editor.name=ft,rmoe"], [], r"rmoe.*Did you mean 'rome'"),
    (["seed"], [], r"must look like key=v1,v2"),
    (["seed=0,,1"], [], r"non-empty comma-separated values"),
    (["batch_size=1,0"], [], r"sweep point batch_size=0: batch_size: 0 must be >= 1"),
])
def test_bad_grids_are_refused_before_anything_is_created(cache, tmp_path, capsys, grid, overrides, message):
    with pytest.raises(ValueError, match=message):
        sw.plan_sweep(None, base_args(cache, tmp_path) + overrides, grid)
    argv = ["sweep", *base_args(cache, tmp_path), *overrides] + [f"--grid={g}" for g in grid]
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []  # no sweep directory, no run directory


def test_bad_executor_settings_are_refused(cache, tmp_path, capsys):
    for flags, message in [(["--executor", "slrum"], "'slrum' is not allowed; allowed: serial, pool"),
                           (["--executor", "slurm", "--time", "1", "--signal-delay-s", "90"], "must be shorter"),
                           (["--workers", "0", "--executor", "pool"], "workers: 0 must be >= 1")]:
        assert main(["sweep", *base_args(cache, tmp_path), "--grid", "seed=0,1", *flags]) == 2
        assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(shutil.which("sbatch") is not None, reason="a Slurm machine")
def test_slurm_without_slurm_is_refused_before_the_sweep_directory(cache, tmp_path, capsys):
    assert main(["sweep", *base_args(cache, tmp_path), "--grid", "seed=0,1", "--executor", "slurm"]) == 2
    assert "sbatch is not on PATH" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_missing_submitit_is_a_clear_error(cache, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_submitit(name, *a, **k):
        if name == "submitit" or name.startswith("submitit."):
            raise ImportError("No module named 'submitit'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_submitit)
    with pytest.raises(ValueError, match=r"pip install 'seqedit\[slurm\]'"):
        sw.plan_sweep(None, base_args(cache, tmp_path), ["seed=0,1"], {"kind": "slurm"})
    sw.plan_sweep(None, base_args(cache, tmp_path), ["seed=0,1"], {"kind": "pool"})  # local pools need none


# -- the Slurm script -----------------------------------------------------------------------------------------------

def test_sbatch_script_golden(cache, tmp_path):
    """The job-array script submitit writes for --executor slurm: the requested resources and the USR2 pre-timeout
    signal (rendered without Slurm; paths made relative to the sweep directory)."""
    plan = sw.plan_sweep(None, base_args(cache, tmp_path), ["editor.name=random,ft", "seed=0,1"],
                         {"kind": "slurm", "partition": "gpu", "time_min": 180, "gpus": 1, "cpus": 4, "mem_gb": 32,
                          "account": "edits", "constraint": "a100", "signal_delay_s": 150, "qos": "high",
                          "setup": ["source .venv/bin/activate"], "extra": {"exclude": "node07"}},
                         sweep_dir=tmp_path / "sw", name="golden")
    text = sw.sbatch_script(plan)
    text = text.replace(str(tmp_path / "sw"), "SWEEP_DIR").replace(shlex.quote(sys.executable), "PYTHON")
    if os.environ.get("SEQEDIT_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=180", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --mem=32GB", "#SBATCH --account=edits",
                 "#SBATCH --constraint=a100", "#SBATCH --signal=USR2@150", "#SBATCH --array=0-3%4",
                 "#SBATCH --exclude=node07", "#SBATCH --qos=high"):
        assert line in text.splitlines()


def test_dry_run_prints_the_runs_and_the_sbatch_script_and_creates_nothing(cache, tmp_path, capsys):
    argv = ["sweep", *base_args(cache, tmp_path), "--grid", "seed=0,1,2", "--executor", "slurm", "--gpus", "2",
            "--time", "90", "--signal-delay-s", "300", "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "3 runs over seed (slurm)" in out and out.count("default-") >= 3
    assert "#SBATCH --signal=USR2@300" in out and "#SBATCH --array=0-2%3" in out and "--gpus-per-node=2" in out
    assert list(tmp_path.iterdir()) == []


# -- running: submitit's local executor, a forced preemption ----------------------------------------------------

def _wait_for(predicate, timeout: float, what: str, poll: float = 0.05):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def _ledger_records(run_root: Path, run_id: str) -> int:
    index = run_root / run_id / "ledger" / "index.jsonl"
    return len(index.read_text().splitlines()) if index.is_file() else 0


def _preempted_sweep(cache: Path, tmp_path: Path, grid: list[str], victim: dict, n_edits: int):
    """Launch the sweep on submitit's LocalExecutor, send the victim point's job SIGUSR2 (what Slurm sends before
    the time limit) once it has committed 3 edits, wait for everything; returns (plan, results, timings)."""
    plan = sw.plan_sweep(None, base_args(cache, tmp_path, n_edits), grid, {"kind": "submitit-local"},
                         sweep_dir=tmp_path / "sweep")
    sw.write_sweep(plan)
    (target,) = [p for p in plan.points if dict(p.assignment) == victim]
    t0 = time.perf_counter()
    launched = sw.launch(plan, wait=False)
    assert set(launched.handles) == {p.point_id for p in plan.points}
    _wait_for(lambda: _ledger_records(plan.runs_dir, target.run_id) >= 3, 240, "3 committed edits")
    job = json.loads((plan.sweep_dir / "jobs" / f"{target.point_id}.json").read_text())
    os.kill(job["pid"], signal.SIGUSR2)
    t_signal = time.perf_counter()
    results = {pid: handle.result() for pid, handle in launched.handles.items()}
    return plan, target, results, {"signal_at_s": t_signal - t0, "total_s": time.perf_counter() - t0}


def _check_requeued_and_exact(plan, target, results, tmp_path):
    run_dir = plan.runs_dir / target.run_id
    events = [e["event"] for e in read_jsonl(run_dir / "events.jsonl")]
    assert "preempted" in events and "resumed" in events, events  # stopped at a safe point, then resumed
    assert events.index("preempted") < events.index("resumed") and events[-1] == "finished"
    job = json.loads((plan.sweep_dir / "jobs" / f"{target.point_id}.json").read_text())
    assert job["attempt"] == 2 and job["status"] == "finished"  # the requeued job is the second attempt
    assert len(list((plan.runs_dir).glob(f"{target.run_id}*"))) == 1  # the same directory, no -r2
    assert all(r["status"] == "finished" for r in results.values())
    # the uninterrupted run of the same config (its runs_dir elsewhere: a resume-safe key, same hash)
    import dataclasses

    cfg = dataclasses.replace(sw.point_config(plan.sweep_dir, target.point_id), runs_dir=str(tmp_path / "straight"))
    straight = run(cfg)
    ref = json.loads((straight.run_dir / "summary.json").read_text())
    assert results[target.point_id]["weights_sha256"] == ref["weights_sha256"]
    assert json.loads((run_dir / "summary.json").read_text())["metrics"] | {"edit/seconds_mean": None} == \
        ref["metrics"] | {"edit/seconds_mean": None}
    return straight


def test_local_submitit_job_preempted_by_signal_requeues_and_resumes_exactly(cache, tmp_path, capsys):
    """One ft run on submitit's LocalExecutor, USR2 mid-run: it stops at a safe point, submitit requeues the
    Checkpointable job, the run resumes in the same directory to the weights sha256 of a straight run."""
    plan, target, results, times = _preempted_sweep(cache, tmp_path, ["editor.name=ft"], {"editor.name": "ft"}, 10)
    _check_requeued_and_exact(plan, target, results, tmp_path)
    rows = sw.sweep_status(plan.sweep_dir)
    assert [(r.state, r.edits) for r in rows] == [("finished", "10/10")]
    assert "attempt 2" in rows[0].job_id
    print(f"timings: {times}")


@pytest.mark.slow
def test_local_submitit_sweep_2_editors_x_2_seeds_with_a_preemption(cache, tmp_path, capsys):
    plan, target, results, times = _preempted_sweep(cache, tmp_path, ["editor.name=random,ft", "seed=0,1"],
                                                    {"editor.name": "ft", "seed": 1}, 16)
    _check_requeued_and_exact(plan, target, results, tmp_path)
    others = [p for p in plan.points if p.point_id != target.point_id]
    for p in others:  # never interrupted: a single attempt
        assert json.loads((plan.sweep_dir / "jobs" / f"{p.point_id}.json").read_text())["attempt"] == 1
    assert main(["sweep", "--status", str(plan.sweep_dir)]) == 0
    table = capsys.readouterr().out
    assert table.count("finished") >= 4 and "4 finished" in table
    assert sw.sweep_report(plan.sweep_dir) is not None
    print(table, f"timings: {times}")


# -- serial executor, relaunch, status, resubmission ------------------------------------------------------------

def test_serial_sweep_relaunch_finds_the_same_runs_and_resubmits_failed(cache, tmp_path, capsys):
    args = ["sweep", *base_args(cache, tmp_path, 3), "--grid", "editor.name=random", "--grid", "seed=0,1",
            "--executor", "serial", "--no-report", "--sweep-dir", str(tmp_path / "s")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2 finished" in out
    runs = sorted(p.name for p in (tmp_path / "s" / "runs").iterdir())
    shas = {p: json.loads((tmp_path / "s" / "runs" / p / "summary.json").read_text())["weights_sha256"] for p in runs}
    manifest = sw.read_manifest(tmp_path / "s")
    assert [pt["run_id"] for pt in manifest["points"]] == runs
    # a relaunch finds the same directories (finished: nothing recomputed)
    assert main(args) == 0
    assert sorted(p.name for p in (tmp_path / "s" / "runs").iterdir()) == runs
    assert len(sw.read_manifest(tmp_path / "s")["launches"]) == 2
    # a run marked failed (as a crash leaves it) is found by --resubmit-failed and finished again
    victim = tmp_path / "s" / "runs" / runs[0]
    state = json.loads((victim / "state.json").read_text())
    (victim / "summary.json").unlink()
    (victim / "state.json").write_text(json.dumps({**state, "status": "failed", "message": "node died"}))
    capsys.readouterr()
    assert main(["sweep", "--status", str(tmp_path / "s")]) == 0
    table = capsys.readouterr().out
    assert re.search(rf"{runs[0]}\s+failed", table) and "node died" in table and "1 failed, 1 finished" in table
    assert sw.failed_points(tmp_path / "s") == [manifest["points"][0]["point_id"]]
    # a run held by a live process is not launched again, and a duplicate job refuses before touching its record
    from seqedit.checkpoint import RunLock

    plan = sw.plan_from_manifest(tmp_path / "s")
    pid0 = manifest["points"][0]["point_id"]
    record = (tmp_path / "s" / "jobs" / f"{pid0}.json").read_text()
    with RunLock(victim).acquire():
        assert sw.launch(plan, [pid0]).results[pid0]["status"] == "running"
        with pytest.raises(sw.SweepError, match="being run by another process"):
            sw.SweepJob(str(tmp_path / "s"), pid0)()
    assert (tmp_path / "s" / "jobs" / f"{pid0}.json").read_text() == record
    assert not (victim / "summary.json").exists()
    assert main(["sweep", "--status", str(tmp_path / "s"), "--resubmit-failed"]) == 0
    table = capsys.readouterr().out
    assert "2 finished" in table
    assert json.loads((victim / "summary.json").read_text())["weights_sha256"] == shas[runs[0]]
    # the sweep report: both runs side by side, the two seeds of one config aggregated
    assert main(["sweep", "--report", str(tmp_path / "s")]) == 0
    report = json.loads((tmp_path / "s" / "report" / "summary.json").read_text())
    assert sorted(r["run"] for r in report["runs"]) == runs


# -- bench/world_sweep.py runs its variants through the sweep executors ---------------------------------------------

def test_world_sweep_bench_runs_variants_through_the_executors(tmp_path):
    import subprocess

    variants = {"gates": {"trace": 3, "single": 0, "sequential": 0, "rome": 0, "check-every": 2},
                "base": {"n_subjects": 20, "relations_per_subject": 2, "n_layer": 1, "n_embd": 32, "n_head": 2,
                         "n_positions": 64, "epochs": 2, "arithmetic_max": 4, "n_ordering_mc": 8,
                         "heldout_min_tokens": 300, "corpus": {"ordering_lines_per_epoch": 10}},
                "a": {"world": {}}, "b": {"world": {"epochs": 3}}}
    (tmp_path / "v.json").write_text(json.dumps(variants))
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "bench" / "world_sweep.py"), str(tmp_path / "v.json"),
                           "--out", str(tmp_path / "s.json"), "--executor", "serial", "--only", "a", "--minutes", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = json.loads((tmp_path / "s.json").read_text())
    assert set(merged) == {"a"} and "table" in merged["a"]["trace"] and merged["a"]["report"]["n_records"] > 0
    assert "a finished rc=0" in proc.stdout


@pytest.mark.slow
def test_pool_sweep_gives_the_weights_of_serial_runs(cache, tmp_path):
    grid = ["editor.name=random", "seed=0,1"]
    pool = sw.plan_sweep(None, base_args(cache, tmp_path / "p", 4), grid, {"kind": "pool", "workers": 2},
                         sweep_dir=tmp_path / "pool")
    serial = sw.plan_sweep(None, base_args(cache, tmp_path / "s", 4), grid, {"kind": "serial"},
                           sweep_dir=tmp_path / "serial")
    assert [p.run_id for p in pool.points] == [p.run_id for p in serial.points]
    results = {}
    for plan in (pool, serial):
        sw.write_sweep(plan)
        results[plan.executor.kind] = sw.launch(plan).results
    assert {k: r["weights_sha256"] for k, r in results["pool"].items()} == \
        {k: r["weights_sha256"] for k, r in results["serial"].items()}
    assert all(r["status"] == "finished" for r in results["pool"].values())


@pytest.mark.slow
def test_local_submitit_time_limit_requeues_until_the_run_finishes(cache, tmp_path):
    """A run longer than its time limit: submitit's own pre-timeout USR2 (signal_delay_s before the limit) stops
    it at a safe point, the job is requeued (a timeout each time) and it finishes over several attempts, with the
    weights of a straight run."""
    plan = sw.plan_sweep(None, base_args(cache, tmp_path, 60), ["editor.name=ft"],
                         {"kind": "submitit-local", "time_min": 0.4, "signal_delay_s": 12, "max_requeues": 6},
                         sweep_dir=tmp_path / "sweep")
    sw.write_sweep(plan)
    results = sw.launch(plan).results
    (p,) = plan.points
    job = json.loads((plan.sweep_dir / "jobs" / f"{p.point_id}.json").read_text())
    assert results[p.point_id]["status"] == "finished" and job["attempt"] >= 2, (results, job)
    events = [e["event"] for e in read_jsonl(plan.runs_dir / p.run_id / "events.jsonl")]
    assert events.count("preempted") == job["attempt"] - 1 and events[-1] == "finished"
    import dataclasses

    cfg = dataclasses.replace(sw.point_config(plan.sweep_dir, p.point_id), runs_dir=str(tmp_path / "straight"))
    ref = json.loads((run(cfg).run_dir / "summary.json").read_text())
    assert results[p.point_id]["weights_sha256"] == ref["weights_sha256"]


def test_wandb_group_and_tags_per_axis_keep_the_base_ones(cache, tmp_path):
    plan = sw.plan_sweep(None, base_args(cache, tmp_path) + ["wandb.tags=[nightly]"], ["seed=0,1"])
    assert {plan.configs[p.point_id].wandb.tags for p in plan.points} == {("nightly", "seed=0"), ("nightly", "seed=1")}
    assert {plan.configs[p.point_id].wandb.group for p in plan.points} == {plan.sweep_id}
    named = sw.plan_sweep(None, base_args(cache, tmp_path) + ["wandb.group=ablation-7"], ["seed=0,1"])
    assert named.wandb_group == "ablation-7" and named.sweep_id == plan.sweep_id  # resume-safe: same runs
    assert {named.configs[p.point_id].wandb.group for p in named.points} == {"ablation-7"}
