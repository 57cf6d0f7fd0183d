"""Run configuration: frozen dataclasses, YAML files and dotted CLI overrides (`editor.layers=[2]`).

Unknown keys fail with a did-you-mean; values are type-checked against the annotations. The `editor` section is
open: `name` picks the editor, every other key goes to that editor's own `Config` dataclass and is validated there.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from seqedit.builder import ConfigError, build_dataclass, coerce
from seqedit.paths import expand_optional, expand_source, expand_user


@dataclass(frozen=True)
class ModelConfig:
    # HF id, local path, or "world:<preset>" (the synthetic world: shipped builds load at once, others build on first use).
    name: str = "world:standard"
    revision: str | None = None  # pin a hub revision for reproducibility
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.name, str):  # a local folder may be given as ~/models/x (hub ids never start with ~)
            object.__setattr__(self, "name", expand_user(self.name))


@dataclass(frozen=True)
class DataConfig:
    # "world" = the model's synthetic world records; otherwise a file path or "hf:<name>[:<split>]" (local cache only).
    source: str = "world"
    format: str = "auto"  # auto | counterfact | zsre | easyedit | jsonl | hf
    on_error: str = "raise"  # raise | skip (skip-and-report malformed records)
    shuffle: bool = True  # deterministic order from data.seed
    seed: int = 0
    start: int = 0  # slice of the ordered stream
    stop: int | None = None
    unique_subjects: bool = False  # keep the first request per subject (as the forgetting studies do)

    def __post_init__(self) -> None:
        if isinstance(self.source, str):  # ~/cf.json and hf:~/saved-dataset alike (seqedit.paths)
            object.__setattr__(self, "source", expand_source(self.source))


@dataclass(frozen=True)
class EditorSection:
    name: str = "ft"
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ProbeSpec:
    name: str
    schedule: str = "every:100"  # see seqedit.schedule: every:N | geometric:B | at:[..] | signal:NAME | never, "|" unions
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TelemetryConfig:
    # Online disabling-edit detector (seqedit.analysis.detect): an update whose ‖ΔW‖_F is >= spike_factor x the
    # median of the previous spike_window updates of that parameter *and* spike_z robust z-scores (MAD) above it in
    # log units raises the "norm_spike" signal (on-signal probes run, an alert is written).
    spike_factor: float = 5.0
    spike_z: float = 6.0
    spike_window: int = 100
    spike_warmup: int = 10  # earlier updates needed before spikes are judged
    # Collapse: control recall or mean downstream accuracy at or below chance + collapse_margin x (pre-edit value -
    # chance) raises a "collapse" alert; stop_on_collapse then ends the editing there (the final phase still runs).
    collapse_margin: float = 0.1
    stop_on_collapse: bool = False
    heartbeat_seconds: float = 60.0  # heartbeat.json + one log line at most this often
    state_every: int = 50  # save state.json every N editor calls (it is O(1): cursor, counters, last snapshot)


@dataclass(frozen=True)
class CheckpointConfig:
    # Every editor call is committed to the ledger (its delta, as low-rank factors when they reproduce it exactly)
    # before its telemetry is written; snapshots of the touched parameters + run state bound the replay on resume.
    snapshot_every: int = 100  # editor calls between snapshots (one is also taken at a stop and at the end)
    keep_last: int = 2  # newest snapshots kept ...
    milestones: str = "every:1000"  # ... plus those at these edit indices (a schedule; "never" = none)
    # When ledger records reach the disk: "snapshot" = flushed to the OS at every commit (a killed process loses
    # nothing) and fsync'd before each snapshot (a crashed *machine* loses at most the calls since the last snapshot,
    # which the resume recomputes bit-identically); "commit" = fsync'd at every commit (costs ~1.6 ms per edit here).
    fsync: str = "snapshot"  # snapshot | commit


@dataclass(frozen=True)
class GuardConfig:
    # What to do with an update that has non-finite values (or leaves non-finite weights), or whose ‖ΔW‖_F exceeds
    # max_update_norm / whose ‖ΔW‖_F/‖W0‖_F exceeds max_update_rel: reject = roll back exactly, alert, go on;
    # stop = roll back, alert, fail the run; allow = keep it, alert (non-finite weights are never snapshotted).
    # No norm bound by default: huge updates are the disabling edits this tool exists to observe.
    policy: str = "stop"  # reject | stop | allow
    max_update_norm: float | None = None
    max_update_rel: float | None = None


@dataclass(frozen=True)
class EvalConfig:
    immediate: bool = True  # score each batch right after it is applied
    final: bool = True  # score every edit once after the last one
    paraphrase: bool = True
    neighborhood: bool = True
    batch_size: int = 64  # prompts per forward pass in scoring


@dataclass(frozen=True)
class WandbConfig:
    mode: str = "disabled"  # online | offline | disabled
    project: str = "seqedit"
    entity: str | None = None
    group: str | None = None
    tags: tuple[str, ...] = ()
    # online only: how long wandb.init may take (wandb's own default is 90 s). An unreachable server then costs
    # this long once, and the run logs offline instead (`seqedit push-wandb RUN_DIR` uploads it later).
    init_timeout_s: float = 15.0


@dataclass(frozen=True)
class RunConfig:
    name: str = "default"
    seed: int = 0
    n_edits: int = 100
    batch_size: int = 1  # requests per editor call: 1 = single sequential edits, >1 = batched-sequential
    # CPU threads for torch (None = torch's default). Several runs sharing a node: 1 each avoids the
    # oversubscription that makes tiny-model forward passes many times slower.
    threads: int | None = None
    runs_dir: str = "runs"  # run outputs go to <runs_dir>/<run_id>/
    cache_dir: str | None = None  # defaults to $SEQEDIT_CACHE or ~/.cache/seqedit
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    editor: EditorSection = field(default_factory=EditorSection)
    eval: EvalConfig = field(default_factory=EvalConfig)
    probes: tuple[ProbeSpec, ...] = ()
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        if isinstance(self.runs_dir, str):
            object.__setattr__(self, "runs_dir", expand_user(self.runs_dir))
        if self.cache_dir is None or isinstance(self.cache_dir, str):
            object.__setattr__(self, "cache_dir", expand_optional(self.cache_dir))

    def to_dict(self) -> dict[str, Any]:
        d = _to_plain(self)
        ed = d.pop("editor")
        d["editor"] = {"name": ed["name"], **ed["options"]}
        d["probes"] = [{"name": p["name"], "schedule": p["schedule"], **p["options"]} for p in d["probes"]]
        return d

    def config_hash(self) -> str:
        """sha256 of the fully built config (editor and probe defaults filled in by `from_dict`) without the
        resume-safe keys, which change how a run executes but not what it computes."""
        d = self.to_dict()
        for dotted in RESUME_SAFE:
            _pop_dotted(d, dotted)
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def run_id(self) -> str:
        return f"{self.name}-{self.config_hash()[:8]}-s{self.seed}"


# Keys that may differ between a run and its resume (recorded in the run's events): where and how fast it runs, how
# often it saves, where wandb mirrors it. Everything else changes what the run computes and is refused on resume.
RESUME_SAFE = (
    "threads", "runs_dir", "cache_dir", "wandb.mode", "wandb.project", "wandb.entity", "wandb.group", "wandb.tags",
    "wandb.init_timeout_s",
    "telemetry.heartbeat_seconds", "telemetry.state_every", "checkpoint.snapshot_every", "checkpoint.keep_last",
    "checkpoint.milestones", "checkpoint.fsync",
)


def _pop_dotted(tree: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.get(p, {})
    tree.pop(leaf, None)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(saved: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(breaking keys, resume-safe keys) whose values differ between two `to_dict()` trees."""
    a, b = flatten(saved), flatten(new)
    changed = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    safe = [k for k in changed if k in RESUME_SAFE]
    return [k for k in changed if k not in RESUME_SAFE], safe


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------------------------
# Generic typed construction


# ---------------------------------------------------------------------------------------------------------------
# Loading


CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "data.format": ("auto", "counterfact", "zsre", "easyedit", "jsonl", "hf"),
    "data.on_error": ("raise", "skip"),
    "wandb.mode": ("online", "offline", "disabled"),
    "guard.policy": ("reject", "stop", "allow"),
    "checkpoint.fsync": ("snapshot", "commit"),
}
# Counts that divide or bound something: 0 would be a ZeroDivisionError or a run that keeps nothing, hours in.
MINIMUMS = {"n_edits": 1, "batch_size": 1, "telemetry.state_every": 1, "checkpoint.snapshot_every": 1,
            "checkpoint.keep_last": 1, "eval.batch_size": 1, "telemetry.spike_warmup": 1,
            "telemetry.spike_window": 2}


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value (e.g. editor.layers=[2])")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def from_dict(tree: Mapping[str, Any]) -> RunConfig:
    tree = dict(tree)
    editor = tree.pop("editor", None)
    probes = tree.pop("probes", None)
    cfg = build_dataclass(RunConfig, tree)
    if probes is not None:
        if isinstance(probes, Mapping):  # {retention: {schedule: ...}, perplexity: {...}} is accepted too
            probes = [{"name": k, **(v or {})} for k, v in probes.items()]
        if not isinstance(probes, (list, tuple)):
            raise ConfigError(f"probes: expected a list of {{name, schedule, ...options}}, got {probes!r}")
        specs = []
        for i, item in enumerate(probes):
            if isinstance(item, str):
                item = {"name": item}
            if not isinstance(item, Mapping) or "name" not in item:
                raise ConfigError(f"probes[{i}]: expected a mapping with a 'name', got {item!r}")
            item = dict(item)
            name = coerce(item.pop("name"), str, f"probes[{i}].name")
            schedule = coerce(item.pop("schedule", "every:100"), str, f"probes[{i}].schedule")
            specs.append(ProbeSpec(name=name, schedule=schedule, options=item))
        cfg = dataclasses.replace(cfg, probes=tuple(specs))
    if editor is not None:
        if isinstance(editor, str):
            editor = {"name": editor}
        if not isinstance(editor, Mapping):
            raise ConfigError(f"editor: expected a mapping with a 'name', got {editor!r}")
        editor = dict(editor)
        name = coerce(editor.pop("name", "ft"), str, "editor.name")
        cfg = dataclasses.replace(cfg, editor=EditorSection(name=name, options=editor))
    validate(cfg)
    return complete(cfg)


def validate(cfg: RunConfig) -> None:
    plain = cfg.to_dict()
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = plain[section][key]
        if value not in allowed:
            raise ConfigError(f"{dotted}: {value!r} is not allowed; allowed: {', '.join(allowed)}")
    flat = flatten(plain)
    for key, least in MINIMUMS.items():
        if flat[key] < least:
            raise ConfigError(f"{key}: {flat[key]} must be >= {least}")
    if not flat["wandb.init_timeout_s"] > 0:
        raise ConfigError(f"wandb.init_timeout_s: {flat['wandb.init_timeout_s']} must be > 0 (seconds)")
    for key in ("guard.max_update_norm", "guard.max_update_rel"):
        value = flat[key]
        if value is not None and not value > 0:
            raise ConfigError(f"{key}: {value} must be > 0 (or null for no bound)")
    if plain["threads"] is not None and plain["threads"] < 1:
        raise ConfigError(f"threads: {plain['threads']} must be >= 1 (or null for torch's default)")
    # Resolve the editor and probes now so that a typo fails before any model is loaded.
    from seqedit.editors.base import make_editor
    from seqedit.probe_api import make_probe
    from seqedit.schedule import parse_schedule

    make_editor(cfg.editor.name, cfg.editor.options)
    for i, spec in enumerate(cfg.probes):
        make_probe(spec.name, spec.options)
        try:
            parse_schedule(spec.schedule)
        except ValueError as e:
            raise ConfigError(f"probes[{i}].schedule: {e}") from None
    try:
        parse_schedule(cfg.checkpoint.milestones)
    except ValueError as e:
        raise ConfigError(f"checkpoint.milestones: {e}") from None


def complete(cfg: RunConfig) -> RunConfig:
    """The fully built config: the editor's and every probe's options with all their defaults filled in (and the
    editor name normalised), so `layers: 0` and `layers: [0]` are one config, and a changed default changes the
    hash of configs that relied on it."""
    from seqedit.editors.base import make_editor
    from seqedit.probe_api import make_probe

    editor = make_editor(cfg.editor.name, cfg.editor.options)
    probes = tuple(dataclasses.replace(spec, options=_to_plain(make_probe(spec.name, spec.options).config))
                   for spec in cfg.probes)
    return dataclasses.replace(cfg, editor=EditorSection(name=editor.name, options=_to_plain(editor.config)),
                               probes=probes)


def read_tree(path: str | Path | None = None) -> dict[str, Any]:
    """The raw mapping of a YAML config file ({} for none), unvalidated."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found")
    loaded = yaml.safe_load(p.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at top level")
    return loaded


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    for ov in overrides:
        key, value = parse_override(ov)
        set_dotted(tree, key, value)
    return tree


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    tree = read_tree(path)
    if "sweep" in tree:  # a sweep file names many runs, not one
        raise ConfigError(f"config file {str(path)!r} holds a 'sweep:' section: launch it with "
                          f"`seqedit sweep {path}` (or remove the section to run the base config once)")
    return from_dict(apply_overrides(tree, overrides))


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
