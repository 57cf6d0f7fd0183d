"""Shared machinery of the ROME family (ROME, r-ROME, p-ROME; reused by MEMIT, EMMET, AlphaEdit).

- `subject_last_index`: position of the subject's last token in `tokenizer(filled_prompt)` (BOS-aware, right padding).
- `context_templates`: "{}" + model-generated prefixes "x. {}" from fixed seeds, persisted in the run folder.
- `subject_keys`: the *input* of a module (the rewritten matrix) at the subject's last token, batched.
- `optimise_value`: ROME `compute_v` / MEMIT `compute_z`: δ added at the subject-last token of a module output.
- `rank_one_update`: ΔW = right·uᵀ with right = (v* − W k − b)/(kᵀu), in Linear convention, plus stored-layout factors.
- `TemporaryWeights`, `frozen_model`: change weights or flags for the duration of a computation, restore bitwise.
Conventions follow `seqedit.scoring`: prompt ids = `tokenizer(prompt)` (a BOS-adding tokenizer adds BOS), target ids =
`tokenizer(" " + target, add_special_tokens=False)`; the two are concatenated as ids, never re-tokenised as one string.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seqedit.apply import materialise
from seqedit.archs import ArchSpec, get_module, is_conv1d, linear_weight, num_layers
from seqedit.hooks import capture, capture_inputs, patch_output
from seqedit.scoring import pad_batch, prompt_ids, target_ids
from seqedit.types import EditRequest

# ---------------------------------------------------------------------------------------------------------------
# Tokens


def fill(template: str, subject: str) -> tuple[str, int, int]:
    """Put `subject` into the single "{}" of `template`; returns (text, subject char start, subject char end)."""
    if template.count("{}") != 1:
        raise ValueError(f"prompt template must contain '{{}}' exactly once, got {template!r}")
    start = template.index("{}")
    return template[:start] + subject + template[start + 2 :], start, start + len(subject)


def _leading_specials(ids: Sequence[int], tokenizer: Any) -> int:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    n = 0
    while n < len(ids) and ids[n] in special:
        n += 1
    return n


def subject_last_index(tokenizer: Any, template: str, subject: str) -> int:
    """Index of the subject's last token in `prompt_ids(tokenizer, fill(template, subject)[0])`.

    Fast tokenizers: the last token whose character span overlaps the subject (special tokens such as a prepended
    BOS have empty spans and never match). Others: leading special tokens + tokens of the text up to the subject end.
    """
    text, start, end = fill(template, subject)
    if end == start:
        raise ValueError(f"empty subject for prompt {template!r}")
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, return_offsets_mapping=True)
        hits = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start and b > a]
        if not hits:
            raise ValueError(f"subject {subject!r} not found among the tokens of {text!r}")
        return hits[-1]
    ids = prompt_ids(tokenizer, text)
    n = _leading_specials(ids, tokenizer) + len(tokenizer(text[:end], add_special_tokens=False)["input_ids"])
    if not 0 < n <= len(ids):
        raise ValueError(f"subject {subject!r} not found among the tokens of {text!r}")
    return n - 1


def subject_token_span(tokenizer: Any, template: str, subject: str) -> tuple[int, int]:
    """[first, last + 1) token indices of the subject in `prompt_ids(tokenizer, fill(template, subject)[0])`.

    The end is `subject_last_index` + 1. Fast tokenizers: the first token whose character span overlaps the subject.
    Others: leading special tokens + tokens of the text before the subject, with its trailing space if those tokens
    begin the prompt's tokens, else without it (BPE and SentencePiece usually glue the space to the next word).
    """
    last = subject_last_index(tokenizer, template, subject)
    text, start, end = fill(template, subject)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, return_offsets_mapping=True)
        first = next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start and b > a)
    else:
        ids = prompt_ids(tokenizer, text)
        n_special = _leading_specials(ids, tokenizer)
        n_prefix = 0
        for prefix in (text[:start], text[:start].rstrip(" ")):
            pre = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
            if list(ids[n_special : n_special + len(pre)]) == list(pre):
                n_prefix = len(pre)
                break
        else:
            n_prefix = len(tokenizer(text[:start].rstrip(" "), add_special_tokens=False)["input_ids"])
        first = min(n_special + n_prefix, last)
    return first, last + 1


def right_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask, both [len(rows), max_len] long tensors on `device`."""
    ids, mask = pad_batch(rows, pad_id)
    return ids.to(device), mask.to(device)


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------------------------
# Model state


@contextlib.contextmanager
def frozen_model(model: nn.Module) -> Iterator[None]:
    """eval mode and requires_grad=False on every parameter for the block; both restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


class TemporaryWeights:
    """Apply deltas to parameters for the duration of a computation and restore the originals bitwise on exit.

    Used for "several requests in one call, each computed on the weights after the previous ones" (ROME's
    `apply_rome_to_model`) and multi-layer updates; the editor then returns the summed delta and the driver applies it.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.saved: dict[str, torch.Tensor] = {}

    def __enter__(self) -> "TemporaryWeights":
        return self

    @torch.no_grad()
    def add(self, name: str, delta: torch.Tensor) -> None:
        """Add `delta` (stored layout) to parameter `name` in its own dtype."""
        param = self.model.get_parameter(name)
        if name not in self.saved:
            self.saved[name] = param.detach().clone()
        param.add_(delta.to(device=param.device, dtype=param.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        for name, value in self.saved.items():
            self.model.get_parameter(name).copy_(value)
        self.saved.clear()

    def __exit__(self, *exc: object) -> None:
        self.restore()


# ---------------------------------------------------------------------------------------------------------------
# Context templates

DEFAULT_TEMPLATE_FILE = "context_templates.json"


def _start_id(tokenizer: Any) -> int:
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to start context-template generation from")


def _clean(text: str) -> str:
    # Braces would break str.format-style templates; newlines make odd prompts (ROME joins paragraphs too).
    return " ".join(text.replace("{", " ").replace("}", " ").split())


@torch.no_grad()
def generate_context_templates(
    model: nn.Module, tokenizer: Any, length_params: Sequence[tuple[int, int]], seed: int, top_k: int = 5
) -> list[str]:
    """["{}"] + for each (length, n): n samples of `length` tokens (the start token included, as ROME's
    `generate_fast(max_out_len=length)` counts it) from BOS/EOS, top-k sampling, each `text + ". {}"`.

    Sampling draws from a local CPU generator seeded per group, so the result depends only on the model and `seed`.
    """
    device = model_device(model)
    start = _start_id(tokenizer)
    templates = ["{}"]
    with frozen_model(model):
        for group, (length, n) in enumerate(length_params):
            if length < 1 or n < 0:
                raise ValueError(f"context template length params must be (length >= 1, count >= 0), got {(length, n)}")
            if n == 0:
                continue
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + group)
            ids = torch.full((n, 1), start, dtype=torch.long, device=device)
            for _ in range(length - 1):
                logits = model(input_ids=ids, use_cache=False).logits[:, -1].float()  # [n, vocab]
                top = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1)
                probs = torch.softmax(top.values, dim=-1).cpu()
                choice = torch.multinomial(probs, 1, generator=gen).to(device)  # [n, 1] index into top-k
                ids = torch.cat([ids, top.indices.gather(1, choice)], dim=1)
            for row in ids[:, 1:].tolist():
                templates.append(_clean(tokenizer.decode(row, skip_special_tokens=True)) + ". {}")
    return templates


def _template_key(length_params: Sequence[tuple[int, int]], seed: int) -> str:
    return f"seed={seed};lengths=" + ",".join(f"{length}x{n}" for length, n in length_params)


def context_templates(
    model: nn.Module,
    tokenizer: Any,
    *,
    length_params: Sequence[tuple[int, int]],
    seed: int,
    run_dir: Path | None,
    file_name: str = DEFAULT_TEMPLATE_FILE,
) -> tuple[str, ...]:
    """Generated templates, read from / written to `run_dir/file_name` so that a resumed run reuses them.

    The file maps "seed=…;lengths=…" to a template list, so editors with different length params share it.
    """
    key = _template_key(length_params, seed)
    path = Path(run_dir) / file_name if run_dir is not None else None
    stored: dict[str, list[str]] = {}
    if path is not None and path.exists():
        try:
            stored = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"context template file {str(path)!r} is not valid JSON: {e}") from e
        if not isinstance(stored, dict):
            raise ValueError(f"context template file {str(path)!r} must hold an object, got {type(stored).__name__}")
        if key in stored:
            found = stored[key]
            if not (isinstance(found, list) and found and all(isinstance(t, str) and t.count("{}") == 1 for t in found)):
                raise ValueError(f"context template file {str(path)!r}: entry {key!r} is not a list of '{{}}' templates")
            return tuple(found)
    made = generate_context_templates(model, tokenizer, length_params, seed)
    if path is not None:
        stored[key] = made
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stored, indent=1))
        os.replace(tmp, path)
    return tuple(made)


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """Templates must start with the bare "{}" (v0 is read there) and each hold exactly one "{}"."""
    templates = tuple(templates)
    if not templates or templates[0] != "{}":
        raise ValueError(f"context templates must start with the bare template '{{}}', got {templates[:2]!r}")
    for t in templates:
        if t.count("{}") != 1:
            raise ValueError(f"context template {t!r} must contain '{{}}' exactly once")
    return templates


def contextualise(templates: Sequence[str], prompt: str) -> list[str]:
    """Each context template applied to the request prompt: "x. {}" + "{} is in" → "x. {} is in"."""
    return [t.replace("{}", prompt, 1) for t in templates]


# ---------------------------------------------------------------------------------------------------------------
# Keys


@torch.no_grad()
def subject_keys(
    model: nn.Module, tokenizer: Any, module_name: str, prompts: Sequence[str], subjects: Sequence[str]
) -> torch.Tensor:
    """Input of `module_name` at the subject-last token of each filled prompt: [n, d_in] in the model dtype.

    One right-padded batch; the forward pass stops at the module.
    """
    if len(prompts) != len(subjects):
        raise ValueError(f"{len(prompts)} prompts but {len(subjects)} subjects")
    rows = [prompt_ids(tokenizer, fill(p, s)[0]) for p, s in zip(prompts, subjects)]
    idx = torch.tensor([subject_last_index(tokenizer, p, s) for p, s in zip(prompts, subjects)])
    ids, mask = right_pad(rows, pad_id(tokenizer), model_device(model))
    with frozen_model(model), capture_inputs(model, [module_name], stop=True) as cap:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    x = cap.inputs[module_name]  # [n, T, d_in]
    return x[torch.arange(len(rows), device=x.device), idx.to(x.device)]


# ---------------------------------------------------------------------------------------------------------------
# Value optimisation (ROME compute_v, MEMIT compute_z)


@dataclass(frozen=True)
class ValueOptConfig:
    num_grad_steps: int = 20  # iterations; the last only evaluates (20 → at most 19 Adam updates)
    lr: float = 0.5
    loss_layer: int | None = None  # None: the model's own logits; else ln_f + lm_head on that block's output
    weight_decay: float = 0.5  # × ‖δ‖ / ‖v0‖² (unsquared norm, as in the reference code)
    clamp_norm_factor: float = 4.0  # ‖δ‖ ≤ factor · ‖v0‖ after every step
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2
    kl_prompts: tuple[str, ...] = ("{} is a",)


@dataclass(frozen=True)
class ValueResult:
    target: torch.Tensor  # v* = v0 + δ, [d_model] float32
    init: torch.Tensor  # v0: module output at the subject-last token of the bare prompt, [d_model] float32
    delta: torch.Tensor  # δ, [d_model] float32
    losses: tuple[float, ...]  # total loss at every evaluation
    nll: float  # NLL part of the last evaluation
    kl: float  # KL part (already × kl_factor)
    n_updates: int  # Adam steps taken


def optimise_value(
    model: nn.Module,
    tokenizer: Any,
    arch: ArchSpec,
    request: EditRequest,
    site: str,
    templates: Sequence[str],
    cfg: ValueOptConfig,
) -> ValueResult:
    """Find δ so that adding it to the output of module `site` at the subject-last token makes the model predict
    `request.target_new` after every context-prefixed prompt, with KL, weight-decay and norm-clamp regularisers.

    Deterministic (no randomness), leaves the model's weights, flags and mode as they were.
    """
    templates = check_templates(templates)
    subject = request.subject
    tgt = target_ids(tokenizer, request.target_new)
    rewriting = contextualise(templates, request.prompt)
    all_prompts = rewriting + list(cfg.kl_prompts)
    n_rw = len(rewriting)
    rows, lookups, tgt_rows, tgt_pos, tgt_tok = [], [], [], [], []
    for j, p in enumerate(all_prompts):
        ids = prompt_ids(tokenizer, fill(p, subject)[0])
        lookups.append(subject_last_index(tokenizer, p, subject))
        if j < n_rw:
            for t, tok in enumerate(tgt):  # position len(ids)-1+t predicts target token t
                tgt_rows.append(j)
                tgt_pos.append(len(ids) - 1 + t)
                tgt_tok.append(tok)
            ids = ids + tgt[:-1]
        rows.append(ids)
    device = model_device(model)
    ids, mask = right_pad(rows, pad_id(tokenizer), device)
    row_idx = torch.arange(len(rows), device=device)
    look_idx = torch.tensor(lookups, device=device)
    t_rows = torch.tensor(tgt_rows, device=device)
    t_pos = torch.tensor(tgt_pos, device=device)
    t_tok = torch.tensor(tgt_tok, device=device)
    kl_rows = torch.arange(n_rw, len(rows), device=device)

    get_module(model, site)  # validates the name before any work
    n_layers = num_layers(model)
    loss_layer = cfg.loss_layer if cfg.loss_layer is not None else n_layers - 1
    if not 0 <= loss_layer < n_layers:
        raise ValueError(f"v_loss_layer {cfg.loss_layer} out of range; the model has layers 0..{n_layers - 1}")
    own_logits = cfg.loss_layer is None  # else ln_f + lm_head on that block's output (MEMIT's recomputed logits)

    delta: torch.Tensor | None = None
    v0: torch.Tensor | None = None

    def add_delta(out: torch.Tensor) -> torch.Tensor:  # out: [b, T, d_model]
        nonlocal v0, delta
        if v0 is None:  # first pass: δ = 0, record v0 at the bare prompt (row 0)
            v0 = out[0, lookups[0]].detach().float().clone()
            delta = torch.zeros_like(v0, requires_grad=True)
        out = out.clone()
        out[row_idx, look_idx] = out[row_idx, look_idx] + delta.to(out.dtype)
        return out

    losses: list[float] = []
    kl_init: torch.Tensor | None = None
    opt: torch.optim.Optimizer | None = None
    nll_v = kl_v = 0.0
    n_updates = 0
    with frozen_model(model), torch.enable_grad():
        for it in range(cfg.num_grad_steps):
            with patch_output(model, site, add_delta):
                if own_logits:
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [b, T, V]
                else:
                    with capture(model, [arch.layer(loss_layer)], inputs=False, detach=False) as cap:
                        model(input_ids=ids, attention_mask=mask, use_cache=False)
                    h = cap.outputs[arch.layer(loss_layer)]
                    logits = get_module(model, arch.lm_head)(get_module(model, arch.ln_f)(h))
            assert delta is not None and v0 is not None
            if opt is None:
                opt = torch.optim.Adam([delta], lr=cfg.lr)
            # log-softmax only where needed: target positions and KL lookup positions
            tgt_lp = torch.log_softmax(logits[t_rows, t_pos].float(), dim=-1).gather(1, t_tok[:, None])[:, 0]
            per_row = torch.zeros(n_rw, device=device).index_add(0, t_rows, tgt_lp)  # Σ_t log p, per prompt
            nll = -(per_row / len(tgt)).mean()
            kl_lp = torch.log_softmax(logits[kl_rows, look_idx[kl_rows]].float(), dim=-1)  # [n_kl, V]
            if kl_init is None:
                kl_init = kl_lp.detach().clone()
            kl = cfg.kl_factor * F.kl_div(kl_init, kl_lp, log_target=True, reduction="batchmean")
            wd = cfg.weight_decay * (delta.norm() / v0.norm() ** 2)
            loss = nll + kl + wd
            losses.append(float(loss.detach()))
            nll_v, kl_v = float(nll.detach()), float(kl.detach())
            if losses[-1] < cfg.early_stop_loss or it == cfg.num_grad_steps - 1:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            n_updates += 1
            max_norm = cfg.clamp_norm_factor * v0.norm()
            with torch.no_grad():
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    assert delta is not None and v0 is not None
    d = delta.detach().clone()
    return ValueResult(v0 + d, v0, d, tuple(losses), nll_v, kl_v, n_updates)


# ---------------------------------------------------------------------------------------------------------------
# Rank-one update


@dataclass(frozen=True)
class RankOneUpdate:
    delta: torch.Tensor  # ΔW in the parameter's stored layout, float32
    left: torch.Tensor  # stored-layout factors: delta == left @ right.T, [rows, 1]
    right: torch.Tensor  # [cols, 1]
    u: torch.Tensor  # unit direction in key space, [d_in] float64
    right_vector: torch.Tensor  # (v* − W k − b)/(kᵀu), [d_out] float64
    stats: Mapping[str, float]


def rank_one_update(
    module: nn.Module, u_direction: torch.Tensor, key: torch.Tensor, target: torch.Tensor
) -> RankOneUpdate:
    """ΔW = right·uᵀ (Linear convention) with u = u_direction/‖u_direction‖ and right = (target − W key − b)/(keyᵀu),
    so that (W + ΔW) key + b = target exactly. Math in float64; returned delta in the stored layout, float32."""
    w = linear_weight(module).detach().double()  # [d_out, d_in]
    bias = getattr(module, "bias", None)
    key64 = key.detach().double().to(w.device)
    current = w @ key64 + (bias.detach().double() if bias is not None else 0.0)  # [d_out]
    u_norm = u_direction.double().to(w.device).norm()
    u = u_direction.double().to(w.device) / u_norm
    denominator = key64 @ u
    residual = target.detach().double().to(w.device) - current
    right_vec = residual / denominator
    if is_conv1d(module):  # stored as [d_in, d_out]
        left, right = u[:, None], right_vec[:, None]
    else:
        left, right = right_vec[:, None], u[:, None]
    stats = {
        "denominator": float(denominator),
        "u_norm": float(u_norm),
        "right_norm": float(right_vec.norm()),
        "residual_norm": float(residual.norm()),
        "key_norm": float(key64.norm()),
        "update_fro": float(right_vec.norm()),  # ‖right uᵀ‖_F = ‖right‖ for a unit u
        "weight_fro": float(w.norm()),
    }
    left32, right32 = left.float(), right.float()
    # The delta is the float32 outer product of the float32 factors (as the original float32 code computes it), so
    # the ledger can store the factors alone and reproduce the applied delta bit for bit.
    return RankOneUpdate(materialise(left32, right32).contiguous(), left32, right32, u, right_vec, stats)
