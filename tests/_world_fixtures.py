"""Session-scoped synthetic worlds for tests: import the fixtures you need into your test module.

    from _world_fixtures import tiny_world  # noqa: F401  (pytest finds the fixture by name)

The `tiny` world is built once per test session: into `$SEQEDIT_CACHE` when the test run sets it (then it is
reused across sessions too), otherwise into a session temporary directory (the home cache is never touched).
`micro_config()` is a throwaway world that builds in a few seconds, for tests of the cache machinery itself.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from seqedit.world import CorpusDesign, World, WorldConfig, load_world


def tiny_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("SEQEDIT_CACHE")
    return Path(env) if env else tmp_path_factory.getbasetemp() / "seqedit-cache"


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """The `tiny` preset world (2 layers x 64, ~120 subjects), built once per session. Treat it as read-only: copy
    the model (`copy.deepcopy(tiny_world.model)`) before editing it."""
    return load_world("tiny", cache_dir=tiny_cache_dir(tmp_path_factory))


def micro_config(**overrides) -> WorldConfig:
    """A very small world (1 layer x 32, 20 subjects, 2 epochs): builds in a few seconds, knows nothing."""
    base = dict(
        name="micro", n_subjects=20, relations_per_subject=2, n_layer=1, n_embd=32, n_head=2, n_positions=64,
        epochs=2, arithmetic_max=4, n_ordering_mc=8, heldout_min_tokens=300,
        corpus=CorpusDesign(ordering_lines_per_epoch=10),
    )
    base.update(overrides)
    return WorldConfig(**base)
