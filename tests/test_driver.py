"""End-to-end driver runs on a tiny local GPT-2 and a hand-made CounterFact file (no world build needed)."""
from __future__ import annotations

import json
import re

import pytest
import torch

from seqedit.config import load_config
from seqedit.driver import RunError, run
from seqedit.io import read_jsonl
from seqedit.metrics import evaluate_requests
from seqedit.data import load_requests
from seqedit.wandb_sink import find_offline_run_file, read_offline_history
from seqedit.weights import sigma_max
from tests_support import make_tiny_gpt2, make_tokenizer, write_driver_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    write_driver_assets(root)
    return root


def config(assets, tmp_path, *extra):
    return load_config(None, [
        f"model.name={assets / 'model'}", f"data.source={assets / 'cf.json'}", f"runs_dir={tmp_path / 'runs'}",
        f"cache_dir={tmp_path / 'cache'}", "n_edits=8", *extra,
    ])


PROBES = ("probes=[{name: retention, schedule: 'every:4'}, {name: unedited, schedule: 'every:4'},"
          " {name: perplexity, schedule: 'every:4', path: %s}, {name: gen_entropy, schedule: 'every:4', n_prompts: 2,"
          " max_new_tokens: 8}, {name: spectrum, schedule: 'every:4|signal:norm_spike'}]")


def test_full_run_writes_streams_matrix_and_wandb(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = config(assets, tmp_path, "editor.name=random", "editor.relative_norm=0.05", "batch_size=2",
                 PROBES % (assets / "text.txt"), "wandb.mode=offline")
    summary = run(cfg)
    d = summary.run_dir
    assert summary.status == "finished" and summary.n_edits == 8
    edits = read_jsonl(d / "telemetry" / "edits.jsonl")
    assert [r["edit/index"] for r in edits] == [2, 4, 6, 8]
    assert all(r["eval/protocol"] == "immediate" for r in edits)
    probes = read_jsonl(d / "telemetry" / "probes.jsonl")
    names = [(r["edit/index"], r["probe/name"]) for r in probes]
    assert (0, "baseline") in names and (4, "retention") in names and (8, "retention") in names
    assert (8, "final") in names and (4, "spectrum") in names
    ret8 = next(r for r in probes if r["probe/name"] == "retention" and r["edit/index"] == 8)
    assert ret8["probe/retention/n"] == 8.0
    items = read_jsonl(d / "telemetry" / "items-retention.jsonl")
    assert len(items) == 4 + 8 + 0  # 0 edits at the forced pre-run check, 4 at edit 4, 8 at edit 8
    matrix = (d / "retention_matrix.csv").read_text().splitlines()
    assert matrix[0] == "position,case_id,4,8"  # columns: the edit index of each check
    assert len(matrix) == 1 + 8  # one row per edit; edits made after a check are blank in its column
    assert matrix[5].endswith(",,1.0") or matrix[5].endswith(",,0.0")
    state = json.loads((d / "state.json").read_text())
    assert state["status"] == "finished" and state["edits_done"] == 8 and state["log_seq"] == len(edits) + len(
        probes)
    assert json.loads((d / "heartbeat.json").read_text())["state"] == "finished"
    assert (d / "config.yaml").read_text().startswith(f"# config_hash: {cfg.config_hash()}")
    # what reached wandb, read back from the offline run file
    history = _history_eventually(d)
    logged = [h for h in history if "immediate/efficacy" in h]
    assert [h["edit/index"] for h in logged] == [2, 4, 6, 8]
    w = "weights/transformer.h.0.mlp.c_proj.weight/delta_fro"
    assert [h[w] for h in logged] == pytest.approx([r[w] for r in edits])
    assert any("probe/retention/efficacy" in h for h in history)
    # the end products are in the wandb run too: the matrix as a table, the local files among the run's files
    table = next(h for h in history if "retention/matrix/_type" in h)
    assert table["edit/index"] == 8 and table["retention/matrix/_type"] == "table-file"
    assert table["retention/matrix/nrows"] == 8 and table["retention/matrix/ncols"] == 4  # position, case_id, 4, 8
    files = find_offline_run_file(d).parent / "files"
    assert (files / "retention_matrix.csv").read_text() == (d / "retention_matrix.csv").read_text()
    assert (files / "telemetry" / "edits.jsonl").is_file() and (files / "telemetry" / "probes.jsonl").is_file()


def _history_eventually(run_dir, timeout: float = 20.0) -> list[dict]:
    """The wandb service writes the offline file asynchronously; a second run in the same process was seen to return
    from finish() before its records reached the file. Poll until the history stops growing."""
    import time

    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        path = find_offline_run_file(run_dir)
        history = read_offline_history(path) if path else []
        if history and history == last:
            return history
        last = history
        time.sleep(0.5)
    return last or []


def test_metric_keys_are_pinned(assets, tmp_path):
    summary = run(config(assets, tmp_path, "editor.name=ft", "n_edits=2", "editor.num_steps=2"))
    (rec, *_) = read_jsonl(summary.run_dir / "telemetry" / "edits.jsonl")
    keys = {re.sub(r"^weights/[^/]+/", "weights/<param>/", k) for k in rec}
    assert keys == {
        "edit/index", "edit/batch", "edit/case_ids", "edit/seconds", "edit/status", "system/rss_mb",
            "system/peak_memory_mb", "eval/protocol",
        "editor/ft/loss_first", "editor/ft/loss_last", "editor/ft/steps",
        "weights/<param>/delta_fro", "weights/<param>/delta_sigma_max", "weights/<param>/drift_fro",
        "weights/<param>/drift_rel", "weights/<param>/norm_fro", "weights/<param>/nonfinite",
        "immediate/efficacy", "immediate/paraphrase", "immediate/neighborhood", "immediate/prob_new",
        "log/seq", "log/time",
    }
    assert set(summary.metrics) >= {"pre/efficacy", "final/efficacy", "immediate/efficacy", "edit/seconds_mean"}


def test_telemetry_matches_direct_computation(assets, tmp_path):
    summary = run(config(assets, tmp_path, "editor.name=random", "editor.norm=0.5", "n_edits=3"))
    rows = read_jsonl(summary.run_dir / "telemetry" / "edits.jsonl")
    p = "weights/transformer.h.0.mlp.c_proj.weight/"
    for r in rows:
        assert r[p + "delta_fro"] == pytest.approx(0.5, rel=1e-5)
        assert r[p + "delta_sigma_max"] == pytest.approx(0.5, rel=1e-5)  # rank one: σ_max = ‖Δ‖_F
    # replay the same deltas by hand and compare drift and norms
    from seqedit.editors.base import EditorContext, get_editor

    tok = make_tokenizer()
    model = make_tiny_gpt2(len(tok))
    cls = get_editor("random")
    ed = cls(cls.Config(norm=0.5))
    ed.prepare(model, tok, EditorContext.for_model(model, seed=0))
    reqs = [r for r in load_requests(assets / "cf.json").requests]
    order = json.loads((summary.run_dir / "data.json").read_text())["case_ids"]
    by_id = {r.case_id: r for r in reqs}
    name = "transformer.h.0.mlp.c_proj.weight"
    w0 = model.get_parameter(name).detach().clone()
    w = w0.clone()
    for r, cid in zip(rows, order):
        w += ed.compute(model, tok, [by_id[cid]]).deltas[name]
        assert r[p + "drift_fro"] == pytest.approx(float((w - w0).norm()), rel=1e-4)
        assert r[p + "norm_fro"] == pytest.approx(float(w.norm()), rel=1e-5)
        assert r[p + "drift_rel"] == pytest.approx(float((w - w0).norm() / w0.norm()), rel=1e-4)


def test_sigma_max_power_iteration():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(20, 12, generator=g)
    assert sigma_max(m) == pytest.approx(float(torch.linalg.svdvals(m)[0]), rel=1e-4)
    u, v = torch.randn(20, 1, generator=g), torch.randn(12, 1, generator=g)
    assert sigma_max(u @ v.T, (u, v)) == pytest.approx(float(torch.linalg.svdvals(u @ v.T)[0]), rel=1e-5)


@pytest.mark.parametrize("batch_size", [3, 64])  # 3: prompts are length-sorted across several batches
def test_batched_scoring_equals_one_at_a_time(assets, batch_size):
    tok = make_tokenizer()
    model = make_tiny_gpt2(len(tok))
    reqs = list(load_requests(assets / "cf.json").requests)
    batched = evaluate_requests(model, tok, reqs, batch_size=batch_size)
    single = [evaluate_requests(model, tok, [r], batch_size=1)[0] for r in reqs]
    for a, b in zip(batched, single):
        assert a.efficacy == b.efficacy and a.paraphrase == b.paraphrase and a.neighborhood == b.neighborhood
        assert a.prob_new == pytest.approx(b.prob_new, rel=1e-5)


def test_spike_detector_and_alert(assets, tmp_path):
    summary = run(config(assets, tmp_path, "editor.name=random", "editor.spike_probability=0.3",
                         "editor.spike_factor=50", "telemetry.spike_warmup=2", "n_edits=12",
                         "probes=[{name: spectrum, schedule: 'signal:norm_spike'}]"))
    alerts = read_jsonl(summary.run_dir / "telemetry" / "alerts.jsonl")
    edits = read_jsonl(summary.run_dir / "telemetry" / "edits.jsonl")
    spiked = [r["edit/index"] for r in edits if r.get("edit/norm_spike")]
    assert spiked and [a["edit/index"] for a in alerts if a["alert/kind"] == "norm_spike"] == spiked
    probes = read_jsonl(summary.run_dir / "telemetry" / "probes.jsonl")
    assert [r["edit/index"] for r in probes if r["probe/name"] == "spectrum"] == [0, *spiked]


def test_wandb_failure_does_not_stop_the_run(assets, tmp_path, monkeypatch, caplog):
    import wandb

    def broken(*a, **k):
        raise ConnectionError("wandb unreachable")

    monkeypatch.setattr(wandb, "init", broken)
    summary = run(config(assets, tmp_path, "editor.name=noop", "n_edits=2", "wandb.mode=online"))
    assert summary.status == "finished"
    assert sum("wandb init failed" in r.message for r in caplog.records) == 1


def test_wandb_online_without_network_falls_back_to_offline_within_the_timeout(assets, tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "http://192.0.2.1:9")  # TEST-NET-1 (RFC 5737): never routed anywhere
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # logged in, so the init really tries the server
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    said: list[str] = []
    t0 = time.perf_counter()
    summary = run(config(assets, tmp_path, "editor.name=noop", "n_edits=2", "wandb.mode=online",
                         "wandb.init_timeout_s=2"), progress=said.append)
    seconds = time.perf_counter() - t0
    assert summary.status == "finished"
    assert seconds < 20, f"wandb init took {seconds:.1f} s despite init_timeout_s=2 (wandb's default is 90 s)"
    (note,) = [e["note"] for e in read_jsonl(summary.run_dir / "events.jsonl") if e["event"] == "wandb_offline"]
    assert "logging offline" in note and f"seqedit push-wandb {summary.run_dir}" in note and "init_timeout_s=2" in note
    assert note in said
    history = _history_eventually(summary.run_dir)  # the offline run holds the telemetry, ready to be pushed
    assert [h["edit/index"] for h in history if "immediate/efficacy" in h] == [1, 2]


def test_nonfinite_delta_stops_cleanly(assets, tmp_path, monkeypatch):
    from seqedit.editors.random import RandomEditor
    from seqedit.types import EditProposal

    real = RandomEditor.compute
    calls = {"n": 0}

    def poisoned(self, model, tok, reqs):
        calls["n"] += 1
        prop = real(self, model, tok, reqs)
        if calls["n"] == 3:
            return EditProposal({k: v * float("nan") for k, v in prop.deltas.items()}, prop.stats)
        return prop

    monkeypatch.setattr(RandomEditor, "compute", poisoned)
    cfg = config(assets, tmp_path, "editor.name=random", "n_edits=5")
    with pytest.raises(RunError, match="non-finite"):
        run(cfg)
    (run_dir,) = (tmp_path / "runs").iterdir()
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "failed" and state["edits_done"] == 2 and state["next_batch"] == 2
    assert read_jsonl(run_dir / "telemetry" / "alerts.jsonl")[0]["alert/kind"] == "nonfinite"
    assert len(read_jsonl(run_dir / "telemetry" / "edits.jsonl")) == 2


def test_existing_run_dir_is_never_overwritten(assets, tmp_path):
    cfg = config(assets, tmp_path, "editor.name=noop", "n_edits=1")
    a, b = run(cfg), run(cfg)
    assert a.run_dir != b.run_dir and b.run_dir.name == a.run_dir.name + "-r2"
    assert (a.run_dir / "summary.json").exists()


def test_bad_requests_are_reported(assets, tmp_path):
    from seqedit.preflight import PreflightError

    with pytest.raises(PreflightError, match="holds only 12 requests"):  # before any directory or weights
        run(config(assets, tmp_path, "n_edits=50", "editor.name=noop"))
    assert not (tmp_path / "runs").exists()


def test_push_wandb_replays_jsonl(assets, tmp_path, monkeypatch):
    from seqedit.cli import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    summary = run(config(assets, tmp_path, "editor.name=noop", "n_edits=3",
                         "probes=[{name: retention, schedule: 'every:1'}]"))
    assert not (summary.run_dir / "wandb").exists()  # wandb.mode=disabled during the run
    assert main(["push-wandb", str(summary.run_dir), "--mode", "offline"]) == 0
    history = _history_eventually(summary.run_dir)
    edits = read_jsonl(summary.run_dir / "telemetry" / "edits.jsonl")
    probes = read_jsonl(summary.run_dir / "telemetry" / "probes.jsonl")
    sent = sorted(r["log/seq"] for r in edits + probes)
    assert [h["log/seq"] for h in history if "log/seq" in h] == sent, (history, sent)
    assert [h["edit/index"] for h in history if "retention/matrix/_type" in h] == [3]  # the matrix goes too


def test_sigterm_stops_at_an_edit_boundary_with_state_saved(assets, tmp_path, monkeypatch):
    import os
    import signal

    from seqedit.editors.noop import NoopEditor
    from seqedit.signals import StopRequested

    real = NoopEditor.compute
    calls = {"n": 0}

    def compute(self, model, tok, reqs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-edit
        return real(self, model, tok, reqs)

    monkeypatch.setattr(NoopEditor, "compute", compute)
    with pytest.raises(StopRequested):
        run(config(assets, tmp_path, "editor.name=noop", "n_edits=6"))
    (run_dir,) = (tmp_path / "runs").iterdir()
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "preempted" and state["edits_done"] == 3 and state["next_batch"] == 3
    assert len(read_jsonl(run_dir / "telemetry" / "edits.jsonl")) == 3
    assert read_jsonl(run_dir / "events.jsonl")[-1]["event"] == "preempted"
    assert not (run_dir / "telemetry" / "alerts.jsonl").exists()  # lifecycle is not telemetry
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_bad_input_fails_before_a_run_directory_exists(assets, tmp_path):
    from seqedit.preflight import PreflightError

    with pytest.raises(PreflightError, match=r"layer 5"):
        run(config(assets, tmp_path, "editor.name=noop", "editor.layers=[5]"))
    with pytest.raises((PreflightError, RunError), match="missing.json"):
        run(config(assets, tmp_path, "editor.name=noop", f"data.source={tmp_path / 'missing.json'}"))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_identical_runs_started_together_each_get_a_directory(assets, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from seqedit.driver import make_run_dir

    cfg = config(assets, tmp_path, "editor.name=noop")
    with ThreadPoolExecutor(8) as pool:
        dirs = list(pool.map(lambda _: make_run_dir(cfg), range(8)))
    assert len(set(dirs)) == 8 and all(d.is_dir() for d in dirs)


def test_a_closed_progress_stream_does_not_fail_the_run(assets, tmp_path):
    """The launching process died (its pipe is gone): progress lines raise BrokenPipeError, the run still finishes."""
    lines = []

    def broken(msg: str) -> None:
        lines.append(msg)
        raise BrokenPipeError(32, "Broken pipe")

    summary = run(config(assets, tmp_path), progress=broken)
    assert summary.status == "finished" and len(lines) > 3


def test_mapped_downstream_labels_are_reported_by_the_run(assets, tmp_path):
    local = tmp_path / "glue"
    local.mkdir()
    rows = [{"sentence": s, "label": str(i % 2)} for i, s in enumerate(["A fine film.", "A dull film.", "Fine."])]
    (local / "sst2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    said: list[str] = []
    summary = run(config(assets, tmp_path, "editor.name=noop", "n_edits=2",
                         f"probes=[{{name: downstream, tasks: [sst2_local], local_data_dir: {local}, limit: 3, "
                         "schedule: never}]"), progress=said.append)
    (mapped,) = [e for e in read_jsonl(summary.run_dir / "events.jsonl") if e["event"] == "input_mapped"]
    assert mapped["probe"] == "downstream" and "3 of 3 labels" in mapped["note"] and "'1' -> 1" in mapped["note"]
    assert any(m.startswith("probe downstream: ") and "sst2.jsonl" in m for m in said)


def test_left_out_empty_optional_values_are_said_and_listed_in_data_json(assets, tmp_path):
    records = json.loads((assets / "cf.json").read_text())
    records[0] = {**records[0], "paraphrase_prompts": ["", *records[0].get("paraphrase_prompts", [])]}
    src = tmp_path / "cf_blank.json"
    src.write_text(json.dumps(records))
    said: list[str] = []
    summary = run(config(assets, tmp_path, "editor.name=noop", f"data.source={src}", "n_edits=2", "probes=[]"),
                  progress=said.append)
    data = json.loads((summary.run_dir / "data.json").read_text())
    assert [(d["index"], d["field"]) for d in data["dropped"]] == [(0, "paraphrase_prompts[0]")]
    assert any("left out 1 empty optional value" in line for line in said)
