"""A study's folder: finished runs, failures, the results tables and the manifest.

    OUT/study.json                  options that fix what a run means (model, size, length, switches)
    OUT/runs/RUN_ID/                one finished run: video.mp4, timeline.scope.json, bank.json,
                                    [attention.npz], record.json (metadata and metrics)
    OUT/runs/.RUN_ID.partial-PID/   a run being written (renamed to RUN_ID/ once complete)
    OUT/errors/RUN_ID.json          a run that failed, with its error (retried by a rerun)
    OUT/results.parquet             one row per run (or results.csv)
    OUT/segments.parquet            one row per run and prompt segment
    OUT/manifest.json               what is done, failed and pending, and who ran what last

A run's folder appears in one rename, after every file in it is written and flushed, so a folder
named RUN_ID is always complete: a rerun skips it, and removes any partial folder of a run it
is about to redo. Every other file is written to a temporary name and renamed too.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

RECORD = "record.json"
TABLES = {"parquet": ".parquet", "csv": ".csv"}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def jsonable(value: Any) -> Any:
    """Plain JSON values: NaN and infinities become null (JSON has none), tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data: Any, atomic: bool = True) -> None:
    text = (json.dumps(jsonable(data), indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    if atomic:
        write_atomic(path, text)
    else:
        path.write_bytes(text)


class StudyStore:
    """The files of one study folder (see the module docstring)."""

    def __init__(self, out: os.PathLike):
        self.out = Path(out)
        self.runs = self.out / "runs"
        self.errors = self.out / "errors"

    def prepare(self) -> None:
        self.runs.mkdir(parents=True, exist_ok=True)
        self.errors.mkdir(parents=True, exist_ok=True)

    # -- study options ------------------------------------------------------------------------
    def check_options(self, options: dict) -> None:
        """Record the options that decide what a run means; refuse a rerun with different ones,
        whose runs would silently mix with the old ones under the same run ids."""
        path = self.out / "study.json"
        if path.is_file():
            old = json.loads(path.read_text(encoding="utf-8"))
            diff = {k: (old.get(k), v) for k, v in jsonable(options).items() if old.get(k) != v}
            if diff:
                what = ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
                raise ValueError(f"{self.out} holds a study made with other options ({what}); "
                                 "rerun with the same options or choose another --out")
            return
        write_json(path, {**options, "created": now()})

    # -- runs -----------------------------------------------------------------------------------
    def run_dir(self, run_id: str) -> Path:
        return self.runs / run_id

    def is_done(self, run_id: str) -> bool:
        return (self.run_dir(run_id) / RECORD).is_file()

    def has_failed(self, run_id: str) -> bool:
        return (self.errors / f"{run_id}.json").is_file()

    def begin(self, run_id: str) -> Path:
        """A fresh partial folder for `run_id`; partial folders of earlier attempts are removed."""
        for old in self.runs.glob(f".{run_id}.partial-*"):
            shutil.rmtree(old, ignore_errors=True)
        tmp = self.runs / f".{run_id}.partial-{socket.gethostname()}-{os.getpid()}"
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, run_id: str, record: dict) -> None:
        """Write the record last, flush everything, then publish the folder in one rename."""
        write_json(tmp / RECORD, record, atomic=False)
        for f in tmp.iterdir():
            _fsync(f)
        os.rename(tmp, self.run_dir(run_id))  # fails if RUN_ID/ exists: a finished run is never replaced
        (self.errors / f"{run_id}.json").unlink(missing_ok=True)

    def remove_partial(self) -> None:
        """Remove every partial run folder (only one study job may use a folder at a time)."""
        for old in self.runs.glob(".*.partial-*"):
            shutil.rmtree(old, ignore_errors=True)

    def abandon(self, tmp: Optional[Path]) -> None:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    def fail(self, run_id: str, record: dict) -> None:
        write_json(self.errors / f"{run_id}.json", record)

    def record(self, run_id: str) -> Optional[dict]:
        """The finished record, or the failure record, or None for a run not done yet."""
        for path in (self.run_dir(run_id) / RECORD, self.errors / f"{run_id}.json"):
            if path.is_file():
                return json.loads(path.read_text(encoding="utf-8"))
        return None

    # -- the study's tables ---------------------------------------------------------------------
    def merge(self, run_ids: Sequence[str], table: str, grid_fields: Sequence[str], invocation: dict,
              stories: Iterable[dict] = ()) -> dict:
        """Collect every run's record into the results tables and write the manifest.

        Returns the manifest (counts, per-run status, table paths).
        """
        if table not in TABLES:
            raise ValueError(f"table={table!r}; use one of {sorted(TABLES)}")
        records, status = [], {}
        for rid in run_ids:
            rec = self.record(rid)
            status[rid] = "pending" if rec is None else rec["status"]
            if rec is not None:
                records.append(rec)
        rows = [result_row(r, grid_fields) for r in records]
        seg_rows = [row for r in records for row in segment_rows(r, grid_fields)]
        results = self.out / f"results{TABLES[table]}"
        segments = self.out / f"segments{TABLES[table]}"
        write_table(results, rows, table)
        write_table(segments, seg_rows, table)
        counts = {s: sum(1 for v in status.values() if v == s) for s in ("ok", "failed", "pending")}
        manifest = {
            "updated": now(), "runs_planned": len(run_ids), **counts,
            "complete": counts["pending"] == 0,
            "tables": {"results": results.name, "segments": segments.name},
            "stories": list(stories),
            "runs": [{"id": rid, "status": s, "path": f"runs/{rid}" if s == "ok" else f"errors/{rid}.json" if s == "failed" else None}
                     for rid, s in status.items()],
            "last_invocation": invocation,
        }
        write_json(self.out / "manifest.json", manifest)
        return manifest


# -- rows -------------------------------------------------------------------------------------

_IDENTITY = ("run_id", "story", "source", "line", "setting", "seed", "status", "error")


def result_row(rec: dict, grid_fields: Sequence[str]) -> dict:
    """One flat row per run: identity, the grid's setting values, run facts, scalar metrics, and
    per-segment metrics as lists (`segment_<name>`)."""
    row = {k: rec.get(k) for k in _IDENTITY}
    stream = rec.get("stream") or {}
    row.update({f: stream.get(f) for f in grid_fields})
    for k in ("model", "height", "width", "chunks", "frames", "seconds", "generated_fps", "switch_chunks", "rank", "host"):
        row[k] = rec.get(k)
    row.update(rec.get("metrics") or {})
    segs = rec.get("segments") or []
    for key in sorted({k for s in segs for k in s} - {"segment"}):
        row[f"segment_{key}"] = [s.get(key) for s in segs]
    return row


def segment_rows(rec: dict, grid_fields: Sequence[str]) -> list[dict]:
    stream = rec.get("stream") or {}
    base = {"run_id": rec["run_id"], "story": rec.get("story"), "setting": rec.get("setting"), "seed": rec.get("seed")}
    base.update({f: stream.get(f) for f in grid_fields})
    return [{**base, **seg} for seg in rec.get("segments") or []]


def write_table(path: Path, rows: Sequence[dict], fmt: str) -> None:
    """Rows -> Parquet (typed columns, lists kept as lists) or CSV (lists as JSON text), atomically."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    data = {c: [r.get(c) for r in rows] for c in columns}
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        pq.write_table(pa.table({c: _arrow_column(c, v) for c, v in data.items()}), tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        return
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    for r in rows:
        writer.writerow(["" if r.get(c) is None else json.dumps(jsonable(r[c])) if isinstance(r.get(c), (list, dict))
                         else r[c] for c in columns])
    write_atomic(path, buf.getvalue().encode("utf-8"))


_TEXT = {"run_id", "story", "source", "setting", "status", "error", "model", "host", "prompt"}


def _kind(values: list) -> str:
    """Column type: "bool", "int", "float", "str" or "other" (nulls ignored; all-null is float)."""
    seen = {type(v) for v in values if v is not None}
    if not seen:
        return "float"
    if seen == {bool}:
        return "bool"
    if seen <= {int}:
        return "int"
    if seen <= {int, float}:
        return "float"
    return "str" if seen == {str} else "other"


def _arrow_column(name: str, values: list):
    """A typed column: metrics stay numbers (NaN-free nulls), per-segment lists stay lists."""
    import pyarrow as pa

    values = jsonable(values)
    scalar = {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64(), "str": pa.string()}
    if name in _TEXT:
        return pa.array([None if v is None else str(v) for v in values], type=pa.string())
    if all(v is None or isinstance(v, list) for v in values) and any(v is not None for v in values):
        inner = _kind([x for v in values if v is not None for x in v])
        if inner in scalar:
            return pa.array(values, type=pa.list_(scalar[inner]))
    kind = _kind(values)
    if kind in scalar:
        return pa.array(values, type=scalar[kind])
    return pa.array([None if v is None else json.dumps(v) for v in values], type=pa.string())


def check_table_format(fmt: str) -> None:
    """Refuse early (before any run) a Parquet table without pyarrow."""
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise ValueError("the Parquet results table needs pyarrow: pip install 'memflow_nb[study]' "
                             "(or use --table csv)") from None
    elif fmt not in TABLES:
        raise ValueError(f"--table {fmt}: use parquet or csv")
