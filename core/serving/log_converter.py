"""The outcome log's converter process: spools (JSON lines) to Parquet, paced, beside one serving worker.

``ParquetLog(converter="process")`` starts it as
``python -m core.serving.log_converter <folder> <prefix> <worker> <file seconds>`` and writes one
line to its stdin after each spool. It appends that worker's spools to one open Parquet file
(a temp name) and, every ``file seconds`` and at end of input (the server closed the log, or
died: a SIGKILLed server's pipe closes too), closes it, fsyncs, renames it into place and only
then deletes the spools it holds. A crash of either process therefore loses nothing that was
spooled: the spools are still there (``read_log`` reads them) and the next converter takes them.

Why a paced process: converting is ~10 us of CPU a row. Done as one burst per batch (~60 ms per
5,000 rows) on the serving process, or even at idle priority beside it, it slowed every request
answered during the burst, which is what a p99 sees (benchmarks/README.md). Here the work comes in
steps of a few milliseconds with pauses between them (at most ``DUTY`` of a core while behind),
in another process (never the server's GIL), at a lower priority. It ignores SIGINT and SIGTERM
(a Ctrl-C or a service manager's stop reaches the whole process group): the server closes the
log in order, and the converter exits at the end of its input. SIGKILL still stops it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

NICENESS = 10  # below the server's threads; still ahead of batch jobs at 19
SLICE_ROWS = 256  # lines parsed in one step (~2 ms)
ROW_GROUP_ROWS = 4096  # rows per Parquet row group (compressed in one step, ~8 ms)
DUTY = 0.2  # while serving, pause 4x as long as each step took
_pacing = True  # off once the server has stopped: then nobody waits on a request

log = logging.getLogger("recflow.serving")


class PacedConverter:
    """Spools of one worker into one Parquet file at a time, in short steps with pauses.

    Args:
        folder: the log folder (``<log dir>/requests``).
        prefix: ``requests`` or ``events``.
        worker: the serving worker whose spools these are.
        file_seconds: close the open file this long after it was opened (0: only at the end).
    """

    def __init__(self, folder: Path, prefix: str, worker: str, file_seconds: float) -> None:
        from core.serving.outcome_log import SCHEMAS, TABLES, ParquetLog

        self.naming = ParquetLog(folder, prefix, TABLES[prefix], worker=worker)  # names, temp files, disk writes
        self.folder, self.prefix, self.worker = Path(folder), prefix, worker
        self.to_table, self.schema = TABLES[prefix], SCHEMAS[prefix]
        self.file_seconds = file_seconds
        self._fh: BinaryIO | None = None
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._opened = 0.0
        self._held: list[Path] = []  # spools whose rows are in the open file
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self.rows = 0

    def seconds_to_close(self) -> float | None:
        """Until the open file is due (None: no spool taken yet, or only at the end)."""
        if not self._held or not self.file_seconds:
            return None
        return max(0.0, self.file_seconds - (time.monotonic() - self._opened))

    def pending(self) -> list[Path]:
        """This worker's spools not in the open file yet, oldest first."""
        held = set(self._held)
        return [p for p in sorted(self.folder.glob(f"{self.prefix}-{self.worker}-*.jsonl")) if p not in held]

    def take(self, spool: Path) -> None:
        """Parse one spool into the open file, a slice at a time."""
        try:
            lines = spool.read_bytes().split(b"\n")
        except FileNotFoundError:  # converted by someone else meanwhile
            return
        if not self._held:
            self._opened = time.monotonic()  # the file's period starts with its first spool
        for start in range(0, len(lines), SLICE_ROWS):
            with _paced():
                table = self.to_table(lines[start:start + SLICE_ROWS])
            self._buffer.append(table)
            self._buffered += table.num_rows
            if self._buffered >= ROW_GROUP_ROWS:
                self._write_group()
        self._held.append(spool)

    def close_file(self) -> Path | None:
        """Finish the open file: last row group, footer, fsync, rename; then delete its spools."""
        if self._buffer:
            self._write_group()
        if self._writer is None:  # nothing taken, or only empty spools
            for spool in self._held:
                with contextlib.suppress(FileNotFoundError):
                    spool.unlink()
            self._held = []
            return None
        assert self._fh is not None and self._tmp is not None
        self._writer.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        final = self._tmp.with_name(self._tmp.name[1:-len(".tmp")])
        os.replace(self._tmp, final)
        for spool in self._held:
            with contextlib.suppress(FileNotFoundError):
                spool.unlink()
        self._writer = self._fh = self._tmp = None
        self._held = []
        return final

    def _write_group(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._writer is None:
            name = self.naming.file_name(".parquet")
            self.folder.mkdir(parents=True, exist_ok=True)
            self._tmp = self.folder / f".{name}.tmp"
            self._fh = open(self._tmp, "wb")  # noqa: SIM115 - held across steps, closed in close_file
            self._writer = pq.ParquetWriter(self._fh, self.schema, compression="zstd")
        with _paced():
            self._writer.write_table(pa.concat_tables(self._buffer))
        self.rows += self._buffered
        self._buffer, self._buffered = [], 0


@contextlib.contextmanager
def _paced():  # type: ignore[no-untyped-def]
    """Run one step, then pause so that steps take at most ``DUTY`` of the time."""
    started = time.perf_counter()
    yield
    if _pacing:
        time.sleep((time.perf_counter() - started) * (1 / DUTY - 1))


def run(conv: PacedConverter, stdin_fd: int) -> None:
    """Take spools on each line of input, close files on time, and finish at end of input.

    Args:
        conv: the worker's converter.
        stdin_fd: the pipe the serving process writes to.
    """
    while True:
        for spool in conv.pending():
            conv.take(spool)
        if conv.seconds_to_close() == 0.0:
            conv.close_file()
        ready, _, _ = select.select([stdin_fd], [], [], conv.seconds_to_close())
        if ready and not os.read(stdin_fd, 65536):
            break  # end of input: the server closed the log, or exited
    global _pacing
    _pacing = False
    for spool in conv.pending():
        conv.take(spool)
    conv.close_file()


def main(argv: list[str]) -> int:
    from core.serving.outcome_log import READY, STALE_TEMP_SECONDS, convert_spools

    folder, prefix, worker, file_seconds = argv
    logging.basicConfig(level=logging.WARNING, format="recflow log converter: %(message)s")
    # Spools of a worker that crashed and never came back: nobody else would convert them.
    with contextlib.suppress(OSError):
        convert_spools(Path(folder), prefix, older_than=STALE_TEMP_SECONDS)
    conv = PacedConverter(Path(folder), prefix, worker, float(file_seconds))
    os.write(sys.stdout.fileno(), READY)  # the server waits for this before it serves
    try:
        run(conv, sys.stdin.fileno())
    except Exception:
        log.exception("the %s log converter for %s stopped; its spools stay on disk", prefix, folder)
        return 1
    return 0


if __name__ == "__main__":
    # Lower the priority before the imports: starting up (pyarrow) is this process's biggest burst.
    # A Ctrl-C, or a SIGTERM to the whole process group (a service manager, `kill -- -PGID`), also
    # reaches this process: it lets the server close the log and then finishes at end of input.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    sys.exit(main(sys.argv[1:]))
