"""Run folders: one per pipeline run, holding every file the steps write."""

from __future__ import annotations

import secrets
from datetime import datetime, timezone
from pathlib import Path


def new_run_dir(runs_dir: Path) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = runs_dir / f"{stamp}-{secrets.token_hex(3)}"
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir.resolve()
