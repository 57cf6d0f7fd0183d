"""wandb as a view of the run (the local JSONL is the truth).

Lazy import; the run id is fixed and stored in the run dir so a resumed job continues the same wandb run; every
metric is plotted against `edit/index`. Any wandb failure (not installed, unreachable, quota) disables the sink with
one warning and the run goes on. `read_offline_history` parses an offline `.wandb` file (LevelDB-style log of protobuf
`Record`s) so tests can check what really reached wandb.
"""
from __future__ import annotations

import json
import logging
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class WandbSink:
    def __init__(
        self,
        *,
        run_id: str,
        run_dir: Path,
        mode: str,
        project: str,
        entity: str | None = None,
        group: str | None = None,
        tags: tuple[str, ...] = (),
        config: Mapping[str, Any] | None = None,
        name: str | None = None,
        resume: str = "allow",
        init_timeout_s: float | None = None,
        offline_fallback: bool = True,
    ) -> None:
        """`init_timeout_s` bounds an online wandb.init (None: wandb's default, 90 s); if an online init fails
        (timeout, no network, not logged in) and `offline_fallback`, the sink logs offline instead and `note` says
        so and how to upload the run later."""
        self.run = None
        self.failed = False
        self.mode = mode
        self.note: str | None = None  # what the caller should tell the user (an offline fallback)
        if mode == "disabled":
            return
        try:
            import wandb

            kwargs: dict[str, Any] = dict(
                id=run_id, name=name or run_id, project=project, entity=entity, group=group, tags=list(tags),
                config=dict(config or {}), dir=str(run_dir), resume=resume, job_type="edit-stream",
            )
            timeout = {} if init_timeout_s is None else {"init_timeout": float(init_timeout_s)}
            settings = wandb.Settings(console="off", silent=True, **timeout)
            try:
                self.run = wandb.init(mode=mode, settings=settings, **kwargs)
            except Exception as e:  # noqa: BLE001 - whatever stopped the online init, offline still works
                if mode != "online" or not offline_fallback:
                    raise
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                self.note = (
                    f"wandb online init failed ({type(e).__name__}: {first}; wandb.init_timeout_s="
                    f"{init_timeout_s if init_timeout_s is not None else 'wandb default'}): logging offline to "
                    f"{run_dir}/wandb instead; upload the run later with `seqedit push-wandb {run_dir}` from a "
                    "machine with network (the local JSONL telemetry is complete either way)")
                log.warning("%s", self.note)
                wandb.teardown()  # the failed run keeps its id registered in wandb's service until torn down
                self.mode = "offline"
                self.run = wandb.init(mode="offline", settings=wandb.Settings(console="off", silent=True), **kwargs)
            self.run.define_metric("edit/index")
            self.run.define_metric("*", step_metric="edit/index")
        except Exception as e:  # noqa: BLE001 - any failure must not stop the run
            self._fail("init", e)

    def _fail(self, what: str, err: BaseException) -> None:
        if not self.failed:
            log.warning("wandb %s failed (%s: %s); continuing without wandb, local JSONL is complete",
                        what, type(err).__name__, err)
        self.failed = True
        self.run = None

    def log(self, stream: str, record: Mapping[str, Any]) -> None:
        if self.run is None:
            return
        # Scalars only; lists (case ids) stay in the JSONL. Never pass step=: re-logged indices after a resume are kept.
        data = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if stream == "alerts":
            self.alert(str(record.get("alert/kind", "alert")), str(record.get("alert/message", "")))
            return
        try:
            self.run.log(data)
        except Exception as e:  # noqa: BLE001
            self._fail("log", e)

    def alert(self, title: str, text: str) -> None:
        if self.run is None:
            return
        try:
            if self.mode == "online":
                self.run.alert(title=title, text=text)
        except Exception as e:  # noqa: BLE001
            self._fail("alert", e)

    def attach_outputs(self, run_dir: Path, edit_index: int) -> None:
        """Put the run's end products into wandb: the retention matrix as a table (`retention/matrix`, logged at the
        last edit index) and the local files themselves (JSONL streams, matrix CSV, summary) in the run's files."""
        if self.run is None:
            return
        try:
            import wandb

            matrix = run_dir / "retention_matrix.csv"
            if matrix.is_file():
                import pandas as pd

                df = pd.read_csv(matrix)
                df.columns = [str(c) for c in df.columns]
                self.run.log({"edit/index": edit_index, "retention/matrix": wandb.Table(dataframe=df)})
            for path in [matrix, run_dir / "summary.json", *sorted((run_dir / "telemetry").glob("*.jsonl"))]:
                if path.is_file():
                    self.run.save(str(path), base_path=str(run_dir), policy="now")
        except Exception as e:  # noqa: BLE001
            self._fail("attach", e)

    @property
    def active(self) -> bool:
        return self.run is not None

    def attach_analysis(self, summary: Mapping[str, Any], evidence) -> None:
        """Detection results into the run summary (`analysis/*`) and the disabling-edit evidence as a Table."""
        if self.run is None:
            return
        try:
            import wandb

            self.run.summary.update({
                "analysis/disabling_edits": len(summary.get("disabling_edits", [])),
                "analysis/disabling_edit_indices": list(summary.get("disabling_edits", [])),
                "analysis/catastrophic_start": summary.get("catastrophic_start"),
                "analysis/phase_curve": summary.get("phase_curve"),
                "analysis/conclusion": "\n".join(summary.get("conclusion", [])),
            })
            if len(evidence):
                df = evidence.astype({"case_ids": str}) if "case_ids" in evidence else evidence
                self.run.log({"analysis/disabling_edits_table": wandb.Table(dataframe=df)})
        except Exception as e:  # noqa: BLE001
            self._fail("attach analysis", e)

    def close(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as e:  # noqa: BLE001
            self._fail("finish", e)
        self.run = None


# ---------------------------------------------------------------------------------------------------------------
# Reading an offline run back (LevelDB log format: 32 KiB blocks of [crc32:4][length:2][type:1][payload])

_BLOCK = 32 * 1024
_HEADER = struct.Struct("<IHB")  # masked crc32c, length, type (1 full, 2 first, 3 middle, 4 last)


def _records(data: bytes):
    pos, buf = 7, b""  # the file starts with a 7-byte ":W&B" header
    while pos + _HEADER.size <= len(data):
        space = _BLOCK - (pos % _BLOCK)
        if space < _HEADER.size:  # block trailer padding
            pos += space
            continue
        _crc, length, kind = _HEADER.unpack_from(data, pos)
        pos += _HEADER.size
        chunk = data[pos : pos + length]
        pos += length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            yield chunk
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            yield buf + chunk
            buf = b""


def read_offline_history(wandb_file: str | Path) -> list[dict[str, Any]]:
    """History rows of an offline run file (`run-<id>.wandb`), as dicts of key -> decoded value."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for payload in _records(Path(wandb_file).read_bytes()):
        rec = pb.Record()
        try:
            rec.ParseFromString(payload)
        except Exception:  # noqa: BLE001 - skip records of unknown versions
            continue
        if rec.WhichOneof("record_type") == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def find_offline_run_file(run_dir: str | Path) -> Path | None:
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    return files[-1] if files else None


_ = zlib  # crc checks are skipped: a torn record fails protobuf parsing and is dropped


def push_wandb(run_dir: str | Path, *, mode: str = "online", project: str | None = None,
               entity: str | None = None) -> int:
    """Replay a run's JSONL telemetry into wandb (for clusters whose compute nodes are offline).

    Records go in their original order (`log/seq`), under the run's own wandb id, so a push from a login node
    continues the same run. Returns the number of records sent.
    """
    import yaml

    from seqedit.io import read_jsonl

    run_dir = Path(run_dir)
    state_path = run_dir / "state.json"
    if not state_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a seqedit run directory (no state.json)")
    state = json.loads(state_path.read_text())
    cfg_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else "{}"
    cfg = yaml.safe_load(cfg_text) or {}
    wcfg = cfg.get("wandb", {})
    records = []
    for path in sorted((run_dir / "telemetry").glob("*.jsonl")):
        stream = path.stem
        if stream.startswith("items-"):
            continue  # per-item rows stay local (too many for wandb history)
        records.extend((r.get("log/seq", 0), stream, r) for r in read_jsonl(path))
    records.sort(key=lambda t: t[0])
    sink = WandbSink(run_id=state["wandb_id"], run_dir=run_dir, mode=mode, project=project or wcfg.get(
        "project", "seqedit"), entity=entity or wcfg.get("entity"), group=wcfg.get("group"),
        tags=tuple(wcfg.get("tags", ())), config=cfg, name=state["run_id"],
        offline_fallback=False)  # a push is for reaching the server: failing is the honest answer
    if sink.failed:
        raise RuntimeError("wandb could not be initialised; see the warning above")
    for _, stream, record in records:
        sink.log(stream, record)
    sink.attach_outputs(run_dir, int(state.get("edits_done", 0)))
    sink.close()
    if sink.failed:
        raise RuntimeError("wandb failed while pushing; the local JSONL is unchanged, retry later")
    return len(records)
