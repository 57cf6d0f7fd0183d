"""`random`: rank-one deltas of controlled norm, independent of the request content.

A control for forgetting curves and the way to inject synthetic *disabling edits*: a request whose seeded hash falls
below `spike_probability` gets `spike_factor` times the usual norm. The random direction depends only on (seed,
case_id, parameter), so a resumed run reproduces it.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from seqedit.apply import materialise
from seqedit.editors.base import BaseEditor, register_editor
from seqedit.types import EditProposal, EditRequest


def _seed_for(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@register_editor("random")
class RandomEditor(BaseEditor):
    @dataclass(frozen=True)
    class Config:
        layers: tuple[int, ...] | None = None  # None = the layer below the middle
        relative_norm: float = 0.01  # ‖ΔW‖_F / ‖W0‖_F per request (used when `norm` is None)
        norm: float | None = None  # absolute ‖ΔW‖_F per request
        spike_probability: float = 0.0  # fraction of requests turned into disabling edits
        spike_factor: float = 100.0  # a disabling edit's norm, in multiples of the usual one

        def __post_init__(self) -> None:
            if not 0.0 <= self.spike_probability <= 1.0:
                raise ValueError(f"spike_probability={self.spike_probability} must be in [0, 1]")
            if self.norm is not None and self.norm < 0:
                raise ValueError(f"norm={self.norm} must be >= 0")
            if self.relative_norm < 0:
                raise ValueError(f"relative_norm={self.relative_norm} must be >= 0")

    def prepare(self, model: nn.Module, tokenizer: Any, ctx) -> None:
        super().prepare(model, tokenizer, ctx)
        # Norms are relative to the *unedited* weights, so the scale does not drift with the edits.
        self._w0_norm = {n: float(model.get_parameter(n).float().norm()) for n in self.params(model)}

    def compute(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest]) -> EditProposal:
        names = self.params(model)
        deltas: dict[str, torch.Tensor] = {}
        lefts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        rights: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        spikes = 0
        for req in requests:
            spike = (_seed_for(self.seed, req.case_id, "spike") % 10**9) / 10**9 < self.config.spike_probability
            spikes += spike
            for name in names:
                param = model.get_parameter(name)
                w0 = getattr(self, "_w0_norm", {}).get(name) or float(param.float().norm())
                scale = self.config.norm if self.config.norm is not None else self.config.relative_norm * w0
                if spike:
                    scale *= self.config.spike_factor
                g = torch.Generator().manual_seed(_seed_for(self.seed, req.case_id, name))
                u = torch.randn(param.shape[0], generator=g, dtype=torch.float64)
                v = torch.randn(param.shape[1], generator=g, dtype=torch.float64)
                u, v = u / u.norm(), v / v.norm()  # ‖u vᵀ‖_F = 1
                lefts[name].append((scale * u).float())
                rights[name].append(v.float())
        factors = {n: (torch.stack(lefts[n], 1), torch.stack(rights[n], 1)) for n in names}  # [d0, n], [d1, n]
        for name in names:
            deltas[name] = materialise(*factors[name]).to(model.get_parameter(name).device)
        stats = {"random/spikes": float(spikes)}
        return EditProposal(deltas=deltas, stats=stats, factors=factors)
