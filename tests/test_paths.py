"""`~` in every user path (issue #12): expanded once, when the config object holding it is built."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from seqedit.config import load_config
from seqedit.data import load_requests
from seqedit.driver import run
from seqedit.io import read_jsonl
from tests_support import counterfact_records, write_driver_assets


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    """A fake HOME: `~` means this folder for the test (os.path.expanduser reads $HOME)."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    assert Path("~").expanduser() == h
    return h


def test_every_path_of_a_config_is_expanded(home):
    cfg = load_config(None, [
        "model.name=~/models/tiny", "data.source=~/data/cf.json", "runs_dir=~/runs", "cache_dir=~/cache",
        "editor.name=rome", "editor.stats.source=[~/text/wiki.txt, hf:~/text/saved]",
        "probes=[{name: perplexity, path: ~/text/held.txt}, {name: downstream, tasks: [sst2_local],"
        " local_data_dir: ~/glue, data_dir: ~/world, heldout_path: ~/world/heldout.txt}]",
    ])
    assert cfg.model.name == f"{home}/models/tiny"
    assert cfg.data.source == f"{home}/data/cf.json"
    assert (cfg.runs_dir, cfg.cache_dir) == (f"{home}/runs", f"{home}/cache")
    assert cfg.editor.options["stats"]["source"] == [f"{home}/text/wiki.txt", f"hf:{home}/text/saved"]
    perplexity, downstream = (dict(p.options) for p in cfg.probes)
    assert perplexity["path"] == f"{home}/text/held.txt"
    assert downstream["local_data_dir"] == f"{home}/glue" and downstream["data_dir"] == f"{home}/world"
    assert downstream["heldout_path"] == f"{home}/world/heldout.txt"
    assert "~" not in json.dumps(cfg.to_dict())  # what config.yaml records is the real path
    # Written once, read the same: "~/x" and the expanded path are one config.
    assert load_config(None, ["data.source=~/data/cf.json"]).config_hash() == load_config(
        None, [f"data.source={home}/data/cf.json"]).config_hash()
    # hub ids and the world are not paths
    assert load_config(None, ["model.name=gpt2", "data.source=world"]).model.name == "gpt2"
    assert load_config(None, ["data.source=hf:org/name:train"]).data.source == "hf:org/name:train"


def test_loaders_read_tilde_files_and_saved_datasets(home):
    import datasets

    (home / "cf.json").write_text(json.dumps(counterfact_records(4)))
    assert len(load_requests("~/cf.json").requests) == 4
    rows = [{k: v for k, v in r.items() if k != "requested_rewrite"} | r["requested_rewrite"]
            for r in counterfact_records(3)]
    native = [{"case_id": str(i), "prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"]["str"]}
              for i, r in enumerate(rows)]
    datasets.Dataset.from_list(native).save_to_disk(str(home / "saved"))
    assert len(load_requests("hf:~/saved").requests) == 3


def test_a_run_configured_with_tilde_paths_only(home):
    write_driver_assets(home / "assets")
    glue = home / "glue"
    glue.mkdir()
    (glue / "sst2.jsonl").write_text("".join(json.dumps({"sentence": s, "label": i % 2}) + "\n"
                                             for i, s in enumerate(["Fine.", "Dull.", "Good."])))
    cfg = load_config(None, [
        "model.name=~/assets/model", "data.source=~/assets/cf.json", "runs_dir=~/runs", "cache_dir=~/cache",
        "n_edits=1", "editor.name=rome", "editor.layers=[0]", "editor.value.num_grad_steps=2",
        "editor.stats.source=[~/assets/text.txt]", "editor.stats.n_samples=20",
        "probes=[{name: perplexity, path: ~/assets/text.txt, schedule: never},"
        " {name: downstream, tasks: [sst2_local], local_data_dir: ~/glue, limit: 3, schedule: never}]",
    ])
    summary = run(cfg)
    assert summary.status == "finished"
    assert summary.run_dir.parent == home / "runs"  # not ./~/runs
    assert list((home / "cache" / "stats").glob("mom2_*"))  # the statistics cache went to ~/cache too
    at_start = {r["probe/name"]: r for r in read_jsonl(summary.run_dir / "telemetry" / "probes.jsonl")
                if r["edit/index"] == 0}  # every probe runs once before the first edit, whatever its schedule
    assert at_start["perplexity"]["probe/perplexity/nll"] > 0
    assert at_start["downstream"]["downstream/sst2_local/n"] == 3.0
    assert not (Path.cwd() / "~").exists()
