"""ROME (Meng et al. 2022, arXiv 2202.05262), as implemented in kmeng01/memit `rome/`, irregularity included.

A rank-one update of `mlp_out(l)` per request and layer: u = C⁻¹k*/‖C⁻¹k*‖ from the key k* averaged over 21
context templates, v* from `_locate.optimise_value` at the MLP output, and — unlike the paper's equation — the
numerator and denominator from the *bare-prompt* key k_raw: ΔW = (v* − W k_raw − b) uᵀ / (k_rawᵀ u), so W′k_raw = v*.
r-ROME (`r_rome.py`) and p-ROME (`p_rome.py`) change only which key goes where (`KEY_FOR_U`, `KEY_FOR_UPDATE`).
Several requests in one call are computed one after another on the temporarily updated weights.
Stats keys (floats, for one request; for several, the worst case: smallest |denominator|, largest norms/losses):
rome/denominator, rome/u_norm (‖C⁻¹k*‖), rome/right_norm, rome/residual_norm (‖v* − Wk − b‖), rome/key_norm,
rome/key_cos (cos(k*, k_raw)), rome/update_fro (‖ΔW‖_F), rome/update_rel (‖ΔW‖_F/‖W‖_F), rome/delta_norm (‖δ‖),
rome/v_loss, rome/v_nll, rome/v_kl, rome/v_steps, rome/ridge, rome/condition (of C + ridge), rome/n_requests, rome/seconds_keys, rome/seconds_v,
rome/seconds_update.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from seqedit.apply import materialise
from seqedit.archs import get_module
from seqedit.editors._locate import (
    COV_SOLVERS,
    CovSolver,
    LocateEditor,
    RankOneUpdate,
    ValueConfig,
    ValueResult,
    check_templates,
    contextualise,
    make_solver,
    optimise_value,
    rank_one_update,
    subject_keys,
)
from seqedit.editors.base import register_editor
from seqedit.model_state import TemporaryWeights
from seqedit.stats import SecondMoment, StatsSpec
from seqedit.types import EditProposal, EditRequest

KEY_MODES = ("mean", "raw")  # mean: k* / k̄ over the context templates; raw: k_raw at the bare prompt


@dataclass(frozen=True)
class RomeConfig:
    layers: tuple[int, ...] | None = None  # None = BaseEditor default (the layer below the middle)
    # v* optimisation (`value:`): the reference gpt2-xl / gpt-j values. The decay is weight_decay·‖δ‖/‖v0‖², large
    # when ‖v0‖ is small (environment notes); on the tiny world (‖v0‖ ≈ 2) 1e-3 instead of 0.5 changed r-ROME
    # efficacy little. value.loss_layer = None scores with the model's own logits, as the original always does.
    value: ValueConfig = field(default_factory=ValueConfig)
    # C = E[kkᵀ] (`stats:`): source text, sample size, accumulation dtype (float32 as published)
    stats: StatsSpec = field(default_factory=StatsSpec)
    # context templates: "{}" + n samples of each length (ROME: 10 of 5 and 10 of 10 tokens → 21 templates)
    context_template_length_params: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    context_templates: tuple[str, ...] | None = None  # explicit templates (first must be "{}"); None = generate
    mom2_adjustment: bool = True  # False: u = k/‖k‖ (EasyEdit's ROME default; a different algorithm)
    # How u = C⁻¹k* is computed: "inverse" is the published float32 torch.inverse (a singular C then gives the huge
    # updates the original gives, an exactly singular one an error); "cholesky" (float64, refuses a singular C) and
    # "pinv" (float64 pseudo-inverse) are deviations, recorded in the run's config like `ridge`.
    solver: str = "inverse"
    ridge: float = 0.0  # λ in C + λ·(tr C/d)·I; 0 = published (no ridge, never added silently)

    RENAMED: ClassVar[dict[str, str]] = {
        "v_num_grad_steps": "value.num_grad_steps", "v_lr": "value.lr", "v_loss_layer": "value.loss_layer",
        "v_weight_decay": "value.weight_decay", "clamp_norm_factor": "value.clamp_norm_factor",
        "kl_factor": "value.kl_factor", "v_early_stop_loss": "value.early_stop_loss",
        "mom2_n_samples": "stats.n_samples", "mom2_sample_unit": "stats.unit", "mom2_dtype": "stats.dtype",
        "mom2_batch_tokens": "stats.batch_tokens", "mom2_max_length": "stats.max_length", "mom2_ridge": "ridge",
    }

    def __post_init__(self) -> None:
        if self.context_templates is not None:
            check_templates(self.context_templates)
        if self.solver not in COV_SOLVERS:
            raise ValueError(f"solver {self.solver!r} is not allowed; allowed: {', '.join(COV_SOLVERS)}")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")


@dataclass(frozen=True)
class RomeEdit:
    """Everything computed for one request at one layer (tests and diagnostics read it)."""

    layer: int
    param: str
    keys: torch.Tensor  # [n_templates, d_in] keys at the subject-last token, row 0 = bare prompt
    key_for_u: torch.Tensor  # [d_in]
    key_for_update: torch.Tensor  # [d_in]
    value: ValueResult
    update: RankOneUpdate
    seconds: Mapping[str, float]


@register_editor("rome")
class RomeEditor(LocateEditor):
    Config: ClassVar[type] = RomeConfig
    KEY_FOR_U: ClassVar[str] = "mean"  # k* (template mean) gives the direction u
    KEY_FOR_UPDATE: ClassVar[str] = "raw"  # k_raw (bare prompt) in numerator and denominator: the irregularity

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._solvers: dict[int, CovSolver] = {}

    # -- preparation ---------------------------------------------------------------------------------------------

    @property
    def needs_statistics(self) -> bool:
        return self.config.mom2_adjustment

    def use_statistics(self, layer: int, moment: SecondMoment, device: torch.device) -> None:
        self._solvers[layer] = make_solver(moment.mom2, method=self.config.solver, ridge=self.config.ridge,
                                           device=device)

    def solver(self, model: nn.Module, tokenizer: Any, layer: int) -> CovSolver:
        self.load_statistics(model, tokenizer, [layer])
        return self._solvers[layer]

    # -- one edit ------------------------------------------------------------------------------------------------

    def _pick(self, mode: str, keys: torch.Tensor) -> torch.Tensor:
        if mode == "mean":
            return keys.float().mean(0)
        if mode == "raw":
            return keys[0].float()
        raise ValueError(f"key mode {mode!r} is not allowed; allowed: {', '.join(KEY_MODES)}")

    def edit_one(self, model: nn.Module, tokenizer: Any, request: EditRequest, layer: int) -> RomeEdit:
        """Compute (not apply) the rank-one update of `mlp_out(layer)` for one request on the current weights."""
        arch = self._ctx(model).arch
        templates = self.templates(model, tokenizer)
        module_name = arch.mlp_out(layer)
        module = get_module(model, module_name)

        t0 = time.perf_counter()
        needs_templates = "mean" in (self.KEY_FOR_U, self.KEY_FOR_UPDATE)
        key_templates = contextualise(templates if needs_templates else templates[:1], request.prompt)
        keys = subject_keys(model, tokenizer, module_name, key_templates, [request.subject] * len(key_templates))
        k_u = self._pick(self.KEY_FOR_U, keys)
        k_upd = self._pick(self.KEY_FOR_UPDATE, keys)
        t1 = time.perf_counter()

        value = optimise_value(model, tokenizer, arch, request, arch.mlp(layer), templates, self.config.value)
        t2 = time.perf_counter()

        u_dir = self.solver(model, tokenizer, layer).solve(k_u) if self.config.mom2_adjustment else k_u
        update = rank_one_update(module, u_dir, k_upd, value.target)
        t3 = time.perf_counter()
        seconds = {"keys": t1 - t0, "v": t2 - t1, "update": t3 - t2}
        return RomeEdit(layer, f"{module_name}.weight", keys, k_u, k_upd, value, update, seconds)

    # -- the contract --------------------------------------------------------------------------------------------

    def compute(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest]) -> EditProposal:
        self.check_call(model, requests)
        edits = self.compute_edits(model, tokenizer, requests)
        lefts: dict[str, list[torch.Tensor]] = {}
        rights: dict[str, list[torch.Tensor]] = {}
        for e in edits:
            lefts.setdefault(e.param, []).append(e.update.left)
            rights.setdefault(e.param, []).append(e.update.right)
        factors = {p: (torch.cat(lefts[p], 1), torch.cat(rights[p], 1)) for p in lefts}
        # Several requests: the delta is the sum of their rank-one terms, built from the factors (the ledger's form).
        deltas = {p: materialise(*f) for p, f in factors.items()}
        return EditProposal(deltas=deltas, stats=self._stats(edits, len(requests)), factors=factors)

    def compute_edits(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest]) -> list[RomeEdit]:
        """All per-(request, layer) edits, each computed on the weights after the previous ones; weights restored."""
        edits: list[RomeEdit] = []
        layers = sorted(self.layers(model))
        self.templates(model, tokenizer)  # from the weights as the call found them
        with TemporaryWeights(model) as tmp:
            for request in requests:
                for layer in layers:
                    edit = self.edit_one(model, tokenizer, request, layer)
                    tmp.add(edit.param, edit.update.delta)
                    edits.append(edit)
        return edits

    def _stats(self, edits: list[RomeEdit], n_requests: int) -> dict[str, float]:
        def worst(values: list[float]) -> float:
            return max(values)

        dens = [e.update.stats["denominator"] for e in edits]
        out = {
            "rome/denominator": min(dens, key=abs),
            "rome/u_norm": worst([e.update.stats["u_norm"] for e in edits]),
            "rome/right_norm": worst([e.update.stats["right_norm"] for e in edits]),
            "rome/residual_norm": worst([e.update.stats["residual_norm"] for e in edits]),
            "rome/key_norm": worst([e.update.stats["key_norm"] for e in edits]),
            "rome/key_cos": min(float(torch.nn.functional.cosine_similarity(e.keys.float().mean(0), e.keys[0].float(),
                                                                            dim=0)) for e in edits),
            "rome/update_fro": worst([e.update.stats["update_fro"] for e in edits]),
            "rome/update_rel": worst([e.update.stats["update_fro"] / max(e.update.stats["weight_fro"], 1e-30)
                                      for e in edits]),
            "rome/delta_norm": worst([float(e.value.delta.norm()) for e in edits]),
            "rome/v_loss": worst([e.value.losses[-1] for e in edits]),
            "rome/v_nll": worst([e.value.nll for e in edits]),
            "rome/v_kl": worst([e.value.kl for e in edits]),
            "rome/v_steps": float(sum(e.value.n_updates for e in edits)) / len(edits),
            "rome/ridge": max((s.ridge for s in self._solvers.values()), default=0.0),
            "rome/condition": max((s.condition for s in self._solvers.values()), default=float("nan")),
            "rome/n_requests": float(n_requests),
            "rome/seconds_keys": sum(e.seconds["keys"] for e in edits),
            "rome/seconds_v": sum(e.seconds["v"] for e in edits),
            "rome/seconds_update": sum(e.seconds["update"] for e in edits),
        }
        return {k: float(v) for k, v in out.items()}
