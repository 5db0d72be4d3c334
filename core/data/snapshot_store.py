"""A local Parquet snapshot store with a per-source watermark, for nightly incremental runs.

    <store_dir>/<source-key>/data.parquet   every row seen so far (pseudonymised, canonical columns)
    <store_dir>/<source-key>/state.json     watermark (max timestamp), row count, history

A run reads rows with timestamp >= watermark, drops the ones already stored (same user,
item and timestamp), and trains on stored + new. The store is updated only by
``commit`` — called after validation passed — so a run that fails never advances the
watermark, and re-running the same window adds nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from core.config import PipelineConfig
from core.errors import DataSourceError
from core.records import ITEM, TIME, USER

DATA_FILE = "data.parquet"
STATE_FILE = "state.json"
_KEY = [USER, ITEM, TIME]


def source_key(config: PipelineConfig) -> str:
    """Readable, stable folder name per source identity (never derived from secrets)."""
    s = config.source
    parts: tuple[object, ...] = (s.kind, s.table, s.url, s.dsn_env, s.path, s.synthetic_seed)
    if s.kind == "synthetic":  # another size is other data
        parts += (s.synthetic_users, s.synthetic_questions, s.synthetic_attempts_per_user)
    identity = "|".join(str(x) for x in parts)
    slug = re.sub(r"[^a-z0-9]+", "-", config.data_name.lower()).strip("-") or "source"
    return f"{slug}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"


class SnapshotStore:
    def __init__(self, store_dir: Path, key: str) -> None:
        self.dir = Path(store_dir) / key
        self.data_path = self.dir / DATA_FILE
        self.state_path = self.dir / STATE_FILE

    def state(self) -> dict[str, Any]:
        if not self.state_path.exists():
            return {}
        try:
            return json.loads(self.state_path.read_text())
        except json.JSONDecodeError as exc:
            raise DataSourceError(f"snapshot store state {self.state_path} is corrupt: {exc}") from None

    def watermark(self) -> datetime | None:
        mark = self.state().get("watermark")
        return datetime.fromisoformat(mark) if mark else None

    def rows(self) -> int | None:
        return self.state().get("rows")

    def merge(self, new_rows: pl.DataFrame, *, full_refresh: bool) -> tuple[pl.DataFrame, int]:
        """Stored rows + the new ones not stored yet; returns (merged, rows added)."""
        if full_refresh or not self.data_path.exists():
            return new_rows, new_rows.height
        stored = pl.read_parquet(self.data_path)
        if set(stored.columns) != set(new_rows.columns):
            raise DataSourceError(
                f"the source's columns changed since the stored snapshot ({sorted(stored.columns)} -> "
                f"{sorted(new_rows.columns)}); rerun with a full refresh"
            )
        mark = self.watermark()
        overlap = stored.filter(pl.col(TIME) >= mark) if mark is not None else stored
        fresh = new_rows.join(overlap.select(_KEY).unique(), on=_KEY, how="anti", nulls_equal=True)
        return pl.concat([stored, fresh.select(stored.columns)]), fresh.height

    def commit(self, snapshot_path: Path, *, rows: int, added: int, source: str) -> None:
        """Make ``snapshot_path`` the stored data and advance the watermark (atomically each)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        frame = pl.read_parquet(snapshot_path, columns=[TIME])
        mark = frame.get_column(TIME).max()
        tmp = self.data_path.with_suffix(".tmp")
        tmp.write_bytes(snapshot_path.read_bytes())
        os.replace(tmp, self.data_path)
        state = self.state()
        history = state.get("history", [])[-99:]
        now = datetime.now(UTC).isoformat()
        history.append({"at": now, "rows": rows, "added": added})
        new_state = {
            "source": source,
            "watermark": mark.isoformat() if mark is not None else None,  # type: ignore[union-attr]
            "rows": rows,
            "updated_at": now,
            "history": history,
        }
        tmp_state = self.state_path.with_suffix(".tmp")
        tmp_state.write_text(json.dumps(new_state, indent=2))
        os.replace(tmp_state, self.state_path)
