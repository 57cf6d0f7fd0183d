"""Named downstream suites and task resolution.

A task name given to the downstream probe is one of:
- a suite name (`world`, `glue4`, `nli_mmlu_lite`): expands to its tasks, each with the suite's fixed item limit;
- a bundled synthetic-world task (`world_facts`, `world_arithmetic`, `world_ordering`, `world_perplexity`), reading the
  JSONL/text files a world writes under `<world dir>/downstream/`;
- a local-data variant of a suite task (`sst2_local`, ..., `mmlu_<subject>_local`), reading
  `<local_data_dir>/<task>.jsonl` with the GLUE/MMLU field names (same prompts and choices as lm-eval's task);
- any other lm-eval task name, passed through (its data must already be in the local Hugging Face cache).

Suite tasks become their local variants when `local_data_dir` is set, so offline clusters run the published item
sets. Nothing here imports lm-eval: resolving names is cheap and happens at config-validation time.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

Source = Literal["world", "local", "lm_eval"]

DEFAULT_LIMIT = 200  # items per task when neither the suite nor the config says otherwise


@dataclass(frozen=True)
class SuiteTask:
    """One task of a suite: the lm-eval task name and its item limit."""

    name: str
    limit: int


@dataclass(frozen=True)
class LocalVariant:
    """How to run an lm-eval task from local JSONL: the bundled YAML to include and the expected file name."""

    task: str  # the variant's own task name (what metrics are keyed by)
    yaml: str  # path under TASKS_DIR
    data_file: str  # file name under local_data_dir
    fields: str  # for error messages
    description: str | None = None  # overrides the YAML's description (MMLU subject line)


@dataclass(frozen=True)
class ResolvedTask:
    """A task ready to be set up: `name` is the lm-eval task name and the metric namespace
    (`downstream/<name>/<metric>`)."""

    name: str
    source: Source
    limit: int
    yaml: Path | None = None  # bundled YAML to include (world/local sources)
    data_file: str | None = None  # file name inside the data directory (world/local sources)
    description: str | None = None
    requested_as: str = ""  # the name the user wrote (suite or task), for error messages


# --- bundled synthetic-world tasks: name -> (yaml, data file under the world's downstream dir) --------------------
WORLD_TASKS: dict[str, tuple[str, str]] = {
    "world_facts": ("world/world_facts.yaml", "facts_mc.jsonl"),
    "world_arithmetic": ("world/world_arithmetic.yaml", "arithmetic.jsonl"),
    "world_ordering": ("world/world_ordering.yaml", "ordering.jsonl"),
    "world_perplexity": ("world/world_perplexity.yaml", "heldout.txt"),
}
WORLD_LIMITS = {"world_facts": 200, "world_arithmetic": 200, "world_ordering": 200, "world_perplexity": 100}

MMLU_LITE_SUBJECTS = ("high_school_mathematics", "high_school_biology", "world_religions", "marketing")

SUITES: dict[str, tuple[SuiteTask, ...]] = {
    "world": tuple(SuiteTask(n, WORLD_LIMITS[n]) for n in WORLD_TASKS),
    # The forgetting studies' GLUE-4 (GCF, r-ROME): SST-2, MRPC, CoLA, RTE, 200 items each.
    "glue4": tuple(SuiteTask(n, 200) for n in ("sst2", "mrpc", "cola", "rte")),
    # The unified/AlphaEdit/ENCORE style mix, kept small: NLI tasks and a few MMLU subjects.
    "nli_mmlu_lite": (
        SuiteTask("rte", 100),
        SuiteTask("mnli", 100),
        SuiteTask("anli_r1", 100),
        *(SuiteTask(f"mmlu_{s}", 50) for s in MMLU_LITE_SUBJECTS),
    ),
}


def _local_variants() -> dict[str, LocalVariant]:
    glue_fields = {
        "sst2": '{"sentence", "label"}',
        "mrpc": '{"sentence1", "sentence2", "label"}',
        "cola": '{"sentence", "label"}',
        "rte": '{"sentence1", "sentence2", "label"}',
        "mnli": '{"premise", "hypothesis", "label"}',
        "anli_r1": '{"premise", "hypothesis", "label"}',
    }
    out = {t: LocalVariant(f"{t}_local", f"local/{t}_local.yaml", f"{t}.jsonl", f) for t, f in glue_fields.items()}
    for s in MMLU_LITE_SUBJECTS:
        out[f"mmlu_{s}"] = LocalVariant(
            f"mmlu_{s}_local", "local/mmlu_local.yaml", f"mmlu_{s}.jsonl", '{"question", "choices", "answer"}',
            description=f"The following are multiple choice questions (with answers) about {s.replace('_', ' ')}.\n\n",
        )
    return out


LOCAL_VARIANTS: dict[str, LocalVariant] = _local_variants()  # keyed by the lm-eval task name
_BY_VARIANT = {v.task: base for base, v in LOCAL_VARIANTS.items()}

# lm-eval task folders that hold every suite task: indexing only these takes ~0 s instead of ~10 s for all tasks.
LM_EVAL_TASK_DIRS: dict[str, str] = {
    "sst2": "glue", "mrpc": "glue", "cola": "glue", "rte": "glue", "mnli": "glue",
    "anli_r1": "anli", **{f"mmlu_{s}": "mmlu/default" for s in MMLU_LITE_SUBJECTS},
}


def known_names() -> list[str]:
    """Every name resolvable without lm-eval's task index (suites, bundled and local tasks, suite tasks)."""
    names = set(SUITES) | set(WORLD_TASKS) | set(_BY_VARIANT) | set(LOCAL_VARIANTS)
    return sorted(names)


def _resolve_one(name: str, limit: int, use_local: bool, requested_as: str) -> ResolvedTask:
    if name in WORLD_TASKS:
        yaml, data = WORLD_TASKS[name]
        return ResolvedTask(name, "world", limit, TASKS_DIR / yaml, data, requested_as=requested_as)
    if name in _BY_VARIANT or (use_local and name in LOCAL_VARIANTS):
        v = LOCAL_VARIANTS[_BY_VARIANT.get(name, name)]
        return ResolvedTask(v.task, "local", limit, TASKS_DIR / v.yaml, v.data_file, v.description, requested_as)
    return ResolvedTask(name, "lm_eval", limit, requested_as=requested_as)


def resolve_tasks(
    names: Sequence[str] | str, limit: int | None = None, local_data_dir: str | Path | None = None
) -> tuple[ResolvedTask, ...]:
    """Expand suites and map names to tasks, in order, without duplicates (the first occurrence wins).

    `limit` overrides every task's own limit. With `local_data_dir`, suite tasks that have a local variant run it.
    Unknown names are not rejected here (they may be lm-eval task names); `check_lm_eval_names` does that against
    lm-eval's index. Names that look like ours but are not (e.g. `glue5`, `world_fact`) fail here with a hint.
    """
    if isinstance(names, str):
        names = [names]
    if not names:
        raise ValueError("downstream: no tasks given; allowed: a suite (" + ", ".join(sorted(SUITES)) + ") or task names")
    use_local = local_data_dir is not None
    out: dict[str, ResolvedTask] = {}
    for raw in names:
        name = raw.strip()
        if name in SUITES:
            items = [(t.name, t.limit) for t in SUITES[name]]
        else:
            _reject_near_misses(name)
            items = [(name, WORLD_LIMITS.get(name, DEFAULT_LIMIT))]
        for task, own_limit in items:
            r = _resolve_one(task, limit if limit is not None else own_limit, use_local, raw)
            out.setdefault(r.name, r)
    return tuple(out.values())


def _reject_near_misses(name: str) -> None:
    """Names in our own namespaces (world_*, *_local, suite-like) must be exact: a typo there is never an lm-eval task."""
    from seqedit.registry import did_you_mean

    ours = name.startswith("world") or name.endswith("_local") or name in ("glue", "glue-4", "glue_4", "nli_mmlu")
    if ours and name not in known_names():
        raise ValueError(f"unknown downstream task or suite {name!r}; {did_you_mean(name, known_names())}")


def unknown_task_error(name: str, lm_eval_names: Iterable[str]) -> ValueError:
    """The did-you-mean error for a name that is neither ours nor in lm-eval's index (~15k names: the message lists
    ours plus lm-eval's close matches, not all of them)."""
    import difflib

    from seqedit.registry import did_you_mean

    near = difflib.get_close_matches(name, list(lm_eval_names), n=3, cutoff=0.6)
    return ValueError(
        f"unknown downstream task or suite {name!r} (not bundled and not an lm-eval task); "
        f"{did_you_mean(name, known_names() + near)}"
    )
