"""Driver-side application of editor proposals: the only code that writes edited weights.

`apply_proposal` adds each delta in place (under no_grad, on the parameter's device and dtype) and returns the exact
applied difference, the exact tensor that was added (what the ledger stores, so a replay is bit-identical) and the
pre-edit values, so telemetry sees what really changed (bf16 rounding included) and `revert` restores the weights
bit-identically. `materialise` is the one way low-rank factors become a dense delta: editors that return factors build
their delta with it, so the ledger can store the factors alone and reproduce the delta bit for bit on any device.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from seqedit.types import AppliedEdit, EditProposal


class NonFiniteDeltaError(FloatingPointError):
    """A proposal contained NaN/Inf; nothing was applied."""


def materialise(left: torch.Tensor, right: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """left @ right.T, deterministic everywhere: float64 elementwise products summed rank by rank in a fixed order,
    rounded once to `dtype`. (A BLAS matmul may sum in a thread- or device-dependent order; elementwise IEEE ops do
    not.) For rank one with float32 factors this equals the float32 outer product exactly. left: [rows, r] or [rows],
    right: [cols, r] or [cols] -> [rows, cols]."""
    if (dtype == torch.float32 and left.dtype == right.dtype == torch.float32
            and (left.ndim == 1 or left.shape[1] == 1) and (right.ndim == 1 or right.shape[1] == 1)):
        # rank one, float32: a float32 product is the exact (float64) product rounded once, so this is the same
        # bits as the float64 route at a quarter of the memory traffic
        return left.reshape(-1, 1) * right.reshape(1, -1).to(left.device)
    lf, rf = left.double(), right.double().to(left.device)
    if lf.ndim == 1:
        lf, rf = lf[:, None], rf[:, None]
    if lf.shape[1] != rf.shape[1]:
        raise ValueError(f"factor ranks differ: left {tuple(left.shape)}, right {tuple(right.shape)}")
    acc = lf[:, 0:1] * rf[None, :, 0]
    for i in range(1, lf.shape[1]):
        acc = acc + lf[:, i : i + 1] * rf[None, :, i]
    return acc.to(dtype)


def added_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype in which a delta is added to a parameter: its own for float32/64, float32 for low precision."""
    return param_dtype if param_dtype in (torch.float32, torch.float64) else torch.float32


def check_proposal(model: nn.Module, proposal: EditProposal, allowed: list[str] | None = None,
                   allow_nonfinite: bool = False) -> None:
    for name, delta in proposal.deltas.items():
        try:
            param = model.get_parameter(name)
        except AttributeError as e:
            raise ValueError(f"editor proposed a delta for unknown parameter {name!r}") from e
        if allowed is not None and name not in allowed:
            raise ValueError(f"editor proposed a delta for undeclared parameter {name!r}; declared: {allowed}")
        if tuple(delta.shape) != tuple(param.shape):
            raise ValueError(f"delta for {name!r} has shape {tuple(delta.shape)}, parameter has {tuple(param.shape)}")
        if not allow_nonfinite and not torch.isfinite(delta).all():
            raise NonFiniteDeltaError(f"delta for {name!r} contains non-finite values; the model was left unchanged")


@torch.no_grad()
def add_exact(model: nn.Module, added: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add each tensor (already in `added_dtype` of its parameter) in place; return the pre-edit values. The same
    function serves the live edit and the ledger replay, which is what makes the replay bit-identical."""
    before = {}
    for name, a in added.items():
        param = model.get_parameter(name)
        before[name] = param.detach().clone()
        a = a.to(param.device)
        if param.dtype in (torch.float32, torch.float64):
            param.add_(a)
        else:  # low precision: add in float32, round once
            param.copy_((param.float() + a).to(param.dtype))
    return before


@torch.no_grad()
def apply_proposal(model: nn.Module, proposal: EditProposal, allowed: list[str] | None = None,
                   allow_nonfinite: bool = False) -> AppliedEdit:
    check_proposal(model, proposal, allowed, allow_nonfinite)  # validate everything before touching any weight
    added = {}
    for name, delta in proposal.deltas.items():
        param = model.get_parameter(name)
        added[name] = delta.to(device=param.device, dtype=added_dtype(param.dtype))
    return apply_added(model, added, proposal.stats, proposal.factors)


@torch.no_grad()
def apply_added(model: nn.Module, added: Mapping[str, torch.Tensor], stats: Mapping[str, float] | None = None,
                factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> AppliedEdit:
    """Add tensors already in `added_dtype` (a live proposal, or a ledger record on replay) and report the change."""
    before = add_exact(model, added)
    deltas = {}
    for name in added:
        after = model.get_parameter(name).detach()
        deltas[name] = after - before[name] if after.dtype in (torch.float32, torch.float64) else (
            after.float() - before[name].float())
    return AppliedEdit(deltas=deltas, before=before, stats=dict(stats or {}), factors=dict(factors or {}),
                       added=dict(added))


@torch.no_grad()
def revert(model: nn.Module, applied: AppliedEdit) -> None:
    for name, value in applied.before.items():
        model.get_parameter(name).copy_(value)
