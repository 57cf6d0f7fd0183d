"""MEMIT-family benchmarks (issue [memit]): every figure comes from `seqedit run` outputs (the one driver loop).

Parts (`--parts`, default both):
  cost        seconds per edit (the editor call's wall time / batch size, from telemetry/edits.jsonl) and peak
              memory of the process, for memit / emmet / alphaedit / encore at batch sizes 1, 10, 100, 1000, with
              the immediate efficacy of the edited batches.
  sequential  2,000 edits in batches of 100 per editor: final efficacy / paraphrase / neighbourhood, never-edited
              control recall at the end, and the per-call seconds over the run (AlphaEdit's cache: does the cost grow?).

    .venv/bin/python bench/bench_memit.py --model world:small --layers 0 --out bench/results/memit.json

Runs live under --runs-dir and are reused when finished (`seqedit run --resume`), so parts can be rerun.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SEQEDIT = str(Path(sys.executable).with_name("seqedit"))
EDITORS = ("memit", "emmet", "alphaedit", "encore")
BATCHES = (1, 10, 100, 1000)
# Published hyperparameters except two model-scale constants measured on world:small (100 unique-subject edits in
# one batch, layer 0; README "Editors"): λ = 20000 (gpt2-xl) leaves MEMIT at efficacy 0.0 on 512 keys (λ 200: 0.80,
# 20: 0.89), and AlphaEdit's absolute null-space threshold 2e-2 finds no null space in layer 0's C (smallest
# singular value 0.028), so the update is zero; 0.5 keeps about a quarter of the directions. ENCORE's μ = 10 is
# scaled down with λ. Layer 0 only: on world:small it is the one layer with a regular C where z reaches the target
# (layer 1: condition number 8.5e13, MEMIT's update there 5,500x ‖W‖).
WORLD_OPTIONS = {
    "memit": ["editor.mom2_update_weight=20"],
    "emmet": [],
    "alphaedit": ["editor.nullspace_threshold=0.5"],
    "encore": ["editor.mom2_update_weight=20", "editor.update_norm_lambda=1"],
}


def ensure_run(label: str, args: list[str], runs_dir: Path) -> tuple[Path, float]:
    out = runs_dir / label
    t0 = time.perf_counter()
    cmd = [SEQEDIT, "run", *args, f"runs_dir={out}", "--resume", "--no-report"]
    env = {**os.environ, "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{label}: seqedit run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    (d,) = [p for p in out.iterdir() if p.is_dir()]
    return d, time.perf_counter() - t0


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def specs(model: str, layers: str, parts: set[str], cost_edits: int, seq_edits: int) -> dict[str, list[str]]:
    common = [f"model.name={model}", f"editor.layers=[{layers}]", "threads=1", "seed=0"]
    out = {}
    if "cost" in parts:
        for e in EDITORS:
            for b in BATCHES:
                out[f"cost-{e}-b{b}"] = [*common, f"editor.name={e}", *WORLD_OPTIONS[e], f"batch_size={b}",
                                         f"n_edits={max(b, cost_edits)}", "eval.final=false", "probes=[]"]
    if "sequential" in parts:
        for e in EDITORS:
            out[f"seq-{e}"] = [*common, f"editor.name={e}", *WORLD_OPTIONS[e], "batch_size=100", f"n_edits={seq_edits}",
                               "probes=[{name: unedited, schedule: 'every:500'},"
                               " {name: retention, schedule: 'every:1000', sample: 500}]"]
    return out


def cost_row(run: Path, batch: int) -> dict:
    edits = [r for r in read_jsonl(run / "telemetry" / "edits.jsonl") if r.get("edit/status") == "applied"]
    seconds = [r["edit/seconds"] for r in edits]
    eff = [r["immediate/efficacy"] for r in edits if r.get("immediate/efficacy") is not None]
    return {"calls": len(edits), "seconds_per_edit": sum(seconds) / (len(seconds) * batch),
            "seconds_per_call": sum(seconds) / len(seconds),
            "peak_memory_mb": max(r.get("system/peak_memory_mb", 0.0) for r in edits),
            "immediate_efficacy": sum(eff) / len(eff) if eff else None}


def sequential_row(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    m = summary["metrics"]
    edits = [r for r in read_jsonl(run / "telemetry" / "edits.jsonl") if r.get("edit/status") == "applied"]
    probes = read_jsonl(run / "telemetry" / "probes.jsonl")
    control = [(p["edit/index"], p.get("probe/unedited/recall")) for p in probes if p.get("probe/name") == "unedited"]
    calls = [round(r["edit/seconds"], 2) for r in edits]
    return {"status": summary["status"], "edits": summary.get("n_edits"),
            **{k: m.get(k) for k in ("immediate/efficacy", "immediate/paraphrase", "immediate/neighborhood",
                                     "final/efficacy", "final/paraphrase", "final/neighborhood")},
            "control_recall": control, "seconds_per_call": calls,
            "peak_memory_mb": max(r.get("system/peak_memory_mb", 0.0) for r in edits)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="world:small")
    ap.add_argument("--layers", default="0")
    ap.add_argument("--parts", default="cost,sequential")
    ap.add_argument("--cost-edits", type=int, default=20, help="edits of the batch-1 and batch-10 cost runs")
    ap.add_argument("--seq-edits", type=int, default=2000)
    ap.add_argument("--runs-dir", type=Path, default=Path("bench/_runs/memit"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated run labels to (re)run, then stop")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    todo = specs(args.model, args.layers, parts, args.cost_edits, args.seq_edits)
    if args.only:
        todo = {k: v for k, v in todo.items() if k in set(args.only.split(","))}
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    runs, seconds = {}, {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {label: pool.submit(ensure_run, label, spec, args.runs_dir) for label, spec in todo.items()}
        for label, fut in futures.items():
            runs[label], seconds[label] = fut.result()
            print(f"{label}: {runs[label]} ({seconds[label]:.0f} s)", flush=True)
    if args.only:
        return
    result: dict = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "model": args.model,
                    "layers": args.layers, "run_seconds_this_call": seconds, "runs": {k: str(v) for k, v in runs.items()}}
    if "cost" in parts:
        result["cost"] = {e: {str(b): cost_row(runs[f"cost-{e}-b{b}"], b) for b in BATCHES} for e in EDITORS}
    if "sequential" in parts:
        result["sequential"] = {e: sequential_row(runs[f"seq-{e}"]) for e in EDITORS}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    summarise(result)


def summarise(r: dict) -> None:
    if "cost" in r:
        print(f"\nseconds per edit (peak MB, immediate efficacy), {r['model']} layers [{r['layers']}], 1 thread:")
        print(f"{'editor':>10} " + " ".join(f"{'batch ' + str(b):>26}" for b in BATCHES))
        for e, rows in r["cost"].items():
            cells = [f"{v['seconds_per_edit']:.3f} s ({v['peak_memory_mb']:.0f} MB, "
                     f"{(v['immediate_efficacy'] or 0):.2f})" for v in rows.values()]
            print(f"{e:>10} " + " ".join(f"{c:>26}" for c in cells))
    if "sequential" in r:
        print("\n2,000 edits in batches of 100 (final = after the last edit):")
        for e, v in r["sequential"].items():
            print(f"{e:>10}: final efficacy {v['final/efficacy']} paraphrase {v['final/paraphrase']} "
                  f"neighbourhood {v['final/neighborhood']}; control recall {v['control_recall']}; "
                  f"per-call s first/last {v['seconds_per_call'][:1]} / {v['seconds_per_call'][-1:]}")


if __name__ == "__main__":
    main()
