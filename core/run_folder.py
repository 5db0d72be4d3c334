"""Run folders: one per pipeline run, holding every file the steps write."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from pathlib import Path


def new_run_dir(runs_dir: Path, key: str | None = None) -> Path:
    """``runs_dir/<key>`` when a stable key is given (a retried flow run gets its folder back,
    so training resumes from its checkpoint); else a fresh ``<UTC time>-<random>`` folder."""
    if key:
        run_dir = runs_dir / key
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir.resolve()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = runs_dir / f"{stamp}-{secrets.token_hex(3)}"
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir.resolve()
