"""preflight(cfg): every bad input fails before a run dir or weights exist, naming the value and what is allowed."""
from __future__ import annotations

import dataclasses
import json

import pytest
import transformers

from seqedit.config import ProbeSpec, load_config
from seqedit.preflight import Preflight, PreflightError, preflight
from tests_support import counterfact_records, make_tiny_gpt2, make_tokenizer


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    tok = make_tokenizer()
    model = make_tiny_gpt2(len(tok))  # 2 layers
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "cf.json").write_text(json.dumps(counterfact_records(12)))
    return root


@pytest.fixture(autouse=True)
def _no_weights(monkeypatch, tmp_path):
    """Offline with an empty HF cache, and any weight load fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))

    def refuse(*args, **kwargs):
        raise AssertionError("preflight loaded model weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.GPT2LMHeadModel, "from_pretrained", refuse)
    monkeypatch.setattr("seqedit.world.build.build_world", refuse)


def config(assets, tmp_path, *extra):
    return load_config(None, [
        f"model.name={assets / 'model'}", f"data.source={assets / 'cf.json'}", f"runs_dir={tmp_path / 'runs'}",
        f"cache_dir={tmp_path / 'cache'}", "n_edits=8", *extra,
    ])


def fails(cfg, *fragments: str) -> str:
    with pytest.raises(PreflightError) as info:
        preflight(cfg)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# -- the valid paths -------------------------------------------------------------------------------------------


def test_valid_config_returns_layers_arch_and_stream_without_weights(assets, tmp_path):
    cfg = config(assets, tmp_path, "editor.name=ft", "editor.layers=[1]", "data.start=1")
    pre = preflight(cfg)
    assert isinstance(pre, Preflight)
    assert (pre.n_layers, pre.arch) == (2, "gpt2")
    assert len(pre.requests) == cfg.n_edits == 8
    assert pre.data_info["available"] == 11 and pre.data_info["format"] == "counterfact"
    assert not (tmp_path / "runs").exists()  # no run directory yet


def test_stream_is_the_ordered_slice_the_driver_would_use(assets, tmp_path):
    from seqedit.data import load_requests, order_requests

    cfg = config(assets, tmp_path, "data.seed=3", "data.start=2", "n_edits=5")
    pre = preflight(cfg)
    records = load_requests(str(assets / "cf.json")).requests
    expected = order_requests(records, seed=3, start=2)[:5]
    assert [r.case_id for r in pre.requests] == [r.case_id for r in expected]


def test_unbuilt_world_passes_without_building(tmp_path):
    cfg = load_config(None, [
        "model.name=world:tiny", "data.source=world", f"cache_dir={tmp_path / 'cache'}", "editor.layers=[1]",
        "probes=[{name: downstream, tasks: [world], schedule: never}]",
    ])
    pre = preflight(cfg)  # build_world is patched to fail: nothing is built
    assert (pre.n_layers, pre.arch, pre.requests, pre.data_info) == (2, "gpt2", None, None)
    assert not (tmp_path / "cache").exists()


def test_built_world_passes_its_paths_to_the_downstream_check(tmp_path, monkeypatch):
    from seqedit.downstream.lm_eval_probe import DownstreamProbe
    from seqedit.world.build import REQUIRED_FILES, _write_checksums, world_dir

    # A stand-in world that verify_world accepts (every required file, checksums last); its contents are never read.
    root = world_dir("tiny", tmp_path)
    for rel in REQUIRED_FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("{}\n")
    _write_checksums(root)
    seen = []
    monkeypatch.setattr(DownstreamProbe, "check", lambda self, world=None: seen.append((self.tasks, world)) or [])
    cfg = load_config(None, ["model.name=world:tiny", "data.source=world", f"cache_dir={tmp_path}",
                             "probes=[{name: downstream, tasks: [world_facts], schedule: never}]"])
    preflight(cfg)
    [(tasks, world)] = seen
    assert [t.name for t in tasks] == ["world_facts"]  # not dropped: the world's files exist
    assert world.downstream_dir == root / "downstream" and world.heldout_path == root / "heldout.txt"


# -- model -----------------------------------------------------------------------------------------------------


def test_unknown_world_preset(assets, tmp_path):
    fails(config(assets, tmp_path, "model.name=world:huge"), "model.name", "world:huge", "allowed:", "tiny", "small")


def test_missing_local_model_path(assets, tmp_path):
    missing = tmp_path / "no-such-model"
    fails(config(assets, tmp_path, f"model.name={missing}"), "model.name", str(missing), "no such path",
          "hub id", "world:<preset>")


def test_hub_id_not_in_offline_cache(assets, tmp_path):
    fails(config(assets, tmp_path, "model.name=someorg/not-cached"), "'someorg/not-cached'", "HF_HUB_OFFLINE",
          "local path")


def test_tokenizer_larger_than_the_model_vocabulary_fails_before_weights(assets, tmp_path):
    import shutil

    folder = tmp_path / "mismatched"
    shutil.copytree(assets / "model", folder)
    big = make_tokenizer(vocab_size=400)
    small_rows = transformers.AutoConfig.from_pretrained(folder).vocab_size
    assert len(big) > small_rows
    big.save_pretrained(folder)
    fails(config(assets, tmp_path, f"model.name={folder}"), f"tokenizer has {len(big)} tokens",
          f"embedding has {small_rows} rows")
    assert not (tmp_path / "runs").exists()


def test_unsupported_model_type(assets, tmp_path):
    folder = tmp_path / "bert-like"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 2}))
    fails(config(assets, tmp_path, f"model.name={folder}"), "model.name", "'bert'", "supported model types",
          "gpt2", "llama")


# -- editor ----------------------------------------------------------------------------------------------------


def test_editor_layer_out_of_range(assets, tmp_path):
    fails(config(assets, tmp_path, "editor.name=ft", "editor.layers=[0, 5]"), "editor.layers=[0, 5]", "layer 5",
          "0..1")


def test_world_editor_layer_out_of_range_uses_the_preset_depth(tmp_path):
    cfg = load_config(None, ["model.name=world:tiny", f"cache_dir={tmp_path}", "editor.layers=[2]"])
    fails(cfg, "editor.layers=[2]", "layer 2", "0..1")  # world:tiny has 2 layers


# -- data ------------------------------------------------------------------------------------------------------


def test_missing_data_file(assets, tmp_path):
    missing = tmp_path / "absent.json"
    fails(config(assets, tmp_path, f"data.source={missing}"), "data.source", str(missing), "does not exist",
          ".json/.jsonl", "hf:<name>")


def test_malformed_data_file(assets, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("this is not JSON\n")
    fails(config(assets, tmp_path, f"data.source={bad}"), "data.source", str(bad), "JSON list or JSON lines")


def test_n_edits_larger_than_stream(assets, tmp_path):
    fails(config(assets, tmp_path, "n_edits=50", "data.start=4"), "n_edits=50", "only 8", str(assets / "cf.json"))


def test_bad_slice(assets, tmp_path):
    fails(config(assets, tmp_path, "data.start=5", "data.stop=2"), "start=5", "stop=2", "must be >= start")


def test_world_source_needs_world_model(assets, tmp_path):
    fails(config(assets, tmp_path, "data.source=world"), "data.source=world", "world:<preset>",
          repr(str(assets / "model")))


# -- probes ----------------------------------------------------------------------------------------------------


def test_unknown_bundled_downstream_task(assets, tmp_path):
    # load_config would reject it already; a config built in code reaches preflight with it
    cfg = dataclasses.replace(config(assets, tmp_path),
                              probes=(ProbeSpec("downstream", "never", {"tasks": ["world_fact"]}),))
    fails(cfg, "'world_fact'", "allowed:", "Did you mean 'world_facts'")


def test_world_tasks_on_a_non_world_model(assets, tmp_path):
    cfg = config(assets, tmp_path, "probes=[{name: downstream, tasks: [world_facts], schedule: never}]")
    fails(cfg, "probes[0].tasks=['world_facts']", "no world data directory", "data_dir")


def test_unknown_lm_eval_task(assets, tmp_path):
    # Not one of ours, so only lm-eval's task index (built offline, ~10 s) can reject it.
    cfg = config(assets, tmp_path, "probes=[{name: downstream, tasks: [sst3], schedule: never}]")
    fails(cfg, "probes[0].tasks=['sst3']", "'sst3'", "allowed:", "Did you mean 'sst2'")


def test_downstream_label_outside_the_choices_fails_before_a_run_dir(assets, tmp_path):
    local = tmp_path / "glue"
    local.mkdir()
    rows = [{"sentence": "A fine film.", "label": 1}, {"sentence": "A dull film.", "label": "neg"}]
    (local / "sst2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config(assets, tmp_path, f"probes=[{{name: downstream, tasks: [sst2_local], local_data_dir: {local}, "
                                   "schedule: never}]")
    fails(cfg, "probes[0].tasks=['sst2_local']", "sst2.jsonl' line 2", "'label' = 'neg'",
          "allowed: 0 ('negative'), 1 ('positive')")
    assert not (tmp_path / "runs").exists()


def test_perplexity_without_text_names_a_key_the_config_accepts(assets, tmp_path):
    import re

    msg = fails(config(assets, tmp_path, "probes=[{name: perplexity, schedule: never}]"), "probes[0] (perplexity)",
                "no text to score")
    assert not (tmp_path / "runs").exists()
    # The message shows the override to write; written as shown (with a real file), it is accepted and passes.
    (suggested,) = re.findall(r"probes=\[\{name: perplexity, [a-z_]+: [^}]+\}\]", msg)
    text = tmp_path / "held.txt"
    text.write_text("one document\nanother document\n")
    key = re.search(r"name: perplexity, ([a-z_]+):", suggested).group(1)
    assert key == "path"
    cfg = config(assets, tmp_path, re.sub(r": /[^}]+\}", f": {text}}}", suggested))
    assert dict(cfg.probes[0].options)["path"] == str(text)
    preflight(cfg)
    fails(config(assets, tmp_path, f"probes=[{{name: perplexity, path: {tmp_path / 'nope.txt'}}}]"),
          "nope.txt' is not a file")


# -- statistics text of the locate-then-edit editors ---------------------------------------------------------------


@pytest.mark.parametrize("editor", ["rome", "memit", "alphaedit"])
def test_locate_then_edit_needs_statistics_text_on_a_real_model(assets, tmp_path, editor):
    fails(config(assets, tmp_path, f"editor.name={editor}", "editor.layers=[0]"),
          "editor.stats.source is empty", editor, "save_to_disk")
    fails(config(assets, tmp_path, f"editor.name={editor}", "editor.layers=[0]",
                 f"editor.stats.source=[{tmp_path / 'missing.txt'}]"),
          "editor.stats.source=", "missing.txt", "not found")
    (tmp_path / "wiki.csv").write_text("a,b\n")
    fails(config(assets, tmp_path, f"editor.name={editor}", "editor.layers=[0]",
                 f"editor.stats.source=[{tmp_path / 'wiki.csv'}]"), "unsupported file type '.csv'")
    (tmp_path / "wiki.txt").write_text("some text\n")
    ok = preflight(config(assets, tmp_path, f"editor.name={editor}", "editor.layers=[0]",
                          f"editor.stats.source=[{tmp_path / 'wiki.txt'}]"))
    assert ok.n_layers == 2
    assert not (tmp_path / "runs").exists()
    # without C the published ROME variant of EasyEdit needs no text
    if editor == "rome":
        preflight(config(assets, tmp_path, "editor.name=rome", "editor.mom2_adjustment=false"))
