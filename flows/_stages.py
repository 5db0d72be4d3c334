"""Name the step that failed, so the flow's error (and the CLI's summary) says where."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from core.errors import PipelineFailed, RecflowError


@contextlib.contextmanager
def stage(name: str, run_dir: Path | None = None) -> Iterator[None]:
    try:
        yield
    except PipelineFailed:
        raise
    except RecflowError as exc:
        raise PipelineFailed(name, str(exc), str(run_dir) if run_dir else None) from exc
    except Exception as exc:  # a bug in recflow or a library: keep the cause chained for the log
        raise PipelineFailed(name, f"internal error: {type(exc).__name__}: {exc}", str(run_dir) if run_dir else None) from exc
