"""The [world] gates: does a world model store facts where ROME-style editors expect them?

    .venv/bin/python bench/world_gates.py                    # world:standard (shipped; the default of `seqedit run`)
    .venv/bin/python bench/world_gates.py --world tiny --single 50 --sequential 100
    .venv/bin/python bench/world_gates.py --world-json variant.json --cache-dir /tmp/w --device cuda --out g.json

Gates (issue [world]), all printed with their numbers:
 1. causal trace: restoration at the subject's last token peaks in an early-to-middle layer; gradient share at the
    edit layer >= 0.3;
 2. single r-ROME edits (independent, each reverted): efficacy >= 0.9, paraphrase >= 0.6, median ||dW||/||W0|| <= 0.1;
 3. sequential r-ROME: >= 200 edits before recall of never-edited facts falls below 80% of its start;
 4. sequential ROME: update norms >= 10x the running median (disabling-edit candidates) and whether a collapse follows.
Not a test: it builds the world if needed (minutes) and edits for minutes.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from seqedit.apply import apply_proposal, revert
from seqedit.data import load_requests, order_requests
from seqedit.archs import arch_for
from seqedit.builder import build_dataclass
from seqedit.editors._locate import subject_keys
from seqedit.editors.base import EditorContext, get_editor
from seqedit.analysis.detect import SpikeConfig, SpikeDetector
from seqedit.metrics import evaluate_requests, mean_of
from seqedit.probes import never_edited_world_facts
from seqedit.scoring import score_targets
from seqedit.trace import trace
from seqedit.world import WorldConfig, load_world

GRAD_SHARE_MIN = 0.3
EFFICACY_MIN, PARAPHRASE_MIN, UPDATE_REL_MAX = 0.9, 0.6, 0.1
GRADUAL_EDITS_MIN, RECALL_FRACTION = 200, 0.8
SPIKE_FACTOR = 10.0


def _unedited_pairs(world, n: int, seed: int) -> list[tuple[str, str]]:
    """The `unedited` probe's pool: facts about subjects without edit records (facts_mc.jsonl), a fixed sample."""
    pairs = never_edited_world_facts(world)
    return random.Random(seed).sample(pairs, min(n, len(pairs)))


def _recall(model, tok, pairs) -> float:
    scores = score_targets(model, tok, [p for p, _ in pairs], [o for _, o in pairs], batch_size=128)
    return sum(s.exact for s in scores) / max(1, len(scores))


STATS_TEXT: list[Path] = []  # --stats-text: second-moment text instead of the world's heldout.txt


def _editor(name: str, model, tok, world, layer: int, options: dict[str, Any], run_dir: Path, cache: Path):
    cls = get_editor(name)
    editor = cls(build_dataclass(cls.Config, {"layers": [layer], **options}))
    editor.prepare(model, tok, EditorContext.for_model(model, seed=0, run_dir=run_dir, cache_dir=cache,
                                                       stats_text=tuple(STATS_TEXT) or (world.heldout_path,)))
    return editor


def gate_trace(model, tok, requests, layer: int, n: int) -> dict[str, Any]:
    res = trace(model, tok, requests[:n], samples=3, kinds=("hidden", "mlp"), grad_share=True)
    subj_last = res.effect("hidden", "subject_last")
    finite = [(v, l) for l, v in enumerate(subj_last) if not math.isnan(v)]
    peak_layer = max(finite)[1] if finite else -1
    share = list(res.grad_share)
    return {
        "facts_used": res.n_used, "grad_share": share, "grad_share_at_layer": share[layer] if share else math.nan,
        "hidden_subject_last": subj_last, "hidden_last": res.effect("hidden", "last"),
        "mlp_subject_last": res.effect("mlp", "subject_last"), "mlp_peak": list(res.peak("mlp")),
        "subject_last_peak_layer": peak_layer,
        # layers whose restoration at the subject's last token is at least half the peak: where facts are held,
        # i.e. where MEMIT-style editors can spread an update (the [world-ship] issue asks for two or more)
        "fact_layers": [l for v, l in finite if peak_layer >= 0 and v >= 0.5 * subj_last[peak_layer]],
        "pass": bool(share and share[layer] >= GRAD_SHARE_MIN and 0 <= peak_layer < max(1, res.n_layers - 1)),
        "table": res.format_tables(),
    }


def key_interference(model, tok, world, requests, layer, n, tmp: Path) -> dict[str, Any]:
    """How much a rank-one ROME update written for key k_i moves the output at another subject's key k_j, relative to
    its own: |u_i.k_j| / |u_i.k_i| with u = C^-1 k (bare-prompt keys). Each edit adds about this fraction of its
    residual v* - Wk to every other fact, so it bounds how many sequential edits the other facts survive; for keys that
    look random after whitening it is about 1/sqrt(d_ff)."""
    editor = _editor("r-rome", model, tok, world, layer, {}, tmp / "interference", tmp / "stats")
    reqs = requests[:n]
    keys = subject_keys(model, tok, arch_for(model).mlp_out(layer), [r.prompt for r in reqs],
                        [r.subject for r in reqs]).double()  # [n, d_ff]
    solver = editor.solver(model, tok, layer)
    u = torch.stack([solver.solve(k.float()).double() for k in keys])  # [n, d_ff]
    dots = u @ keys.T  # [i, j] = u_i . k_j
    ratio = dots / dots.diag()[:, None]
    other = torch.tensor([[a.subject != b.subject for b in reqs] for a in reqs])
    vals = ratio[other]
    return {"n": len(reqs), "d_ff": keys.shape[1], "median_abs": float(vals.abs().median()),
            "mean_abs": float(vals.abs().mean()), "mean_signed": float(vals.mean()),
            "inv_sqrt_d_ff": keys.shape[1] ** -0.5}


def gate_single(model, tok, world, requests, layer, n, options, tmp: Path, deadline: float = math.inf
                ) -> dict[str, Any]:
    editor = _editor("r-rome", model, tok, world, layer, options, tmp / "single", tmp / "stats")
    reqs = requests[:n]
    base = evaluate_requests(model, tok, reqs)
    outcomes, rel = [], []
    for r in reqs:
        proposal = editor.compute(model, tok, [r])
        rel.append(float(proposal.stats["rome/update_rel"]))
        applied = apply_proposal(model, proposal, editor.params(model))
        outcomes.extend(evaluate_requests(model, tok, [r]))
        revert(model, applied)
        if time.time() > deadline:
            break
    base = base[: len(outcomes)]
    out = {k: mean_of(outcomes, k) for k in ("efficacy", "paraphrase", "neighborhood")}
    out.update({f"unedited_{k}": mean_of(base, k) for k in ("efficacy", "paraphrase", "neighborhood")})
    out["median_update_rel"] = statistics.median(rel)
    out["n"] = len(outcomes)
    out["pass"] = (out["efficacy"] >= EFFICACY_MIN and out["paraphrase"] >= PARAPHRASE_MIN
                   and out["median_update_rel"] <= UPDATE_REL_MAX)
    return out


def gate_sequential(model, tok, world, requests, layer, n, options, tmp: Path, editor_name: str,
                    check_every: int, deadline: float) -> dict[str, Any]:
    """Sequential edits on a copy of the weights; restores them at the end."""
    editor = _editor(editor_name, model, tok, world, layer, options, tmp / f"seq-{editor_name}", tmp / "stats")
    pairs = _unedited_pairs(world, 200, seed=0)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    curve = [(0, _recall(model, tok, pairs))]
    start = curve[0][1]
    rels, fros, spikes, applied_reqs, gradual, key_cos = [], [], [], [], None, []
    max_ratio = 0.0  # largest ||dW|| / running median of the earlier ones (after the driver's 10-edit warm-up)
    # relative to the *unedited* matrix: rome/update_rel divides by the current ||W||, which grows as edits pile up
    w0_norm = sum(float(model.get_parameter(n).norm()) ** 2 for n in editor.params(model)) ** 0.5
    spike_rule = SpikeDetector(SpikeConfig(min_ratio=SPIKE_FACTOR))
    t0 = time.perf_counter()
    try:
        for i, r in enumerate(requests[:n], start=1):
            proposal = editor.compute(model, tok, [r])
            fro = float(proposal.stats["rome/update_fro"])
            fros.append(fro)
            rels.append(fro / w0_norm)
            flagged = spike_rule.update({"w": fro})  # the driver's online disabling-edit detector
            if len(fros) > 10:
                ratio = fro / statistics.median(fros[:-1])
                max_ratio = max(max_ratio, ratio)
                if flagged:
                    spikes.append({"edit": i, "update_fro": fro, "x_median": ratio})
            key_cos.append(float(proposal.stats.get("rome/key_cos", math.nan)))
            apply_proposal(model, proposal, editor.params(model))
            applied_reqs.append(r)
            if i % check_every == 0 or i == n:
                rec = _recall(model, tok, pairs)
                curve.append((i, rec))
                if gradual is None and rec < RECALL_FRACTION * start:
                    gradual = i
            if time.time() > deadline:
                break
        retention = mean_of(evaluate_requests(model, tok, applied_reqs, neighborhood=False), "efficacy")
        drift = sum(float((model.get_parameter(n) - saved[n]).norm()) ** 2 for n in editor.params(model)) ** 0.5
    finally:
        model.load_state_dict(saved)
    return {
        "editor": editor_name, "edits": len(rels), "seconds_per_edit": (time.perf_counter() - t0) / max(1, len(rels)),
        "unedited_recall_curve": curve, "edits_before_recall_below_80pct": gradual,
        "median_update_rel": statistics.median(rels) if rels else math.nan,
        "max_update_rel": max(rels) if rels else math.nan, "spikes": spikes, "max_x_running_median": max_ratio,
        "final_retention": retention, "final_drift_rel": drift / w0_norm,  # ||W_n - W0|| / ||W0||
        "update_rel_by_100": [statistics.median(rels[i:i + 100]) for i in range(0, len(rels), 100)],
        # cos(k*, k_raw): ROME's disabling edits need the template-mean and bare-prompt keys to disagree
        "key_cos_min": min(key_cos) if key_cos else math.nan,
        "key_cos_median": statistics.median(key_cos) if key_cos else math.nan,
        "pass": gradual is None and len(rels) >= GRADUAL_EDITS_MIN if editor_name == "r-rome" else None,
    }


def run_gates(world, *, layer: int, n_trace: int, n_single: int, n_seq: int, n_rome: int, options: dict[str, Any],
              tmp: Path, device: str, check_every: int = 20, deadline: float = math.inf,
              on_update: Any = None) -> dict[str, Any]:
    """All gates in order; `deadline` (time.time()) cuts the edit loops short, `on_update(partial)` after each."""
    t0 = time.perf_counter()
    model, tok = world.model.to(device), world.tokenizer
    model.requires_grad_(False)
    requests = order_requests(load_requests(world.counterfact_path).requests, seed=0)
    out: dict[str, Any] = {"world": world.config.name, "path": str(world.path), "layer": layer,
                           "identity": world.identity(),
                           "editor_options": options, "report": {k: world.report.get(k) for k in (
                               "recall_edit", "recall_paraphrase", "n_records", "build_seconds", "params",
                               "downstream", "train", "train_device")}}
    update = on_update or (lambda _g: None)
    update(out)
    if n_trace:
        out["trace"] = gate_trace(model, tok, requests, layer, n_trace)
        update(out)
    if n_single:
        out["interference"] = key_interference(model, tok, world, requests, layer, min(300, len(requests)), tmp)
        out["single"] = gate_single(model, tok, world, requests, layer, n_single, options, tmp, deadline)
        update(out)
    # r-ROME gets 60% of what is left, ROME the rest
    mid = time.time() + 0.6 * (deadline - time.time()) if n_rome and math.isfinite(deadline) else deadline
    if n_seq:
        out["sequential_r_rome"] = gate_sequential(model, tok, world, requests, layer, n_seq, options, tmp, "r-rome",
                                                   check_every, mid)
        update(out)
    if n_rome:
        out["sequential_rome"] = gate_sequential(model, tok, world, requests, layer, n_rome, options, tmp, "rome",
                                                 check_every, deadline)
    out["seconds"] = time.perf_counter() - t0
    update(out)
    return out


def format_gates(g: dict[str, Any]) -> str:
    ident = g.get("identity", {})
    lines = [f"world {g['world']} ({g['path']}; {ident.get('source')} build {ident.get('build_id')}), edit layer "
             f"{g['layer']}, r-ROME options {g['editor_options']}",
             f"  build: {g['report']}"]
    if "trace" in g:
        t = g["trace"]
        lines.append(f"gate 1 trace: grad share per layer {[round(x, 3) for x in t['grad_share']]} "
                     f"(at layer {g['layer']}: {t['grad_share_at_layer']:.3f}, need >= {GRAD_SHARE_MIN}); "
                     f"subject-last restoration {[round(x, 3) for x in t['hidden_subject_last']]} peaks at layer "
                     f"{t['subject_last_peak_layer']} (layers >= half the peak: {t.get('fact_layers')}); mlp peak "
                     f"{t['mlp_peak']} -> {'PASS' if t['pass'] else 'FAIL'}")
    if "interference" in g:
        i = g["interference"]
        lines.append(f"key interference |u_i.k_j|/|u_i.k_i| over {i['n']} edit keys, other subjects: median "
                     f"{i['median_abs']:.3f}, mean {i['mean_abs']:.3f}, signed mean {i['mean_signed']:.3f} "
                     f"(1/sqrt(d_ff={i['d_ff']}) = {i['inv_sqrt_d_ff']:.3f})")
    if "single" in g:
        s = g["single"]
        lines.append(f"gate 2 single r-ROME x{s['n']}: efficacy {s['efficacy']:.3f} (unedited "
                     f"{s['unedited_efficacy']:.3f}), paraphrase {s['paraphrase']:.3f} (unedited "
                     f"{s['unedited_paraphrase']:.3f}), neighbourhood {s['neighborhood']:.3f} (unedited "
                     f"{s['unedited_neighborhood']:.3f}), median ||dW||/||W0|| {s['median_update_rel']:.3f} "
                     f"-> {'PASS' if s['pass'] else 'FAIL'}")
    for key, n in (("sequential_r_rome", 3), ("sequential_rome", 4)):
        if key in g:
            q = g[key]
            curve = " ".join(f"{i}:{r:.2f}" for i, r in q["unedited_recall_curve"])
            lines.append(f"gate {n} sequential {q['editor']} x{q['edits']} ({q['seconds_per_edit']:.2f} s/edit): "
                         f"unedited recall {curve}; below 80% of start after "
                         f"{q['edits_before_recall_below_80pct']} edits; median/max ||dW||/||W0|| (unedited W0) "
                         f"{q['median_update_rel']:.3f}/{q['max_update_rel']:.3f}; per-100 medians "
                         f"{[round(x, 3) for x in q['update_rel_by_100']]}; {len(q['spikes'])} updates >= "
                         f"{SPIKE_FACTOR:g}x running median {q['spikes'][:5]} (largest "
                         f"{q['max_x_running_median']:.1f}x); cos(k*, k_raw) min/median "
                         f"{q['key_cos_min']:.3f}/{q['key_cos_median']:.3f}; "
                         f"||W_n - W0||/||W0|| {q['final_drift_rel']:.2f}; "
                         f"retention of applied edits "
                         f"{q['final_retention']:.3f}"
                         + ("" if q["pass"] is None else f" -> {'PASS' if q['pass'] else 'FAIL'}"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="standard",
                    help="preset name (default: standard, the shipped default world; <preset>@local: this machine's "
                         "build)")
    ap.add_argument("--world-json", help="a WorldConfig as JSON (a design variant) instead of a preset")
    ap.add_argument("--cache-dir", help="world cache root (default: seqedit's)")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--trace", type=int, default=100, help="facts to trace (0 = skip)")
    ap.add_argument("--single", type=int, default=100, help="independent r-ROME edits (0 = skip)")
    ap.add_argument("--sequential", type=int, default=300, help="sequential r-ROME edits (0 = skip)")
    ap.add_argument("--rome", type=int, default=300, help="sequential ROME edits (0 = skip)")
    ap.add_argument("--check-every", type=int, default=20)
    ap.add_argument("--options", default="{}", help='r-ROME/ROME config overrides as JSON, e.g. {"value": {"lr": 0.1}}')
    ap.add_argument("--device", default="cpu", help="where to build and edit (cpu | cuda)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--deadline", type=float, default=math.inf, help="time.time() at which edit loops stop early")
    ap.add_argument("--stats-text", action="append", default=[], help="text file(s) for C (default: heldout.txt)")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    STATS_TEXT.extend(Path(p) for p in args.stats_text)
    cfg: str | WorldConfig = args.world
    if args.world_json:
        cfg = WorldConfig.from_dict(json.loads(Path(args.world_json).read_text()))
    t0 = time.perf_counter()
    world = load_world(cfg, cache_dir=args.cache_dir, device=None if args.device == "cpu" else args.device,
                       progress=lambda m: print(f"[{time.perf_counter() - t0:6.0f}s] {m}", file=sys.stderr, flush=True))
    import tempfile

    def write(g: dict[str, Any]) -> None:
        if args.out:
            tmp_out = Path(args.out + ".tmp")
            tmp_out.write_text(json.dumps(g, indent=1, default=str))
            tmp_out.replace(args.out)

    with tempfile.TemporaryDirectory() as tmp:
        g = run_gates(world, layer=args.layer, n_trace=args.trace, n_single=args.single, n_seq=args.sequential,
                      n_rome=args.rome, options=json.loads(args.options), tmp=Path(tmp), device=args.device,
                      check_every=args.check_every, deadline=args.deadline, on_update=write)
    print(g["trace"]["table"] if "trace" in g else "")
    print(format_gates(g))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
