"""AlphaEdit (Fang et al. 2025, arXiv 2410.02355), as implemented in jianghoucheng/AlphaEdit
(`AlphaEdit/AlphaEdit_main.py`, `experiments/evaluate.get_project`).

Before any edit, per layer: C = U S Uᵀ (SVD of the float32 second moment), U₀ = the columns with singular value below
`nullspace_threshold` (absolute, 2e-2), P = U₀ U₀ᵀ. z, keys and the layer spread are MEMIT's; each layer solves, in
float32 as published,

    (P (K Kᵀ + C_p) + α I) X = P K Rᵀ,   ΔW = Xᵀ,   α = `L2`,

so ΔW k0 = 0 for every preserved key with P k0 = 0. There is no λC term: pretrained knowledge is protected only
through P. C_p = Σ K_p K_pᵀ over earlier calls is the editor state (float32, one matrix per layer), grown after every
applied call with the keys recomputed on the edited model, as the original does. P is recomputed from the (cached)
statistics at every start; it is not state.
Stats keys as `memit`, under `alphaedit/`, plus per layer: null_dim (columns of U₀), prev_keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from seqedit.editors._locate import SpreadConfig, SpreadEditor, solve_system
from seqedit.editors.base import register_editor

ALPHAEDIT_SOLVERS = ("solve", "lstsq")  # the system matrix P(KKᵀ + C_p) + αI is not symmetric


@dataclass(frozen=True)
class AlphaEditConfig(SpreadConfig):
    # P projects onto the singular vectors of C whose singular value is below this (absolute, as published)
    nullspace_threshold: float = 2e-2
    L2: float = 10.0  # α (EasyEdit llama3-8b.yaml: 1)
    solver: str = "solve"  # solve | lstsq (the system P(KKᵀ + C_p) + αI is not symmetric)
    solve_dtype: str = "float32"  # the published solve is float32
    SOLVERS: ClassVar[tuple[str, ...]] = ALPHAEDIT_SOLVERS

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nullspace_threshold <= 0:
            raise ValueError(f"nullspace_threshold must be > 0, got {self.nullspace_threshold}")
        if self.L2 < 0:
            raise ValueError(f"L2 must be >= 0, got {self.L2}")


def null_space_projector(mom2: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U₀U₀ᵀ for the singular vectors of C with singular value < threshold ([d, d], C's dtype; get_project)."""
    u, s, _ = torch.linalg.svd(mom2.float().cpu(), full_matrices=False)
    u0 = u[:, s < threshold]
    return (u0 @ u0.T).to(mom2.device)


@register_editor("alphaedit")
class AlphaEditEditor(SpreadEditor):
    Config: ClassVar[type] = AlphaEditConfig

    KEY_CACHE_DTYPE: ClassVar[torch.dtype | None] = torch.float32  # C_p = Σ K_p K_pᵀ, float32 as published

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.projectors: dict[int, torch.Tensor] = {}  # layer → P [d_in, d_in] float32
        self.null_dim: dict[int, int] = {}

    def on_statistics(self, layer: int, mom2: torch.Tensor) -> None:
        p = null_space_projector(mom2, self.config.nullspace_threshold)
        self.projectors[layer] = p
        self.null_dim[layer] = int(round(float(torch.trace(p.double()))))

    def projector(self, model: nn.Module, tokenizer: Any, layer: int) -> torch.Tensor:
        self.load_statistics(model, tokenizer, [layer])
        return self.projectors[layer]

    def layer_adjustment(self, model: nn.Module, tokenizer: Any, index: int, layer: int, keys: torch.Tensor
                         ) -> tuple[torch.Tensor, dict[str, float]]:
        dtype = torch.float64 if self.config.solve_dtype == "float64" else torch.float32
        p = self.projector(model, tokenizer, layer).to(dtype)
        k = keys.T.to(device=p.device, dtype=dtype)  # [d_in, n]
        kk = k @ k.T
        if layer in self.key_cache:
            kk = kk + self.key_cache[layer].to(device=p.device, dtype=dtype)
        a = p @ kk + self.config.L2 * torch.eye(p.shape[0], dtype=dtype, device=p.device)
        adj, diag = solve_system(a, p @ k, self.config.solver, self.config.solve_dtype, symmetric=False)
        return adj, {**diag, "null_dim": float(self.null_dim[layer]),
                     "prev_keys": float(self.key_count.get(layer, 0))}
