"""A run directory -> tidy pandas DataFrames: one row per record, metric keys as columns, deduplicated by log
sequence number (a resumed run's streams are cut back before they continue, but files copied together from two
attempts may repeat records; the last one of each sequence number wins)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from seqedit.io import read_jsonl


@dataclass(frozen=True)
class RunData:
    run_dir: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    edits: pd.DataFrame  # one row per editor call (edit/index, edit/status, weights/*, editor/*, immediate/*)
    probes: pd.DataFrame  # one row per probe record (probe/name, edit/index, probe metrics, downstream/*)
    alerts: pd.DataFrame
    items: dict[str, pd.DataFrame] = field(default_factory=dict)  # items-<probe> streams
    retention_matrix: pd.DataFrame | None = None  # rows (position, case_id), columns edit index of the check

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def label(self) -> str:
        """editor name + run id, for legends."""
        ed = self.config.get("editor", {}).get("name", "?")
        return f"{ed} ({self.run_dir.name})"

    @property
    def seedless_key(self) -> str:
        """The config without its seed: runs that differ only in the seed share it (aggregated in reports)."""
        cfg = {k: v for k, v in self.config.items() if k not in ("seed", "runs_dir", "threads", "cache_dir", "wandb")}
        return json.dumps(cfg, sort_keys=True, default=str)

    def probe(self, name: str) -> pd.DataFrame:
        """The records of one probe, sorted by edit index, columns without NaN-only ones."""
        if self.probes.empty or "probe/name" not in self.probes:
            return pd.DataFrame()
        df = self.probes[self.probes["probe/name"] == name].sort_values("edit/index")
        return df.dropna(axis=1, how="all").reset_index(drop=True)

    def params(self) -> list[str]:
        """The touched parameters (from the weights/<param>/delta_fro columns)."""
        return sorted({c[len("weights/"): -len("/delta_fro")] for c in self.edits.columns
                       if c.startswith("weights/") and c.endswith("/delta_fro")})


_NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _frame(rows: list[dict[str, Any]], items: bool = False) -> pd.DataFrame:
    """Records -> DataFrame. Records are deduplicated by log/seq; item rows share the seq of the record they belong
    to, so they are deduplicated as whole rows instead."""
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows)
    if items:
        key = df.map(lambda v: str(v) if isinstance(v, (list, dict)) else v)
        df = df[~key.duplicated(keep="last")].reset_index(drop=True)
    elif "log/seq" in df:
        df = df.drop_duplicates("log/seq", keep="last").sort_values("log/seq").reset_index(drop=True)
    for col in df.columns:  # JSON has no NaN/Inf: the writer stores them as strings
        if df[col].dtype == object and df[col].isin(list(_NONFINITE)).any():
            df[col] = df[col].map(lambda v: _NONFINITE.get(v, v) if isinstance(v, str) else v)
            try:
                df[col] = pd.to_numeric(df[col])
            except (ValueError, TypeError):
                pass
    return df


def load_run(run_dir: str | Path) -> RunData:
    """Everything a run wrote, as DataFrames. Works on live, preempted and finished runs."""
    import yaml

    run_dir = Path(run_dir)
    if not (run_dir / "state.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a seqedit run directory (no state.json)")
    tel = run_dir / "telemetry"
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    items = {p.stem[len("items-"):]: _frame(read_jsonl(p), items=True) for p in sorted(tel.glob("items-*.jsonl"))}
    matrix = None
    if (run_dir / "retention_matrix.csv").is_file():
        matrix = pd.read_csv(run_dir / "retention_matrix.csv", index_col=[0, 1])
    return RunData(run_dir=run_dir, config=config or {}, summary=summary,
                   edits=_frame(read_jsonl(tel / "edits.jsonl")), probes=_frame(read_jsonl(tel / "probes.jsonl")),
                   alerts=_frame(read_jsonl(tel / "alerts.jsonl")), items=items, retention_matrix=matrix)


def load_runs(run_dirs: list[str | Path]) -> list[RunData]:
    return [load_run(d) for d in run_dirs]
