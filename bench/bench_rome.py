"""ROME-family benchmark (issue [rome]); prints the figures of one run.

1. Per-edit time split into key computation, v* optimisation and update, and the ratio of the whole
   `editor.compute` call to the v* optimisation alone: goal <= 1.2.
2. Second-moment statistics: build time and throughput (tokens/s), fingerprint time, cache-load time.

    .venv/bin/python bench/bench_rome.py [--model random:6x256 | world:small | <world folder>] [--editor r-rome]
        [--edits 10] [--stats-docs 3000] [--threads 2]

`random:LxD` is a randomly initialised GPT-2 (L layers, width D, d_ff 4D) with a byte-level BPE tokenizer and text
made up here: nothing to build or download. The v* loss of a random model never reaches the early-stop threshold,
so every edit runs all `value.num_grad_steps` iterations (the worst case for the ratio's denominator is the best case
for the ratio; world models stop early more often, which raises the ratio).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

_SYL = ["ka", "lo", "mi", "ran", "tu", "vel", "zor", "pha", "ish", "dor", "ne", "qua", "bri", "sto", "len", "gar"]
_REL = ["The capital of {} is", "{} plays the sport of", "The mother tongue of {} is", "{} works for",
        "{} was born in", "{} is located in"]


def _name(rng: random.Random, parts: int = 2) -> str:
    return " ".join("".join(rng.choice(_SYL) for _ in range(rng.randint(2, 3))).capitalize() for _ in range(parts))


def _lines(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        facts = [rng.choice(_REL).format(_name(rng)) + " " + _name(rng, 1) + "." for _ in range(rng.randint(1, 4))]
        out.append(" ".join(facts))
    return out


def random_model(spec: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    n_layer, n_embd = (int(x) for x in spec.split("x"))
    bos = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_lines(2000, 0), trainers.BpeTrainer(
        vocab_size=1000, special_tokens=[bos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=bos, pad_token=bos, unk_token=bos)
    fast.padding_side = "right"
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(fast), n_layer=n_layer, n_embd=n_embd, n_head=max(1, n_embd // 64),
                     n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).eval()
    model.requires_grad_(False)
    return model, fast


def synthetic_requests(n: int):
    from seqedit.types import EditRequest

    rng = random.Random(1)
    return [EditRequest(f"b{i}", rng.choice(_REL), _name(rng), _name(rng, 1)) for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:6x256")
    ap.add_argument("--editor", default="r-rome")
    ap.add_argument("--edits", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20, help="value.num_grad_steps")
    ap.add_argument("--stats-docs", type=int, default=3000, help="documents for the statistics (random model)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from seqedit.archs import arch_for, get_module, in_features
    from seqedit import stats as st
    from seqedit.builder import build_dataclass
    from seqedit.editors.base import EditorContext, get_editor

    tmp = Path(tempfile.mkdtemp(prefix="seqedit-bench-rome-"))
    if args.model.startswith("random:"):
        model, tok = random_model(args.model.split(":", 1)[1])
        text = tmp / "stats.txt"
        text.write_text("\n".join(_lines(args.stats_docs, 7)) + "\n")
        requests = synthetic_requests(args.edits)
    else:
        from seqedit.config import ModelConfig
        from seqedit.data import load_requests
        from seqedit.model_io import load_model

        loaded = load_model(ModelConfig(name=args.model))
        model, tok = loaded.model, loaded.tokenizer
        if loaded.world is not None:
            text, records = loaded.world.heldout_path, loaded.world.counterfact_path
        else:  # a folder of a built world (or any folder holding heldout.txt and counterfact.json)
            text, records = Path(args.model) / "heldout.txt", Path(args.model) / "counterfact.json"
            if not (text.exists() and records.exists()):
                raise SystemExit(f"{args.model}: expected heldout.txt and counterfact.json beside the model")
        requests = list(load_requests(records).requests)[: args.edits]
    arch = arch_for(model)
    n_params = sum(p.numel() for p in model.parameters())
    cls = get_editor(args.editor)
    cfg = build_dataclass(cls.Config, {"value": {"num_grad_steps": args.steps}})
    editor = cls(cfg)
    layer = editor.layers(model)[0]
    d_in = in_features(get_module(model, arch.mlp_out(layer)))
    print(f"model {args.model}: {n_params / 1e6:.2f}M params, {arch.name}, edit layer {layer}, d_in {d_in}, "
          f"threads {args.threads}, device {next(model.parameters()).device}")

    # 2. statistics ---------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    fp = st.model_fingerprint(model, arch, layer)
    t_fp = time.perf_counter() - t0
    spec = cfg.stats
    t0 = time.perf_counter()
    built = st.layer_second_moment(model, tok, arch, layer, [text], spec=spec, cache_dir=tmp / "cache")
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    cached = st.layer_second_moment(model, tok, arch, layer, [text], spec=spec, cache_dir=tmp / "cache")
    t_load = time.perf_counter() - t0
    assert cached.from_cache and fp
    print(f"statistics: {built.count} tokens / {built.n_documents} documents; accumulate {built.seconds:.2f} s "
          f"= {built.tokens_per_second:,.0f} tokens/s; whole call incl. hashing + save {t_build:.2f} s; "
          f"fingerprint {t_fp * 1000:.0f} ms; cached load {t_load * 1000:.0f} ms")

    # 1. per-edit split -----------------------------------------------------------------------------------------
    ctx = EditorContext.for_model(model, seed=0, run_dir=tmp, cache_dir=tmp / "cache", stats_text=(text,))
    t0 = time.perf_counter()
    editor.prepare(model, tok, ctx)
    t_prep = time.perf_counter() - t0
    print(f"prepare (templates + cached statistics + Cholesky): {t_prep:.2f} s, "
          f"{len(editor.templates(model, tok))} templates")
    rows = []
    for req in requests:
        t0 = time.perf_counter()
        prop = editor.compute(model, tok, [req])
        total = time.perf_counter() - t0
        s = prop.stats
        rows.append((total, s["rome/seconds_keys"], s["rome/seconds_v"], s["rome/seconds_update"], s["rome/v_steps"]))
    tot = [r[0] for r in rows]
    keys = [r[1] for r in rows]
    vs = [r[2] for r in rows]
    upd = [r[3] for r in rows]
    steps = [r[4] for r in rows]
    med = statistics.median
    print(f"per edit ({len(rows)} edits, {args.editor}, value.num_grad_steps {args.steps}, mean Adam steps "
          f"{statistics.mean(steps):.1f}): total {med(tot) * 1000:.1f} ms median | keys {med(keys) * 1000:.1f} ms | "
          f"v* {med(vs) * 1000:.1f} ms | update {med(upd) * 1000:.1f} ms")
    ratios = [t / v for t, v in zip(tot, vs)]
    print(f"total / v*: median {med(ratios):.3f}, max {max(ratios):.3f}, sum-ratio {sum(tot) / sum(vs):.3f} "
          f"(goal <= 1.2)")


if __name__ == "__main__":
    main()
