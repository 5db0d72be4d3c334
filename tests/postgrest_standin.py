"""A STAND-IN for Supabase's REST API (PostgREST behind Supabase's API gateway), for tests.

Real PostgREST is a Haskell binary that cannot be installed here (no registry ships it), so
this module serves the part of its HTTP interface that supabase-py's select path uses, with a
real PostgreSQL database behind it (psycopg; rows are rendered by Postgres's own json_agg, as
PostgREST does, so timestamptz values come back as ISO strings with the server's offset).

What supabase-py (postgrest-py 2.x) sends for
``client.table(t).select("a,b", count="exact").gte("a", x).lt("a", y).order("a").range(0, 999)``:

    GET /rest/v1/<t>?select=a,b&a=gte.<x>&a=lt.<y>&order=a.asc&offset=0&limit=1000
    apikey: <key>                      Authorization: Bearer <key>
    Prefer: count=exact                Accept-Profile: public

(``range()`` becomes offset/limit query parameters, not a Range header; both are served.)

Served here, as hosted Supabase does:
  * the gateway's key check: a missing or wrong ``apikey`` -> 401
    ``{"message": "Invalid API key", ...}``; a wrong ``Authorization: Bearer`` -> 401 PGRST301;
  * unknown table -> 404 ``{"code": "PGRST205", "message": "Could not find the table ..."}``;
  * unknown column in select/filter/order -> 400 ``{"code": "42703", ...}``;
  * filters ``eq, neq, gt, gte, lt, lte, is``; ``order=col.asc|desc[.nullsfirst|.nullslast]``;
  * ``offset``/``limit`` and ``Range: a-b`` (+ ``Range-Unit: items``); at most ``max_rows``
    rows (1000, Supabase's default cap) per response, whatever was asked;
  * ``Prefer: count=exact`` -> ``Content-Range: a-b/total`` (``a-b/*`` without it), 206 for a
    partial range with a known total, 416 PGRST103 for an offset past the end.

Test hooks: ``fail_next(n, status=503)`` answers the next n requests with that status (a
transient fault); ``on_query`` runs after a page was read and before it is sent (to change the
table between pages); ``requests`` records what each request carried.

Not served: embedding, aliases/casts in select, logical operators, writes, RPC, OpenAPI.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import psycopg
from psycopg import sql

MAX_ROWS = 1000
_OPS = {"eq": "=", "neq": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
_RESERVED = {"select", "order", "limit", "offset", "columns", "on_conflict"}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_ ]*$")


@dataclass
class RecordedRequest:
    method: str
    path: str
    params: list[tuple[str, str]]
    headers: dict[str, str]  # lower-cased names
    status: int = 0

    def param(self, name: str) -> list[str]:
        return [v for k, v in self.params if k == name]


class _ApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(body.get("message"))
        self.status = status
        self.body = body
        self.headers = headers or {}


def _pgrst(status: int, code: str, message: str, details: str | None = None, **headers: str) -> _ApiError:
    """A PostgREST-style JSON error."""
    body = {"code": code, "details": details, "hint": None, "message": message}
    return _ApiError(status, body, {k.replace("_", "-"): v for k, v in headers.items()})


@dataclass
class PostgrestStandIn:
    """Serve ``/rest/v1/<table>`` of the database at ``dsn`` on 127.0.0.1:<free port>."""

    dsn: str
    api_key: str
    schema: str = "public"
    max_rows: int = MAX_ROWS
    on_query: Callable[[RecordedRequest], None] | None = None
    requests: list[RecordedRequest] = field(default_factory=list)
    _faults: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        standin = self

        class Handler(_Handler):
            owner = standin

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
        self._thread = threading.Thread(target=self._server.serve_forever, name="postgrest-standin", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """The "project URL" (supabase-py appends /rest/v1/<table>)."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def fail_next(self, n: int, status: int = 503, *, retry_after: int | None = None) -> None:
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        with self._lock:
            self._faults.extend([(status, headers)] * n)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._faults.clear()
        self.on_query = None

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._conn.close()

    def __enter__(self) -> PostgrestStandIn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- request handling (runs on the server's threads) --------------------------------------

    def _take_fault(self) -> tuple[int, dict[str, str]] | None:
        with self._lock:
            return self._faults.pop(0) if self._faults else None

    def handle(self, req: RecordedRequest) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.requests.append(req)
        fault = self._take_fault()
        if fault is not None:
            status, headers = fault
            body = {"code": "PGRST000", "details": None, "hint": None, "message": f"injected fault (HTTP {status})"}
            return status, headers, json.dumps(body).encode()
        try:
            self._check_key(req.headers)
            table = self._table(req.path)
            return self._select(req, table)
        except _ApiError as err:
            return err.status, err.headers, json.dumps(err.body).encode()

    def _check_key(self, headers: dict[str, str]) -> None:
        apikey = headers.get("apikey")
        if not apikey:
            hint = "No `apikey` request header or url param was found."
            raise _ApiError(401, {"message": "No API key found in request", "hint": hint})
        if apikey != self.api_key:
            hint = "Double check your Supabase `anon` or `service_role` API key."
            raise _ApiError(401, {"message": "Invalid API key", "hint": hint})
        auth = headers.get("authorization")
        if auth is not None and auth != f"Bearer {self.api_key}":
            message = "JWSError (CompactDecodeError Invalid number of parts: Expected 3 parts; got 1)"
            raise _pgrst(401, "PGRST301", message, WWW_Authenticate='Bearer error="invalid_token"')

    def _table(self, path: str) -> str:
        prefix = "/rest/v1/"
        if not path.startswith(prefix) or path == prefix:
            raise _pgrst(404, "PGRST125", f"Invalid path specified in request URL: {path}")
        table = unquote(path[len(prefix):]).rstrip("/")
        found = self._query_one(
            "SELECT to_regclass(%s) IS NOT NULL",
            [sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(table)).as_string(self._conn)],
        )
        if not found:
            raise _pgrst(404, "PGRST205", f"Could not find the table '{self.schema}.{table}' in the schema cache")
        return table

    def _columns(self, table: str) -> list[str]:
        rows = self._query(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 "
            "AND NOT attisdropped ORDER BY attnum",
            [sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(table)).as_string(self._conn)],
        )
        return [r[0] for r in rows]

    def _select(self, req: RecordedRequest, table: str) -> tuple[int, dict[str, str], bytes]:
        if req.method not in ("GET", "HEAD"):
            raise _pgrst(405, "PGRST117", f"Unsupported HTTP method: {req.method}")
        columns = self._columns(table)

        def column(name: str) -> sql.Identifier:
            if name not in columns:
                raise _pgrst(400, "42703", f"column {table}.{name} does not exist")
            return sql.Identifier(name)

        params = dict((k, v) for k, v in req.params if k in _RESERVED)
        # select
        wanted = params.get("select", "*")
        if wanted == "*":
            select = sql.SQL("*")
        else:
            names = [c for c in wanted.split(",") if c]
            for c in names:
                if not _NAME.match(c):
                    raise _pgrst(400, "PGRST100", "failed to parse select parameter", f"unsupported select item {c!r}")
            select = sql.SQL(", ").join(column(c) for c in names)
        # filters
        where: list[sql.Composable] = []
        values: list[Any] = []
        for key, raw in req.params:
            if key in _RESERVED:
                continue
            op, _, value = raw.partition(".")
            col = column(key)
            if op in _OPS:
                where.append(sql.SQL("{} {} %s").format(col, sql.SQL(_OPS[op])))
                values.append(value)
            elif op == "is" and value in ("null", "true", "false"):
                where.append(sql.SQL("{} IS {}").format(col, sql.SQL(value.upper())))
            else:
                raise _pgrst(400, "PGRST100", "failed to parse filter", f"unexpected operator in {key}={raw}")
        where_sql = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL("")
        # order
        order_items: list[sql.Composable] = []
        for item in filter(None, params.get("order", "").split(",")):
            name, *mods = item.split(".")
            direction = "ASC"
            nulls = ""
            for mod in mods:
                if mod in ("asc", "desc"):
                    direction = mod.upper()
                elif mod in ("nullsfirst", "nullslast"):
                    nulls = " NULLS FIRST" if mod == "nullsfirst" else " NULLS LAST"
                else:
                    raise _pgrst(400, "PGRST100", "failed to parse order", f"unexpected order modifier {mod!r}")
            order_items.append(sql.SQL("{} {}{}").format(column(name), sql.SQL(direction), sql.SQL(nulls)))
        order_sql = sql.SQL(" ORDER BY ") + sql.SQL(", ").join(order_items) if order_items else sql.SQL("")
        # range: query parameters win over the Range header
        offset, limit = 0, None
        header_range = req.headers.get("range", "")
        if m := re.fullmatch(r"\s*(\d+)-(\d*)\s*", header_range):
            offset = int(m.group(1))
            limit = int(m.group(2)) - offset + 1 if m.group(2) else None
        if "offset" in params:
            offset = int(params["offset"])
        if "limit" in params:
            limit = int(params["limit"])
        limit = self.max_rows if limit is None else min(limit, self.max_rows)

        source = sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(table))
        total: int | None = None
        if "count=exact" in req.headers.get("prefer", ""):
            total = self._query_one(sql.SQL("SELECT count(*) FROM {}{}").format(source, where_sql), values)
            if total is not None and offset > 0 and offset >= total:
                details = f"An offset of {offset} was requested, but there are only {total} rows."
                raise _pgrst(416, "PGRST103", "Requested range not satisfiable", details, Content_Range=f"*/{total}")
        page = sql.SQL("SELECT {} FROM {}{}{} LIMIT {} OFFSET {}").format(
            select, source, where_sql, order_sql, sql.Literal(limit), sql.Literal(offset)
        )
        body_sql = sql.SQL("SELECT coalesce(json_agg(t), '[]'::json)::text, count(*) FROM ({}) t").format(page)
        with self._lock:
            row = self._conn.execute(body_sql, values).fetchone()
        assert row is not None
        body, n = row[0], int(row[1])
        if self.on_query is not None:
            self.on_query(req)
        span = f"{offset}-{offset + n - 1}" if n else "*"
        headers = {"Content-Range": f"{span}/{'*' if total is None else total}"}
        status = 206 if total is not None and n < total and n > 0 else 200
        return status, headers, body.encode()

    def _query(self, statement: Any, params: list[Any]) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(statement, params).fetchall()

    def _query_one(self, statement: Any, params: list[Any]) -> Any:
        rows = self._query(statement, params)
        return rows[0][0] if rows else None


class _Handler(BaseHTTPRequestHandler):
    owner: PostgrestStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)  # keep the connection usable; bodies are not served
        parts = urlsplit(self.path)
        req = RecordedRequest(
            method=method,
            path=parts.path,
            params=parse_qsl(parts.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in self.headers.items()},
        )
        try:
            status, headers, body = self.owner.handle(req)
        except Exception as exc:  # a bug or a database error: answer like PostgREST would
            status, headers = 500, {}
            body = json.dumps({"code": "XX000", "details": None, "hint": None, "message": str(exc)}).encode()
        req.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")
