"""Run `world_gates.py` over many world/editor design variants in parallel, one process each.

    .venv/bin/python bench/world_sweep.py bench/world_variants.json --out sweep.json \
        --device cuda --minutes 8

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
import time
from pathlib import Path


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--minutes", type=float, default=8.0, help="edit loops stop this long after the start")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--only", nargs="*", help="run only these variants")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
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
    pending, running, logs = list(names), {}, {}
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
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
            logs[name] = open(work / f"{name}.log", "w")
            running[name] = subprocess.Popen(cmd, stdout=logs[name], stderr=subprocess.STDOUT)
        time.sleep(5)
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                logs[name].close()
                del running[name]
                g = _load(work / f"{name}.json")
                print(f"[{time.strftime('%H:%M:%S')}] {name} rc={proc.returncode}: "
                      + (summary_line(name, g) if g else (work / f"{name}.log").read_text()[-1500:]), flush=True)
        merged = {n: _load(work / f"{n}.json") for n in names}
        Path(args.out).write_text(json.dumps(merged, indent=1, default=str))
    print("\n".join(summary_line(n, g) for n, g in merged.items() if g))
    return 0


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


if __name__ == "__main__":
    raise SystemExit(main())
