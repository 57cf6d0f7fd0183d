"""`~` in user-given paths, expanded in one way everywhere.

Shells do not expand `~` inside `key=value` overrides (`data.source=~/cf.json`) nor in YAML files, so every config
field that holds a path expands it when its config object is built (`__post_init__`): whatever reads the field later
(preflight, the driver, the loaders, error messages, the saved config.yaml) sees the same, real path.
"""
from __future__ import annotations

import os

HF_PREFIX = "hf:"


def expand_user(path: str) -> str:
    """`~` / `~user` at the start of `path` expanded (nothing else: no variables, no resolution)."""
    return os.path.expanduser(path)


def expand_source(source: str) -> str:
    """A data or statistics source: a path, or `hf:<name or saved-dataset folder>[:split]` whose folder is expanded.
    Hub names ("org/name") and "world" are left as they are (they do not start with `~`)."""
    if source.startswith(HF_PREFIX):
        return HF_PREFIX + expand_user(source[len(HF_PREFIX):])
    return expand_user(source)


def expand_optional(path: str | None) -> str | None:
    return None if path is None else expand_user(path)
