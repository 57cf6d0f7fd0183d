"""`ft`: constrained fine-tuning of one MLP output matrix per layer (FT-L, Zhu et al. 2020 as run in the ROME papers).

Adam on the rewrite matrices of `layers`, NLL of the new target; after every step each weight is clamped to
W0 ± norm_constraint (L∞), which is what makes it FT-*L*. `objective="prompt_last"` scores all target tokens at the
last prompt position (FT-L as published); `"teacher_forced"` scores the target token by token (FT-M).
The weights are restored after the optimisation; the difference is returned as the delta.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from seqedit.editors.base import BaseEditor, register_editor
from seqedit.scoring import pad_batch, prompt_ids, target_ids
from seqedit.types import EditProposal, EditRequest


@register_editor("ft")
class FineTuneEditor(BaseEditor):
    @dataclass(frozen=True)
    class Config:
        layers: tuple[int, ...] | None = None  # None = the layer below the middle
        lr: float = 5e-3  # Adam learning rate
        num_steps: int = 25  # optimisation steps per editor call
        norm_constraint: float | None = 5e-3  # L∞ bound on W - W0; None = unconstrained FT
        objective: str = "prompt_last"  # prompt_last (FT-L) | teacher_forced (FT-M)
        early_stop_loss: float = 1e-2  # stop once the loss is below this

        def __post_init__(self) -> None:
            if self.objective not in ("prompt_last", "teacher_forced"):
                raise ValueError(f"objective={self.objective!r}; allowed: prompt_last, teacher_forced")
            if self.num_steps < 1:
                raise ValueError(f"num_steps={self.num_steps} must be >= 1")

    def _batch(self, tokenizer: Any, requests: Sequence[EditRequest], device: torch.device):
        rows = [(prompt_ids(tokenizer, r.text), target_ids(tokenizer, r.target_new)) for r in requests]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        last = self.config.objective == "prompt_last"
        ids, mask = pad_batch([p if last else p + t for p, t in rows], pad)
        return rows, ids.to(device), mask.to(device)

    def _loss(self, model: nn.Module, rows, ids, mask) -> torch.Tensor:
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)  # [b, pos, vocab]
        losses = []
        for i, (p, t) in enumerate(rows):
            tgt = torch.tensor(t, device=ids.device)
            if self.config.objective == "prompt_last":
                lp = logp[i, len(p) - 1, tgt]  # every target token scored at the last prompt position
            else:
                pos = torch.arange(len(p) - 1, len(p) + len(t) - 1, device=ids.device)
                lp = logp[i, pos, tgt]
            losses.append(-lp.mean())
        return torch.stack(losses).mean()

    def compute(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest]) -> EditProposal:
        names = self.params(model)
        params = [model.get_parameter(n) for n in names]
        originals = [p.detach().clone() for p in params]
        rows, ids, mask = self._batch(tokenizer, requests, params[0].device)
        eps = self.config.norm_constraint
        was_training = model.training
        model.eval()  # no dropout: the edit must be deterministic
        losses: list[float] = []
        try:
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.Adam(params, lr=self.config.lr)
            for _ in range(self.config.num_steps):
                opt.zero_grad(set_to_none=True)
                loss = self._loss(model, rows, ids, mask)
                losses.append(float(loss.detach()))
                if losses[-1] < self.config.early_stop_loss:
                    break
                loss.backward()
                opt.step()
                if eps is not None:
                    with torch.no_grad():
                        for p, w0 in zip(params, originals):
                            p.copy_(torch.clamp(p, w0 - eps, w0 + eps))
            deltas = {n: (p.detach() - w0).float() for n, p, w0 in zip(names, params, originals)}
        finally:
            with torch.no_grad():
                for p, w0 in zip(params, originals):
                    p.copy_(w0)
                    p.requires_grad_(False)
                    p.grad = None
            model.train(was_training)
        stats = {"ft/loss_first": losses[0], "ft/loss_last": losses[-1], "ft/steps": float(len(losses))}
        return EditProposal(deltas=deltas, stats=stats)
