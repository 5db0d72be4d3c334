"""extract: source -> canonical, sorted Parquet snapshot with an order-independent fingerprint."""

from __future__ import annotations

import random
from datetime import timedelta
from pathlib import Path

import polars as pl
import pytest
from recflow_testdata import Interaction, tiny_config, write_csv, write_parquet

from core.config import load_config
from core.data.extract import SNAPSHOT_FILE, extract, frame_fingerprint
from core.errors import DataSourceError
from core.records import ITEM, TIME, USER, Snapshot


def _extract(tmp_path: Path, data: Path | None, name: str = "run") -> Snapshot:
    run_dir = tmp_path / name
    run_dir.mkdir()
    return extract(tiny_config(tmp_path, data), run_dir)


def test_snapshot_of_tiny_csv(tmp_path: Path, tiny_rows: list[Interaction]) -> None:
    snap = _extract(tmp_path, write_csv(tiny_rows, tmp_path / "d.csv"))
    assert snap.path == tmp_path / "run" / SNAPSHOT_FILE
    assert snap.source == "file:d.csv"
    assert snap.rows == len(tiny_rows)
    assert snap.users == 80
    assert snap.items == len({r.item for r in tiny_rows})
    assert snap.has_rating is False
    assert snap.min_time == min(r.instant for r in tiny_rows).isoformat()
    assert snap.max_time == max(r.instant for r in tiny_rows).isoformat()
    frame = pl.read_parquet(snap.path)
    assert frame.columns == [USER, ITEM, TIME]
    assert frame.equals(frame.sort(USER, TIME, ITEM))  # sorted for the split
    assert not list((tmp_path / "run").glob("*.tmp"))  # the atomic write left nothing behind
    assert snap.fingerprint == frame_fingerprint(frame)


def test_fingerprint_ignores_row_order(tmp_path: Path, tiny_rows: list[Interaction]) -> None:
    shuffled = list(tiny_rows)
    random.Random(42).shuffle(shuffled)
    assert shuffled != tiny_rows
    a = _extract(tmp_path, write_csv(tiny_rows, tmp_path / "a" / "d.csv"), "a-run")
    b = _extract(tmp_path, write_csv(shuffled, tmp_path / "b" / "d.csv"), "b-run")
    assert a.fingerprint == b.fingerprint
    # Same instants written as Parquet datetimes in another zone: the same canonical content.
    c = _extract(tmp_path, write_parquet(shuffled, tmp_path / "c" / "d.parquet"), "c-run")
    assert c.fingerprint == a.fingerprint


def test_fingerprint_changes_with_content(tmp_path: Path, tiny_rows: list[Interaction]) -> None:
    base = _extract(tmp_path, write_csv(tiny_rows, tmp_path / "a.csv"), "a")
    changed_item = [Interaction(r.user, "i999", r.instant, r.iso) if i == 0 else r for i, r in enumerate(tiny_rows)]
    moved = [
        Interaction(r.user, r.item, r.instant + timedelta(seconds=1), (r.instant + timedelta(seconds=1)).isoformat())
        if i == 0 else r
        for i, r in enumerate(tiny_rows)
    ]
    fps = {
        base.fingerprint,
        _extract(tmp_path, write_csv(changed_item, tmp_path / "b.csv"), "b").fingerprint,
        _extract(tmp_path, write_csv(moved, tmp_path / "c.csv"), "c").fingerprint,
        _extract(tmp_path, write_csv(tiny_rows[1:], tmp_path / "d.csv"), "d").fingerprint,
        _extract(tmp_path, write_csv(tiny_rows + tiny_rows[:1], tmp_path / "e.csv"), "e").fingerprint,
    }
    assert len(fps) == 5


def test_ml100k_source(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    snap = extract(load_config(), run_dir)
    assert (snap.rows, snap.users, snap.items) == (100_000, 943, 1682)
    assert snap.source == "ml-100k"
    assert snap.has_rating is True
    assert snap.min_time is not None and snap.min_time.startswith("1997-09-20")
    assert snap.max_time is not None and snap.max_time.startswith("1998-04-22")
    frame = pl.read_parquet(snap.path)
    assert frame.columns == [USER, ITEM, TIME, "rating"]
    assert frame.get_column("rating").min() == 1.0 and frame.get_column("rating").max() == 5.0


def test_extract_surfaces_source_errors(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="data file not found"):
        _extract(tmp_path, tmp_path / "missing.csv")
    assert not (tmp_path / "run" / SNAPSHOT_FILE).exists()


def test_preflight_checks_file_and_columns_without_reading_rows(tmp_path: Path, tiny_rows: list[Interaction]) -> None:
    from core.data.extract import preflight

    good = write_csv(tiny_rows[:20], tmp_path / "d.csv")
    preflight(tiny_config(tmp_path, good))  # no exception
    preflight(load_config())  # ml-100k
    with pytest.raises(DataSourceError, match="data file not found"):
        preflight(tiny_config(tmp_path, tmp_path / "missing.csv"))
    with pytest.raises(DataSourceError, match="--time-col 'when'"):
        preflight(tiny_config(tmp_path, good, {"columns.time": "when"}))
    assert not list(tmp_path.glob("**/*.parquet"))  # nothing extracted
