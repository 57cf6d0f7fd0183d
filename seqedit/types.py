"""Frozen data records shared by the driver, editors, probes and loaders.

Everything here is plain data: no torch modules, no I/O. Tensors only appear in `EditProposal`/`AppliedEdit`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class EditRequest:
    """One knowledge edit in CounterFact terms.

    `prompt` holds "{}" where the subject goes. `target_new`/`target_true` are stored *without* a leading space;
    scoring code prepends the space (as every ROME-family editor does).
    Neighbourhood prompts expect `target_true` unless `neighborhood_targets` gives one answer per prompt (zsRE/EasyEdit
    locality data, where the neighbour is an unrelated question with its own answer).
    """

    case_id: str
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    relation_id: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    neighborhood_targets: tuple[str, ...] = ()
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.prompt.count("{}") != 1:
            raise ValueError(f"EditRequest {self.case_id!r}: prompt must contain '{{}}' exactly once, got {self.prompt!r}")
        if not self.subject:
            raise ValueError(f"EditRequest {self.case_id!r}: empty subject")
        if not self.target_new.strip():
            raise ValueError(f"EditRequest {self.case_id!r}: empty target_new")
        if self.neighborhood_targets and len(self.neighborhood_targets) != len(self.neighborhood_prompts):
            raise ValueError(
                f"EditRequest {self.case_id!r}: {len(self.neighborhood_targets)} neighborhood_targets for "
                f"{len(self.neighborhood_prompts)} neighborhood_prompts"
            )

    @property
    def text(self) -> str:
        """The edit prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    def neighbours(self) -> list[tuple[str, str]]:
        """(prompt, expected answer) pairs for locality checks; empty if no answer is known."""
        if self.neighborhood_targets:
            return list(zip(self.neighborhood_prompts, self.neighborhood_targets))
        if self.target_true is None:
            return []
        return [(p, self.target_true) for p in self.neighborhood_prompts]


@dataclass(frozen=True)
class EditProposal:
    """What an editor computes: per-parameter deltas in the parameter's own layout (float32 or wider),
    optional low-rank factors (delta == seqedit.apply.materialise(left, right) bit for bit, in the parameter layout:
    then the ledger stores the factors instead of the dense delta) and scalar diagnostics."""

    deltas: Mapping[str, torch.Tensor]
    stats: Mapping[str, float] = field(default_factory=dict)
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class AppliedEdit:
    """What the driver applied: `deltas[name]` is exactly `after - before` in the parameter's dtype (so bf16 rounding
    is captured), `before` holds the pre-edit values for bit-identical revert, `added[name]` the exact tensor that
    was added (in `seqedit.apply.added_dtype`), which the ledger stores or reproduces from the factors."""

    deltas: Mapping[str, torch.Tensor]
    before: Mapping[str, torch.Tensor]
    stats: Mapping[str, float]
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    added: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class EditOutcome:
    """Scores of one request on the live model (CounterFact ES/PS/NS style)."""

    case_id: str
    efficacy: float  # 1.0 if P(new) > P(true) on the edit prompt
    prob_new: float  # mean per-token probability exp(-NLL) of target_new
    prob_true: float | None
    paraphrase: float | None = None  # fraction of paraphrases where new beats true
    neighborhood: float | None = None  # fraction of neighbours where the expected answer beats target_new

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}
