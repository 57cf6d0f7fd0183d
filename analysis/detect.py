"""Disabling-edit detection: robust statistics of the update norm over a bounded running window, online (the driver
feeds one update at a time) and after the fact (over a run's edits), with the evidence that followed each flagged
edit.

The statistic is log ‖ΔW‖_F per touched parameter against the median and MAD of the previous `window` applied updates
of that parameter (‖W0‖ cancels in the difference, so the ratio to ‖W0‖ is reported, not needed). An update is flagged
when its robust z-score is >= `z` *and* it is >= `min_ratio` times the window's median: the z-score alone fires on
tiny wobbles when the editor's norms are nearly constant (the MAD is floored at `mad_floor` in log units for that
reason), the ratio alone on slow drifts.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution x 1.4826 = sigma


@dataclass(frozen=True)
class SpikeConfig:
    window: int = 100  # earlier applied updates the baseline looks at (bounded: old regimes are forgotten)
    min_history: int = 10  # no verdict before this many earlier updates
    z: float = 6.0  # robust z-score of log ‖ΔW‖_F above the window median
    min_ratio: float = 5.0  # ... and at least this many times the window's median norm
    mad_floor: float = 0.05  # lower bound of the MAD-based sigma in log units (≈ 5% relative spread)

    def __post_init__(self) -> None:
        if self.window < 2 or self.min_history < 1 or self.min_history > self.window:
            raise ValueError(f"spike detector: need 2 <= window and 1 <= min_history <= window, got window="
                             f"{self.window}, min_history={self.min_history}")
        if self.z <= 0 or self.min_ratio < 1 or self.mad_floor <= 0:
            raise ValueError(f"spike detector: z > 0, min_ratio >= 1 and mad_floor > 0 are required, got z={self.z}, "
                             f"min_ratio={self.min_ratio}, mad_floor={self.mad_floor}")


@dataclass(frozen=True)
class Spike:
    param: str
    norm: float
    median: float  # the window's median norm
    ratio: float  # norm / median
    z: float


@dataclass
class SpikeDetector:
    """Online: `update({param: ‖ΔW‖_F})` after each applied call returns the flagged parameters (worst first).
    State is the bounded window per parameter, so it is cheap to keep and to rebuild from the ledger's norms."""

    config: SpikeConfig = field(default_factory=SpikeConfig)
    history: dict[str, deque] = field(default_factory=dict)

    def update(self, norms: dict[str, float]) -> list[Spike]:
        spikes = []
        for param, norm in norms.items():
            hist = self.history.setdefault(param, deque(maxlen=self.config.window))
            spike = judge(list(hist), norm, self.config, param)
            if spike is not None:
                spikes.append(spike)
            if norm > 0 and math.isfinite(norm):
                hist.append(math.log(norm))
        return sorted(spikes, key=lambda s: -s.z)


def judge(log_history: list[float], norm: float, cfg: SpikeConfig, param: str = "") -> Spike | None:
    """The verdict on one update given the log norms of the earlier ones (most recent last)."""
    if len(log_history) < cfg.min_history or not norm > 0:
        return None
    window = np.asarray(log_history[-cfg.window:])
    med = float(np.median(window))
    sigma = max(MAD_TO_SIGMA * float(np.median(np.abs(window - med))), cfg.mad_floor)
    x = math.log(norm) if math.isfinite(norm) else math.inf
    z = (x - med) / sigma
    ratio = math.exp(min(x - med, 700.0))
    if z >= cfg.z and ratio >= cfg.min_ratio:
        return Spike(param, norm, math.exp(med), ratio, z)
    return None


def detect_spikes(edits: pd.DataFrame, cfg: SpikeConfig | None = None) -> pd.DataFrame:
    """After the fact, over a run's edits table: one row per flagged (edit, parameter) with its statistics. The
    same rule as online, so the two agree on the same run."""
    cfg = cfg or SpikeConfig()
    cols = ["edit/index", "edit/batch", "param", "norm", "window_median", "ratio", "z", "norm_over_w0", "case_ids"]
    if edits.empty:
        return pd.DataFrame(columns=cols)
    det = SpikeDetector(cfg)
    params = sorted({c[len("weights/"): -len("/delta_fro")] for c in edits.columns
                     if c.startswith("weights/") and c.endswith("/delta_fro")})
    w0 = _w0_norms(edits, params)
    rows = []
    applied = edits[edits.get("edit/status", pd.Series("applied", index=edits.index)) != "rejected"]
    for _, rec in applied.sort_values("edit/index").iterrows():
        norms = {p: float(rec[f"weights/{p}/delta_fro"]) for p in params
                 if pd.notna(rec.get(f"weights/{p}/delta_fro"))}
        for s in det.update(norms):
            rows.append({"edit/index": int(rec["edit/index"]), "edit/batch": int(rec.get("edit/batch", -1)),
                         "param": s.param, "norm": s.norm, "window_median": s.median, "ratio": s.ratio, "z": s.z,
                         "norm_over_w0": s.norm / w0[s.param] if w0.get(s.param) else float("nan"),
                         "case_ids": rec.get("edit/case_ids")})
    return pd.DataFrame(rows, columns=cols)


def _w0_norms(edits: pd.DataFrame, params: list[str]) -> dict[str, float]:
    """‖W0‖_F per parameter, from the first record whose drift is non-zero (drift_fro / drift_rel)."""
    out = {}
    for p in params:
        fro, rel = edits.get(f"weights/{p}/drift_fro"), edits.get(f"weights/{p}/drift_rel")
        if fro is None or rel is None:
            continue
        ok = (rel > 0) & np.isfinite(rel) & np.isfinite(fro)
        if ok.any():
            i = ok.idxmax()
            out[p] = float(fro[i] / rel[i])
    return out


# -- what followed a flagged edit ---------------------------------------------------------------------------------

# (metric column, direction, threshold): the metric moved by at least the threshold in the bad direction between the
# last probe before the edit and the first one at or after it ("ratio" compares after/before).
CONFIRMATIONS = (
    ("probe/retention/efficacy", "drop", 0.1),
    ("probe/unedited/recall", "drop", 0.1),
    ("probe/gen_entropy/entropy", "drop_frac", 0.3),
    ("probe/perplexity/ppl", "ratio", 1.5),
)


def confirmations(probes: pd.DataFrame, edit_index: int, max_gap: int | None = None) -> list[str]:
    """The signals that moved in the bad direction across `edit_index` (each metric's last value before the edit vs
    its first value at or after it, within `max_gap` edits after it when given). Downstream task accuracies
    (`downstream/<task>/acc`) count with a drop of 0.05."""
    if probes.empty:
        return []
    found = []
    metrics = list(CONFIRMATIONS) + [(c, "drop", 0.05) for c in probes.columns
                                     if c.startswith("downstream/") and c.endswith("/acc")]
    for col, how, thr in metrics:
        if col not in probes:
            continue
        s = probes[["edit/index", col]].dropna()
        before = s[s["edit/index"] < edit_index]
        after = s[s["edit/index"] >= edit_index]
        if max_gap is not None:
            after = after[after["edit/index"] <= edit_index + max_gap]
        if before.empty or after.empty:
            continue
        b, a = float(before[col].iloc[-1]), float(after[col].iloc[0])
        moved = {"drop": b - a >= thr, "drop_frac": b > 0 and (b - a) / b >= thr,
                 "ratio": b > 0 and a / b >= thr}[how]
        if moved:
            found.append(f"{col.split('/', 1)[-1]} {b:.3g}->{a:.3g} (at edit {int(after['edit/index'].iloc[0])})")
    return found


def disabling_edits(edits: pd.DataFrame, probes: pd.DataFrame, cfg: SpikeConfig | None = None,
                    causal: pd.DataFrame | None = None) -> pd.DataFrame:
    """The evidence table: one row per flagged editor call (its worst parameter), with the confirmations that
    followed it, the causal check where one was run, and a confidence (high / medium / low)."""
    spikes = detect_spikes(edits, cfg)
    cols = ["edit/index", "case_ids", "param", "ratio", "z", "norm_over_w0", "confirmations", "causal_recovers",
            "confidence"]
    if spikes.empty:
        return pd.DataFrame(columns=cols)
    worst = spikes.sort_values("z", ascending=False).drop_duplicates("edit/index").sort_values("edit/index")
    rows = []
    for _, s in worst.iterrows():
        conf = confirmations(probes, int(s["edit/index"]))
        rec = None
        if causal is not None and not causal.empty and int(s["edit/index"]) in set(causal["edit/index"]):
            rec = bool(causal.set_index("edit/index").loc[int(s["edit/index"]), "recovers"])
        level = "low"
        if rec or (conf and s["ratio"] >= 10):
            level = "high"
        elif conf or s["ratio"] >= 30:
            level = "medium"
        rows.append({"edit/index": int(s["edit/index"]), "case_ids": s["case_ids"], "param": s["param"],
                     "ratio": float(s["ratio"]), "z": float(s["z"]), "norm_over_w0": float(s["norm_over_w0"]),
                     "confirmations": "; ".join(conf), "causal_recovers": rec, "confidence": level})
    return pd.DataFrame(rows, columns=cols)
