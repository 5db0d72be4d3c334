"""The data profile of a training snapshot: what serving traffic is later compared with.

Small on purpose (a few KiB, stored as ``data_profile.json`` in every registered version): the
popularity share of the ``top_n`` most attempted items plus the mass of all the others (the
tail), and a histogram of learners' history lengths over fixed edges. Learner ids never enter it.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
from pydantic import BaseModel, Field

from core.records import ITEM, USER
from core.release.artifacts import DATA_PROFILE_FILE, VersionReader

PROFILE_VERSION = 1
TOP_N = 500
# History-length bins [e_i, e_{i+1}); the last one is open. Roughly geometric: lengths spread over
# orders of magnitude, and a bin per order keeps the PSI stable on a few hundred learners.
HISTORY_EDGES: tuple[int, ...] = (0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233)


class DataProfile(BaseModel):
    """Item popularity (top-N shares + tail mass) and history lengths of one snapshot."""

    version: int = PROFILE_VERSION
    rows: int
    learners: int
    items: int
    top_items: list[tuple[str, float]] = Field(description="(item, share of rows), most popular first")
    tail_share: float = Field(description="share of rows on items outside top_items")
    history_edges: list[int] = Field(description="bin lower edges; the last bin is open")
    history_counts: list[int] = Field(description="learners per history-length bin")


def history_histogram(lengths: pl.Series, edges: tuple[int, ...] | list[int] = HISTORY_EDGES) -> list[int]:
    """Counts of ``lengths`` per bin ``[edges[i], edges[i+1])`` (the last bin open)."""
    import numpy as np

    values = lengths.drop_nulls().to_numpy()
    bins = np.searchsorted(np.asarray(edges), values, side="right") - 1
    bins = bins[bins >= 0]
    return np.bincount(bins, minlength=len(edges)).astype(int).tolist()


def build_profile(frame: pl.DataFrame | pl.LazyFrame, *, user: str = USER, item: str = ITEM,
                  top_n: int = TOP_N) -> DataProfile:
    """The profile of an interaction table.

    Args:
        frame: one row per interaction (a snapshot: ``user_id``, ``item_id``, ...).
        user: the learner column.
        item: the item column (compared as strings, as the serving log holds them).
        top_n: how many items are kept by name.

    Returns:
        The profile.
    """
    lazy = frame.lazy().select(pl.col(user), pl.col(item).cast(pl.String))
    counts = lazy.group_by(item).agg(n=pl.len()).sort(["n", item], descending=[True, False]).collect()
    rows = int(counts["n"].sum())
    lengths = lazy.group_by(user).agg(n=pl.len()).collect()["n"]
    top = counts.head(top_n)
    shares = [(str(i), n / rows) for i, n in zip(top[item].to_list(), top["n"].to_list())] if rows else []
    return DataProfile(
        rows=rows, learners=lengths.len(), items=counts.height, top_items=shares,
        tail_share=max(0.0, 1.0 - sum(s for _, s in shares)) if rows else 0.0,
        history_edges=list(HISTORY_EDGES), history_counts=history_histogram(lengths),
    )


def profile_snapshot(snapshot_path: Path, *, top_n: int = TOP_N) -> DataProfile:
    """The profile of a snapshot Parquet file (canonical columns)."""
    return build_profile(pl.scan_parquet(snapshot_path), top_n=top_n)


def write_profile(profile: DataProfile, directory: Path) -> Path:
    """Write ``data_profile.json`` into ``directory`` (an export folder); returns its path."""
    path = Path(directory) / DATA_PROFILE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile.model_dump_json())
    return path


def read_profile(version_dir: Path, *, allow_unverified: bool = False) -> DataProfile | None:
    """A registered version's profile, checksum-verified; None when the version has none (older versions)."""
    reader = VersionReader.open(version_dir, allow_unverified=allow_unverified)
    if not reader.has(DATA_PROFILE_FILE):
        return None
    return DataProfile.model_validate(json.loads(reader.read(DATA_PROFILE_FILE)))
