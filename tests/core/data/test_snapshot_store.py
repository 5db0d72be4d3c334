"""Incremental extraction: watermark, append-only new rows, idempotent re-runs, full refresh."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import polars as pl
import pytest
from recflow_testdata import Interaction, make_interactions, tiny_config, write_csv

from core.data.extract import commit_snapshot, drift_baseline, extract
from core.data.snapshot_store import SnapshotStore, source_key
from core.errors import DataSourceError


def _split_by_time(rows: list[Interaction], fraction: float) -> tuple[list[Interaction], list[Interaction]]:
    ordered = sorted(rows, key=lambda r: r.instant)
    cut = int(len(ordered) * fraction)
    return ordered[:cut], ordered[cut:]


def _config(tmp_path: Path, data: Path, **extra: object):  # type: ignore[no-untyped-def]
    return tiny_config(tmp_path, data, {"incremental.enabled": True, "incremental.store_dir": str(tmp_path / "store"),
                                        **extra})


def _run(config, tmp_path: Path, name: str):  # type: ignore[no-untyped-def]
    run_dir = tmp_path / name
    run_dir.mkdir()
    snap = extract(config, run_dir)
    commit_snapshot(config, snap)
    return snap


def test_second_run_pulls_only_new_rows_and_rerun_adds_nothing(tmp_path: Path) -> None:
    rows = make_interactions(seed=3)
    old, new = _split_by_time(rows, 0.7)
    data = write_csv(old, tmp_path / "attempts.csv")
    config = _config(tmp_path, data)

    first = _run(config, tmp_path, "r1")
    assert first.rows == len(old) and first.added_rows == len(old) and first.previous_rows is None

    write_csv(old + new, data)  # the nightly table grew
    second = _run(config, tmp_path, "r2")
    assert second.added_rows == len(new)
    assert second.previous_rows == len(old)
    assert second.rows == len(rows)

    third = _run(config, tmp_path, "r3")  # same window again
    assert third.added_rows == 0
    assert third.rows == len(rows)
    assert third.fingerprint == second.fingerprint

    store = SnapshotStore(tmp_path / "store", source_key(config))
    assert store.watermark() == max(r.instant for r in rows)
    assert [h["added"] for h in store.state()["history"]] == [len(old), len(new), 0]


def test_rows_at_the_watermark_instant_are_not_lost_or_doubled(tmp_path: Path) -> None:
    rows = make_interactions(seed=4)
    old, new = _split_by_time(rows, 0.5)
    last = max(old, key=lambda r: r.instant)
    # A late-arriving row with exactly the watermark's timestamp, for another user.
    late = Interaction("late-user", "i1", last.instant, last.instant.isoformat())
    data = write_csv(old, tmp_path / "a.csv")
    config = _config(tmp_path, data)
    _run(config, tmp_path, "r1")
    write_csv(old + [late] + new, data)
    snap = _run(config, tmp_path, "r2")
    assert snap.added_rows == len(new) + 1
    frame = pl.read_parquet(snap.path)
    assert frame.filter(pl.col("user_id") == "late-user").height == 1
    assert frame.height == len(old) + len(new) + 1


def test_failed_validation_never_advances_the_watermark(tmp_path: Path) -> None:
    rows = make_interactions(seed=5)
    old, new = _split_by_time(rows, 0.6)
    data = write_csv(old, tmp_path / "a.csv")
    config = _config(tmp_path, data)
    _run(config, tmp_path, "r1")
    store = SnapshotStore(tmp_path / "store", source_key(config))
    mark = store.watermark()
    write_csv(old + new, data)
    run_dir = tmp_path / "r2"
    run_dir.mkdir()
    extract(config, run_dir)  # extracted, but (as when validation fails) not committed
    assert store.watermark() == mark
    assert store.rows() == len(old)


def test_full_refresh_rereads_everything(tmp_path: Path) -> None:
    rows = make_interactions(seed=6)
    old, _ = _split_by_time(rows, 0.8)
    data = write_csv(rows, tmp_path / "a.csv")
    config = _config(tmp_path, data)
    _run(config, tmp_path, "r1")
    write_csv(old, data)  # history was rewritten upstream: 20% of rows are gone
    refreshed = _run(_config(tmp_path, data, **{"incremental.full_refresh": True}), tmp_path, "r2")
    assert refreshed.rows == len(old)
    assert refreshed.added_rows == len(old)
    assert refreshed.previous_rows == len(rows)  # so the drift check can compare


def test_changed_columns_need_a_full_refresh(tmp_path: Path) -> None:
    rows = make_interactions(seed=7)
    data = write_csv(rows, tmp_path / "a.csv")
    config = _config(tmp_path, data)
    _run(config, tmp_path, "r1")
    store = SnapshotStore(tmp_path / "store", source_key(config))
    stored = pl.read_parquet(store.data_path)
    with pytest.raises(DataSourceError, match="full refresh"):
        store.merge(stored.with_columns(pl.lit(1).alias("extra")), full_refresh=False)


def test_source_key_is_stable_and_distinguishes_sources(tmp_path: Path) -> None:
    a = tiny_config(tmp_path, tmp_path / "a.csv")
    b = tiny_config(tmp_path, tmp_path / "b.csv")
    assert source_key(a) == source_key(tiny_config(tmp_path, tmp_path / "a.csv"))
    assert source_key(a) != source_key(b)
    assert source_key(a).startswith("a-")
    synth = {"source.kind": "synthetic"}
    base = source_key(tiny_config(tmp_path, None, synth))
    assert base == source_key(tiny_config(tmp_path, None, synth))
    for key, value in (("source.synthetic_users", 999), ("source.synthetic_questions", 8000),
                       ("source.synthetic_attempts_per_user", 39.0), ("source.synthetic_seed", 7)):
        assert source_key(tiny_config(tmp_path, None, synth | {key: value})) != base, key


def test_drift_baseline_prefers_the_store_then_a_same_source_champion(tmp_path: Path) -> None:
    rows = make_interactions(seed=8)
    data = write_csv(rows, tmp_path / "a.csv")
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    snap = extract(tiny_config(tmp_path, data), run_dir)
    assert drift_baseline(snap, None) is None
    card = {"data": {"source": snap.source, "rows": 1234}}
    assert drift_baseline(snap, card) == 1234
    assert drift_baseline(snap, {"data": {"source": "other", "rows": 9}}) is None
    assert drift_baseline(snap.model_copy(update={"previous_rows": 7}), card) == 7


def test_since_until_window_on_a_file_source(tmp_path: Path) -> None:
    rows = make_interactions(seed=9)
    data = write_csv(rows, tmp_path / "a.csv")
    times = sorted(r.instant for r in rows)
    lo, hi = times[len(times) // 4], times[3 * len(times) // 4]
    config = tiny_config(tmp_path, data, {"source.since": lo.isoformat(), "source.until": hi.isoformat()})
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    snap = extract(config, run_dir)
    expected = sum(1 for r in rows if lo <= r.instant < hi)
    assert snap.rows == expected
    frame = pl.read_parquet(snap.path)
    assert frame["timestamp"].min() >= lo and frame["timestamp"].max() < hi + timedelta(0)
