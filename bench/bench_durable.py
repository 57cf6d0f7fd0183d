"""Durability benchmarks (issue [durable]): every figure comes from `seqedit run` / `seqedit resume` outputs.

1. Ledger bytes per edit vs a full checkpoint of the model (goal for rank-one editors: O(d_in + d_out) floats, >= 1000x
   smaller), on world:tiny (ROME, FT-L) and at gpt2-xl's layer shape (a randomly initialised 2-layer GPT-2 with
   n_embd=1600: the same 6400x1600 c_proj as gpt2-xl, whose full checkpoint size is counted from its config).
2. Ledger + snapshot overhead on per-edit time (goal <= 2%), from the run's own accounting in state.json:
   (ledger_seconds + snapshot_seconds) / edit_seconds.
3. Resume of a 2,000-edit run: a run SIGKILLed at its 1,990th ledger commit, resumed with `seqedit resume`; wall time
   of the resume command and its parts (start-up + restore, ledger replay), against the uninterrupted run's time.

    .venv/bin/python bench/bench_durable.py [--out bench/results/durable.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def seqedit(*args: str, killer: str | None = None) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "WANDB_MODE": "disabled", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT / "tests")}
    cmd = [PY, str(ROOT / "tests" / "_kill_run.py"), killer, *args] if killer else [PY, "-m", "seqedit.cli", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, proc


def only_dir(runs: Path) -> Path:
    (d,) = [p for p in runs.iterdir() if p.is_dir()]
    return d


def checkpoint_bytes(config) -> int:
    """float32 bytes of every parameter of a model built from `config` (on the meta device: nothing allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters()) * 4


def measure_run(label: str, runs: Path, args: list[str], full_bytes: int) -> dict:
    seconds, proc = seqedit("run", f"runs_dir={runs}", *args)
    if proc.returncode != 0:
        raise SystemExit(f"{label}: seqedit run failed:\n{proc.stderr[-3000:]}")
    d = only_dir(runs)
    state = json.loads((d / "state.json").read_text())
    summary = json.loads((d / "summary.json").read_text())
    index = [json.loads(line) for line in (d / "ledger" / "index.jsonl").read_text().splitlines()]
    record_bytes = [r["nbytes"] for r in index]
    edits = state["edits_done"]
    snaps = sorted((d / "snapshots").iterdir())
    snap_bytes = sum(f.stat().st_size for f in snaps[-1].iterdir())
    out = {
        "label": label, "args": args, "edits": edits, "wall_seconds": seconds,
        "ledger_bytes_total": summary["ledger_bytes"], "ledger_bytes_per_edit": summary["ledger_bytes"] / edits,
        "record_bytes_median": sorted(record_bytes)[len(record_bytes) // 2],
        "record_kinds": sorted({p["kind"] for r in index for p in r["params"].values()}),
        "full_checkpoint_bytes": full_bytes,
        "checkpoint_over_bytes_per_edit": full_bytes / (summary["ledger_bytes"] / edits),
        "snapshot_bytes": snap_bytes, "snapshots_written": state["snapshots_written"],
        "edit_seconds": state["edit_seconds"], "ledger_seconds": state["ledger_seconds"],
        "snapshot_seconds": state["snapshot_seconds"], "loop_seconds": state["loop_seconds"],
        "overhead_pct_of_edit_time": 100 * (state["ledger_seconds"] + state["snapshot_seconds"]) / state["edit_seconds"],
    }
    print(f"[{label}] {edits} edits: ledger {out['ledger_bytes_per_edit']:.0f} B/edit ({out['record_kinds']}), full "
          f"checkpoint {full_bytes / 2**20:.1f} MiB -> {out['checkpoint_over_bytes_per_edit']:.0f}x smaller; "
          f"ledger {state['ledger_seconds']:.3f}s + snapshots {state['snapshot_seconds']:.3f}s "
          f"({state['snapshots_written']}) over editor calls {state['edit_seconds']:.2f}s = "
          f"{out['overhead_pct_of_edit_time']:.2f}% (goal <= 2%)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "durable.json"))
    ap.add_argument("--edits", type=int, default=200, help="edits per overhead run")
    ap.add_argument("--resume-edits", type=int, default=2000)
    ap.add_argument("--resume-model", default="world:small", help="needs >= --resume-edits records")
    ap.add_argument("--parts", default="sizes,resume", help="comma-separated: sizes, resume")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="seqedit-bench-durable-"))
    common = ["threads=1", "eval.immediate=false", "probes=[]", "checkpoint.snapshot_every=100"]
    results: dict = {"machine": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                     "command": " ".join([Path(PY).name, *sys.argv]), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "runs": []}

    if "sizes" in parts:
        measure_sizes(args, tmp, common, results)
    if "resume" in parts:
        measure_resume(args, tmp, results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.out}")


def measure_sizes(args, tmp: Path, common: list[str], results: dict) -> None:
    from transformers import AutoConfig, GPT2Config

    from seqedit.config import ModelConfig
    from seqedit.model_io import load_model

    world = load_model(ModelConfig(name="world:tiny"))
    tiny_bytes = sum(p.numel() for p in world.model.parameters()) * 4
    for editor in ("rome", "ft"):
        for fsync in ("snapshot", "commit"):
            results["runs"].append(measure_run(
                f"world:tiny {editor} fsync={fsync}", tmp / f"tiny-{editor}-{fsync}",
                ["model.name=world:tiny", f"editor.name={editor}", f"n_edits={args.edits}", *common,
                 f"checkpoint.fsync={fsync}"], tiny_bytes))

    # gpt2-xl's edited layer shape: c_proj of 6400 x 1600, in a 2-layer random GPT-2 with a small vocabulary
    from tests_support import counterfact_records, make_tokenizer

    tok = make_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=1600, n_layer=2, n_head=25,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    from transformers import GPT2LMHeadModel

    model_dir = tmp / "gpt2xl-layer"
    GPT2LMHeadModel(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cf = tmp / "cf.json"
    cf.write_text(json.dumps(counterfact_records(args.edits)))
    xl = AutoConfig.for_model("gpt2", n_layer=48, n_embd=1600, n_head=25, n_positions=1024, vocab_size=50257)
    xl_bytes = checkpoint_bytes(xl)
    results["gpt2_xl_checkpoint_bytes"] = xl_bytes
    results["runs"].append(measure_run("gpt2-xl layer shape, random (rank one)", tmp / "xl-random",
                                       [f"model.name={model_dir}", f"data.source={cf}", "editor.name=random",
                                        f"n_edits={args.edits}", *common], xl_bytes))
    results["runs"].append(measure_run("gpt2-xl layer shape, ft (dense)", tmp / "xl-ft",
                                       [f"model.name={model_dir}", f"data.source={cf}", "editor.name=ft",
                                        "editor.num_steps=5", "n_edits=20", *common], xl_bytes))



def measure_resume(args, tmp: Path, results: dict) -> None:
    n = args.resume_edits
    run_args = [f"model.name={args.resume_model}", "editor.name=random", f"n_edits={n}", "threads=1",
                "probes=[{name: retention, schedule: 'every:500', sample: 200}]", "checkpoint.snapshot_every=100"]
    straight_s, proc = seqedit("run", f"runs_dir={tmp / 'straight'}", *run_args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed_s, proc = seqedit("run", f"runs_dir={tmp / 'killed'}", *run_args, killer=f"commit:{n - 10}")
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-3000:])
    d = only_dir(tmp / "killed")
    resume_s, proc = seqedit("resume", str(d))
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in (d / "events.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e["event"] == "resumed"][-1]
    replayed = [e for e in events if e["event"] == "replayed"][-1]
    same = (json.loads((d / "summary.json").read_text())["weights_sha256"]
            == json.loads((only_dir(tmp / "straight") / "summary.json").read_text())["weights_sha256"])
    results["resume"] = {
        "edits": n, "killed_at_commit": n - 10, "straight_run_seconds": straight_s, "killed_run_seconds": killed_s,
        "resume_command_seconds": resume_s, "startup_and_restore_seconds": resumed["seconds_since_start"],
        "snapshot_restored": resumed["snapshot"], "replay_calls": resumed["replay_calls"],
        "replay_seconds": replayed["seconds"], "telemetry_lines_cut": resumed["telemetry_lines_cut"],
        "weights_bit_identical": same,
    }
    print(f"[resume] {n}-edit run killed at commit {n - 10}: resume {resume_s:.1f}s (start-up + restore "
          f"{resumed['seconds_since_start']:.2f}s from {resumed['snapshot']}, replay of {resumed['replay_calls']} "
          f"calls {replayed['seconds']:.2f}s) vs straight run {straight_s:.1f}s; bit-identical: {same}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "tests"))
    main()
