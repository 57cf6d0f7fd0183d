"""Uniform weight telemetry for every editor, computed by the driver from the applied deltas.

Per touched parameter and edit: ‖ΔW‖_F, ‖W_t − W₀‖_F (raw and relative to ‖W₀‖_F), ‖W_t‖_F, σ_max(ΔW) (exact
for rank-one deltas via ‖u‖‖v‖, power iteration otherwise) and a non-finite flag. Keys are API:
`weights/<param>/<stat>` with the parameter's fully qualified name.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

STAT_NAMES = ("delta_fro", "delta_sigma_max", "drift_fro", "drift_rel", "norm_fro", "nonfinite")


GRAM_MAX_DIM = 1024  # up to here the exact Gram-matrix route is cheaper than power iteration


def sigma_max(m: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor] | None = None, iters: int = 30) -> float:
    """Largest singular value: exact from rank-one factors; exact via the eigenvalues of the small Gram matrix when
    one side is at most GRAM_MAX_DIM; else a seeded power iteration on mᵀm (huge matrices of real models). NaN for a
    matrix with non-finite entries (a guard.policy=allow run keeps such updates)."""
    if factors is not None and factors[0].ndim >= 1 and (factors[0].ndim == 1 or factors[0].shape[1] == 1):
        left, right = (f.reshape(-1).double() for f in factors)
        return float(left.norm() * right.norm())
    if not torch.isfinite(m).all():
        return float("nan")
    if min(m.shape) <= GRAM_MAX_DIM:
        md = m.double()
        gram = md.T @ md if m.shape[1] <= m.shape[0] else md @ md.T  # [k, k], k = min(shape)
        return float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt())
    m = m.double()
    if m.abs().max() == 0:
        return 0.0
    g = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(m.shape[1], generator=g, dtype=torch.float64).to(m.device)
    v /= v.norm()
    sigma = 0.0
    for _ in range(iters):
        u = m @ v
        sigma_u = u.norm()
        if sigma_u == 0:
            return 0.0
        v = m.T @ (u / sigma_u)
        sigma = float(v.norm())
        v /= v.norm()
    return sigma


class WeightTracker:
    """Holds W₀ for each touched parameter (copied on first touch, so untouched weights cost no memory)."""

    def __init__(self) -> None:
        self.w0: dict[str, torch.Tensor] = {}
        self.w0_norm: dict[str, float] = {}

    def remember(self, model: nn.Module, names) -> None:
        for n in names:
            if n not in self.w0:
                p = model.get_parameter(n).detach()
                self.w0[n] = p.clone()
                self.w0_norm[n] = float(p.double().norm())

    @torch.no_grad()
    def stats(
        self,
        model: nn.Module,
        deltas: Mapping[str, torch.Tensor],
        factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, delta in deltas.items():
            w = model.get_parameter(name).detach()
            drift = float((w.float() - self.w0[name].float()).norm())
            prefix = f"weights/{name}/"
            out[prefix + "delta_fro"] = float(delta.float().norm())
            out[prefix + "delta_sigma_max"] = sigma_max(delta, (factors or {}).get(name))
            out[prefix + "drift_fro"] = drift
            out[prefix + "drift_rel"] = drift / self.w0_norm[name] if self.w0_norm[name] else float("inf")
            norm = float(torch.linalg.vector_norm(w, dtype=torch.float64))
            out[prefix + "norm_fro"] = norm
            # a finite norm means every entry is finite: count only when it is not (one pass saved per edit)
            out[prefix + "nonfinite"] = 0.0 if math.isfinite(norm) else float((~torch.isfinite(w)).sum())
        return out
