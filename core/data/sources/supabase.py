"""A Supabase table read over its REST API (PostgREST) with supabase-py.

The project URL is ``source.url``; the key comes from the environment variable named by
``source.key_env`` (default ``SUPABASE_KEY``) or, when that is unset, from the Prefect Secret
block ``source.key_secret_block`` (read through the ``secret_loader`` the task layer passes; see
``core.secrets``), and is never stored, logged or put in a message.
Use the project's anon key (or another read-only one) with a row-level-security policy that
lets it SELECT the table; a service_role key works but bypasses RLS (a warning says so).

supabase-py requests ``<url>/rest/v1/<table>``. Rows are read in pages of ``source.page_size``
(hosted Supabase returns at most 1000 rows per request) ordered by time, user and item, so
offsets are stable; the first page asks for the exact row count and the read fails unless
exactly that many rows arrived. Connection errors, HTTP 5xx and 429 are retried with
exponential backoff; 401/403 (the key) and 404 (the table) are not.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import polars as pl

from core.config import ColumnsConfig, SourceConfig
from core.data.sources.base import canonicalise_columns, in_window
from core.errors import DataSourceError
from core.secrets import SecretLoader, env_or_block

log = logging.getLogger(__name__)

RETRY_ATTEMPTS = 4
RETRY_BACKOFF_S = 0.5
TIMEOUT_S = 60.0


class SupabaseSource:
    def __init__(
        self,
        source: SourceConfig,
        columns: ColumnsConfig,
        *,
        since: datetime | None = None,
        attempts: int = RETRY_ATTEMPTS,
        backoff_s: float = RETRY_BACKOFF_S,
        timeout_s: float = TIMEOUT_S,
        sleep: Callable[[float], None] = time.sleep,
        secret_loader: SecretLoader | None = None,
    ) -> None:
        if not source.url:
            raise DataSourceError("the Supabase source needs the project URL (source.url / --url)")
        self.source = source
        self.secret_loader = secret_loader
        self._origin = f"${source.key_env}"  # where the key came from, for messages
        self.columns = columns
        self.since = since
        self.until = source.until
        self.table = source.table
        self.url = _project_url(source.url)
        self.page_size = source.page_size
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self._sleep = sleep
        self.name = f"supabase:{self.table}@{urlsplit(self.url).netloc}"
        self._last_status: int | None = None
        self._last_retry_after: str | None = None

    # -- public ------------------------------------------------------------------------------

    def scan(self) -> pl.LazyFrame:
        key = self._key()
        import httpx
        from supabase import ClientOptions, SupabaseException, create_client

        http = httpx.Client(timeout=self.timeout_s, follow_redirects=True, event_hooks={"response": [self._record]})
        try:
            options = ClientOptions(
                httpx_client=http,
                postgrest_client_retry=False,  # retried here, with backoff we control
                auto_refresh_token=False,
                persist_session=False,
            )
            try:
                client = create_client(self.url, key, options)
            except SupabaseException as exc:  # malformed URL or key
                raise DataSourceError(f"{self.name}: {_scrub(str(exc), key)}") from None
            rows = self._fetch_all(client, key)
        finally:
            http.close()
        return self._frame(rows)

    # -- steps -------------------------------------------------------------------------------

    def _key(self) -> str:
        env = self.source.key_env
        block = self.source.key_secret_block
        key, origin = env_or_block(env, block, self.secret_loader, what="the Supabase key",
                                   block_field="source.key_secret_block", error=DataSourceError)
        if not key:
            raise DataSourceError(
                f"set {env} to the Supabase project's anon key or another read-only key "
                f"(Supabase: Project Settings → API)" + (f"; Prefect Secret block {block!r} is empty" if block else "")
            )
        self._origin = f"${env}" if origin.startswith("environment") else origin
        if _is_service_key(key):
            log.warning(
                "%s holds a service_role/secret key, which bypasses row-level security; "
                "a read-only (anon) key with a SELECT policy is enough for recflow",
                self._origin,
            )
        return key

    def _fetch_all(self, client: Any, key: str) -> list[dict[str, Any]]:
        select = ",".join(_select_item(c) for c in self.columns.source_columns())
        order = list(dict.fromkeys([self.columns.time, self.columns.user, self.columns.item]))
        rows: list[dict[str, Any]] = []
        total: int | None = None
        while True:
            start = len(rows)
            query = client.table(self.table).select(select, count="exact" if start == 0 else None)
            if self.since is not None:
                query = query.gte(self.columns.time, _utc(self.since).isoformat())
            if self.until is not None:
                query = query.lt(self.columns.time, _utc(self.until).isoformat())
            for col in order:
                query = query.order(col)
            query = query.range(start, start + self.page_size - 1)
            response = self._execute(query, key, first=start == 0)
            if response is None:  # 416: the table shrank under the offset
                break
            if start == 0:
                total = response.count
            page = response.data or []
            rows.extend(page)
            # Stop on the counted total (rows added at the end meanwhile are left for the next
            # run), or on a short/empty page when the server gave no count.
            if not page or (total is not None and len(rows) >= total):
                break
            if total is None and len(page) < self.page_size:
                break
        if total is not None and len(rows) != total:
            raise DataSourceError(
                f"{self.name}: fetched {len(rows)} of {total} rows (did the table change while it was "
                f"being read?); run again"
            )
        if not rows and self.since is None and self.until is None:
            raise DataSourceError(
                f"{self.name}: the table returned no rows. If it has rows, row-level security hides "
                f"them from the key in {self._origin}: add a SELECT policy for that role "
                f"(e.g. `create policy read on {self.table} for select to anon using (true)`)"
            )
        return rows

    def _execute(self, query: Any, key: str, *, first: bool) -> Any:
        import httpx
        from postgrest.exceptions import APIError

        for attempt in range(1, self.attempts + 1):
            self._last_status = None
            self._last_retry_after = None
            try:
                return query.execute()
            except APIError as err:
                status = self._last_status
                if status == 416 and not first:
                    return None
                if status is not None and (status == 429 or status >= 500) and attempt < self.attempts:
                    self._backoff(attempt)
                    continue
                raise DataSourceError(self._explain(status, err, key)) from None
            except httpx.TransportError as err:  # refused, reset, DNS, TLS, timeouts
                if attempt < self.attempts:
                    self._backoff(attempt)
                    continue
                raise DataSourceError(
                    f"{self.name}: cannot reach {self.url} after {self.attempts} tries "
                    f"({type(err).__name__}: {_scrub(str(err), key) or 'no detail'})"
                ) from None
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int) -> None:
        delay = self.backoff_s * 2 ** (attempt - 1)
        if self._last_retry_after and self._last_retry_after.strip().isdigit():
            delay = max(delay, min(float(self._last_retry_after), 30.0))
        self._sleep(delay)

    def _record(self, response: Any) -> None:
        self._last_status = response.status_code
        self._last_retry_after = response.headers.get("retry-after")

    def _explain(self, status: int | None, err: Any, key: str) -> str:
        message = _scrub(" ".join(str(p) for p in (err.message, err.hint) if p) or str(err), key)
        if status in (401, 403):
            return (
                f"Supabase rejected the key in {self._origin} (HTTP {status}: {message}); use the project's "
                f"anon key from Project Settings → API, for the project at {self.url}"
            )
        if status == 404:
            return (
                f"{self.name}: table {self.table!r} not found (HTTP 404: {message}); check source.table, "
                f"and that the table is in an exposed schema (public)"
            )
        if status is not None and (status == 429 or status >= 500):
            return f"{self.name}: HTTP {status} after {self.attempts} tries: {message}"
        if err.code == "42703":
            return f"{self.name}: {message}; check the columns settings (HTTP {status})"
        return f"{self.name}: HTTP {status}: {message}"

    def _frame(self, rows: list[dict[str, Any]]) -> pl.LazyFrame:
        text_cols = {self.columns.user, self.columns.item, self.columns.time}
        series = []
        for col in self.columns.source_columns():
            values = [row.get(col) for row in rows]
            if col in text_cols:
                series.append(pl.Series(col, [None if v is None else str(v) for v in values], dtype=pl.String))
            else:
                series.append(pl.Series(col, values, strict=False))
        canonical = canonicalise_columns(pl.DataFrame(series).lazy(), self.columns, origin=self.name)
        return in_window(canonical, self.since, self.until)


def _project_url(url: str) -> str:
    """The project URL as supabase-py wants it (it appends /rest/v1 itself)."""
    url = url.strip().rstrip("/")
    if url.endswith("/rest/v1"):
        url = url[: -len("/rest/v1")]
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise DataSourceError(f"source.url must be the project URL, e.g. https://<ref>.supabase.co (got {url!r})")
    return url


def _select_item(column: str) -> str:
    simple = column.replace("_", "").isalnum() and not column[:1].isdigit()
    return column if simple else '"' + column.replace('"', '\\"') + '"'


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _scrub(text: str, key: str) -> str:
    return text.replace(key, "***") if key else text


def _is_service_key(key: str) -> bool:
    if key.startswith("sb_secret_"):
        return True
    parts = key.split(".")
    if len(parts) != 3:
        return False
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, TypeError):
        return False
    return isinstance(payload, dict) and payload.get("role") == "service_role"
