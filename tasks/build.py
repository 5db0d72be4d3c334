from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from core.config import PipelineConfig
from core.modeling.dataset import build_dataset
from core.records import DatasetSplits, Snapshot


@task(name="build-dataset", cache_policy=NO_CACHE)
def build_task(snapshot: Snapshot, config: PipelineConfig, run_dir: Path) -> DatasetSplits:
    splits = build_dataset(snapshot, config, run_dir)
    get_run_logger().info(
        "dataset: %d users, %d items after filters; split %s (%s)",
        splits.users, splits.items, splits.split, splits.eval_protocol,
    )
    return splits
