"""`noop`: a control editor that proposes zero deltas. Measures the driver's own overhead and probe noise."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from seqedit.editors.base import BaseEditor, register_editor
from seqedit.types import EditProposal, EditRequest


@register_editor("noop")
class NoopEditor(BaseEditor):
    @dataclass(frozen=True)
    class Config:
        layers: tuple[int, ...] | None = None  # parameters it declares (and leaves unchanged); None = below the middle

    def compute(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest]) -> EditProposal:
        deltas = {n: torch.zeros_like(model.get_parameter(n), dtype=torch.float32) for n in self.params(model)}
        return EditProposal(deltas=deltas, stats={"noop/requests": float(len(requests))})
