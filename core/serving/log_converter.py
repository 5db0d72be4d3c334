"""The outcome log's converter process: spools (JSON lines) to Parquet, beside one serving worker.

``ParquetLog(converter="process")`` starts it as
``python -m core.serving.log_converter <folder> <prefix> <worker> <rotate seconds>`` and writes
one line to its stdin after each spool. It converts that worker's spools, compacts its Parquet
files every ``rotate seconds``, and at end of input (the server closed the log, or died: a
SIGKILLed server's pipe closes too) converts what is left, compacts, and exits.

Why a process: parsing and compressing a 5,000-row batch takes ~60 ms of CPU; on the serving
process it raised the two-arm p99 (benchmarks/README.md). Here it runs at a lower CPU priority
and never holds the server's GIL. It ignores SIGINT, so a Ctrl-C in the server's terminal lets
the server close the log in order instead of killing the converter mid-file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys

from core.serving.outcome_log import STALE_TEMP_SECONDS, TABLES, ParquetLog, convert_spools

NICENESS = 10  # below the server's threads; still ahead of batch jobs at 19


def run(writer: ParquetLog, stdin_fd: int) -> None:
    """Convert on each line of input, compact on time, and finish at end of input.

    Args:
        writer: the worker's log (its folder, prefix, worker name and rotation period).
        stdin_fd: the pipe the serving process writes to.
    """
    writer.convert_pending()
    while True:
        ready, _, _ = select.select([stdin_fd], [], [], writer.seconds_to_rotation())
        if ready and not os.read(stdin_fd, 65536):
            break  # end of input: the server closed the log, or exited
        writer.convert_pending()
        if writer.seconds_to_rotation() == 0.0:
            writer.rotate()
    writer.convert_pending()
    writer.rotate()


def main(argv: list[str]) -> int:
    folder, prefix, worker, rotate_seconds = argv
    logging.basicConfig(level=logging.WARNING, format="recflow log converter: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    writer = ParquetLog(folder, prefix, TABLES[prefix], worker=worker, rotate_seconds=float(rotate_seconds))
    # Spools of a worker that crashed and never came back: nobody else would convert them.
    with contextlib.suppress(OSError):
        convert_spools(writer.folder, prefix, older_than=STALE_TEMP_SECONDS)
    run(writer, sys.stdin.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
