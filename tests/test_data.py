"""Tests for seqedit.data: loaders of CounterFact, zsRE, EasyEdit, JSONL and local `datasets`, and the edit order."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from seqedit.data import (
    FORMATS,
    DataError,
    LoadResult,
    SkippedRecord,
    load_requests,
    order_requests,
)
from seqedit.types import EditRequest

# Hand-made records with the exact field names of the published files (protocols-and-data.md §5).


def _cf(case_id: int, subject: str = "Danielle Darrieux", **rewrite: Any) -> dict[str, Any]:
    rw = {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": " English", "id": "Q1860"},  # leading space on purpose
        "target_true": {"str": "French", "id": "Q150"},
        "subject": subject,
    }
    rw.update(rewrite)
    return {
        "case_id": case_id,
        "pararel_idx": 2796,
        "requested_rewrite": rw,
        "paraphrase_prompts": [f"Shayna does this and Yossel goes still and dies. {subject}, a native",
                               f"{subject} spoke the language"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is", "The native language of Montesquieu is"],
        "attribute_prompts": ["J.R.R. Tolkien is a native speaker of"],
        "generation_prompts": [f"{subject}'s mother tongue is", f"{subject}'s mother tongue is"],
    }


def _zsre(subject: str = "Watts Humphrey", **extra: Any) -> dict[str, Any]:
    rec = {
        "subject": subject,
        "src": f"What university did {subject} attend?",
        "pred": "Trinity College",
        "rephrase": f"What university did {subject} take part in?",
        "alt": "University of Michigan",
        "answers": ["Illinois Institute of Technology"],
        "loc": "nq question: who played desmond doss father in hacksaw ridge",
        "loc_ans": "Hugo Weaving",
        "cond": f"Trinity College >> University of Michigan || What university did {subject} attend?",
    }
    rec.update(extra)
    return rec


def _easy(subject: str = "Ray Charles", **extra: Any) -> dict[str, Any]:
    rec = {
        "prompt": f"{subject}, the",
        "subject": subject,
        "target_new": "violin",
        "ground_truth": "piano",
        "rephrase_prompt": f"{subject} is known for playing the",
        "locality_prompt": "Larry Bird is a professional",
        "locality_ground_truth": "basketball",
    }
    rec.update(extra)
    return rec


def _native(case_id: str, subject: str, **extra: Any) -> dict[str, Any]:
    rec = {"case_id": case_id, "prompt": "{} was born in", "subject": subject, "target_new": "Paris",
           "target_true": "Rome", "paraphrase_prompts": [f"{subject} is a native of"]}
    rec.update(extra)
    return rec


def _write_json(path: Path, records: list[Any]) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _req(case_id: str, subject: str) -> EditRequest:
    return EditRequest(case_id=case_id, prompt="{} is", subject=subject, target_new="x")


# ---------------------------------------------------------------------------------------------------- formats


def test_counterfact_fields(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "counterfact.json", [_cf(0), _cf(7, subject="Edwin of Northumbria")])
    result = load_requests(path)
    assert isinstance(result, LoadResult)
    assert result.format == "counterfact" and result.source == str(path) and result.skipped == ()
    r0, r1 = result.requests
    assert r0.case_id == "0" and r1.case_id == "7"
    assert r0.prompt == "The mother tongue of {} is"
    assert r0.subject == "Danielle Darrieux"
    assert r0.target_new == "English"  # leading space stripped
    assert r0.target_true == "French"
    assert r0.relation_id == "P103"
    assert r0.paraphrase_prompts[1] == "Danielle Darrieux spoke the language"
    assert r0.neighborhood_prompts == ("The mother tongue of Léon Blum is", "The native language of Montesquieu is")
    assert r0.neighborhood_targets == ()
    assert r0.neighbours()[0] == ("The mother tongue of Léon Blum is", "French")
    assert r0.attribute_prompts == ("J.R.R. Tolkien is a native speaker of",)
    assert len(r0.generation_prompts) == 2  # duplicates kept as in the file
    assert r1.text == "The mother tongue of Edwin of Northumbria is"


def test_counterfact_prompt_with_context_kept_verbatim(tmp_path: Path) -> None:
    rec = _cf(3, prompt="{}, who is a citizen of")
    result = load_requests(_write_json(tmp_path / "multi_counterfact.json", [rec]), format="counterfact")
    assert result.requests[0].prompt == "{}, who is a citizen of"


@pytest.mark.parametrize(("target", "expected_new"), [("alt", "University of Michigan"),
                                                      ("answers", "Illinois Institute of Technology")])
def test_zsre_fields_and_target_choice(tmp_path: Path, target: str, expected_new: str) -> None:
    path = _write_json(tmp_path / "zsre_mend_eval.json", [_zsre(), _zsre("Ramalinaceae")])
    result = load_requests(path, zsre_target=target)
    assert result.format == "zsre"
    assert result.options == {"zsre_target": target, "zsre_target_true": "pred"}
    r = result.requests[0]
    assert r.case_id == "0" and result.requests[1].case_id == "1"
    assert r.prompt == "What university did {} attend?"
    assert r.text == "What university did Watts Humphrey attend?"
    assert r.target_new == expected_new
    assert r.target_true == "Trinity College"
    assert r.paraphrase_prompts == ("What university did Watts Humphrey take part in?",)
    # prefix removed, question mark appended as MEMIT does before scoring the answer
    assert r.neighborhood_prompts == ("who played desmond doss father in hacksaw ridge?",)
    assert r.neighborhood_targets == ("Hugo Weaving",)
    assert r.neighbours() == [("who played desmond doss father in hacksaw ridge?", "Hugo Weaving")]


def test_zsre_subject_not_in_src_is_an_error(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "zsre_mend_eval.json", [_zsre(), _zsre(src="Where was he born?")])
    with pytest.raises(DataError, match=r"zsre_mend_eval\.json record 1: field 'subject'.*not found in src"):
        load_requests(path, format="zsre")


def test_zsre_answers_mode_needs_answers(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "zsre.json", [_zsre(answers=[])])
    assert load_requests(path).requests[0].target_new == "University of Michigan"  # alt mode does not need them
    with pytest.raises(DataError, match=r"record 0: field 'answers'"):
        load_requests(path, zsre_target="answers")


def test_easyedit_flat_fields(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "counterfact-edit.json", [_easy(), _easy("Larry Page", case_id=42)])
    result = load_requests(path)
    assert result.format == "easyedit"
    r = result.requests[0]
    assert r.prompt == "{}, the" and r.subject == "Ray Charles" and r.text == "Ray Charles, the"
    assert r.target_new == "violin" and r.target_true == "piano"
    assert r.paraphrase_prompts == ("Ray Charles is known for playing the",)
    assert r.neighbours() == [("Larry Bird is a professional", "basketball")]
    assert result.requests[1].case_id == "42"


def test_easyedit_template_replaces_first_occurrence_only(tmp_path: Path) -> None:
    rec = _easy("Paris", prompt="Paris is the city where Paris Hilton", target_new="x")
    r = load_requests(_write_json(tmp_path / "e.json", [rec]), format="easyedit").requests[0]
    assert r.prompt == "{} is the city where Paris Hilton"
    assert r.text == rec["prompt"]


def test_easyedit_nested_locality(tmp_path: Path) -> None:
    as_object = _easy(locality_prompt=None, locality_ground_truth=None, rephrase_prompt=None,
                      rephrase="What does Ray Charles play?",
                      locality={"Relation_Specificity": {"prompt": "The father of Ray Charles is",
                                                         "ground_truth": "Bailey Robinson"}})
    as_list = _easy(locality_prompt=None, locality_ground_truth=None,  # KnowEdit: list of items, alias lists
                    locality={"Relation_Specificity": [
                        {"prompt": "The father of Ray Charles is", "ground_truth": [["Bailey Robinson", "B. R."]]},
                        {"prompt": "Ray Charles was born in", "ground_truth": ["Albany"]}]})
    del as_list["locality_prompt"], as_list["locality_ground_truth"]
    result = load_requests(_write_json(tmp_path / "knowedit.json", [as_object, dict(as_list, case_id=1)]),
                           format="easyedit")
    a, b = result.requests
    assert a.neighbours() == [("The father of Ray Charles is", "Bailey Robinson")]
    assert a.paraphrase_prompts == ("What does Ray Charles play?",)
    assert b.neighbours() == [("The father of Ray Charles is", "Bailey Robinson"),
                              ("Ray Charles was born in", "Albany")]


def test_easyedit_subject_not_in_prompt_names_record(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "easy.json", [_easy(), _easy(), _easy(prompt="Someone else, the")])
    with pytest.raises(DataError, match=r"easy\.json record 2: field 'subject'.*not found in prompt"):
        load_requests(path, format="easyedit")


def test_easyedit_locality_without_answer_is_an_error(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "easy.json", [_easy(locality_ground_truth=None)])
    with pytest.raises(DataError, match=r"record 0: field 'locality_ground_truth' missing"):
        load_requests(path)


def test_jsonl_mixed_row_shapes(tmp_path: Path) -> None:
    rows = [_native("a", "Alice Smith", neighborhood_prompts=["Bob was born in"], neighborhood_targets=["Lyon"]),
            _cf(5), _easy(case_id="e1"), dict(_zsre(), case_id="z1")]
    result = load_requests(_write_jsonl(tmp_path / "edits.jsonl", rows))
    assert result.format == "jsonl"
    native, cf, easy, zsre = result.requests
    assert native == EditRequest(case_id="a", prompt="{} was born in", subject="Alice Smith", target_new="Paris",
                                 target_true="Rome", paraphrase_prompts=("Alice Smith is a native of",),
                                 neighborhood_prompts=("Bob was born in",), neighborhood_targets=("Lyon",))
    assert cf.case_id == "5" and cf.target_new == "English"
    assert easy.case_id == "e1" and easy.prompt == "{}, the"
    assert zsre.case_id == "z1" and zsre.target_new == "University of Michigan"
    assert result.options["zsre_target"] == "alt"


def test_jsonl_native_unknown_field_is_named(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "edits.jsonl", [_native("a", "Alice", paraphrases=["typo"])])
    with pytest.raises(DataError, match=r"edits\.jsonl record 0 \(line 1\): field 'paraphrases' is not an EditRequest"):
        load_requests(path)


def test_jsonl_native_targets_must_be_a_list(tmp_path: Path) -> None:
    rows = [_native("a", "Alice", neighborhood_prompts=["Bob was born in"], neighborhood_targets="Lyon"),
            _native("b", "Bob", neighborhood_prompts=["Carl was born in"], neighborhood_targets=["Lyon", "Nice"])]
    result = load_requests(_write_jsonl(tmp_path / "edits.jsonl", rows), on_error="skip")
    assert result.requests == ()
    assert [(s.index, s.field) for s in result.skipped] == [(0, "neighborhood_targets"), (1, "neighborhood_targets")]


def test_jsonl_bad_line_raise_and_skip(tmp_path: Path) -> None:
    path = tmp_path / "edits.jsonl"
    path.write_text(json.dumps(_native("a", "Alice")) + "\n\n{not json\n" + json.dumps(_native("b", "Bob")) + "\n")
    with pytest.raises(DataError, match=r"edits\.jsonl record 1 \(line 3\): field '<json>' invalid JSON"):
        load_requests(path)
    result = load_requests(path, on_error="skip")
    assert [r.case_id for r in result.requests] == ["a", "b"]
    assert len(result.skipped) == 1 and result.skipped[0].index == 1 and result.skipped[0].field == "<json>"


# ---------------------------------------------------------------------------------------------------- auto-detection


@pytest.mark.parametrize(
    ("name", "records", "expected"),
    [
        ("a.json", [_cf(0)], "counterfact"),
        ("b.json", [_zsre()], "zsre"),
        ("c.json", [_easy()], "easyedit"),
        ("d.json", [{"prompt": "X Y plays", "subject": "X Y", "target_new": "jazz"}], "easyedit"),
        ("e.json", [_native("a", "Alice")], "jsonl"),
        ("f.jsonl", [_cf(0)], "jsonl"),
    ],
)
def test_auto_detection(tmp_path: Path, name: str, records: list[Any], expected: str) -> None:
    path = tmp_path / name
    (_write_jsonl if name.endswith(".jsonl") else _write_json)(path, records)
    result = load_requests(path)
    assert result.format == expected
    assert len(result.requests) == 1


def test_auto_unknown_layout_lists_formats(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "other.json", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"other\.json: cannot detect the format.*counterfact, zsre, easyedit, jsonl, hf"):  # noqa: E501
        load_requests(path)


def test_hf_save_to_disk_round_trip(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [_native("a", "Alice Smith"), _native("b", "Bob Jones", target_true=None)]
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    for source in (f"hf:{folder}", folder):  # prefix or a bare folder with dataset_info.json/state.json
        result = load_requests(source)
        assert result.format == "hf"
        assert [(r.case_id, r.subject, r.target_true) for r in result.requests] == [
            ("a", "Alice Smith", "Rome"), ("b", "Bob Jones", None)]
        assert result.requests[0].paraphrase_prompts == ("Alice Smith is a native of",)

    dd_folder = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([_zsre()]),
                          "test": datasets.Dataset.from_list([_cf(9)])}).save_to_disk(str(dd_folder))
    assert load_requests(f"hf:{dd_folder}:test").requests[0].case_id == "9"
    assert load_requests(f"hf:{dd_folder}:train").requests[0].prompt == "What university did {} attend?"
    with pytest.raises(ValueError, match=r"splits \['test', 'train'\]"):
        load_requests(f"hf:{dd_folder}")
    with pytest.raises(ValueError, match=r"no split 'dev'"):
        load_requests(f"hf:{dd_folder}:dev")


def test_hf_hub_name_never_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    import datasets.config as ds_config
    import huggingface_hub.constants as hub_constants

    seen: dict[str, Any] = {}

    def fake_load_dataset(name: str, split: str | None = None, **kwargs: Any) -> Any:
        seen.update(name=name, split=split, offline=(ds_config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE))
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    # conftest sets the offline env; turn the flags off to prove the loader itself forces them on
    monkeypatch.setattr(ds_config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    before = (False, False)
    with pytest.raises(FileNotFoundError, match=r"not available locally.*save_to_disk.*cache"):
        load_requests("hf:azhx/counterfact:train")
    assert seen == {"name": "azhx/counterfact", "split": "train", "offline": (True, True)}
    assert (ds_config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE) == before  # restored


# ---------------------------------------------------------------------------------------------------- errors


def test_malformed_counterfact_message_names_file_index_field(tmp_path: Path) -> None:
    records = [_cf(i) for i in range(18)]
    del records[17]["requested_rewrite"]["subject"]
    path = _write_json(tmp_path / "counterfact.json", records)
    with pytest.raises(DataError) as info:
        load_requests(path)
    assert str(info.value).endswith("counterfact.json record 17: field 'requested_rewrite.subject' missing")
    assert isinstance(info.value, ValueError)


def test_skip_mode_reports_every_bad_record(tmp_path: Path) -> None:
    bad_target = _cf(1)
    bad_target["requested_rewrite"]["target_new"] = {"id": "Q1"}
    bad_prompt = _cf(2, prompt="The mother tongue is")
    bad_list = _cf(3)
    bad_list["paraphrase_prompts"] = ["ok", 5]
    records = [_cf(0), bad_target, bad_prompt, bad_list, "not a record", _cf(0), _cf(6)]
    result = load_requests(_write_json(tmp_path / "cf.json", records), format="counterfact", on_error="skip")
    assert [r.case_id for r in result.requests] == ["0", "6"]
    assert [(s.index, s.field) for s in result.skipped] == [
        (1, "requested_rewrite.target_new.str"),
        (2, "requested_rewrite.prompt"),
        (3, "paraphrase_prompts[1]"),
        (4, "<record>"),
        (5, "case_id"),  # duplicate id
    ]
    assert all(isinstance(s, SkippedRecord) and s.reason for s in result.skipped)
    assert "repeats record 0" in result.skipped[-1].reason


def test_invalid_arguments_list_allowed_values(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "cf.json", [_cf(0)])
    with pytest.raises(ValueError, match=r"unknown format 'csv'; allowed: " + ", ".join(FORMATS)):
        load_requests(path, format="csv")
    with pytest.raises(ValueError, match=r"unknown on_error 'ignore'; allowed: raise, skip"):
        load_requests(path, on_error="ignore")
    with pytest.raises(ValueError, match=r"unknown zsre_target 'pred'; allowed: alt, answers"):
        load_requests(path, zsre_target="pred")


def test_missing_and_unreadable_sources(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.json.*does not exist"):
        load_requests(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match=r"not a saved dataset"):
        load_requests(tmp_path)
    (tmp_path / "broken.json").write_text('[{"case_id": 0,')
    with pytest.raises(DataError, match=r"broken\.json: invalid JSON"):
        load_requests(tmp_path / "broken.json")
    (tmp_path / "text.json").write_text("hello")
    with pytest.raises(DataError, match=r"text\.json: expected a JSON list or JSON lines"):
        load_requests(tmp_path / "text.json")


# ---------------------------------------------------------------------------------------------------- ordering


def test_order_is_seeded_and_machine_independent() -> None:
    reqs = [_req(str(i), f"s{i}") for i in range(10)]
    a = order_requests(reqs, seed=0)
    assert a == order_requests(tuple(reqs), seed=0)  # same seed, same order
    assert [r.case_id for r in a] != [r.case_id for r in order_requests(reqs, seed=1)]
    assert sorted(r.case_id for r in a) == sorted(r.case_id for r in reqs)  # a permutation
    # Golden order: random.Random(0).shuffle is specified for int seeds, so this holds on every machine.
    assert [r.case_id for r in a] == ["7", "8", "1", "5", "3", "4", "2", "0", "9", "6"]
    assert order_requests(reqs, seed=3, shuffle=False) == tuple(reqs)


def test_order_does_not_touch_global_rng() -> None:
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    order_requests([_req(str(i), "s") for i in range(5)], seed=9)
    assert random.random() == expected


def test_order_slicing_and_unique_subjects() -> None:
    reqs = [_req(str(i), f"s{i % 3}") for i in range(9)]  # three requests per subject
    full = order_requests(reqs, seed=5)
    assert order_requests(reqs, seed=5, start=2, stop=6) == full[2:6]
    assert order_requests(reqs, seed=5, start=4) == full[4:]
    assert order_requests(reqs, seed=5, stop=100) == full  # clamped like a slice
    assert order_requests(reqs, seed=5, start=9) == ()
    unique = order_requests(reqs, seed=5, unique_subjects=True)
    assert len(unique) == 3 and {r.subject for r in unique} == {"s0", "s1", "s2"}
    # the first request per subject in the shuffled order is kept, in shuffled order
    firsts = []
    for r in full:
        if r.subject not in {f.subject for f in firsts}:
            firsts.append(r)
    assert unique == tuple(firsts)
    assert order_requests(reqs, seed=5, unique_subjects=True, start=1, stop=2) == (firsts[1],)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start": -1}, r"start must be >= 0, got -1"),
        ({"stop": -2}, r"stop must be >= 0 or None, got -2"),
        ({"start": 3, "stop": 2}, r"stop \(2\) must be >= start \(3\)"),
        ({"start": 5}, r"start \(5\) is past the end of the 4 requests"),
        ({"start": 3, "unique_subjects": True}, r"start \(3\) is past the end of the 2 requests after unique_subjects"),
        ({"start": 1.5}, r"start must be an int"),
    ],
)
def test_order_rejects_bad_slices(kwargs: dict[str, Any], message: str) -> None:
    reqs = [_req(str(i), f"s{i % 2}") for i in range(4)]
    with pytest.raises(ValueError, match=message):
        order_requests(reqs, seed=0, **kwargs)


def test_order_rejects_bad_seed_and_items() -> None:
    with pytest.raises(ValueError, match=r"seed must be an int"):
        order_requests([], seed="0")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"requests\[0\] is a dict"):
        order_requests([{"case_id": "x"}], seed=0)  # type: ignore[list-item]


def test_hf_uncached_name_gives_guidance_without_network() -> None:
    pytest.importorskip("datasets")
    with pytest.raises(FileNotFoundError, match=r"'seqedit-tests/not-cached' is not available locally.*save_to_disk"):
        load_requests("seqedit-tests/not-cached", format="hf")


def test_empty_optional_values_are_left_out_and_reported_required_ones_are_not(tmp_path: Path) -> None:
    """The rule (seqedit/data.py, _DROPPED): empty strings in optional prompt lists and an empty zsRE `loc` are left
    out of a kept record and listed in LoadResult.dropped; an empty required field makes the record malformed."""
    cf = _cf(0)
    cf["paraphrase_prompts"] = ["", "Danielle Darrieux spoke the language", "   "]
    cf["neighborhood_prompts"] = [""]
    result = load_requests(_write_json(tmp_path / "cf.json", [cf, _cf(1)]), format="counterfact")
    first = result.requests[0]
    assert first.paraphrase_prompts == ("Danielle Darrieux spoke the language",)
    assert first.neighborhood_prompts == () and first.attribute_prompts == tuple(_cf(0)["attribute_prompts"])
    assert [(d.index, d.field) for d in result.dropped] == [
        (0, "paraphrase_prompts[0]"), (0, "paraphrase_prompts[2]"), (0, "neighborhood_prompts[0]")]
    assert all("left out" in d.reason for d in result.dropped) and result.skipped == ()
    assert result.requests[1].paraphrase_prompts == tuple(_cf(1)["paraphrase_prompts"])

    zs = [_zsre(rephrase="", loc=""), _zsre("Ada Lovelace")]
    z = load_requests(_write_json(tmp_path / "zsre.json", zs), format="zsre")
    assert z.requests[0].paraphrase_prompts == () and z.requests[0].neighborhood_prompts == ()
    assert z.requests[1].neighborhood_prompts == ("who played desmond doss father in hacksaw ridge?",)
    assert [(d.index, d.field) for d in z.dropped] == [(0, "loc"), (0, "rephrase")]

    # required: an empty alt (the new target) is still a malformed record, raised or skipped by on_error
    bad = [_zsre(alt=""), _zsre("Ada Lovelace")]
    with pytest.raises(DataError, match="record 0.*'alt' is empty"):
        load_requests(_write_json(tmp_path / "bad.json", bad), format="zsre")
    skipped = load_requests(tmp_path / "bad.json", format="zsre", on_error="skip")
    assert [(s.index, s.field) for s in skipped.skipped] == [(0, "alt")] and skipped.dropped == ()
    assert [r.subject for r in skipped.requests] == ["Ada Lovelace"]
