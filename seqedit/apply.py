"""Driver-side application of editor proposals: the only code that writes edited weights.

`apply_proposal` adds each delta in place (under no_grad, on the parameter's device and dtype) and returns the exact
applied difference plus the pre-edit values, so telemetry sees what really changed (bf16 rounding included) and
`revert` restores the weights bit-identically.
"""
from __future__ import annotations

import torch
from torch import nn

from seqedit.types import AppliedEdit, EditProposal


class NonFiniteDeltaError(FloatingPointError):
    """A proposal contained NaN/Inf; nothing was applied."""


def check_proposal(model: nn.Module, proposal: EditProposal, allowed: list[str] | None = None) -> None:
    for name, delta in proposal.deltas.items():
        try:
            param = model.get_parameter(name)
        except AttributeError as e:
            raise ValueError(f"editor proposed a delta for unknown parameter {name!r}") from e
        if allowed is not None and name not in allowed:
            raise ValueError(f"editor proposed a delta for undeclared parameter {name!r}; declared: {allowed}")
        if tuple(delta.shape) != tuple(param.shape):
            raise ValueError(f"delta for {name!r} has shape {tuple(delta.shape)}, parameter has {tuple(param.shape)}")
        if not torch.isfinite(delta).all():
            raise NonFiniteDeltaError(f"delta for {name!r} contains non-finite values; the model was left unchanged")


@torch.no_grad()
def apply_proposal(model: nn.Module, proposal: EditProposal, allowed: list[str] | None = None) -> AppliedEdit:
    check_proposal(model, proposal, allowed)  # validate everything before touching any weight
    deltas, before = {}, {}
    for name, delta in proposal.deltas.items():
        param = model.get_parameter(name)
        before[name] = param.detach().clone()
        if param.dtype in (torch.float32, torch.float64):
            param.add_(delta.to(device=param.device, dtype=param.dtype))
            deltas[name] = param.detach() - before[name]
        else:  # low precision: add in float32, round once; report the rounded change in float32
            param.copy_((param.float() + delta.to(device=param.device, dtype=torch.float32)).to(param.dtype))
            deltas[name] = param.detach().float() - before[name].float()
    return AppliedEdit(deltas=deltas, before=before, stats=dict(proposal.stats), factors=dict(proposal.factors))


@torch.no_grad()
def revert(model: nn.Module, applied: AppliedEdit) -> None:
    for name, value in applied.before.items():
        model.get_parameter(name).copy_(value)
