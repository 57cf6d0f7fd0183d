"""MEMIT-family benchmarks (issue [memit]): every figure comes from `seqedit run` outputs (the one driver loop).

Parts (`--parts`, default both):
  cost        seconds per edit (the editor call's wall time / batch size, from telemetry/edits.jsonl) and peak
              memory of the process, for memit / emmet / alphaedit / encore at batch sizes 1, 10, 100, 1000, with
              the immediate efficacy of the edited batches.
  calibrate   one batch of 100 edits with unique subjects (so no two requests of the batch share a subject-last
              key): immediate efficacy / paraphrase / neighbourhood and ‖ΔW‖/‖W0‖ for the published model-scale
              constants against the world:small values (MEMIT λ, AlphaEdit's threshold) and 20 vs 40 z steps.
  sequential  2,000 edits in batches of 100 per editor: final efficacy / paraphrase / neighbourhood, never-edited
              control recall at the end, and the per-call seconds over the run (AlphaEdit's cache: does the cost grow?).

    .venv/bin/python bench/bench_memit.py --model world:small --layers 0 --out bench/results/memit.json

Runs live under --runs-dir and are reused when finished (`seqedit run --resume`), so parts can be rerun.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _runs_lib import read_jsonl, run_all

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


CALIBRATION = {
    "memit-published": ["editor.name=memit"],
    "memit-lambda200": ["editor.name=memit", "editor.mom2_update_weight=200"],
    "memit-world": ["editor.name=memit", *WORLD_OPTIONS["memit"]],
    "emmet-world": ["editor.name=emmet", *WORLD_OPTIONS["emmet"]],
    "alphaedit-published": ["editor.name=alphaedit"],
    "alphaedit-world": ["editor.name=alphaedit", *WORLD_OPTIONS["alphaedit"]],
    "encore-world": ["editor.name=encore", *WORLD_OPTIONS["encore"]],
    **{f"{e}-world-40steps": [f"editor.name={e}", *WORLD_OPTIONS[e], "editor.value.num_grad_steps=40"]
       for e in EDITORS},
}


def finished(out: Path) -> bool:
    dirs = [p for p in out.iterdir() if p.is_dir()] if out.is_dir() else []
    return len(dirs) == 1 and (dirs[0] / "summary.json").is_file() and \
        json.loads((dirs[0] / "summary.json").read_text()).get("status") == "finished"


def calibration_row(run: Path) -> dict:
    (rec,) = [r for r in read_jsonl(run / "telemetry" / "edits.jsonl") if r.get("edit/status") == "applied"]
    rel = {k.split("/")[-2]: v for k, v in rec.items() if k.startswith("weights/") and k.endswith("/drift_rel")}
    return {**{k: rec.get(f"immediate/{k}") for k in ("efficacy", "paraphrase", "neighborhood")},
            "update_rel": rel, "seconds": rec["edit/seconds"]}


def specs(model: str, layers: str, parts: set[str], cost_edits: int, seq_edits: int,
          batches: tuple[int, ...] = BATCHES) -> dict[str, list[str]]:
    common = [f"model.name={model}", f"editor.layers=[{layers}]", "threads=1", "seed=0"]
    out = {}
    if "cost" in parts:
        for e in EDITORS:
            for b in batches:
                out[f"cost-{e}-b{b}"] = [*common, f"editor.name={e}", *WORLD_OPTIONS[e], f"batch_size={b}",
                                         f"n_edits={max(b, cost_edits)}", "eval.final=false", "probes=[]"]
    if "calibrate" in parts:
        one = [*common, "batch_size=100", "n_edits=100", "data.unique_subjects=true", "eval.final=false", "probes=[]"]
        for label, opts in CALIBRATION.items():
            out[f"cal-{label}"] = [*one, *opts]
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
    name = json.loads((run / "summary.json").read_text()).get("run_id", "")
    editor = next((k.split("/")[1] for k in edits[0] if k.startswith("editor/") and k.endswith("/seconds_update")), "")
    solve = [round(r.get(f"editor/{editor}/seconds_update", float("nan")), 2) for r in edits]
    return {"status": summary["status"], "edits": summary.get("n_edits"),
            **{k: m.get(k) for k in ("immediate/efficacy", "immediate/paraphrase", "immediate/neighborhood",
                                     "final/efficacy", "final/paraphrase", "final/neighborhood")},
            "control_recall": control, "seconds_per_call": calls, "solve_seconds_per_call": solve, "run_id": name,
            "peak_memory_mb": max(r.get("system/peak_memory_mb", 0.0) for r in edits)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="world:small")
    ap.add_argument("--layers", default="0")
    ap.add_argument("--parts", default="calibrate,cost,sequential")
    ap.add_argument("--cost-edits", type=int, default=20, help="edits of the batch-1 and batch-10 cost runs")
    ap.add_argument("--seq-edits", type=int, default=2000)
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="batch sizes of the cost part")
    ap.add_argument("--runs-dir", type=Path, default=Path("bench/_runs/memit"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated run labels to (re)run, then stop")
    ap.add_argument("--reuse-only", action="store_true",
                    help="read the finished runs only; configurations without one are listed as not run")
    ap.add_argument("--set", action="append", default=[], metavar="EDITOR:KEY=VALUE",
                    help="an override for one editor's runs (repeatable), e.g. memit:editor.solver=lstsq for a world "
                         "layer whose C is exactly singular")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    batches = tuple(int(b) for b in args.batches.split(","))
    for item in args.set:  # per-editor overrides join that editor's world options (so they name the runs too)
        editor, sep, override = item.partition(":")
        if not sep or editor not in WORLD_OPTIONS or "=" not in override:
            sys.exit(f"--set {item!r}: expected EDITOR:KEY=VALUE with EDITOR one of {', '.join(WORLD_OPTIONS)}")
        WORLD_OPTIONS[editor] = [*WORLD_OPTIONS[editor], override]
    todo = specs(args.model, args.layers, parts, args.cost_edits, args.seq_edits, batches)
    if args.only:
        todo = {k: v for k, v in todo.items() if k in set(args.only.split(","))}
    not_run: list[str] = []
    if args.reuse_only:  # read what is there (a config default added since would otherwise start a new run)
        not_run = [k for k in todo if not finished(args.runs_dir / k)]
        runs = {k: next(p for p in (args.runs_dir / k).iterdir() if p.is_dir()) for k in todo if k not in not_run}
        seconds: dict[str, float] = {}
    else:
        runs, seconds = run_all(todo, args.runs_dir, args.jobs)
    if args.only:
        return
    result: dict = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "model": args.model,
                    "layers": args.layers, "editor_options": WORLD_OPTIONS, "run_seconds_this_call": seconds, "runs": {k: str(v) for k, v in runs.items()},
                    "not_run": not_run}
    if "cost" in parts:
        result["cost"] = {e: {str(b): (cost_row(runs[f"cost-{e}-b{b}"], b) if f"cost-{e}-b{b}" in runs else None)
                              for b in batches} for e in EDITORS}
    if "calibrate" in parts:
        result["calibration"] = {k: calibration_row(runs[f"cal-{k}"]) if f"cal-{k}" in runs else None
                                 for k in CALIBRATION}
    if "sequential" in parts:
        result["sequential"] = {e: sequential_row(runs[f"seq-{e}"]) if f"seq-{e}" in runs else None for e in EDITORS}
        for e, row in result["sequential"].items():
            if row and row["control_recall"] and row["control_recall"][-1][0] < (row["edits"] or 0):
                row["control_recall_at_end"] = [row["edits"], control_at_end(runs[f"seq-{e}"], args.model)]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    summarise(result)


def control_at_end(run: Path, model: str) -> float | None:
    """Never-edited control recall after the last edit, when the run's own `unedited` probe did not fire there: the
    edited model as `seqedit export` writes it, scored by the same probe (same seeded pool of 200 control facts)."""
    import subprocess
    import tempfile

    from transformers import AutoModelForCausalLM

    from seqedit.model_io import world_preset
    from seqedit.probe_api import ProbeContext, make_probe
    from seqedit.world import load_world

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([str(Path(sys.executable).with_name("seqedit")), "export", str(run), "--out", f"{tmp}/m"],
                       check=True, capture_output=True)
        world = load_world(world_preset(model))
        edited = AutoModelForCausalLM.from_pretrained(f"{tmp}/m").eval()
        probe = make_probe("unedited", {})  # the control subjects are never edited, so no request is filtered
        return probe(ProbeContext(model=edited, tokenizer=world.tokenizer, edit_index=-1, applied=(), world=world,
                                  seed=0)).metrics["probe/unedited/recall"]  # seed 0: the bench's runs


def summarise(r: dict) -> None:
    if "cost" in r:
        print(f"\nseconds per edit (peak MB, immediate efficacy), {r['model']} layers [{r['layers']}], 1 thread:")
        print(f"{'editor':>10} " + " ".join(f"{'batch ' + b:>26}" for b in next(iter(r["cost"].values()))))
        for e, rows in r["cost"].items():
            cells = [f"{v['seconds_per_edit']:.3f} s ({v['peak_memory_mb']:.0f} MB, "
                     f"{(v['immediate_efficacy'] or 0):.2f})" if v else "not run" for v in rows.values()]
            print(f"{e:>10} " + " ".join(f"{c:>26}" for c in cells))
    if "calibration" in r:
        print("\none batch of 100 unique-subject edits (immediate efficacy / paraphrase / neighbourhood, ‖ΔW‖/‖W0‖):")
        for k, v in r["calibration"].items():
            if v is None:
                print(f"{k:>26}: not run")
                continue
            print(f"{k:>26}: {v['efficacy']:.2f} / {v['paraphrase']:.2f} / {v['neighborhood']:.3f}  {v['update_rel']}")
    if "sequential" in r:
        print("\nsequential edits in batches of 100 (final = after the last edit):")
        for e, v in r["sequential"].items():
            if v is None:
                print(f"{e:>10}: not run")
                continue
            print(f"{e:>10}: final efficacy {v['final/efficacy']} paraphrase {v['final/paraphrase']} "
                  f"neighbourhood {v['final/neighborhood']}; control recall {v['control_recall']}; "
                  f"per-call s first/last {v['seconds_per_call'][:1]} / {v['seconds_per_call'][-1:]}")


if __name__ == "__main__":
    main()
