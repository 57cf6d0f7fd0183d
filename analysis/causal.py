"""Causal confirmation of disabling edits through the ledger: rebuild the model at edit k (base + ledger), compare it
with the same model without just edit k's delta (= the model at edit k-1, edits being added one after another), and
say whether removing the edit recovers the model. Probed on the earlier edits' efficacy (retention) and, for world
models, held-out perplexity."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import pandas as pd

RETENTION_SAMPLE = 64  # most recent earlier edits re-checked per model


def causal_checks(run_dir: str | Path, edit_indices: list[int], *, retention_drop: float = 0.2,
                  ppl_ratio: float = 1.5, progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """One row per checked edit: retention and perplexity with and without the edit, and `recovers` (removing the
    edit raises retention by >= retention_drop or cuts perplexity by >= ppl_ratio)."""
    from seqedit.apply import apply_added
    from seqedit.driver import default_cache_dir, load_stream
    from seqedit.ledger import Ledger
    from seqedit.metrics import evaluate_requests, mean_of
    from seqedit.model_io import load_model
    from seqedit.runs import resume_config

    cols = ["edit/index", "retention_with", "retention_without", "ppl_with", "ppl_without", "recovers"]
    targets = sorted(set(int(k) for k in edit_indices))
    if not targets:
        return pd.DataFrame(columns=cols)
    say = progress or (lambda m: None)
    run_dir = Path(run_dir)
    cfg = resume_config(run_dir)
    ledger = Ledger.open(run_dir / "ledger", readonly=True)
    loaded = load_model(cfg.model, cache_dir=default_cache_dir(cfg.cache_dir), progress=say)
    model, tok = loaded.model, loaded.tokenizer
    stream, _ = load_stream(cfg, loaded)
    ppl = _perplexity_probe(loaded)
    rows, applied, want = [], [], set(targets)
    for rec in ledger.records:
        if rec.edit_index > targets[-1]:
            break
        batch = stream[rec.edit_index - len(rec.case_ids): rec.edit_index]
        if rec.edit_index in want and rec.status == "applied":
            earlier = applied[-RETENTION_SAMPLE:]
            score = dict(paraphrase=False, neighborhood=False, batch_size=cfg.eval.batch_size)
            without = mean_of(evaluate_requests(model, tok, earlier, **score), "efficacy") if earlier else None
            ppl_without = ppl(model) if ppl else None
            apply_added(model, ledger.read(rec.batch))
            with_ = mean_of(evaluate_requests(model, tok, earlier, **score), "efficacy") if earlier else None
            ppl_with = ppl(model) if ppl else None
            rec_ret = with_ is not None and without is not None and without - with_ >= retention_drop
            rec_ppl = (ppl_with is not None and ppl_without and math.isfinite(ppl_without)
                       and ppl_with / ppl_without >= ppl_ratio)
            rows.append({"edit/index": rec.edit_index, "retention_with": with_, "retention_without": without,
                         "ppl_with": ppl_with, "ppl_without": ppl_without, "recovers": bool(rec_ret or rec_ppl)})
            say(f"causal check at edit {rec.edit_index}: retention {without} -> {with_}, ppl {ppl_without} -> "
                f"{ppl_with}")
        elif rec.status == "applied":
            apply_added(model, ledger.read(rec.batch))
        if rec.status == "applied":
            applied.extend(batch)
    return pd.DataFrame(rows, columns=cols)


def _perplexity_probe(loaded):
    """Held-out perplexity of a world model (its own held-out text), else None."""
    if loaded.world is None:
        return None
    from seqedit.probe_api import ProbeContext
    from seqedit.probes import PerplexityProbe

    probe = PerplexityProbe(PerplexityProbe.Config(max_docs=50))

    def measure(model) -> float:
        ctx = ProbeContext(model=model, tokenizer=loaded.tokenizer, edit_index=0, applied=(), run_dir=None,
                           world=loaded.world, seed=0, edited_params=(), stream=())
        return float(probe(ctx).metrics["probe/perplexity/ppl"])

    return measure
