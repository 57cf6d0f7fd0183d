"""Driver benchmarks (issue [driver]); prints ratios measured in one run.

1. Driver overhead per edit (telemetry + JSONL logging, no probes, no immediate scoring) vs a bare loop that only
   calls editor.compute + apply: goal <= 5 %.
2. Retention re-check of 1,000 earlier edits: batched vs one prompt per forward pass: goal >= 10x.
3. RSS growth from edit 100 to edit 10,000 with the `random` editor: goal < 5 %.

    .venv/bin/python bench/bench_driver.py [--model world:small] [--edits 10000] [--overhead-edits 100]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="world:small")
    ap.add_argument("--editor", default="ft", help="editor for the overhead measurement")
    ap.add_argument("--overhead-edits", type=int, default=100)
    ap.add_argument("--retention-edits", type=int, default=1000)
    ap.add_argument("--edits", type=int, default=10000, help="edits for the RSS measurement")
    args = ap.parse_args()
    torch.set_num_threads(2)
    os.environ.setdefault("WANDB_MODE", "disabled")

    from seqedit.apply import apply_proposal
    from seqedit.config import load_config
    from seqedit.driver import default_cache_dir, load_stream, run
    from seqedit.editors.base import EditorContext, make_editor
    from seqedit.io import read_jsonl
    from seqedit.model_io import load_model
    from seqedit.probe_api import ProbeContext
    from seqedit.probes import RetentionProbe

    tmp = tempfile.mkdtemp(prefix="seqedit-bench-")
    base = [f"model.name={args.model}", f"runs_dir={tmp}", "eval.immediate=false"]

    # 1. overhead -----------------------------------------------------------------------------------------------
    cfg = load_config(None, [*base, f"editor.name={args.editor}", f"n_edits={args.overhead_edits}"])
    summary = run(cfg)
    driver_loop = json.loads((summary.run_dir / "state.json").read_text())["loop_seconds"]
    # In-run accounting: edit/seconds times editor.compute + apply inside the driver's own loop, so the rest of the
    # loop time is exactly the driver's telemetry, logging and bookkeeping (no probes, no immediate scoring here).
    editor_time = sum(r["edit/seconds"] for r in read_jsonl(summary.run_dir / "telemetry" / "edits.jsonl"))
    print(f"[overhead] editor={args.editor} edits={args.overhead_edits} loop={driver_loop:.3f}s "
          f"editor_calls={editor_time:.3f}s overhead={100 * (driver_loop / editor_time - 1):+.2f}% (goal <= 5%)")
    # Cross-check against a separate bare loop (a second model load; order and cache effects make it noisier).
    loaded = load_model(cfg.model, cache_dir=default_cache_dir())
    stream, _ = load_stream(cfg, loaded)
    editor = make_editor(cfg.editor.name, cfg.editor.options)
    ctx = EditorContext(arch=loaded.arch, seed=cfg.seed, run_dir=summary.run_dir,
                        cache_dir=default_cache_dir() / "stats",
                        stats_text=(loaded.world.heldout_path,) if loaded.world else ())
    editor.prepare(loaded.model, loaded.tokenizer, ctx)
    declared = editor.params(loaded.model)
    t0 = time.perf_counter()
    for r in stream:
        apply_proposal(loaded.model, editor.compute(loaded.model, loaded.tokenizer, [r]), declared)
    bare = time.perf_counter() - t0
    print(f"[overhead, separate bare loop] driver_loop={driver_loop:.3f}s bare_loop={bare:.3f}s "
          f"ratio={driver_loop / bare:.3f}")

    # 2. retention batched vs one at a time ------------------------------------------------------------------------
    cfg = load_config(None, [*base, "editor.name=random", "editor.relative_norm=0.001",
                             f"n_edits={args.retention_edits}"])
    loaded = load_model(cfg.model, cache_dir=default_cache_dir())
    stream, _ = load_stream(cfg, loaded)
    pctx = ProbeContext(model=loaded.model, tokenizer=loaded.tokenizer, edit_index=len(stream), applied=tuple(stream))
    t0 = time.perf_counter()
    single = RetentionProbe(RetentionProbe.Config(batch_size=1))(pctx)
    t_single = time.perf_counter() - t0
    for bs in (64, 128, 256):  # 128 is the probe's default; prompts are length-sorted into batches
        t0 = time.perf_counter()
        batched = RetentionProbe(RetentionProbe.Config(batch_size=bs))(pctx)
        t_batched = time.perf_counter() - t0
        same = batched.metrics.keys() == single.metrics.keys() and all(
            abs(batched.metrics[k] - single.metrics[k]) < 1e-6 for k in single.metrics)
        print(f"[retention] edits={len(stream)} batch={bs} batched={t_batched:.2f}s one_at_a_time={t_single:.2f}s "
              f"speedup={t_single / t_batched:.1f}x (goal >= 10x) same_result={same}")

    # 3. RSS growth -------------------------------------------------------------------------------------------------
    # The world holds ~1k facts; the random editor ignores content, so cycle them under fresh case ids.
    from seqedit.data import load_requests

    world_reqs = load_requests(loaded.world.counterfact_path, format="counterfact").requests
    path = os.path.join(tmp, "many.jsonl")
    with open(path, "w") as f:
        for i in range(args.edits):
            r = world_reqs[i % len(world_reqs)]
            f.write(json.dumps({"case_id": f"{i}", "prompt": r.prompt, "subject": r.subject,
                                "target_new": r.target_new, "target_true": r.target_true}) + "\n")
    cfg = load_config(None, [*base, "editor.name=random", "editor.relative_norm=0.0001", f"n_edits={args.edits}",
                             f"data.source={path}"])
    summary = run(cfg)
    rows = read_jsonl(summary.run_dir / "telemetry" / "edits.jsonl")
    at = {r["edit/index"]: r["system/rss_mb"] for r in rows}
    first = at[min(100, max(at))]
    last = at[max(at)]
    print(f"[rss] random editor: rss@100={first:.1f} MB rss@{max(at)}={last:.1f} MB "
          f"growth={100 * (last / first - 1):+.2f}% (goal < 5%); loop {summary.seconds:.1f}s")


if __name__ == "__main__":
    main()
