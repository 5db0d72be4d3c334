from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from core.config import PipelineConfig, dump_config
from core.data.extract import commit_snapshot, extract
from core.records import Snapshot
from core.release.artifacts import CONFIG_FILE
from core.run_folder import new_run_dir
from tasks._common import load_prefect_secret, retry_unless_user_error


@task(name="prepare-run", cache_policy=NO_CACHE)
def prepare_run_task(config: PipelineConfig) -> Path:
    """One folder per flow run, named after it: a retried flow run finds its checkpoints again."""
    from prefect.runtime import flow_run

    key = f"{flow_run.name}-{str(flow_run.id)[:8]}" if flow_run.id else None
    run_dir = new_run_dir(config.runs_dir, key)
    resumed = (run_dir / "checkpoints" / "latest.pth").exists()
    dump_config(config, run_dir / CONFIG_FILE)
    get_run_logger().info("run folder: %s%s", run_dir, " (retry: will resume training)" if resumed else "")
    return run_dir


@task(name="extract", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error, cache_policy=NO_CACHE)
def extract_task(config: PipelineConfig, run_dir: Path) -> Snapshot:
    snapshot = extract(config, run_dir, secret_loader=load_prefect_secret)
    logger = get_run_logger()
    logger.info(
        "extracted %d interactions (%d users, %d items) from %s, %s .. %s%s",
        snapshot.rows, snapshot.users, snapshot.items, snapshot.source, snapshot.min_time, snapshot.max_time,
        "; learner ids pseudonymised" if snapshot.pseudonymized else "",
    )
    if snapshot.added_rows is not None:
        logger.info("incremental: %d new rows since the stored watermark (%s rows stored before)",
                    snapshot.added_rows, snapshot.previous_rows)
    return snapshot


@task(name="commit-snapshot", cache_policy=NO_CACHE)
def commit_snapshot_task(config: PipelineConfig, snapshot: Snapshot) -> None:
    """Advance the incremental watermark only once the data passed validation."""
    commit_snapshot(config, snapshot)
    if config.incremental.enabled:
        get_run_logger().info("snapshot store updated: %d rows (%s)", snapshot.rows, snapshot.store_key)
