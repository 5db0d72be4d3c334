"""From the serving log and what learners did next to per-learner sums.

Inputs (the serving log contract, written by ``recflow serve``):

- requests: ``<log dir>/requests/*.parquet``, one row per response (one more per shadow arm);
- events: ``<log dir>/events/*.parquet`` (``POST /events``: attempt/correct rows), optional;
- attempts: question_attempts rows from a file or a source, pseudonymised as the extract does.

An outcome is ``(session, item, time, correct)``. A recommended item is *attempted* when the same
learner attempts it within ``window`` after the request; its *correctness* is that of the first
graded attempt in the window. Shadow rows (scored, never shown) and requests without a session
or an arm are not outcomes of any arm.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import BaseModel

from core.config import PipelineConfig
from core.errors import DataSourceError, OutcomeLogError
from core.online.settings import EVENTS_DIR, LEARNERS_FILE, REQUESTS_DIR, ABReportSettings
from core.records import ITEM, TIME, USER
from core.serving.outcome_log import SPOOL_SUFFIX, read_spool

UNASSIGNED = "unassigned"
CORRECT = "is_correct"  # question_attempts' correctness column
OUTCOME_SCHEMA = pl.Schema({"session": pl.String, "item": pl.String, "time": pl.Datetime("us", "UTC"),
                            "correct": pl.Boolean})
REQUEST_COLUMNS = ("request_id", "ts", "experiment", "arm", "shadow", "entry", "version", "session",
                   "n_items", "n_unknown", "rec_items")


def _read_dir(folder: Path, what: str) -> pl.DataFrame | None:
    """Every ``*.parquet`` in ``folder`` as one frame; None when there is none.

    Spools (JSON lines the server's converter has not turned into Parquet yet) are read too.
    """
    if not folder.is_dir():
        return None
    try:
        # Spools first: one converted meanwhile is then in the Parquet listing (a reader may see a row
        # twice, never miss one; the callers keep each row once).
        frames = []
        for spool in sorted(folder.glob(f"*{SPOOL_SUFFIX}")):
            with contextlib.suppress(FileNotFoundError):
                frames.append(pl.from_arrow(read_spool(spool, folder.name)))
        frames += [pl.read_parquet(f) for f in sorted(folder.glob("*.parquet"))]
        if not frames:
            return None
        return pl.concat(frames, how="diagonal_relaxed")
    except (pl.exceptions.PolarsError, OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OutcomeLogError(f"cannot read the {what} under {folder}: {first}") from None


def read_requests(log_dir: Path) -> pl.DataFrame:
    """The request log; ``OutcomeLogError`` naming the problem when it is missing, empty or malformed."""
    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        raise OutcomeLogError(f"no log folder {log_dir} (pass --log-dir: the folder `recflow serve` logs into)")
    frame = _read_dir(log_dir / REQUESTS_DIR, "request log")
    if frame is None:
        raise OutcomeLogError(f"no request log in {log_dir}: expected Parquet files under {log_dir / REQUESTS_DIR}")
    if frame.height == 0:
        raise OutcomeLogError(f"the request log in {log_dir / REQUESTS_DIR} has no rows yet")
    missing = [c for c in REQUEST_COLUMNS if c not in frame.columns]
    if missing:
        raise OutcomeLogError(f"the request log in {log_dir / REQUESTS_DIR} lacks column(s) {', '.join(missing)}")
    # A crash during the writer's compaction can leave rows twice; a shadow row shares its request's id.
    return frame.unique(["request_id", "arm", "shadow"], keep="first", maintain_order=True)


def read_events(log_dir: Path) -> pl.DataFrame:
    """Outcomes from ``POST /events`` ("attempt" rows, and "correct" rows whose value > 0 means right)."""
    frame = _read_dir(Path(log_dir) / EVENTS_DIR, "event log")
    if frame is None or frame.height == 0:
        return pl.DataFrame(schema=OUTCOME_SCHEMA)
    missing = [c for c in ("session", "item", "ts", "kind") if c not in frame.columns]
    if missing:
        raise OutcomeLogError(f"the event log in {Path(log_dir) / EVENTS_DIR} lacks column(s) {', '.join(missing)}")
    value = pl.col("value") if "value" in frame.columns else pl.lit(1.0)
    if "event_id" in frame.columns:  # compaction may leave an event twice
        frame = frame.unique("event_id", keep="first", maintain_order=True)
    return frame.filter(pl.col("kind").is_in(["attempt", "correct"])).select(
        pl.col("session").cast(pl.String),
        pl.col("item").cast(pl.String),
        pl.col("ts").cast(pl.Datetime("us", "UTC")).alias("time"),
        pl.when(pl.col("kind") == "correct").then(value.cast(pl.Float64) > 0).otherwise(None).alias("correct"),
    ).drop_nulls(["session", "item", "time"])


def attempts_outcomes(frame: pl.DataFrame) -> pl.DataFrame:
    """Canonical attempts (``user_id`` already pseudonymised, ``item_id``, ``timestamp``, optional
    ``is_correct``) as outcomes."""
    correct = pl.col(CORRECT).cast(pl.Boolean) if CORRECT in frame.columns else pl.lit(None, pl.Boolean)
    return frame.select(
        pl.col(USER).cast(pl.String).alias("session"),
        pl.col(ITEM).cast(pl.String).alias("item"),
        pl.col(TIME).cast(pl.Datetime("us", "UTC")).alias("time"),
        correct.alias("correct"),
    ).drop_nulls(["session", "item", "time"])


def read_attempts(config: PipelineConfig, *, secret_loader: Callable[[str], Any] | None = None) -> pl.DataFrame:
    """question_attempts from the configured source, learner ids pseudonymised exactly as the extract does.

    Args:
        config: the source, its columns and ``privacy`` (pseudonymise or not, and the key).
        secret_loader: reads Prefect Secret blocks (passed by the task).

    Returns:
        The outcomes frame.
    """
    from core.data.privacy import pseudonymize_ids, resolve_key
    from core.data.sources import make_source

    key = resolve_key(config.privacy, secret_loader=secret_loader, source=config.source.kind) \
        if config.pseudonymize else None
    source = make_source(config, secret_loader=secret_loader)
    if not config.columns.extra:
        # Correctness needs only is_correct: keep it whenever the source has it (the source keeps
        # the question_attempts extras on its own only when all five are there).
        with_correct = config.model_copy(update={"columns": config.columns.model_copy(update={"extra": [CORRECT]})})
        candidate = make_source(with_correct, secret_loader=secret_loader)
        try:
            lazy = candidate.scan()
            source = candidate
        except DataSourceError as exc:
            if CORRECT not in str(exc):
                raise
            lazy = source.scan()
    else:
        lazy = source.scan()
    try:
        frame = lazy.collect()
    except pl.exceptions.PolarsError as exc:
        raise OutcomeLogError(f"cannot read attempts from {source.name}: {str(exc).strip().splitlines()[0]}") from None
    if key is not None:  # raw learner ids exist only in memory, only until here
        frame = pseudonymize_ids(frame, key, column=USER)
    return attempts_outcomes(frame)


def select_experiment(requests: pl.DataFrame, experiment: str | None) -> tuple[pl.DataFrame, str | None]:
    """The rows of one experiment: ``experiment``, else the only one the log holds (None: no experiment)."""
    ids = sorted(x for x in requests["experiment"].unique().to_list() if x is not None)
    if experiment is None:
        if len(ids) > 1:
            raise OutcomeLogError(f"the log holds {len(ids)} experiments ({', '.join(ids)}); pass --experiment ID")
        experiment = ids[0] if ids else None
    elif experiment not in ids:
        raise OutcomeLogError(f"experiment {experiment!r} is not in the log (experiments: {', '.join(ids) or 'none'})")
    rows = requests.filter(pl.col("experiment") == experiment) if experiment is not None else requests
    return rows, experiment


def served_requests(requests: pl.DataFrame) -> pl.DataFrame:
    """Rows whose list a learner saw: not shadow, with a session and an assigned arm."""
    return requests.filter(~pl.col("shadow").fill_null(False) & pl.col("session").is_not_null()
                           & pl.col("arm").is_not_null() & (pl.col("arm") != UNASSIGNED))


def join_outcomes(requests: pl.DataFrame, outcomes: pl.DataFrame, window: timedelta) -> pl.DataFrame:
    """One row per served request: how many recommended items were attempted / graded / correct in the window.

    Args:
        requests: the request log (any rows; shadow and unassigned ones are dropped here).
        outcomes: ``OUTCOME_SCHEMA`` rows (attempts and events together).
        window: how long after the request an attempt counts.

    Returns:
        ``request_id, session, arm, ts, attempted, graded, correct, hit``.
    """
    served = served_requests(requests).select("request_id", "session", "arm", "ts", "rec_items")
    recs = (served.explode("rec_items").rename({"rec_items": "item"}).drop_nulls("item")
            .unique(["request_id", "item"]))
    hits = (
        recs.join(outcomes.select("session", "item", "time", "correct"), on=["session", "item"], how="inner")
        .filter((pl.col("time") >= pl.col("ts")) & (pl.col("time") <= pl.col("ts") + window))
        .sort("time")
        .group_by(["request_id", "item"])
        .agg(pl.col("correct").drop_nulls().first())
        .group_by("request_id")
        .agg(attempted=pl.len(), graded=pl.col("correct").is_not_null().sum(),
             correct=pl.col("correct").fill_null(False).sum())
    )
    return (
        served.drop("rec_items").join(hits, on="request_id", how="left")
        .with_columns(pl.col("attempted", "graded", "correct").fill_null(0).cast(pl.Int64))
        .with_columns(hit=pl.col("attempted") > 0)
    )


def per_learner(joined: pl.DataFrame) -> pl.DataFrame:
    """Sums per (arm, learner): ``requests, hits, attempted, graded, correct`` (the unit of the statistics)."""
    return joined.group_by(["arm", "session"]).agg(
        requests=pl.len(), hits=pl.col("hit").sum().cast(pl.Int64), attempted=pl.col("attempted").sum(),
        graded=pl.col("graded").sum(), correct=pl.col("correct").sum(), first_ts=pl.col("ts").min(),
    ).sort(["arm", "session"])


class OutcomeSummary(BaseModel):
    """What ``collect`` read and joined; the per-learner sums are in ``learners_path``."""

    experiment: str | None
    learners_path: Path
    log_rows: int
    served_rows: int
    shadow_rows: int
    unassigned_rows: int
    outcome_rows: dict[str, int]
    matched_learners: int = 0  # served learners with at least one outcome (any item, any time)


def collect(settings: ABReportSettings, *, secret_loader: Callable[[str], Any] | None = None) -> OutcomeSummary:
    """Read the log and the outcomes, join them in the window, write per-learner sums to the report folder.

    Args:
        settings: the report's settings.
        secret_loader: reads Prefect Secret blocks (pseudonymisation key, database secrets).

    Returns:
        Counts and the path of the per-learner table.
    """

    requests, experiment = select_experiment(read_requests(settings.log_dir), settings.experiment)
    events = read_events(settings.log_dir)
    attempts = read_attempts(settings.attempts, secret_loader=secret_loader) if settings.attempts is not None \
        else pl.DataFrame(schema=OUTCOME_SCHEMA)
    if events.height == 0 and attempts.height == 0:
        raise OutcomeLogError("no outcomes to join: pass --attempts (question_attempts) or log events via POST /events")
    outcomes = pl.concat([attempts.cast(dict(OUTCOME_SCHEMA)), events.cast(dict(OUTCOME_SCHEMA))])
    learners = per_learner(join_outcomes(requests, outcomes, timedelta(hours=settings.window_hours)))
    if learners.height == 0:
        raise OutcomeLogError("the log has no served request with a session and an arm: nothing to compare")
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    path = settings.out_dir / LEARNERS_FILE
    learners.write_parquet(path)
    shadow = requests["shadow"].fill_null(False)
    return OutcomeSummary(
        experiment=experiment, learners_path=path, log_rows=requests.height,
        served_rows=served_requests(requests).height, shadow_rows=int(shadow.sum()),
        unassigned_rows=requests.filter(~shadow & ((pl.col("arm") == UNASSIGNED) | pl.col("arm").is_null()
                                                   | pl.col("session").is_null())).height,
        outcome_rows={"attempts": attempts.height, "events": events.height},
        matched_learners=learners.join(outcomes.select("session").unique(), on="session", how="semi")
        ["session"].n_unique(),
    )
