"""Check a run's configuration before a run directory exists and before any weights load.

`preflight(cfg)` resolves the model (world preset or HF config only), the editor's layers, the edit stream and the
probes with the same functions the run itself uses, and raises `PreflightError` naming the config key, the value
and what is allowed. It returns what it learned (layer count, architecture, the ordered stream) for the driver.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from seqedit.config import ConfigError, RunConfig, validate
from seqedit.types import EditRequest


class PreflightError(ValueError):
    """The run cannot start as configured; the message names the key, the value and what is allowed."""


@dataclass(frozen=True)
class Preflight:
    n_layers: int
    arch: str  # ArchSpec.name
    requests: tuple[EditRequest, ...] | None  # the ordered, sliced stream; None for data.source=world
    data_info: dict[str, Any] | None  # what driver.load_stream reports (source, format, available, skipped)


def preflight(cfg: RunConfig) -> Preflight:
    """Validate `cfg` without creating files or loading weights; raise PreflightError on the first problem."""
    try:
        validate(cfg)  # choices, editor/probe options, schedules: configs built with dataclasses.replace too
    except ConfigError as e:
        raise PreflightError(str(e)) from e
    n_layers, arch, world = _check_model(cfg)
    _check_editor_layers(cfg, n_layers)
    _check_editor_stats(cfg, is_world=_is_world(cfg))
    requests, data_info = _check_data(cfg)
    _check_probes(cfg, world)
    return Preflight(n_layers=n_layers, arch=arch, requests=requests, data_info=data_info)


# ---------------------------------------------------------------------------------------------------------------
# Model


def _check_model(cfg: RunConfig) -> tuple[int, str, Any]:
    """(layer count, arch name, world). `world` is a paths-only World when the world is built, else None."""
    from seqedit.archs import num_layers, spec_for_model_type
    from seqedit.model_io import (
        ModelLoadError,
        arch_from_config,
        resolve_device,
        resolve_dtype,
        resolve_hf_config,
        world_preset,
    )

    try:
        resolve_dtype(cfg.model.dtype)
        resolve_device(cfg.model.device)
        preset = world_preset(cfg.model.name)
    except ModelLoadError as e:
        raise PreflightError(str(e)) from e

    if preset is not None:
        from seqedit.driver import default_cache_dir
        from seqedit.world.build import World, WorldIntegrityError, locate_world, verify_world

        try:  # get_preset: unknown names list the allowed presets; a damaged shipped build stops here
            found = locate_world(preset, default_cache_dir(cfg.cache_dir))
        except (ValueError, WorldIntegrityError) as e:
            raise PreflightError(f"model.name={cfg.model.name!r}: {e}") from e
        wc, path = found.config, found.path
        # World.downstream_dir/heldout_path are all a downstream check() reads: no model or tokenizer is loaded.
        intact = found.source == "shipped" or verify_world(path) is None  # locate_world checked a shipped build
        world = World(path=path, config=wc, model=None, tokenizer=None, source=found.source) if intact else None
        # World models are GPT-2 (seqedit.world.train.make_model); the layer count is the preset's.
        return wc.n_layer, spec_for_model_type("gpt2").name, world

    try:
        config, source, kw, where = resolve_hf_config(cfg.model)  # AutoConfig only, never weights
        arch = arch_from_config(config, where)
    except ModelLoadError as e:
        raise PreflightError(_keyed("model.name", str(e))) from e
    try:
        n = num_layers(SimpleNamespace(config=config))  # the rule editors apply to the loaded model
    except ValueError as e:
        raise PreflightError(f"model.name={cfg.model.name!r}: {where}: {e}") from e
    _check_vocabulary(cfg, config, source, kw)
    return n, arch.name, None


def _check_vocabulary(cfg: RunConfig, config: Any, source: str, kw: dict[str, Any]) -> None:
    """The tokenizer against the config's vocab_size (the embedding rows), without weights: a mismatched pair is
    refused before a run directory exists (model_io checks the loaded embedding again)."""
    from transformers import AutoTokenizer

    from seqedit.model_io import vocabulary_problem

    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    rows = getattr(text_config, "vocab_size", None)
    if not isinstance(rows, int):
        return
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kw)
    except (OSError, ValueError):  # unreadable tokenizer: loading the model reports it with its own message
        return
    problem = vocabulary_problem(tokenizer, rows, cfg.model.name)
    if problem is not None:
        raise PreflightError(problem)


# ---------------------------------------------------------------------------------------------------------------
# Editor


def _check_editor_layers(cfg: RunConfig, n_layers: int) -> None:
    from seqedit.editors.base import make_editor

    editor = make_editor(cfg.editor.name, cfg.editor.options)
    layers = getattr(editor.config, "layers", None)
    if not layers or not hasattr(editor, "layers"):
        return  # the editor's default layer is always in range
    # BaseEditor.layers only reads model.config, so a config-only stand-in applies the same range rule.
    stand_in = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=n_layers))
    try:
        editor.layers(stand_in)
    except ValueError as e:
        raise PreflightError(f"editor.layers={list(layers)}: {e} (model {cfg.model.name!r})") from e


def _is_world(cfg: RunConfig) -> bool:
    from seqedit.model_io import world_preset

    return world_preset(cfg.model.name) is not None


def _check_editor_stats(cfg: RunConfig, is_world: bool) -> None:
    """Locate-then-edit editors need statistics text: the configured `stats.source` must exist (and be readable as
    text), and a non-world model has no default text."""
    from seqedit.editors.base import make_editor
    from seqedit.stats import StatsError, check_sources

    editor = make_editor(cfg.editor.name, cfg.editor.options)
    stats = getattr(editor.config, "stats", None)
    if stats is None or not getattr(editor, "needs_statistics", True):
        return
    if stats.source:
        try:
            check_sources(list(stats.source))  # already expanded (StatsSpec)
        except StatsError as e:
            raise PreflightError(f"editor.stats.source={list(stats.source)!r}: {e}") from e
    elif not is_world:
        raise PreflightError(
            f"editor.stats.source is empty: editor {cfg.editor.name!r} needs text for its second-moment statistics "
            f"on model {cfg.model.name!r} (only world models have a default); give local .txt/.jsonl files or a "
            "folder written by datasets' save_to_disk, e.g. editor.stats.source=[/data/wikitext.txt]")


# ---------------------------------------------------------------------------------------------------------------
# Data


_SOURCES = "a .json/.jsonl file, a `save_to_disk` folder, hf:<name>[:<split>] (local cache only) or world"


def _check_data(cfg: RunConfig) -> tuple[tuple[EditRequest, ...] | None, dict[str, Any] | None]:
    from seqedit.data import DataError
    from seqedit.driver import RunError, load_stream
    from seqedit.model_io import world_preset

    d = cfg.data
    if d.source == "world" and world_preset(cfg.model.name) is not None:
        return None, None  # the world's records exist only once it is built (at model load)
    try:
        # load_stream reads `loaded.world` only for data.source=world, where None gives its own "needs a world
        # model" error; file sources never touch it.
        stream, info = load_stream(cfg, SimpleNamespace(world=None))
    except RunError as e:
        raise PreflightError(str(e)) from e  # names data.source or n_edits already
    except FileNotFoundError as e:
        raise PreflightError(f"data.source={d.source!r}: {e}; allowed: {_SOURCES}") from e
    except (DataError, OSError) as e:  # malformed or unreadable records
        raise PreflightError(f"data.source={d.source!r}: {e}") from e
    except ValueError as e:  # order_requests' slice rules (start past the end, stop < start) or an hf: split
        raise PreflightError(f"data (source={d.source!r}, start={d.start}, stop={d.stop}): {e}") from e
    return tuple(stream), info


# ---------------------------------------------------------------------------------------------------------------
# Probes


def _check_probes(cfg: RunConfig, world: Any) -> None:
    from seqedit.downstream.lm_eval_probe import DownstreamDataError, DownstreamProbe
    from seqedit.model_io import world_preset
    from seqedit.probe_api import make_probe

    unbuilt_world = world_preset(cfg.model.name) is not None and world is None
    for i, spec in enumerate(cfg.probes):
        probe = make_probe(spec.name, spec.options)  # suite and bundled task names resolve here (did-you-mean)
        if not isinstance(probe, DownstreamProbe):
            if hasattr(probe, "check") and not unbuilt_world:  # an unbuilt world's files come with its build
                try:
                    probe.check(world)  # e.g. perplexity: a text to score
                except ValueError as e:
                    raise PreflightError(f"probes[{i}] ({spec.name}): {e}") from e
            continue
        if unbuilt_world:
            # The build writes the world tasks' files: check the other tasks now, the driver checks all later.
            probe.tasks = tuple(t for t in probe.tasks if t.source != "world")
        if not probe.tasks:
            continue
        try:
            probe.check(world)  # lm-eval names against its index, local data files; offline, no model
        except (ValueError, DownstreamDataError) as e:
            raise PreflightError(f"probes[{i}].tasks={list(probe.config.tasks)!r}: {e}") from e


def _keyed(key: str, message: str) -> str:
    """Prefix `key` unless the message already starts with it (model_io's messages mostly do)."""
    return message if message.startswith(key) else f"{key}: {message}"
