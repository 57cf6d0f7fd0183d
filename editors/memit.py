"""MEMIT (Meng et al. 2023, arXiv 2210.07229), as implemented in kmeng01/memit `memit/memit_main.py`.

z_i = h_L + δ_i at the block output of the last edited layer L (`compute_z`, clamp 0.75, six context templates);
then for each edited layer l in ascending order, on the model with the lower layers already updated:
K_l = template-averaged keys (`compute_ks`: bare prompt 1/2, each prefix 1/10), R = (Z − H_L) / (layers left),
Δ_l = R K_lᵀ (λ C_l + K_l K_lᵀ)⁻¹ with λ = `mom2_update_weight`, solved in float64 with `torch.linalg.solve`.
Stats keys (`memit/...`): n_requests, v_loss, v_nll, v_steps, v_mpes_stops, delta_norm, seconds_z, seconds_update, and
per layer `memit/l<layer>/`: residual_norm, z_error, update_fro, update_rel, key_norm, condition, lambda.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from seqedit.editors._locate import SpreadConfig, SpreadEditor, solve_system
from seqedit.editors.base import register_editor


@dataclass(frozen=True)
class MemitConfig(SpreadConfig):
    mom2_update_weight: float = 20000.0  # λ (gpt2-xl; gpt-j 15000)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mom2_update_weight < 0:
            raise ValueError(f"mom2_update_weight must be >= 0, got {self.mom2_update_weight}")


@register_editor("memit")
class MemitEditor(SpreadEditor):
    Config: ClassVar[type] = MemitConfig

    def system(self, model: nn.Module, tokenizer: Any, layer: int, k: torch.Tensor) -> torch.Tensor:
        """λC + K Kᵀ [d_in, d_in] in the solve dtype (k: [d_in, n] in that dtype)."""
        c = self.covariance(model, tokenizer, layer).to(k.dtype)
        return self.config.mom2_update_weight * c + k @ k.T

    def layer_adjustment(self, model: nn.Module, tokenizer: Any, index: int, layer: int, keys: torch.Tensor
                         ) -> tuple[torch.Tensor, dict[str, float]]:
        k = keys.T.to(torch.float64 if self.config.solve_dtype == "float64" else torch.float32)  # [d_in, n]
        adj, diag = solve_system(self.system(model, tokenizer, layer, k), k, self.config.solver,
                                 self.config.solve_dtype)
        return adj, {**diag, "lambda": self.config.mom2_update_weight}
