"""The data-quality gate inside the real flow: each broken-data case stops at validate
with a named reason and leaves the champion alone; odd-but-valid data trains."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from recflow_testdata import tiny_overrides

from core.config import QUESTION_ATTEMPTS_COLUMNS, load_config
from core.data.sources.synthetic import generate_question_attempts
from core.errors import PipelineFailed
from core.release.registry import CHAMPION, Registry

Breaker = Callable[[pl.DataFrame], pl.DataFrame]


def _attempts() -> pl.DataFrame:
    return generate_question_attempts(60, seed=21)


def _config(tmp_path: Path, data: Path):  # type: ignore[no-untyped-def]
    cols = {f"columns.{k}": v for k, v in QUESTION_ATTEMPTS_COLUMNS.items()}
    return load_config(overrides=tiny_overrides(tmp_path, data) | cols)


def _write(frame: pl.DataFrame, path: Path) -> Path:
    frame.with_columns(pl.col("created_at").dt.to_string("%Y-%m-%dT%H:%M:%S%.f%:z")).write_csv(path)
    return path


def _row_ids(n: int, every: int) -> pl.Expr:
    return (pl.int_range(0, n) % every) == 0


BROKEN: dict[str, tuple[Breaker, str]] = {
    "negative response time": (
        lambda f: f.with_columns(
            pl.when(_row_ids(f.height, 7)).then(-3.0).otherwise(pl.col("response_time_seconds"))
            .alias("response_time_seconds")
        ),
        "response_time_seconds",
    ),
    "difficulty out of range": (
        lambda f: f.with_columns(
            pl.when(_row_ids(f.height, 11)).then(9).otherwise(pl.col("difficulty_level")).alias("difficulty_level")
        ),
        "difficulty_level",
    ),
    "is_correct not boolean": (
        lambda f: f.with_columns(
            pl.when(_row_ids(f.height, 13)).then(pl.lit("maybe")).otherwise(pl.col("is_correct").cast(pl.String))
            .alias("is_correct")
        ),
        "is_correct",
    ),
    "duplicates above 1%": (lambda f: pl.concat([f, f.head(f.height // 20)]), "duplicate"),
    "timestamps in the future": (
        lambda f: f.with_columns(
            pl.when(_row_ids(f.height, 17))
            .then(pl.lit(datetime.now(UTC) + timedelta(days=30)))
            .otherwise(pl.col("created_at"))
            .alias("created_at")
        ),
        "future",
    ),
    "missing learner ids": (
        lambda f: f.with_columns(
            pl.when(_row_ids(f.height, 19)).then(None).otherwise(pl.col("user_id")).alias("user_id")
        ),
        "user_id",
    ),
}


@pytest.fixture(scope="module")
def champion_registry(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A registry whose entry has a real champion: trained and promoted on clean attempts."""
    from flows.training_pipeline import training_pipeline

    root = tmp_path_factory.mktemp("champion")
    config = _config(root, _write(_attempts(), root / "attempts.csv"))
    result = training_pipeline(config)
    assert result.status == "promoted" and result.model_version is not None
    return config.registry.path, result.model_version


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_data_stops_at_validate_and_keeps_the_champion(
    champion_registry: tuple[Path, str], tmp_path: Path, case: str
) -> None:
    from flows.training_pipeline import training_pipeline

    breaker, needle = BROKEN[case]
    registry_dir, champion = champion_registry
    config = _config(tmp_path, _write(breaker(_attempts()), tmp_path / "attempts.csv"))  # same stem: same entry
    shutil.copytree(registry_dir, config.registry.path, symlinks=True)
    registry = Registry(config.registry.path)
    pointer = registry.entry(config.registry_name) / CHAMPION
    assert registry.champion_version(config.registry_name) == champion == os.readlink(pointer)
    with pytest.raises(PipelineFailed) as err:
        training_pipeline(config)
    assert err.value.stage == "validate", err.value.error
    assert needle in err.value.error
    assert registry.champion_version(config.registry_name) == champion
    assert os.readlink(pointer) == champion
    assert registry.versions(config.registry_name) == [champion]  # nothing new registered


def test_row_count_drop_against_the_champion_fails(prefect_harness: None, tmp_path: Path) -> None:
    from flows.training_pipeline import training_pipeline

    full = _attempts()
    data = _write(full, tmp_path / "attempts.csv")
    config = _config(tmp_path, data)
    first = training_pipeline(config)
    assert first.status == "promoted" and first.champion == first.model_version
    before = Registry(config.registry.path).champion_version(config.registry_name)
    _write(full.head(full.height // 3), data)  # two thirds of the rows vanished upstream
    with pytest.raises(PipelineFailed) as err:
        training_pipeline(config)
    assert err.value.stage == "validate"
    assert "dropped" in err.value.error
    assert Registry(config.registry.path).champion_version(config.registry_name) == before


def test_odd_but_valid_data_trains(prefect_harness: None, tmp_path: Path) -> None:
    """Unicode ids and extra, unknown columns are fine."""
    from flows.training_pipeline import training_pipeline

    frame = _attempts().with_columns(
        ("学習者-" + pl.col("user_id").str.slice(0, 8) + "-ß").alias("user_id"),
        ("Frage ✓ " + pl.col("question_id")).alias("question_id"),
        pl.lit("ignored").alias("school_district"),
    )
    config = _config(tmp_path, _write(frame, tmp_path / "attempts.csv"))
    result = training_pipeline(config)
    # A fresh registry: the only bar is Pop, which a model of these curricula beats (the same
    # data as the champion fixture above, with other names and an unused column).
    assert result.status == "promoted" and result.gate is not None and result.gate.champion_version is None
    import json

    items = json.loads((Path(result.run_dir) / "export" / "item_ids.json").read_text(encoding="utf-8"))  # type: ignore[arg-type]
    assert sum(i.startswith("Frage ✓ q-") for i in items) == len(items) - 1  # all but [PAD]
