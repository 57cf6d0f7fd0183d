"""Analysis: loading runs, disabling-edit detection (injected spikes, online == offline), phases, causal checks
through the ledger, and the report."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from _world_fixtures import tiny_cache_dir, tiny_world  # noqa: F401  (tiny_world is a fixture)

from seqedit.analysis.detect import SpikeConfig, SpikeDetector, detect_spikes, disabling_edits, judge
from seqedit.analysis.load import load_run
from seqedit.analysis.phases import PhaseConfig, catastrophic_start, change_points, segments
from seqedit.cli import main
from seqedit.config import load_config
from seqedit.driver import run
from tests_support import counterfact_records, write_driver_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis-assets")
    write_driver_assets(root)
    (root / "cf300.json").write_text(json.dumps(counterfact_records(300)))
    return root


def stream_args(assets, runs, *extra):
    return [f"model.name={assets / 'model'}", f"data.source={assets / 'cf300.json'}", f"runs_dir={runs}",
            "threads=1", "eval.immediate=false", "eval.final=false", "probes=[]", *extra]


def precision_recall(found: set[int], truth: set[int]) -> tuple[float, float]:
    tp = len(found & truth)
    return (tp / len(found) if found else 1.0), (tp / len(truth) if truth else 1.0)


# -- detector ---------------------------------------------------------------------------------------------------

def test_judge_needs_both_ratio_and_robust_z():
    cfg = SpikeConfig(window=20, min_history=5, z=6.0, min_ratio=5.0)
    noisy = list(np.log(np.random.default_rng(0).lognormal(0, 0.5, 20)))  # sigma 0.5 in log units
    assert judge(noisy, 6.0, cfg) is None  # 6x the median but only ~3.6 sigma: a wobble of a noisy editor
    assert judge(noisy, 60.0, cfg) is not None
    flat = [0.0] * 20  # constant norms: the MAD floor keeps z finite, the ratio decides
    assert judge(flat, 4.9, cfg) is None and judge(flat, 5.1, cfg).ratio == pytest.approx(5.1)
    assert judge(flat[:4], 100.0, cfg) is None  # not enough history


def test_online_window_is_bounded():
    det = SpikeDetector(SpikeConfig(window=10, min_history=5))
    for _ in range(10):
        assert det.update({"w": 1.0}) == []
    for _ in range(10):  # a new regime 100x higher: flagged at first, then it is the baseline
        det.update({"w": 100.0})
    assert det.update({"w": 100.0}) == [] and len(det.history["w"]) == 10


@pytest.mark.parametrize("factor", [10, 30, 100])
def test_injected_disabling_edits_are_found_online_and_offline(assets, tmp_path, factor):
    s = run(load_config(None, stream_args(assets, tmp_path, "n_edits=300", "editor.name=random",
                                          "editor.spike_probability=0.03", f"editor.spike_factor={factor}")))
    data = load_run(s.run_dir)
    truth = set(data.edits.loc[data.edits["editor/random/spikes"] > 0, "edit/index"].astype(int))
    assert len(truth) >= 4  # the injection happened
    found = set(detect_spikes(data.edits)["edit/index"].astype(int))
    precision, recall = precision_recall(found, truth)
    assert precision >= 0.9 and recall >= 0.9, (sorted(found), sorted(truth))
    online = set(data.edits.loc[data.edits.get("edit/norm_spike", pd.Series(dtype=float)) == 1.0,
                                "edit/index"].astype(int))
    assert online == found  # the driver's online detector and the offline one are one rule
    alerts = set(data.alerts.loc[data.alerts["alert/kind"] == "norm_spike", "edit/index"].astype(int))
    assert alerts == found


def test_noop_run_has_no_detections(assets, tmp_path):
    s = run(load_config(None, stream_args(assets, tmp_path, "n_edits=50", "editor.name=noop")))
    data = load_run(s.run_dir)
    assert detect_spikes(data.edits).empty
    assert disabling_edits(data.edits, data.probes).empty


def test_confirmations_and_confidence():
    edits = pd.DataFrame({"edit/index": range(1, 41), "edit/status": "applied",
                          "weights/w/delta_fro": [1.0] * 29 + [200.0] + [1.0] * 10,
                          "weights/w/drift_fro": 1.0, "weights/w/drift_rel": 0.1, "edit/case_ids": [["x"]] * 40})
    probes = pd.DataFrame({"edit/index": [0, 10, 20, 30, 40], "probe/name": "unedited",
                           "probe/unedited/recall": [0.9, 0.9, 0.88, 0.2, 0.2]})
    table = disabling_edits(edits, probes)
    assert list(table["edit/index"]) == [30]
    row = table.iloc[0]
    assert row["ratio"] == pytest.approx(200.0) and row["norm_over_w0"] == pytest.approx(20.0)
    assert "unedited/recall 0.88->0.2" in row["confirmations"] and row["confidence"] == "high"


# -- phases -----------------------------------------------------------------------------------------------------

def test_phase_boundaries_and_labels_on_a_known_curve():
    rng = np.random.default_rng(1)
    x = np.arange(0, 1001, 20)
    y = np.where(x < 600, 0.9 - 0.0001 * x, 0.84 - 0.004 * (x - 600))
    y = np.clip(y, 0.25, 1.0) + rng.normal(0, 0.01, len(x))
    cuts = [int(x[i]) for i in change_points(x, y)]
    assert any(abs(c - 600) <= 40 for c in cuts), cuts  # within two probe intervals of the true boundary
    table = segments(x, y, chance=0.25)
    assert table["label"].iloc[0] in ("stable", "gradual")
    start = catastrophic_start(table)
    assert start is not None and abs(start - 600) <= 40, table
    flat = segments(x, 0.9 + rng.normal(0, 0.005, len(x)), chance=0.25)
    assert set(flat["label"]) == {"stable"} and catastrophic_start(flat) is None


def test_phase_config_thresholds_are_used():
    x = np.arange(0, 101, 10)
    y = 0.9 - 0.002 * x  # loses 0.2 / 0.9 of q over 100 edits (rate ~2.2 per 1k)
    assert set(segments(x, y, cfg=PhaseConfig(catastrophic_drop=0.3))["label"]) == {"gradual"}
    assert set(segments(x, y, cfg=PhaseConfig(catastrophic_drop=0.2))["label"]) == {"catastrophic"}


# -- a real run end to end: collapse by one huge edit, causal check, report ---------------------------------------

@pytest.fixture(scope="module")
def collapse_run(tiny_world, tmp_path_factory):
    """world:tiny, small random edits and one 300x edit (case picked by the seeded spike draw): control recall
    collapses there."""
    cache = tiny_cache_dir(tmp_path_factory)
    runs = tmp_path_factory.mktemp("collapse")
    rc = main(["run", "model.name=world:tiny", f"cache_dir={cache}", f"runs_dir={runs}", "threads=1",
               "n_edits=60", "editor.name=random", "editor.relative_norm=0.002", "editor.spike_probability=0.02",
               "editor.spike_factor=1500", "eval.immediate=false",
               "probes=[{name: unedited, schedule: 'every:5|signal:norm_spike', sample: 60},"
               " {name: retention, schedule: 'every:10'}, {name: perplexity, schedule: 'every:10', max_docs: 30}]"])
    assert rc == 0
    (d,) = runs.iterdir()
    return d


def test_collapse_is_detected_confirmed_and_causal(collapse_run):
    from seqedit.analysis.causal import causal_checks

    data = load_run(collapse_run)
    truth = sorted(data.edits.loc[data.edits["editor/random/spikes"] > 0, "edit/index"].astype(int))
    assert truth, "the seeded draw must inject at least one spike"
    table = disabling_edits(data.edits, data.probes)
    assert list(table["edit/index"]) == truth
    assert table["confirmations"].iloc[0]  # control recall or perplexity moved right after it
    checks = causal_checks(collapse_run, [truth[0], truth[0] - 1])
    by = checks.set_index("edit/index")
    assert bool(by.loc[truth[0], "recovers"]) and not bool(by.loc[truth[0] - 1, "recovers"])
    assert by.loc[truth[0], "ppl_with"] > 1.5 * by.loc[truth[0], "ppl_without"]


def test_report_files_and_html(collapse_run, tmp_path, capsys):
    assert main(["report", str(collapse_run), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "disabling edits: 1 found" in out or "disabling edits:" in out
    rep = tmp_path / "rep"
    page = (rep / "index.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert images and all((rep / name).is_file() and (rep / name).stat().st_size > 5000 for name in images)
    assert {"retention.png", "controls.png", "norms.png", "drift.png"} <= set(images)
    ev = pd.read_csv(rep / "disabling_edits.csv")
    data = load_run(collapse_run)
    truth = sorted(data.edits.loc[data.edits["editor/random/spikes"] > 0, "edit/index"].astype(int))
    assert list(ev["edit/index"]) == truth
    phases = pd.read_csv(rep / "phases.csv")
    assert {"control_recall", "retention", "drift"} <= set(phases["curve"])
    summary = json.loads((rep / "summary.json").read_text())["runs"][0]
    assert summary["disabling_edits"] == truth and len(summary["conclusion"]) == 3
    assert (rep / "summary.md").read_text().startswith("# seqedit report")


def test_report_of_several_runs_and_seeds(assets, tmp_path):
    from seqedit.analysis.report import write_report

    dirs = []
    for seed in (0, 1):
        dirs.append(run(load_config(None, stream_args(assets, tmp_path / "r", "n_edits=20", "editor.name=random",
                                                      f"seed={seed}",
                                                      "probes=[{name: retention, schedule: 'every:5'}]"))).run_dir)
    dirs.append(run(load_config(None, stream_args(assets, tmp_path / "r", "n_edits=20", "editor.name=noop",
                                                  "probes=[{name: retention, schedule: 'every:5'}]"))).run_dir)
    rep = write_report(dirs, tmp_path / "side")
    summary = json.loads((rep / "summary.json").read_text())["runs"]
    assert [s["editor"] for s in summary] == ["random", "random", "noop"]
    page = (rep / "index.html").read_text()
    assert page.count('<section class="run">') == 3


def test_run_prints_conclusion_and_report_path(assets, tmp_path, capsys):
    args = stream_args(assets, tmp_path, "n_edits=6", "editor.name=random",
                       "probes=[{name: retention, schedule: 'every:2'}]")
    assert main(["run", *args]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    report_line = next(line for line in lines if line.startswith("report: "))
    assert Path(report_line.split(" ", 1)[1]).is_file()
    i = lines.index(report_line)
    assert lines[i - 3].strip().startswith("phases") and lines[i - 2].strip().startswith("disabling edits")
    assert lines[i - 1].strip().startswith("final:")


def test_collapse_alert_and_stop_on_collapse(tiny_world, tmp_path, tmp_path_factory):
    from seqedit.driver import RunState

    cache = tiny_cache_dir(tmp_path_factory)
    args = ["model.name=world:tiny", f"cache_dir={cache}", f"runs_dir={tmp_path}", "threads=1", "n_edits=60",
            "editor.name=random", "editor.relative_norm=0.002", "editor.spike_probability=0.02",
            "editor.spike_factor=1500", "eval.immediate=false", "telemetry.stop_on_collapse=true",
            "telemetry.collapse_margin=0.6",  # recall 1.0 -> 0.45 here: within 0.6 of chance (0)
            "probes=[{name: unedited, schedule: 'every:5|signal:norm_spike', sample: 60}]"]
    assert main(["run", *args, "--no-report"]) == 0
    (d,) = tmp_path.iterdir()
    data = load_run(d)
    spike = int(data.edits.loc[data.edits["editor/random/spikes"] > 0, "edit/index"].min())
    collapses = data.alerts[data.alerts["alert/kind"] == "collapse"]
    assert list(collapses["edit/index"]) == [spike]  # the on-signal probe right after the disabling edit
    summary = json.loads((d / "summary.json").read_text())
    assert summary["n_edits"] == spike < 60 and summary["stopped_early"].startswith("collapse")
    assert RunState.load(d).status == "finished"
    final = data.items["final"]
    assert len(final) == spike  # the final scores cover the requests the run got to


def test_detection_goes_to_wandb(assets, tmp_path, monkeypatch):
    from seqedit.wandb_sink import find_offline_run_file, read_offline_history

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    s = run(load_config(None, stream_args(assets, tmp_path / "r", "n_edits=100", "editor.name=random",
                                          "editor.spike_probability=0.05", "wandb.mode=offline")))
    path = find_offline_run_file(s.run_dir)
    assert path is not None
    history = read_offline_history(path)
    assert any("analysis/disabling_edits_table/_type" in h for h in history)


def test_load_keeps_every_item_row_and_drops_repeated_records(assets, tmp_path):
    s = run(load_config(None, stream_args(assets, tmp_path, "n_edits=8", "editor.name=random",
                                          "probes=[{name: retention, schedule: 'every:4'}]")))
    tel = s.run_dir / "telemetry"
    for name in ("edits.jsonl", "items-retention.jsonl"):  # the same lines twice, as two copied attempts would
        text = (tel / name).read_text()
        (tel / name).write_text(text + text)
    data = load_run(s.run_dir)
    assert list(data.edits["edit/index"]) == list(range(1, 9))
    assert len(data.items["retention"]) == 4 + 8  # all earlier edits at each check, once
