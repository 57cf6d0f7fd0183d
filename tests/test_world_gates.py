"""bench/world_gates.py (the [world] gates) on the tiny world: it runs, measures what it says, and leaves the model
as it found it. The figures themselves are the benchmark's business, not asserted here."""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
from pathlib import Path

import torch

from _world_fixtures import tiny_world  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("world_gates", ROOT / "bench" / "world_gates.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_world_gates_measure_and_restore(tiny_world, tmp_path):  # noqa: F811
    wg = _load_bench()
    world = dataclasses.replace(tiny_world, model=copy.deepcopy(tiny_world.model))
    before = {k: v.clone() for k, v in world.model.state_dict().items()}
    pairs = wg._unedited_pairs(world, 200, seed=0)
    start = wg._recall(world.model, world.tokenizer, pairs)
    updates = []
    g = wg.run_gates(world, layer=0, n_trace=8, n_single=4, n_seq=6, n_rome=4, options={"value": {"num_grad_steps": 5}},
                     tmp=tmp_path, device="cpu", check_every=3, on_update=lambda p: updates.append(sorted(p)))
    assert all(torch.equal(before[k], v) for k, v in world.model.state_dict().items())  # restored
    assert len(g["trace"]["grad_share"]) == world.config.n_layer and g["trace"]["facts_used"] > 0
    i = g["interference"]
    assert i["d_ff"] == 4 * world.config.n_embd and 0 < i["median_abs"] and i["mean_abs"] >= abs(i["mean_signed"])
    s = g["single"]
    assert s["n"] == 4 and all(0.0 <= s[k] <= 1.0 for k in ("efficacy", "paraphrase", "neighborhood"))
    assert s["median_update_rel"] > 0
    q = g["sequential_r_rome"]
    assert q["edits"] == 6 and [i for i, _ in q["unedited_recall_curve"]] == [0, 3, 6]
    assert q["unedited_recall_curve"][0][1] == start
    assert g["sequential_rome"]["edits"] == 4 and g["sequential_rome"]["pass"] is None
    assert updates[-1] == sorted(g) and len(updates) >= 4  # partial results after every gate
    text = wg.format_gates(g)
    assert "gate 1" in text and "gate 4" in text
    json.dumps(g, default=str)
