"""The editor contract.

An editor computes per-parameter deltas and scalar diagnostics for a batch of requests; it must leave the model's
weights as it found them (it may change them temporarily, e.g. MEMIT's layer-by-layer updates, but restores them).
The driver applies the deltas (`seqedit.apply`). Editors never print, log or choose devices: tensors go where the
parameters live. Randomness comes from `EditorContext.seed` through local generators, never the global RNG, so a
resumed run reproduces the same edits.
"""
from __future__ import annotations

import dataclasses
import pkgutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from seqedit.archs import ArchSpec, arch_for, num_layers
from seqedit.registry import Registry, normalise
from seqedit.types import EditProposal, EditRequest


@dataclass(frozen=True)
class EditorContext:
    """Everything an editor may need besides the model: no devices, no loggers."""

    arch: ArchSpec
    seed: int = 0
    # Where the editor may persist artifacts that a resumed run must reuse (context templates); None = in memory.
    run_dir: Path | None = None
    # Cache for expensive statistics (second moments), shared across runs.
    cache_dir: Path | None = None
    # Default text for second-moment statistics when the editor's `stats.source` is empty: the world's held-out
    # text on a world model (files: .txt one document per line, or .jsonl with a "text" field).
    stats_text: tuple[Path, ...] = ()
    extras: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def for_model(cls, model: nn.Module, **kw: Any) -> "EditorContext":
        return cls(arch=arch_for(model), **kw)


@runtime_checkable
class Editor(Protocol):
    name: ClassVar[str]
    Config: ClassVar[type]
    config: Any

    def prepare(self, model: nn.Module, tokenizer: Any, ctx: EditorContext) -> None: ...

    def params(self, model: nn.Module) -> list[str]:
        """Fully qualified names of every parameter this editor may change."""
        ...

    def compute(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest]) -> EditProposal: ...

    def state_dict(self) -> dict[str, Any]:
        """Everything the editor carries from call to call (templates, caches), as tensors and plain containers:
        the driver saves it in every snapshot (torch.load(weights_only=True) must read it back)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    def applied(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest],
                added: Mapping[str, torch.Tensor]) -> None:
        """Called by the driver after every applied call, live or replayed from the ledger on resume, with `added`
        already in the model (never after a call the guard rejected). Editors whose state grows with each applied
        edit (AlphaEdit's and ENCORE's caches of edit keys) update it here and only here, from the edited model, so
        a resumed run rebuilds exactly the state of an uninterrupted one; `compute` leaves the state unchanged."""
        ...


class BaseEditor:
    """Defaults for the parts most editors share. Subclasses set `name`, `Config` and implement `compute`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type]

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()
        self.ctx: EditorContext | None = None

    def prepare(self, model: nn.Module, tokenizer: Any, ctx: EditorContext) -> None:
        self.ctx = ctx

    def layers(self, model: nn.Module) -> list[int]:
        """Configured layers, or the default: the layer just below the middle (edits need a layer below the last)."""
        n = num_layers(model)
        layers = getattr(self.config, "layers", None)
        if layers is None or len(layers) == 0:
            return [max(0, n // 2 - 1)]
        for layer in layers:
            if not 0 <= layer < n:
                raise ValueError(f"{self.name}: layer {layer} out of range; the model has layers 0..{n - 1}")
        return list(layers)

    def params(self, model: nn.Module) -> list[str]:
        arch = arch_for(model)
        return [f"{arch.mlp_out(i)}.weight" for i in self.layers(model)]

    def compute(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest]) -> EditProposal:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name}: unexpected editor state keys {sorted(state)}")

    def applied(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest],
                added: Mapping[str, torch.Tensor]) -> None:
        return None  # no per-edit state

    @property
    def seed(self) -> int:
        return self.ctx.seed if self.ctx is not None else 0


EDITORS: Registry[type] = Registry("editor", entry_point_group="seqedit.editors")
_SKIP = {"base", "__init__"}


def register_editor(name: str):
    """Class decorator: `@register_editor("r-rome")`. Sets `cls.name` and checks the contract attributes."""

    def deco(cls: type) -> type:
        if not dataclasses.is_dataclass(getattr(cls, "Config", None)):
            raise TypeError(f"editor {name!r}: {cls.__name__}.Config must be a dataclass")
        mod = cls.__module__
        if not (mod.startswith("seqedit.") or mod in _entry_point_modules()):
            raise TypeError(
                f"editor {name!r} is defined in module {mod!r}; editors must live in seqedit.editors or be "
                "registered through the 'seqedit.editors' entry-point group (did something import 'editors' "
                "instead of 'seqedit.editors'?)"
            )
        cls.name = normalise(name)
        return EDITORS.register(name)(cls)

    return deco


def _entry_point_modules() -> set[str]:
    from importlib import metadata

    return {ep.value.partition(":")[0] for ep in metadata.entry_points(group="seqedit.editors")}


def _discover() -> None:
    import seqedit.editors as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_") or info.name in _SKIP:
            continue
        EDITORS.register_lazy(info.name.replace("_", "-"), f"seqedit.editors.{info.name}")


def list_editors() -> list[str]:
    _discover()
    return EDITORS.names()


def get_editor(name: str) -> type:
    _discover()
    return EDITORS.get(name)


def make_editor(name: str, options: Mapping[str, Any] | None = None) -> Any:
    """Instantiate editor `name` with its Config built from `options` (unknown keys -> did-you-mean error)."""
    from seqedit.builder import build_dataclass

    cls = get_editor(name)
    config = build_dataclass(cls.Config, dict(options or {}), where="editor")
    return cls(config)


def param_device(model: nn.Module, name: str) -> torch.device:
    return model.get_parameter(name).device
