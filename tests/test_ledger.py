"""The edit ledger and the snapshots: exact round trips, damage detected and cut, atomic snapshot sets."""
from __future__ import annotations

import pytest
import torch

from seqedit.apply import materialise
from seqedit.checkpoint import (RunLock, RunLocked, capture_rng, latest_good, prune, restore_rng, verify_snapshot,
                                write_snapshot)
from seqedit.ledger import Ledger


def _rank(r: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    left, right = torch.randn(40, r, generator=g), torch.randn(24, r, generator=g)
    return left, right


def test_materialise_rank_one_equals_the_float32_outer_product():
    left, right = _rank(1)
    assert torch.equal(materialise(left, right), left @ right.T)
    assert torch.equal(materialise(left[:, 0], right[:, 0]), torch.outer(left[:, 0], right[:, 0]))


def test_ledger_round_trip_is_bit_exact_and_compact(tmp_path):
    led = Ledger.open(tmp_path / "ledger")
    left, right = _rank(3)
    factored = materialise(left, right)
    dense = torch.randn(40, 24, dtype=torch.float64)
    led.append(0, 1, ["a"], {"w": factored}, {"w": (left, right)}, norm=1.0)
    led.append(1, 2, ["b"], {"w": dense}, None, norm=2.0)
    led.append(2, 3, ["c"], {"w": dense + 1}, {"w": (left, right)}, norm=3.0)  # factors do not reproduce it
    again = Ledger.open(tmp_path / "ledger")
    assert [r.params["w"]["kind"] for r in again.records] == ["factors", "dense", "dense"]
    assert torch.equal(again.read(0)["w"], factored)
    assert torch.equal(again.read(1)["w"], dense) and again.read(1)["w"].dtype == torch.float64
    assert torch.equal(again.read(2)["w"], dense + 1)
    assert again.records[0].nbytes < 40 * 24 * 4 / 3  # rank 3 factors: (40 + 24) * 3 floats + header
    assert [r.norm for r in again.records] == [1.0, 2.0, 3.0]


def test_interrupted_append_is_cut_and_appending_continues(tmp_path):
    led = Ledger.open(tmp_path / "l")
    for b in range(3):
        led.append(b, b + 1, [str(b)], {"w": torch.full((4, 4), float(b))}, norm=float(b))
    shard = led.shard_path(0)
    size = shard.stat().st_size
    with open(shard, "ab") as f:  # bytes of a fourth record whose index line never made it
        f.write(b"x" * 100)
    with open(led.index_path, "a") as f:  # and a partial index line
        f.write('{"batch": 3, "edit_ind')
    again = Ledger.open(tmp_path / "l")
    assert len(again) == 3 and not again.problems  # an interrupted append is normal, not damage
    assert shard.stat().st_size == size
    again.append(3, 4, ["3"], {"w": torch.ones(4, 4)}, norm=1.0)
    assert torch.equal(Ledger.open(tmp_path / "l").read(3)["w"], torch.ones(4, 4))


def test_corrupt_record_is_detected_reported_and_cut(tmp_path):
    led = Ledger.open(tmp_path / "l")
    for b in range(4):
        led.append(b, b + 1, [str(b)], {"w": torch.full((8, 8), float(b))}, norm=1.0)
    rec = led.records[2]
    with open(led.shard_path(0), "r+b") as f:
        f.seek(rec.offset + rec.nbytes - 3)
        f.write(b"\xff\xfe\xfd")
    again = Ledger.open(tmp_path / "l")
    assert len(again) == 2
    assert len(again.problems) == 1 and "batch 2" in again.problems[0] and "checksum" in again.problems[0]
    assert len(again.index_path.read_text().splitlines()) == 2  # the index now says what is usable
    assert again.shard_path(0).stat().st_size == rec.offset


def test_rng_capture_restores_every_generator():
    import random

    import numpy as np

    state = capture_rng()
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    restore_rng(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a


def test_snapshots_verify_fall_back_and_prune(tmp_path):
    w = {"p": torch.arange(6.0).reshape(2, 3)}
    for n in (0, 10, 20, 30):
        write_snapshot(tmp_path, {"p": w["p"] + n}, {"editor": {}, "rng": capture_rng()},
                       {"edits_done": n, "next_batch": n})
    assert latest_good(tmp_path).edits_done == 30
    assert latest_good(tmp_path, max_batch=25).edits_done == 20  # never ahead of the verified ledger
    # damage the newest: truncated params file -> reported, the previous one is used
    params = tmp_path / "snapshots" / "snap-00000030" / "params.safetensors"
    params.write_bytes(params.read_bytes()[:-5])
    problems: list[str] = []
    snap = latest_good(tmp_path, report=problems.append)
    assert snap.edits_done == 20 and torch.equal(snap.params()["p"], w["p"] + 20)
    assert "snap-00000030" in problems[0] and "truncated" in problems[0]
    assert verify_snapshot(params.parent)[0] is None
    # keep the newest 2 plus milestones (0 here)
    removed = prune(tmp_path, keep_last=2, is_milestone=lambda n: n == 0)
    assert [p.name for p in removed] == ["snap-00000010"]
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == ["snap-00000000", "snap-00000020",
                                                                          "snap-00000030"]


def test_run_lock_refuses_a_second_holder(tmp_path):
    with RunLock(tmp_path):
        assert RunLock.is_locked(tmp_path)
        with pytest.raises(RunLocked, match="in use by another process"):
            RunLock(tmp_path).acquire()
    assert not RunLock.is_locked(tmp_path)


def test_rejected_records_before_any_shard_survive_open(tmp_path):
    from seqedit.ledger import Ledger

    led = Ledger.open(tmp_path / "ledger")
    led.append(0, 1, ["a"], {}, norm=5.0, status="rejected", reason="update_norm: too big")
    again = Ledger.open(tmp_path / "ledger")
    assert again.problems == [] and [r.status for r in again.records] == ["rejected"]
    assert again.records[0].reason == "update_norm: too big" and again.read(0) == {}
