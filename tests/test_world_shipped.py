"""The world builds that ship with the package (issue [world-ship]): intact, what their presets say, and their
recorded figures reproduced by evaluating the shipped weights (not by retraining)."""
from __future__ import annotations

import json

import pytest

from seqedit.world import generator, get_preset, load_world, shipped_presets
from seqedit.world import train as world_train
from seqedit.world.build import SHIPPED_ROOT, check_shipped

# The presets that must ship: the default job's world.
SHIPPED = ("standard",)
# Re-evaluating on another machine (other CPU kernels, thread counts) may flip a near-tie argmax; the recorded figures
# are fractions of 900-10,000 items, so this is a handful of items.
TOLERANCE = 0.003


def test_the_shipped_presets_are_there_and_intact():
    assert set(SHIPPED) <= set(shipped_presets())
    for preset in shipped_presets():
        check_shipped(preset, SHIPPED_ROOT / preset)  # checksums + config hash = the preset's


@pytest.mark.parametrize("preset", SHIPPED)
def test_the_generator_still_writes_the_shipped_records(preset):
    """The shipped records are what today's generator makes of the preset: the code did not drift from the build."""
    world = generator.generate_world(get_preset(preset))
    shipped = json.loads((SHIPPED_ROOT / preset / "counterfact.json").read_text())
    assert shipped == world.records
    for task, rows in (("facts_mc", world.facts_mc), ("arithmetic", world.arithmetic_mc),
                       ("ordering", world.ordering_mc)):
        lines = (SHIPPED_ROOT / preset / "downstream" / f"{task}.jsonl").read_text().splitlines()
        assert [json.loads(x) for x in lines] == rows, task


@pytest.mark.parametrize("preset", SHIPPED)
def test_recorded_recall_and_skills_are_reproduced_by_evaluation(preset, tmp_path):
    w = load_world(preset, cache_dir=tmp_path)
    assert w.source == "shipped" and not (tmp_path / "worlds").exists()
    rep = w.report
    records = w.records()
    edit = world_train.recall(w.model, w.tokenizer, [
        (r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"]),
         r["requested_rewrite"]["target_true"]["str"]) for r in records])
    assert edit["n"] == rep["n_records"] == len(records)
    assert abs(edit["exact"] - rep["recall_edit"]) <= TOLERANCE, (edit, rep["recall_edit"])
    for task, path in w.downstream_tasks().items():
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        acc = world_train.mc_accuracy(w.model, w.tokenizer, rows)
        assert abs(acc - rep["downstream"][task]) <= TOLERANCE, (task, acc, rep["downstream"][task])


def test_the_default_job_shortened_runs_on_the_shipped_world_and_ends_with_a_report(tmp_path, capsys, monkeypatch):
    """README command 1 with fewer edits: the default config as shipped (world:standard, ROME, every probe kind),
    nothing built, a report at the end."""
    from seqedit.cli import main
    from seqedit.world import build_id

    def refuse(*a, **k):
        raise AssertionError("the default job must not build a world")

    monkeypatch.setattr(world_train, "train_model", refuse)
    monkeypatch.chdir(tmp_path)  # no runs/configs here: the config shipped inside the package is used
    rc = main(["run", f"runs_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}", "n_edits=3"])
    assert rc == 0
    out = capsys.readouterr().out
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["n_edits"] == 3
    assert summary["world"]["source"] == "shipped"
    assert summary["world"]["build_id"] == build_id(SHIPPED_ROOT / "standard")
    assert summary["metrics"]["immediate/efficacy"] is not None
    names = {json.loads(x)["probe/name"] for x in (run_dir / "telemetry" / "probes.jsonl").read_text().splitlines()}
    assert {"retention", "unedited", "perplexity", "downstream"} <= names
    assert (run_dir / "report" / "index.html").is_file() and "report:" in out
    assert not (tmp_path / "cache" / "worlds").exists()
