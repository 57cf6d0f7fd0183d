"""Causal tracing (ROME, Meng et al. 2022, arXiv 2202.05262 §2.1) and the subject-vs-last-token gradient share.

Where does a model store a fact? For each known fact ("The mother tongue of {Gapa Fagu} is" → "Dutch"):

- clean run: p = probability of the true object (first token, or per-token-mean over the whole object);
- corrupted run: Gaussian noise (std = 3 × the std of subject-token embeddings, as in the paper) is added to the
  subject's token embeddings; several seeded noise samples per fact, p averaged over them;
- restored runs: the corrupted run with one clean state put back: a block's output (the residual stream, "hidden")
  at one (layer, position), or the MLP / attention outputs of a window of layers around `layer` at one position.

The indirect effect of a state is p_restored − p_corrupted. Positions before the subject are identical in the
clean and corrupted runs (causal attention), so their effect is 0 by construction and they are not run. Per-fact
[layer × position] tables are summarised into position categories (BOS, subject first / middle / last token, first
token after the subject, further tokens, last token) and averaged over facts.

The gradient share is a cheap companion diagnostic: per layer, ‖∂NLL/∂(MLP output)‖ at the subject's last token
divided by the sum of that and the same norm at the prompt's last token. Subject-position editors (ROME, MEMIT...)
need the fact to flow through the subject's last token: a share near 0 at the edit layer means the model looks the
fact up at the last position instead, and such edits tend to fail.

Hooks are only set through `seqedit.hooks` context managers, so none survive a call (even one that raises).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seqedit.archs import ArchSpec, arch_for, get_module, num_layers
from seqedit.hooks import capture, patch_output
from seqedit.model_state import frozen_model, model_device
from seqedit.scoring import prompt_ids, target_ids
from seqedit.tokens import fill, pad_id, right_pad, subject_token_span
from seqedit.types import EditRequest

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("hidden", "mlp", "attn")
MEASURES: tuple[str, ...] = ("first_token", "object")
CATEGORIES: tuple[str, ...] = (
    "bos", "subject_first", "subject_middle", "subject_last", "first_after", "further", "last",
)
CATEGORY_LABELS: Mapping[str, str] = {
    "bos": "BOS", "subject_first": "subj first", "subject_middle": "subj mid", "subject_last": "subj last",
    "first_after": "1st after", "further": "further", "last": "last",
}
NOISE_FACTOR = 3.0  # the paper's noise level: 3 × the embedding std


# ---------------------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class SkippedFact:
    case_id: str
    reason: str


@dataclass(frozen=True)
class FactTrace:
    """One fact's trace. `restored[kind][layer][pos]` is p with that state restored (p_corrupted for positions
    before the subject, which noise cannot reach). Positions index `tokens`, the prompt's tokens (BOS included)."""

    case_id: str
    tokens: tuple[str, ...]
    subject_span: tuple[int, int]  # [first, last + 1) token indices
    bos: bool  # the prompt starts with a special token (BOS)
    p_clean: float
    p_corrupted: float
    restored: Mapping[str, tuple[tuple[float, ...], ...]]

    def positions(self) -> dict[str, list[int]]:
        return category_positions(self.bos, self.subject_span, len(self.tokens))

    def categories(self, kind: str) -> dict[str, list[float]]:
        """Category -> per-layer mean indirect effect over the category's positions; absent categories left out."""
        effect = torch.tensor(self.restored[kind], dtype=torch.float64) - self.p_corrupted  # [L, P]
        return {cat: effect[:, pos].mean(dim=1).tolist() for cat, pos in self.positions().items()}


@dataclass(frozen=True)
class GradientShare:
    """Per-layer ‖∂NLL(true object)/∂(MLP output)‖ at the subject's last token and at the prompt's last token."""

    case_ids: tuple[str, ...]
    subject_last: tuple[tuple[float, ...], ...]  # [fact][layer]
    prompt_last: tuple[tuple[float, ...], ...]  # [fact][layer]

    def per_fact(self) -> list[list[float]]:
        """[fact][layer] share g_s / (g_s + g_p); NaN where both gradients are zero."""
        return [[s / (s + p) if s + p > 0 else math.nan for s, p in zip(rs, rp)]
                for rs, rp in zip(self.subject_last, self.prompt_last)]

    @property
    def share(self) -> tuple[float, ...]:
        """Per layer, the share averaged over facts (NaN entries left out)."""
        rows = self.per_fact()
        if not rows:
            return ()
        out = []
        for layer in range(len(rows[0])):
            vals = [r[layer] for r in rows if not math.isnan(r[layer])]
            out.append(sum(vals) / len(vals) if vals else math.nan)
        return tuple(out)


@dataclass(frozen=True)
class TraceResult:
    kinds: tuple[str, ...]
    categories: tuple[str, ...]
    n_layers: int
    # kind -> [layer][category] mean indirect effect over the facts that have the category (NaN if none has it)
    effects: Mapping[str, tuple[tuple[float, ...], ...]]
    category_counts: Mapping[str, int]  # facts that have each category
    p_clean: float  # mean over used facts
    p_corrupted: float
    n_facts: int  # facts given
    skipped: tuple[SkippedFact, ...]  # not traced (unknown to the model, no target_true, subject not found)
    facts: tuple[FactTrace, ...]
    grad: GradientShare | None
    noise_std: float
    samples: int
    window: int
    measure: str
    seed: int
    seconds: float

    @property
    def n_used(self) -> int:
        return len(self.facts)

    @property
    def grad_share(self) -> tuple[float, ...]:
        return self.grad.share if self.grad is not None else ()

    def effect(self, kind: str, category: str) -> list[float]:
        """Per-layer mean indirect effect of `kind` at `category`."""
        c = self.categories.index(category)
        return [row[c] for row in self.effects[kind]]

    def peak(self, kind: str) -> tuple[int, str, float]:
        """(layer, category, effect) of the largest mean indirect effect of `kind`."""
        best = (0, self.categories[0], -math.inf)
        for layer, row in enumerate(self.effects[kind]):
            for cat, value in zip(self.categories, row):
                if not math.isnan(value) and value > best[2]:
                    best = (layer, cat, value)
        return best

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN -> None)."""
        def clean(x: Any) -> Any:
            if isinstance(x, float) and math.isnan(x):
                return None
            if isinstance(x, Mapping):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [clean(v) for v in x]
            return x

        grad = None
        if self.grad is not None:
            grad = {"share": list(self.grad.share), "per_fact_share": self.grad.per_fact(),
                    "subject_last_norm": self.grad.subject_last, "prompt_last_norm": self.grad.prompt_last,
                    "case_ids": list(self.grad.case_ids)}
        return clean({
            "kinds": list(self.kinds), "categories": list(self.categories), "n_layers": self.n_layers,
            "effects": {k: [list(r) for r in v] for k, v in self.effects.items()},
            "category_counts": dict(self.category_counts), "p_clean": self.p_clean, "p_corrupted": self.p_corrupted,
            "n_facts": self.n_facts, "n_used": self.n_used,
            "skipped": [{"case_id": s.case_id, "reason": s.reason} for s in self.skipped],
            "noise_std": self.noise_std, "samples": self.samples, "window": self.window, "measure": self.measure,
            "seed": self.seed, "seconds": self.seconds, "grad_share": grad,
            "facts": [{"case_id": f.case_id, "tokens": list(f.tokens), "subject_span": list(f.subject_span), "bos": f.bos,
                       "p_clean": f.p_clean, "p_corrupted": f.p_corrupted,
                       "restored": {k: [list(r) for r in v] for k, v in f.restored.items()}} for f in self.facts],
        })

    def format_tables(self) -> str:
        """Plain-text tables: per kind rows = layers, columns = position categories; then the gradient share."""
        lines = [
            f"causal trace: {self.n_used}/{self.n_facts} facts used"
            + (f" ({len(self.skipped)} skipped)" if self.skipped else "")
            + f", {self.samples} noise samples, noise std {self.noise_std:.4g}, measure {self.measure}, "
            f"{self.seconds:.1f} s",
            f"p_clean {self.p_clean:.4f}   p_corrupted {self.p_corrupted:.4f}   "
            f"gap {self.p_clean - self.p_corrupted:.4f}",
        ]
        head = "layer " + "".join(f"{CATEGORY_LABELS.get(c, c):>11s}" for c in self.categories)
        counts = "facts " + "".join(f"{self.category_counts.get(c, 0):>11d}" for c in self.categories)
        for kind in self.kinds:
            what = "block output" if kind == "hidden" else f"{kind} output, window {self.window}"
            lines += ["", f"[{kind}] mean indirect effect p_restored - p_corrupted ({what})", head]
            for layer, row in enumerate(self.effects[kind]):
                lines.append(f"{layer:>5d} " + "".join("        n/a" if math.isnan(v) else f"{v:>11.4f}" for v in row))
            lines.append(counts)
            layer, cat, value = self.peak(kind)
            if value > -math.inf:
                lines.append(f"peak: layer {layer}, {CATEGORY_LABELS.get(cat, cat)} ({value:.4f})")
        if self.grad is not None and self.grad.case_ids:
            lines += ["", "gradient share |dNLL/d mlp_out| subject-last / (subject-last + prompt-last), mean over facts"]
            s_norm = _column_means(self.grad.subject_last)
            p_norm = _column_means(self.grad.prompt_last)
            lines.append("layer      share   |g| subj last   |g| last")
            for layer, share in enumerate(self.grad.share):
                lines.append(f"{layer:>5d} {share:>10.4f} {s_norm[layer]:>15.4g} {p_norm[layer]:>10.4g}")
        return "\n".join(lines)


def _column_means(rows: Sequence[Sequence[float]]) -> list[float]:
    if not rows:
        return []
    return [sum(r[i] for r in rows) / len(rows) for i in range(len(rows[0]))]


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def category_positions(bos: bool, span: tuple[int, int], n_prompt: int) -> dict[str, list[int]]:
    """Prompt positions of each category present in one prompt. Tokens between BOS and the subject belong to none
    (their states cannot differ between the clean and corrupted runs). A one-token subject is both first and last;
    a subject right before the last token makes that token both "first_after" and "last"."""
    s0, s1 = span
    out: dict[str, list[int]] = {}
    if bos and s0 > 0:
        out["bos"] = [0]
    out["subject_first"] = [s0]
    if s1 - s0 > 2:
        out["subject_middle"] = list(range(s0 + 1, s1 - 1))
    out["subject_last"] = [s1 - 1]
    if s1 < n_prompt:
        out["first_after"] = [s1]
    if s1 + 1 < n_prompt - 1:
        out["further"] = list(range(s1 + 1, n_prompt - 1))
    out["last"] = [n_prompt - 1]
    return out


def window_layers(layer: int, window: int, n_layers: int) -> list[int]:
    """Layers restored together for an mlp/attn trace at `layer` (the paper's window: layer − w//2 … layer + ⌈w/2⌉ − 1)."""
    return list(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


def default_window(n_layers: int) -> int:
    return max(1, n_layers // 4)


def module_name(arch: ArchSpec, kind: str, layer: int) -> str:
    if kind == "hidden":
        return arch.layer(layer)
    if kind == "mlp":
        return arch.mlp(layer)
    if kind == "attn":
        return arch.attn(layer)
    raise ValueError(f"unknown trace kind {kind!r}; allowed: {', '.join(KINDS)}")


@dataclass(frozen=True)
class _Encoded:
    case_id: str
    ids: list[int]  # prompt ids (+ target[:-1] when the whole object is scored)
    n_prompt: int
    span: tuple[int, int]
    target: list[int]
    bos: bool


def _encode(tokenizer: Any, req: EditRequest, measure: str) -> _Encoded:
    if req.target_true is None:
        raise ValueError("no target_true (the true object is needed to trace a fact)")
    text = fill(req.prompt, req.subject)[0]
    ids = prompt_ids(tokenizer, text)
    span = subject_token_span(tokenizer, req.prompt, req.subject)
    tgt = target_ids(tokenizer, req.target_true)
    if measure == "first_token":
        tgt = tgt[:1]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return _Encoded(req.case_id, ids + tgt[:-1], len(ids), span, tgt, bool(ids) and ids[0] in special)


def _probs(logits: torch.Tensor, enc: _Encoded) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [b, T, V] -> (p [b] float32, known [b] bool). p is the first-token probability, or for the whole
    object exp(mean log p) over its tokens (seqedit.scoring's per-token-mean probability)."""
    pos = torch.arange(enc.n_prompt - 1, enc.n_prompt - 1 + len(enc.target), device=logits.device)
    tgt = torch.tensor(enc.target, device=logits.device)
    logp = torch.log_softmax(logits[:, pos].float(), dim=-1)  # [b, n_tgt, V]
    lp = logp[:, torch.arange(len(enc.target), device=logits.device), tgt]  # [b, n_tgt]
    known = (logp.argmax(-1) == tgt).all(dim=1)
    return lp.mean(dim=1).exp(), known


def subject_noise_std(
    model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], *, arch: ArchSpec | None = None,
    factor: float = NOISE_FACTOR, max_facts: int = 1000,
) -> float:
    """`factor` × the std (over all entries) of the embeddings of the subject tokens of up to `max_facts` prompts."""
    arch = arch or arch_for(model)
    ids: list[int] = []
    for req in list(requests)[:max_facts]:
        try:
            s0, s1 = subject_token_span(tokenizer, req.prompt, req.subject)
        except ValueError:
            continue
        ids += prompt_ids(tokenizer, req.text)[s0:s1]
    if not ids:
        raise ValueError("cannot estimate the noise level: no subject token found in the prompts; pass noise=")
    with torch.no_grad():
        emb = get_module(model, arch.embed)(torch.tensor(ids, device=model_device(model)))  # [n, d]
    return float(factor * emb.float().std())


# ---------------------------------------------------------------------------------------------------------------
# Tracing


@torch.no_grad()
def _trace_one(
    model: nn.Module, arch: ArchSpec, enc: _Encoded, *, kinds: Sequence[str], n_layers: int, window: int,
    samples: int, noise_std: float, generator: torch.Generator, batch_size: int, known_only: bool,
) -> tuple[float, float, dict[str, list[list[float]]]] | str:
    """(p_clean, p_corrupted, kind -> [layer][pos] p_restored) or the reason the fact is skipped."""
    device = model_device(model)
    x = torch.tensor([enc.ids], device=device)  # [1, T]; every row of this fact has the same length: no padding
    ones = torch.ones_like(x)  # explicit mask: BOS may equal the pad id, and transformers warns about that
    names = sorted({module_name(arch, k, l) for k in kinds for l in range(n_layers)})
    with capture(model, names, inputs=False) as cap:
        logits = model(input_ids=x, attention_mask=ones, use_cache=False).logits  # [1, T, V]
    clean = {n: cap.outputs[n][0] for n in names}  # [T, d]
    p_clean_t, known_t = _probs(logits, enc)
    p_clean, known = float(p_clean_t[0]), bool(known_t[0])
    if known_only and not known:
        return "not known (the true object is not the model's argmax)"

    s0, s1 = enc.span
    embed = get_module(model, arch.embed).weight
    noise = noise_std * torch.randn(samples, s1 - s0, embed.shape[-1], generator=generator)  # [S, n_subj, d]
    noise = noise.to(device=device, dtype=embed.dtype)
    # Jobs: None = plain corrupted run; (kind, layer, pos) = restore that state. Each job gets `samples` rows.
    jobs: list[tuple[str, int, int] | None] = [None]
    jobs += [(k, l, t) for k in kinds for l in range(n_layers) for t in range(s0, enc.n_prompt)]
    rows = [(j, s) for j in range(len(jobs)) for s in range(samples)]
    p_rows = torch.empty(len(rows))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        sample_idx = torch.tensor([s for _, s in chunk], device=device)
        restore: dict[str, tuple[list[int], list[int]]] = {}
        for r, (j, _) in enumerate(chunk):
            job = jobs[j]
            if job is None:
                continue
            kind, layer, pos = job
            layers = [layer] if kind == "hidden" else window_layers(layer, window, n_layers)
            for l in layers:
                rr, pp = restore.setdefault(module_name(arch, kind, l), ([], []))
                rr.append(r)
                pp.append(pos)

        def corrupt(out: torch.Tensor) -> torch.Tensor:  # [b, T, d] embeddings
            out = out.clone()
            out[:, s0:s1] += noise[sample_idx]
            return out

        def restorer(name: str, rr: list[int], pp: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
            r_t, p_t = torch.tensor(rr, device=device), torch.tensor(pp, device=device)

            def fn(out: torch.Tensor) -> torch.Tensor:  # [b, T, d]
                out = out.clone()
                out[r_t, p_t] = clean[name][p_t].to(out.dtype)
                return out
            return fn

        with contextlib.ExitStack() as stack:
            stack.enter_context(patch_output(model, arch.embed, corrupt))
            for name, (rr, pp) in restore.items():
                stack.enter_context(patch_output(model, name, restorer(name, rr, pp)))
            b = len(chunk)
            logits = model(input_ids=x.expand(b, -1), attention_mask=ones.expand(b, -1), use_cache=False).logits
        p_rows[start : start + len(chunk)] = _probs(logits, enc)[0].cpu()
    p_jobs = p_rows.view(len(jobs), samples).mean(dim=1)  # noise samples averaged, as in the paper
    p_corrupted = float(p_jobs[0])
    table = {k: [[p_corrupted] * enc.n_prompt for _ in range(n_layers)] for k in kinds}
    for j, job in enumerate(jobs[1:], start=1):
        assert job is not None
        kind, layer, pos = job
        table[kind][layer][pos] = float(p_jobs[j])
    return p_clean, p_corrupted, table


def trace(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    *,
    samples: int = 3,
    noise: float | None = None,
    kinds: Sequence[str] = KINDS,
    window: int | None = None,
    batch_size: int = 64,
    measure: str = "first_token",
    known_only: bool = True,
    seed: int = 0,
    grad_share: bool = True,
    arch: ArchSpec | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TraceResult:
    """Causal trace of each request's true fact (prompt filled with the subject → `target_true`).

    samples: noise samples per fact (batched). noise: absolute noise std; None = 3 × the std of the subject-token
    embeddings of these requests (the paper's level); 0 makes the corrupted run equal the clean one.
    kinds: any of "hidden" (block output), "mlp", "attn". window: layers restored together for mlp/attn
    (None = max(1, n_layers // 4); the paper uses 10 on 48-layer GPT-2 XL). batch_size: rows per forward pass.
    measure: "first_token" (p of the object's first token, as the paper) or "object" (per-token-mean probability of
    the whole object, teacher-forced). known_only: skip facts whose object is not the model's argmax.
    grad_share: also compute `gradient_share` on the traced facts. The model's weights, flags and mode are unchanged.
    """
    t0 = time.perf_counter()
    arch = arch or arch_for(model)
    kinds = tuple(kinds)
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown trace kind {k!r}; allowed: {', '.join(KINDS)}")
    if not kinds:
        raise ValueError(f"kinds is empty; allowed: {', '.join(KINDS)}")
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; allowed: {', '.join(MEASURES)}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    n_layers = num_layers(model)
    window = default_window(n_layers) if window is None else window
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= n_layers:
        raise ValueError(f"window must be an int in 1..{n_layers} (the model's layer count), got {window!r}")
    requests = list(requests)
    if not requests:
        raise ValueError("no requests to trace")
    if noise is None:
        noise_std = subject_noise_std(model, tokenizer, requests, arch=arch)
    elif noise < 0 or not math.isfinite(noise):
        raise ValueError(f"noise must be a finite std >= 0 or None (3 × subject embedding std), got {noise!r}")
    else:
        noise_std = float(noise)

    facts: list[FactTrace] = []
    used: list[EditRequest] = []
    skipped: list[SkippedFact] = []
    with frozen_model(model):
        for i, req in enumerate(requests):
            try:
                enc = _encode(tokenizer, req, measure)
            except ValueError as e:
                skipped.append(SkippedFact(req.case_id, str(e)))
                continue
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + i)  # per fact: order-independent noise
            out = _trace_one(model, arch, enc, kinds=kinds, n_layers=n_layers, window=window, samples=samples,
                             noise_std=noise_std, generator=gen, batch_size=batch_size, known_only=known_only)
            if isinstance(out, str):
                skipped.append(SkippedFact(req.case_id, out))
            else:
                p_clean, p_corr, table = out
                toks = tuple(tokenizer.convert_ids_to_tokens(enc.ids[: enc.n_prompt]))
                facts.append(FactTrace(req.case_id, toks, enc.span, enc.bos, p_clean, p_corr,
                                       {k: tuple(tuple(r) for r in v) for k, v in table.items()}))
                used.append(req)
            if progress is not None:
                progress(i + 1, len(requests))

    if skipped:
        log.info("trace: %d of %d facts skipped (first: %s: %s)", len(skipped), len(requests), skipped[0].case_id,
                 skipped[0].reason)
    effects, counts = _aggregate(facts, kinds, n_layers)
    grad = gradient_share(model, tokenizer, used, arch=arch, batch_size=batch_size) if grad_share and used else None
    mean = (lambda xs: sum(xs) / len(xs) if xs else math.nan)
    return TraceResult(
        kinds=kinds, categories=CATEGORIES, n_layers=n_layers, effects=effects, category_counts=counts,
        p_clean=mean([f.p_clean for f in facts]), p_corrupted=mean([f.p_corrupted for f in facts]),
        n_facts=len(requests), skipped=tuple(skipped), facts=tuple(facts), grad=grad, noise_std=noise_std,
        samples=samples, window=window, measure=measure, seed=seed, seconds=time.perf_counter() - t0,
    )


def _aggregate(
    facts: Sequence[FactTrace], kinds: Sequence[str], n_layers: int
) -> tuple[dict[str, tuple[tuple[float, ...], ...]], dict[str, int]]:
    counts = {c: 0 for c in CATEGORIES}
    sums = {k: {c: [0.0] * n_layers for c in CATEGORIES} for k in kinds}
    for f in facts:
        for k in kinds:
            for cat, per_layer in f.categories(k).items():
                sums[k][cat] = [a + b for a, b in zip(sums[k][cat], per_layer)]
        for cat in f.positions():
            counts[cat] += 1
    effects = {
        k: tuple(tuple(sums[k][c][l] / counts[c] if counts[c] else math.nan for c in CATEGORIES)
                 for l in range(n_layers))
        for k in kinds
    }
    return effects, counts


# ---------------------------------------------------------------------------------------------------------------
# Gradient share


def gradient_share(
    model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], *, arch: ArchSpec | None = None,
    batch_size: int = 16,
) -> GradientShare:
    """Per fact and layer, ‖∂NLL/∂(MLP output)‖ at the subject's last token and at the prompt's last token, where
    NLL is the mean per-token NLL of the whole true object (teacher-forced). One forward/backward per batch; a zero
    tensor added to every MLP output is the leaf the gradient is taken against, so the graph stays intact."""
    arch = arch or arch_for(model)
    n_layers = num_layers(model)
    device = model_device(model)
    encs = []
    for req in requests:
        encs.append(_encode(tokenizer, req, "object"))  # raises ValueError naming the problem (no target_true...)
    subj_rows: list[list[float]] = []
    last_rows: list[list[float]] = []
    step = max(1, batch_size)
    with frozen_model(model), torch.enable_grad():
        for start in range(0, len(encs), step):
            chunk = encs[start : start + step]
            ids, mask = right_pad([e.ids for e in chunk], pad_id(tokenizer), device)  # [b, T]
            b, width = ids.shape
            leaves: dict[str, torch.Tensor] = {}

            def adder(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
                def fn(out: torch.Tensor) -> torch.Tensor:  # [b, T, d]
                    leaves[name] = torch.zeros_like(out, requires_grad=True)
                    return out + leaves[name]
                return fn

            names = [arch.mlp(l) for l in range(n_layers)]
            with contextlib.ExitStack() as stack:
                for name in names:
                    stack.enter_context(patch_output(model, name, adder(name)))
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [b, T, V]
            loss = logits.new_zeros((), dtype=torch.float32)
            for i, e in enumerate(chunk):
                pos = torch.arange(e.n_prompt - 1, e.n_prompt - 1 + len(e.target), device=device)
                tgt = torch.tensor(e.target, device=device)
                lp = torch.log_softmax(logits[i, pos].float(), dim=-1)[torch.arange(len(tgt), device=device), tgt]
                loss = loss - lp.mean()  # rows do not interact: the summed loss gives each row its own gradient
            grads = torch.autograd.grad(loss, [leaves[n] for n in names])  # each [b, T, d]
            rows = torch.arange(len(chunk), device=device)
            s_idx = torch.tensor([e.span[1] - 1 for e in chunk], device=device)
            p_idx = torch.tensor([e.n_prompt - 1 for e in chunk], device=device)
            g_s = torch.stack([g[rows, s_idx].float().norm(dim=-1) for g in grads], dim=1)  # [b, L]
            g_p = torch.stack([g[rows, p_idx].float().norm(dim=-1) for g in grads], dim=1)  # [b, L]
            subj_rows += g_s.tolist()
            last_rows += g_p.tolist()
    return GradientShare(tuple(e.case_id for e in encs), tuple(map(tuple, subj_rows)), tuple(map(tuple, last_rows)))


# ---------------------------------------------------------------------------------------------------------------
# Heatmaps


def save_heatmaps(result: TraceResult, out_dir: str | Path, *, title: str = "") -> list[Path]:
    """One PNG per kind ([layer × category] mean indirect effect). Needs matplotlib (`pip install seqedit[plots]`);
    raises ImportError naming the extra when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("heatmaps need matplotlib: pip install 'seqedit[plots]'") from e
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    labels = [CATEGORY_LABELS.get(c, c) for c in result.categories]
    cmaps = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
    for kind in result.kinds:
        data = torch.tensor(result.effects[kind], dtype=torch.float64).T.numpy()  # [category, layer]
        fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * result.n_layers + 2.5), 3.6))
        im = ax.imshow(data, aspect="auto", cmap=cmaps.get(kind, "viridis"), interpolation="nearest")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xticks(range(result.n_layers))
        ax.set_xlabel("layer" if kind == "hidden" else f"center of {result.window}-layer window")
        what = {"hidden": "hidden state", "mlp": "MLP output", "attn": "attention output"}[kind]
        ax.set_title(f"{title + chr(10) if title else ''}restoring {what} ({result.n_used} facts)", fontsize=9)
        fig.colorbar(im, ax=ax, label="mean indirect effect")
        fig.tight_layout()
        path = out_dir / f"trace_{kind}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
