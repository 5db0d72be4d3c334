"""The outcome log: the contract's schema, complete files only, bounded queue, full disk, compaction, a crash."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pyarrow.parquet as pq
import pytest

from core.serving.outcome_log import (
    EVENT_SCHEMA,
    REQUEST_SCHEMA,
    ParquetLog,
    convert_spools,
    event_line,
    event_log,
    now_us,
    read_log,
    request_line,
    request_log,
    request_table,
)

REPO = Path(__file__).resolve().parents[3]


def _row(i: int, *, items: list[object] | None = None, request_id: str | None = None) -> bytes:
    recs = [{"item": f"i{i}", "score": 0.5}, {"item": f"i{i + 1}", "score": 0.25}]
    return request_line(request_id or uuid.uuid4().hex, now_us(), "exp-1", "a", False, "entry", "v1", f"s{i}",
                        ["i1", 2] if items is None else items, 2, 0, recs)


def _wait(cond: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.01)


def _converters(folder: Path) -> list[int]:
    """Pids of running log converters for ``folder`` (from /proc: they outlive the writer that started them)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"core.serving.log_converter" in args and str(folder).encode() in args:
            pids.append(int(cmdline.parent.name))
    return pids


def test_flushed_rows_match_the_contract_schema(tmp_path: Path) -> None:
    log = request_log(tmp_path, flush_seconds=0.05)
    log.start()
    log.submit(_row(1))
    log.submit(request_line(uuid.uuid4().hex, now_us(), None, "unassigned", False, "entry", "v1", None, None, 500, 3,
                            []))
    _wait(lambda: log.written_rows == 2)
    log.close()
    files = list((tmp_path / "requests").glob("requests-*.parquet"))
    assert len(files) == 1 and files[0].name.startswith(f"requests-w{os.getpid()}-")
    table = pq.read_table(files[0])
    assert table.schema.equals(REQUEST_SCHEMA)
    first, second = table.to_pylist()
    assert first["items"] == ["i1", "2"] and first["rec_items"] == ["i1", "i2"] and first["rec_scores"] == [0.5, 0.25]
    assert first["ts"].tzinfo is not None and first["experiment"] == "exp-1"
    assert (second["session"], second["items"], second["n_items"], second["n_unknown"]) == (None, None, 500, 3)
    events = event_log(tmp_path)
    events.submit(event_line("e1", now_us(), "s1", "q7", "correct", 1.0))
    assert events.flush() == 1
    assert read_log(tmp_path / "events", "events").schema.equals(EVENT_SCHEMA)


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path: Path) -> None:
    log = request_log(tmp_path, max_queue=10)
    accepted = [log.submit(_row(i)) for i in range(15)]
    assert accepted == [True] * 10 + [False] * 5
    assert log.stats()["dropped"] == 5 and log.stats()["queued"] == 10
    assert log.flush() == 10 and log.stats()["queued"] == 0


class _DiskFullOnce(ParquetLog):
    """Fault: the disk fills up halfway through the next write (ENOSPC), then frees up."""

    fail_next = True

    def write_file(self, path: Path, write: Callable[[BinaryIO], object]) -> None:
        if self.fail_next:
            self.fail_next = False
            path.write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device")
        super().write_file(path, write)


def test_a_full_disk_loses_that_batch_only_and_leaves_no_partial_file(tmp_path: Path) -> None:
    log = _DiskFullOnce(tmp_path, "requests", request_log(tmp_path).to_table)
    for i in range(3):
        log.submit(_row(i))
    assert log.flush() == 0
    stats = log.stats()
    assert stats["dropped"] == 3 and "No space left" in stats["last_error"] and stats["written_rows"] == 0
    assert list(tmp_path.iterdir()) == []  # the temp file was removed; nothing half-written is visible
    log.submit(_row(9))
    assert log.flush() == 1 and read_log(tmp_path, "requests").num_rows == 1


class _StuckDisk(ParquetLog):
    """Fault: a write that hangs (a stalled disk) until released."""

    release = threading.Event()
    entered = threading.Event()

    def write_file(self, path: Path, write: Callable[[BinaryIO], object]) -> None:
        self.entered.set()
        self.release.wait()
        super().write_file(path, write)


def test_submitting_never_waits_for_a_stalled_writer(tmp_path: Path) -> None:
    log = _StuckDisk(tmp_path, "requests", request_log(tmp_path).to_table, max_queue=1000, flush_seconds=0.01)
    log.start()
    log.submit(_row(0))
    assert log.entered.wait(10)
    # The writer thread is stuck inside a write: 1,500 more submits return at once (1,000 queued, 500 dropped).
    results = [log.submit(_row(i)) for i in range(1500)]
    assert results.count(True) == 1000 and log.stats()["dropped"] == 500
    log.release.set()
    log.close()
    assert read_log(tmp_path, "requests").num_rows == 1001


def test_rotation_compacts_this_writers_files_into_one(tmp_path: Path) -> None:
    log = request_log(tmp_path, rotate_seconds=0)
    ids = []
    for batch in range(4):
        for i in range(5):
            ids.append(uuid.uuid4().hex)
            log.submit(_row(batch * 5 + i, request_id=ids[-1]))
        log.flush()
    folder = tmp_path / "requests"
    assert len(list(folder.glob("requests-*.parquet"))) == 4
    compacted = log.rotate()
    files = list(folder.glob("requests-*.parquet"))
    assert files == [compacted] and log.stats()["written_files"] == 1
    assert pq.read_table(compacted).column("request_id").to_pylist() == ids
    assert log.rotate() is None  # nothing new since


CRASH_CHILD = """
import sys, uuid
from core.serving.outcome_log import request_line, request_log, now_us
log = request_log(sys.argv[1], worker="crash", converter=sys.argv[2])
batch = 0
while True:
    for i in range(20_000):
        log.submit(request_line(uuid.uuid4().hex, now_us(), "exp", "a", False, "e", "v", f"s{i}", ["i1"] * 20, 20, 0,
                                [{"item": "i2", "score": 1.0}] * 10))
    log.flush()
    batch += 1
    print(batch, flush=True)
"""


@pytest.mark.parametrize(("kill_after_batches", "converter", "sig"), [
    (2, "thread", signal.SIGKILL), (3, "thread", signal.SIGKILL), (2, "process", signal.SIGKILL),
    (2, "process", signal.SIGTERM),  # to the whole process group, as a service manager stops it
])
def test_a_crash_mid_write_loses_at_most_the_last_batch(tmp_path: Path, kill_after_batches: int,
                                                        converter: str, sig: signal.Signals) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", CRASH_CHILD, str(tmp_path), converter], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert child.stdout is not None
    done = 0
    while done < kill_after_batches:
        done = int(child.stdout.readline())
    # Killed while it fills and writes the next batch (each write takes tens of ms).
    time.sleep(0.05 * kill_after_batches)
    if sig == signal.SIGKILL:
        child.send_signal(sig)  # the writer alone: its converter (if any) sees its input end
    else:
        os.killpg(child.pid, sig)  # the writer dies of it; the converter ignores it and finishes
    child.wait(timeout=30)
    folder = tmp_path / "requests"
    if converter == "process":
        # The killed writer's pipe closed: its converter turns the spools left into Parquet and exits.
        _wait(lambda: not _converters(folder), timeout=60)
        assert not list(folder.glob("requests-*.jsonl"))
    for p in folder.glob("requests-*.parquet"):  # every visible file is complete and readable
        assert pq.read_table(p).num_rows % 20_000 == 0  # whole batches: one, or a file of several
    for p in folder.glob("requests-*.jsonl"):  # a spool the thread had not converted yet: complete too
        assert request_table(p.read_bytes().split(b"\n")).num_rows == 20_000
    table = read_log(folder, "requests")
    assert done * 20_000 <= table.num_rows <= (done + 1) * 20_000  # all flushed before the crash survived
    assert len(set(table.column("request_id").to_pylist())) == table.num_rows


def test_the_converter_process_writes_parquet_off_the_writer_and_finishes_at_close(tmp_path: Path) -> None:
    log = request_log(tmp_path, converter="process", flush_seconds=0.05, rotate_seconds=0.5)
    log.start()
    folder = tmp_path / "requests"
    for i in range(3):
        log.submit(_row(i))
    _wait(lambda: read_log(folder, "requests").num_rows == 3)  # readable at once, from the spools
    # The converter closes its file after 0.5 s, then deletes the spools it holds.
    _wait(lambda: len(list(folder.glob("requests-*.parquet"))) == 1 and not list(folder.glob("*.jsonl")))
    assert log.stats()["converter"]["running"] and log.written_files == 0  # the Parquet came from the child
    for i in range(3, 5):
        log.submit(_row(i))
    log.close()  # the last batch is spooled and converted, and the converter exits
    assert not list(folder.glob("*.jsonl")) and not list(folder.glob(".*"))
    assert not log.stats()["converter"]["running"] and len(list(folder.glob("requests-*.parquet"))) == 2
    assert read_log(folder, "requests").column("session").to_pylist() == [f"s{i}" for i in range(5)]


def test_read_log_reads_spools_and_keeps_a_row_seen_twice_once(tmp_path: Path) -> None:
    log = request_log(tmp_path, converter="process")  # never started: spools stay as written
    rows = [_row(i) for i in range(4)]
    log._write("requests-w1-20260101T000000000000Z-000001.jsonl", lambda fh: fh.write(b"\n".join(rows[:2])))
    log._write("requests-w1-20260101T000000000000Z-000002.jsonl", lambda fh: fh.write(b"\n".join(rows)))
    folder = tmp_path / "requests"
    table = read_log(folder, "requests")
    assert table.schema.equals(REQUEST_SCHEMA) and table.column("session").to_pylist() == ["s0", "s1", "s2", "s3"]
    assert convert_spools(folder, "requests") == 2 and not list(folder.glob("*.jsonl"))
    assert read_log(folder, "requests").column("session").to_pylist() == ["s0", "s1", "s2", "s3"]


def test_a_converter_that_dies_is_started_again_and_loses_nothing(tmp_path: Path) -> None:
    log = request_log(tmp_path, converter="process", flush_seconds=0.05)
    log.restart_seconds = 0.0
    log.start()
    folder = tmp_path / "requests"
    first = log.stats()["converter"]["pid"]
    for i in range(3):
        log.submit(_row(i))
    _wait(lambda: read_log(folder, "requests").num_rows == 3)
    os.kill(first, signal.SIGKILL)  # mid-file: its temp Parquet is lost, its spools are not
    _wait(lambda: not log.stats()["converter"]["running"])
    for i in range(3, 5):
        log.submit(_row(i))  # the next flush starts a new converter, which takes every spool
    _wait(lambda: log.stats()["converter"]["running"] and log.stats()["converter"]["pid"] != first)
    log.close()
    assert not list(folder.glob("*.jsonl"))
    table = read_log(folder, "requests")
    assert table.column("session").to_pylist() == [f"s{i}" for i in range(5)]
    assert sum(pq.read_table(p).num_rows for p in folder.glob("requests-*.parquet")) == 5
