"""ENCORE (Gupta et al. 2025, arXiv 2502.01636), as implemented in scalable-model-editing/knowledge-editing-
regularization `encore/encore_main.py`: MEMIT plus

- most-probable early stopping in the z optimisation (`value.prob_cutoff`, -4 for gpt2-xl: stop after four steps in
  which the new target is the argmax at every target position of the rewriting prompts but the first);
- a Frobenius-norm penalty on each update: μ I added to λC (`update_norm_lambda`, 10 for gpt2-xl);
- the keys of earlier calls preserved (`add_prev_edits`): Δ = R Kᵀ (λC + μI + Σ K_p K_pᵀ + K Kᵀ)⁻¹, with Σ K_p K_pᵀ
  the editor state (float64, one matrix per layer), grown after every applied call from the keys on the edited model
  (the keys of layer l depend only on the layers below it, so these are the keys the published code stores).
Stats keys as `memit`, under `encore/`, plus `encore/l<layer>/prev_keys` (keys accumulated so far).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from seqedit.editors._locate import ValueConfig
from seqedit.editors.base import register_editor
from seqedit.editors.memit import MemitConfig, MemitEditor


@dataclass(frozen=True)
class EncoreConfig(MemitConfig):
    value: ValueConfig = field(default_factory=lambda: ValueConfig(clamp_norm_factor=0.75, prob_cutoff=-4))
    update_norm_lambda: float = 10.0  # μ (gpt2-xl, llama2; llama3-8b 20)
    add_prev_edits: bool = True  # Σ K_p K_pᵀ of earlier calls in the solve (the keys of earlier edits preserved)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.update_norm_lambda < 0:
            raise ValueError(f"update_norm_lambda must be >= 0, got {self.update_norm_lambda}")


@register_editor("encore")
class EncoreEditor(MemitEditor):
    Config: ClassVar[type] = EncoreConfig

    KEY_CACHE_DTYPE: ClassVar[torch.dtype | None] = torch.float64  # SEQ_CACHE: Σ K_p K_pᵀ of the float64 keys

    def system(self, model: nn.Module, tokenizer: Any, layer: int, k: torch.Tensor) -> torch.Tensor:
        a = super().system(model, tokenizer, layer, k)
        if self.config.update_norm_lambda:
            a = a + self.config.update_norm_lambda * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        if self.config.add_prev_edits and layer in self.key_cache:
            a = a + self.key_cache[layer].to(device=a.device, dtype=a.dtype)
        return a

    def layer_adjustment(self, model, tokenizer, index, layer, keys):
        adj, diag = super().layer_adjustment(model, tokenizer, index, layer, keys)
        return adj, {**diag, "prev_keys": float(self.key_count.get(layer, 0))}
