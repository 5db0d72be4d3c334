from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from core.config import PipelineConfig, dump_config
from core.extract import extract
from core.records import Snapshot
from core.run_folder import new_run_dir
from tasks._common import retry_unless_user_error


@task(name="prepare-run", cache_policy=NO_CACHE)
def prepare_run_task(config: PipelineConfig) -> Path:
    run_dir = new_run_dir(config.runs_dir)
    dump_config(config, run_dir / "config.yaml")
    get_run_logger().info("run folder: %s", run_dir)
    return run_dir


@task(name="extract", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error, cache_policy=NO_CACHE)
def extract_task(config: PipelineConfig, run_dir: Path) -> Snapshot:
    snapshot = extract(config, run_dir)
    get_run_logger().info(
        "extracted %d interactions (%d users, %d items) from %s, %s .. %s",
        snapshot.rows, snapshot.users, snapshot.items, snapshot.source, snapshot.min_time, snapshot.max_time,
    )
    return snapshot
