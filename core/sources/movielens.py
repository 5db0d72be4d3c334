"""MovieLens-100k, read from the copy inside RecBole's wheel (no download)."""

from __future__ import annotations

import polars as pl

from core.recbole_compat import ml100k_inter_path
from core.sources.base import canonicalise


class MovieLens100kSource:
    name = "ml-100k"

    def scan(self) -> pl.LazyFrame:
        frame = pl.scan_csv(
            ml100k_inter_path(),
            separator="\t",
            new_columns=["user", "item", "rating", "timestamp"],
            schema_overrides={"user": pl.String, "item": pl.String, "rating": pl.Float32, "timestamp": pl.Int64},
        )
        return canonicalise(frame, user="user", item="item", time="timestamp", rating="rating", origin="ml-100k")
