"""The driver on the embedded world, end to end: `seqedit run` on world:tiny with every built-in probe and the
lm-eval downstream probe, through the CLI."""
from __future__ import annotations

import json

from _world_fixtures import tiny_cache_dir, tiny_world  # noqa: F401  (tiny_world is a fixture)

from seqedit.cli import main
from seqedit.io import read_jsonl


def test_cli_run_on_tiny_world(tiny_world, tmp_path, tmp_path_factory, capsys):
    cache = tiny_cache_dir(tmp_path_factory)
    probes = ("probes=[{name: retention, schedule: 'every:3'}, {name: unedited, schedule: 'every:3', sample: 50},"
              " {name: perplexity, schedule: 'every:6', max_docs: 50},"
              " {name: downstream, schedule: 'every:6', tasks: [world_facts, world_arithmetic], limit: 20}]")
    rc = main(["run", "model.name=world:tiny", f"cache_dir={cache}", f"runs_dir={tmp_path}", "n_edits=6",
               "editor.name=random", "editor.relative_norm=3.0", probes])
    assert rc == 0
    out = capsys.readouterr().out
    assert "finished, 6 edits" in out
    (run_dir,) = tmp_path.iterdir()
    probes_rows = read_jsonl(run_dir / "telemetry" / "probes.jsonl")
    down = [r for r in probes_rows if r["probe/name"] == "downstream"]
    assert [r["edit/index"] for r in down] == [0, 6]
    # the unedited world knows its facts; large random edits must move the downstream score
    before, after = down[0]["downstream/world_facts/acc"], down[1]["downstream/world_facts/acc"]
    assert before >= 0.9 and after < before
    unedited = [r["probe/unedited/recall"] for r in probes_rows if r["probe/name"] == "unedited"]
    assert unedited[0] >= 0.9
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["metrics"]["pre/efficacy"] is not None
