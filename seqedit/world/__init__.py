"""The embedded synthetic world (generator, tokenizer, small GPT-2): shipped builds load at once, others are built
on first use and cached.

`load_world("standard")` (the shipped default) or `load_world("small")` (built on first use) returns a `World`
(model in eval mode, tokenizer, report, paths of the CounterFact records, downstream JSONL tasks and held-out text).
Nothing is downloaded: a world is generated from a seed and a GPT-2 is trained on it once, either by the maintainers
(shipped as package data, seqedit/world/shipped/) or locally into `$SEQEDIT_CACHE` (default `~/.cache/seqedit`)
`/worlds/<preset>-<config hash>/`.
Importing this package is cheap; torch and transformers load when a world is built or loaded.
"""
from __future__ import annotations

from seqedit.world.build import (
    World,
    WorldIntegrityError,
    build_id,
    build_world,
    compare_reports,
    default_cache_dir,
    load_world,
    locate_world,
    resolve_config,
    shipped_dir,
    shipped_presets,
    verify_world,
    world_dir,
    world_info,
)
from seqedit.world.config import PRESETS, WORLD_FORMAT_VERSION, CorpusDesign, WorldConfig, get_preset

__all__ = [
    "PRESETS", "WORLD_FORMAT_VERSION", "CorpusDesign", "World", "WorldConfig", "WorldIntegrityError", "build_id",
    "build_world", "compare_reports", "default_cache_dir", "get_preset", "load_world", "locate_world",
    "resolve_config", "shipped_dir", "shipped_presets", "verify_world", "world_dir", "world_info",
]
