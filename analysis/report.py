"""Forgetting-curve reports: `seqedit report RUN_DIR [RUN_DIR ...]` -> report/index.html with PNG plots,
disabling_edits.csv, phases.csv, summary.json and summary.md. Several runs go side by side in every plot; runs that
differ only in their seed are aggregated (mean line, min-max band) next to their individual curves."""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from seqedit.analysis.detect import SpikeConfig, disabling_edits
from seqedit.analysis.load import RunData, load_run
from seqedit.analysis.phases import PhaseConfig, catastrophic_start, phases, quality_curves
from seqedit.io import atomic_write_json, atomic_write_text


@dataclass(frozen=True)
class RunAnalysis:
    run: RunData
    evidence: pd.DataFrame  # disabling edits
    phases: pd.DataFrame
    conclusion: list[str]  # three lines
    summary: dict[str, Any]


def analyse(run: RunData, spike: SpikeConfig | None = None, phase: PhaseConfig | None = None,
            causal: pd.DataFrame | None = None) -> RunAnalysis:
    evidence = disabling_edits(run.edits, run.probes, spike, causal)
    table = phases(run.probes, run.edits, phase)
    quality = table[table["curve"] != "drift"] if not table.empty else table
    primary = quality["curve"].iloc[0] if not quality.empty else None
    primary_rows = quality[quality["curve"] == primary] if primary else quality
    cat = catastrophic_start(primary_rows) if primary else None
    m = run.summary.get("metrics", {})
    finals = _finals(run)
    lines = [
        ("phases (" + primary + "): " + ", ".join(f"{r.label} {r.start}-{r.end}" for r in primary_rows.itertuples())
         + (f"; catastrophic forgetting starts at edit {cat}" if cat is not None else "; no catastrophic phase"))
        if primary else "phases: no quality curve to segment (add retention / unedited / downstream probes)",
        (f"disabling edits: {len(evidence)} found at edits "
         + ", ".join(f"{int(r['edit/index'])} ({r['ratio']:.3g}x, {r['confidence']})" for _, r in evidence.iterrows())
         if len(evidence) else "disabling edits: none found"),
        "final: " + ", ".join(f"{k} {v:.3g}" + (f" (pre {p:.3g})" if p is not None else "")
                               for k, (v, p) in finals.items() if v is not None)
        + (f"; final efficacy {m['final/efficacy']:.3g}" if isinstance(m.get("final/efficacy"), float) else ""),
    ]
    summary = {
        "run": run.name, "run_dir": str(run.run_dir), "editor": run.config.get("editor", {}).get("name"),
        "edits": int(run.edits["edit/index"].max()) if not run.edits.empty else 0,
        "disabling_edits": [int(i) for i in evidence["edit/index"]],
        "disabling_edit_confidence": list(evidence["confidence"]),
        "phase_curve": primary, "catastrophic_start": cat,
        "phases": table.to_dict(orient="records"),
        "final": {k: v for k, (v, _) in finals.items()}, "conclusion": lines,
    }
    return RunAnalysis(run, evidence, table, lines, summary)


def _finals(run: RunData) -> dict[str, tuple[float | None, float | None]]:
    """Last and first value of retention, control recall and downstream accuracy."""
    out: dict[str, tuple[float | None, float | None]] = {}
    curves = quality_curves(run.probes)
    for name in ("retention", "control_recall", "downstream"):
        if name in curves:
            x, y, _ = curves[name]
            out[name] = (float(y[-1]), float(y[0]) if name != "retention" else None)
    return out


# -- plots ----------------------------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _groups(analyses: list[RunAnalysis]) -> dict[str, list[RunAnalysis]]:
    groups: dict[str, list[RunAnalysis]] = {}
    for a in analyses:
        groups.setdefault(a.run.seedless_key, []).append(a)
    return groups


def _curve_plot(analyses, out: Path, title: str, ylabel: str, pick: Callable[[RunData], list[tuple[str, Any, Any]]],
                mark: bool = True, logy: bool = False) -> str | None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    drawn = False
    for group in _groups(analyses).values():
        series = []
        for a in group:
            for label, x, y in pick(a.run):
                ax.plot(x, y, marker=".", lw=1.2, alpha=0.8 if len(group) == 1 else 0.35,
                        label=f"{label} {a.run.label}")
                series.append((label, np.asarray(x), np.asarray(y)))
                drawn = True
            if mark:
                _marks(ax, a)
        if len(group) > 1:  # seeds: mean and min-max band on the shared edit indices
            for label in sorted({s[0] for s in series}):
                same = [s for s in series if s[0] == label]
                xs = sorted(set.intersection(*[set(s[1].tolist()) for s in same]))
                if not xs:
                    continue
                ys = np.array([[dict(zip(s[1].tolist(), s[2].tolist()))[x] for x in xs] for s in same])
                ax.plot(xs, ys.mean(0), lw=2.2, label=f"{label} mean of {len(same)} seeds")
                ax.fill_between(xs, ys.min(0), ys.max(0), alpha=0.15)
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("edit index")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out.name


def _marks(ax, a: RunAnalysis) -> None:
    """Disabling edits (red dotted lines) and quality-phase boundaries (grey dashed) of one run."""
    for k in a.evidence["edit/index"]:
        ax.axvline(k, color="red", ls=":", lw=1)
    if not a.phases.empty:
        q = a.phases[a.phases["curve"] == a.summary.get("phase_curve")]
        for s in q["start"].iloc[1:]:
            ax.axvline(s, color="grey", ls="--", lw=1)


def _retention(run: RunData):
    r = run.probe("retention")
    out = []
    if "probe/retention/efficacy" in r:
        r = r[r["edit/index"] > 0]
        out.append(("retention", r["edit/index"], r["probe/retention/efficacy"]))
    if "immediate/efficacy" in run.edits and run.edits["immediate/efficacy"].notna().any():
        e = run.edits.dropna(subset=["immediate/efficacy"])
        w = max(1, len(e) // 50)
        out.append(("immediate (rolling)", e["edit/index"], e["immediate/efficacy"].rolling(w, min_periods=1).mean()))
    return out


def _controls(run: RunData):
    out = []
    u = run.probe("unedited")
    if "probe/unedited/recall" in u:
        out.append(("control recall", u["edit/index"], u["probe/unedited/recall"]))
    d = run.probe("downstream")
    for c in [c for c in d.columns if c.startswith("downstream/") and c.endswith("/acc")]:
        out.append((c.split("/")[1], d["edit/index"], d[c]))
    return out


def _norms(run: RunData):
    return [(f"‖ΔW‖ {p.split('.')[-3] if p.count('.') >= 3 else p}", run.edits["edit/index"],
             run.edits[f"weights/{p}/delta_fro"]) for p in run.params()]


def _drift(run: RunData):
    return [(f"drift {p.split('.')[-3] if p.count('.') >= 3 else p}", run.edits["edit/index"],
             run.edits[f"weights/{p}/drift_rel"]) for p in run.params() if f"weights/{p}/drift_rel" in run.edits]


def _age_plot(analyses, out: Path) -> str | None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    drawn = False
    for a in analyses:
        items = a.run.items.get("retention")
        if items is None or items.empty or "position" not in items:
            continue
        age = items["edit/index"] - items["position"]
        bins = 2 ** np.floor(np.log2(age.clip(lower=1)))
        curve = items.assign(age_bin=bins).groupby("age_bin")["efficacy"].mean()
        ax.plot(curve.index, curve.values, marker="o", label=a.run.label)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log", base=2)
    ax.set_xlabel("edit age (edits since it was applied, log2 bins)")
    ax.set_ylabel("retention efficacy")
    ax.set_title("Retention vs edit age")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out.name


def _heatmap(a: RunAnalysis, out: Path) -> str | None:
    m = a.run.retention_matrix
    if m is None or m.empty:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    im = ax.imshow(m.to_numpy(dtype=float), aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    cols = [int(float(c)) for c in m.columns]
    step = max(1, len(cols) // 10)
    ax.set_xticks(range(0, len(cols), step), [str(c) for c in cols[::step]], fontsize=7)
    ax.set_xlabel("edit index of the check")
    ax.set_ylabel("edit position")
    ax.set_title(f"Retention matrix: {a.run.label}")
    fig.colorbar(im, ax=ax, label="efficacy")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out.name


# -- the report -----------------------------------------------------------------------------------------------------

def write_report(run_dirs: list[str | Path], out: str | Path | None = None, *, causal: bool = False,
                 spike: SpikeConfig | None = None, phase: PhaseConfig | None = None,
                 progress: Callable[[str], None] | None = None) -> Path:
    """Analyse the runs and write the report; returns the report directory. `causal` runs the ledger check on
    every flagged edit (loads the model)."""
    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise ValueError("seqedit report: give at least one run directory")
    out = Path(out) if out is not None else (runs[0].run_dir / "report" if len(runs) == 1 else Path("report"))
    out.mkdir(parents=True, exist_ok=True)
    analyses = []
    for run in runs:
        a = analyse(run, spike, phase)
        if causal and len(a.evidence):
            from seqedit.analysis.causal import causal_checks

            checks = causal_checks(run.run_dir, list(a.evidence["edit/index"]), progress=progress)
            a = analyse(run, spike, phase, causal=checks)
        analyses.append(a)

    figs = {
        "retention": _curve_plot(analyses, out / "retention.png", "Retention of earlier edits", "efficacy",
                                 _retention),
        "retention_age": _age_plot(analyses, out / "retention_age.png"),
        "controls": _curve_plot(analyses, out / "controls.png", "Never-edited facts and downstream tasks",
                                "accuracy / recall", _controls),
        "norms": _curve_plot(analyses, out / "norms.png", "Update norm per edit (disabling edits: red)",
                             "‖ΔW‖_F", _norms, logy=True),
        "drift": _curve_plot(analyses, out / "drift.png", "Cumulative drift ‖W_t − W0‖ / ‖W0‖", "relative drift",
                             _drift),
    }
    heatmaps = [_heatmap(a, out / f"heatmap-{i}.png") for i, a in enumerate(analyses)]

    evidence = pd.concat([a.evidence.assign(run=a.run.name) for a in analyses], ignore_index=True)
    phase_rows = pd.concat([a.phases.assign(run=a.run.name) for a in analyses], ignore_index=True)
    atomic_write_text(out / "disabling_edits.csv", evidence.to_csv(index=False))
    atomic_write_text(out / "phases.csv", phase_rows.to_csv(index=False))
    atomic_write_json(out / "summary.json", {"runs": [_jsonable(a.summary) for a in analyses]})
    md = ["# seqedit report", ""]
    for a in analyses:
        md += [f"## {a.run.label}", "", *[f"- {line}" for line in a.conclusion], ""]
    atomic_write_text(out / "summary.md", "\n".join(md) + "\n")
    atomic_write_text(out / "index.html", _html(analyses, figs, heatmaps))
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return None if not np.isfinite(obj) else float(obj)
    return obj


def _html(analyses: list[RunAnalysis], figs: dict[str, str | None], heatmaps: list[str | None]) -> str:
    def img(name: str | None, alt: str) -> str:
        return f'<figure><img src="{html.escape(name)}" alt="{html.escape(alt)}"></figure>' if name else ""

    cards = []
    for a, hm in zip(analyses, heatmaps):
        ev = a.evidence.to_html(index=False, border=0, classes="t") if len(a.evidence) else "<p>none found</p>"
        ph = a.phases.to_html(index=False, border=0, classes="t", float_format=lambda v: f"{v:.3g}") \
            if len(a.phases) else "<p>no curve to segment</p>"
        cards.append(f"""<section class="run"><h2>{html.escape(a.run.label)}</h2>
<ul>{''.join(f'<li>{html.escape(line)}</li>' for line in a.conclusion)}</ul>
<h3>Disabling edits</h3>{ev}<h3>Phases</h3>{ph}{img(hm, 'retention matrix')}</section>""")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>seqedit report</title>
<style>body{{font-family:system-ui,sans-serif;margin:1.5em;max-width:1400px}} img{{max-width:100%}}
.runs{{display:flex;gap:1.5em;flex-wrap:wrap}} .run{{flex:1 1 420px;border:1px solid #ddd;padding:0 1em;
border-radius:6px}} table.t{{border-collapse:collapse;font-size:12px}} table.t td,table.t th{{padding:2px 6px;
border-bottom:1px solid #eee}} figure{{margin:0.5em 0}}</style></head><body>
<h1>seqedit report: {len(analyses)} run{'s' if len(analyses) != 1 else ''}</h1>
<div class="runs">{''.join(cards)}</div>
<h2>Curves</h2>
{img(figs['retention'], 'retention vs edit index')}{img(figs['retention_age'], 'retention vs edit age')}
{img(figs['controls'], 'control recall and downstream')}{img(figs['norms'], 'update norms')}
{img(figs['drift'], 'cumulative drift')}
</body></html>
"""
