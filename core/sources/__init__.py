"""Interaction sources. Each returns a polars LazyFrame in the canonical schema.

Column mapping happens here, once; every later step sees user_id, item_id,
timestamp (UTC) and, when present, rating.
"""

from __future__ import annotations

from core.config import PipelineConfig
from core.sources.base import Source
from core.sources.file import FileSource
from core.sources.movielens import MovieLens100kSource


def make_source(config: PipelineConfig) -> Source:
    if config.source.kind == "file":
        return FileSource(config.source, config.columns)
    return MovieLens100kSource()


__all__ = ["FileSource", "MovieLens100kSource", "Source", "make_source"]
