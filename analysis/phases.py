"""Forgetting phases: change points of a quality curve (downstream accuracy, control recall or retention against the
edit index) and of the cumulative weight drift, each segment labelled *stable*, *gradual* or *catastrophic*.

Change points: `ruptures` PELT with the continuous piecewise-linear cost ("clinear"), so a segment is a line and a
phase change is a change of slope (a gradual decline turning into a collapse), with a penalty of
`penalty` x sigma² x log(n), sigma estimated robustly from the first differences of the curve.

Labels, on the curve rescaled to q = (y - chance) / (y_0 - chance) (1 = as good as before editing, 0 = chance):
catastrophic when the segment loses >= `catastrophic_drop` of q at a rate >= `catastrophic_rate` per 1,000 edits,
or when it lies at chance (mean q <= `chance_margin`, after a higher start); stable when it changes q by less than
`stable_change`; gradual otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class PhaseConfig:
    penalty: float = 3.0
    min_size: int = 3  # points per segment at least
    stable_change: float = 0.05
    catastrophic_drop: float = 0.3
    catastrophic_rate: float = 2.0  # q lost per 1,000 edits
    chance_margin: float = 0.1


def change_points(x: np.ndarray, y: np.ndarray, cfg: PhaseConfig | None = None) -> list[int]:
    """Indices (into x) where a new linear segment starts; [] for a curve too short or too flat to segment."""
    import ruptures as rpt

    cfg = cfg or PhaseConfig()
    n = len(y)
    if n < 2 * cfg.min_size:
        return []
    d = np.diff(y)
    sigma = 1.4826 * float(np.median(np.abs(d - np.median(d)))) / np.sqrt(2)
    sigma = max(sigma, 1e-3 * (float(np.ptp(y)) or 1.0))
    algo = rpt.Pelt(model="clinear", min_size=cfg.min_size, jump=1).fit(np.asarray(y, dtype=float).reshape(-1, 1))
    bkps = algo.predict(pen=cfg.penalty * sigma**2 * np.log(n))
    return [b for b in bkps if b < n]


def segments(x, y, chance: float = 0.0, cfg: PhaseConfig | None = None, curve: str = "",
             label: bool = True) -> pd.DataFrame:
    """One row per segment: start/end edit index, values, q change, rate per 1,000 edits (of q; of y itself
    when `label` is False, e.g. for the drift), label."""
    cfg = cfg or PhaseConfig()
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    cols = ["curve", "start", "end", "y_start", "y_end", "q_start", "q_end", "rate_per_1k", "label"]
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 2:
        return pd.DataFrame(columns=cols)
    span = y[0] - chance
    q = (y - chance) / span if label and abs(span) > 1e-9 else np.ones_like(y)
    cuts = [0, *change_points(x, y, cfg), len(x)]
    rows = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        lo, hi = a if a == 0 else a - 1, b - 1  # segments share their boundary point (continuous fit)
        dq = q[hi] - q[lo]
        edits = max(x[hi] - x[lo], 1.0)
        rate = -dq / edits * 1000.0
        if not label:
            rows.append({"curve": curve, "start": int(x[lo]), "end": int(x[hi]), "y_start": float(y[lo]),
                         "y_end": float(y[hi]), "q_start": np.nan, "q_end": np.nan,
                         "rate_per_1k": float((y[hi] - y[lo]) / edits * 1000.0), "label": curve})
            continue
        if q[lo:hi + 1].mean() <= cfg.chance_margin and q[0] > cfg.chance_margin:
            label = "catastrophic"
        elif -dq >= cfg.catastrophic_drop and rate >= cfg.catastrophic_rate:
            label = "catastrophic"
        elif abs(dq) < cfg.stable_change:
            label = "stable"
        else:
            label = "gradual"
        rows.append({"curve": curve, "start": int(x[lo]), "end": int(x[hi]), "y_start": float(y[lo]),
                     "y_end": float(y[hi]), "q_start": float(q[lo]), "q_end": float(q[hi]), "rate_per_1k": rate,
                     "label": label})
    return pd.DataFrame(rows, columns=cols)


def catastrophic_start(table: pd.DataFrame) -> int | None:
    """The edit index where the first catastrophic segment starts, or None."""
    cat = table[table["label"] == "catastrophic"]
    return int(cat["start"].iloc[0]) if not cat.empty else None


def quality_curves(probes: pd.DataFrame) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """The curves phases are judged on, in order of preference: mean downstream accuracy, control recall
    (never-edited facts), retention efficacy. name -> (edit index, value, chance level)."""
    out: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    if probes.empty or "probe/name" not in probes:
        return out
    down = probes[probes["probe/name"] == "downstream"]
    accs = [c for c in down.columns if c.startswith("downstream/") and c.endswith("/acc")]
    if accs and not down.empty:
        d = down[["edit/index", *accs]].dropna(how="all", subset=accs).sort_values("edit/index")
        chance = [float(down[c.replace("/acc", "/chance")].dropna().iloc[0]) if c.replace("/acc", "/chance") in down
                  and down[c.replace("/acc", "/chance")].notna().any() else 0.0 for c in accs]
        out["downstream"] = (d["edit/index"].to_numpy(), d[accs].mean(axis=1).to_numpy(), float(np.mean(chance)))
    for name, col in (("control_recall", "probe/unedited/recall"), ("retention", "probe/retention/efficacy")):
        if col in probes:
            s = probes[["edit/index", col]].dropna().sort_values("edit/index")
            s = s[s["edit/index"] > 0] if name == "retention" else s  # no edits to retain at edit 0
            if len(s) >= 2:
                out[name] = (s["edit/index"].to_numpy(), s[col].to_numpy(), 0.0)
    return out


def drift_curve(edits: pd.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
    """Cumulative drift ‖W_t − W0‖/‖W0‖ (max over touched parameters) against the edit index."""
    cols = [c for c in edits.columns if c.startswith("weights/") and c.endswith("/drift_rel")]
    if not cols:
        return None
    e = edits.sort_values("edit/index")
    return e["edit/index"].to_numpy(), e[cols].max(axis=1).to_numpy()


def phases(probes: pd.DataFrame, edits: pd.DataFrame, cfg: PhaseConfig | None = None) -> pd.DataFrame:
    """Segments of every quality curve and of the drift (drift segments are labelled by slope only)."""
    tables = [segments(x, y, chance, cfg, curve=name) for name, (x, y, chance) in quality_curves(probes).items()]
    drift = drift_curve(edits)
    if drift is not None:  # weight-space view: segmented the same way, labelled by nothing but its slope
        tables.append(segments(*drift, cfg=cfg, curve="drift", label=False))
    tables = [t for t in tables if not t.empty]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(
        columns=["curve", "start", "end", "y_start", "y_end", "q_start", "q_end", "rate_per_1k", "label"])


class CollapseMonitor:
    """Online: fed each probe record's metrics, says when a quality curve (control recall, mean downstream
    accuracy) has fallen to chance: at or below chance + `margin` x (its first value - chance). Fires once per
    curve. The first value seen (the forced probes before the first edit) is the baseline."""

    def __init__(self, margin: float = 0.1) -> None:
        self.margin = margin
        self.baseline: dict[str, float] = {}
        self.fired: dict[str, int] = {}  # curve -> edit index where it collapsed

    @staticmethod
    def curves(metrics: dict) -> dict[str, tuple[float, float]]:
        """curve -> (value, chance) from one probe record's metrics."""
        out = {}
        if isinstance(metrics.get("probe/unedited/recall"), (int, float)):
            out["control_recall"] = (float(metrics["probe/unedited/recall"]), 0.0)
        accs = [k for k, v in metrics.items() if k.startswith("downstream/") and k.endswith("/acc")
                and isinstance(v, (int, float))]
        if accs:
            chance = [float(metrics.get(k.replace("/acc", "/chance")) or 0.0) for k in accs]
            out["downstream"] = (float(np.mean([metrics[k] for k in accs])), float(np.mean(chance)))
        return out

    def update(self, edit_index: int, metrics: dict) -> list[tuple[str, float, float]]:
        """The curves that collapsed with this record: (curve, value, baseline)."""
        new = []
        for name, (value, chance) in self.curves(metrics).items():
            if name not in self.baseline:
                self.baseline[name] = value
                continue
            base = self.baseline[name]
            if name not in self.fired and base > chance and value <= chance + self.margin * (base - chance):
                self.fired[name] = edit_index
                new.append((name, value, base))
        return new
