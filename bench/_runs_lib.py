"""What the benchmarks share: run configs through `seqedit run` (the one driver loop) and read their outputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SEQEDIT = str(Path(sys.executable).with_name("seqedit"))


def ensure_run(label: str, args: list[str], runs_dir: Path) -> tuple[Path, float]:
    """Run (or finish, or reuse) one configuration under runs_dir/label; its run directory and the wall seconds
    spent now (`seqedit run --resume` prints a finished run's summary without editing again)."""
    out = runs_dir / label
    t0 = time.perf_counter()
    cmd = [SEQEDIT, "run", *args, f"runs_dir={out}", "--resume", "--no-report"]
    env = {**os.environ, "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{label}: seqedit run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    dirs = sorted(p for p in out.iterdir() if p.is_dir())
    if len(dirs) != 1:
        raise SystemExit(f"{label}: expected one run directory under {out}, found {[d.name for d in dirs]}")
    return dirs[0], time.perf_counter() - t0


def run_all(specs: dict[str, list[str]], runs_dir: Path, jobs: int) -> tuple[dict[str, Path], dict[str, float]]:
    """Every labelled config, `jobs` at a time (each run uses one thread): run directories and seconds spent."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    runs, seconds = {}, {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {label: pool.submit(ensure_run, label, spec, runs_dir) for label, spec in specs.items()}
        for label, fut in futures.items():
            runs[label], seconds[label] = fut.result()
            print(f"{label}: {runs[label]} ({seconds[label]:.0f} s)", flush=True)
    return runs, seconds


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
