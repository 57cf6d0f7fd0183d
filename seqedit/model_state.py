"""Model-state helpers: where a model lives, and changes of flags or weights that are always undone.

- `model_device`: the device of the first parameter (editors put tensors where the parameters live).
- `frozen_model`: eval mode and requires_grad=False for a block, both restored.
- `TemporaryWeights`: add deltas for the duration of a computation, restore the originals bitwise.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from seqedit.apply import add_exact, added_dtype


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def frozen_model(model: nn.Module) -> Iterator[None]:
    """eval mode and requires_grad=False on every parameter for the block; both restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


class TemporaryWeights:
    """Apply deltas to parameters for the duration of a computation and restore the originals bitwise on exit.

    Used for "several requests in one call, each computed on the weights after the previous ones" (ROME's
    `apply_rome_to_model`) and multi-layer updates; the editor then returns the summed delta and the driver applies it.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.saved: dict[str, torch.Tensor] = {}

    def __enter__(self) -> "TemporaryWeights":
        return self

    @torch.no_grad()
    def add(self, name: str, delta: torch.Tensor) -> None:
        """Add `delta` (stored layout) to parameter `name` with the driver's arithmetic (`seqedit.apply.add_exact`),
        so what a multi-layer editor sees while computing is bit for bit the model the driver then produces."""
        param = self.model.get_parameter(name)
        if name not in self.saved:
            self.saved[name] = param.detach().clone()
        add_exact(self.model, {name: delta.to(device=param.device, dtype=added_dtype(param.dtype))})

    @torch.no_grad()
    def restore(self) -> None:
        for name, value in self.saved.items():
            self.model.get_parameter(name).copy_(value)
        self.saved.clear()

    def __exit__(self, *exc: object) -> None:
        self.restore()
