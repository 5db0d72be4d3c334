"""MovieLens-100k, read from the copy inside RecBole's wheel (no download, no RecBole import)."""

from __future__ import annotations

import importlib.util
from datetime import datetime
from pathlib import Path

import polars as pl

from core.data.sources.base import canonicalise, in_window
from core.errors import ConfigError


def ml100k_inter_path() -> Path:
    """The MovieLens-100k interactions shipped inside RecBole's wheel.

    Located with ``importlib.util.find_spec``: RecBole (and torch) are not imported.
    """
    spec = importlib.util.find_spec("recbole")
    origin = spec.origin if spec is not None else None
    if origin is None:
        raise ConfigError("the ml-100k source needs RecBole's wheel, which is not installed; reinstall recbole==1.2.1")
    path = Path(origin).parent / "dataset_example" / "ml-100k" / "ml-100k.inter"
    if not path.is_file():
        raise ConfigError(f"RecBole's bundled ml-100k is missing at {path}; reinstall recbole==1.2.1")
    return path


class MovieLens100kSource:
    name = "ml-100k"

    def __init__(self, *, since: datetime | None = None, until: datetime | None = None) -> None:
        self.since, self.until = since, until

    def scan(self) -> pl.LazyFrame:
        frame = pl.scan_csv(
            ml100k_inter_path(),
            separator="\t",
            new_columns=["user", "item", "rating", "timestamp"],
            schema_overrides={"user": pl.String, "item": pl.String, "rating": pl.Float32, "timestamp": pl.Int64},
        )
        canonical = canonicalise(frame, user="user", item="item", time="timestamp", rating="rating", origin="ml-100k")
        return in_window(canonical, self.since, self.until)
