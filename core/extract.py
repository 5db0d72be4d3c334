"""extract: source -> canonical Parquet snapshot in the run folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl

from core.config import PipelineConfig
from core.errors import DataSourceError
from core.records import ITEM, RATING, TIME, USER, Snapshot
from core.sources import make_source

SNAPSHOT_FILE = "snapshot.parquet"


def frame_fingerprint(frame: pl.DataFrame) -> str:
    """Order-independent content hash of the canonical columns."""
    hashes = frame.hash_rows(seed=0).sort()
    digest = hashlib.sha256(hashes.to_numpy().tobytes())
    digest.update(",".join(f"{n}:{d}" for n, d in frame.schema.items()).encode())
    return digest.hexdigest()


def extract(config: PipelineConfig, run_dir: Path) -> Snapshot:
    source = make_source(config)
    try:
        frame = source.scan().collect()
    except pl.exceptions.PolarsError as exc:
        raise DataSourceError(f"cannot read {source.name}: {str(exc).strip().splitlines()[0]}") from None
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
    )


def preflight(config: PipelineConfig) -> None:
    """Cheap checks a user can fix before anything starts: the file opens and the columns exist."""
    source = make_source(config)
    try:
        source.scan().collect_schema()
    except pl.exceptions.PolarsError as exc:
        raise DataSourceError(f"cannot read {source.name}: {str(exc).strip().splitlines()[0]}") from None
