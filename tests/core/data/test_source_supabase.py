"""The Supabase source: real supabase-py over HTTP to a PostgREST stand-in
(tests/postgrest_standin.py) backed by the real PostgreSQL test cluster."""

from __future__ import annotations

import math
import socket
import traceback
from collections.abc import Iterator
from datetime import timedelta

import httpx
import polars as pl
import pytest
from pg_cluster import QA_COLUMNS, Attempt, PgCluster, expected_frame, fill_question_attempts
from polars.testing import assert_frame_equal
from postgrest_standin import PostgrestStandIn, RecordedRequest

from core.config import PipelineConfig, load_config
from core.data.sources import make_source
from core.data.sources.supabase import SupabaseSource
from core.errors import DataSourceError

pytest_plugins = ["pg_fixtures"]

KEY = "anon.test-key.0f9e8d"  # what the stand-in accepts


@pytest.fixture(scope="module")
def api(pg_cluster: PgCluster) -> Iterator[PostgrestStandIn]:
    # PostgREST reads as a restricted role; so does the stand-in.
    with PostgrestStandIn(pg_cluster.dsn, api_key=KEY) as standin:
        yield standin


@pytest.fixture()
def rest(api: PostgrestStandIn, monkeypatch: pytest.MonkeyPatch) -> Iterator[PostgrestStandIn]:
    """The stand-in with a clean request log, and SUPABASE_KEY set to its key."""
    monkeypatch.setenv("SUPABASE_KEY", KEY)
    api.reset()
    max_rows = api.max_rows
    yield api
    api.max_rows = max_rows
    api.reset()


def _config(api: PostgrestStandIn, **overrides: object) -> PipelineConfig:
    return load_config(overrides={"source.kind": "supabase", "source.url": api.url, **QA_COLUMNS, **overrides})


def _source(api: PostgrestStandIn, sleeps: list[float] | None = None, **overrides: object) -> SupabaseSource:
    """A source that records its backoff delays instead of sleeping them."""
    cfg = _config(api, **overrides)
    recorded = sleeps if sleeps is not None else []
    return SupabaseSource(cfg.source, cfg.columns, since=cfg.source.since, sleep=recorded.append)


def _expected(rows: list[Attempt]) -> pl.DataFrame:
    # JSON numbers carry no width: real -> Float64, smallint -> Int64.
    return expected_frame(rows, real=pl.Float64, small=pl.Int64)


def _error(source: SupabaseSource) -> DataSourceError:
    with pytest.raises(DataSourceError) as info:
        source.scan()
    return info.value


def _rendered(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def _offsets(requests: list[RecordedRequest]) -> list[int]:
    return [int(r.param("offset")[0]) for r in requests]


def test_pages_through_more_than_two_pages(attempts: list[Attempt], rest: PostgrestStandIn) -> None:
    source = make_source(_config(rest))  # the user path: defaults, page_size 1000
    assert isinstance(source, SupabaseSource)
    frame = source.scan().collect()
    assert_frame_equal(frame, _expected(attempts))

    requests = rest.requests
    assert len(requests) >= 3
    assert _offsets(requests) == [0, 1000, 2000]
    first, *others = requests
    for r in requests:
        assert r.path == "/rest/v1/question_attempts"
        assert r.param("limit") == ["1000"]
        assert r.param("order") == ["created_at.asc,user_id.asc,question_id.asc"]
        assert r.param("select") == [
            "user_id,question_id,created_at,is_correct,response_time_seconds,difficulty_level,topic,subtopic"
        ]
        assert r.headers["apikey"] == KEY
        assert r.headers["authorization"] == f"Bearer {KEY}"
    assert first.headers.get("prefer") == "count=exact"
    assert all("count=" not in r.headers.get("prefer", "") for r in others)
    assert [r.status for r in requests] == [206, 200, 200]


def test_timestamps_arrive_with_an_offset_and_become_utc(attempts: list[Attempt], rest: PostgrestStandIn) -> None:
    raw = httpx.get(
        f"{rest.url}/rest/v1/question_attempts",
        params={"select": "created_at", "order": "created_at.asc", "limit": "1"},
        headers={"apikey": KEY},
    )
    assert raw.json()[0]["created_at"].endswith("+05:30")  # the server's zone, as PostgREST renders it
    frame = _source(rest).scan().collect()
    assert frame.get_column("timestamp").to_list()[:5] == [a.created_at for a in attempts[:5]]


def test_window_and_small_pages(attempts: list[Attempt], rest: PostgrestStandIn) -> None:
    since, until = attempts[100].created_at, attempts[1100].created_at
    window = {"source.since": since.isoformat(), "source.until": until.isoformat()}
    source = _source(rest, **{"source.page_size": 300, **window})
    frame = source.scan().collect()
    assert_frame_equal(frame, _expected(attempts[100:1100]))
    assert _offsets(rest.requests) == [0, 300, 600, 900]
    filters = rest.requests[0].param("created_at")
    assert filters == [f"gte.{since.isoformat()}", f"lt.{until.isoformat()}"]


def test_server_cap_below_the_page_size_still_reads_everything(attempts: list[Attempt], rest: PostgrestStandIn) -> None:
    rest.max_rows = 400  # a project with a lower "Max rows" setting
    frame = _source(rest).scan().collect()
    assert frame.height == len(attempts)
    assert len(rest.requests) == math.ceil(len(attempts) / 400)


def test_standin_caps_a_response_at_1000_rows(attempts: list[Attempt], rest: PostgrestStandIn) -> None:
    response = httpx.get(
        f"{rest.url}/rest/v1/question_attempts",
        params={"select": "user_id", "limit": "5000"},
        headers={"apikey": KEY, "Prefer": "count=exact"},
    )
    assert len(response.json()) == 1000
    assert response.headers["content-range"] == f"0-999/{len(attempts)}"


def test_rows_lost_while_paging_fail_the_count_check(pg_cluster: PgCluster, rest: PostgrestStandIn) -> None:
    fill_question_attempts(pg_cluster, 1500, table="qa_shrinking", seed=5)

    def delete_after_first_page(req: RecordedRequest) -> None:
        if req.param("offset") == ["0"]:
            pg_cluster.execute("DELETE FROM qa_shrinking WHERE id <= 10")

    rest.on_query = delete_after_first_page
    message = str(_error(_source(rest, **{"source.table": "qa_shrinking"})))
    assert "fetched 1490 of 1500 rows" in message


def test_empty_table_without_window_hints_at_row_level_security(pg_cluster: PgCluster, rest: PostgrestStandIn) -> None:
    fill_question_attempts(pg_cluster, 0, table="qa_empty")
    message = str(_error(_source(rest, **{"source.table": "qa_empty"})))
    assert "row-level security" in message and "SUPABASE_KEY" in message
    # A window with no rows is normal (a nightly run with nothing new).
    frame = _source(rest, **{"source.table": "qa_empty", "source.since": "2024-01-01T00:00:00Z"}).scan().collect()
    assert frame.height == 0


# -- keys, retries and errors ----------------------------------------------------------------


def test_name_has_host_but_no_key(rest: PostgrestStandIn) -> None:
    source = _source(rest)
    assert source.name == f"supabase:question_attempts@{rest.url.removeprefix('http://')}"
    assert KEY not in source.name


def test_project_url_may_end_in_rest_v1(attempts: list[Attempt], rest: PostgrestStandIn) -> None:
    until = attempts[10].created_at.isoformat()
    frame = _source(rest, **{"source.url": rest.url + "/rest/v1/", "source.until": until}).scan().collect()
    assert frame.height == 10
    assert rest.requests[0].path == "/rest/v1/question_attempts"


def test_missing_key_env_says_what_to_set(rest: PostgrestStandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUPABASE_KEY")
    message = str(_error(_source(rest)))
    assert "set SUPABASE_KEY" in message and "anon key" in message
    assert rest.requests == []


def test_bad_key_is_401_not_retried_and_not_shown(
    attempts: list[Attempt], rest: PostgrestStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "eyJ-not-the-right-key-42"
    monkeypatch.setenv("SUPABASE_KEY", wrong)
    sleeps: list[float] = []
    exc = _error(_source(rest, sleeps))
    message = str(exc)
    assert message.startswith("Supabase rejected the key in $SUPABASE_KEY (HTTP 401")
    assert wrong not in _rendered(exc) and KEY not in _rendered(exc)
    assert len(rest.requests) == 1 and sleeps == []


def test_transient_503s_are_retried_with_backoff(attempts: list[Attempt], rest: PostgrestStandIn) -> None:
    rest.fail_next(2, 503)
    sleeps: list[float] = []
    frame = _source(rest, sleeps).scan().collect()
    assert frame.height == len(attempts)
    assert [r.status for r in rest.requests] == [503, 503, 206, 200, 200]
    assert sleeps == [0.5, 1.0]


def test_429_waits_at_least_retry_after(attempts: list[Attempt], rest: PostgrestStandIn) -> None:
    rest.fail_next(1, 429, retry_after=3)
    sleeps: list[float] = []
    assert _source(rest, sleeps).scan().collect().height == len(attempts)
    assert sleeps == [3.0]


def test_gives_up_after_four_tries(attempts: list[Attempt], rest: PostgrestStandIn) -> None:
    rest.fail_next(10, 503)
    sleeps: list[float] = []
    message = str(_error(_source(rest, sleeps)))
    assert "HTTP 503 after 4 tries" in message
    assert len(rest.requests) == 4 and sleeps == [0.5, 1.0, 2.0]


def test_unreachable_server_is_retried_then_reported(rest: PostgrestStandIn) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps: list[float] = []
    message = str(_error(_source(rest, sleeps, **{"source.url": f"http://127.0.0.1:{port}"})))
    assert f"cannot reach http://127.0.0.1:{port} after 4 tries" in message
    assert "ConnectError" in message and len(sleeps) == 3


def test_unknown_table_is_404_not_retried(rest: PostgrestStandIn) -> None:
    sleeps: list[float] = []
    message = str(_error(_source(rest, sleeps, **{"source.table": "no_such_table"})))
    assert "table 'no_such_table' not found (HTTP 404" in message
    assert len(rest.requests) == 1 and sleeps == []


def test_unknown_column_is_reported(attempts: list[Attempt], rest: PostgrestStandIn) -> None:
    message = str(_error(_source(rest, **{"columns.extra": ["no_such_column"]})))
    assert "no_such_column does not exist" in message


def test_one_page_for_a_small_window(attempts: list[Attempt], rest: PostgrestStandIn) -> None:
    since = attempts[-5].created_at - timedelta(microseconds=1)
    frame = _source(rest, **{"source.since": since.isoformat()}).scan().collect()
    assert_frame_equal(frame, _expected(attempts[-5:]))
    assert len(rest.requests) == 1


# -- the key from a Prefect Secret block -----------------------------------------------------


def test_key_from_a_secret_block_when_the_env_var_is_unset(
    attempts: list[Attempt], rest: PostgrestStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SUPABASE_KEY")
    asked: list[str] = []

    def loader(name: str) -> str:  # what tasks/_common.load_prefect_secret is to the task layer
        asked.append(name)
        return KEY + "\n"

    source = make_source(_config(rest, **{"source.key_secret_block": "supabase-anon"}), secret_loader=loader)
    assert_frame_equal(source.scan().collect(), _expected(attempts))
    assert asked == ["supabase-anon"]


def test_the_key_env_var_wins_over_the_secret_block(attempts: list[Attempt], rest: PostgrestStandIn) -> None:
    def loader(name: str) -> str:
        raise AssertionError("the block must not be read when the env var is set")

    source = make_source(_config(rest, **{"source.key_secret_block": "supabase-anon"}), secret_loader=loader)
    assert len(source.scan().collect()) == len(attempts)


def test_secret_block_problems_name_the_block_never_the_key(
    attempts: list[Attempt], rest: PostgrestStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SUPABASE_KEY")
    cfg = _config(rest, **{"source.key_secret_block": "supabase-anon"})

    def missing(name: str) -> str:
        raise ValueError(f"no block {name}")

    with pytest.raises(DataSourceError, match="cannot read the Supabase key from Prefect Secret block "
                                              "'supabase-anon'.*set SUPABASE_KEY"):
        make_source(cfg, secret_loader=missing).scan()
    with pytest.raises(DataSourceError, match="source.key_secret_block is 'supabase-anon'.*set SUPABASE_KEY"):
        make_source(cfg).scan()  # outside a flow: no loader
    wrong = "eyJ-not-the-right-key-42"
    with pytest.raises(DataSourceError) as info:
        make_source(cfg, secret_loader=lambda _: wrong).scan()
    assert str(info.value).startswith("Supabase rejected the key in Prefect Secret block 'supabase-anon' (HTTP 401")
    assert wrong not in _rendered(info.value) and KEY not in _rendered(info.value)
