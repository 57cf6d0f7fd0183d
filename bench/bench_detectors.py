"""Measure the disabling-edit and collapse detectors of `seqedit.analysis` and calibrate their thresholds.

Every run goes through `seqedit run` (the one driver loop); this script only chooses configs and reads the outputs.

Parts (`--parts`, default all):
  injected   `random` editor with disabling edits injected at known indices (1% of requests; factors 3x-1000x the
             usual norm): precision / recall of the online alerts and the offline detector; for the collapsing
             factor, the catastrophic-phase start against the first injected edit.
  false      false alarms per 1,000 edits on runs with no injected spike: noop, ft, rome, r-rome.
  lead       on rome / r-rome / the collapsing random run: the first alert of each kind and the first drop of the
             downstream accuracy and of control recall beyond `--tolerance` below their pre-edit value; lead time =
             drop - alarm (edits of warning; negative = the alarm came after the drop).
  calibrate  offline on the real norm sequences of the ft / rome / r-rome runs: spikes of known factor multiplied
             into 1% of the updates at seeded positions, recall and false alarms per 1,000 edits over a grid of
             (z, min_ratio); the defaults are chosen from this table.
  report     `seqedit report` over the rome and r-rome runs side by side.

    .venv/bin/python bench/bench_detectors.py --model world:small --edits 1000 --out bench/results/detectors.json

Runs are kept under --runs-dir and reused when finished (`seqedit run --resume` prints a finished run's summary),
so the parts can be rerun without re-editing.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from seqedit.analysis.detect import SpikeConfig, SpikeDetector, detect_spikes
from seqedit.analysis.load import RunData, load_run
from seqedit.analysis.phases import catastrophic_start, quality_curves, segments

from _runs_lib import SEQEDIT, run_all

FACTORS = (3, 5, 10, 30, 100, 1000)
COLLAPSE_FACTOR = 1000
RANDOM_REL = 0.002  # ‖ΔW‖/‖W0‖ of an ordinary `random` edit: 1,000 of them drift the matrix by ~6%

FULL_PROBES = ("probes=[{name: retention, schedule: 'every:50', sample: 300},"
               " {name: unedited, schedule: 'every:25|signal:norm_spike'},"
               " {name: perplexity, schedule: 'every:50', max_docs: 60},"
               " {name: gen_entropy, schedule: 'every:50|signal:norm_spike'},"
               " {name: spectrum, schedule: 'every:100'},"
               " {name: downstream, schedule: 'every:25|signal:norm_spike', tasks: [world]}]")
LIGHT_PROBES = ("probes=[{name: unedited, schedule: 'every:20|signal:norm_spike', sample: 100},"
                " {name: perplexity, schedule: 'every:20|signal:norm_spike', max_docs: 30}]")


def run_specs(model: str, edits: int) -> dict[str, list[str]]:
    common = [f"model.name={model}", f"n_edits={edits}", "threads=1", "seed=0"]
    specs = {
        "rome": [*common, "editor.name=rome", "editor.layers=[0]", FULL_PROBES],
        "r-rome": [*common, "editor.name=r-rome", "editor.layers=[0]", FULL_PROBES],
        "ft": [*common, "editor.name=ft", "editor.layers=[0]", "eval.immediate=false", LIGHT_PROBES],
        "noop": [*common, "editor.name=noop", "editor.layers=[0]", "eval.immediate=false", LIGHT_PROBES],
    }
    for f in FACTORS:
        specs[f"random-x{f}"] = [*common, "editor.name=random", "editor.layers=[0]", f"editor.relative_norm={RANDOM_REL}",
                                 "editor.spike_probability=0.01", f"editor.spike_factor={f}", "eval.immediate=false",
                                 "eval.final=false", LIGHT_PROBES if f != COLLAPSE_FACTOR else FULL_PROBES]
    return specs


def injected_truth(data: RunData) -> set[int]:
    return set(data.edits.loc[data.edits["editor/random/spikes"] > 0, "edit/index"].astype(int))


def online_alerts(data: RunData, kind: str) -> pd.DataFrame:
    a = data.alerts
    if a.empty or "alert/kind" not in a:
        return pd.DataFrame(columns=["edit/index"])
    return a[a["alert/kind"] == kind]


def pr(found: set[int], truth: set[int]) -> dict:
    tp = len(found & truth)
    return {"found": len(found), "truth": len(truth), "true_positives": tp,
            "precision": tp / len(found) if found else (1.0 if not truth else 0.0),
            "recall": tp / len(truth) if truth else 1.0}


def part_injected(runs: dict[str, Path]) -> dict:
    out = {}
    for f in FACTORS:
        data = load_run(runs[f"random-x{f}"])
        truth = injected_truth(data)
        online = set(online_alerts(data, "norm_spike")["edit/index"].astype(int))
        offline = set(detect_spikes(data.edits)["edit/index"].astype(int))
        row = {"factor": f, "truth_indices": sorted(truth), "online": pr(online, truth), "offline": pr(offline, truth),
               "online_equals_offline": online == offline}
        if f == COLLAPSE_FACTOR:
            row["phases"] = phase_summary(data)
            first = min(truth) if truth else None
            starts = {k: v["catastrophic_start"] for k, v in row["phases"].items()}
            row["first_injected"] = first
            row["catastrophic_start_error"] = {k: (None if s is None or first is None else s - first)
                                              for k, s in starts.items()}
        out[f"x{f}"] = row
    return out


def phase_summary(data: RunData) -> dict:
    res = {}
    for name, (x, y, chance) in quality_curves(data.probes).items():
        table = segments(x, y, chance, curve=name)
        res[name] = {"segments": [f"{r.label} {r.start}-{r.end}" for r in table.itertuples()],
                     "catastrophic_start": catastrophic_start(table), "probe_interval": int(np.median(np.diff(x)))}
    return res


def part_false(runs: dict[str, Path]) -> dict:
    out = {}
    for label in ("noop", "ft", "rome", "r-rome"):
        data = load_run(runs[label])
        n = int(data.edits["edit/index"].max())
        online = online_alerts(data, "norm_spike")
        offline = detect_spikes(data.edits)
        params = [c for c in data.edits.columns if c.startswith("weights/") and c.endswith("/delta_fro")]
        norms = data.edits[params].max(axis=1).to_numpy() if params else np.zeros(0)
        med = float(np.median(norms)) if len(norms) else float("nan")
        out[label] = {"edits": n, "online_alerts": len(online), "offline_flags": len(set(offline["edit/index"])),
                      "per_1000": 1000.0 * len(set(online["edit/index"])) / max(n, 1),
                      "largest_over_median": float(norms.max() / med) if len(norms) and med > 0 else None,
                      "flagged": sorted(int(i) for i in online["edit/index"])}
    return out


def first_drop(data: RunData, curve: str, tolerance: float) -> tuple[int | None, float | None, float | None]:
    curves = quality_curves(data.probes)
    if curve not in curves:
        return None, None, None
    x, y, _ = curves[curve]
    base = float(y[0])
    below = np.nonzero(y < base - tolerance)[0]
    return (int(x[below[0]]) if len(below) else None), base, float(y[-1])


def part_lead(runs: dict[str, Path], tolerance: float) -> dict:
    out = {}
    for label in ("rome", "r-rome", f"random-x{COLLAPSE_FACTOR}"):
        data = load_run(runs[label])
        alerts = data.alerts
        first_alert = {}
        if not alerts.empty and "alert/kind" in alerts:
            for kind, g in alerts.groupby("alert/kind"):
                first_alert[kind] = int(g["edit/index"].min())
        drops = {}
        for curve in ("downstream", "control_recall", "retention"):
            at, base, final = first_drop(data, curve, tolerance)
            drops[curve] = {"first_drop": at, "pre": base, "final": final}
        alarm = min(first_alert.values()) if first_alert else None
        lead = {c: (None if alarm is None or d["first_drop"] is None else d["first_drop"] - alarm)
                for c, d in drops.items()}
        out[label] = {"first_alert": first_alert, "drops": drops, "lead_time": lead, "phases": phase_summary(data)}
    return out


def part_calibrate(runs: dict[str, Path], seed: int = 0) -> dict:
    """Semi-synthetic: each real norm sequence with 1% of its updates multiplied by a known factor."""
    sequences = {}
    for label in ("ft", "rome", "r-rome"):
        data = load_run(runs[label])
        cols = [c for c in data.edits.columns if c.startswith("weights/") and c.endswith("/delta_fro")]
        e = data.edits[data.edits.get("edit/status", "applied") != "rejected"].sort_values("edit/index")
        sequences[label] = e[cols[0]].to_numpy(dtype=float)
    grid_z = (3.0, 4.0, 5.0, 6.0, 8.0, 10.0)
    grid_ratio = (2.0, 3.0, 5.0, 10.0)
    rng = np.random.default_rng(seed)
    rows = []
    for label, norms in sequences.items():
        n = len(norms)
        positions = np.sort(rng.choice(np.arange(20, n), size=max(n // 100, 1), replace=False))
        for z in grid_z:
            for ratio in grid_ratio:
                cfg = SpikeConfig(z=z, min_ratio=ratio)
                clean = _flags(norms, cfg)
                row = {"run": label, "z": z, "min_ratio": ratio, "false_per_1000": 1000.0 * len(clean) / n}
                for f in FACTORS:
                    spiked = norms.copy()
                    spiked[positions] *= f
                    found = _flags(spiked, cfg)
                    row[f"recall_x{f}"] = len(found & set(positions.tolist())) / len(positions)
                    row[f"precision_x{f}"] = len(found & set(positions.tolist())) / len(found) if found else 1.0
                rows.append(row)
    return {"positions_per_run": "1% of updates, seeded", "rows": rows}


def _flags(norms: np.ndarray, cfg: SpikeConfig) -> set[int]:
    det = SpikeDetector(cfg)
    return {i for i, v in enumerate(norms) if det.update({"w": float(v)})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="world:small")
    ap.add_argument("--edits", type=int, default=1000)
    ap.add_argument("--parts", default="injected,false,lead,calibrate,report")
    ap.add_argument("--runs-dir", type=Path, default=Path("bench/_runs/detectors"))
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (each uses one thread)")
    ap.add_argument("--tolerance", type=float, default=0.05, help="drop below the pre-edit value that counts")
    ap.add_argument("--only", default="", help="comma-separated run labels to (re)run, then stop")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    specs = run_specs(args.model, args.edits)
    if args.only:
        specs = {k: v for k, v in specs.items() if k in set(args.only.split(","))}
    runs, seconds = run_all(specs, args.runs_dir, args.jobs)
    if args.only:
        return
    result = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "model": args.model,
              "edits": args.edits, "defaults": SpikeConfig().__dict__, "tolerance": args.tolerance,
              "run_seconds_this_call": seconds, "runs": {k: str(v) for k, v in runs.items()}}
    if "injected" in parts:
        result["injected"] = part_injected(runs)
    if "false" in parts:
        result["false_alarms"] = part_false(runs)
    if "lead" in parts:
        result["lead"] = part_lead(runs, args.tolerance)
    if "calibrate" in parts:
        result["calibration"] = part_calibrate(runs)
    if "report" in parts:
        rep = args.runs_dir / "report-rome-vs-r-rome"
        proc = subprocess.run([SEQEDIT, "report", str(runs["rome"]), str(runs["r-rome"]), "--out", str(rep)],
                              capture_output=True, text=True)
        result["report"] = {"dir": str(rep), "rc": proc.returncode, "stdout": proc.stdout[-4000:]}
    text = json.dumps(result, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    summarise(result)


def summarise(r: dict) -> None:
    if "injected" in r:
        print("\ninjected disabling edits (random editor, 1% of requests):")
        for k, row in r["injected"].items():
            on, off = row["online"], row["offline"]
            print(f"  {k:>6}: truth {on['truth']:3d}  online P {on['precision']:.2f} R {on['recall']:.2f}  "
                  f"offline P {off['precision']:.2f} R {off['recall']:.2f}  same {row['online_equals_offline']}")
            if "catastrophic_start_error" in row:
                print(f"          first injected {row['first_injected']}, catastrophic start error "
                      f"{row['catastrophic_start_error']}")
    if "false_alarms" in r:
        print("\nfalse alarms (no injected spike):")
        for k, row in r["false_alarms"].items():
            print(f"  {k:>6}: {row['online_alerts']} alerts in {row['edits']} edits ({row['per_1000']:.1f}/1k); "
                  f"largest update {row['largest_over_median']} x median; flagged {row['flagged'][:10]}")
    if "lead" in r:
        print(f"\nlead time (drop > {r['tolerance']} below the pre-edit value):")
        for k, row in r["lead"].items():
            print(f"  {k}: first alerts {row['first_alert']}; drops "
                  f"{ {c: d['first_drop'] for c, d in row['drops'].items()} }; lead {row['lead_time']}")
    if "calibration" in r:
        df = pd.DataFrame(r["calibration"]["rows"])
        agg = df.groupby(["z", "min_ratio"]).agg(
            false_per_1000_max=("false_per_1000", "max"),
            **{f"recall_x{f}_min": (f"recall_x{f}", "min") for f in FACTORS}).reset_index()
        print("\ncalibration (worst over ft / rome / r-rome):")
        print(agg.to_string(index=False, float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    main()
