"""Edit-request loaders: CounterFact / MCF, zsRE (MEND split), EasyEdit JSON, plain JSONL and local `datasets`.

Everything here works offline. The file layouts are those of `memit.baulab.info/data/dsets/` and of EasyEdit /
KnowEdit (see /work/shared/reference/protocols-and-data.md §4-§5). Each record becomes one `EditRequest` whose
`prompt` holds "{}" where the subject goes and whose targets carry no leading space.

Reading and converting are separate: the *source* decides how records are read (a JSON list, JSON lines, or a
`datasets` dataset), the *format* decides how a record is turned into an `EditRequest` ("jsonl"/"hf" detect the
shape of every row). A malformed record raises `DataError` naming the source, the record index (0-based) and the
field, or, with `on_error="skip"`, is left out and reported in `LoadResult.skipped`.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seqedit.paths import expand_source
from seqedit.types import EditRequest

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("auto", "counterfact", "zsre", "easyedit", "jsonl", "hf")
ON_ERROR: tuple[str, ...] = ("raise", "skip")
ZSRE_TARGETS: tuple[str, ...] = ("alt", "answers")

# Files `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write; their presence marks a saved dataset folder.
_HF_DIR_MARKERS: tuple[str, ...] = ("dataset_info.json", "state.json", "dataset_dict.json")
_NQ_PREFIX = "nq question: "
# Field names of a native row (EditRequest's own fields); anything else in such a row is most likely a typo.
_NATIVE_FIELDS: tuple[str, ...] = tuple(EditRequest.__dataclass_fields__)
_EASYEDIT_KEYS: frozenset[str] = frozenset(
    {"ground_truth", "rephrase_prompt", "rephrase", "locality_prompt", "locality_ground_truth", "locality",
     "portability"}
)


class DataError(ValueError):
    """A record (or a whole file) does not match the expected layout."""


@dataclass(frozen=True)
class SkippedRecord:
    index: int  # 0-based position of the record in the source
    field: str  # dotted path of the offending field ("requested_rewrite.subject"), "<json>" or "<record>"
    reason: str


@dataclass(frozen=True)
class LoadResult:
    requests: tuple[EditRequest, ...]
    skipped: tuple[SkippedRecord, ...]
    format: str  # the format actually used (never "auto")
    source: str
    # Conversion choices worth recording with a run, e.g. {"zsre_target": "alt", "zsre_target_true": "pred"}.
    options: Mapping[str, str] = field(default_factory=dict)
    # Empty values of optional fields that were left out of kept records (see _optional_texts), one per value.
    dropped: tuple[SkippedRecord, ...] = ()


# The empty-optional-field rule: an empty or blank string inside an optional prompt list (CounterFact's paraphrase /
# neighbourhood / attribute / generation prompts, zsRE's rephrase) and an empty zsRE `loc` are left out and reported
# in LoadResult.dropped; the record is kept (its other prompts still measure it). Empty *required* fields (subject,
# prompt/src, targets, an answer that goes with a prompt) make the record malformed: data.on_error decides.
_DROPPED: contextvars.ContextVar[list[tuple[str, str]] | None] = contextvars.ContextVar("seqedit_dropped", default=None)


class _FieldError(Exception):
    """Raised inside a converter; the loader turns it into a DataError or a SkippedRecord."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"field {field_name!r} {reason}")
        self.field = field_name
        self.reason = reason


# --------------------------------------------------------------------------------------------------------------
# Field helpers. `None` counts as missing everywhere: `datasets` fills absent columns with None.


def _get(rec: Mapping[str, Any], key: str, path: str) -> Any:
    value = rec.get(key)
    if value is None:
        raise _FieldError(path, "missing")
    return value


def _text(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _FieldError(path, f"must be a string, got {type(value).__name__} {value!r:.80}")
    if not value.strip():
        raise _FieldError(path, "is empty")
    return value


def _req_text(rec: Mapping[str, Any], key: str, path: str | None = None) -> str:
    path = path or key
    return _text(_get(rec, key, path), path)


def _texts(value: Any, path: str) -> tuple[str, ...]:
    """A list of strings; a bare string counts as a list of one (EasyEdit stores single prompts as str)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (_text(value, path),)
    if not isinstance(value, (list, tuple)):
        raise _FieldError(path, f"must be a list of strings, got {type(value).__name__}")
    return tuple(_text(v, f"{path}[{i}]") for i, v in enumerate(value))


def _optional_texts(value: Any, path: str) -> tuple[str, ...]:
    """An optional list of prompts: like _texts, but empty / blank strings are left out and reported (see _DROPPED)."""
    if isinstance(value, (list, tuple)):
        kept = []
        for i, v in enumerate(value):
            if isinstance(v, str) and not v.strip():
                _note_dropped(f"{path}[{i}]", "is empty: left out of the list")
            else:
                kept.append(v)
        value = kept
    elif isinstance(value, str) and not value.strip():
        _note_dropped(path, "is empty: left out")
        return ()
    return _texts(value, path)


def _note_dropped(path: str, reason: str) -> None:
    notes = _DROPPED.get()
    if notes is not None:
        notes.append((path, reason))


def _target(value: Any, path: str) -> str:
    """A target string; also accepts CounterFact's {"str": ..., "id": ...} and alias lists (first alias wins)."""
    if isinstance(value, Mapping):
        return _target(_get(value, "str", f"{path}.str"), f"{path}.str")
    if isinstance(value, (list, tuple)):
        if not value:
            raise _FieldError(path, "is an empty list")
        return _target(value[0], f"{path}[0]")
    # Scoring code prepends the space itself (ROME convention), so a stored leading space would double it.
    return _text(value, path).lstrip()


def _case_id(rec: Mapping[str, Any], index: int) -> str:
    value = rec.get("case_id")
    if value is None:
        return str(index)
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value):
        raise _FieldError("case_id", f"must be an int or a non-empty string, got {value!r:.80}")
    return str(value)


def _template(text: str, subject: str, text_field: str) -> str:
    """Turn a filled-in prompt into a "{}" template by replacing the first occurrence of the subject.

    Only the first occurrence: the template then formats back to exactly the original text (MEMIT's
    `str.replace` would put "{}" at every occurrence and break `prompt.format(subject)`)."""
    if "{" in text or "}" in text:
        raise _FieldError(text_field, f"contains a literal brace, which would break the '{{}}' template: {text!r:.120}")
    if "{" in subject or "}" in subject:
        raise _FieldError("subject", f"contains a literal brace: {subject!r:.80}")
    pos = text.find(subject)
    if pos < 0:
        raise _FieldError("subject", f"{subject!r:.80} not found in {text_field} {text!r:.120}")
    return text[:pos] + "{}" + text[pos + len(subject):]


# --------------------------------------------------------------------------------------------------------------
# Record converters: one per row shape. Each takes (record, index) and returns an EditRequest or raises _FieldError.


def _from_counterfact(rec: Mapping[str, Any], index: int) -> EditRequest:
    rw = _get(rec, "requested_rewrite", "requested_rewrite")
    if not isinstance(rw, Mapping):
        raise _FieldError("requested_rewrite", f"must be an object, got {type(rw).__name__}")
    prompt = _req_text(rw, "prompt", "requested_rewrite.prompt")
    # Kept verbatim (some prompts carry text around the subject, e.g. "{}, who is a citizen of"); only "{}" is checked.
    if prompt.count("{}") != 1:
        raise _FieldError("requested_rewrite.prompt", f"must contain '{{}}' exactly once, got {prompt!r:.120}")
    true_raw = rw.get("target_true")
    relation = rw.get("relation_id")
    if relation is not None and not isinstance(relation, str):
        raise _FieldError("requested_rewrite.relation_id", f"must be a string, got {relation!r:.40}")
    return EditRequest(
        case_id=_case_id(rec, index),
        prompt=prompt,
        subject=_req_text(rw, "subject", "requested_rewrite.subject"),
        target_new=_target(_get(rw, "target_new", "requested_rewrite.target_new"), "requested_rewrite.target_new"),
        target_true=None if true_raw is None else _target(true_raw, "requested_rewrite.target_true"),
        relation_id=relation,
        paraphrase_prompts=_optional_texts(rec.get("paraphrase_prompts"), "paraphrase_prompts"),
        neighborhood_prompts=_optional_texts(rec.get("neighborhood_prompts"), "neighborhood_prompts"),
        attribute_prompts=_optional_texts(rec.get("attribute_prompts"), "attribute_prompts"),
        generation_prompts=_optional_texts(rec.get("generation_prompts"), "generation_prompts"),
    )


def _from_zsre(rec: Mapping[str, Any], index: int, zsre_target: str) -> EditRequest:
    subject = _req_text(rec, "subject")
    src = _req_text(rec, "src")
    if zsre_target == "alt":  # EasyEdit / MEND: the counterfactual alternative
        target_new = _target(_get(rec, "alt", "alt"), "alt")
    else:  # ROME / MEMIT: the first gold answer
        answers = _get(rec, "answers", "answers")
        if not isinstance(answers, (list, tuple)) or not answers:
            raise _FieldError("answers", f"must be a non-empty list, got {answers!r:.80}")
        target_new = _target(answers[0], "answers[0]")
    pred = rec.get("pred")
    neighbours: tuple[str, ...] = ()
    neighbour_targets: tuple[str, ...] = ()
    loc_raw = rec.get("loc")
    if isinstance(loc_raw, str) and not loc_raw.strip():
        _note_dropped("loc", "is empty: the record has no neighbourhood prompt")
        loc_raw = None
    if loc_raw is not None:
        loc = _req_text(rec, "loc")
        # "nq question: " is MEND's task marker for its T5/BART editor, not text a causal LM should see; the
        # question mark after the NQ question is what MEMIT appends before scoring the answer.
        question = loc[len(_NQ_PREFIX):] if loc.startswith(_NQ_PREFIX) else loc
        question = question.strip()
        if not question:
            raise _FieldError("loc", f"has no question after the {_NQ_PREFIX!r} prefix")
        neighbours = (question if question.endswith("?") else question + "?",)
        neighbour_targets = (_target(_get(rec, "loc_ans", "loc_ans"), "loc_ans"),)
    return EditRequest(
        case_id=_case_id(rec, index),
        prompt=_template(src, subject, "src"),
        subject=subject,
        target_new=target_new,
        target_true=None if pred is None else _target(pred, "pred"),
        paraphrase_prompts=_optional_texts(rec.get("rephrase"), "rephrase"),
        neighborhood_prompts=neighbours,
        neighborhood_targets=neighbour_targets,
    )


def _easyedit_locality(rec: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(prompts, answers) from flat `locality_prompt`/`locality_ground_truth` or nested
    `locality.Relation_Specificity` (a {prompt, ground_truth} object or a list of them, KnowEdit style)."""
    prompts: list[str] = []
    answers: list[str] = []

    def add(prompt_value: Any, truth_value: Any, p_path: str, t_path: str) -> None:
        if prompt_value is None:
            return
        if truth_value is None:
            raise _FieldError(t_path, f"missing (needed as the answer to {p_path})")
        if isinstance(prompt_value, str):
            prompts.append(_text(prompt_value, p_path))
            answers.append(_target(truth_value, t_path))  # alias lists: first alias
            return
        ps = _texts(prompt_value, p_path)
        if not isinstance(truth_value, (list, tuple)) or len(truth_value) != len(ps):
            raise _FieldError(t_path, f"must be a list with one answer per prompt in {p_path} ({len(ps)})")
        prompts.extend(ps)
        answers.extend(_target(t, f"{t_path}[{i}]") for i, t in enumerate(truth_value))

    add(rec.get("locality_prompt"), rec.get("locality_ground_truth"), "locality_prompt", "locality_ground_truth")
    nested = rec.get("locality")
    if nested is not None:
        if not isinstance(nested, Mapping):
            raise _FieldError("locality", f"must be an object, got {type(nested).__name__}")
        spec = nested.get("Relation_Specificity")
        items = [spec] if isinstance(spec, Mapping) else (spec or [])
        if not isinstance(items, (list, tuple)):
            raise _FieldError("locality.Relation_Specificity", "must be an object or a list of objects")
        for i, item in enumerate(items):
            base = "locality.Relation_Specificity" + ("" if isinstance(spec, Mapping) else f"[{i}]")
            if not isinstance(item, Mapping):
                raise _FieldError(base, f"must be an object, got {type(item).__name__}")
            add(_get(item, "prompt", f"{base}.prompt"), item.get("ground_truth"), f"{base}.prompt",
                f"{base}.ground_truth")
    return tuple(prompts), tuple(answers)


def _from_easyedit(rec: Mapping[str, Any], index: int) -> EditRequest:
    subject = _req_text(rec, "subject")
    prompt = _template(_req_text(rec, "prompt"), subject, "prompt")
    truth = rec.get("ground_truth")
    rephrase_key = "rephrase_prompt" if rec.get("rephrase_prompt") is not None else "rephrase"
    neighbours, neighbour_targets = _easyedit_locality(rec)
    return EditRequest(
        case_id=_case_id(rec, index),
        prompt=prompt,
        subject=subject,
        target_new=_target(_get(rec, "target_new", "target_new"), "target_new"),
        target_true=None if truth is None else _target(truth, "ground_truth"),
        paraphrase_prompts=_texts(rec.get(rephrase_key), rephrase_key),
        neighborhood_prompts=neighbours,
        neighborhood_targets=neighbour_targets,
    )


def _from_native(rec: Mapping[str, Any], index: int) -> EditRequest:
    unknown = sorted(k for k in rec if k not in _NATIVE_FIELDS and rec[k] is not None)
    if unknown:
        raise _FieldError(unknown[0], f"is not an EditRequest field; allowed: {', '.join(_NATIVE_FIELDS)}")
    prompt = _req_text(rec, "prompt")
    if prompt.count("{}") != 1:
        raise _FieldError("prompt", f"must contain '{{}}' exactly once, got {prompt!r:.120}")
    relation = rec.get("relation_id")
    if relation is not None and not isinstance(relation, str):
        raise _FieldError("relation_id", f"must be a string, got {relation!r:.40}")
    true_raw = rec.get("target_true")
    neighbours = _texts(rec.get("neighborhood_prompts"), "neighborhood_prompts")
    raw_targets = rec.get("neighborhood_targets")
    if raw_targets is None:
        neighbour_targets: tuple[str, ...] = ()
    elif isinstance(raw_targets, (list, tuple)):
        neighbour_targets = tuple(_target(t, f"neighborhood_targets[{i}]") for i, t in enumerate(raw_targets))
    else:
        raise _FieldError("neighborhood_targets", f"must be a list of strings, got {type(raw_targets).__name__}")
    if neighbour_targets and len(neighbour_targets) != len(neighbours):
        raise _FieldError(
            "neighborhood_targets", f"has {len(neighbour_targets)} entries for {len(neighbours)} neighborhood_prompts"
        )
    return EditRequest(
        case_id=_case_id(rec, index),
        prompt=prompt,
        subject=_req_text(rec, "subject"),
        target_new=_target(_get(rec, "target_new", "target_new"), "target_new"),
        target_true=None if true_raw is None else _target(true_raw, "target_true"),
        relation_id=relation,
        paraphrase_prompts=_optional_texts(rec.get("paraphrase_prompts"), "paraphrase_prompts"),
        neighborhood_prompts=neighbours,
        neighborhood_targets=neighbour_targets,
        attribute_prompts=_optional_texts(rec.get("attribute_prompts"), "attribute_prompts"),
        generation_prompts=_optional_texts(rec.get("generation_prompts"), "generation_prompts"),
    )


def _row_shape(rec: Mapping[str, Any]) -> str | None:
    """Which layout a single record has: "counterfact", "zsre", "easyedit", "native" or None."""
    present = {k for k, v in rec.items() if v is not None}
    if "requested_rewrite" in present:
        return "counterfact"
    if "src" in present and ({"loc", "alt", "answers"} & present):
        return "zsre"
    prompt = rec.get("prompt")
    if isinstance(prompt, str) and "{}" in prompt:
        return "native"
    if present & _EASYEDIT_KEYS or {"prompt", "target_new"} <= present:
        return "easyedit"
    return None


# --------------------------------------------------------------------------------------------------------------
# Readers: source -> (records, label used in messages).


def _read_json_records(path: Path) -> tuple[list[Any], dict[int, int]]:
    """A JSON list, or JSON lines. Returns the records and, for JSON lines, index -> 1-based line number.

    A line that is not valid JSON comes back as a `_BadLine` record so that skip mode can report it."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc
    head = text.lstrip()[:1]
    if head not in ("[", "{", ""):
        raise DataError(f"{path}: expected a JSON list or JSON lines of objects, file starts with {head!r}")
    if head == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON ({exc})") from exc
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records")
        return data, {}
    records: list[Any] = []
    lines: dict[int, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            record = _BadLine(f"invalid JSON ({exc.msg} at column {exc.colno})")
        lines[len(records)] = lineno
        records.append(record)
    return records, lines


@dataclass(frozen=True)
class _BadLine:
    reason: str


def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in _HF_DIR_MARKERS)


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Force `datasets`/`huggingface_hub` offline for the duration of a call.

    The env variables are read once at import, so setting them here would be too late; the libraries consult these
    module attributes at request time (huggingface_hub's HTTP layer refuses every request while they are True)."""
    import datasets.config as ds_config
    import huggingface_hub.constants as hub_constants

    saved = (ds_config.HF_HUB_OFFLINE, ds_config.HF_DATASETS_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    ds_config.HF_HUB_OFFLINE = ds_config.HF_DATASETS_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        ds_config.HF_HUB_OFFLINE, ds_config.HF_DATASETS_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _split_hf_spec(spec: str) -> tuple[str, str | None]:
    """"name_or_path[:split]" -> (name_or_path, split). An existing path wins over a ":split" reading."""
    if Path(spec).exists() or ":" not in spec:
        return spec, None
    name, split = spec.rsplit(":", 1)
    if not name or not split or "/" in split:
        return spec, None
    return name, split


def _read_hf(spec: str) -> list[Any]:
    import datasets

    name, split = _split_hf_spec(spec)
    if Path(name).is_dir():
        if not _is_hf_dir(Path(name)):
            raise FileNotFoundError(
                f"hf:{spec}: {name} is a folder but not a saved dataset (none of {', '.join(_HF_DIR_MARKERS)})"
            )
        ds = datasets.load_from_disk(name)
    else:
        try:
            with _hub_offline():
                ds = datasets.load_dataset(name, split=split)
        except (OSError, ValueError) as exc:  # ConnectionError/FileNotFoundError/DatasetNotFoundError are OSErrors
            raise FileNotFoundError(
                f"hf:{spec}: dataset {name!r} is not available locally and seqedit never downloads ({exc}). Provide it "
                f"either as a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` "
                f"(source 'hf:/path/to/folder[:split]') or pre-populate the Hugging Face cache on a machine with "
                f"network access (`datasets.load_dataset({name!r})`, then copy HF_HOME / HF_DATASETS_CACHE here)."
            ) from exc
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        splits = sorted(ds)
        if split is None:
            if len(splits) != 1:
                raise ValueError(f"hf:{spec}: dataset has splits {splits}; name one as 'hf:{name}:<split>'")
            split = splits[0]
        if split not in ds:
            raise ValueError(f"hf:{spec}: no split {split!r}; available: {splits}")
        ds = ds[split]
    elif split is not None and Path(name).is_dir():
        raise ValueError(f"hf:{spec}: {name} holds a single Dataset without splits; drop ':{split}'")
    return list(ds)


# --------------------------------------------------------------------------------------------------------------
# Public API


def load_requests(
    source: str | Path,
    format: str = "auto",  # noqa: A002 - mirrors DataConfig.format
    on_error: str = "raise",
    *,
    zsre_target: str = "alt",
) -> LoadResult:
    """Load edit requests from a file or a local `datasets` dataset.

    source: a .json/.jsonl file, a folder written by `save_to_disk`, or "hf:<name_or_path>[:<split>]".
    format: one of FORMATS; "auto" detects from the source and the first record.
    on_error: "raise" (DataError naming source, record index and field) or "skip" (reported in `skipped`).
    zsre_target: zsRE target_new: "alt" (EasyEdit/MEND) or "answers" (answers[0], ROME/MEMIT); target_true is `pred`.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; allowed: {', '.join(FORMATS)}")
    if on_error not in ON_ERROR:
        raise ValueError(f"unknown on_error {on_error!r}; allowed: {', '.join(ON_ERROR)}")
    if zsre_target not in ZSRE_TARGETS:
        raise ValueError(f"unknown zsre_target {zsre_target!r}; allowed: {', '.join(ZSRE_TARGETS)}")

    source_str = expand_source(str(source))  # as DataConfig does, for callers of the API (seqedit.paths)
    source = source_str
    lines: dict[int, int] = {}
    if source_str.startswith("hf:") or format == "hf":
        # format="hf" also takes a bare "<name_or_path>[:<split>]"
        label = source_str if source_str.startswith("hf:") else f"hf:{source_str}"
        records = _read_hf(label[3:])
        from_hf = True
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"edit-request source {source_str!r} does not exist")
        label = source_str
        from_hf = _is_hf_dir(path)
        if from_hf:
            records = _read_hf(source_str)
        elif path.is_dir():
            raise FileNotFoundError(
                f"{source_str} is a folder but not a saved dataset (none of {', '.join(_HF_DIR_MARKERS)}); "
                f"give a .json/.jsonl file or a `save_to_disk` folder"
            )
        else:
            records, lines = _read_json_records(path)

    if format == "auto":
        format = _detect_format(records, label, from_hf=from_hf, jsonl_ext=Path(source_str).suffix == ".jsonl")

    zsre_used = False

    def convert(rec: Mapping[str, Any], index: int) -> EditRequest:
        nonlocal zsre_used
        shape = format if format in ("counterfact", "zsre", "easyedit") else _row_shape(rec)
        if shape is None:
            raise _FieldError(
                "<record>",
                f"has an unknown row shape (keys {sorted(rec)}); expected EditRequest fields, a CounterFact "
                f"record (requested_rewrite), a zsRE record (src, loc) or an EasyEdit record (prompt, target_new, "
                f"ground_truth)",
            )
        if shape == "zsre":
            zsre_used = True
            return _from_zsre(rec, index, zsre_target)
        return _CONVERTERS[shape](rec, index)

    requests, skipped, dropped = _convert_all(records, convert, label, lines, on_error)
    options = {"zsre_target": zsre_target, "zsre_target_true": "pred"} if zsre_used else {}
    if skipped:
        log.warning("%s: skipped %d of %d records", label, len(skipped), len(records))
    return LoadResult(requests=requests, skipped=skipped, format=format, source=source_str, options=options,
                      dropped=dropped)


_CONVERTERS: dict[str, Callable[[Mapping[str, Any], int], EditRequest]] = {
    "counterfact": _from_counterfact,
    "easyedit": _from_easyedit,
    "native": _from_native,
}


def _detect_format(records: Sequence[Any], label: str, *, from_hf: bool, jsonl_ext: bool) -> str:
    if from_hf:
        return "hf"
    if jsonl_ext:
        return "jsonl"
    first = next((r for r in records if isinstance(r, Mapping)), None)
    if first is None:
        raise DataError(f"{label}: cannot detect the format: no JSON object records; pass format= one of "
                        f"{', '.join(FORMATS[1:])}")
    shape = _row_shape(first)
    if shape is None:
        raise DataError(
            f"{label}: cannot detect the format from the first record's keys {sorted(first)}; "
            f"pass format= one of {', '.join(FORMATS[1:])}"
        )
    return "jsonl" if shape == "native" else shape


def _convert_all(
    records: Sequence[Any],
    convert: Callable[[Mapping[str, Any], int], EditRequest],
    label: str,
    lines: Mapping[int, int],
    on_error: str,
) -> tuple[tuple[EditRequest, ...], tuple[SkippedRecord, ...], tuple[SkippedRecord, ...]]:
    requests: list[EditRequest] = []
    skipped: list[SkippedRecord] = []
    dropped: list[SkippedRecord] = []
    seen: dict[str, int] = {}
    for index, rec in enumerate(records):
        notes: list[tuple[str, str]] = []
        token = _DROPPED.set(notes)
        try:
            if isinstance(rec, _BadLine):
                raise _FieldError("<json>", rec.reason)
            if not isinstance(rec, Mapping):
                raise _FieldError("<record>", f"must be a JSON object, got {type(rec).__name__}")
            try:
                req = convert(rec, index)
            except ValueError as exc:  # EditRequest's own checks, should the converters have missed one
                raise _FieldError("<record>", str(exc)) from exc
            # Ledgers, resume and retention probes key on case_id, so it must be unique within a source.
            if req.case_id in seen:
                raise _FieldError("case_id", f"{req.case_id!r} repeats record {seen[req.case_id]}")
        except _FieldError as err:
            where = f"{label} record {index}" + (f" (line {lines[index]})" if index in lines else "")
            if on_error == "raise":
                raise DataError(f"{where}: field {err.field!r} {err.reason}") from None
            skipped.append(SkippedRecord(index=index, field=err.field, reason=err.reason))
            continue
        finally:
            _DROPPED.reset(token)
        seen[req.case_id] = index
        requests.append(req)
        dropped.extend(SkippedRecord(index=index, field=path, reason=reason) for path, reason in notes)
    return tuple(requests), tuple(skipped), tuple(dropped)


def order_requests(
    requests: Iterable[EditRequest],
    *,
    seed: int,
    shuffle: bool = True,
    start: int = 0,
    stop: int | None = None,
    unique_subjects: bool = False,
) -> tuple[EditRequest, ...]:
    """The edit stream: seeded permutation, then (optionally) first request per subject, then [start:stop].

    `random.Random(seed).shuffle` is used because its output for an int seed is fixed across platforms and
    Python versions (3.2+), and it touches no global RNG state. `stop` past the end is clamped like a slice.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    for name, value in (("start", start), ("stop", stop)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if stop is not None and stop < 0:
        raise ValueError(f"stop must be >= 0 or None, got {stop}")
    if stop is not None and stop < start:
        raise ValueError(f"stop ({stop}) must be >= start ({start})")

    items = list(requests)
    for i, r in enumerate(items):
        if not isinstance(r, EditRequest):
            raise TypeError(f"requests[{i}] is a {type(r).__name__}, not an EditRequest")
    if shuffle:
        random.Random(seed).shuffle(items)
    if unique_subjects:
        seen: set[str] = set()
        kept = []
        for r in items:
            if r.subject not in seen:
                seen.add(r.subject)
                kept.append(r)
        items = kept
    if start > len(items):
        what = " after unique_subjects" if unique_subjects else ""
        raise ValueError(f"start ({start}) is past the end of the {len(items)} requests{what}")
    return tuple(items[start:stop])
