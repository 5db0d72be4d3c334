"""extract: source -> canonical Parquet snapshot in the run folder."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from core.config import PipelineConfig
from core.data.privacy import pseudonymize_ids, resolve_key
from core.data.snapshot_store import SnapshotStore, source_key
from core.data.sources import make_source
from core.errors import DataSourceError
from core.records import ITEM, RATING, TIME, USER, Snapshot

SNAPSHOT_FILE = "snapshot.parquet"


def frame_fingerprint(frame: pl.DataFrame) -> str:
    """Order-independent content hash of the canonical columns."""
    hashes = frame.hash_rows(seed=0).sort()
    digest = hashlib.sha256(hashes.to_numpy().tobytes())
    digest.update(",".join(f"{n}:{d}" for n, d in frame.schema.items()).encode())
    return digest.hexdigest()


def extract(
    config: PipelineConfig,
    run_dir: Path,
    *,
    secret_loader: Callable[[str], str] | None = None,
    previous_rows: int | None = None,
) -> Snapshot:
    """Read the source (only what is new, when incremental), pseudonymise, write the snapshot.

    ``previous_rows`` is the size of the last comparable snapshot (e.g. the champion's
    training data) for the drift check; an incremental store supplies its own.
    """
    key = (
        resolve_key(config.privacy, secret_loader=secret_loader, source=config.source.kind)
        if config.pseudonymize
        else None
    )
    store = SnapshotStore(config.incremental.store_dir, source_key(config)) if config.incremental.enabled else None
    since = config.source.since
    if store is not None and not config.incremental.full_refresh:
        mark = store.watermark()
        since = max(filter(None, [since, mark]), default=None)
    source = make_source(config, since=since, secret_loader=secret_loader)
    try:
        frame = source.scan().collect()
    except pl.exceptions.PolarsError as exc:
        raise DataSourceError(f"cannot read {source.name}: {str(exc).strip().splitlines()[0]}") from None
    # Raw learner ids exist only in memory, only until here.
    if key is not None:
        frame = pseudonymize_ids(frame, key, column=USER)
    added: int | None = None
    if store is not None:
        previous_rows = store.rows() if not config.incremental.full_refresh else (store.rows() or previous_rows)
        frame, added = store.merge(frame, full_refresh=config.incremental.full_refresh)
    frame = frame.sort([USER, TIME, ITEM], nulls_last=True)
    path = run_dir / SNAPSHOT_FILE
    tmp = path.with_suffix(".parquet.tmp")
    frame.write_parquet(tmp)
    tmp.replace(path)
    times = frame.get_column(TIME).drop_nulls()
    return Snapshot(
        path=path,
        source=source.name,
        rows=frame.height,
        users=frame.get_column(USER).n_unique(),
        items=frame.get_column(ITEM).n_unique(),
        has_rating=RATING in frame.columns,
        min_time=times.min().isoformat() if len(times) else None,  # type: ignore[union-attr]
        max_time=times.max().isoformat() if len(times) else None,  # type: ignore[union-attr]
        fingerprint=frame_fingerprint(frame),
        pseudonymized=key is not None,
        added_rows=added,
        previous_rows=previous_rows,
        store_key=source_key(config) if store is not None else None,
    )


def commit_snapshot(config: PipelineConfig, snapshot: Snapshot) -> None:
    """After validation passed: make this snapshot the stored one and advance the watermark."""
    if not config.incremental.enabled:
        return
    store = SnapshotStore(config.incremental.store_dir, source_key(config))
    store.commit(snapshot.path, rows=snapshot.rows, added=snapshot.added_rows or 0, source=snapshot.source)


def drift_baseline(snapshot: Snapshot, champion_card: dict[str, Any] | None) -> int | None:
    """Rows to compare against for the drift check: the store's last snapshot, else the
    champion's training data when it came from the same source."""
    if snapshot.previous_rows is not None:
        return snapshot.previous_rows
    data = (champion_card or {}).get("data", {})
    return data.get("rows") if data.get("source") == snapshot.source else None


def preflight(config: PipelineConfig) -> None:
    """Cheap checks a user can fix before anything starts: key present, file readable, columns exist."""
    if config.pseudonymize and config.privacy.secret_block is None:
        resolve_key(config.privacy, source=config.source.kind)
    if config.source.kind not in ("file", "postgres"):
        return  # Supabase is checked when extract pages through it
    if config.source.kind == "postgres" and config.source.dsn_secret_block and not os.environ.get(config.source.dsn_env):
        return  # the DSN is in a Prefect Secret block, read inside the flow
    # Postgres: one catalog query checks login, table and columns; no rows are read.
    source = make_source(config)
    try:
        source.scan().collect_schema()
    except pl.exceptions.PolarsError as exc:
        raise DataSourceError(f"cannot read {source.name}: {str(exc).strip().splitlines()[0]}") from None
