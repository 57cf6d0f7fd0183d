"""The embedded synthetic world: generator determinism and schema, tokenizer convention, tiny build, cache."""
from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch

from _world_fixtures import micro_config, tiny_world  # noqa: F401  (tiny_world is a fixture)
from seqedit.types import EditRequest
from seqedit.world import (
    PRESETS,
    CorpusDesign,
    WorldConfig,
    build_world,
    get_preset,
    load_world,
    verify_world,
    world_dir,
    world_info,
)
from seqedit.world import train as world_train
from seqedit.world.generator import KINDS, RELATION_BY_ID, generate_world, relations_for

# Measured on 2 shared cores: tiny reaches edit recall 0.99 and paraphrase recall 0.99 (0.94-1.0 in design trials).
TINY_MIN_RECALL = 0.85


# ---------------------------------------------------------------------------------------------------------------
# Generator (no training)


def _all_outputs(cfg: WorldConfig):
    w = generate_world(cfg)
    return w.records, w.facts_mc, w.arithmetic_mc, w.ordering_mc, w.epoch_texts(3), w.tokenizer_corpus()[-50:]


def test_generator_is_deterministic_and_seeded():
    cfg = PRESETS["tiny"]
    assert _all_outputs(cfg) == _all_outputs(cfg)
    other = _all_outputs(dataclasses.replace(cfg, seed=1))
    assert other[0] != _all_outputs(cfg)[0]
    assert {r["requested_rewrite"]["subject"] for r in other[0]} != {
        r["requested_rewrite"]["subject"] for r in _all_outputs(cfg)[0]}


def test_epoch_variants_are_regenerated_unless_disabled():
    cfg = PRESETS["tiny"]
    w = generate_world(cfg)
    assert w.epoch_texts(0) != w.epoch_texts(1)
    assert sorted(w.epoch_texts(0)) != sorted(w.epoch_texts(1))  # different templates, not only a new order
    fixed = generate_world(dataclasses.replace(cfg, corpus=CorpusDesign(regenerate_each_epoch=False)))
    assert fixed.epoch_texts(0) == fixed.epoch_texts(1)


def test_packed_documents_mix_facts_but_keep_skill_lines_alone():
    w = generate_world(PRESETS["tiny"])
    assert w.config.corpus.max_pack == 3
    docs = w.epoch_texts(0)
    fact_docs = [d for d in docs if not d.startswith(("copy:", "reverse:")) and " plus " not in d]
    assert max(d.count(".") for d in fact_docs) == 3 and min(d.count(".") for d in fact_docs) == 1
    assert sum(d.count(".") for d in fact_docs) == len(w.facts)
    skills = [d for d in docs if d.startswith(("copy:", "reverse:")) or " plus " in d]
    assert skills and all(d.count(".") == 1 for d in skills)


def test_biography_mode_writes_one_row_per_subject_with_all_its_facts():
    cfg = dataclasses.replace(PRESETS["tiny"], corpus=CorpusDesign(mode="biography", ordering_lines_per_epoch=0))
    w = generate_world(cfg)
    rows = [t for t in w.epoch_texts(0) if " plus " not in t]
    assert len(rows) == len(w.subjects)
    s = w.subjects[0].name
    row = next(r for r in rows if s in r)
    assert row.count(".") >= sum(f.subject == s for f in w.facts)


def test_holdout_paraphrase_design_never_trains_paraphrase_templates():
    cfg = dataclasses.replace(PRESETS["tiny"], corpus=CorpusDesign(holdout_paraphrase_templates=True))
    w = generate_world(cfg)
    text = "\n".join(t for e in range(8) for t in w.epoch_texts(e))
    assert all(p not in text for r in w.records for p in r["paraphrase_prompts"])
    assert all(r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"]) in text
               for r in w.records[:20])


def _fact_index(world):
    """Filled prompt -> (subject, relation id, object) for every fact under every template."""
    index = {}
    for f in world.facts:
        for t in f.relation.templates:
            index[t.format(f.subject)] = (f.subject, f.relation_id, f.object)
    return index


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_counterfact_records_follow_the_schema(preset):
    world = generate_world(PRESETS[preset])
    index = _fact_index(world)
    assert len(world.records) > 100
    assert [r["case_id"] for r in world.records] == list(range(len(world.records)))
    relations = set()
    for rec in world.records:
        assert set(rec) == {"case_id", "pararel_idx", "requested_rewrite", "paraphrase_prompts",
                            "neighborhood_prompts", "attribute_prompts", "generation_prompts"}
        rw = rec["requested_rewrite"]
        assert set(rw) == {"prompt", "relation_id", "target_new", "target_true", "subject"}
        assert isinstance(rec["case_id"], int) and isinstance(rec["pararel_idx"], int)
        assert rw["prompt"].count("{}") == 1
        rel = RELATION_BY_ID[rw["relation_id"]]
        relations.add(rel.id)
        assert rw["prompt"] in rel.templates
        new, true = rw["target_new"], rw["target_true"]
        assert set(new) == set(true) == {"str", "id"}
        assert new["str"] != true["str"] and new["id"] != true["id"]
        assert new["str"] in rel.objects and true["str"] in rel.objects
        assert index[rw["prompt"].format(rw["subject"])] == (rw["subject"], rel.id, true["str"])
        assert len(rec["paraphrase_prompts"]) == 2
        for p in rec["paraphrase_prompts"]:
            assert index[p] == (rw["subject"], rel.id, true["str"]) and p != rw["prompt"].format(rw["subject"])
        assert 1 <= len(rec["neighborhood_prompts"]) <= 10 and len(rec["attribute_prompts"]) <= 10
        for p in rec["neighborhood_prompts"]:
            subj, rid, obj = index[p]
            assert subj != rw["subject"] and rid == rel.id and obj == true["str"]
        for p in rec["attribute_prompts"]:
            subj, rid, obj = index[p]
            assert subj != rw["subject"] and rid == rel.id and obj == new["str"]
        assert rec["generation_prompts"] and all(g.startswith(rw["subject"]) for g in rec["generation_prompts"])
        # The shared contract accepts it.
        EditRequest(str(rec["case_id"]), rw["prompt"], rw["subject"], new["str"], true["str"], rel.id,
                    tuple(rec["paraphrase_prompts"]), tuple(rec["neighborhood_prompts"]))
    assert len(relations) >= 15
    styles = {rec["requested_rewrite"]["prompt"].startswith("{}") for rec in world.records}
    assert styles == {True, False}  # both relation-first and subject-first edit prompts
    json.dumps(world.records)  # plain JSON


def test_default_world_is_big_enough_for_long_runs():
    """The 2,000-edit runs of the [driver] issue need 2,000 distinct facts to edit; every kind has >= 5 attributes."""
    world = generate_world(PRESETS["small"])
    assert len(world.records) >= 2000
    assert len({r["requested_rewrite"]["subject"] for r in world.records}) >= 400
    assert all(len(relations_for(kind)) >= 5 for kind in KINDS)
    texts = world.epoch_texts(0)
    attribute_first = [t for t in texts if " is its " in t]
    assert attribute_first  # the design the default world was chosen for


def test_downstream_items_are_held_out():
    cfg = PRESETS["small"]
    world = generate_world(cfg)
    edited = {r["requested_rewrite"]["subject"] for r in world.records}
    index = _fact_index(world)
    for task in (world.facts_mc, world.arithmetic_mc, world.ordering_mc):
        assert len(task) >= 30
        assert len({r["id"] for r in task}) == len(task)
        for row in task:
            assert set(row) == {"id", "question", "choices", "label"}
            assert len(row["choices"]) == 4 == len(set(row["choices"])) and 0 <= row["label"] < 4
    for row in world.facts_mc:  # unedited facts the model learned
        subj, rid, obj = index[row["question"]]
        assert subj not in edited and row["choices"][row["label"]] == obj
        assert all(c in RELATION_BY_ID[rid].objects for c in row["choices"])
    train_lines = {t for e in range(5) for t in world.epoch_texts(e)}
    for row in world.arithmetic_mc + world.ordering_mc:
        line = f"{row['question']} {row['choices'][row['label']]}"
        assert line not in train_lines and line + "." not in train_lines
    a, b = (int(x) for x in world.arithmetic_mc[0]["question"].split()[::2][:2])
    assert (b, a) in world.arithmetic_train and (a, b) not in world.arithmetic_train


def test_config_round_trip_hash_and_presets():
    for cfg in PRESETS.values():
        assert WorldConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    tiny = get_preset("tiny")
    assert len(tiny.config_hash()) == 12
    assert dataclasses.replace(tiny, seed=7).config_hash() != tiny.config_hash()
    assert dataclasses.replace(tiny, corpus=CorpusDesign(mode="biography")).config_hash() != tiny.config_hash()
    assert world_dir("tiny", "/c").as_posix() == f"/c/worlds/tiny-{tiny.config_hash()}"
    with pytest.raises(ValueError, match="allowed: medium, small, standard, tiny"):
        get_preset("huge")
    # medium is small with a wider MLP (the key space of rank-one editors), nothing else; standard (shipped) is small
    # with a still wider MLP, more subjects and more held-out text for C
    assert dataclasses.replace(get_preset("medium"), name="small", n_inner=None) == get_preset("small")
    assert dataclasses.replace(get_preset("standard"), name="small", n_inner=None, n_subjects=560,
                               heldout_min_tokens=6000) == get_preset("small")
    wide = world_train.make_model(dataclasses.replace(tiny, n_inner=96), vocab_size=50, eos_id=0)
    assert wide.transformer.h[0].mlp.c_fc.weight.shape == (tiny.n_embd, 96)  # Conv1D: [in, out]
    with pytest.raises(ValueError, match="unknown WorldConfig keys"):
        WorldConfig.from_dict({"n_layers": 3})
    with pytest.raises(ValueError, match="mode"):
        CorpusDesign(mode="essays")
    small = get_preset("small")
    assert small.n_layer >= 4 and tiny.n_layer < small.n_layer


# ---------------------------------------------------------------------------------------------------------------
# The tiny world (built once per session)


def test_tiny_world_files_report_and_recall(tiny_world):
    w = tiny_world
    assert verify_world(w.path) is None
    assert w.counterfact_path.is_file() and w.heldout_path.is_file()
    assert {p.stem for p in w.downstream_dir.glob("*.jsonl")} >= {"facts_mc", "arithmetic", "ordering"}
    assert w.config == get_preset("tiny") and not w.model.training
    rep = w.report
    assert rep["recall_edit"] >= TINY_MIN_RECALL and rep["recall_paraphrase"] >= TINY_MIN_RECALL - 0.05
    assert rep["downstream"]["facts_mc"] >= 0.8
    # Skills on held-out items (chance 0.25). Measured: ordering 0.95, arithmetic 0.77 (trials: 0.6-1.0, 0.6-0.9).
    assert rep["downstream"]["ordering"] >= 0.5 and rep["downstream"]["arithmetic"] >= 0.35
    assert rep["params"] == sum(p.numel() for p in w.model.parameters())
    assert rep["vocab_size"] == len(w.tokenizer) and rep["build_seconds"] > 0
    assert rep["heldout_tokens"] >= 5000

    # Recompute recall independently on the loaded model: greedy token-by-token continuation of the edit prompt.
    records = w.records()[:40]
    hits = 0
    for rec in records:
        rw = rec["requested_rewrite"]
        ids = w.tokenizer(rw["prompt"].format(rw["subject"]))["input_ids"]
        target = w.tokenizer(" " + rw["target_true"]["str"], add_special_tokens=False)["input_ids"]
        out = []
        with torch.no_grad():
            for _ in target:
                nxt = int(w.model(torch.tensor([ids + out])).logits[0, -1].argmax())
                out.append(nxt)
        hits += out == target
    assert hits / len(records) >= TINY_MIN_RECALL


def test_tiny_world_tokenizer_convention(tiny_world):
    tok = tiny_world.tokenizer
    bos = tok.bos_token_id
    assert tok.bos_token == tok.eos_token == tok.pad_token == "<|endoftext|>" and tok.unk_token is not None
    ids = tok("The capital of Varokel is")["input_ids"]
    assert ids[0] == bos and ids.count(bos) == 1
    assert bos not in tok(" Paris", add_special_tokens=False)["input_ids"]
    assert tok.padding_side == "right"
    batch = tok(["The capital of Varokel is", "Hi"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][1, -1] == 0 and batch["input_ids"][1, 0] == bos
    # Generic loaders see the same convention.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    auto = AutoTokenizer.from_pretrained(tiny_world.path)
    assert auto("The capital of Varokel is")["input_ids"] == ids and auto.padding_side == "right"
    assert auto.model_max_length == tiny_world.model.config.n_positions
    assert AutoModelForCausalLM.from_pretrained(tiny_world.path).config.model_type == "gpt2"
    # Subjects span several tokens (ROME-style editors need a subject-last position distinct from the first).
    subjects = sorted({r["requested_rewrite"]["subject"] for r in tiny_world.records()})
    lens = [len(tok(" " + s, add_special_tokens=False)["input_ids"]) for s in subjects]
    assert 2.0 <= sum(lens) / len(lens) <= 4.0 and min(lens) >= 2
    assert tiny_world.report["subject_tokens_mean"] >= 2.0
    assert tiny_world.report["train_device"] == "cpu" and tiny_world.report["torch_threads"] == 1


def test_cached_world_is_reused_without_training(tiny_world, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("a cached world must not be retrained")

    monkeypatch.setattr(world_train, "train_model", no_training)
    t0 = time.perf_counter()
    again = load_world("tiny", cache_dir=tiny_world.path.parent.parent)
    assert time.perf_counter() - t0 < 10
    assert again.path == tiny_world.path and again.report == tiny_world.report
    info = world_info("tiny", cache_dir=tiny_world.path.parent.parent)
    assert info["built"] and info["path"] == str(tiny_world.path) and info["report"]["recall_edit"] > 0


# ---------------------------------------------------------------------------------------------------------------
# Cache machinery on a throwaway micro world


def test_corrupt_or_incomplete_world_is_detected_and_rebuilt(tmp_path, monkeypatch):
    calls = []
    real = world_train.train_model

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(world_train, "train_model", counting)
    cfg = micro_config()
    info = world_info(cfg, cache_dir=tmp_path)
    assert not info["built"] and info["problem"] == "missing" and info["report"] is None
    messages: list[str] = []
    path = build_world(cfg, cache_dir=tmp_path, progress=messages.append)
    assert len(calls) == 1 and messages and verify_world(path) is None
    assert build_world(cfg, cache_dir=tmp_path) == path and len(calls) == 1  # cached

    with open(path / "counterfact.json", "a") as f:
        f.write(" ")
    assert "checksum mismatch in counterfact.json" in verify_world(path)
    assert not world_info(cfg, cache_dir=tmp_path)["built"]
    w = load_world(cfg, cache_dir=tmp_path)
    assert len(calls) == 2 and verify_world(path) is None and w.path == path

    (path / "checksums.json").unlink()  # as if a build was killed before its last write
    assert "incomplete" in verify_world(path) and not world_info(cfg, cache_dir=tmp_path)["built"]
    stale = path.parent / f".tmp-{path.name}-killed"  # a killed build's temporary directory
    stale.mkdir()
    build_world(cfg, cache_dir=tmp_path, force=True)
    assert len(calls) == 3 and verify_world(path) is None
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    assert leftovers == []


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("killed")

    monkeypatch.setattr(world_train, "train_model", boom)
    cfg = micro_config()
    with pytest.raises(RuntimeError, match="killed"):
        build_world(cfg, cache_dir=tmp_path)
    assert not world_dir(cfg, tmp_path).exists()
    assert [p for p in (tmp_path / "worlds").iterdir() if not p.name.endswith(".lock")] == []
