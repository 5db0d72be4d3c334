"""CSV or Parquet files, scanned lazily with polars."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import polars as pl

from core.config import QUESTION_ATTEMPTS_COLUMNS, ColumnsConfig, SourceConfig
from core.data.sources.base import canonicalise_columns, in_window
from core.errors import DataSourceError

_PARQUET_MAGIC = b"PAR1"


class FileSource:
    def __init__(self, source: SourceConfig, columns: ColumnsConfig, *, since: datetime | None = None) -> None:
        if source.path is None:
            raise DataSourceError("the file source needs a path (--data PATH)")
        self.path = Path(source.path)
        self.source = source
        self.columns = columns
        self.name = f"file:{self.path.name}"
        self.since = since

    def _format(self) -> str:
        if self.source.format != "auto":
            return self.source.format
        with self.path.open("rb") as fh:
            head = fh.read(4)
        if head == _PARQUET_MAGIC:
            return "parquet"
        if self.path.suffix.lower() in {".parquet", ".pq"}:
            raise DataSourceError(f"{self.path} is named .parquet but is not a Parquet file")
        return "csv"

    def scan(self) -> pl.LazyFrame:
        if not self.path.exists():
            raise DataSourceError(f"data file not found: {self.path}")
        if not self.path.is_file():
            raise DataSourceError(f"data path is not a file: {self.path}")
        if self.path.stat().st_size == 0:
            raise DataSourceError(f"data file is empty: {self.path}")
        fmt = self._format()
        try:
            if fmt == "parquet":
                frame = pl.scan_parquet(self.path)
            else:
                _check_text(self.path)
                # Ids stay text as written: "007" and "7" are different learners.
                ids = {self.columns.user: pl.String, self.columns.item: pl.String}
                frame = pl.scan_csv(
                    self.path, separator=self.source.separator, infer_schema_length=10_000, schema_overrides=ids
                )
            schema = frame.collect_schema()
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise DataSourceError(f"cannot read {self.path} as {fmt.upper()}: {_first_line(exc)}") from None
        if fmt == "csv" and len(schema) == 1 and self.source.separator not in {"\t", ";", "|"}:
            only = schema.names()[0]
            for sep in ("\t", ";", "|"):
                if sep in only:
                    raise DataSourceError(
                        f"{self.path}: found one column {only[:60]!r}; the file looks {sep!r}-separated "
                        f"(use --separator, or source.separator in the config)"
                    )
        canonical = canonicalise_columns(frame, _with_question_attempt_extras(self.columns, schema), origin=str(self.path))
        return in_window(canonical, self.since, self.source.until)


def _with_question_attempt_extras(columns: ColumnsConfig, schema: pl.Schema) -> ColumnsConfig:
    """A file with all of question_attempts' extra columns keeps them, so validation (suite
    ``auto``) applies the question_attempts rules to them, as for a database source.

    Only when no ``columns.extra`` was given (an explicit list wins) and none of those
    columns is already mapped to user/item/time/rating.
    """
    extras = list(QUESTION_ATTEMPTS_COLUMNS["extra"])
    if columns.extra or not set(extras) <= set(schema.names()):
        return columns
    if set(extras) & {columns.user, columns.item, columns.time, columns.rating}:
        return columns
    return columns.model_copy(update={"extra": extras})


def _check_text(path: Path) -> None:
    with path.open("rb") as fh:
        head = fh.read(4096)
    if b"\x00" in head:
        raise DataSourceError(f"{path} is neither CSV nor Parquet (binary content)")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut at the 4096-byte boundary is fine.
        if exc.start < len(head) - 4:
            raise DataSourceError(f"{path} is not UTF-8 text, so not a CSV file") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
