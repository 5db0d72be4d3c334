"""The Postgres source against a real PostgreSQL 15 server (tests/pg_cluster.py).

The code under test logs in as a password-authenticated read-only role; the server runs in
Asia/Kolkata so that UTC conversion is checked, not assumed.
"""

from __future__ import annotations

import socket
import traceback
from datetime import UTC, timedelta, timezone
from pathlib import Path
from urllib.parse import quote

import polars as pl
import pytest
from pg_cluster import QA_COLUMNS, Attempt, PgCluster, expected_frame, fill_question_attempts
from polars.testing import assert_frame_equal

from core.config import PipelineConfig, load_config
from core.data.sources import make_source
from core.data.sources.postgres import PostgresSource
from core.errors import DataSourceError
from core.records import ITEM, RATING, TIME, USER

pytest_plugins = ["pg_fixtures"]

UTC = UTC


def _config(**overrides: object) -> PipelineConfig:
    return load_config(overrides={"source.kind": "postgres", **QA_COLUMNS, **overrides})


def _source(**overrides: object) -> PostgresSource:
    source = make_source(_config(**overrides))
    assert isinstance(source, PostgresSource)
    return source


def _read(**overrides: object) -> pl.DataFrame:
    return _source(**overrides).scan().collect()


def _error(**overrides: object) -> DataSourceError:
    with pytest.raises(DataSourceError) as info:
        _read(**overrides)
    return info.value


def _rendered(exc: BaseException) -> str:
    """Everything a user could see: the message and the whole printed traceback."""
    return "".join(traceback.format_exception(exc))


def test_reads_rows_with_clean_types(attempts: list[Attempt], pg_dsn: str) -> None:
    frame = _read()
    # uuid -> str, timestamptz -> UTC microseconds, boolean stays boolean, real/smallint keep
    # their width; rows come in time order.
    assert_frame_equal(frame, expected_frame(attempts))


def test_scan_checks_now_and_reads_on_collect(attempts: list[Attempt], pg_cluster: PgCluster, pg_dsn: str) -> None:
    expected = expected_frame(attempts)
    lazy = _source().scan()
    assert lazy.collect_schema() == expected.schema  # no rows read: a cheap preflight
    assert pg_cluster.password not in lazy.explain()
    assert_frame_equal(lazy.head(3).collect(), expected.head(3))
    hard = lazy.filter(pl.col("difficulty_level") == 5).select(USER, "topic").collect()
    assert_frame_equal(hard, expected.filter(pl.col("difficulty_level") == 5).select(USER, "topic"))
    assert lazy.select(pl.len()).collect().item() == len(attempts)
    # Errors a user can fix surface at scan(), before anything is collected.
    with pytest.raises(DataSourceError, match="not found"):
        _source(**{"source.table": "no_such_table"}).scan()


def test_name_names_table_host_and_db_but_no_secret(pg_cluster: PgCluster, pg_dsn: str) -> None:
    source = _source()
    assert source.name == f"postgres:question_attempts@127.0.0.1:{pg_cluster.port}/postgres"
    assert pg_cluster.password not in source.name and "recflow_reader" not in source.name


def test_window_is_half_open_and_naive_bounds_mean_utc(attempts: list[Attempt], pg_dsn: str) -> None:
    since, until = attempts[100].created_at, attempts[200].created_at
    cfg = _config(**{"source.until": until.isoformat()})
    # make_source's since (the incremental watermark) wins over source.since; naive = UTC.
    frame = make_source(cfg, since=since.astimezone(UTC).replace(tzinfo=None)).scan().collect()
    assert_frame_equal(frame, expected_frame(attempts[100:200]))
    # The same window given with another offset selects the same rows.
    ist = timezone(timedelta(hours=5, minutes=30))
    frame = _read(**{"source.since": since.astimezone(ist).isoformat(), "source.until": until.isoformat()})
    assert frame.height == 100


def test_empty_window_keeps_the_schema(attempts: list[Attempt], pg_dsn: str) -> None:
    after = attempts[-1].created_at + timedelta(seconds=1)
    frame = _read(**{"source.since": after.isoformat()})
    assert frame.height == 0
    assert frame.schema == expected_frame(attempts).schema


def test_text_question_ids_stay_as_written(pg_cluster: PgCluster, pg_dsn: str) -> None:
    rows = fill_question_attempts(pg_cluster, 40, table="qa_text_ids", seed=3, uuid_questions=False)
    frame = _read(**{"source.table": "qa_text_ids"})
    assert frame.get_column(ITEM).to_list() == [r.question_id for r in rows]
    assert frame.get_column(ITEM).str.starts_with("Q-").all()


def test_quoted_identifiers_mapping_and_naive_time_column(pg_cluster: PgCluster, pg_dsn: str) -> None:
    """Mixed-case/space names, an integer user id, numeric rating, jsonb extra, and a
    ``timestamp without time zone`` column, which holds UTC whatever the server's zone is."""
    pg_cluster.execute('DROP TABLE IF EXISTS "Learner Events"')
    pg_cluster.execute(
        'CREATE TABLE "Learner Events" ("Learner" bigint, "Question ID" text, "answered at" timestamp, '
        '"Score" numeric(5,2), "meta ""json""" jsonb)'
    )
    pg_cluster.execute(
        """INSERT INTO "Learner Events" VALUES
           (7, 'q1', '2024-01-01 10:00:00', 1.5, '{"a": 1}'),
           (8, 'q2', '2024-01-01 11:00:00', 2.25, NULL),
           (7, 'q3', '2024-01-01 12:00:00', NULL, '[1, 2]')"""
    )
    frame = _read(
        **{
            "source.table": "Learner Events",
            "columns.user": "Learner",
            "columns.item": "Question ID",
            "columns.time": "answered at",
            "columns.rating": "Score",
            "columns.extra": ['meta "json"'],
            "source.since": "2024-01-01T11:00:00+00:00",
        }
    )
    assert frame.columns == [USER, ITEM, TIME, RATING, 'meta "json"']
    assert frame.get_column(USER).to_list() == ["8", "7"]
    assert frame.get_column(TIME).to_list()[0].isoformat() == "2024-01-01T11:00:00+00:00"
    assert frame.get_column(RATING).dtype == pl.Float32
    assert frame.get_column(RATING).to_list() == [2.25, None]
    assert frame.get_column('meta "json"').to_list() == [None, "[1, 2]"]


def test_extract_writes_the_snapshot(attempts: list[Attempt], pg_dsn: str, tmp_path: Path) -> None:
    from core.data.extract import extract

    cfg = _config(**{"privacy.pseudonymize": False})
    snapshot = extract(cfg, tmp_path)
    assert snapshot.rows == len(attempts)
    assert snapshot.source.startswith("postgres:question_attempts@127.0.0.1")
    assert snapshot.users == len({a.user_id for a in attempts})


# -- errors ----------------------------------------------------------------------------------


def test_missing_dsn_env_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECFLOW_PG_DSN", raising=False)
    message = str(_error())
    assert "set RECFLOW_PG_DSN to the Postgres connection string" in message
    assert "Project Settings → Database" in message
    monkeypatch.delenv("WAREHOUSE_DSN", raising=False)
    assert "set WAREHOUSE_DSN" in str(_error(**{"source.dsn_env": "WAREHOUSE_DSN"}))


def test_key_value_dsn_is_refused_without_echoing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECFLOW_PG_DSN", "host=127.0.0.1 user=x password=hunter2")
    exc = _error()
    assert "postgresql://" in str(exc)
    assert "hunter2" not in _rendered(exc)


def test_wrong_password_is_named_but_never_shown(pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = "Wr0ng/p@ss w%rd"
    monkeypatch.setenv("RECFLOW_PG_DSN", pg_cluster.dsn_for(wrong))
    exc = _error()
    message = str(exc)
    assert "password authentication failed" in message
    assert "$RECFLOW_PG_DSN" in message
    shown = _rendered(exc)
    for secret in (wrong, quote(wrong, safe=""), pg_cluster.password, quote(pg_cluster.password, safe="")):
        assert secret not in shown
    assert "\n" not in message


def test_connection_refused_fails_fast_and_clean(monkeypatch: pytest.MonkeyPatch, pg_cluster: PgCluster) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    password = quote(pg_cluster.password, safe="")
    monkeypatch.setenv("RECFLOW_PG_DSN", f"postgresql://recflow_reader:{password}@127.0.0.1:{port}/postgres")
    exc = _error()
    assert "cannot connect" in str(exc) and "Connection refused" in str(exc)
    assert pg_cluster.password not in _rendered(exc)


def test_unknown_table(attempts: list[Attempt], pg_dsn: str) -> None:
    message = str(_error(**{"source.table": "no_such_table"}))
    assert "table 'no_such_table' not found" in message


def test_table_name_is_an_identifier_not_sql(attempts: list[Attempt], pg_cluster: PgCluster, pg_dsn: str) -> None:
    message = str(_error(**{"source.table": 'question_attempts"; DROP TABLE question_attempts; --'}))
    assert "not found" in message
    assert pg_cluster.execute("SELECT count(*) FROM question_attempts") == [(len(attempts),)]


def test_unknown_column_lists_the_table_columns(attempts: list[Attempt], pg_dsn: str) -> None:
    message = str(_error(**{"columns.extra": ["is_correct", "no_such_column"]}))
    assert "'no_such_column'" in message
    assert "user_id" in message and "created_at" in message


def test_permission_denied_says_what_to_grant(pg_cluster: PgCluster, pg_dsn: str) -> None:
    fill_question_attempts(pg_cluster, 5, table="qa_private")
    pg_cluster.execute("REVOKE SELECT ON qa_private FROM recflow_reader")
    message = str(_error(**{"source.table": "qa_private"}))
    assert "permission denied" in message and "GRANT SELECT" in message


# -- the DSN from a Prefect Secret block -----------------------------------------------------


def test_dsn_from_a_secret_block_when_the_env_var_is_unset(
    attempts: list[Attempt], pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from core.data.extract import extract

    monkeypatch.delenv("RECFLOW_PG_DSN", raising=False)
    asked: list[str] = []

    def loader(name: str) -> str:  # what tasks/_common.load_prefect_secret is to the task layer
        asked.append(name)
        return f"  {pg_cluster.dsn}\n"

    cfg = _config(**{"source.dsn_secret_block": "warehouse-dsn", "privacy.pseudonymize": False})
    source = make_source(cfg, secret_loader=loader)
    assert_frame_equal(source.scan().collect(), expected_frame(attempts))
    assert set(asked) == {"warehouse-dsn"}  # read when needed (scan, collect), never stored on the source
    # extract hands the task's loader through to the source
    assert extract(cfg, tmp_path, secret_loader=loader).rows == len(attempts)


def test_the_env_var_wins_over_the_secret_block(attempts: list[Attempt], pg_dsn: str) -> None:
    def loader(name: str) -> str:
        raise AssertionError("the block must not be read when the env var is set")

    cfg = _config(**{"source.dsn_secret_block": "warehouse-dsn"})
    assert len(make_source(cfg, secret_loader=loader).scan().collect()) == len(attempts)


def test_unreadable_or_unreachable_secret_block_names_the_block_never_the_dsn(
    pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RECFLOW_PG_DSN", raising=False)
    cfg = _config(**{"source.dsn_secret_block": "warehouse-dsn"})

    def missing(name: str) -> str:
        raise ValueError(f"no block {name}")

    with pytest.raises(DataSourceError, match="cannot read the Postgres connection string from Prefect Secret "
                                              "block 'warehouse-dsn'.*set RECFLOW_PG_DSN"):
        make_source(cfg, secret_loader=missing).scan()
    # outside a flow (no loader): say that blocks are read in a flow, and what to set instead
    with pytest.raises(DataSourceError, match="source.dsn_secret_block is 'warehouse-dsn'.*set RECFLOW_PG_DSN"):
        make_source(cfg).scan()
    # a wrong password in a block's DSN: the message points at the block, the password is never shown
    wrong = "Wr0ng/p@ss w%rd"
    with pytest.raises(DataSourceError) as info:
        make_source(cfg, secret_loader=lambda _: pg_cluster.dsn_for(wrong)).scan()
    assert "password authentication failed" in str(info.value)
    assert "Prefect Secret block 'warehouse-dsn'" in str(info.value)
    assert wrong not in _rendered(info.value) and pg_cluster.password not in _rendered(info.value)


def test_importing_the_sources_stays_free_of_prefect_and_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, core.data.sources, core.data.sources.postgres, core.data.sources.supabase, core.secrets; "
            "print(sorted(m for m in ('prefect', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[3])
    assert out.stdout.strip() == "[]"
