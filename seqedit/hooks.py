"""Forward hooks only through context managers that always remove their handles.

`capture` records module inputs/outputs by name; `patch_output` lets a function rewrite a module's output.
Hooks are additive: we never touch `module._forward_hooks` directly.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from seqedit.archs import get_module


@dataclass
class Captured:
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


def _first(x):
    return x[0] if isinstance(x, tuple) else x


@contextlib.contextmanager
def capture(
    model: nn.Module, names: Sequence[str], *, inputs: bool = True, outputs: bool = True, detach: bool = True
) -> Iterator[Captured]:
    """Record the first positional input and/or the (first) output of each named module."""
    store = Captured()
    handles = []
    try:
        for name in names:
            module = get_module(model, name)

            def hook(mod, args, out, _name=name):
                if inputs:
                    x = _first(args)
                    store.inputs[_name] = x.detach() if detach else x
                if outputs:
                    y = _first(out)
                    store.outputs[_name] = y.detach() if detach else y

            handles.append(module.register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def patch_output(model: nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the (first) output of module `name` by fn(output) for the duration of the block."""
    module = get_module(model, name)

    def hook(mod, args, out):
        if isinstance(out, tuple):
            return (fn(out[0]),) + tuple(out[1:])
        return fn(out)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
