"""Downstream probe (lm-eval in-process): bundled JSONL tasks on a tiny GPT-2, suites, errors, scoring parity."""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from seqedit.downstream.lm_eval_probe import (
    DownstreamDataError,
    DownstreamProbe,
    make_lm,
    metrics_from_results,
    tokenizer_adds_bos,
)
from seqedit.downstream.suites import SUITES, known_names, resolve_tasks, unknown_task_error
from seqedit.probe_api import PROBES, ProbeContext
from seqedit.scoring import score_targets
from _world_fixtures import tiny_world  # noqa: F401  (session fixture, used by the slow world test)
from tests_support import SENTENCES, counterfact_records, make_tiny_gpt2, make_tokenizer

OBJECTS = ["Mirandu", "Quorath", "hockey", "tennis", "Ovarish", "flute", "Arvalia", "Sumerish", "Tesselin"]


def _mc_rows(seed: int) -> list[dict]:
    """One 4-way item per test sentence: the sentence minus its last word, the last word among 3 distractors."""
    rng = random.Random(seed)
    rows = []
    for i, s in enumerate(SENTENCES):
        words = s.split()
        true = words[-1]
        choices = rng.sample([o for o in OBJECTS if o != true], 3) + [true]
        rng.shuffle(choices)
        rows.append({"id": f"item-{seed}-{i}", "question": " ".join(words[:-1]), "choices": choices,
                     "label": choices.index(true)})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def world_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("world_downstream")
    for seed, name in enumerate(("facts_mc", "arithmetic", "ordering")):
        _write_jsonl(d / f"{name}.jsonl", _mc_rows(seed))
    # Blank lines are not documents (they must not count against the limit).
    (d / "heldout.txt").write_text("\n".join(SENTENCES[:6]) + "\n\n" + "\n".join(SENTENCES[6:]) + "\n")
    return d


@pytest.fixture(scope="module")
def probe(world_data) -> DownstreamProbe:
    p = DownstreamProbe(DownstreamProbe.Config(tasks=("world",), data_dir=str(world_data), log_items=True,
                                               batch_size=8))
    assert p.check() == ["world_facts", "world_arithmetic", "world_ordering", "world_perplexity"]
    return p


@pytest.fixture(scope="module")
def small_probe(world_data) -> DownstreamProbe:
    """Two tasks, four items each: for tests about state, not scores."""
    return DownstreamProbe(DownstreamProbe.Config(tasks=("world_facts", "world_perplexity"), data_dir=str(world_data),
                                                  limit=4, log_items=True, batch_size=8))


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny random GPT-2 shared by the read-only tests of this module (tests that change weights make their own)."""
    return make_tiny_gpt2(len(tokenizer))


@pytest.fixture(scope="module")
def baseline(probe, tokenizer, model):
    return probe(_ctx(model, tokenizer))


def _ctx(model, tokenizer) -> ProbeContext:
    return ProbeContext(model=model, tokenizer=tokenizer, edit_index=0, applied=())


def test_registered_and_configurable():
    from seqedit.config import build_dataclass

    assert PROBES.get("downstream") is DownstreamProbe
    assert DownstreamProbe.name == "downstream" and DownstreamProbe.cost == "expensive"
    cfg = build_dataclass(DownstreamProbe.Config, {"tasks": ["glue4", "world_facts"], "limit": 50}, "probes.downstream")
    assert cfg.tasks == ("glue4", "world_facts") and cfg.limit == 50
    with pytest.raises(ValueError, match="limit=0"):
        DownstreamProbe.Config(limit=0)


def test_bundled_tasks_deterministic_with_rows(probe, baseline, tokenizer, model):
    first = baseline
    second = probe(_ctx(model, tokenizer))
    assert first.metrics == second.metrics
    assert list(first.rows) == list(second.rows)
    m = first.metrics
    for task in ("world_facts", "world_arithmetic", "world_ordering"):
        assert m[f"downstream/{task}/n"] == len(SENTENCES)
        assert 0.0 <= m[f"downstream/{task}/acc"] <= 1.0 and f"downstream/{task}/acc_norm" in m
        rows = [r for r in first.rows if r["task"] == task]
        assert sorted(r["doc_id"] for r in rows) == list(range(len(SENTENCES)))
        assert np.mean([r["correct"] for r in rows]) == pytest.approx(m[f"downstream/{task}/acc"])
        assert all(r["id"].startswith("item-") for r in rows)
    assert m["downstream/world_perplexity/n"] == len(SENTENCES)  # the blank line was dropped
    assert m["downstream/world_perplexity/word_perplexity"] > 1.0
    assert not any("," in k or "stderr" in k for k in m)  # lm-eval's ",none" suffix and N/A stderr are gone


def test_multiple_choice_matches_seqedit_scoring(baseline, world_data, tokenizer, model):
    """Per item, lm-eval's acc is 1 exactly when seqedit's highest-scoring choice is the label."""
    rows = [r for r in baseline.rows if r["task"] == "world_facts"]
    items = [json.loads(line) for line in (world_data / "facts_mc.jsonl").read_text().splitlines()]
    for r in rows:
        item = items[r["doc_id"]]
        scores = score_targets(model, tokenizer, [item["question"]] * 4, item["choices"])
        best = max(range(4), key=lambda j: scores[j].logprob)
        assert r["correct"] == (best == item["label"]), item


def test_loglikelihood_equals_seqedit_scoring(tokenizer, tiny_gpt2):
    from lm_eval.api.instance import Instance

    assert tokenizer_adds_bos(tokenizer)
    lm = make_lm(tiny_gpt2, tokenizer, batch_size=4)
    assert lm.model is tiny_gpt2
    pairs = [("The capital of Varokel is", "Mirandu"), ("Ivo Parnassek plays the instrument", "flute"),
             ("Lisara Moventi was born in", "Tesselin")]
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=(p, " " + t), idx=i) for i, (p, t) in
            enumerate(pairs)]
    got = [ll for ll, _ in lm.loglikelihood(reqs)]
    want = [s.logprob for s in score_targets(tiny_gpt2, tokenizer, [p for p, _ in pairs], [t for _, t in pairs])]
    assert got == pytest.approx(want, abs=1e-4)

    # Rolling (perplexity): BOS once, then every token of the text, as tokenizer(text) scores it.
    text = SENTENCES[0]
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    with torch.no_grad():
        logp = torch.log_softmax(tiny_gpt2(torch.tensor([ids])).logits[0].float(), -1)
    want_roll = float(sum(logp[i - 1, ids[i]] for i in range(1, len(ids))))
    (got_roll,) = lm.loglikelihood_rolling([Instance(request_type="loglikelihood_rolling", doc={},
                                                     arguments=(text,), idx=0)])
    assert got_roll == pytest.approx(want_roll, abs=1e-4)


def test_results_follow_weight_changes(small_probe, tokenizer, tiny_gpt2):
    ctx = _ctx(tiny_gpt2, tokenizer)
    before = small_probe(ctx)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in tiny_gpt2.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    after = small_probe(ctx)
    key = "downstream/world_perplexity/word_perplexity"
    assert after.metrics[key] != pytest.approx(before.metrics[key], rel=1e-3)
    ll = lambda res: [r["loglikelihood"] for r in res.rows if r["task"] == "world_perplexity"]  # noqa: E731
    assert all(a != pytest.approx(b, abs=1e-3) for a, b in zip(ll(before), ll(after)))


@pytest.mark.parametrize("training", [True, False])
def test_model_left_as_found(small_probe, tokenizer, training):
    model = make_tiny_gpt2(len(tokenizer))
    model.train(training)
    model.transformer.h[0].train(not training)  # a mixed state must survive too (model.train() would flatten it)
    modes = {n: m.training for n, m in model.named_modules()}
    params = [(n, id(p), p.data_ptr(), p.device, p.dtype) for n, p in model.named_parameters()]
    py_state, torch_state = random.getstate(), torch.random.get_rng_state()
    tokenizer_pad = tokenizer.pad_token

    result = small_probe(_ctx(model, tokenizer))

    assert result.metrics["downstream/world_facts/n"] == 4
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert [(n, id(p), p.data_ptr(), p.device, p.dtype) for n, p in model.named_parameters()] == params
    assert random.getstate() == py_state  # lm-eval reseeds globally; the driver's streams are restored
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert tokenizer.pad_token == tokenizer_pad


def test_check_accepts_loaded_model_and_driver_runs_it(world_data, tmp_path):
    """The driver calls probe.check(<LoadedModel>) at start-up, then the probe on its schedule."""
    from types import SimpleNamespace

    from seqedit.config import load_config
    from seqedit.driver import run
    from seqedit.io import read_jsonl

    world = SimpleNamespace(downstream_dir=world_data, heldout_path=world_data / "heldout.txt")
    probe = DownstreamProbe(DownstreamProbe.Config(tasks=("world_facts",)))
    assert probe.check(SimpleNamespace(world=world, model=None)) == ["world_facts"]

    tok = make_tokenizer()
    make_tiny_gpt2(len(tok)).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "cf.json").write_text(json.dumps(counterfact_records(4)))
    cfg = load_config(None, [
        f"model.name={tmp_path / 'model'}", f"data.source={tmp_path / 'cf.json'}", f"runs_dir={tmp_path / 'runs'}",
        f"cache_dir={tmp_path / 'cache'}", "n_edits=4", "editor.name=random", "editor.relative_norm=0.05",
        "probes=[{name: downstream, schedule: 'every:2', tasks: [world_facts, world_perplexity], limit: 3, "
        f"log_items: true, data_dir: {world_data}}}]",
    ])
    summary = run(cfg)
    rows = [r for r in read_jsonl(summary.run_dir / "telemetry" / "probes.jsonl")
            if "downstream/world_facts/acc" in r]
    assert len(rows) >= 3 and {r["downstream/world_facts/n"] for r in rows} == {3.0}  # edits 0 (baseline), 2, 4
    items = read_jsonl(summary.run_dir / "telemetry" / "items-downstream.jsonl")
    assert {r["task"] for r in items} == {"world_facts", "world_perplexity"}


def test_tokenizer_without_pad_is_not_mutated(world_data, tokenizer, tiny_gpt2):
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = None
    assert tok.pad_token_id is None
    p = DownstreamProbe(DownstreamProbe.Config(tasks=("world_facts",), data_dir=str(world_data), limit=3))
    result = p(_ctx(tiny_gpt2, tok))  # no explicit check(): the first call prepares
    assert result.metrics["downstream/world_facts/n"] == 3 and result.rows == ()
    assert tok.pad_token_id is None  # lm-eval set a pad token on the probe's own copy only


def test_same_numbers_as_simple_evaluate(probe, baseline, tokenizer, model):
    """The probe skips simple_evaluate's per-call environment report, nothing else."""
    from lm_eval import simple_evaluate

    ours = baseline.metrics
    prepared = probe._prepared
    with torch.random.fork_rng():
        out = simple_evaluate(model=make_lm(model, copy.deepcopy(tokenizer), 8), tasks=list(prepared.tasks.values()),
                              samples=prepared.samples, bootstrap_iters=0, log_samples=False, random_seed=1234,
                              numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234,
                              task_manager=prepared.task_manager)
    assert metrics_from_results(out) == pytest.approx(ours)


# --- suites and errors --------------------------------------------------------------------------------------------


def test_suite_resolution():
    glue = resolve_tasks(["glue4"])
    assert [(t.name, t.source, t.limit) for t in glue] == [(n, "lm_eval", 200) for n in ("sst2", "mrpc", "cola", "rte")]
    local = resolve_tasks(["glue4"], local_data_dir="/data/glue")
    assert [(t.name, t.source, t.data_file) for t in local] == [
        (f"{n}_local", "local", f"{n}.jsonl") for n in ("sst2", "mrpc", "cola", "rte")]
    # Suites overlap (rte): first occurrence wins; `limit` overrides every suite limit; bare names pass through.
    mixed = resolve_tasks(["glue4", "nli_mmlu_lite", "hellaswag"], limit=7)
    names = [t.name for t in mixed]
    assert names.count("rte") == 1 and "mmlu_marketing" in names and names[-1] == "hellaswag"
    assert {t.limit for t in mixed} == {7}
    assert {t.name: t.limit for t in resolve_tasks("nli_mmlu_lite")}["mnli"] == 100
    world = resolve_tasks("world")
    assert [t.name for t in world] == [t.name for t in SUITES["world"]] and {t.source for t in world} == {"world"}
    assert resolve_tasks("sst2_local")[0].data_file == "sst2.jsonl"


def test_unknown_names_did_you_mean():
    from seqedit.config import ConfigError
    from seqedit.probe_api import make_probe

    with pytest.raises(ValueError, match=r"unknown downstream task or suite 'world_fact'.*Did you mean 'world_facts'"):
        DownstreamProbe.Config(tasks=("world_fact",))
    with pytest.raises(ConfigError, match=r"probes\.downstream: unknown downstream task or suite 'glue_4'"):
        make_probe("downstream", {"tasks": ["glue_4"]})  # config validation, before any model loads
    with pytest.raises(ValueError, match=r"'sts2_local'.*Did you mean 'sst2_local'"):
        resolve_tasks(["sts2_local"])
    err = unknown_task_error("hellaswagg", ["hellaswag", "arc_easy"])
    assert "hellaswagg" in str(err) and "Did you mean 'hellaswag'" in str(err)
    assert "glue4" in known_names() and "world_perplexity" in known_names()


def test_glue4_without_local_data_names_the_task(tmp_path):
    probe = DownstreamProbe(DownstreamProbe.Config(tasks=("glue4",)))
    with pytest.raises(DownstreamDataError, match=r"'sst2' \(from 'glue4'\).*not in the local Hugging Face cache"
                                                  r".*local_data_dir.*sst2\.jsonl"):
        probe.check()
    empty = DownstreamProbe(DownstreamProbe.Config(tasks=("glue4",), local_data_dir=str(tmp_path)))
    with pytest.raises(DownstreamDataError, match=r"'sst2_local'.*sst2\.jsonl.*not found"):
        empty.check()


def test_world_tasks_without_world_data():
    with pytest.raises(DownstreamDataError, match=r"'world_facts'.*no world data directory.*data_dir"):
        DownstreamProbe(DownstreamProbe.Config(tasks=("world_facts",))).check()


def test_glue4_local_variants_run(tmp_path, tokenizer, tiny_gpt2):
    sents = [s + "." for s in SENTENCES[:6]]
    one = [{"sentence": s, "label": i % 2} for i, s in enumerate(sents)]
    two = [{"sentence1": s, "sentence2": t, "label": i % 2} for i, (s, t) in enumerate(zip(sents, sents[1:] + sents))]
    for name, rows in (("sst2", one), ("cola", one), ("mrpc", two), ("rte", two)):
        _write_jsonl(tmp_path / f"{name}.jsonl", rows)
    probe = DownstreamProbe(DownstreamProbe.Config(tasks=("glue4",), local_data_dir=str(tmp_path), limit=4,
                                                   batch_size=16))
    assert probe.check() == ["sst2_local", "mrpc_local", "cola_local", "rte_local"]
    m = probe(_ctx(tiny_gpt2, tokenizer)).metrics
    for key in ("sst2_local/acc", "mrpc_local/acc", "mrpc_local/f1", "rte_local/acc"):
        assert 0.0 <= m[f"downstream/{key}"] <= 1.0
    assert "downstream/cola_local/mcc" in m  # may be None (NaN) when the model predicts one class
    assert {m[f"downstream/{t}_local/n"] for t in ("sst2", "mrpc", "cola", "rte")} == {4.0}


# --- slow -----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_unknown_lm_eval_name_checked_against_full_index():
    probe = DownstreamProbe(DownstreamProbe.Config(tasks=("hellaswagg",)))  # not ours: passes construction
    with pytest.raises(ValueError, match=r"'hellaswagg'.*Did you mean 'hellaswag'"):
        probe.check()


def _check_world(world) -> dict:
    """The bundled tasks on an unedited world model: lm-eval's accuracy equals the world's own build report (same
    items, same criterion: summed log-prob of " " + choice) and every task is clearly above chance (4 choices)."""
    probe = DownstreamProbe(DownstreamProbe.Config(tasks=("world",), limit=1000))
    probe.check(world)
    m = probe(ProbeContext(model=world.model, tokenizer=world.tokenizer, edit_index=0, applied=(),
                           world=world)).metrics
    print(world.config.name, {k.removeprefix("downstream/"): round(v, 4) for k, v in m.items() if v is not None})
    report = world.report["downstream"]
    for task, key in (("world_facts", "facts_mc"), ("world_arithmetic", "arithmetic"), ("world_ordering", "ordering")):
        # a near-tie may flip on another machine's CPU kernels (the shipped world was evaluated elsewhere)
        assert m[f"downstream/{task}/acc"] == pytest.approx(report[key], abs=3e-3), task
    assert m["downstream/world_facts/acc"] >= 0.6
    assert m["downstream/world_arithmetic/acc"] >= 0.4 and m["downstream/world_ordering/acc"] >= 0.4
    assert 1.0 < m["downstream/world_perplexity/word_perplexity"] < 10_000
    return m


@pytest.mark.slow
def test_world_tiny_tasks(tiny_world):
    _check_world(tiny_world)


def test_world_standard_tasks(tmp_path):
    from seqedit.world import load_world

    _check_world(load_world("standard", cache_dir=tmp_path))  # the shipped build: nothing is built


@pytest.mark.gpu
def test_probe_on_cuda_keeps_device_and_matches_cpu(world_data, tokenizer):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cpu_model = make_tiny_gpt2(len(tokenizer))
    gpu_model = make_tiny_gpt2(len(tokenizer)).to("cuda")
    probe = DownstreamProbe(DownstreamProbe.Config(tasks=("world",), data_dir=str(world_data)))
    on_cpu = probe(_ctx(cpu_model, tokenizer)).metrics
    on_gpu = probe(_ctx(gpu_model, tokenizer)).metrics
    assert all(p.device.type == "cuda" for p in gpu_model.parameters())
    assert on_gpu.keys() == on_cpu.keys()
    for k in on_cpu:
        assert on_gpu[k] == pytest.approx(on_cpu[k], rel=1e-3, abs=1e-3), k

def _render(cfg: dict, doc: dict) -> tuple[str, list[str], int]:
    """Prompt, choices and gold index the way a ConfigurableTask resolves them (feature name, Jinja or function)."""
    from lm_eval.utils import apply_template

    def field(spec):
        if callable(spec):
            return spec(doc)
        if isinstance(spec, str) and spec in doc:
            return doc[spec]
        return apply_template(spec, doc) if isinstance(spec, str) else spec

    choices = list(field(cfg["doc_to_choice"]))
    target = field(cfg["doc_to_target"])
    gold = choices.index(target) if isinstance(target, str) and target in choices else int(target)
    return cfg.get("description", "") + field(cfg["doc_to_text"]), choices, gold


def test_local_variants_render_like_lm_eval_tasks():
    """Each local variant shows the model the same prompt, choices and gold answer as lm-eval's own task."""
    from lm_eval import tasks as lm_tasks
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    from seqedit.downstream.suites import LM_EVAL_TASK_DIRS, LOCAL_VARIANTS

    root = Path(lm_tasks.__file__).parent
    tm = TaskManager(include_path=sorted({str(root / d) for d in LM_EVAL_TASK_DIRS.values()}), include_defaults=False)
    docs = {
        "one": {"sentence": "the movie was a delight", "label": 1},
        "two": {"sentence1": "A man plays.", "sentence2": "Someone plays", "premise": "A man plays.",
                "hypothesis": "Someone plays", "label": 2},
        "mmlu": {"question": " What is 2+2? ", "choices": ["1", "2", "3", "4"], "answer": 3},
    }
    for base, variant in LOCAL_VARIANTS.items():
        theirs = load_yaml(tm.task_index[base].yaml_path, resolve_func=True)
        (ours_task,) = resolve_tasks([variant.task])
        ours = load_yaml(ours_task.yaml, resolve_func=True)
        if ours_task.description is not None:
            ours["description"] = ours_task.description
        doc = docs["mmlu" if base.startswith("mmlu") else "one" if base in ("sst2", "cola") else "two"]
        if base in ("sst2", "cola", "mrpc", "rte"):
            doc = {**doc, "label": doc["label"] % 2}
        assert _render(ours, doc) == _render(theirs, doc), base
        assert [m["metric"] for m in ours["metric_list"]] == [m["metric"] for m in theirs["metric_list"]], base


# --- labels checked against the task's choices (issue #12: string labels used to score 0.0 silently) -------------


def _sst2_rows(label) -> list[dict]:
    return [{"sentence": s + ".", "label": label(i % 2)} for i, s in enumerate(SENTENCES[:6])]


def test_string_labels_are_mapped_and_reported_with_the_int_label_scores(tmp_path, tokenizer, model):
    (tmp_path / "ints").mkdir()
    (tmp_path / "strs").mkdir()
    _write_jsonl(tmp_path / "ints" / "sst2.jsonl", _sst2_rows(int))
    _write_jsonl(tmp_path / "strs" / "sst2.jsonl", _sst2_rows(str))  # "0" / "1"
    results = {}
    for kind in ("ints", "strs"):
        probe = DownstreamProbe(DownstreamProbe.Config(tasks=("sst2_local",), local_data_dir=str(tmp_path / kind),
                                                       log_items=True, batch_size=8))
        probe.check()
        results[kind] = (probe.notes, probe(_ctx(model, tokenizer)))
    assert results["ints"][0] == []
    (note,) = results["strs"][0]
    assert "sst2.jsonl" in note and "6 of 6 labels" in note and "'0' -> 0" in note and "'1' -> 1" in note
    ints, strs = results["ints"][1], results["strs"][1]
    assert strs.metrics == ints.metrics
    # Not the silent failure mode (every item wrong): the same per-item outcomes, some of them right.
    assert [r["acc"] for r in strs.rows] == [r["acc"] for r in ints.rows]
    assert any(r["acc"] for r in ints.rows)
    assert (tmp_path / "strs" / "sst2.jsonl").read_text().count('"label": "1"') == 3  # the user's file is untouched


def test_choice_words_map_to_their_index(tmp_path):
    names = ("negative", "positive")
    _write_jsonl(tmp_path / "sst2.jsonl", _sst2_rows(lambda i: names[i]))
    probe = DownstreamProbe(DownstreamProbe.Config(tasks=("sst2_local",), local_data_dir=str(tmp_path)))
    probe.check()
    assert "'negative' -> 0, 'positive' -> 1" in probe.notes[0]


@pytest.mark.parametrize("bad", ["pos", -1, 2, True, None, 0.5, "2"])
def test_labels_outside_the_choices_are_refused_naming_file_value_and_allowed(tmp_path, bad):
    rows = _sst2_rows(int)
    rows[3]["label"] = bad
    _write_jsonl(tmp_path / "sst2.jsonl", rows)
    probe = DownstreamProbe(DownstreamProbe.Config(tasks=("sst2_local",), local_data_dir=str(tmp_path)))
    with pytest.raises(DownstreamDataError) as info:
        probe.check()
    msg = str(info.value)
    assert str(tmp_path / "sst2.jsonl") in msg and "line 4" in msg
    assert f"'label' = {bad!r} " in msg
    assert "allowed: 0 ('negative'), 1 ('positive')" in msg


def test_per_row_choices_of_world_tasks_are_checked(tmp_path):
    rows = _mc_rows(0)
    rows[1]["label"] = 4  # 4 choices: 0..3
    for name in ("facts_mc", "arithmetic", "ordering"):
        _write_jsonl(tmp_path / f"{name}.jsonl", rows)
    probe = DownstreamProbe(DownstreamProbe.Config(tasks=("world_facts",), data_dir=str(tmp_path)))
    with pytest.raises(DownstreamDataError, match=r"facts_mc\.jsonl' line 2: label field 'label' = 4 .*allowed: 0 "):
        probe.check()
