"""EMMET (Gupta et al. 2024, arXiv 2403.14236), as implemented in scalable-model-editing/unified-model-editing
`emmet/emmet_main.py`: MEMIT's z, keys and layer spread, with the equality-constrained closed form per layer

    C̃ = λ C + μ I,   D = Kᵀ C̃⁻¹ K (+ emmet_lambda·I when the batch has more than one request),
    Δ = R D⁻¹ Kᵀ C̃⁻¹,

i.e. min ‖(Ŵ − W) K0‖ subject to Ŵ K = V exactly (MEMIT is its least-squares relaxation). As published, C̃⁻¹ and
D⁻¹ are `torch.inverse` in float64, and D⁻¹ falls back to the pseudo-inverse when the inverse fails (recorded as
`emmet/l<layer>/pseudo_inverse`). With one request and emmet_lambda = 0 this is r-ROME's update (consistent keys).
Stats keys as `memit`, under `emmet/`, plus per layer: d_condition, pseudo_inverse, c_inv_norm, d_inv_norm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from seqedit.editors._locate import COV_SOLVERS, CovSolver, SpreadConfig, SpreadEditor, condition_number, make_solver
from seqedit.editors.base import register_editor


@dataclass(frozen=True)
class EmmetConfig(SpreadConfig):
    mom2_update_weight: float = 1000.0  # λ (unified-model-editing gpt2-xl; EasyEdit 10000, gpt-j 1)
    emmet_lambda: float = 0.1  # added to D when n > 1 "to counter ill-conditioned D"
    update_norm_lambda: float = 0.0  # μ
    solver: str = "inverse"  # for C̃⁻¹: inverse (torch.inverse float64, published) | cholesky | pinv
    SOLVERS: ClassVar[tuple[str, ...]] = COV_SOLVERS

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("mom2_update_weight", "emmet_lambda", "update_norm_lambda"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.mom2_update_weight == 0 and self.update_norm_lambda == 0:
            raise ValueError("mom2_update_weight and update_norm_lambda are both 0: C̃ = 0 cannot be inverted")


@register_editor("emmet")
class EmmetEditor(SpreadEditor):
    Config: ClassVar[type] = EmmetConfig

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._c_inv: dict[int, tuple[CovSolver, float]] = {}  # layer → (C̃⁻¹ as a solver, ‖C̃⁻¹‖_F)

    def c_inverse(self, model: nn.Module, tokenizer: Any, layer: int) -> tuple[CovSolver, float]:
        """C̃⁻¹ (fixed for the run: C is never refreshed), prepared once per layer: float64 `torch.inverse` as
        published, or the configured cholesky / pinv; an exactly singular C̃ is an error naming the fixes."""
        if layer not in self._c_inv:
            cfg = self.config
            c = cfg.mom2_update_weight * self.covariance(model, tokenizer, layer).double()
            if cfg.update_norm_lambda:
                c = c + cfg.update_norm_lambda * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
            solver = make_solver(c, method=cfg.solver, inverse_dtype=torch.float64)
            inv = torch.cholesky_inverse(solver.matrix) if solver.method == "cholesky" else solver.matrix
            self._c_inv[layer] = (solver, float(inv.norm()))
        return self._c_inv[layer]

    def layer_adjustment(self, model: nn.Module, tokenizer: Any, index: int, layer: int, keys: torch.Tensor
                         ) -> tuple[torch.Tensor, dict[str, float]]:
        c_inv, c_inv_norm = self.c_inverse(model, tokenizer, layer)
        k = keys.T.to(device=c_inv.matrix.device, dtype=torch.float64)  # [d_in, n]
        ck = c_inv.solve(k)  # C̃⁻¹K [d_in, n]
        d = k.T @ ck  # [n, n]
        if d.shape[0] > 1:
            d = d + self.config.emmet_lambda * torch.eye(d.shape[0], dtype=d.dtype, device=d.device)
        pseudo = False
        d_inv, info = torch.linalg.inv_ex(d)
        if int(info) != 0 or not torch.isfinite(d_inv).all():  # the published fallback
            pseudo, d_inv = True, torch.linalg.pinv(d)
        adj = ck @ d_inv.T  # (D⁻¹ Kᵀ C̃⁻¹)ᵀ, [d_in, n]
        diag = {"condition": c_inv.condition, "d_condition": condition_number(d), "pseudo_inverse": float(pseudo),
                "c_inv_norm": c_inv_norm, "d_inv_norm": float(d_inv.norm()),
                "lambda": self.config.mom2_update_weight}
        return adj, diag
