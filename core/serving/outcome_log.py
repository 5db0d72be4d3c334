"""The serving outcome log: every response (and every ``POST /events`` event) appended to Parquet, off the request path.

A request encodes its record as one JSON line (orjson, a few microseconds) and appends it to
a bounded in-memory queue (a deque append; never a lock wait, never I/O). One writer thread
per serving process drains the queue every
``flush_seconds`` (sooner once ``flush_rows`` are waiting) into one Parquet file per flush,
written under a hidden temp name in the same folder and renamed into place, so a reader (or
a crash) only ever sees complete files: a crash loses at most the batch being written. When
the queue is full, or a write fails (a full disk: ENOSPC), the records are dropped and
counted (``/healthz``), and the server keeps answering.

Why JSON lines: the writer turns a batch into Arrow with pyarrow's JSON reader and writes
Parquet, both in C++ without the GIL, so the event loop keeps running during a flush.
Converting Python tuples instead held the GIL for ~40 us a row (200 ms per 5,000-row flush,
in 256-row slices), which doubled the serving p99 (benchmarks/README.md).

On rotation (every ``rotate_seconds``, and at shutdown) a writer compacts the small files it
wrote since the last rotation into one (written and renamed the same way, then the small ones
deleted). A crash between that rename and the deletes can leave rows twice: readers
de-duplicate on ``request_id`` / ``event_id`` (``record_id``: unique across processes and restarts).

Layout and schema (the contract the A/B report reads; docs/serving-experiments.md)::

    <log dir>/requests/requests-<worker>-<utc timestamp>-<seq>.parquet
    <log dir>/events/events-<worker>-<utc timestamp>-<seq>.parquet
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

log = logging.getLogger("recflow.serving")

REQUESTS_DIR = "requests"
EVENTS_DIR = "events"
REQUESTS_PREFIX = "requests"
EVENTS_PREFIX = "events"
PARQUET_SUFFIX = ".parquet"
SPOOL_SUFFIX = ".jsonl"  # a flushed batch before its conversion to Parquet
TEMP_SUFFIX = ".tmp"
ITEMS_CAP = 200  # a longer request history is logged as counts only (n_items, n_unknown)
CONVERTER_START_SECONDS = 60.0
CONVERTER_RESTART_SECONDS = 30.0  # a converter that died is started again at most this often
READY = b"ready\n"  # the converter's one line on stdout, once it can take spools
STALE_TEMP_SECONDS = 600.0  # temp files older than this at start are leftovers of a crash

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

# How the request path's records travel to the writer: one JSON object per line, the schema's
# columns with ``ts`` as integer microseconds, and the answer's items and scores as returned.
_RECS = pa.list_(pa.struct([("item", pa.string()), ("score", pa.float64())]))
_REQUEST_LINE = pa.schema([*(f if f.name != "ts" else pa.field("ts", pa.int64()) for f in REQUEST_SCHEMA
                             if f.name not in ("rec_items", "rec_scores")), ("recs", _RECS)])
_EVENT_LINE = pa.schema([f if f.name != "ts" else pa.field("ts", pa.int64()) for f in EVENT_SCHEMA])


_ID_PREFIX = os.urandom(8).hex()  # per process: 64 random bits, so ids of two workers or restarts never meet
_ID_COUNTER = itertools.count()


def record_id() -> str:
    """A new request or event id: 32 hex characters, the process's random prefix and a counter.

    Why not uuid4: it reads os.urandom, a system call that releases the GIL, and under load
    the event loop then waited for the scorer thread to hand it back (uuid4 was 6% of the
    loop's samples); this is a counter increment.
    """
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def now_us() -> int:
    """The current time as integer microseconds since the epoch (the log's ``ts``)."""
    return time.time_ns() // 1000


def request_line(request_id: str, ts: int, experiment: str | None, arm: str, shadow: bool, entry: str,
                 version: str, session: str | None, items: Sequence[Any] | None, n_items: int, n_unknown: int,
                 recs: Sequence[dict[str, Any]]) -> bytes:
    """One answer as a log line (called on the request path: keep it cheap).

    Args:
        items: the request's history as sent (ids as text or integers), None past ``ITEMS_CAP``.
        recs: the answer's ``[{"item": str, "score": float}, ...]`` as returned.

    Returns:
        The JSON line ``request_table`` reads.
    """
    if items is not None and not all(type(i) is str for i in items):
        items = [str(i) for i in items]  # integer ids: the log's items are text, as the catalogue's
    return orjson.dumps({"request_id": request_id, "ts": ts, "experiment": experiment, "arm": arm, "shadow": shadow,
                         "entry": entry, "version": version, "session": session, "items": items,
                         "n_items": n_items, "n_unknown": n_unknown, "recs": recs})


def event_line(event_id: str, ts: int, session: str | None, item: str, kind: str, value: float | None) -> bytes:
    """One ``POST /events`` outcome as a log line (``event_table`` reads it)."""
    return orjson.dumps({"event_id": event_id, "ts": ts, "session": session, "item": item, "kind": kind,
                         "value": value})


def _read_lines(lines: Sequence[bytes], schema: pa.Schema) -> pa.Table:
    """JSON lines as a table in ``schema``, parsed in C++ with the GIL released."""
    data = b"\n".join(lines)
    return pj.read_json(pa.BufferReader(data),
                        read_options=pj.ReadOptions(use_threads=False, block_size=len(data) + 1),
                        parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="error"))


def request_table(lines: Sequence[bytes]) -> pa.Table:
    """``request_line`` lines as a table in ``REQUEST_SCHEMA`` (built on the writer thread)."""
    if not lines:
        return REQUEST_SCHEMA.empty_table()
    raw = _read_lines(lines, _REQUEST_LINE)
    recs = raw.column("recs").combine_chunks()
    pairs = recs.values
    arrays = [raw.column(f.name) if f.name != "ts" else pc.cast(raw.column("ts"), TS) for f in list(REQUEST_SCHEMA)[:11]]
    arrays += [pa.ListArray.from_arrays(recs.offsets, pairs.field("item")),
               pa.ListArray.from_arrays(recs.offsets, pairs.field("score").cast(pa.float32()))]
    return pa.Table.from_arrays(arrays, schema=REQUEST_SCHEMA)


def event_table(lines: Sequence[bytes]) -> pa.Table:
    """``event_line`` lines as a table in ``EVENT_SCHEMA``."""
    if not lines:
        return EVENT_SCHEMA.empty_table()
    raw = _read_lines(lines, _EVENT_LINE)
    return raw.set_column(1, "ts", pc.cast(raw.column("ts"), TS)).cast(EVENT_SCHEMA)


class ParquetLog:
    """A bounded queue drained by one writer thread into complete files: JSON-lines spools, then Parquet.

    Each flush writes the queued lines as one spool file (``.jsonl``: temp name, fsync, rename),
    so a crash loses at most what was still queued. The spool is then converted to a Parquet
    file of the same name and deleted: on this writer thread (``converter="thread"``), or by a
    child process at low CPU priority (``converter="process"``, what ``recflow serve`` uses: the
    serving process then never parses or compresses; measured in benchmarks/README.md). A
    spool a converter has not reached yet is still read by ``read_log`` and ``convert_spools``.

    Args:
        folder: where the files go (created).
        prefix: file name prefix (``requests`` or ``events``).
        to_table: turns a batch of lines into a ``pyarrow.Table``.
        worker: this process's name in file names (default ``w<pid>``: one writer per process).
        max_queue: rows held at most; more are dropped and counted.
        flush_rows: wake the writer once this many rows wait.
        flush_seconds: the longest a row waits before being written.
        rotate_seconds: compact this writer's Parquet files every so often (0: only at close).
        converter: ``"thread"`` or ``"process"`` (see above).
    """

    def __init__(
        self,
        folder: Path,
        prefix: str,
        to_table: Callable[[Sequence[bytes]], pa.Table],
        *,
        worker: str | None = None,
        max_queue: int = 100_000,
        flush_rows: int = 5_000,
        flush_seconds: float = 1.0,
        rotate_seconds: float = 300.0,
        converter: Literal["thread", "process"] = "thread",
    ) -> None:
        self.folder = Path(folder)
        self.prefix = prefix
        self.to_table = to_table
        self.worker = worker or f"w{os.getpid()}"
        self.max_queue, self.flush_rows = max_queue, flush_rows
        self.flush_seconds, self.rotate_seconds = flush_seconds, rotate_seconds
        self.converter = converter
        self._queue: collections.deque[bytes] = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._child_started = 0.0
        self.restart_seconds = CONVERTER_RESTART_SECONDS
        self._write_lock = threading.Lock()  # flush() from a caller vs the writer thread
        self._seq = 0
        self._unrotated: list[Path] = []
        self._last_rotation = time.monotonic()
        # Counters: each written by one thread only (no lock needed under the GIL).
        self.dropped_full = 0  # request path: the queue was full
        self.dropped_failed = 0  # writer thread: the spool write failed (e.g. disk full)
        self.written_rows = 0  # rows on disk (in a spool or a Parquet file)
        self.written_files = 0  # Parquet files this object wrote (thread converter)
        self.last_error: str | None = None

    # ----------------------------------------------------------------- request path

    def submit(self, row: bytes) -> bool:
        """Queue one encoded row (``request_line`` / ``event_line``); never blocks. False (and counted) when full."""
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
        out = {"written_rows": self.written_rows, "written_files": self.written_files,
               "queued": len(self._queue), "dropped": self.dropped_full + self.dropped_failed,
               "last_error": self.last_error}
        if self.converter == "process":
            child = self._child
            out["converter"] = {"pid": child.pid if child else None, "running": bool(child and child.poll() is None)}
        return out

    # ----------------------------------------------------------------- writer thread

    def start(self) -> None:
        if self._thread is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temps()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=f"recflow-{self.prefix}-log", daemon=True)
            self._thread.start()
            if self.converter == "process":
                self._start_child()  # now, not at the first flush: its start-up is its biggest CPU burst

    def close(self) -> None:
        """Write what is queued, convert and compact, and stop the writer (and its converter)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.flush()
        if self.converter == "process":
            self._stop_child()
        else:
            self.rotate()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            try:
                self.flush()
                if self.converter == "thread" and self.seconds_to_rotation() == 0.0:
                    self.rotate()
            except Exception as exc:  # the writer must outlive any one bad batch
                self._error(f"{type(exc).__name__}: {exc}")

    def flush(self) -> int:
        """Write everything queued now as one spool, and convert it. Returns the rows written (0 if dropped)."""
        with self._write_lock:
            rows = []
            queue = self._queue
            while queue:
                rows.append(queue.popleft())
            if not rows:
                return 0
            try:
                self._write(self.file_name(SPOOL_SUFFIX), lambda fh: fh.write(b"\n".join(rows)))
            except Exception as exc:  # ENOSPC, EIO: this batch is lost, never the server
                self.dropped_failed += len(rows)
                self._error(f"{len(rows)} rows dropped: {type(exc).__name__}: {exc}")
                return 0
            self.written_rows += len(rows)
            if self.converter == "process":
                self._notify_child()
            else:
                self.convert_pending()
            return len(rows)

    def convert_pending(self) -> list[Path]:
        """Convert this writer's spools to Parquet, oldest first. Returns the new files.

        A spool that fails to convert (disk full) stays, with its rows, for the next call.
        """
        done = []
        for spool in sorted(self.folder.glob(f"{self.prefix}-{self.worker}-*{SPOOL_SUFFIX}")):
            try:
                done.append(self.convert(spool))
            except FileNotFoundError:  # converted by someone else (convert_spools) meanwhile
                continue
            except Exception as exc:
                self._error(f"{spool.name} kept for a later try: {type(exc).__name__}: {exc}")
                break
        return done

    def convert(self, spool: Path) -> Path:
        """One spool to the Parquet file of the same name (temp, fsync, rename); the spool deleted after."""
        table = self.to_table(spool.read_bytes().split(b"\n"))  # read_spool, with this writer's to_table
        final = self._write(spool.name[: -len(SPOOL_SUFFIX)] + PARQUET_SUFFIX,
                            lambda fh: pq.write_table(table, fh, compression="zstd"))
        with contextlib.suppress(FileNotFoundError):
            spool.unlink()
        self._unrotated.append(final)
        self.written_files += 1
        return final

    def seconds_to_rotation(self) -> float | None:
        """Seconds until the next compaction is due (0.0: due now; None: only at close)."""
        if not self.rotate_seconds:
            return None
        return max(0.0, self.rotate_seconds - (time.monotonic() - self._last_rotation))

    def rotate(self) -> Path | None:
        """Compact this writer's Parquet files since the last rotation into one. Returns the new file, if any."""
        with self._write_lock:
            self._last_rotation = time.monotonic()
            small, self._unrotated = self._unrotated, []
            if len(small) < 2:
                return None
            try:
                table = pa.concat_tables([pq.read_table(p) for p in small])
                path = self._write(self.file_name(PARQUET_SUFFIX), lambda fh: pq.write_table(table, fh, compression="zstd"))
            except Exception as exc:  # the small files stay: nothing lost, only not compacted
                self._error(f"compaction skipped: {type(exc).__name__}: {exc}")
                return None
            for p in small:
                with contextlib.suppress(OSError):
                    p.unlink()
            self.written_files -= len(small) - 1
            return path

    # ----------------------------------------------------------------- the converter process

    def _notify_child(self) -> None:
        """Tell the converter a spool is waiting (one line on its stdin); start it if it is not running."""
        child = self._child
        if child is None or child.poll() is not None:
            if child is not None and time.monotonic() - self._child_started < self.restart_seconds:
                return  # it died moments after starting (a full disk?): spools wait; no restart loop
            if child is not None:
                self._error(f"the log converter exited with code {child.returncode}; starting a new one")
            child = self._start_child()
        try:
            assert child.stdin is not None
            child.stdin.write(b"\n")
            child.stdin.flush()
        except OSError as exc:  # it died just now: the spool stays on disk, the next flush restarts it
            self._error(f"the log converter is gone ({exc.strerror or exc}); spools wait on disk")

    def _start_child(self) -> subprocess.Popen[bytes]:
        """Start the converter and wait until it is ready, so its start-up (imports) is over before serving."""
        self._child_started = time.monotonic()
        root = str(Path(__file__).resolve().parents[2])  # where `core` is, installed or a checkout
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        child = self._child = subprocess.Popen(
            [sys.executable, "-m", "core.serving.log_converter", str(self.folder.resolve()), self.prefix, self.worker,
             str(self.rotate_seconds)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], CONVERTER_START_SECONDS)
        if not ready or child.stdout.readline() != READY:
            self._error(f"the log converter did not start in {CONVERTER_START_SECONDS:.0f} s; spools wait on disk")
        return child

    def _stop_child(self, timeout: float = 60.0) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        with contextlib.suppress(OSError):
            assert child.stdin is not None
            child.stdin.close()  # end of input: it converts what is left, compacts, and exits
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:  # spools are complete files: nothing is lost by stopping it
            child.kill()
            child.wait()
            self._error(f"the log converter did not finish in {timeout:.0f} s; spools left for the next start")

    # ----------------------------------------------------------------- files

    def file_name(self, suffix: str) -> str:
        """The next file name of this writer: prefix, worker, UTC time, sequence number, suffix."""
        self._seq += 1
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        return f"{self.prefix}-{self.worker}-{stamp}-{self._seq:06d}{suffix}"

    def _write(self, name: str, write: Callable[[BinaryIO], object]) -> Path:
        """Write a file under a temp name, fsync, rename: it appears complete or not at all."""
        self.folder.mkdir(parents=True, exist_ok=True)  # also after someone removed it
        final = self.folder / name
        tmp = self.folder / f".{name}{TEMP_SUFFIX}"
        try:
            self.write_file(tmp, write)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return final

    def write_file(self, path: Path, write: Callable[[BinaryIO], object]) -> None:
        """The one place bytes reach the disk (a test overrides it to fake a full disk)."""
        with open(path, "wb") as fh:
            write(fh)
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


TABLES: dict[str, Callable[[Sequence[bytes]], pa.Table]] = {REQUESTS_PREFIX: request_table, EVENTS_PREFIX: event_table}
SCHEMAS = {REQUESTS_PREFIX: REQUEST_SCHEMA, EVENTS_PREFIX: EVENT_SCHEMA}
# A row's identity: compaction or a double conversion can leave it twice; a shadow row shares its request's id.
ROW_KEYS = {REQUESTS_PREFIX: ("request_id", "arm", "shadow"), EVENTS_PREFIX: ("event_id",)}


def request_log(log_dir: Path, **kwargs: Any) -> ParquetLog:
    """The request log under ``<log dir>/requests/``."""
    return ParquetLog(Path(log_dir) / REQUESTS_DIR, REQUESTS_PREFIX, request_table, **kwargs)


def event_log(log_dir: Path, **kwargs: Any) -> ParquetLog:
    """The events log under ``<log dir>/events/``."""
    return ParquetLog(Path(log_dir) / EVENTS_DIR, EVENTS_PREFIX, event_table, **kwargs)


def convert_spools(folder: Path, prefix: str, *, older_than: float = 0.0) -> int:
    """Convert every writer's spools in ``folder`` (left by a crash, or not reached yet). Returns files made.

    Safe beside a live converter: a spool becomes the same Parquet name whoever converts it.
    """
    cutoff = time.time() - older_than
    made = 0
    by_worker: dict[str, ParquetLog] = {}
    for spool in sorted(Path(folder).glob(f"{prefix}-*{SPOOL_SUFFIX}")):
        with contextlib.suppress(FileNotFoundError):
            if older_than and spool.stat().st_mtime > cutoff:
                continue
            worker = spool.name[len(prefix) + 1:].split("-", 1)[0]
            writer = by_worker.setdefault(worker, ParquetLog(folder, prefix, TABLES[prefix], worker=worker))
            writer.convert(spool)
            made += 1
    return made


def read_spool(spool: Path, prefix: str) -> pa.Table:
    """One spool (``requests`` or ``events`` lines) as a table in its log's schema."""
    return TABLES[prefix](spool.read_bytes().split(b"\n"))


def read_log(folder: Path, prefix: str) -> pa.Table:
    """Every complete file of one log folder as one table: Parquet files and spools not converted yet.

    Rows that are there twice (a compaction or conversion cut short) are kept once. A file that
    disappears while being read (a live writer compacted it) restarts the read.
    """
    for _ in range(10):
        with contextlib.suppress(FileNotFoundError):
            return _read_once(Path(folder), prefix)
    return _read_once(Path(folder), prefix)


def _read_once(folder: Path, prefix: str) -> pa.Table:
    tables = []
    # Spools first, each read at once: one converted and deleted meanwhile is then in the Parquet listing.
    for spool in sorted(folder.glob(f"{prefix}-*{SPOOL_SUFFIX}")):
        with contextlib.suppress(FileNotFoundError):
            tables.append(read_spool(spool, prefix))
    tables += [pq.read_table(p) for p in sorted(folder.glob(f"{prefix}-*{PARQUET_SUFFIX}"))]
    if not tables:
        return SCHEMAS[prefix].empty_table()
    table = pa.concat_tables(tables)
    keys = list(ROW_KEYS[prefix])
    first = table.append_column("_row", pa.array(range(table.num_rows), pa.int64())).group_by(
        keys, use_threads=False).aggregate([("_row", "min")]).column("_row_min")
    return table.take(pc.take(first, pc.sort_indices(first)))


__all__ = ["EVENTS_DIR", "EVENT_SCHEMA", "ITEMS_CAP", "REQUESTS_DIR", "REQUEST_SCHEMA", "ParquetLog", "convert_spools",
           "event_line", "event_log", "event_table", "now_us", "read_log", "read_spool", "record_id", "request_line", "request_log",
           "request_table"]
