"""The probe contract: something the driver runs on the live model on a schedule.

A probe returns slash-namespaced metrics (`probe/<name>/...`, `downstream/<task>/<metric>`) and optional per-item
rows (written to `telemetry/items-<probe>.jsonl`, so the same items can be compared across checks). Probes must leave
the model as they found it (weights, train/eval mode, device).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from seqedit.registry import Registry
from seqedit.types import EditRequest


@dataclass(frozen=True)
class ProbeContext:
    model: Any
    tokenizer: Any
    edit_index: int  # edits applied so far
    applied: Sequence[EditRequest]  # every request applied so far, in order
    run_dir: Path | None = None
    world: Any = None  # seqedit.world.World when the model is a world model
    seed: int = 0
    edited_params: tuple[str, ...] = ()  # parameters the editor may change
    stream: Sequence[EditRequest] = ()  # the whole planned stream (applied ones first)


@dataclass(frozen=True)
class ProbeResult:
    metrics: Mapping[str, float | None]
    rows: Sequence[Mapping[str, Any]] = field(default_factory=tuple)


@runtime_checkable
class Probe(Protocol):
    name: ClassVar[str]
    cost: ClassVar[Literal["cheap", "expensive"]]

    def __call__(self, ctx: ProbeContext) -> ProbeResult: ...


PROBES: Registry[type] = Registry("probe", entry_point_group="seqedit.probes")


def register_probe(name: str):
    return PROBES.register(name)


def _discover() -> None:
    import seqedit.probes  # noqa: F401  (registers the built-in probes)

    PROBES.register_lazy("downstream", "seqedit.downstream.lm_eval_probe")


def list_probes() -> list[str]:
    _discover()
    return PROBES.names()


def make_probe(name: str, options: Mapping[str, Any] | None = None) -> Any:
    """Instantiate probe `name` with its Config built from `options` (unknown keys -> did-you-mean error)."""
    from seqedit.config import build_dataclass

    _discover()
    cls = PROBES.get(name)
    return cls(build_dataclass(cls.Config, dict(options or {}), where=f"probes.{name}"))
