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


class StopForward(Exception):
    """Raised by `capture_inputs(..., stop=True)` to end a forward pass early; the context manager swallows it."""


@contextlib.contextmanager
def capture_inputs(model: nn.Module, names: Sequence[str], *, stop: bool = False) -> Iterator[Captured]:
    """Record the first positional input of each named module with forward *pre*-hooks (detached).

    With `stop=True` the forward pass is aborted as soon as every named module has received its input (the modules
    themselves and everything after them never run): a `model(...)` call inside the block then ends the block, so put
    nothing after it that must run. Used where only an early activation is needed (second-moment statistics, keys).
    """
    store = Captured()
    handles = []
    wanted = set(names)
    try:
        for name in names:
            module = get_module(model, name)

            def hook(mod, args, _name=name):
                store.inputs[_name] = _first(args).detach()
                if stop and wanted.issubset(store.inputs):
                    raise StopForward

            handles.append(module.register_forward_pre_hook(hook))
        try:
            yield store
        except StopForward:
            pass
    finally:
        for h in handles:
            h.remove()
