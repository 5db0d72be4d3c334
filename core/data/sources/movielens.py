"""MovieLens-100k, read from the copy inside RecBole's wheel (no download)."""

from __future__ import annotations

from datetime import datetime

import polars as pl

from core.modeling.recbole_compat import ml100k_inter_path
from core.data.sources.base import canonicalise, in_window


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
