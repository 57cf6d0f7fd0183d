"""Run `world_gates.py` over many world/editor design variants in parallel, one process each, through the sweep
executors of `seqedit.sweep` (a local process pool by default; `--executor slurm` submits one job array).

    .venv/bin/python bench/world_sweep.py bench/world_variants.json --out sweep.json \
        --device cuda --minutes 8
    .venv/bin/python bench/world_sweep.py bench/world_variants.json --out sweep.json --executor slurm \
        --partition gpu --gpus 1 --cpus 4 --time 60 --device cuda

The variants file maps a name to {"world": <WorldConfig fields>, "options": <r-ROME overrides>, "layer": int,
"gates": <world_gates.py flags>} ("base" holds world fields and "gates" flags shared by all; variants with the same
world share one build through the cache lock). Every few seconds the figures gathered so far are merged into
`--out`, so a sweep cut off at its time limit still reports whatever finished. Summary lines go to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from seqedit.sweep import EXECUTORS, ExecutorConfig, execute


@dataclass(frozen=True)
class GatesJob:
    """One variant: world_gates.py in its own process, its output in a log file (picklable for every executor)."""

    cmd: tuple[str, ...]
    log: str

    def __call__(self) -> dict:
        with open(self.log, "w") as f:
            rc = subprocess.call(list(self.cmd), stdout=f, stderr=subprocess.STDOUT)
        return {"status": "finished" if rc == 0 else "failed", "rc": rc}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def summary_line(name: str, g: dict) -> str:
    rep = g.get("report", {})
    parts = [f"{name:>22s}", f"recall {rep.get('recall_edit')}", f"build {rep.get('build_seconds')}s",
             f"tok {rep.get('train', {}).get('tokens')}", f"rec {rep.get('n_records')}"]
    if "trace" in g:
        t = g["trace"]
        parts.append(f"share {[round(x, 2) for x in t['grad_share']]} "
                     f"slast {[round(x, 2) for x in t['hidden_subject_last']]}")
    if "single" in g:
        s = g["single"]
        parts.append(f"single eff {s['efficacy']:.2f} para {s['paraphrase']:.2f} nbr {s['neighborhood']:.2f} "
                     f"rel {s['median_update_rel']:.3f}")
    for key in ("sequential_r_rome", "sequential_rome"):
        if key in g:
            q = g[key]
            curve = " ".join(f"{i}:{r:.2f}" for i, r in q["unedited_recall_curve"])
            parts.append(f"{q['editor']} x{q['edits']} below80@{q['edits_before_recall_below_80pct']} "
                         f"rel {q['median_update_rel']:.3f} max {q['max_update_rel']:.2f} spikes {len(q['spikes'])} "
                         f"ret {q['final_retention']:.2f} [{curve}]")
    return " | ".join(parts)


def _line(name: str, g: dict) -> str:
    try:
        return summary_line(name, g)
    except (KeyError, TypeError, ValueError):  # a gate cut short (deadline) leaves None figures
        return f"{name:>22s} | gates: {', '.join(sorted(g))}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--minutes", type=float, default=8.0, help="edit loops stop this long after the start")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--only", nargs="*", help="run only these variants")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="variants at once (pool executor)")
    ap.add_argument("--executor", default="pool", choices=EXECUTORS)
    ap.add_argument("--partition", default=None)
    ap.add_argument("--time", type=int, default=60, help="slurm: minutes per variant")
    ap.add_argument("--gpus", type=int, default=0)
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--work", help="folder for per-variant logs, figures and the world cache (default: next to --out)")
    args = ap.parse_args(argv)
    spec = json.loads(Path(args.variants).read_text())
    base = spec.pop("base", {})
    gates = spec.pop("gates", {})  # world_gates.py flags shared by all variants
    names = [n for n in spec if not args.only or n in args.only]
    work = Path(args.work) if args.work else Path(args.out).with_suffix(".d")
    work.mkdir(parents=True, exist_ok=True)
    cache = args.cache_dir or str(work / "cache")
    deadline = time.time() + 60 * args.minutes
    here = Path(__file__).resolve().parent
    jobs = {}
    for name in names:
        v = spec[name]
        wpath = work / f"{name}.world.json"
        world = _merge(base, v.get("world", {}))
        world.setdefault("name", "sweep")  # same fields, same hash: variants share one build
        wpath.write_text(json.dumps(world))
        cmd = [sys.executable, str(here / "world_gates.py"), "--world-json", str(wpath), "--cache-dir", cache,
               "--device", args.device, "--layer", str(v.get("layer", 0)),
               "--options", json.dumps(v.get("options", {})), "--deadline", str(deadline),
               "--out", str(work / f"{name}.json")]
        for flag, value in {**gates, **v.get("gates", {})}.items():
            cmd += [f"--{flag}", str(value)]
        jobs[name] = GatesJob(tuple(cmd), str(work / f"{name}.log"))

    def merge() -> dict:
        merged = {n: _load(work / f"{n}.json") for n in names}
        Path(args.out).write_text(json.dumps(merged, indent=1, default=str))
        return merged

    def report(name: str, result: dict) -> None:
        g = _load(work / f"{name}.json")
        print(f"[{time.strftime('%H:%M:%S')}] {name} {result.get('status')} rc={result.get('rc')}: "
              + (_line(name, g) if g else _tail(work / f"{name}.log") + str(result.get("error", ""))),
              flush=True)

    finished = threading.Event()

    def merge_every_few_seconds() -> None:  # figures gathered so far reach --out even if the sweep is cut off
        while not finished.wait(5):
            merge()

    ticker = threading.Thread(target=merge_every_few_seconds, daemon=True)
    ticker.start()
    executor = ExecutorConfig(kind=args.executor, workers=max(1, args.jobs), partition=args.partition,
                              time_min=args.time, gpus=args.gpus, cpus=args.cpus)
    try:
        execute(jobs, executor, work / "submitit", "world-sweep", wait=True, on_done=report)
    finally:
        finished.set()
        ticker.join()
    merged = merge()
    print("\n".join(_line(n, g) for n, g in merged.items() if g))
    return 0


def _tail(path: Path) -> str:
    try:
        return path.read_text()[-1500:]
    except OSError:
        return ""


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


if __name__ == "__main__":
    raise SystemExit(main())
