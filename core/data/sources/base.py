"""The source protocol and the column/timestamp normalisation every source shares."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol

import polars as pl

from core.config import ColumnsConfig
from core.errors import DataSourceError
from core.records import ITEM, RATING, TIME, USER


class Source(Protocol):
    name: str

    def scan(self) -> pl.LazyFrame:
        """Interactions in the canonical schema (see ``canonicalise``)."""
        ...


def canonicalise(
    frame: pl.LazyFrame,
    *,
    user: str,
    item: str,
    time: str,
    rating: str | None,
    origin: str,
    extra: list[str] | tuple[str, ...] = (),
) -> pl.LazyFrame:
    """Select and rename the mapped columns; ids become strings, time becomes UTC datetime.

    ``extra`` columns (e.g. is_correct, difficulty_level) are kept under their own names.
    """
    present = frame.collect_schema()
    wanted = {"user": user, "item": item, "time": time}
    if rating is not None:
        wanted["rating"] = rating
    missing = [f"--{k}-col {v!r}" for k, v in wanted.items() if v not in present]
    missing += [f"extra column {c!r}" for c in extra if c not in present]
    if missing:
        cols = ", ".join(present.names()[:20])
        raise DataSourceError(f"{origin}: column(s) not found: {', '.join(missing)}; the source has: {cols}")
    exprs = [
        pl.col(user).cast(pl.String).alias(USER),
        pl.col(item).cast(pl.String).alias(ITEM),
        _to_utc(pl.col(time), present[time]).alias(TIME),
    ]
    if rating is not None:
        exprs.append(pl.col(rating).cast(pl.Float32, strict=False).alias(RATING))
    exprs += [pl.col(c) for c in extra if c not in (USER, ITEM, TIME, RATING)]
    return frame.select(exprs)


def canonicalise_columns(frame: pl.LazyFrame, columns: ColumnsConfig, *, origin: str) -> pl.LazyFrame:
    """``canonicalise`` with the configured column mapping."""
    return canonicalise(
        frame,
        user=columns.user,
        item=columns.item,
        time=columns.time,
        rating=columns.rating,
        extra=columns.extra,
        origin=origin,
    )


def in_window(frame: pl.LazyFrame, since: datetime | None, until: datetime | None) -> pl.LazyFrame:
    """Rows with since <= timestamp < until (naive datetimes mean UTC)."""
    if since is not None:
        frame = frame.filter(pl.col(TIME) >= _aware(since))
    if until is not None:
        frame = frame.filter(pl.col(TIME) < _aware(until))
    return frame


def _aware(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _to_utc(col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """Epoch seconds (int/float), ISO strings (tz-aware or naive=UTC) or datetimes -> UTC datetime."""
    if dtype.is_numeric():
        return pl.from_epoch((col.cast(pl.Float64) * 1_000_000).cast(pl.Int64), time_unit="us").dt.replace_time_zone(
            "UTC"
        )
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is None:
            return col.dt.replace_time_zone("UTC").dt.cast_time_unit("us")
        return col.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
    if isinstance(dtype, pl.Date):
        return col.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    # Strings: per-row parsing so a column may mix offsets ("+02:00", "Z", "+0200") and naive
    # values (naive means UTC). Unparseable values become null; validation names them.
    # Normalising first (one "T" separator, "+hh:mm" offsets) keeps the formats tried per row
    # to five: polars evaluates every one of them on every row.
    text = (
        col.cast(pl.String)
        .str.strip_chars()
        .str.replace(r"^(\d{4}-\d{2}-\d{2}) ", "${1}T")
        .str.replace(r"[Zz]$", "+00:00")
        .str.replace(r"([+-]\d{2})(\d{2})$", "${1}:${2}")
    )
    parsed = [text.str.to_datetime(f, time_zone="UTC", strict=False, time_unit="us") for f in _AWARE]
    parsed += [text.str.to_datetime(f, strict=False, time_unit="us").dt.replace_time_zone("UTC") for f in _NAIVE]
    numeric = text.cast(pl.Float64, strict=False)
    parsed.append(pl.from_epoch((numeric * 1_000_000).cast(pl.Int64), time_unit="us").dt.replace_time_zone("UTC"))
    return pl.coalesce(parsed)


_AWARE = ("%Y-%m-%dT%H:%M:%S%.f%:z", "%Y-%m-%dT%H:%M%:z")
_NAIVE = ("%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d")


__all__ = ["ITEM", "RATING", "TIME", "USER", "Source", "canonicalise", "canonicalise_columns", "in_window"]
