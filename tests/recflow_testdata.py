"""Test data helpers: the tiny sequential data set, file writers and the tiny config.

The tiny data set: 80 users x 15-25 interactions over 40 items. Each user walks the items
in order (i -> i+1 -> i+2, mod 40) from a random start, with 10% random jumps, at strictly
increasing times. The timestamps are ISO strings with mixed offsets (Z, +02:00, -05:00,
+05:30), so every pipeline run also exercises timezone parsing. A sequential model learns
"next item = current + 1" within two epochs, well above the popularity baseline.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import polars as pl

from core.config import PipelineConfig, load_config
from core.records import DatasetSplits, EpochStats, Snapshot, TrainedModel

N_USERS = 80
N_ITEMS = 40
DATA_FILE = "interactions.csv"
TINY_MODEL_PARAMS = {"hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1}

_OFFSETS = (
    UTC,
    timezone(timedelta(hours=2)),
    timezone(timedelta(hours=-5)),
    timezone(timedelta(hours=5, minutes=30)),
)


@dataclass(frozen=True)
class Interaction:
    user: str
    item: str
    instant: datetime  # tz-aware UTC: what the pipeline must parse the ISO string back into
    iso: str  # as written to the file, with some offset


def make_interactions(
    n_users: int = N_USERS,
    n_items: int = N_ITEMS,
    seed: int = 0,
    min_len: int = 15,
    max_len: int = 25,
    noise: float = 0.1,
) -> list[Interaction]:
    """Sequentially structured interactions, returned in random order."""
    rng = random.Random(seed)
    base = datetime(2023, 1, 1, tzinfo=UTC)
    rows: list[Interaction] = []
    for u in range(n_users):
        t = base + timedelta(hours=u)
        start = rng.randrange(n_items)
        for k in range(rng.randint(min_len, max_len)):
            item = (start + k) % n_items if rng.random() >= noise else rng.randrange(n_items)
            t += timedelta(minutes=rng.randint(1, 600))
            iso = t.astimezone(rng.choice(_OFFSETS)).isoformat()
            if iso.endswith("+00:00") and rng.random() < 0.5:
                iso = iso[: -len("+00:00")] + "Z"
            rows.append(Interaction(f"u{u}", f"i{item}", t, iso))
    rng.shuffle(rows)
    return rows


def write_csv(
    rows: list[Interaction],
    path: Path,
    *,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str = "timestamp",
    epoch_seconds: bool = False,
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([user_col, item_col, time_col])
        for r in rows:
            writer.writerow([r.user, r.item, int(r.instant.timestamp()) if epoch_seconds else r.iso])
    return path


def write_parquet(rows: list[Interaction], path: Path, *, time_zone: str = "Europe/Berlin") -> Path:
    """Parquet with a real tz-aware datetime column (not in UTC, to test the conversion)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pl.DataFrame(
        {
            "user_id": [r.user for r in rows],
            "item_id": [r.item for r in rows],
            "timestamp": [r.instant for r in rows],
        },
        schema={"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Datetime("us", "UTC")},
    ).with_columns(pl.col("timestamp").dt.convert_time_zone(time_zone))
    frame.write_parquet(path)
    return path


def write_rating_csv(rows: list[Interaction], path: Path, seed: int = 1) -> Path:
    """The interactions plus a 1-5 ``rating`` = round(3 + user bias + item bias + noise), clipped:
    learnable by a rating model's first-order terms, far from the mean rating's error."""
    rng = random.Random(seed)
    users = sorted({r.user for r in rows})
    items = sorted({r.item for r in rows})
    user_bias = {u: rng.gauss(0, 1) for u in users}
    item_bias = {i: rng.gauss(0, 1) for i in items}
    ratings = [min(5, max(1, round(3 + user_bias[r.user] + item_bias[r.item] + rng.gauss(0, 0.3)))) for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(
        {"user_id": [r.user for r in rows], "item_id": [r.item for r in rows], "timestamp": [r.iso for r in rows],
         "rating": ratings}
    ).write_csv(path)
    return path


def tiny_overrides(tmp: Path, data: Path | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model.params": dict(TINY_MODEL_PARAMS),
        "dataset.max_seq_length": 10,
        "training.epochs": 2,
        "training.train_batch_size": 32,
        # Pinned (not the default) so the tiny model's quality does not drift with tuning.
        "training.learning_rate": 0.003,
        # One intra-op thread: on a loaded 2-core box torch's thread pool makes a tiny
        # SASRec epoch ~50x slower; results are identical.
        "training.threads": 1,
        "training.device": "cpu",
        "export.parity_users": 64,
        "runs_dir": str(tmp / "runs"),
        "registry.path": str(tmp / "registry"),
    }
    if data is not None:
        out |= {"source.kind": "file", "source.path": str(data)}
    return out


def tiny_config(tmp: Path, data: Path | None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """The tiny training config (runs and registry under ``tmp``), plus dotted ``overrides``."""
    return load_config(overrides=tiny_overrides(tmp, data) | (overrides or {}))


TINY_YAML = """\
model:
  params: {hidden_size: 16, inner_size: 32, n_layers: 1, n_heads: 1}
dataset:
  max_seq_length: 10
training:
  epochs: 2
  train_batch_size: 32
  learning_rate: 0.003
  threads: 1
export:
  parity_users: 64
"""




@dataclass
class TinyRun:
    """A tiny model trained once per session (see the ``tiny_run`` fixture)."""

    config: PipelineConfig
    run_dir: Path
    snapshot: Snapshot
    splits: DatasetSplits
    trained: TrainedModel
    epochs_seen: list[EpochStats] = field(default_factory=list)
