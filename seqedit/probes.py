"""Built-in probes: retention of earlier edits, recall of unedited facts, perplexity, generation entropy and weight
spectra. Each is batched (many prompts per forward pass) and leaves the model as it found it.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from seqedit.metrics import evaluate_requests, mean_of
from seqedit.paths import expand_optional
from seqedit.probe_api import ProbeContext, ProbeResult, register_probe
from seqedit.scoring import pad_batch, score_targets


def age_stratified_sample(n_applied: int, k: int, seed: int) -> list[int]:
    """Positions of `k` earlier edits, spread over geometric age buckets (ages 1, 2-3, 4-7, ...) so that both recent
    and old edits are always represented. Fixed by the seed and the count, so checks are comparable."""
    if k >= n_applied:
        return list(range(n_applied))
    buckets: list[list[int]] = []
    lo = 1
    while lo <= n_applied:
        hi = min(2 * lo - 1, n_applied)
        buckets.append([n_applied - age for age in range(lo, hi + 1)])  # positions with age in [lo, hi]
        lo *= 2
    rng = random.Random(seed * 1_000_003 + n_applied)
    chosen: list[int] = []
    per = max(1, k // len(buckets))
    for b in buckets:
        chosen.extend(rng.sample(b, min(per, len(b))))
    rest = sorted(set(range(n_applied)) - set(chosen))
    chosen.extend(rng.sample(rest, max(0, k - len(chosen))))
    return sorted(chosen[:k])


class _ConfiguredProbe:
    """Shared constructor: each probe's own frozen `Config`, defaults when none is given. Subclasses keep any
    per-run caches (prompt pools, tokenised documents) as attributes initialised in `_setup`."""

    Config: ClassVar[type]

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()
        self._setup()

    def _setup(self) -> None:
        pass


@register_probe("retention")
class RetentionProbe(_ConfiguredProbe):
    """Re-check earlier edits (all, or an age-stratified sample) on efficacy, paraphrase and neighbourhood.
    Rows feed the retention matrix (edit x check). No shortcut: forgotten edits are re-checked every time."""

    name: ClassVar[str] = "retention"
    cost: ClassVar[str] = "cheap"

    @dataclass(frozen=True)
    class Config:
        sample: int | None = None  # None = every applied edit
        batch_size: int = 128  # prompts per forward pass (128 was fastest on world:small on 2 CPU cores)
        paraphrase: bool = True  # also score the paraphrase prompts
        neighborhood: bool = True  # also score the neighbourhood prompts

    def __call__(self, ctx: ProbeContext) -> ProbeResult:
        n = len(ctx.applied)
        positions = age_stratified_sample(n, self.config.sample, ctx.seed) if self.config.sample else list(range(n))
        reqs = [ctx.applied[i] for i in positions]
        outcomes = evaluate_requests(ctx.model, ctx.tokenizer, reqs, paraphrase=self.config.paraphrase,
                                     neighborhood=self.config.neighborhood, batch_size=self.config.batch_size)
        rows = [
            {"case_id": o.case_id, "position": p, "age": n - p, "efficacy": o.efficacy, "paraphrase": o.paraphrase,
             "neighborhood": o.neighborhood, "prob_new": o.prob_new}
            for p, o in zip(positions, outcomes)
        ]
        metrics = {f"probe/retention/{k}": mean_of(outcomes, k)
                   for k in ("efficacy", "paraphrase", "neighborhood", "prob_new")}
        metrics["probe/retention/n"] = float(len(outcomes))
        return ProbeResult(metrics, rows)


def never_edited_world_facts(world: Any) -> list[tuple[str, str]]:
    """(prompt, true object) for the world's facts about subjects that have no edit records (facts_mc.jsonl)."""
    if world is None:
        return []
    import json

    path = Path(world.downstream_dir) / "facts_mc.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["question"], r["choices"][r["label"]]) for r in rows]


@register_probe("unedited")
class UneditedRecallProbe(_ConfiguredProbe):
    """Top-1 recall (teacher-forced exact match) of the true object on facts whose subject was never edited: the
    general-knowledge curve that drops when edits spill over. Uses a fixed sample of the world's facts about
    subjects without edit records, or, for external data, requests whose subject is not in the planned stream
    (falling back to not-yet-edited ones)."""

    name: ClassVar[str] = "unedited"
    cost: ClassVar[str] = "cheap"

    @dataclass(frozen=True)
    class Config:
        sample: int = 200  # facts in the pool, drawn once per run (seeded)
        batch_size: int = 64  # prompts per forward pass

    def _setup(self) -> None:
        self._pool: list[tuple[str, ...]] | None = None  # (prompt, object[, subject])

    def __call__(self, ctx: ProbeContext) -> ProbeResult:
        if self._pool is None:
            facts = never_edited_world_facts(ctx.world)
            if not facts:
                planned = {r.subject for r in ctx.stream}
                reqs = [r for r in ctx.stream if r.target_true]
                reqs = [r for r in reqs if r.subject not in planned] or reqs
                facts = [(r.text, r.target_true, r.subject) for r in reqs]
            rng = random.Random(ctx.seed)
            self._pool = rng.sample(facts, min(self.config.sample, len(facts)))
        edited = {r.subject for r in ctx.applied}
        pool = [f for f in self._pool if len(f) == 2 or f[2] not in edited]
        if not pool:
            return ProbeResult({"probe/unedited/recall": None, "probe/unedited/n": 0.0})
        scores = score_targets(ctx.model, ctx.tokenizer, [f[0] for f in pool], [f[1] for f in pool],
                               batch_size=self.config.batch_size)
        recall = sum(s.exact for s in scores) / len(scores)
        prob = sum(s.prob for s in scores) / len(scores)
        return ProbeResult({"probe/unedited/recall": recall, "probe/unedited/prob_true": prob,
                            "probe/unedited/n": float(len(pool))})


@register_probe("perplexity")
class PerplexityProbe(_ConfiguredProbe):
    """Token perplexity of held-out text (the world's heldout.txt, or `path`), first `max_docs` lines."""

    name: ClassVar[str] = "perplexity"
    cost: ClassVar[str] = "cheap"

    @dataclass(frozen=True)
    class Config:
        path: str | None = None  # text file, one document per line; default: the world's held-out text
        max_docs: int = 200  # first non-blank lines used
        batch_size: int = 32  # documents per forward pass

        def __post_init__(self) -> None:
            object.__setattr__(self, "path", expand_optional(self.path))

    def _setup(self) -> None:
        self._docs: list[list[int]] | None = None

    def text_path(self, world: Any) -> Path:
        """The file scored: `path`, else the world's held-out text. Raises ValueError naming the probe entry's
        `path` key (what a config can set: `probes: [{name: perplexity, path: ...}]`) when there is none."""
        if world is not None and not hasattr(world, "heldout_path") and hasattr(world, "world"):
            world = world.world  # a LoadedModel, as the driver passes it to check()
        path = self.config.path or (getattr(world, "heldout_path", None) if world is not None else None)
        if path is None:
            raise ValueError(
                "probe perplexity: no text to score (the model is not a world model, so there is no held-out text); "
                "give the probe a text file, one document per line, in its `path` key: "
                "probes=[{name: perplexity, path: /data/heldout.txt}]")
        if not Path(path).is_file():
            raise ValueError(f"probe perplexity: path {str(path)!r} is not a file; give a text file, one document "
                             "per line")
        return Path(path)

    def check(self, world: Any = None) -> None:
        """Before the run starts (preflight, driver): there is a text to score."""
        self.text_path(world)

    def _load(self, ctx: ProbeContext) -> list[list[int]]:
        path = self.text_path(ctx.world)
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()][: self.config.max_docs]
        limit = getattr(ctx.model.config, "n_positions", None) or getattr(ctx.model.config, "max_position_embeddings",
                                                                           1024)
        return [ctx.tokenizer(ln)["input_ids"][:limit] for ln in lines]

    @torch.no_grad()
    def __call__(self, ctx: ProbeContext) -> ProbeResult:
        if self._docs is None:
            self._docs = self._load(ctx)
        model = ctx.model
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for start in range(0, len(self._docs), self.config.batch_size):
            chunk = [d for d in self._docs[start : start + self.config.batch_size] if len(d) > 1]
            if not chunk:
                continue
            ids, mask = pad_batch(chunk, 0)
            ids, mask = ids.to(device), mask.to(device)
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)  # [b, pos, V]
            tok_lp = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # [b, pos-1]
            valid = mask[:, 1:].bool()
            total += float(-tok_lp[valid].sum())
            count += int(valid.sum())
        nll = total / max(count, 1)
        return ProbeResult({"probe/perplexity/nll": nll, "probe/perplexity/ppl": math.exp(min(nll, 50.0))})


def ngram_entropy(text: str, n: int) -> float:
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    counts = Counter(grams)
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values())


@register_probe("gen_entropy")
class GenerationEntropyProbe(_ConfiguredProbe):
    """CounterFact's fluency: generate from fixed prompts (seeded top-k sampling) and report the weighted n-gram
    entropy mean(2/3·H2 + 4/3·H3); a collapsed model repeats itself and this drops."""

    name: ClassVar[str] = "gen_entropy"
    cost: ClassVar[str] = "cheap"

    @dataclass(frozen=True)
    class Config:
        n_prompts: int = 10  # the first generation prompt of the stream's first requests
        max_new_tokens: int = 40  # tokens generated per prompt
        top_k: int = 5  # top-k sampling (CounterFact's generate_fast)

    def _setup(self) -> None:
        self._prompts: list[str] | None = None

    @torch.no_grad()
    def __call__(self, ctx: ProbeContext) -> ProbeResult:
        if self._prompts is None:
            prompts: list[str] = []
            for r in ctx.stream:
                prompts.extend(r.generation_prompts[:1] or [r.text])
                if len(prompts) >= self.config.n_prompts:
                    break
            self._prompts = prompts
        model, tok = ctx.model, ctx.tokenizer
        device = next(model.parameters()).device
        texts = []
        limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 2048)
        devices = [device] if device.type == "cuda" else []
        for i, prompt in enumerate(self._prompts):
            ids = torch.tensor([tok(prompt)["input_ids"]], device=device)
            new = max(0, min(self.config.max_new_tokens, limit - ids.shape[1]))
            # generate() samples from the global RNG: fork it so the run's RNG stream is untouched, seed per prompt.
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(ctx.seed * 7919 + i)
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                     top_k=self.config.top_k, top_p=1.0, temperature=1.0, max_new_tokens=new,
                                     min_new_tokens=new, pad_token_id=tok.pad_token_id)
            texts.append(tok.decode(out[0].tolist(), skip_special_tokens=True))
        ent = [(2 / 3) * ngram_entropy(t, 2) + (4 / 3) * ngram_entropy(t, 3) for t in texts]
        rows = [{"prompt": p, "text": t, "entropy": e} for p, t, e in zip(self._prompts, texts, ent)]
        return ProbeResult({"probe/gen_entropy/entropy": sum(ent) / max(len(ent), 1)}, rows)


@register_probe("spectrum")
class SpectrumProbe(_ConfiguredProbe):
    """σ_max and condition number of each edited matrix W_t (full SVD; on a schedule, not every edit)."""

    name: ClassVar[str] = "spectrum"
    cost: ClassVar[str] = "cheap"

    @dataclass(frozen=True)
    class Config:
        pass

    @torch.no_grad()
    def __call__(self, ctx: ProbeContext) -> ProbeResult:
        out: dict[str, float | None] = {}
        for name in ctx.edited_params:
            w = ctx.model.get_parameter(name).detach().double()
            if not torch.isfinite(w).all():
                out[f"weights/{name}/sigma_max"] = float("nan")
                out[f"weights/{name}/cond"] = float("nan")
                continue
            s = torch.linalg.svdvals(w)
            out[f"weights/{name}/sigma_max"] = float(s[0])
            out[f"weights/{name}/cond"] = float(s[0] / s[-1]) if s[-1] > 0 else float("inf")
        return ProbeResult(out)

