"""A throwaway PostgreSQL 15 cluster for tests, plus a filler for ``question_attempts``.

``PgCluster`` runs initdb and pg_ctl from ``/usr/lib/postgresql/15/bin`` (Debian's
``postgresql-15`` package) in a fresh temporary directory, listening on 127.0.0.1 at a free
port with its unix socket inside that directory. initdb refuses to run as root, so when the
tests run as root the server binaries run as the ``postgres`` user (``runuser``) and the
directory is handed to that user.

Authentication is real: the superuser ``postgres`` is trusted from 127.0.0.1 (the test
harness uses it to create tables), while the read-only role ``recflow_reader`` must give
its password (scram-sha-256). ``PgCluster.dsn`` is that role's URI, so the sources under
test go through the password path, and a wrong password is really rejected by the server.

The cluster's time zone is Asia/Kolkata (+05:30), not UTC, so that "timestamptz comes
back as UTC" is tested rather than assumed.

    with PgCluster() as pg:
        fill_question_attempts(pg, 500)
        os.environ["RECFLOW_PG_DSN"] = pg.dsn
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import polars as pl

from core.records import ITEM, TIME, USER

# RECFLOW_PG_BIN points elsewhere (another install or version) when needed.
PG_BIN = Path(os.environ.get("RECFLOW_PG_BIN", "/usr/lib/postgresql/15/bin"))
SERVER_USER = "postgres"
READER = "recflow_reader"
# Characters that must be percent-encoded in a URI: the source must cope, and scrub them all.
READER_PASSWORD = "R3c/fl@w:pa ss%w0rd#x"
SERVER_TIMEZONE = "Asia/Kolkata"


class PgClusterError(RuntimeError):
    pass


def missing_binaries(bin_dir: Path = PG_BIN) -> str | None:
    """A message naming what is missing, or None when the server binaries are installed."""
    needed = [bin_dir / name for name in ("initdb", "pg_ctl", "postgres")]
    absent = [str(p) for p in needed if not p.exists()]
    if absent:
        return (
            f"PostgreSQL 15 server binaries not found ({', '.join(absent)}); "
            "install them with `apt-get install -y postgresql-15` (CI must do this)"
        )
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """One initdb'd cluster in a temporary directory. Use as a context manager or call
    ``stop()``; the server is always stopped (immediate mode) and the directory removed."""

    def __init__(self, bin_dir: Path = PG_BIN) -> None:
        problem = missing_binaries(bin_dir)
        if problem:
            raise PgClusterError(problem)
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="recflow-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log = self.root / "server.log"
        self.port = 0
        self._running = False
        self._as_other_user = os.geteuid() == 0
        atexit.register(self.stop)
        try:
            self._init()
            self._start()
            self._bootstrap()
        except BaseException:
            self.stop()
            raise

    # -- lifecycle ---------------------------------------------------------------------------

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self._as_other_user:
            cmd = ["runuser", "-u", SERVER_USER, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if proc.returncode != 0:
            raise PgClusterError(
                f"{Path(args[0]).name} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
                + self._log_tail()
            )
        return proc

    def _log_tail(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()[-15:]
        except OSError:
            return ""
        return "\nserver log:\n" + "\n".join(lines) if lines else ""

    def _init(self) -> None:
        self.socket_dir.mkdir()
        if self._as_other_user:
            shutil.chown(self.root, SERVER_USER)
            shutil.chown(self.socket_dir, SERVER_USER)
        self._run(
            str(self.bin_dir / "initdb"),
            "-D", str(self.data),
            "-U", "postgres",
            "-E", "UTF8",
            "--locale=C.UTF-8",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--no-sync",
        )  # fmt: skip
        # First match wins: the reader must authenticate, the harness's superuser is trusted.
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            f"host all {READER} 127.0.0.1/32 scram-sha-256\n"
            "host all postgres 127.0.0.1/32 trust\n"
        )
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# recflow test cluster\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "shared_buffers = 16MB\nmax_connections = 30\n"
                f"timezone = '{SERVER_TIMEZONE}'\nlog_min_messages = warning\n"
            )

    def _start(self) -> None:
        last: Exception | None = None
        for _ in range(3):  # the free port may be taken between probing and binding
            self.port = _free_port()
            opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.socket_dir}"
            try:
                self._run(
                    str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                    "-w", "-t", "60", "-o", opts, "start",
                )  # fmt: skip
            except PgClusterError as exc:
                last = exc
                continue
            self._running = True
            return
        raise PgClusterError(f"the test PostgreSQL server did not start: {last}")

    def _bootstrap(self) -> None:
        from psycopg import sql

        # Utility statements take no bind parameters: quote the literal client-side.
        create = sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}")
        self.execute(create.format(sql.Identifier(READER), sql.Literal(READER_PASSWORD)))
        self.execute(f"GRANT USAGE ON SCHEMA public TO {READER}")
        self.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO {READER}")

    def stop(self) -> None:
        if self._running:
            self._running = False
            try:
                self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except (PgClusterError, subprocess.TimeoutExpired):
                self._kill_postmaster()
        shutil.rmtree(self.root, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().splitlines()[0])
            os.kill(pid, 9)
        except (OSError, ValueError, IndexError):
            pass

    def __enter__(self) -> PgCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- access ------------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """URI of the read-only, password-authenticated role (what a user puts in RECFLOW_PG_DSN)."""
        return self.dsn_for(READER_PASSWORD)

    def dsn_for(self, password: str) -> str:
        return f"postgresql://{READER}:{quote(password, safe='')}@127.0.0.1:{self.port}/postgres"

    @property
    def admin_dsn(self) -> str:
        """Superuser URI (trusted): for the harness, never for the code under test."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def password(self) -> str:
        return READER_PASSWORD

    def connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.admin_dsn, autocommit=True, connect_timeout=10)

    def execute(self, statement: Any, params: Any = None) -> list[tuple[Any, ...]]:
        """Run one statement (str or psycopg.sql.Composable) as the superuser; its rows, if any."""
        with self.connect() as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else []


# -- question_attempts --------------------------------------------------------------------------

TOPICS = {
    "algebra": ["linear equations", "quadratics", None],
    "geometry": ["triangles", "circles"],
    "statistics": ["probability", "distributions", None],
}
BASE_TIME = datetime(2024, 3, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Attempt:
    user_id: str
    question_id: str
    created_at: datetime  # UTC, microsecond precision
    is_correct: bool
    response_time_seconds: float
    difficulty_level: int
    topic: str
    subtopic: str | None


def make_attempts(n: int, *, seed: int = 0, uuid_questions: bool = True, start: datetime = BASE_TIME) -> list[Attempt]:
    """``n`` attempts in strictly increasing time order (one every 37 s plus microseconds).

    They pass the question_attempts quality suite (is_correct never null, difficulty 1..5,
    response times >= 0); some subtopics are null."""
    rng = random.Random(seed)
    users = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(max(2, n // 12))]
    if uuid_questions:
        questions = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(max(2, n // 8))]
    else:
        questions = [f"Q-{i:04d}" for i in range(max(2, n // 8))]
    rows = []
    for i in range(n):
        topic = rng.choice(sorted(TOPICS))
        rows.append(
            Attempt(
                user_id=rng.choice(users),
                question_id=rng.choice(questions),
                created_at=start + timedelta(seconds=37 * i, microseconds=rng.randrange(1_000_000)),
                is_correct=rng.random() < 0.6,
                # Multiples of 1/4 are exact in float32 (Postgres real), so equality is exact.
                response_time_seconds=rng.randrange(4, 480) / 4,
                difficulty_level=rng.randint(1, 5),
                topic=topic,
                subtopic=rng.choice(TOPICS[topic]),
            )
        )
    return rows


def create_question_attempts(pg: PgCluster, table: str = "question_attempts", *, uuid_questions: bool = True) -> None:
    """The ed-tech schema: uuid learners, uuid-or-text questions, timestamptz, boolean, ..."""
    qtype = "uuid" if uuid_questions else "text"
    pg.execute(f'DROP TABLE IF EXISTS "{table}"')
    pg.execute(
        f'CREATE TABLE "{table}" ('
        "  id bigserial PRIMARY KEY,"
        "  user_id uuid NOT NULL,"
        f"  question_id {qtype} NOT NULL,"
        "  created_at timestamptz NOT NULL,"
        "  is_correct boolean,"
        "  response_time_seconds real,"
        "  difficulty_level smallint,"
        "  topic text,"
        "  subtopic text)"
    )


def insert_attempts(pg: PgCluster, rows: list[Attempt], table: str = "question_attempts") -> None:
    cols = (
        "user_id", "question_id", "created_at", "is_correct",
        "response_time_seconds", "difficulty_level", "topic", "subtopic",
    )  # fmt: skip
    with pg.connect() as conn, conn.cursor() as cur, \
            cur.copy(f'COPY "{table}" ({", ".join(cols)}) FROM STDIN') as copy:
            for r in rows:
                copy.write_row([getattr(r, c) for c in cols])


def fill_question_attempts(
    pg: PgCluster,
    n: int,
    *,
    table: str = "question_attempts",
    seed: int = 0,
    uuid_questions: bool = True,
) -> list[Attempt]:
    """(Re)create ``table`` and fill it with ``n`` deterministic attempts; returns them."""
    rows = make_attempts(n, seed=seed, uuid_questions=uuid_questions)
    create_question_attempts(pg, table, uuid_questions=uuid_questions)
    insert_attempts(pg, rows, table)
    return rows


# -- what a source should return ----------------------------------------------------------

EXTRA = ["is_correct", "response_time_seconds", "difficulty_level", "topic", "subtopic"]
QA_COLUMNS = {
    "columns.user": "user_id",
    "columns.item": "question_id",
    "columns.time": "created_at",
    "columns.extra": EXTRA,
}


def expected_frame(
    rows: list[Attempt], *, real: type[pl.DataType] = pl.Float32, small: type[pl.DataType] = pl.Int16
) -> pl.DataFrame:
    """What a source should return for ``rows`` mapped with QA_COLUMNS, in time order."""
    return pl.DataFrame(
        {
            USER: [r.user_id for r in rows],
            ITEM: [r.question_id for r in rows],
            TIME: [r.created_at for r in rows],
            "is_correct": [r.is_correct for r in rows],
            "response_time_seconds": [r.response_time_seconds for r in rows],
            "difficulty_level": [r.difficulty_level for r in rows],
            "topic": [r.topic for r in rows],
            "subtopic": [r.subtopic for r in rows],
        },
        schema={
            USER: pl.String,
            ITEM: pl.String,
            TIME: pl.Datetime("us", "UTC"),
            "is_correct": pl.Boolean,
            "response_time_seconds": real,
            "difficulty_level": small,
            "topic": pl.String,
            "subtopic": pl.String,
        },
    )
