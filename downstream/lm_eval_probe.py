"""Downstream accuracy with lm-evaluation-harness, run in-process on the live (edited) model.

The probe wraps the driver's model and tokenizer in lm-eval's `HFLM` without copying or moving the model, runs
`simple_evaluate` on a fixed item subset with a fixed seed, and returns `downstream/<task>/<metric>` metrics plus
optional per-item rows. What it guarantees to the driver:

- no stale results: lm-eval's response cache and request cache stay off, so a weight change shows in the next check;
- the model comes back as it went in: the same object, device and dtype, every module's train/eval flag restored;
- the driver's random streams (python, numpy, torch) are restored: `simple_evaluate` reseeds them globally;
- no implicit downloads: all task data is loaded once, in `check()`, with the Hub forced offline.

Tokenisation follows seqedit.scoring: prompt ids are `tokenizer(prompt)` (BOS included when the tokenizer adds one),
the target is `" " + choice` tokenised without special tokens. lm-eval does the same for multiple-choice items
(`add_bos_token` is set to what the tokenizer does); for rolling log-likelihood (perplexity) lm-eval 0.4.13 would put
a second BOS after its BOS prefix, so `_LiveHFLM` encodes documents without special tokens there.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import random
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import yaml

from seqedit.downstream.suites import (
    LM_EVAL_TASK_DIRS,
    LOCAL_VARIANTS,
    ResolvedTask,
    resolve_tasks,
    unknown_task_error,
)
from seqedit.paths import expand_optional
from seqedit.probe_api import ProbeContext, ProbeResult, register_probe

log = logging.getLogger(__name__)

# Metric values lm-eval reports per item that are not correctness (perplexity items are (loglik, count) pairs).
_PAIR_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


class DownstreamDataError(RuntimeError):
    """A task's data is not available locally; the message names the task and how to provide the data."""


# ---------------------------------------------------------------------------------------------------------------
# lm-eval model wrapper


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """True if `tokenizer(text)` starts with the BOS token (the convention seqedit.scoring follows)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def model_max_length(model: Any, requested: int | None = None) -> int:
    """Context length for lm-eval: the model's position limit, or `requested` if smaller."""
    cfg = getattr(model, "config", None)
    limit = None
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            limit = value
            break
    if requested is not None:
        if requested < 2:
            raise ValueError(f"downstream max_length={requested}; must be >= 2")
        limit = requested if limit is None else min(limit, requested)
    return limit if limit is not None else 2048


def _live_hflm_class() -> type:
    from lm_eval.models.huggingface import HFLM

    class _LiveHFLM(HFLM):
        """HFLM on an in-memory model; rolling log-likelihood encodes documents without special tokens (lm-eval
        already prefixes BOS there, a tokenizer-added BOS would be scored as a second token)."""

        _rolling = False

        # lm-eval passes disable_tqdm=False explicitly in places, which beats TQDM_DISABLE: probes run hundreds of
        # times, so their progress bars stay off.
        def loglikelihood(self, requests: list, disable_tqdm: bool = True) -> list:
            return super().loglikelihood(requests, disable_tqdm=True)

        def generate_until(self, requests: list, disable_tqdm: bool = True) -> list:
            return super().generate_until(requests, disable_tqdm=True)

        def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = True, **kwargs: Any) -> list:
            return super()._loglikelihood_tokens(requests, disable_tqdm=True, **kwargs)

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            if self._rolling and add_special_tokens is None:
                add_special_tokens = False
            return super().tok_encode(string, add_special_tokens=add_special_tokens, **kwargs)

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            self._rolling = True
            try:
                return super().loglikelihood_rolling(requests, disable_tqdm=True)
            finally:
                self._rolling = False

    return _LiveHFLM


def make_lm(model: Any, tokenizer: Any, batch_size: int = 32, max_length: int | None = None) -> Any:
    """Wrap the live `model` for lm-eval (HFLM, no copy, no move). HFLM calls `model.eval()`: callers restore modes.

    `tokenizer` may be mutated by lm-eval (it sets a pad token when there is none): pass a copy you own."""
    cls = _live_hflm_class()
    lm = cls(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        max_length=model_max_length(model, max_length),
        add_bos_token=tokenizer_adds_bos(tokenizer),
    )
    if lm.model is not model:  # guards the "no copy" contract against a future lm-eval change
        raise RuntimeError("lm-eval's HFLM replaced the model object; downstream probe refuses to evaluate a copy")
    return lm


# ---------------------------------------------------------------------------------------------------------------
# State guards


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Force Hugging Face Hub/datasets offline for the block (module flags, read at call time), whatever the env."""
    import datasets.config as dconfig
    from huggingface_hub import constants as hconst

    saved = (hconst.HF_HUB_OFFLINE, dconfig.HF_HUB_OFFLINE, getattr(dconfig, "HF_DATASETS_OFFLINE", None))
    hconst.HF_HUB_OFFLINE = True
    dconfig.HF_HUB_OFFLINE = True
    dconfig.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hconst.HF_HUB_OFFLINE, dconfig.HF_HUB_OFFLINE, dconfig.HF_DATASETS_OFFLINE = saved


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """simple_evaluate reseeds python/numpy/torch globally; put the driver's streams back afterwards."""
    py = random.getstate()
    npy = np.random.get_state()
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def preserved_model(model: Any) -> Iterator[None]:
    """Restore every module's train/eval flag; fail loudly if the parameters moved or changed dtype."""
    modes = [(m, m.training) for m in model.modules()]
    placement = [(n, p.device, p.dtype, p.data_ptr()) for n, p in model.named_parameters()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training  # per module: model.train(flag) would flatten mixed modes
    after = {n: (p.device, p.dtype, p.data_ptr()) for n, p in model.named_parameters()}
    for name, device, dtype, ptr in placement:
        if after.get(name) != (device, dtype, ptr):
            raise RuntimeError(
                f"downstream probe: parameter {name!r} changed placement during lm-eval "
                f"({device}/{dtype} -> {after.get(name)}); the live model must not be moved, cast or re-tied"
            )


@contextlib.contextmanager
def no_request_bars() -> Iterator[None]:
    """lm-eval's Task.build_all_requests draws a progress bar per task per call with no way to turn it off (only
    TQDM_DISABLE, read when tqdm is imported). Silence it for the block; restored afterwards."""
    import lm_eval.api.task as task_module

    original = getattr(task_module, "tqdm", None)
    if original is None:  # a later lm-eval moved it: nothing to silence here
        yield
        return
    task_module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        task_module.tqdm = original


@contextlib.contextmanager
def quiet_logger(name: str, level: int) -> Iterator[None]:
    logger = logging.getLogger(name)
    saved = logger.level
    logger.setLevel(max(level, saved) if saved else level)
    try:
        yield
    finally:
        logger.setLevel(saved)


# ---------------------------------------------------------------------------------------------------------------
# Task set-up (once per probe instance)


@dataclass
class _Prepared:
    task_manager: Any
    tasks: dict[str, Any]  # lm-eval task name -> loaded Task (data already in memory)
    samples: dict[str, list[int]]  # task name -> item indices scored at every check
    include_dir: Path


def _world_paths(world: Any, data_dir: str | None, heldout: str | None) -> tuple[Path | None, Path | None]:
    root = Path(data_dir) if data_dir else None
    if root is None and world is not None:
        d = getattr(world, "downstream_dir", None)
        if d is None and getattr(world, "root", None) is not None:
            d = Path(world.root) / "downstream"
        root = Path(d) if d is not None else None
    held = Path(heldout) if heldout else None
    if held is None and world is not None and getattr(world, "heldout_path", None) is not None:
        held = Path(world.heldout_path)
    if held is None and root is not None:
        held = root / "heldout.txt"
    return root, held


def _text_to_jsonl(src: Path, dst: Path) -> int:
    """One {"text"} row per non-blank line (blank lines would be empty documents counted against the limit)."""
    n = 0
    with src.open(encoding="utf-8") as fin, dst.open("w", encoding="utf-8") as fout:
        for line in fin:
            line = line.strip()
            if line:
                fout.write(json.dumps({"text": line}) + "\n")
                n += 1
    return n


def _target_rule(yaml_path: Path) -> tuple[str, Any] | None:
    """(label field, choices) of a bundled multiple-choice YAML: choices is a fixed list of strings or the name of a
    per-row list field. None for other output types (rolling log-likelihood has no labels)."""
    spec = yaml.safe_load(yaml_path.read_text()) or {}
    if spec.get("output_type") != "multiple_choice":
        return None
    target, choices = spec.get("doc_to_target"), spec.get("doc_to_choice")
    if not isinstance(target, str) or not isinstance(choices, (str, list)):
        return None
    return target, choices


def _label_index(value: Any, choices: Sequence[str]) -> int | None:
    """The choice index `value` stands for, or None when it names none.

    The rule (issue #12): an int in 0..k-1 is used as is; a string holding such an int ("1", " 0 "), an integral
    float (1.0, as pandas writes ints next to NaNs) or exactly one of the choice words ("positive") is mapped to it.
    Everything else is refused: bools (True is 1 in Python but "True" is choice 0 of RTE), other strings, other
    numbers (GLUE's unlabelled test split uses -1), null."""
    k = len(choices)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value < k else None
    if isinstance(value, float):
        return int(value) if value.is_integer() and 0 <= value < k else None
    if isinstance(value, str):
        text = value.strip()
        if text.isdecimal() and int(text) < k:
            return int(text)
        if value in choices:
            return list(choices).index(value)
    return None


def _allowed_labels(choices: Sequence[str]) -> str:
    return ", ".join(f"{i} ({c!r})" for i, c in enumerate(choices))


def _missing(task: ResolvedTask, what: str, how: str) -> DownstreamDataError:
    origin = f" (from {task.requested_as!r})" if task.requested_as and task.requested_as != task.name else ""
    return DownstreamDataError(f"downstream task {task.name!r}{origin}: {what}. {how}")


@register_probe("downstream")
class DownstreamProbe:
    """lm-eval tasks on the live model. Construct with a `Config`; call `check(world)` at start-up (it loads every
    task's data, offline, and raises `DownstreamDataError` naming what is missing); then call it like any probe.
    `check` runs implicitly on the first call if the driver did not call it."""

    name: ClassVar[str] = "downstream"
    cost: ClassVar[str] = "expensive"

    @dataclass(frozen=True)
    class Config:
        tasks: tuple[str, ...] = ("world",)  # suites (world, glue4, nli_mmlu_lite), bundled/local tasks, lm-eval names
        limit: int | None = None  # items per task; None = each suite's own limit (bare lm-eval tasks: 200)
        seed: int = 1234  # lm-eval's random/numpy/torch/few-shot seeds
        batch_size: int = 32  # items per forward pass
        num_fewshot: int | None = None  # None = the task's default (0 for bundled tasks)
        log_items: bool = False  # per-item rows (lm-eval log_samples=True)
        max_length: int | None = None  # context cap; always <= the model's position limit
        data_dir: str | None = None  # world task files; default: the world's downstream dir
        heldout_path: str | None = None  # world_perplexity text; default: the world's heldout.txt
        local_data_dir: str | None = None  # <task>.jsonl files for suites' local variants (offline clusters)
        lm_eval_log_level: str = "ERROR"  # lm-eval logs per-call warnings (model not a str, few-shot overrides)

        def __post_init__(self) -> None:
            for key in ("data_dir", "heldout_path", "local_data_dir"):  # ~ expanded once, here (seqedit.paths)
                object.__setattr__(self, key, expand_optional(getattr(self, key)))
            if self.limit is not None and self.limit < 1:
                raise ValueError(f"limit={self.limit}; must be >= 1 or null")
            if self.batch_size < 1:
                raise ValueError(f"batch_size={self.batch_size}; must be >= 1")
            if self.num_fewshot is not None and self.num_fewshot < 0:
                raise ValueError(f"num_fewshot={self.num_fewshot}; must be >= 0 or null")
            if not isinstance(logging.getLevelName(self.lm_eval_log_level.upper()), int):
                raise ValueError(f"lm_eval_log_level={self.lm_eval_log_level!r}; allowed: DEBUG, INFO, WARNING, ERROR")
            # Cheap and lm-eval-free: typos in our own names (suites, world_*, *_local) fail at config validation,
            # before a model loads. lm-eval task names are checked against its index in check().
            resolve_tasks(self.tasks, self.limit, self.local_data_dir)

    def __init__(self, config: DownstreamProbe.Config | None = None) -> None:
        self.config = config or self.Config()
        self.tasks: tuple[ResolvedTask, ...] = resolve_tasks(
            self.config.tasks, self.config.limit, self.config.local_data_dir
        )
        self._prepared: _Prepared | None = None
        # What check() changed in the user's data (label mappings), one sentence each: the driver reports them.
        self.notes: list[str] = []
        self._tokenizers: dict[int, Any] = {}  # id(driver tokenizer) -> our copy (lm-eval may set a pad token)

    # -- start-up ---------------------------------------------------------------------------------------------
    def check(self, world: Any = None) -> list[str]:
        """Verify every task's data is available locally and load it (once). Returns the task names to be run.

        `world` is the seqedit.world.World (or anything with a `.world`, such as model_io's LoadedModel; None for
        models that are not world models). Raises ValueError for unknown task names (did-you-mean) and
        DownstreamDataError for missing data."""
        if self._prepared is None:
            if world is not None and not hasattr(world, "downstream_dir") and hasattr(world, "world"):
                world = world.world  # a LoadedModel: the driver passes what load_model returned
            self._prepared = self._prepare(world)
        return list(self._prepared.tasks)

    validate = check

    def _prepare(self, world: Any) -> _Prepared:
        from lm_eval.tasks import TaskManager

        cfg = self.config
        include = Path(tempfile.mkdtemp(prefix="seqedit-lm-eval-"))
        weakref.finalize(self, shutil.rmtree, include, True)
        cache_dir = include / "hf-datasets-cache"  # json/text datasets are converted here, not in ~/.cache
        world_root, heldout = _world_paths(world, cfg.data_dir, cfg.heldout_path)

        lm_eval_names = [t.name for t in self.tasks if t.source == "lm_eval"]
        for t in self.tasks:
            if t.source == "lm_eval":
                continue
            data = self._checked_labels(t, self._data_file(t, world_root, heldout, include), include)
            body: dict[str, Any] = {
                "include": str(t.yaml),
                "task": t.name,
                "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(cache_dir)},
            }
            if t.description is not None:
                body["description"] = t.description
            (include / f"{t.name}.yaml").write_text(yaml.safe_dump(body, sort_keys=False))

        # Index only what is needed: our generated folder, plus lm-eval's folders for known suite tasks; the full
        # built-in index (~10 s) only when some other lm-eval name is asked for.
        from lm_eval import tasks as lm_tasks

        builtin = Path(lm_tasks.__file__).resolve().parent
        dirs = sorted({LM_EVAL_TASK_DIRS[n] for n in lm_eval_names if n in LM_EVAL_TASK_DIRS})
        full = any(n not in LM_EVAL_TASK_DIRS for n in lm_eval_names)
        paths = [include] + [builtin / d for d in dirs]
        tm = TaskManager(include_path=[str(p) for p in paths], include_defaults=full)
        for n in lm_eval_names:
            if n not in tm.all_tasks:
                raise unknown_task_error(n, tm.all_tasks if full else TaskManager().all_tasks)
            if n in tm.all_groups or n in tm.all_tags:
                raise ValueError(
                    f"downstream task {n!r} is an lm-eval group/tag; list its tasks (or use a suite) so each has its "
                    f"own limit and metrics"
                )

        loaded: dict[str, Any] = {}
        samples: dict[str, list[int]] = {}
        with hub_offline(), quiet_logger("lm_eval", self._log_level()):
            for t in self.tasks:
                try:
                    task = tm.load([t.name])["tasks"][t.name]
                except Exception as e:  # noqa: BLE001 - any load failure is reported with the task and the remedy
                    raise self._load_error(t, e) from e
                n_docs = len(task.eval_docs)
                if n_docs == 0:
                    raise _missing(t, "its evaluation split is empty", "Check the data file")
                loaded[t.name] = task
                samples[t.name] = list(range(min(t.limit, n_docs)))  # the same first items at every check
        return _Prepared(tm, loaded, samples, include)

    def _data_file(self, t: ResolvedTask, world_root: Path | None, heldout: Path | None, include: Path) -> Path:
        assert t.data_file is not None
        if t.source == "world":
            if t.name == "world_perplexity":
                if heldout is None:
                    raise _missing(t, "no held-out text known",
                                   "Run on a world model (model.name=world:<preset>) or set heldout_path")
                if not heldout.is_file():
                    raise _missing(t, f"held-out text {str(heldout)!r} not found",
                                   "Rebuild the world or set heldout_path to a text file (one document per line)")
                dst = include / "world_perplexity.jsonl"
                if _text_to_jsonl(heldout, dst) == 0:
                    raise _missing(t, f"{str(heldout)!r} has no non-blank lines", "Give a text with documents")
                return dst
            if world_root is None:
                raise _missing(t, "no world data directory known",
                               "Run on a world model (model.name=world:<preset>) or set data_dir to a folder with "
                               f"{t.data_file}")
            path = world_root / t.data_file
            if not path.is_file():
                raise _missing(t, f"data file {str(path)!r} not found",
                               f"The world writes {t.data_file} under its downstream dir; rebuild the world or set "
                               "data_dir")
            return path
        # local variant of a suite task
        base = next((b for b, v in LOCAL_VARIANTS.items() if v.task == t.name), t.name)
        fields = LOCAL_VARIANTS[base].fields if base in LOCAL_VARIANTS else "the task's fields"
        if self.config.local_data_dir is None:
            raise _missing(t, "needs local data but local_data_dir is not set",
                           f"Set local_data_dir to a folder with {t.data_file} (JSONL rows {fields})")
        path = Path(self.config.local_data_dir) / t.data_file
        if not path.is_file():
            raise _missing(t, f"local data file {str(path)!r} not found",
                           f"Put {t.data_file} (JSONL rows {fields}) in local_data_dir")
        return path

    def _checked_labels(self, t: ResolvedTask, path: Path, include: Path) -> Path:
        """Check every row's label against the task's choices (before lm-eval sees the file: it scores a label it
        cannot match, e.g. the string "1" against choices ["no", "yes"], as wrong on every item, silently).

        Labels that `_label_index` maps are rewritten as ints into a copy under `include` (the user's file is never
        changed) and reported in `self.notes`; any other label raises DownstreamDataError naming the file, the line,
        the value and the allowed values. Returns the file lm-eval should read."""
        assert t.yaml is not None
        rule = _target_rule(t.yaml)
        if rule is None:
            return path
        field_name, choice_spec = rule
        rows: list[dict[str, Any]] = []
        mapped: dict[str, int] = {}  # repr(value) -> index
        n_mapped = 0
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{str(path)!r} line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise _missing(t, f"{where} is not JSON ({e.msg})", "Give one JSON object per line") from None
            if not isinstance(row, dict):
                raise _missing(t, f"{where} is a {type(row).__name__}, not a JSON object", "Give one object per line")
            if isinstance(choice_spec, str):  # per-row choices (the world tasks)
                choices = row.get(choice_spec)
                if not isinstance(choices, list) or not choices:
                    raise _missing(t, f"{where}: field {choice_spec!r} is {choices!r:.80}, not a list of choices",
                                   "Give every row its list of choices")
            else:
                choices = choice_spec
            value = row.get(field_name)
            index = _label_index(value, choices)
            if index is None:
                raise _missing(t, f"{where}: label field {field_name!r} = {value!r:.80} is not one of the task's "
                                  f"choices; allowed: {_allowed_labels(choices)}",
                               "Write the choice index as an int (a string holding it, e.g. \"1\", or the choice "
                               "word itself is mapped to it)")
            if type(value) is not int:
                mapped.setdefault(repr(value), index)
                n_mapped += 1
                row = {**row, field_name: index}
            rows.append(row)
        if not n_mapped:
            return path
        dst = include / f"{t.name}.labels.jsonl"
        dst.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        pairs = ", ".join(f"{k} -> {v}" for k, v in sorted(mapped.items(), key=lambda kv: kv[1]))
        self.notes.append(f"downstream task {t.name!r}: {str(path)!r}: {n_mapped} of {len(rows)} labels in field "
                          f"{field_name!r} were not ints and were mapped to choice indices ({pairs})")
        return dst

    def _load_error(self, t: ResolvedTask, e: Exception) -> Exception:
        if t.source != "lm_eval":
            return _missing(t, f"could not load its data ({type(e).__name__}: {e})", "Check the JSONL rows")
        local = LOCAL_VARIANTS.get(t.name)
        how = (
            f"Set local_data_dir to a folder with {local.data_file} (JSONL rows {local.fields}) to run "
            f"{local.task} instead, or pre-download the dataset into the Hugging Face cache on a machine with network"
            if local is not None
            else "Pre-download its dataset into the Hugging Face cache (HF_HOME) on a machine with network"
        )
        return _missing(t, f"its dataset is not in the local Hugging Face cache and downloads are off "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", how)

    def _log_level(self) -> int:
        return int(logging.getLevelName(self.config.lm_eval_log_level.upper()))

    def _tokenizer_copy(self, tokenizer: Any) -> Any:
        key = id(tokenizer)
        if key not in self._tokenizers:
            self._tokenizers = {key: copy.deepcopy(tokenizer)}  # one tokenizer per run; drop stale ones
        return self._tokenizers[key]

    # -- a check ----------------------------------------------------------------------------------------------
    def __call__(self, ctx: ProbeContext) -> ProbeResult:
        prepared = self._prepared or self._prepare(ctx.world)
        self._prepared = prepared
        cfg = self.config
        model = ctx.model
        with (
            preserved_model(model),
            preserved_rng(),
            hub_offline(),
            quiet_logger("lm_eval", self._log_level()),
            no_request_bars(),
        ):
            lm = make_lm(model, self._tokenizer_copy(ctx.tokenizer), cfg.batch_size, cfg.max_length)
            out = run_lm_eval(lm, prepared.tasks, prepared.samples, seed=cfg.seed, num_fewshot=cfg.num_fewshot,
                              log_samples=cfg.log_items)
            if lm.model is not model:
                raise RuntimeError("lm-eval swapped the model object during evaluation")
        return ProbeResult(metrics_from_results(out), items_from_results(out) if cfg.log_items else ())


def run_lm_eval(
    lm: Any,
    tasks: Mapping[str, Any],
    samples: Mapping[str, list[int]],
    *,
    seed: int,
    num_fewshot: int | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """`simple_evaluate` on already-loaded tasks, minus its per-call environment report.

    simple_evaluate (0.4.13) ends with `add_env_info`, which runs `pip list` and friends in subprocesses (~1 s per
    call here) and a `git` lookup; a probe that runs hundreds of times cannot afford that. This applies the same
    settings simple_evaluate would (global seeds, num_fewshot override rule, few-shot seed) and calls
    `lm_eval.evaluator.evaluate` with caching off and bootstrap_iters=0. Callers restore the global RNG state."""
    from lm_eval.evaluator import evaluate
    from lm_eval.utils import set_torch_seed

    random.seed(seed)
    np.random.seed(seed)
    set_torch_seed(seed)
    for task in tasks.values():
        if num_fewshot is not None:
            if task.get_config("num_fewshot") != 0:  # lm-eval's rule: a task that pins 0 shots keeps it
                task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=seed)
    out = evaluate(
        lm=lm,
        task_dict={"tasks": dict(tasks), "groups": {}, "group_map": {}},
        samples={k: list(v) for k, v in samples.items()},
        cache_requests=False,  # nothing is cached across checks: results must follow the weights
        bootstrap_iters=0,
        log_samples=log_samples,
    )
    if out is None:
        raise RuntimeError("lm-eval returned no results (not rank 0?)")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Result parsing


def _metric_key(raw: str) -> str | None:
    """"acc,none" -> "acc"; "exact_match,strict-match" -> "exact_match_strict-match"; stderr/alias -> None."""
    metric, _, filt = raw.partition(",")
    if metric == "alias" or metric.endswith("_stderr") or not filt and metric in ("name", "sample_len"):
        return None
    return metric if filt in ("", "none") else f"{metric}_{filt}"


def metrics_from_results(out: Mapping[str, Any]) -> dict[str, float | None]:
    metrics: dict[str, float | None] = {}
    n_samples = out.get("n-samples", {})
    for task, values in out["results"].items():
        for raw, value in values.items():
            key = _metric_key(raw)
            if key is None:
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                v = float(value)
                metrics[f"downstream/{task}/{key}"] = v if v == v else None  # NaN (e.g. mcc of one class) -> None
        n = n_samples.get(task, {}).get("effective")
        if n is not None:
            metrics[f"downstream/{task}/n"] = float(n)
    return metrics


def items_from_results(out: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per scored item: {"task", "doc_id", "id"?, "correct"/"acc"/... or "loglikelihood" + counts}."""
    rows: list[dict[str, Any]] = []
    for task, samples in (out.get("samples") or {}).items():
        for s in samples:
            row: dict[str, Any] = {"task": task, "doc_id": int(s["doc_id"])}
            doc = s.get("doc") or {}
            if isinstance(doc, Mapping) and "id" in doc:
                row["id"] = doc["id"]
            for key in _sample_metric_keys(s):
                value = s[key]
                if key in _PAIR_METRICS and isinstance(value, Sequence) and len(value) == 2:
                    row["loglikelihood"] = float(value[0])
                    row["words" if key == "word_perplexity" else "bytes"] = int(value[1])
                elif isinstance(value, (int, float, bool)):
                    row[key] = float(value)
            if "acc" in row:
                row["correct"] = bool(row["acc"])
            rows.append(row)
    return rows


def _sample_metric_keys(sample: Mapping[str, Any]) -> list[str]:
    skip = {"doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics", "doc_hash",
            "prompt_hash", "target_hash"}
    names = sample.get("metrics")
    if isinstance(names, Sequence) and not isinstance(names, str):
        return [n for n in names if n in sample]
    return [k for k in sample if k not in skip]
