"""Pseudonymisation of learner ids: a keyed HMAC-SHA256, applied at extract before anything is written.

A pseudonym is ``hex(HMAC-SHA256(key, raw_id as UTF-8))[:32]`` (128 bits). With the same key a
learner gets the same pseudonym on every run, so incremental snapshots and models line up; without
the key the raw id cannot be recovered or confirmed by guessing. The key is the UTF-8 bytes of the
configured value exactly as written (a hex string is *not* hex-decoded), so anyone holding the key
can reproduce a pseudonym, e.g. ``printf %s "$ID" | openssl dgst -sha256 -hmac "$KEY"`` (first 32
hex characters), or ``pseudonym(key, raw_id)`` here.

This module does not import Prefect: the Prefect task passes a ``secret_loader`` that reads a
Prefect Secret block.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any, TypeVar

import polars as pl

from core.config import PrivacyConfig
from core.errors import ConfigError
from core.secrets import env_or_block

PSEUDONYM_HEX_CHARS = 32
MIN_KEY_BYTES = 16

FrameT = TypeVar("FrameT", pl.DataFrame, pl.LazyFrame)


def resolve_key(
    privacy: PrivacyConfig,
    *,
    secret_loader: Callable[[str], Any] | None = None,
    source: str | None = None,
) -> bytes:
    """The HMAC key: env var ``privacy.key_env`` first, else ``secret_loader(privacy.secret_block)``.

    ``source`` (e.g. "postgres") only makes the error message more specific. A missing, empty or
    short (< 16 bytes) key raises ``ConfigError``; no message ever contains the key.
    """
    env = privacy.key_env
    value, origin = env_or_block(env, privacy.secret_block, secret_loader, what="the pseudonymisation key",
                                 block_field="privacy.secret_block", error=ConfigError)
    if not value:
        where = f" for source {source!r}" if source else ""
        also = f" ({origin} is empty)" if privacy.secret_block else ""
        raise ConfigError(
            f"learner ids must be pseudonymised{where}: set {env} (32+ random bytes, e.g. "
            f"`openssl rand -hex 32`) or privacy.secret_block{also}"
        )
    key = value.encode("utf-8")
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"the pseudonymisation key in {origin} is too short to be safe (under {MIN_KEY_BYTES} bytes); "
            f"use 32+ random bytes, e.g. `openssl rand -hex 32`"
        )
    return key


def pseudonym(key: bytes | str, raw_id: str) -> str:
    """The pseudonym of one learner id (what ``pseudonymize_ids`` writes for it)."""
    k = key.encode("utf-8") if isinstance(key, str) else key
    return hmac.new(k, str(raw_id).encode("utf-8"), hashlib.sha256).hexdigest()[:PSEUDONYM_HEX_CHARS]


def pseudonymize_ids(frame: FrameT, key: bytes, column: str = "user_id") -> FrameT:
    """Replace ``column`` by its pseudonyms; eager in, eager out; lazy in, lazy out (still one pass).

    Each distinct id is hashed once (in Python's hmac) and mapped back onto the rows; nulls stay
    null; non-string ids are hashed as their string form. Row order and other columns are kept.
    """
    if not key:
        raise ConfigError("the pseudonymisation key is empty")
    schema = frame.collect_schema() if isinstance(frame, pl.LazyFrame) else frame.schema
    if column not in schema:
        raise ConfigError(f"cannot pseudonymise column {column!r}: not in the data (columns: {', '.join(schema)})")
    keyed = hmac.new(key, digestmod=hashlib.sha256)

    def hash_batch(ids: pl.Series) -> pl.Series:
        ids = ids.cast(pl.String)
        distinct = ids.unique().drop_nulls()
        hashed = []
        for raw in distinct.to_list():
            h = keyed.copy()
            h.update(raw.encode("utf-8"))
            hashed.append(h.hexdigest()[:PSEUDONYM_HEX_CHARS])
        return ids.replace_strict(distinct, pl.Series(hashed, dtype=pl.String), return_dtype=pl.String)

    expr = pl.col(column).map_batches(hash_batch, return_dtype=pl.String, is_elementwise=False).alias(column)
    return frame.with_columns(expr)


__all__ = ["MIN_KEY_BYTES", "PSEUDONYM_HEX_CHARS", "pseudonym", "pseudonymize_ids", "resolve_key"]
