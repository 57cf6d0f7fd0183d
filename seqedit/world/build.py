"""Build, cache, verify and load worlds; find the builds that ship with the package.

Shipped worlds: presets with a build under `shipped/` are built once (`seqedit world build <preset> --rebuild` on one machine,
then `bench/ship_world.py`) and their files ship as package data under `seqedit/world/shipped/<preset>/`, checked
against their `checksums.json` on every load. `world:<preset>` loads the shipped build; `world:<preset>@local` is the
build made on this machine (into the cache, as below), so the two can never be confused under one name. Every world
has a `build_id` (a hash of its checksums), which runs record.

A locally built world lives in `<cache>/worlds/<name>-<config hash>/` (cache = `cache_dir`, else `$SEQEDIT_CACHE`, else
`~/.cache/seqedit`). It is built in a temporary sibling directory and moved into place with `os.replace`, and
`checksums.json` (sha256 of every other file) is written last, atomically: a directory without valid checksums is
treated as missing and rebuilt, so a killed build never leaves a half-written world that loads.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seqedit.io import file_sha256
from seqedit.world.config import PRESETS, WORLD_FORMAT_VERSION, WorldConfig, get_preset

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
CHECKSUMS = "checksums.json"
DOWNSTREAM_TASKS = ("facts_mc", "arithmetic", "ordering")
# Files every world must have (checked in addition to the checksums, so a truncated checksum list is caught too).
REQUIRED_FILES = (
    "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "world_config.json",
    "counterfact.json", "heldout.txt", "report.json", *(f"downstream/{t}.jsonl" for t in DOWNSTREAM_TASKS),
)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
LOCAL_SUFFIX = "@local"  # world:<preset>@local = this machine's build of a shipped preset
SHIPPED_ROOT = Path(__file__).resolve().parent / "shipped"


class WorldIntegrityError(RuntimeError):
    """A shipped world is damaged or does not match its preset: loading it would give other results than it claims."""


def default_cache_dir() -> Path:
    """$SEQEDIT_CACHE, else $XDG_CACHE_HOME/seqedit, else ~/.cache/seqedit: the one cache root of every command."""
    env = os.environ.get("SEQEDIT_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "seqedit"


def split_local(name: str) -> tuple[str, bool]:
    """"world:small@local" -> ("small", True); "small" -> ("small", False)."""
    name = name.removeprefix("world:")
    return (name[: -len(LOCAL_SUFFIX)], True) if name.endswith(LOCAL_SUFFIX) else (name, False)


def resolve_config(preset_or_cfg: str | WorldConfig) -> WorldConfig:
    """A preset name ("tiny", also "world:tiny" or "tiny@local") or a WorldConfig -> WorldConfig."""
    if isinstance(preset_or_cfg, WorldConfig):
        cfg = preset_or_cfg
    elif isinstance(preset_or_cfg, str):
        name, _local = split_local(preset_or_cfg)
        cfg = get_preset(name)
    else:
        raise TypeError(
            f"expected a preset name ({', '.join(sorted(PRESETS))}) or a WorldConfig, got {preset_or_cfg!r}"
        )
    if not _NAME_RE.match(cfg.name):
        raise ValueError(f"WorldConfig.name={cfg.name!r} is not usable in a path; use letters, digits, '_', '.', '-'")
    return cfg


def world_dir(cfg: str | WorldConfig, cache_dir: str | Path | None = None) -> Path:
    """Where this machine's build of the world lives (or will), in the cache; see `locate_world` for shipped ones."""
    cfg = resolve_config(cfg)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "worlds" / f"{cfg.name}-{cfg.config_hash()}"


def shipped_dir(preset: str) -> Path | None:
    """The shipped build of a preset, None if the package ships none for it."""
    path = SHIPPED_ROOT / preset
    return path if (path / "world_config.json").is_file() or (path / CHECKSUMS).is_file() else None


def shipped_presets() -> list[str]:
    return sorted(p.name for p in SHIPPED_ROOT.iterdir() if shipped_dir(p.name)) if SHIPPED_ROOT.is_dir() else []


def build_problem(preset: str, path: Path) -> str | None:
    """None if `path` holds an intact build of the preset's current config, else what is wrong with it."""
    problem = verify_world(path)
    if problem is not None:
        return problem
    cfg = get_preset(preset)
    stored = json.loads((path / "world_config.json").read_text())
    if stored.get("config_hash") != cfg.config_hash():
        return f"it was built from config hash {stored.get('config_hash')}, the preset now hashes to {cfg.config_hash()}"
    return None


def check_shipped(preset: str, path: Path) -> None:
    """Raise WorldIntegrityError unless the shipped build at `path` is intact and is a build of the preset's config."""
    problem = build_problem(preset, path)
    if problem is not None:
        if problem.startswith("it was built from"):
            problem += " (the preset changed without a new shipped build)"
        raise WorldIntegrityError(
            f"the shipped world {preset!r} at {path} is damaged: {problem}. Reinstall seqedit "
            f"(pip install --force-reinstall --no-deps seqedit) or build it on this machine with "
            f"`seqedit world build {preset} --rebuild` and use model.name=world:{preset}{LOCAL_SUFFIX}")


def build_id(path: str | Path) -> str:
    """12 hex digits naming one build of a world: the hash of its checksums (weights, tokenizer, records, ...)."""
    files = json.loads((Path(path) / CHECKSUMS).read_text())["files"]
    blob = json.dumps(files, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class WorldLocation:
    """Where `world:<name>` resolves to: the shipped build, or this machine's cache."""

    config: WorldConfig
    path: Path
    source: str  # "shipped" | "local"


def locate_world(preset_or_cfg: str | WorldConfig, cache_dir: str | Path | None = None) -> WorldLocation:
    """A preset name with a shipped build -> the shipped build (checked: WorldIntegrityError if damaged); a name with
    "@local", a preset without a shipped build, or a WorldConfig -> the cache directory (built or not)."""
    cfg = resolve_config(preset_or_cfg)
    if isinstance(preset_or_cfg, str):
        name, local = split_local(preset_or_cfg)
        shipped = None if local else shipped_dir(name)
        if shipped is not None:
            check_shipped(name, shipped)
            return WorldLocation(cfg, shipped, "shipped")
    return WorldLocation(cfg, world_dir(cfg, cache_dir), "local")


# ---------------------------------------------------------------------------------------------------------------
# Integrity


def _write_checksums(directory: Path) -> None:
    files = sorted(
        p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUMS
    )
    payload = {"algorithm": "sha256", "format_version": WORLD_FORMAT_VERSION,
               "files": {rel: file_sha256(directory / rel) for rel in files}}
    tmp = directory / f".{CHECKSUMS}.tmp"
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    os.replace(tmp, directory / CHECKSUMS)


def verify_world(path: str | Path) -> str | None:
    """None if the world at `path` is complete and intact, else a short description of the problem."""
    path = Path(path)
    if not path.is_dir():
        return "missing"
    try:
        data = json.loads((path / CHECKSUMS).read_text())
        files = data["files"]
    except FileNotFoundError:
        return f"no {CHECKSUMS} (incomplete build)"
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable {CHECKSUMS}: {e}"
    missing = [f for f in REQUIRED_FILES if f not in files]
    if missing:
        return f"{CHECKSUMS} does not list {missing}"
    for rel, digest in files.items():
        p = path / rel
        if not p.is_file():
            return f"missing file {rel}"
        if file_sha256(p) != digest:
            return f"checksum mismatch in {rel}"
    return None


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (POSIX flock; a no-op where fcntl is unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------------------------
# Build


def build_world(
    preset_or_cfg: str | WorldConfig,
    cache_dir: str | Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
    device: str | None = None,
) -> Path:
    """Return the world's directory, building it first if it is missing, incomplete or corrupt (or if `force`).

    A preset with a shipped build returns the shipped directory (nothing is built) unless `force` is given: then this
    machine's build is made in the cache (`world:<preset>@local`). `device` trains on another device (e.g. "cuda"
    for design sweeps); the report records it. The cache key stays the config hash, so keep such builds in their own
    cache directory if bit-identity with CPU builds matters."""
    if not force:
        found = locate_world(preset_or_cfg, cache_dir)
        if found.source == "shipped":
            return found.path
    cfg = resolve_config(preset_or_cfg)
    final = world_dir(cfg, cache_dir)
    say = progress or (lambda _msg: None)
    if not force and verify_world(final) is None:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final.parent / f".{final.name}.lock"):
        problem = verify_world(final)
        if problem is None and not force:  # another process finished it while we waited
            return final
        # Leftovers of killed builds of this world (anyone building it would hold the lock we now hold).
        for stale in final.parent.glob(f".tmp-{final.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in final.parent.glob(f".trash-{final.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            say(f"world {final} {'is rebuilt (force)' if force else f'needs a rebuild: {problem}'}")
            logger.info("rebuilding world %s (%s)", final, "force" if force else problem)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shared cache should be readable by others
        try:
            _build_into(cfg, tmp, say, progress, device)
            trash = None
            if final.exists():
                trash = final.with_name(f".trash-{final.name}-{uuid.uuid4().hex[:8]}")
                os.replace(final, trash)
            os.replace(tmp, final)
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    say(f"world ready at {final}")
    return final


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and warnings during a build (library code must not print)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _build_into(cfg: WorldConfig, out: Path, say: Progress, progress: Progress | None, device: str | None = None
                ) -> None:
    import torch

    from seqedit.world import generator
    from seqedit.world import train as _train  # attribute lookups at call time, so tests can patch train_model

    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        stack.callback(torch.set_num_threads, torch.get_num_threads())
        if cfg.torch_threads is not None:
            torch.set_num_threads(cfg.torch_threads)
        stack.enter_context(_quiet_transformers())
        say(f"generating world {cfg.name!r} (seed {cfg.seed}, {cfg.n_subjects} subjects)")
        world = generator.generate_world(cfg)
        tokenizer = _train.train_tokenizer(
            world.tokenizer_corpus(), cfg.vocab_size, cfg.min_frequency, model_max_length=cfg.n_positions)
        say(f"{len(world.facts)} facts, {len(world.records)} edit records; tokenizer vocab {len(tokenizer)}")
        edit_pairs = [(r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"]),
                       r["requested_rewrite"]["target_true"]["str"]) for r in world.records]
        edit_pairs = edit_pairs[:: max(1, len(edit_pairs) // 400)]  # progress checks on a fixed ~400-fact subset
        say(f"training GPT-2 {cfg.n_layer}L x {cfg.n_embd} for {cfg.epochs} epochs")
        model, stats = _train.train_model(
            cfg, world, tokenizer, progress=progress,  # in-training recall checks only when someone watches
            eval_fn=lambda m: _train.recall(m, tokenizer, edit_pairs)["exact"], device=device,
        )

        (out / "downstream").mkdir()
        (out / "world_config.json").write_text(json.dumps(
            {"format_version": WORLD_FORMAT_VERSION, "config_hash": cfg.config_hash(), "config": cfg.to_dict()},
            indent=1))
        (out / "counterfact.json").write_text(json.dumps(world.records, indent=1, ensure_ascii=False))
        _write_jsonl(out / "downstream" / "facts_mc.jsonl", world.facts_mc)
        _write_jsonl(out / "downstream" / "arithmetic.jsonl", world.arithmetic_mc)
        _write_jsonl(out / "downstream" / "ordering.jsonl", world.ordering_mc)
        heldout, heldout_tokens = _heldout_text(world, tokenizer, cfg.heldout_min_tokens)
        (out / "heldout.txt").write_text(heldout)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

        # Evaluate the reloaded files, so the report also vouches for the save/load round trip (BOS included).
        say("evaluating")
        model2, tok2 = _load_model_and_tokenizer(out)
        report = _evaluate(world, model2, tok2, _train)
        report.update({
            "preset": cfg.name, "config_hash": cfg.config_hash(), "format_version": WORLD_FORMAT_VERSION,
            "params": sum(p.numel() for p in model2.parameters()),
            "vocab_size": len(tok2), "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
            "n_subjects": len(world.subjects), "n_facts": len(world.facts), "n_records": len(world.records),
            "n_facts_mc": len(world.facts_mc), "heldout_tokens": heldout_tokens,
            "train": {"epochs": stats.epochs, "steps": stats.steps, "tokens": stats.tokens,
                      "final_loss": round(stats.final_loss, 4), "seconds": round(stats.seconds, 2)},
            "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
            "train_device": str(device or "cpu"),
            "build_seconds": round(time.perf_counter() - t0, 2),
        })
        (out / "report.json").write_text(json.dumps(report, indent=1))
        _write_checksums(out)  # last: its presence marks the world complete
        say(f"recall {report['recall_edit']:.3f} (paraphrase {report['recall_paraphrase']:.3f}); "
            f"downstream {report['downstream']}; built in {report['build_seconds']:.0f}s")


def _heldout_text(world, tokenizer, min_tokens: int) -> tuple[str, int]:
    words = max(100, min_tokens // 2)
    while True:
        docs = world.heldout_documents(words)
        n = sum(len(ids) for ids in tokenizer(docs, add_special_tokens=False)["input_ids"])
        if n >= min_tokens:
            return "".join(d + "\n" for d in docs), n
        words *= 2


def _evaluate(world, model, tokenizer, _train) -> dict[str, Any]:
    def fill(r: dict) -> tuple[str, str]:
        rw = r["requested_rewrite"]
        return rw["prompt"].format(rw["subject"]), rw["target_true"]["str"]

    edit = _train.recall(model, tokenizer, [fill(r) for r in world.records])
    para = _train.recall(model, tokenizer, [(p, r["requested_rewrite"]["target_true"]["str"])
                                            for r in world.records for p in r["paraphrase_prompts"]])
    every = _train.recall(model, tokenizer, [(t.format(f.subject), f.object)
                                             for f in world.facts for t in f.relation.templates])
    mc_facts = _train.recall(model, tokenizer, [(r["question"], r["choices"][r["label"]]) for r in world.facts_mc])
    subj_tokens = [len(tokenizer(" " + s.name, add_special_tokens=False)["input_ids"]) for s in world.subjects]
    return {
        "recall_edit": round(edit["exact"], 4),
        "recall_edit_first_token": round(edit["first_token"], 4),
        "recall_paraphrase": round(para["exact"], 4),
        "recall_all_templates": round(every["exact"], 4),
        "recall_facts_mc_prompts": round(mc_facts["exact"], 4),
        "downstream": {
            "facts_mc": round(_train.mc_accuracy(model, tokenizer, world.facts_mc), 4),
            "arithmetic": round(_train.mc_accuracy(model, tokenizer, world.arithmetic_mc), 4),
            "ordering": round(_train.mc_accuracy(model, tokenizer, world.ordering_mc), 4),
        },
        "subject_tokens_mean": round(sum(subj_tokens) / len(subj_tokens), 3),
        "subject_tokens_min": min(subj_tokens),
        "subject_tokens_max": max(subj_tokens),
    }


# ---------------------------------------------------------------------------------------------------------------
# Load


def _load_model_and_tokenizer(path: Path):
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    model = GPT2LMHeadModel.from_pretrained(path)
    model.eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    tokenizer.padding_side = "right"
    return model, tokenizer


@dataclass
class World:
    path: Path
    config: WorldConfig
    model: GPT2LMHeadModel
    tokenizer: PreTrainedTokenizerBase
    report: dict[str, Any] = field(default_factory=dict)
    source: str = "local"  # "shipped" (package data) | "local" (built on this machine)

    def identity(self) -> dict[str, Any]:
        """What a run records about its world: which preset and config, and exactly which build."""
        return {"preset": self.config.name, "config_hash": self.config.config_hash(), "source": self.source,
                "build_id": build_id(self.path), "path": str(self.path)}

    @property
    def counterfact_path(self) -> Path:
        return self.path / "counterfact.json"

    @property
    def downstream_dir(self) -> Path:
        return self.path / "downstream"

    @property
    def heldout_path(self) -> Path:
        return self.path / "heldout.txt"

    def records(self) -> list[dict]:
        """The CounterFact-format edit records."""
        return json.loads(self.counterfact_path.read_text())

    def downstream_tasks(self) -> dict[str, Path]:
        """Task name -> JSONL path of its held-out multiple-choice items."""
        return {p.stem: p for p in sorted(self.downstream_dir.glob("*.jsonl"))}


def load_world(
    preset_or_cfg: str | WorldConfig, cache_dir: str | Path | None = None, progress: Progress | None = None,
    device: str | None = None,
) -> World:
    """Load a world (model in eval mode on the CPU, tokenizer, report), building it first if needed (training on
    `device`, see `build_world`). A shipped preset loads its shipped build (checksums verified) unless the name ends
    in "@local"."""
    found = locate_world(preset_or_cfg, cache_dir)
    path = found.path if found.source == "shipped" else build_world(
        found.config, cache_dir=cache_dir, progress=progress, device=device)
    model, tokenizer = _load_model_and_tokenizer(path)
    stored = json.loads((path / "world_config.json").read_text())
    return World(path=path, config=WorldConfig.from_dict(stored["config"]), model=model, tokenizer=tokenizer,
                 report=json.loads((path / "report.json").read_text()), source=found.source)


def world_info(preset_or_cfg: str | WorldConfig, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """What `seqedit world info` shows: where the world lives (shipped or local), whether it is built and intact,
    its build id and report."""
    try:
        found = locate_world(preset_or_cfg, cache_dir)
    except WorldIntegrityError as e:
        cfg = resolve_config(preset_or_cfg)
        return {"preset": cfg.name, "config_hash": cfg.config_hash(), "source": "shipped", "path": None,
                "built": False, "problem": str(e), "build_id": None, "report": None}
    # locate_world has already checked a shipped build
    problem = None if found.source == "shipped" else verify_world(found.path)
    report = json.loads((found.path / "report.json").read_text()) if problem is None else None
    return {"preset": found.config.name, "config_hash": found.config.config_hash(), "source": found.source,
            "path": str(found.path), "built": problem is None, "problem": problem,
            "build_id": build_id(found.path) if problem is None else None, "report": report}


# The figures `seqedit world build <preset> --rebuild` compares between a local build and the shipped one.
COMPARED = ("recall_edit", "recall_paraphrase", "recall_all_templates", "recall_facts_mc_prompts",
            "downstream.facts_mc", "downstream.arithmetic", "downstream.ordering", "train.final_loss",
            "build_seconds")


def compare_reports(shipped: dict[str, Any], local: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(figure, shipped value, local value) for the figures in COMPARED."""
    def get(report: dict[str, Any], key: str) -> Any:
        for part in key.split("."):
            report = report.get(part) if isinstance(report, dict) else None
        return report

    return [(k, get(shipped, k), get(local, k)) for k in COMPARED]
