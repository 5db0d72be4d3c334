"""Interaction sources. Each returns a polars LazyFrame in the canonical schema.

Column mapping happens here, once; every later step sees user_id, item_id,
timestamp (UTC) and, when present, rating.
"""

from __future__ import annotations

from datetime import datetime

from core.config import PipelineConfig
from core.data.sources.base import Source
from core.data.sources.file import FileSource
from core.data.sources.movielens import MovieLens100kSource
from core.secrets import SecretLoader


def make_source(
    config: PipelineConfig, *, since: datetime | None = None, secret_loader: SecretLoader | None = None
) -> Source:
    """The configured source, reading rows with time >= ``since`` (default: source.since).

    ``secret_loader`` reads Prefect Secret blocks (postgres ``dsn_secret_block``, supabase
    ``key_secret_block``); the task layer passes it, so importing this package stays Prefect-free.
    """
    kind = config.source.kind
    since = since or config.source.since
    if kind == "file":
        return FileSource(config.source, config.columns, since=since)
    if kind == "postgres":
        from core.data.sources.postgres import PostgresSource

        return PostgresSource(config.source, config.columns, since=since, secret_loader=secret_loader)
    if kind == "supabase":
        from core.data.sources.supabase import SupabaseSource

        return SupabaseSource(config.source, config.columns, since=since, secret_loader=secret_loader)
    if kind == "synthetic":
        from core.data.sources.synthetic import SyntheticSource

        return SyntheticSource(config.source, since=since)
    return MovieLens100kSource(since=since, until=config.source.until)


__all__ = ["FileSource", "MovieLens100kSource", "Source", "make_source"]
