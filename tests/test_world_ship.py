"""Shipped worlds (issue [world-ship]): the machinery on a throwaway micro world shipped into a temporary package
folder. The real shipped build is checked in test_world_shipped.py."""
from __future__ import annotations

import json
import shutil

import pytest
from _world_fixtures import micro_config

from seqedit.cli import main
from seqedit.driver import ResumeRefused, RunState, run
from seqedit.config import load_config
from seqedit.preflight import PreflightError
from seqedit.world import build as world_build
from seqedit.world import train as world_train
from seqedit.world import (
    PRESETS,
    WorldIntegrityError,
    build_id,
    build_world,
    load_world,
    locate_world,
    world_info,
)


@pytest.fixture()
def shipped_micro(tmp_path, monkeypatch):
    """A `micro` preset with a shipped build (built once into a cache, copied into a fake package folder)."""
    cfg = micro_config()
    monkeypatch.setitem(PRESETS, "micro", cfg)
    built = build_world(cfg, cache_dir=tmp_path / "build-cache")
    root = tmp_path / "package" / "shipped"
    shutil.copytree(built, root / "micro")
    monkeypatch.setattr(world_build, "SHIPPED_ROOT", root)
    return root / "micro"


def _no_training(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a shipped world must load without training")

    monkeypatch.setattr(world_train, "train_model", refuse)


def test_shipped_world_loads_without_a_build_and_local_is_separate(shipped_micro, tmp_path, monkeypatch):
    cache = tmp_path / "user-cache"
    _no_training(monkeypatch)
    w = load_world("micro", cache_dir=cache)
    assert w.path == shipped_micro and w.source == "shipped"
    assert not (cache / "worlds").exists()  # nothing was built or copied into the user's cache
    ident = w.identity()
    assert ident["build_id"] == build_id(shipped_micro) and ident["source"] == "shipped"
    assert ident["config_hash"] == micro_config().config_hash()
    assert world_info("world:micro", cache_dir=cache)["source"] == "shipped"

    # world:micro@local is this machine's build, in the cache, never the shipped folder
    loc = locate_world("world:micro@local", cache_dir=cache)
    assert loc.source == "local" and loc.path.parent == cache / "worlds"
    info = world_info("micro@local", cache_dir=cache)
    assert info["source"] == "local" and not info["built"] and info["problem"] == "missing"


@pytest.mark.parametrize("damage", ["model.safetensors", "counterfact.json", "checksums.json"])
def test_a_damaged_shipped_world_is_refused_with_a_clear_message(shipped_micro, tmp_path, damage, monkeypatch):
    _no_training(monkeypatch)
    target = shipped_micro / damage
    if damage == "checksums.json":
        target.unlink()
        expected = "no checksums.json"
    else:
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped byte
        target.write_bytes(bytes(data))
        expected = f"checksum mismatch in {damage}"
    with pytest.raises(WorldIntegrityError, match=expected) as e:
        load_world("micro", cache_dir=tmp_path)
    assert "damaged" in str(e.value) and "--rebuild" in str(e.value) and "world:micro@local" in str(e.value)
    info = world_info("micro", cache_dir=tmp_path)
    assert not info["built"] and expected in info["problem"]
    # the run stops in preflight: no run directory is made
    cfg = load_config(None, ["model.name=world:micro", f"cache_dir={tmp_path}", f"runs_dir={tmp_path / 'runs'}",
                             "n_edits=2", "editor.name=random", "probes=[]"])
    with pytest.raises(PreflightError, match=expected):
        run(cfg)
    assert not (tmp_path / "runs").exists()


def test_a_shipped_build_of_another_config_is_refused(shipped_micro, tmp_path, monkeypatch):
    monkeypatch.setitem(PRESETS, "micro", micro_config(seed=1))  # the preset changed, the shipped build did not
    with pytest.raises(WorldIntegrityError, match="built from config hash .* the preset now hashes to"):
        load_world("micro", cache_dir=tmp_path)


def test_runs_record_the_build_and_refuse_to_resume_on_another(shipped_micro, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    overrides = ["model.name=world:micro", f"cache_dir={tmp_path}", f"runs_dir={runs}", "n_edits=4",
                 "editor.name=random", "probes=[]", "wandb.mode=disabled"]
    summary = run(load_config(None, overrides))
    data = json.loads((summary.run_dir / "summary.json").read_text())
    assert data["world"]["build_id"] == build_id(shipped_micro) and data["world"]["source"] == "shipped"
    state = RunState.load(summary.run_dir)
    assert state.world == data["world"]

    # Another build under the same name (here: the same weights with another report, so another build id): a run
    # that was interrupted must not continue on it.
    state.status = "preempted"
    state.save(summary.run_dir)
    report = json.loads((shipped_micro / "report.json").read_text())
    (shipped_micro / "report.json").write_text(json.dumps({**report, "build_seconds": 1.0}))
    world_build._write_checksums(shipped_micro)
    assert build_id(shipped_micro) != data["world"]["build_id"]
    with pytest.raises(ResumeRefused, match="another build"):
        run(load_config(None, overrides), run_dir=summary.run_dir)


def test_cli_world_build_of_a_shipped_preset(shipped_micro, tmp_path, capsys):
    cache = tmp_path / "user-cache"
    assert main(["world", "build", "micro", "--cache-dir", str(cache)]) == 0
    captured = capsys.readouterr()
    assert "ships with seqedit" in captured.err and not (cache / "worlds").exists()
    assert json.loads(captured.out)["source"] == "shipped"

    assert main(["world", "build", "micro", "--rebuild", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    local = locate_world("micro@local", cache_dir=cache)
    assert local.source == "local" and world_info("micro@local", cache_dir=cache)["built"]
    assert f"shipped {build_id(shipped_micro)}" in out and f"local {build_id(local.path)}" in out
    row = next(line.split() for line in out.splitlines() if line.startswith("recall_edit"))
    shipped_report = json.loads((shipped_micro / "report.json").read_text())
    local_report = json.loads((local.path / "report.json").read_text())
    assert row[1:] == [str(shipped_report["recall_edit"]), str(local_report["recall_edit"])]
    assert "model.name=world:micro@local" in out
