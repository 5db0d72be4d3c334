from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from core.config import PipelineConfig
from core.modeling.dataset import RecBoleData, build_recbole_data
from core.records import DatasetSplits, Snapshot


# Returns the split record and the in-memory RecBole data, which the flow owns and hands to
# train / evaluate / export. The data is never hashed or persisted (NO_CACHE, persist_result=False).
@task(name="build-dataset", cache_policy=NO_CACHE, persist_result=False)
def build_task(snapshot: Snapshot, config: PipelineConfig, run_dir: Path) -> tuple[DatasetSplits, RecBoleData]:
    splits, data = build_recbole_data(snapshot, config, run_dir)
    get_run_logger().info(
        "dataset: %d users, %d items after filters; split %s (%s)",
        splits.users, splits.items, splits.split, splits.eval_protocol,
    )
    return splits, data
