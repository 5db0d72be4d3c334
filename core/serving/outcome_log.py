"""The serving outcome log: every response (and every ``POST /events`` event) appended to Parquet, off the request path.

A request only appends a tuple to a bounded in-memory queue (a deque append; never a lock
wait, never I/O). One writer thread per serving process drains the queue every
``flush_seconds`` (sooner once ``flush_rows`` are waiting) into one Parquet file per flush,
written under a hidden temp name in the same folder and renamed into place, so a reader (or
a crash) only ever sees complete files: a crash loses at most the batch being written. When
the queue is full, or a write fails (a full disk: ENOSPC), the records are dropped and
counted (``/healthz``), and the server keeps answering.

On rotation (every ``rotate_seconds``, and at shutdown) a writer compacts the small files it
wrote since the last rotation into one (written and renamed the same way, then the small ones
deleted). A crash between that rename and the deletes can leave rows twice: readers
de-duplicate on ``request_id`` / ``event_id`` (both uuid4 hex).

Layout and schema (the contract the A/B report reads; docs/serving-experiments.md)::

    <log dir>/requests/requests-<worker>-<utc timestamp>-<seq>.parquet
    <log dir>/events/events-<worker>-<utc timestamp>-<seq>.parquet
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger("recflow.serving")

REQUESTS_DIR = "requests"
EVENTS_DIR = "events"
REQUESTS_PREFIX = "requests"
EVENTS_PREFIX = "events"
PARQUET_SUFFIX = ".parquet"
TEMP_SUFFIX = ".tmp"
ITEMS_CAP = 200  # a longer request history is logged as counts only (n_items, n_unknown)
STALE_TEMP_SECONDS = 600.0  # temp files older than this at start are leftovers of a crash
CONVERT_CHUNK = 256  # rows converted between two yields of the GIL to the event loop

TS = pa.timestamp("us", tz="UTC")
REQUEST_SCHEMA = pa.schema([
    ("request_id", pa.string()), ("ts", TS), ("experiment", pa.string()), ("arm", pa.string()),
    ("shadow", pa.bool_()), ("entry", pa.string()), ("version", pa.string()), ("session", pa.string()),
    ("items", pa.list_(pa.string())), ("n_items", pa.int32()), ("n_unknown", pa.int32()),
    ("rec_items", pa.list_(pa.string())), ("rec_scores", pa.list_(pa.float32())),
])
EVENT_SCHEMA = pa.schema([
    ("event_id", pa.string()), ("ts", TS), ("session", pa.string()), ("item", pa.string()),
    ("kind", pa.string()), ("value", pa.float64()),
])

# What the request path appends (tuples: cheaper than dicts or dataclasses on the hot path).
# (request_id, ts_us, experiment, arm, shadow, entry, version, session, items|None, n_items, n_unknown,
#  [{"item": str, "score": float}, ...] as returned)
RequestRow = tuple[str, int, str | None, str, bool, str, str, str | None, list[Any] | None, int, int,
                   list[dict[str, Any]]]
# (event_id, ts_us, session, item, kind, value)
EventRow = tuple[str, int, str | None, str, str, float | None]


def now_us() -> int:
    """The current time as integer microseconds since the epoch (the log's ``ts``)."""
    return time.time_ns() // 1000


_RECS = pa.list_(pa.struct([("item", pa.string()), ("score", pa.float64())]))
_STRINGS = pa.list_(pa.string())


def request_table(rows: Sequence[RequestRow]) -> pa.Table:
    """The request rows as a table in ``REQUEST_SCHEMA`` (built on the writer thread).

    Converted column-wise by pyarrow (C++), not row by row in Python: the writer holds the
    GIL while it reads the rows, and every millisecond it holds it delays the event loop.
    """
    cols = list(zip(*rows)) if rows else [()] * 12
    arrays = [pa.array(c, type=f.type) for c, f in zip(cols[:8], REQUEST_SCHEMA)]
    try:
        items = pa.array(cols[8], type=_STRINGS)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # integer ids in a history: as text
        items = pa.array([None if x is None else [str(v) for v in x] for x in cols[8]], type=_STRINGS)
    recs = pa.array(cols[11], type=_RECS)  # the answer's [{"item", "score"}] as returned
    pairs = recs.values
    arrays += [items, pa.array(cols[9], type=pa.int32()), pa.array(cols[10], type=pa.int32()),
               pa.ListArray.from_arrays(recs.offsets, pairs.field("item")),
               pa.ListArray.from_arrays(recs.offsets, pairs.field("score").cast(pa.float32()))]
    return pa.Table.from_arrays(arrays, schema=REQUEST_SCHEMA)


def event_table(rows: Sequence[EventRow]) -> pa.Table:
    """The event rows as a table in ``EVENT_SCHEMA``."""
    cols = list(zip(*rows)) if rows else [()] * len(EVENT_SCHEMA)
    return pa.Table.from_arrays([pa.array(list(c), type=f.type) for c, f in zip(cols, EVENT_SCHEMA)],
                                schema=EVENT_SCHEMA)


class ParquetLog:
    """A bounded queue drained by one writer thread into complete Parquet files.

    Args:
        folder: where the files go (created).
        prefix: file name prefix (``requests`` or ``events``).
        to_table: turns a batch of queued rows into a ``pyarrow.Table``.
        worker: this process's name in file names (default ``w<pid>``: one writer per process).
        max_queue: rows held at most; more are dropped and counted.
        flush_rows: wake the writer once this many rows wait.
        flush_seconds: the longest a row waits before being written.
        rotate_seconds: compact this writer's files every so often (0: only at close).
    """

    def __init__(
        self,
        folder: Path,
        prefix: str,
        to_table: Callable[[Sequence[Any]], pa.Table],
        *,
        worker: str | None = None,
        max_queue: int = 100_000,
        flush_rows: int = 5_000,
        flush_seconds: float = 1.0,
        rotate_seconds: float = 300.0,
    ) -> None:
        self.folder = Path(folder)
        self.prefix = prefix
        self.to_table = to_table
        self.worker = worker or f"w{os.getpid()}"
        self.max_queue, self.flush_rows = max_queue, flush_rows
        self.flush_seconds, self.rotate_seconds = flush_seconds, rotate_seconds
        self._queue: collections.deque[Any] = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_lock = threading.Lock()  # flush() from a caller vs the writer thread
        self._seq = 0
        self._unrotated: list[Path] = []
        self._last_rotation = time.monotonic()
        # Counters: each written by one thread only (no lock needed under the GIL).
        self.dropped_full = 0  # request path: the queue was full
        self.dropped_failed = 0  # writer thread: the write failed (e.g. disk full)
        self.written_rows = 0
        self.written_files = 0
        self.last_error: str | None = None

    # ----------------------------------------------------------------- request path

    def submit(self, row: Any) -> bool:
        """Queue one row; never blocks. False (and counted) when the queue is full."""
        queue = self._queue
        if len(queue) >= self.max_queue:
            self.dropped_full += 1
            return False
        queue.append(row)
        if len(queue) == self.flush_rows:
            self._wake.set()
        return True

    def stats(self) -> dict[str, Any]:
        """Counters for ``/healthz``."""
        return {"written_rows": self.written_rows, "written_files": self.written_files,
                "queued": len(self._queue), "dropped": self.dropped_full + self.dropped_failed,
                "last_error": self.last_error}

    # ----------------------------------------------------------------- writer thread

    def start(self) -> None:
        if self._thread is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temps()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=f"recflow-{self.prefix}-log", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Write what is queued, compact, and stop the writer."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.flush()
        self.rotate()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            try:
                self.flush()
                if self.rotate_seconds and time.monotonic() - self._last_rotation >= self.rotate_seconds:
                    self.rotate()
            except Exception as exc:  # the writer must outlive any one bad batch
                self._error(f"{type(exc).__name__}: {exc}")

    def flush(self) -> int:
        """Write everything queued now as one file. Returns the rows written (0 if dropped)."""
        with self._write_lock:
            rows = []
            queue = self._queue
            while queue:
                rows.append(queue.popleft())
            if not rows:
                return 0
            try:
                tables = []
                for start in range(0, len(rows), CONVERT_CHUNK):
                    tables.append(self.to_table(rows[start:start + CONVERT_CHUNK]))
                    time.sleep(0)  # let the event loop run between chunks
                path = self._write(pa.concat_tables(tables))
            except Exception as exc:  # ENOSPC, EIO, a bad row: this batch is lost, never the server
                self.dropped_failed += len(rows)
                self._error(f"{len(rows)} rows dropped: {type(exc).__name__}: {exc}")
                return 0
            self._unrotated.append(path)
            self.written_rows += len(rows)
            self.written_files += 1
            return len(rows)

    def rotate(self) -> Path | None:
        """Compact this writer's files since the last rotation into one. Returns the new file, if any."""
        with self._write_lock:
            self._last_rotation = time.monotonic()
            small, self._unrotated = self._unrotated, []
            if len(small) < 2:
                return None
            try:
                table = pa.concat_tables([pq.read_table(p) for p in small])
                path = self._write(table)
            except Exception as exc:  # the small files stay: nothing lost, only not compacted
                self._error(f"compaction skipped: {type(exc).__name__}: {exc}")
                return None
            for p in small:
                with contextlib.suppress(OSError):
                    p.unlink()
            self.written_files -= len(small) - 1
            return path

    def _next_name(self) -> str:
        self._seq += 1
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        return f"{self.prefix}-{self.worker}-{stamp}-{self._seq:06d}{PARQUET_SUFFIX}"

    def _write(self, table: pa.Table) -> Path:
        """Write ``table`` to a temp name, fsync, rename: the file appears complete or not at all."""
        self.folder.mkdir(parents=True, exist_ok=True)  # also after someone removed it
        final = self.folder / self._next_name()
        tmp = self.folder / f".{final.name}{TEMP_SUFFIX}"
        try:
            self.write_file(table, tmp)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return final

    def write_file(self, table: pa.Table, path: Path) -> None:
        """The one place bytes reach the disk (a test overrides it to fake a full disk)."""
        with open(path, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
            fh.flush()
            os.fsync(fh.fileno())

    def _error(self, message: str) -> None:
        if message != self.last_error:
            log.error("%s log (%s): %s", self.prefix, self.folder, message)
        self.last_error = message

    def _remove_stale_temps(self) -> None:
        cutoff = time.time() - STALE_TEMP_SECONDS
        for p in self.folder.glob(f".{self.prefix}-*{TEMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                if p.stat().st_mtime < cutoff:
                    p.unlink()


def request_log(log_dir: Path, **kwargs: Any) -> ParquetLog:
    """The request log under ``<log dir>/requests/``."""
    return ParquetLog(Path(log_dir) / REQUESTS_DIR, REQUESTS_PREFIX, request_table, **kwargs)


def event_log(log_dir: Path, **kwargs: Any) -> ParquetLog:
    """The events log under ``<log dir>/events/``."""
    return ParquetLog(Path(log_dir) / EVENTS_DIR, EVENTS_PREFIX, event_table, **kwargs)


def read_log(folder: Path, prefix: str) -> pa.Table:
    """Every complete file of one log folder as one table (temp files never included)."""
    files = sorted(Path(folder).glob(f"{prefix}-*{PARQUET_SUFFIX}"))
    if not files:
        schema = REQUEST_SCHEMA if prefix == REQUESTS_PREFIX else EVENT_SCHEMA
        return schema.empty_table()
    return pa.concat_tables([pq.read_table(p) for p in files])


__all__ = ["EVENTS_DIR", "EVENT_SCHEMA", "ITEMS_CAP", "REQUESTS_DIR", "REQUEST_SCHEMA", "EventRow", "ParquetLog",
           "RequestRow", "event_log", "event_table", "now_us", "read_log", "request_log", "request_table"]
