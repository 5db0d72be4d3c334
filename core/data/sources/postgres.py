"""A Postgres table (Supabase's database included), read with polars over ADBC.

The connection string comes from the environment variable named by ``source.dsn_env``
(default ``RECFLOW_PG_DSN``) or, when that is unset, from the Prefect Secret block
``source.dsn_secret_block`` (read through the ``secret_loader`` the task layer passes; see
``core.secrets``); it is never stored on the source, never put in its name and scrubbed from
every error message.

``scan()`` runs one query on the catalog (can we log in, does the table exist, which columns
and types does it have) and returns a lazy frame with the exact schema; collecting it runs
one SELECT of the mapped and extra columns, with the time window pushed down as bind
parameters (and the projection and ``head(n)`` from polars). Identifiers are always double-quoted; values are
never formatted into the SQL. Types that Arrow has no clean mapping for are cast in SQL
(uuid -> text, numeric -> double precision, json/enums/arrays -> text), so what comes back
is plain strings, numbers, booleans and UTC datetimes.

Why ADBC and not connectorx: connectorx retries a failed login in its connection pool for
about 30 s before giving up, and takes no bind parameters; ADBC (libpq) fails at once with
the server's own message and SQLSTATE, and binds parameters.

Supabase: use the direct connection or the session pooler (port 5432). The transaction
pooler (port 6543) may not keep the prepared statement ADBC uses between round trips.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import polars as pl
from polars.io.plugins import register_io_source

from core.config import ColumnsConfig, SourceConfig
from core.data.sources.base import canonicalise_columns, in_window
from core.errors import DataSourceError
from core.secrets import SecretLoader, env_or_block

CONNECT_TIMEOUT_S = 15

# Types read as they are (Arrow maps them cleanly); anything else is cast to text,
# numeric to double precision.
_NATIVE = {
    "smallint",
    "integer",
    "bigint",
    "real",
    "double precision",
    "boolean",
    "text",
    "date",
    "timestamp with time zone",
    "timestamp without time zone",
}
_NATIVE_PREFIXES = ("character varying", "character(", "timestamp(")
_TIMELIKE = ("timestamp", "date")

_CATALOG_SQL = (
    "SELECT a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS type "
    "FROM pg_catalog.pg_attribute a "
    "WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped "
    "ORDER BY a.attnum"
)


class PostgresSource:
    def __init__(
        self,
        source: SourceConfig,
        columns: ColumnsConfig,
        *,
        since: datetime | None = None,
        secret_loader: SecretLoader | None = None,
    ) -> None:
        self.source = source
        self.secret_loader = secret_loader
        self._origin = f"${source.dsn_env}"  # where the DSN came from, for messages
        self.columns = columns
        self.since = since
        self.until = source.until
        self.table = source.table
        self.name = f"postgres:{self.table}{_safe_location(os.environ.get(source.dsn_env, ''))}"

    # -- public ------------------------------------------------------------------------------

    def scan(self) -> pl.LazyFrame:
        """Checks the login, the table and the columns now (one catalog query); the rows are
        read when the frame is collected, with the projection and ``head(n)`` pushed into SQL.
        So ``scan().collect_schema()`` is a cheap preflight."""
        uri, scrub = self._connection()
        types = self._catalog(uri, scrub)
        wanted = self.columns.source_columns()
        missing = [c for c in wanted if c not in types]
        if missing:
            raise DataSourceError(
                f"{self.name}: column(s) not found: {', '.join(repr(c) for c in missing)}; "
                f"the table has: {', '.join(list(types)[:30])}"
            )
        ids = {self.columns.user, self.columns.item}
        schema = {c: pl.String if c in ids else _polars_type(types[c]) for c in wanted}

        def rows(
            with_columns: list[str] | None, predicate: pl.Expr | None, n_rows: int | None, _batch: int | None
        ) -> Iterator[pl.DataFrame]:
            # The DSN is read again here rather than captured: the frame holds no secret.
            uri, scrub = self._connection()
            cols = [c for c in wanted if with_columns is None or c in with_columns] or [self.columns.time]
            query, params = self._query(cols, types, limit=n_rows if predicate is None else None)
            frame = self._read(query, uri, scrub, params=params)
            try:
                frame = frame.cast({c: schema[c] for c in cols})
            except pl.exceptions.PolarsError as exc:
                raise DataSourceError(f"{self.name}: unexpected column types: {exc}") from None
            if predicate is not None:
                frame = frame.filter(predicate)
            if with_columns is not None:
                frame = frame.select(with_columns)
            yield frame if n_rows is None else frame.head(n_rows)

        canonical = canonicalise_columns(register_io_source(rows, schema=schema), self.columns, origin=self.name)
        # The window is already applied in SQL when the time column is a timestamp; this keeps
        # text/epoch time columns (filtered here only) to the same half-open semantics.
        return in_window(canonical, self.since, self.until)

    # -- steps -------------------------------------------------------------------------------

    def _connection(self) -> tuple[str, Callable[[str], str]]:
        dsn = self._dsn()
        uri = _with_connect_timeout(dsn)
        return uri, _scrubber(dsn, uri)

    def _dsn(self) -> str:
        env = self.source.dsn_env
        block = self.source.dsn_secret_block
        dsn, origin = env_or_block(env, block, self.secret_loader, what="the Postgres connection string",
                                   block_field="source.dsn_secret_block", error=DataSourceError)
        if not dsn:
            raise DataSourceError(
                f"set {env} to the Postgres connection string, e.g. "
                f"postgresql://USER:PASSWORD@HOST:5432/DB (Supabase: Project Settings → Database)"
                + (f"; Prefect Secret block {block!r} is empty" if block else "")
            )
        self._origin = f"${env}" if origin.startswith("environment") else origin
        scheme = dsn.split(":", 1)[0].lower() if "://" in dsn else ""
        if scheme not in ("postgres", "postgresql"):
            raise DataSourceError(
                f"{env if origin.startswith('environment') else origin} must be a connection URI starting with postgresql:// "
                f"(e.g. postgresql://USER:PASSWORD@HOST:5432/DB); key=value strings and "
                f"SQLAlchemy URLs (postgresql+driver://) are not supported"
            )
        return dsn

    def _catalog(self, uri: str, scrub: Callable[[str], str]) -> dict[str, str]:
        frame = self._read(_CATALOG_SQL, uri, scrub, params=[_qualified(self.table)])
        if frame.height == 0:
            raise DataSourceError(
                f"{self.name}: table {self.table!r} not found (or not visible to this role); "
                f"set source.table (schema-qualify it as schema.table if it is not in the search path)"
            )
        return dict(zip(frame.get_column("name").to_list(), frame.get_column("type").to_list(), strict=True))

    def _query(self, wanted: list[str], types: dict[str, str], *, limit: int | None = None) -> tuple[str, list[str]]:
        ids = {self.columns.user, self.columns.item}
        select = []
        for col in wanted:
            ident = quote_ident(col)
            cast = "text" if col in ids else _cast_for(types[col])
            select.append(f"{ident}::{cast} AS {ident}" if cast else ident)
        time_col = quote_ident(self.columns.time)
        time_type = types[self.columns.time]
        where: list[str] = []
        params: list[str] = []
        if time_type.startswith(_TIMELIKE):
            # A naive timestamp/date column holds UTC (as everywhere in recflow): compare it with
            # the bound instant seen in UTC, not in the session's time zone.
            naive = "with time zone" not in time_type
            for bound, op in ((self.since, ">="), (self.until, "<")):
                if bound is None:
                    continue
                params.append(_utc(bound).isoformat())
                value = f"${len(params)}::timestamptz"
                if naive:
                    value = f"({value} AT TIME ZONE 'UTC')"
                where.append(f"{time_col} {op} {value}")
        keys = dict.fromkeys([self.columns.time, self.columns.user, self.columns.item])
        order = ", ".join(quote_ident(c) for c in keys)
        sql = f"SELECT {', '.join(select)} FROM {_qualified(self.table)}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY {order}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return sql, params

    def _read(
        self, query: str, uri: str, scrub: Callable[[str], str], *, params: list[str] | None = None
    ) -> pl.DataFrame:
        try:
            import adbc_driver_manager
            import adbc_driver_postgresql  # noqa: F401  (polars imports it by the URI's scheme)
        except ImportError as exc:
            raise DataSourceError(
                f"the Postgres source needs the ADBC driver: pip install adbc-driver-postgresql ({exc})"
            ) from None
        try:
            return pl.read_database_uri(
                query, uri, engine="adbc", execute_options={"parameters": params} if params else None
            )
        except (adbc_driver_manager.Error, pl.exceptions.PolarsError) as exc:
            # Re-raised without its cause: the driver's exception may carry connection details.
            raise DataSourceError(self._explain(exc, scrub)) from None

    def _explain(self, exc: BaseException, scrub: Callable[[str], str]) -> str:
        state = getattr(exc, "sqlstate", None)
        detail = scrub(_server_message(exc))
        env = self._origin
        if "Failed to connect" in str(exc) or "connection to server" in str(exc):
            if "password authentication failed" in detail or "no password supplied" in detail:
                return f"{self.name}: the server rejected the login ({detail}); check the user and password in {env}"
            return f"{self.name}: cannot connect ({detail}); check the host and port in {env}"
        if state == "42P01":
            return f"{self.name}: table {self.table!r} not found ({detail})"
        if state == "42703":
            return f"{self.name}: {detail}; check the columns settings"
        if state == "42501":
            grant = f"GRANT SELECT ON {_qualified(self.table)} TO <role>"
            return f"{self.name}: {detail}; the role in {env} needs: {grant}"
        if state in ("26000", "42P05"):
            return (
                f"{self.name}: {detail}; a transaction-mode pooler (Supabase port 6543) drops prepared "
                f"statements: use the direct connection or the session pooler (port 5432) in {env}"
            )
        return f"{self.name}: {detail}"


# -- SQL helpers -------------------------------------------------------------------------------


def quote_ident(name: str) -> str:
    """A Postgres identifier, double-quoted (so case, spaces and keywords are kept as written)."""
    if not name or "\x00" in name:
        raise DataSourceError(f"invalid Postgres identifier {name!r}")
    return '"' + name.replace('"', '""') + '"'


def _qualified(table: str) -> str:
    """``schema.table`` or ``table``, each part quoted."""
    return ".".join(quote_ident(part) for part in table.split(".", 1))


def _polars_type(pg_type: str) -> pl.DataType:
    """What a column of ``pg_type`` arrives as, after ``_cast_for``."""
    cast = _cast_for(pg_type)
    if cast == "text":
        return pl.String()
    if cast == "double precision":
        return pl.Float64()
    if pg_type.startswith("timestamp"):
        return pl.Datetime("us", "UTC" if pg_type.endswith("with time zone") else None)
    fixed: dict[str, pl.DataType] = {
        "smallint": pl.Int16(),
        "integer": pl.Int32(),
        "bigint": pl.Int64(),
        "real": pl.Float32(),
        "double precision": pl.Float64(),
        "boolean": pl.Boolean(),
        "date": pl.Date(),
    }
    return fixed.get(pg_type, pl.String())


def _cast_for(pg_type: str) -> str | None:
    if pg_type in _NATIVE or pg_type.startswith(_NATIVE_PREFIXES):
        return "boolean" if pg_type == "boolean" else None
    if pg_type.startswith(("numeric", "decimal")):
        return "double precision"
    return "text"  # uuid, json, jsonb, enums, arrays, intervals, ...


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


# -- DSN handling ------------------------------------------------------------------------------


def _with_connect_timeout(dsn: str) -> str:
    """Add ``connect_timeout`` (libpq waits forever on an unreachable host by default)."""
    parts = urlsplit(dsn)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(k == "connect_timeout" for k, _ in query):
        return dsn
    query.append(("connect_timeout", str(CONNECT_TIMEOUT_S)))
    return urlunsplit(parts._replace(query=urlencode(query)))


def _safe_location(dsn: str) -> str:
    """``@host/db`` (``@host:port/db`` off the default port) or '' - never user or password."""
    dsn = dsn.strip()
    if "://" not in dsn:
        return ""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return ""
    if not host:
        return ""
    db = parts.path.lstrip("/") or ""
    where = host if port in (None, 5432) else f"{host}:{port}"
    return f"@{where}/{db}" if db else f"@{where}"


def _scrubber(*dsns: str) -> Callable[[str], str]:
    secrets: set[str] = set(dsns)
    for dsn in dsns:
        try:
            password = urlsplit(dsn).password
        except ValueError:
            password = None
        if password:
            for form in {password, unquote(password), quote(unquote(password), safe="")}:
                secrets.add(form)
    ordered = sorted((s for s in secrets if s), key=len, reverse=True)

    def scrub(text: str) -> str:
        for secret in ordered:
            text = text.replace(secret, "***")
        text = re.sub(r"(postgres(?:ql)?://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)
        return re.sub(r"(password\s*=\s*)\S+", r"\1***", text, flags=re.IGNORECASE)

    return scrub


def _server_message(exc: BaseException) -> str:
    """The useful line of an ADBC/libpq error: no status prefixes, no echoed query."""
    text = str(exc).strip()
    text = re.sub(r"^[A-Z_]+: ", "", text)  # ADBC status, e.g. "IO: ", "NOT_FOUND: "
    text = text.replace("[libpq] ", "")
    text = text.split("\nQuery was:", 1)[0]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # libpq puts the server's FATAL/ERROR line after "connection to server ... failed:".
    message = " ".join(lines[:2]) if lines and lines[0].endswith("failed:") else (lines[0] if lines else "")
    message = re.sub(r"\s+", " ", message)
    message = re.sub(r"^Failed to [a-z ]+: ", "", message)
    message = re.sub(r"\bPGRES_[A-Z_]+ ", "", message)
    message = re.sub(r"\b(?:ERROR|FATAL): ", "", message)
    return message or type(exc).__name__
