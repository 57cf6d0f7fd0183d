"""Downstream probe cost (issue [downstream]); prints the figures measured in one run.

1. Seconds per downstream check of the bundled `world` suite (lm-eval in-process) on world:small (world:tiny if
   small is not built yet), after a one-time set-up (task data loaded once per probe).
2. Seconds per edit of the `random` and `ft` editors (compute + apply, no scoring), measured on the same model.
3. The check's share of a 1,000-edit run at the default probe schedule (every:100) and at the published protocols'
   intervals (GCF every:5, r-ROME every:20), plus the baseline check at edit 0.

    .venv/bin/python bench/bench_downstream.py [--model world:small | --world-dir DIR] [--checks 5] [--edits 30] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def _world_preset(requested: str) -> str:
    from seqedit.world import world_info

    name = requested.removeprefix("world:")
    if world_info(name)["built"] or name == "tiny":
        return name
    print(f"[note] world:{name} is not built; using world:tiny (build it with: seqedit world build {name})")
    return "tiny"


def _world_from_dir(path: str):
    """A built world folder as a World (for benchmarking a specific build without rebuilding it)."""
    import json
    from pathlib import Path

    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    from seqedit.world import World, WorldConfig

    p = Path(path)
    tok = PreTrainedTokenizerFast.from_pretrained(p)
    tok.padding_side = "right"
    stored = json.loads((p / "world_config.json").read_text())
    return World(path=p, config=WorldConfig.from_dict(stored["config"]), model=GPT2LMHeadModel.from_pretrained(p).eval(),
                 tokenizer=tok, report=json.loads((p / "report.json").read_text()))


def _per_edit_seconds(editor_name: str, world, n_edits: int) -> float:
    """Bare editor loop (compute + apply), the same measurement as bench_driver's overhead baseline."""
    from seqedit.apply import apply_proposal
    from seqedit.data import load_requests
    from seqedit.driver import default_cache_dir
    from seqedit.editors.base import EditorContext, make_editor
    from seqedit.archs import spec_for_model_type

    model = type(world.model).from_pretrained(world.path).eval()  # a fresh copy: edits must not touch the probe's
    reqs = load_requests(world.counterfact_path, format="counterfact").requests[:n_edits]
    editor = make_editor(editor_name, {})
    ctx = EditorContext(arch=spec_for_model_type(model.config.model_type), seed=0, run_dir=None,
                        cache_dir=default_cache_dir() / "stats", stats_text=(world.heldout_path,))
    editor.prepare(model, world.tokenizer, ctx)
    declared = editor.params(model)
    t0 = time.perf_counter()
    for r in reqs:
        apply_proposal(model, editor.compute(model, world.tokenizer, [r]), declared)
    return (time.perf_counter() - t0) / len(reqs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="world:small")
    ap.add_argument("--world-dir", default=None, help="a built world folder to use instead of --model")
    ap.add_argument("--checks", type=int, default=5, help="timed downstream checks (median reported)")
    ap.add_argument("--edits", type=int, default=30, help="edits timed per editor")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run-edits", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(k, "1")
    os.environ.setdefault("TQDM_DISABLE", "1")

    from seqedit.downstream.lm_eval_probe import DownstreamProbe
    from seqedit.probe_api import ProbeContext
    from seqedit.schedule import parse_schedule
    from seqedit.world import load_world

    if args.world_dir:
        world = _world_from_dir(args.world_dir)
        preset = world.config.name
    else:
        preset = _world_preset(args.model)
        world = load_world(preset)
    probe = DownstreamProbe(DownstreamProbe.Config(tasks=("world",)))
    t0 = time.perf_counter()
    names = probe.check(world)
    setup = time.perf_counter() - t0
    ctx = ProbeContext(model=world.model, tokenizer=world.tokenizer, edit_index=0, applied=(), world=world)
    times, result = [], None
    for _ in range(args.checks):
        t0 = time.perf_counter()
        result = probe(ctx)
        times.append(time.perf_counter() - t0)
    check = statistics.median(times)
    assert result is not None
    items = {t: int(result.metrics[f"downstream/{t}/n"]) for t in names}
    print(f"[check] world:{preset} threads={args.threads} tasks={items} one-time setup={setup:.2f}s "
          f"per check: median={check:.3f}s min={min(times):.3f}s max={max(times):.3f}s")
    print("[scores] " + " ".join(f"{k.removeprefix('downstream/')}={v:.3f}" for k, v in result.metrics.items()
                                 if v is not None and not k.endswith("/n")))

    n = args.run_edits
    for editor in ("random", "ft"):
        per_edit = _per_edit_seconds(editor, world, args.edits)
        edit_total = per_edit * n
        parts = []
        for sched in ("every:100", "every:20", "every:5"):
            s = parse_schedule(sched)
            checks = 1 + sum(1 for i in range(1, n + 1) if s.due(i, previous_index=i - 1))  # + baseline at 0
            dl = checks * check
            parts.append(f"{sched}: {checks} checks {dl:.1f}s = {100 * dl / (dl + edit_total):.1f}% of run")
        print(f"[share] editor={editor} per-edit={per_edit * 1000:.1f}ms ({n} edits {edit_total:.1f}s); "
              + "; ".join(parts))


if __name__ == "__main__":
    main()
