"""Shared math of the locate-then-edit editors (ROME, r-ROME, p-ROME, MEMIT, EMMET, AlphaEdit, ENCORE).

- `context_templates`: "{}" + model-generated prefixes "x. {}" from fixed seeds, persisted in the run folder
  (ROME: from BOS, 10 of 5 + 10 of 10 tokens; the MEMIT family: one of 10 tokens from each of five seed words).
- `subject_keys` / `template_keys`: the *input* of the rewritten matrix at the subject's last token, batched; the
  MEMIT family averages the bare prompt and the prefixed ones as two groups (`KEY_AVERAGES`).
- `optimise_value`: ROME `compute_v` / MEMIT `compute_z`: δ added at the subject-last token of any module output
  (ROME: the MLP output; MEMIT: the block output), its loss, and ENCORE's most-probable early stopping.
- `make_solver` / `solve_system`: (C + ridge)⁻¹k and the batched systems, by the published method unless the config
  names another (`COV_SOLVERS`, `SYSTEM_SOLVERS`), with the condition number and any fallback as diagnostics.
- `rank_one_update`, `low_rank_factors`: ΔW from keys and residuals, in the stored layout (Conv1D or Linear).
- `SpreadEditor`: the MEMIT loop (z at the last layer, residual spread over the layers in order on the partially
  edited model); MEMIT, EMMET, AlphaEdit and ENCORE differ only in `layer_adjustment` and the state they keep.
Token helpers are `seqedit.tokens`, model-state helpers `seqedit.model_state`, the statistics `seqedit.stats`.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from seqedit.apply import materialise
from seqedit.archs import ArchSpec, arch_for, get_module, is_conv1d, linear_weight, num_layers
from seqedit.editors.base import BaseEditor, EditorContext
from seqedit.hooks import capture, capture_inputs, patch_output
from seqedit.model_state import TemporaryWeights, frozen_model, model_device
from seqedit.scoring import prompt_ids, target_ids
from seqedit.stats import SecondMoment, StatsError, StatsSpec, layer_second_moments
from seqedit.tokens import fill, pad_id, right_pad, subject_last_index
from seqedit.types import EditProposal, EditRequest

MEMIT_PREFIXES = ("The", "Therefore", "Because", "I", "You")  # memit_main.get_context_templates seed words


class EditorError(ValueError):
    """An editor cannot produce a valid update (a non-finite result, a singular system with no fallback)."""


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
    model: nn.Module, tokenizer: Any, length_params: Sequence[tuple[int, int]], seed: int, top_k: int = 5,
    prefixes: Sequence[str] = (),
) -> list[str]:
    """["{}"] + for each (length, n) a group of n prefixes of `length` tokens, top-k sampling, each `text + ". {}"`.

    Without `prefixes` (ROME) every sample starts from BOS/EOS and `length` counts that start token, as ROME's
    `generate_fast(["<|endoftext|>"], max_out_len=length)` does. With `prefixes` (the MEMIT family: "The",
    "Therefore", "Because", "I", "You") each prefix starts n // len(prefixes) samples and `length` counts its tokens,
    which stay in the text. Sampling draws from a local CPU generator seeded per group, so the result depends only on
    the model and `seed`.
    """
    device = model_device(model)
    templates = ["{}"]
    with frozen_model(model):
        for group, (length, n) in enumerate(length_params):
            if length < 1 or n < 0:
                raise ValueError(f"context template length params must be (length >= 1, count >= 0), got {(length, n)}")
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + group)
            starts = ([(prompt_ids(tokenizer, p), n // len(prefixes)) for p in prefixes] if prefixes
                      else [([_start_id(tokenizer)], n)])
            for start, count in starts:
                if count == 0:
                    continue
                ids = torch.tensor([start] * count, dtype=torch.long, device=device)
                for _ in range(length - ids.shape[1]):
                    logits = model(input_ids=ids, use_cache=False).logits[:, -1].float()  # [count, vocab]
                    top = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1)
                    probs = torch.softmax(top.values, dim=-1).cpu()
                    choice = torch.multinomial(probs, 1, generator=gen).to(device)  # [count, 1] index into top-k
                    ids = torch.cat([ids, top.indices.gather(1, choice)], dim=1)
                keep = ids if prefixes else ids[:, 1:]  # ROME drops its start token; prefix words stay
                for row in keep.tolist():
                    templates.append(_clean(tokenizer.decode(row, skip_special_tokens=True)) + ". {}")
    return templates


def _template_key(length_params: Sequence[tuple[int, int]], seed: int, prefixes: Sequence[str] = ()) -> str:
    key = f"seed={seed};lengths=" + ",".join(f"{length}x{n}" for length, n in length_params)
    return key + (";prefixes=" + "|".join(prefixes) if prefixes else "")


def context_templates(
    model: nn.Module,
    tokenizer: Any,
    *,
    length_params: Sequence[tuple[int, int]],
    seed: int,
    run_dir: Path | None,
    prefixes: Sequence[str] = (),
    file_name: str = DEFAULT_TEMPLATE_FILE,
) -> tuple[str, ...]:
    """Generated templates, read from / written to `run_dir/file_name` so that a resumed run reuses them.

    The file maps "seed=…;lengths=…" to a template list, so editors with different length params share it.
    """
    key = _template_key(length_params, seed, prefixes)
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
    made = generate_context_templates(model, tokenizer, length_params, seed, prefixes=prefixes)
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
class ValueConfig:
    """The `value:` section of every locate-then-edit editor (ROME `compute_v`, MEMIT `compute_z`).

    Defaults are ROME's gpt2-xl / gpt-j hparams; the MEMIT family's editors default to clamp_norm_factor 0.75."""

    num_grad_steps: int = 20  # iterations; the last only evaluates (20 → at most 19 Adam updates)
    lr: float = 0.5  # Adam learning rate of δ
    # None: the model's own logits (the original ROME always scores with them; MEMIT's ln_f + lm_head on the last
    # block's output is the same thing); a layer: ln_f + lm_head on that block's output (a deviation, recorded).
    loss_layer: int | None = None
    weight_decay: float = 0.5  # × ‖δ‖ / ‖v0‖² (unsquared norm, as in the reference code)
    clamp_norm_factor: float = 4.0  # ‖δ‖ ≤ factor · ‖v0‖ after every step
    kl_factor: float = 0.0625  # weight of the KL term that keeps the subject's other predictions (kl_prompts)
    early_stop_loss: float = 5e-2  # stop once the total loss is below this
    # ENCORE's most-probable early stopping (MPES): < 0 stops once the target is the argmax at every target position
    # of the rewriting prompts (the first, bare prompt excluded, as in the published code) for |prob_cutoff| steps
    # in all (not necessarily consecutive, as published); > 0 stops once the mean target probability exceeds it;
    # 0 = off (ROME, MEMIT, EMMET, AlphaEdit).
    prob_cutoff: float = 0.0
    kl_prompts: tuple[str, ...] = ("{} is a",)  # prompts of the KL term ("{}" = the subject)
    # Requests whose z is optimised together in one forward pass (the MEMIT family): memory, not results, depends
    # on it (each request follows its own trajectory); 10,000-request EMMET batches run in chunks of this size.
    batch_requests: int = 128

    def __post_init__(self) -> None:
        if self.num_grad_steps < 1:
            raise ValueError(f"value.num_grad_steps must be >= 1, got {self.num_grad_steps}")
        if self.lr <= 0:
            raise ValueError(f"value.lr must be > 0, got {self.lr}")
        for name in ("weight_decay", "clamp_norm_factor", "kl_factor"):
            if getattr(self, name) < 0:
                raise ValueError(f"value.{name} must be >= 0, got {getattr(self, name)}")
        if self.prob_cutoff < 0 and not float(self.prob_cutoff).is_integer():
            raise ValueError(f"value.prob_cutoff < 0 counts steps and must be a whole number, got {self.prob_cutoff}")
        if self.prob_cutoff >= 1:
            raise ValueError(f"value.prob_cutoff > 0 is a probability and must be < 1, got {self.prob_cutoff}")
        if self.batch_requests < 1:
            raise ValueError(f"value.batch_requests must be >= 1, got {self.batch_requests}")
        for p in self.kl_prompts:
            if p.count("{}") != 1:
                raise ValueError(f"value.kl_prompts: {p!r} must contain '{{}}' exactly once")


@dataclass(frozen=True)
class ValueResult:
    target: torch.Tensor  # v* = v0 + δ, [d_model] float32
    init: torch.Tensor  # v0: module output at the subject-last token of the bare prompt, [d_model] float32
    delta: torch.Tensor  # δ, [d_model] float32
    losses: tuple[float, ...]  # total loss at every evaluation
    nll: float  # NLL part of the last evaluation
    kl: float  # KL part (already × kl_factor)
    n_updates: int  # Adam steps taken
    stopped_by: str = "steps"  # steps | loss (early_stop_loss) | mpes (prob_cutoff)


def optimise_value(
    model: nn.Module,
    tokenizer: Any,
    arch: ArchSpec,
    request: EditRequest,
    site: str,
    templates: Sequence[str],
    cfg: ValueConfig,
) -> ValueResult:
    """Find δ so that adding it to the output of module `site` at the subject-last token makes the model predict
    `request.target_new` after every context-prefixed prompt, with KL, weight-decay and norm-clamp regularisers.

    Deterministic (no randomness), leaves the model's weights, flags and mode as they were. One request of
    `optimise_values`."""
    return optimise_values(model, tokenizer, arch, [request], site, templates, cfg)[0]


def optimise_values(
    model: nn.Module,
    tokenizer: Any,
    arch: ArchSpec,
    requests: Sequence[EditRequest],
    site: str,
    templates: Sequence[str],
    cfg: ValueConfig,
) -> list[ValueResult]:
    """`optimise_value` for several requests at once: one forward pass per step over all their prompts, one δ_i
    per request. Each request's loss depends only on its own δ_i and Adam is elementwise, so every request follows
    the trajectory it would follow alone (to float rounding); a request that stops early (loss, MPES) keeps its δ_i
    from then on while the others go on. The published code optimises one request at a time."""
    templates = check_templates(templates)
    n_req = len(requests)
    if n_req == 0:
        raise ValueError("no requests to optimise")
    rows: list[list[int]] = []
    lookups, row_req, tgt_rows, tgt_pos, tgt_tok, tgt_req = [], [], [], [], [], []
    first_row, rw_rows, kl_row_lists, tgt_len = [], [], [], []
    for i, request in enumerate(requests):
        subject = request.subject
        tgt = target_ids(tokenizer, request.target_new)
        tgt_len.append(len(tgt))
        rewriting = contextualise(templates, request.prompt)
        first_row.append(len(rows))
        rw, kl = [], []
        for j, p in enumerate(rewriting + list(cfg.kl_prompts)):
            ids = prompt_ids(tokenizer, fill(p, subject)[0])
            lookups.append(subject_last_index(tokenizer, p, subject))
            row_req.append(i)
            if j < len(rewriting):
                for t, tok in enumerate(tgt):  # position len(ids)-1+t predicts target token t
                    tgt_rows.append(len(rows))
                    tgt_pos.append(len(ids) - 1 + t)
                    tgt_tok.append(tok)
                    tgt_req.append(i)
                ids = ids + tgt[:-1]
                rw.append(len(rows))
            else:
                kl.append(len(rows))
            rows.append(ids)
        rw_rows.append(rw)
        kl_row_lists.append(kl)
    n_kl = len(cfg.kl_prompts)
    device = model_device(model)
    ids, mask = right_pad(rows, pad_id(tokenizer), device)
    row_idx = torch.arange(len(rows), device=device)
    look_idx = torch.tensor(lookups, device=device)
    req_of_row = torch.tensor(row_req, device=device)
    t_rows = torch.tensor(tgt_rows, device=device)
    t_pos = torch.tensor(tgt_pos, device=device)
    t_tok = torch.tensor(tgt_tok, device=device)
    t_req = torch.tensor(tgt_req, device=device)
    rw_index = torch.tensor(rw_rows, device=device)  # [n, n_rw] row numbers
    kl_rows = torch.tensor([r for rs in kl_row_lists for r in rs], device=device, dtype=torch.long)  # [n·n_kl]
    bare_rows = torch.tensor(first_row, device=device)
    lengths = torch.tensor(tgt_len, device=device, dtype=torch.float32)  # [n]
    # target positions of the prefixed prompts (the bare one, template 0, excluded as in ENCORE's MPES)
    t_template = torch.tensor([r - first_row[q] for r, q in zip(tgt_rows, tgt_req)], device=device)
    mpes_mask = t_template != 0

    get_module(model, site)  # validates the name before any work
    n_layers = num_layers(model)
    loss_layer = cfg.loss_layer if cfg.loss_layer is not None else n_layers - 1
    if not 0 <= loss_layer < n_layers:
        raise ValueError(f"value.loss_layer {cfg.loss_layer} out of range; the model has layers 0..{n_layers - 1}")
    own_logits = cfg.loss_layer is None  # else ln_f + lm_head on that block's output (MEMIT's recomputed logits)

    delta: torch.Tensor | None = None
    v0: torch.Tensor | None = None

    def add_delta(out: torch.Tensor) -> torch.Tensor:  # out: [b, T, d_model]
        nonlocal v0, delta
        if v0 is None:  # first pass: δ = 0, record v0 at each request's bare prompt
            v0 = out[bare_rows, look_idx[bare_rows]].detach().float().clone()  # [n, d_model]
            delta = torch.zeros_like(v0, requires_grad=True)
        out = out.clone()
        out[row_idx, look_idx] = out[row_idx, look_idx] + delta[req_of_row].to(out.dtype)
        return out

    losses: list[list[float]] = [[] for _ in range(n_req)]
    nll_v, kl_v = [0.0] * n_req, [0.0] * n_req
    n_updates, mpes_hits = [0] * n_req, [0] * n_req
    stopped_by = ["steps"] * n_req
    active = [True] * n_req
    kl_init: torch.Tensor | None = None
    opt: torch.optim.Optimizer | None = None
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
            per_row = torch.zeros(len(rows), device=device).index_add(0, t_rows, tgt_lp)  # Σ_t log p, per prompt
            per_prompt = per_row[rw_index] / lengths[:, None]  # [n, n_rw] mean log p of the target
            nll = -per_prompt.mean(1)  # [n]
            kl_lp = torch.log_softmax(logits[kl_rows, look_idx[kl_rows]].float(), dim=-1)  # [n·n_kl, V]
            if kl_init is None:
                kl_init = kl_lp.detach().clone()
            # F.kl_div(init, current, log_target=True, reduction="batchmean") per request
            kl_el = F.kl_div(kl_init, kl_lp, log_target=True, reduction="none").sum(-1).reshape(n_req, n_kl)
            kl = cfg.kl_factor * kl_el.sum(1) / n_kl  # [n]
            wd = cfg.weight_decay * (delta.norm(dim=1) / v0.norm(dim=1) ** 2)  # [n]
            loss = nll + kl + wd  # [n]
            # one device-to-host transfer per quantity and step, not one per request
            loss_l, nll_l, kl_l = loss.detach().tolist(), nll.detach().tolist(), kl.detach().tolist()
            with torch.no_grad():
                all_top = prob = None
                if cfg.prob_cutoff < 0:  # ENCORE MPES: the first (bare) rewriting prompt is left out, as published
                    wrong = ((logits[t_rows, t_pos].argmax(-1) != t_tok) & mpes_mask).float()
                    all_top = (torch.zeros(n_req, device=device).index_add(0, t_req, wrong) == 0).tolist()
                elif cfg.prob_cutoff > 0:
                    prob = torch.exp(per_prompt.detach()).mean(1).tolist()
            for i in range(n_req):
                if not active[i]:
                    continue
                losses[i].append(loss_l[i])
                nll_v[i], kl_v[i] = nll_l[i], kl_l[i]
                if all_top is not None:
                    mpes_hits[i] += int(all_top[i])
                    if mpes_hits[i] == abs(int(cfg.prob_cutoff)):
                        stopped_by[i], active[i] = "mpes", False
                        continue
                if prob is not None and prob[i] > cfg.prob_cutoff:
                    stopped_by[i], active[i] = "mpes", False
                    continue
                if losses[i][-1] < cfg.early_stop_loss:
                    stopped_by[i], active[i] = "loss", False
                    continue
                if it == cfg.num_grad_steps - 1:
                    active[i] = False
            if not any(active):
                break
            keep = torch.tensor(active, device=device)
            frozen = delta.detach().clone()
            opt.zero_grad()
            (loss * keep).sum().backward()  # each δ_i gets the gradient of its own loss only
            opt.step()
            with torch.no_grad():
                delta[~keep] = frozen[~keep]  # stopped requests keep their δ (Adam's momentum would move them)
                max_norm = cfg.clamp_norm_factor * v0.norm(dim=1, keepdim=True)
                norms = delta.norm(dim=1, keepdim=True)
                over = (norms > max_norm) & keep[:, None]
                delta.copy_(torch.where(over, delta * (max_norm / norms), delta))
            for i in range(n_req):
                n_updates[i] += int(active[i])
    assert delta is not None and v0 is not None
    d = delta.detach().clone()
    return [ValueResult(v0[i] + d[i], v0[i], d[i], tuple(losses[i]), nll_v[i], kl_v[i], n_updates[i], stopped_by[i])
            for i in range(n_req)]


# ---------------------------------------------------------------------------------------------------------------
# Solving with C (ROME's u = C⁻¹k*) and the batched systems of the MEMIT family

COV_SOLVERS = ("inverse", "cholesky", "pinv")
SYSTEM_SOLVERS = ("solve", "cholesky", "lstsq")
SOLVE_DTYPES = {"float64": torch.float64, "float32": torch.float32}
COND_MAX_DIM = 8192  # above this the exact condition number (an O(d³) eigendecomposition) is not computed: NaN


def condition_number(a: torch.Tensor, symmetric: bool = True) -> float:
    """2-norm condition number in float64: of a symmetric matrix from its eigenvalues (inf when not positive
    definite), else from its singular values; NaN above COND_MAX_DIM (an O(d³) decomposition)."""
    if a.shape[0] > COND_MAX_DIM:
        return float("nan")
    if not symmetric:
        return float(torch.linalg.cond(a.double()))
    ev = torch.linalg.eigvalsh(a.double())
    lo, hi = float(ev[0]), float(ev[-1])
    return hi / lo if lo > 0 else float("inf")


def _ridged(c: torch.Tensor, ridge: float) -> torch.Tensor:
    if ridge == 0:
        return c
    d = c.shape[0]
    return c + ridge * (torch.trace(c) / d) * torch.eye(d, dtype=c.dtype, device=c.device)


@dataclass(frozen=True)
class CovSolver:
    """x = (C + ridge·(tr C / d)·I)⁻¹ k by one of COV_SOLVERS:

    - inverse (the published ROME route, `get_inv_cov`): `torch.inverse` of C in the dtype it was accumulated in,
      cast to float32 and applied in float32. A numerically singular C (dead units) gives what the original gives:
      huge entries along its near-null directions, i.e. the 100-3000x updates of disabling edits; an exactly
      singular C is an error (the original fails there too).
    - cholesky: float64 Cholesky; a C that is not numerically positive definite is an error naming the fixes.
    - pinv: float64 Moore-Penrose pseudo-inverse (eigen-directions below d·eps(C's dtype)·λ_max dropped).
    """

    method: str
    matrix: torch.Tensor  # inverse/pinv: the [d, d] inverse; cholesky: the lower factor
    ridge: float
    condition: float  # of the matrix actually inverted

    def solve(self, k: torch.Tensor) -> torch.Tensor:
        """k: [d] or [d, n] → same shape, float64 (computed in the inverse's dtype for method=inverse)."""
        k2 = k.reshape(k.shape[0], -1).to(self.matrix.device)
        if self.method == "cholesky":
            x = torch.cholesky_solve(k2.double(), self.matrix)
        elif self.method == "inverse":
            x = (self.matrix @ k2.to(self.matrix.dtype)).double()
        else:
            x = self.matrix @ k2.double()
        return x.reshape(k.shape)


_SINGULAR_PIVOT = 1e-10  # a Cholesky pivot² below this fraction of the mean eigenvalue counts as rank deficiency


def make_solver(mom2: torch.Tensor, *, method: str = "inverse", ridge: float = 0.0, rtol: float | None = None,
                device: torch.device | str | None = None, inverse_dtype: torch.dtype = torch.float32) -> CovSolver:
    """Prepare x = (C + ridge·(tr C/d)·I)⁻¹ k for `method` (see `CovSolver`). Never regularises on its own.

    method=inverse inverts in C's own dtype and keeps the inverse in `inverse_dtype`: float32 for ROME
    (`get_inv_cov(...).float()`), float64 for EMMET (`torch.inverse(cov.double())`)."""
    if method not in COV_SOLVERS:
        raise ValueError(f"solver {method!r} is not allowed; allowed: {', '.join(COV_SOLVERS)}")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    c = mom2.to(device=device)
    d = c.shape[0]
    if float(torch.trace(c.double())) <= 0:
        raise StatsError("second moment has zero trace (all keys are zero)")
    c = _ridged(c, ridge)
    cond = condition_number(c)
    if method == "inverse":
        inv, info = torch.linalg.inv_ex(c)
        if int(info) != 0 or not torch.isfinite(inv).all():
            raise StatsError(
                f"second moment (d={d}) is exactly singular: the published float32 inverse fails (condition number "
                f"{cond:.3g}); choose solver=pinv, solver=cholesky with ridge > 0 (e.g. ridge=1e-2), or more "
                "statistics text")
        return CovSolver(method, inv.to(inverse_dtype), ridge, cond)
    c64 = c.double()
    if method == "cholesky":
        scale = float(torch.trace(c64)) / d
        chol, info = torch.linalg.cholesky_ex(c64)
        if int(info) != 0 or float(chol.diagonal().square().min()) < _SINGULAR_PIVOT * scale:
            raise StatsError(
                f"second moment (d={d}) is singular (condition number {cond:.3g}) with ridge {ridge}: set ridge > 0 "
                "(e.g. 1e-2), use solver=pinv or solver=inverse (the published route), or more statistics text")
        return CovSolver(method, chol, ridge, cond)
    # eigenvalues below d·eps of the dtype C was accumulated in are rounding noise (numpy / LAPACK's default rule)
    tol = rtol if rtol is not None else d * torch.finfo(mom2.dtype).eps
    return CovSolver(method, torch.linalg.pinv(c64, rtol=tol, hermitian=True), ridge, cond)


def solve_system(a: torch.Tensor, b: torch.Tensor, method: str, dtype: str, symmetric: bool = True
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """X = A⁻¹B for A [d, d] (symmetric unless said) and B [d, n], by one of SYSTEM_SOLVERS in `dtype`:
    solve = `torch.linalg.solve` (LU, as MEMIT / EMMET / AlphaEdit / ENCORE do); cholesky; lstsq (minimum-norm least
    squares, for a singular A). Diagnostics: condition number of A, whether the result is finite. A non-finite result
    is an EditorError, never written into the model."""
    if method not in SYSTEM_SOLVERS:
        raise ValueError(f"system solver {method!r} is not allowed; allowed: {', '.join(SYSTEM_SOLVERS)}")
    a, b = a.to(SOLVE_DTYPES[dtype]), b.to(SOLVE_DTYPES[dtype])
    cond = condition_number(a, symmetric)
    try:
        if method == "solve":
            x = torch.linalg.solve(a, b)
        elif method == "cholesky":
            x = torch.cholesky_solve(b, torch.linalg.cholesky(a))
        else:
            x = torch.linalg.lstsq(a.cpu().double(), b.cpu().double(), driver="gelsd").solution.to(a.device, a.dtype)
    except RuntimeError as e:  # torch.linalg.LinAlgError is a RuntimeError
        raise EditorError(f"the {a.shape[0]}x{a.shape[0]} system is singular for solver={method} (condition number "
                          f"{cond:.3g}): {e}; use solver=lstsq, a ridge, or more statistics text") from e
    if not torch.isfinite(x).all():
        raise EditorError(f"solving the {a.shape[0]}x{a.shape[0]} system (solver={method}, {dtype}, condition number "
                          f"{cond:.3g}) gave non-finite values; use solver=lstsq, a ridge, or float64")
    return x, {"condition": cond}


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


def low_rank_factors(module: nn.Module, resid: torch.Tensor, adj: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ΔW = residᵀ adjᵀ in the Linear convention (resid: [n, d_out], adj: [d_in, n]) as stored-layout float32 factors
    (left, right) with delta = materialise(left, right) (the ledger's form). Returns (delta, left, right)."""
    r = resid.T.float().contiguous()  # [d_out, n]
    k = adj.float().contiguous()  # [d_in, n]
    left, right = (k, r) if is_conv1d(module) else (r, k)
    return materialise(left, right).contiguous(), left, right


# ---------------------------------------------------------------------------------------------------------------
# Keys and outputs of a batch of requests

KEY_AVERAGES = ("templates", "groups")  # ROME: uniform over all templates; MEMIT compute_ks: mean of group means


def template_groups(templates: Sequence[str], length_params: Sequence[tuple[int, int]], prefixes: Sequence[str],
                    generated: bool) -> tuple[int, ...]:
    """Sizes of the template groups that MEMIT's compute_ks averages separately: the bare "{}", then one group per
    (length, n) entry of generated templates (explicit templates: all the prefixed ones as one group)."""
    if not generated:
        return (1, len(templates) - 1) if len(templates) > 1 else (1,)
    sizes = [1]
    for _, n in length_params:
        k = (n // len(prefixes)) * len(prefixes) if prefixes else n
        if k:
            sizes.append(k)
    if sum(sizes) != len(templates):
        raise ValueError(f"{len(templates)} templates do not match the groups {sizes} of length params "
                         f"{list(length_params)}")
    return tuple(sizes)


@torch.no_grad()
def template_keys(model: nn.Module, tokenizer: Any, module_name: str, requests: Sequence[EditRequest],
                  templates: Sequence[str], groups: Sequence[int], average: str = "groups") -> torch.Tensor:
    """Key of each request at `module_name` averaged over the context templates: [n, d_in] float32, one batch.

    average="groups" is MEMIT's `compute_ks` (bare prompt 1/2, each of five prefixes 1/10 with the default
    templates); "templates" weights every template equally (ROME's k*)."""
    if average not in KEY_AVERAGES:
        raise ValueError(f"key average {average!r} is not allowed; allowed: {', '.join(KEY_AVERAGES)}")
    prompts = [p for r in requests for p in contextualise(templates, r.prompt)]
    subjects = [r.subject for r in requests for _ in templates]
    keys = subject_keys(model, tokenizer, module_name, prompts, subjects).float()  # [n·T, d_in]
    keys = keys.reshape(len(requests), len(templates), -1)  # [n, T, d_in]
    if average == "templates":
        return keys.mean(1)
    bounds = [0, *torch.tensor(list(groups)).cumsum(0).tolist()]
    return torch.stack([keys[:, a:b].mean(1) for a, b in zip(bounds[:-1], bounds[1:])], 1).mean(1)


@torch.no_grad()
def subject_outputs(model: nn.Module, tokenizer: Any, module_name: str, requests: Sequence[EditRequest]
                    ) -> torch.Tensor:
    """(First) output of `module_name` at the subject-last token of each bare prompt: [n, d_out] float32."""
    rows = [prompt_ids(tokenizer, fill(r.prompt, r.subject)[0]) for r in requests]
    idx = torch.tensor([subject_last_index(tokenizer, r.prompt, r.subject) for r in requests])
    ids, mask = right_pad(rows, pad_id(tokenizer), model_device(model))
    with frozen_model(model), capture(model, [module_name], inputs=False) as cap:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    y = cap.outputs[module_name]  # [n, T, d_out]
    return y[torch.arange(len(rows), device=y.device), idx.to(y.device)].float()


# ---------------------------------------------------------------------------------------------------------------
# What every locate-then-edit editor shares: context templates as state, statistics from the configured text


class LocateEditor(BaseEditor):
    """Context templates (generated once from the unedited model, saved in every snapshot so a resume reuses them)
    and second moments from `config.stats` (or the world's held-out text); subclasses decide what to do with C."""

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._templates: tuple[str, ...] | None = None
        self.moments: dict[int, SecondMoment] = {}  # layer → statistics used (count, cache path, build time)

    @property
    def needs_statistics(self) -> bool:
        """Whether the update uses C (ROME with mom2_adjustment=false does not): preflight checks the text then."""
        return True

    def prepare(self, model: nn.Module, tokenizer: Any, ctx: EditorContext) -> None:
        """Generate (or reload) the context templates and load (or build) C for every layer, on the unedited model."""
        super().prepare(model, tokenizer, ctx)
        self.templates(model, tokenizer)
        if self.needs_statistics:
            self.load_statistics(model, tokenizer, self.layers(model))

    def load_statistics(self, model: nn.Module, tokenizer: Any, layers: Sequence[int]) -> None:
        """C for the layers that have none yet (the missing ones in one pass over the text), each handed to
        `use_statistics` with the device of the parameter it serves."""
        missing = [layer for layer in layers if layer not in self.moments]
        if not missing:
            return
        arch = self._ctx(model).arch
        for layer, moment in self.second_moments(model, tokenizer, missing).items():
            self.use_statistics(layer, moment, get_module(model, arch.mlp_out(layer)).weight.device)
            self.moments[layer] = moment  # only once it is usable: a singular C fails again on the next call

    def use_statistics(self, layer: int, moment: SecondMoment, device: torch.device) -> None:
        """What the editor keeps of C (a solver, C + ridge, a projector)."""
        raise NotImplementedError

    def _ctx(self, model: nn.Module) -> EditorContext:
        if self.ctx is None:
            self.ctx = EditorContext.for_model(model)
        return self.ctx

    def check_call(self, model: nn.Module, requests: Sequence[EditRequest]) -> None:
        if not requests:
            raise ValueError(f"{self.name}: no requests to edit")
        if self._ctx(model).arch != arch_for(model):
            raise ValueError(f"{self.name}: prepared for {self.ctx.arch.name}, called with another architecture")

    def templates(self, model: nn.Module, tokenizer: Any) -> tuple[str, ...]:
        if self._templates is None:
            cfg = self.config
            if cfg.context_templates is not None:
                self._templates = check_templates(cfg.context_templates)
            else:
                ctx = self._ctx(model)
                self._templates = check_templates(context_templates(
                    model, tokenizer, length_params=cfg.context_template_length_params, seed=ctx.seed,
                    run_dir=ctx.run_dir, prefixes=getattr(cfg, "context_template_prefixes", ())))
        return self._templates

    def state_dict(self) -> dict[str, Any]:
        """The context templates; the statistics are a cache keyed by their inputs, not state."""
        return {"templates": list(self._templates)} if self._templates is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = set(state) - {"templates"}
        if unknown:
            raise ValueError(f"{self.name}: unexpected editor state keys {sorted(unknown)}")
        if "templates" in state:
            self._templates = check_templates(tuple(state["templates"]))

    def second_moments(self, model: nn.Module, tokenizer: Any, layers: Sequence[int]) -> dict[int, SecondMoment]:
        """Load or build C for `layers` (the missing ones in one pass over the text).

        A callable in `ctx.extras["stats_progress"]` receives (done, total) while statistics are built."""
        ctx = self._ctx(model)
        progress = ctx.extras.get("stats_progress") if isinstance(ctx.extras, Mapping) else None
        sources = tuple(Path(src) for src in self.config.stats.source) or ctx.stats_text  # ~ expanded by StatsSpec
        return layer_second_moments(model, tokenizer, ctx.arch, list(layers), sources, spec=self.config.stats,
                                    cache_dir=ctx.cache_dir, progress=progress if callable(progress) else None)


# ---------------------------------------------------------------------------------------------------------------
# The MEMIT family: z at the last edited layer, its residual spread over the layers in order


@dataclass(frozen=True)
class SpreadConfig:
    """Options every MEMIT-family editor shares (defaults: kmeng01/memit gpt2-xl hparams; the world configs set the
    layers)."""

    layers: tuple[int, ...] | None = None  # None = BaseEditor default (one layer below the middle)
    value: ValueConfig = field(default_factory=lambda: ValueConfig(clamp_norm_factor=0.75))
    stats: StatsSpec = field(default_factory=StatsSpec)
    # context templates: "{}" + (count, tokens) samples from the unedited model after each prefix
    context_template_length_params: tuple[tuple[int, int], ...] = ((10, 5),)
    context_template_prefixes: tuple[str, ...] = MEMIT_PREFIXES  # first words of the sampled templates
    context_templates: tuple[str, ...] | None = None  # explicit templates (first must be "{}"); None = generate
    key_average: str = "groups"  # groups (compute_ks, published) | templates (uniform, ROME's k*)
    solver: str = "solve"  # solve (torch.linalg.solve, published) | cholesky | lstsq
    solve_dtype: str = "float64"  # the published MEMIT / EMMET / ENCORE solves are float64
    ridge: float = 0.0  # λ in C + λ·(tr C/d)·I before use; 0 = published (no ridge)

    def __post_init__(self) -> None:
        if self.context_templates is not None:
            check_templates(self.context_templates)
        if self.key_average not in KEY_AVERAGES:
            raise ValueError(f"key_average {self.key_average!r} is not allowed; allowed: {', '.join(KEY_AVERAGES)}")
        if self.solver not in self.SOLVERS:
            raise ValueError(f"solver {self.solver!r} is not allowed; allowed: {', '.join(self.SOLVERS)}")
        if self.solve_dtype not in SOLVE_DTYPES:
            raise ValueError(f"solve_dtype {self.solve_dtype!r} is not allowed; allowed: {', '.join(SOLVE_DTYPES)}")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers {list(self.layers)} repeat a layer")

    SOLVERS: ClassVar[tuple[str, ...]] = SYSTEM_SOLVERS


@dataclass(frozen=True)
class LayerStep:
    """What one layer of one call computed (tests and diagnostics read it)."""

    layer: int
    param: str
    keys: torch.Tensor  # [n, d_in] float32, template-averaged
    resid: torch.Tensor  # [n, d_out] float32: (z − h_L) / (layers left), on the partially edited model
    adj: torch.Tensor  # [d_in, n]: ΔW = residᵀ adjᵀ (Linear convention)
    delta: torch.Tensor  # stored layout, float32
    left: torch.Tensor
    right: torch.Tensor
    diagnostics: Mapping[str, float]


class SpreadEditor(LocateEditor):
    """The MEMIT loop (memit_main.execute_memit). Subclasses implement `layer_adjustment` and may keep state that
    grows with every applied call in `applied` (called by the driver after each applied call, live or replayed,
    with the model already edited, so a resumed run rebuilds exactly the same state)."""

    Config: ClassVar[type] = SpreadConfig
    # Editors that preserve the keys of earlier calls (AlphaEdit's cache_c, ENCORE's SEQ_CACHE) set the dtype of
    # key_cache[layer] = Σ K_p K_pᵀ over applied calls, kept on the CPU as the published code keeps it.
    KEY_CACHE_DTYPE: ClassVar[torch.dtype | None] = None

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._cov: dict[int, torch.Tensor] = {}  # C + ridge per layer, on the parameter's device
        self.key_cache: dict[int, torch.Tensor] = {}  # layer → Σ K_p K_pᵀ [d_in, d_in]
        self.key_count: dict[int, int] = {}  # layer → requests whose keys are in key_cache

    # -- preparation ---------------------------------------------------------------------------------------------

    def groups(self) -> tuple[int, ...]:
        cfg = self.config
        assert self._templates is not None
        return template_groups(self._templates, cfg.context_template_length_params, cfg.context_template_prefixes,
                               generated=cfg.context_templates is None)

    def use_statistics(self, layer: int, moment: SecondMoment, device: torch.device) -> None:
        self._cov[layer] = _ridged(moment.mom2.to(device), self.config.ridge)
        self.on_statistics(layer, self._cov[layer])

    def on_statistics(self, layer: int, mom2: torch.Tensor) -> None:
        """Hook: C (+ ridge) of `layer` is known (on the parameter's device, in the statistics dtype)."""

    def covariance(self, model: nn.Module, tokenizer: Any, layer: int) -> torch.Tensor:
        """C + ridge of `layer` [d_in, d_in] in the statistics dtype, on the parameter's device."""
        self.load_statistics(model, tokenizer, [layer])
        return self._cov[layer]

    def layers(self, model: nn.Module) -> list[int]:
        """The configured layers; the highest (where z is optimised) must have a block above it: δ at the subject's
        last token reaches the predictions at later positions only through the attention of higher blocks."""
        layers = super().layers(model)
        n = num_layers(model)
        if max(layers) >= n - 1:
            raise ValueError(f"{self.name}: z is optimised at the highest edited layer ({max(layers)}), the model's "
                             f"last block: nothing above it carries δ to the target positions; use layers below "
                             f"{n - 1} (the model has layers 0..{n - 1})")
        return layers

    # -- state: the keys of earlier calls ------------------------------------------------------------------------

    def applied(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest],
                added: Mapping[str, torch.Tensor]) -> None:
        """Add the applied call's keys, recomputed on the edited model, to key_cache (the keys of layer l depend
        only on the layers below it, so they are the keys the published code stores mid-call)."""
        if self.KEY_CACHE_DTYPE is None:
            return
        for layer in sorted(self.layers(model)):
            k = self.request_keys(model, tokenizer, layer, requests).T.to(self.KEY_CACHE_DTYPE)  # [d_in, n]
            kk = (k @ k.T).cpu()
            self.key_cache[layer] = self.key_cache[layer] + kk if layer in self.key_cache else kk
            self.key_count[layer] = self.key_count.get(layer, 0) + len(requests)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.KEY_CACHE_DTYPE is not None:
            state["key_cache"] = {str(k): v for k, v in self.key_cache.items()}
            state["key_count"] = {str(k): v for k, v in self.key_count.items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        state = dict(state)
        cache, count = state.pop("key_cache", {}), state.pop("key_count", {})
        super().load_state_dict(state)
        if (cache or count) and self.KEY_CACHE_DTYPE is None:
            raise ValueError(f"{self.name}: unexpected editor state keys ['key_cache', 'key_count']")
        self.key_cache = {int(k): v.to(self.KEY_CACHE_DTYPE) for k, v in cache.items()}
        self.key_count = {int(k): int(v) for k, v in count.items()}

    # -- one call ------------------------------------------------------------------------------------------------

    def layer_adjustment(self, model: nn.Module, tokenizer: Any, index: int, layer: int, keys: torch.Tensor
                         ) -> tuple[torch.Tensor, dict[str, float]]:
        """adj [d_in, n] such that ΔW_l = residᵀ adjᵀ, from the keys K = keys.T [d_in, n]; plus diagnostics."""
        raise NotImplementedError

    def request_keys(self, model: nn.Module, tokenizer: Any, layer: int, requests: Sequence[EditRequest]
                     ) -> torch.Tensor:
        arch = self._ctx(model).arch
        templates = self.templates(model, tokenizer)
        return template_keys(model, tokenizer, arch.mlp_out(layer), requests, templates, self.groups(),
                             self.config.key_average)

    def compute(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest]) -> EditProposal:
        self.check_call(model, requests)
        values, steps, seconds = self.compute_steps(model, tokenizer, requests)
        factors = {s.param: (s.left, s.right) for s in steps}
        deltas = {s.param: s.delta for s in steps}
        return EditProposal(deltas=deltas, stats=self._stats(values, steps, seconds, len(requests)), factors=factors)

    def compute_steps(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest]
                      ) -> tuple[list[ValueResult], list[LayerStep], dict[str, float]]:
        """z for every request on the weights as the call found them, then each layer in ascending order on the
        weights with the lower layers' updates added; the weights are restored on return."""
        arch = self._ctx(model).arch
        layers = sorted(self.layers(model))
        top = arch.layer(layers[-1])
        templates = self.templates(model, tokenizer)
        t0 = time.perf_counter()
        chunk = self.config.value.batch_requests
        values = [v for i in range(0, len(requests), chunk)
                  for v in optimise_values(model, tokenizer, arch, requests[i:i + chunk], top, templates,
                                           self.config.value)]
        zs = torch.stack([v.target for v in values])  # [n, d_model] float32
        t1 = time.perf_counter()
        steps: list[LayerStep] = []
        with TemporaryWeights(model) as tmp:
            for i, layer in enumerate(layers):
                name = arch.mlp_out(layer)
                module = get_module(model, name)
                keys = self.request_keys(model, tokenizer, layer, requests)  # [n, d_in]
                current = subject_outputs(model, tokenizer, top, requests)  # [n, d_model]
                resid = (zs - current) / (len(layers) - i)  # spread over the layers still to edit
                adj, diag = self.layer_adjustment(model, tokenizer, i, layer, keys)
                delta, left, right = low_rank_factors(module, resid.to(adj.dtype), adj)
                if not torch.isfinite(delta).all():
                    raise EditorError(f"{self.name}: the update of {name} is not finite (condition number "
                                      f"{diag.get('condition', float('nan')):.3g}); nothing was applied")
                w_norm = float(linear_weight(module).detach().double().norm())
                d_norm = float(delta.double().norm())
                diag = {**diag, "residual_norm": float(resid.double().norm(dim=1).mean()),
                        "z_error": float((zs - current).double().norm(dim=1).mean()),
                        "update_fro": d_norm, "update_rel": d_norm / max(w_norm, 1e-30),
                        "key_norm": float(keys.double().norm(dim=1).mean())}
                tmp.add(f"{name}.weight", delta)
                steps.append(LayerStep(layer, f"{name}.weight", keys, resid, adj, delta, left, right, diag))
        t2 = time.perf_counter()
        return values, steps, {"z": t1 - t0, "update": t2 - t1}

    def _stats(self, values: list[ValueResult], steps: list[LayerStep], seconds: Mapping[str, float],
               n_requests: int) -> dict[str, float]:
        p = self.name.replace("-", "_")
        out = {
            f"{p}/n_requests": float(n_requests),
            f"{p}/v_loss": max(v.losses[-1] for v in values),
            f"{p}/v_nll": max(v.nll for v in values),
            f"{p}/v_steps": sum(v.n_updates for v in values) / len(values),
            f"{p}/v_mpes_stops": float(sum(v.stopped_by == "mpes" for v in values)),
            f"{p}/delta_norm": max(float(v.delta.norm()) for v in values),
            f"{p}/seconds_z": seconds["z"],
            f"{p}/seconds_update": seconds["update"],
        }
        for s in steps:
            for k, v in s.diagnostics.items():
                out[f"{p}/l{s.layer}/{k}"] = float(v)
        return out
