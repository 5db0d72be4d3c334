from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from core.config import PipelineConfig
from core.data.extract import drift_baseline
from core.data.validation import raise_for_failures, report_markdown, validate_snapshot
from core.records import Snapshot, ValidationReport
from core.release.registry import Registry
from tasks._common import artifact_key


@task(name="validate", cache_policy=NO_CACHE)
def validate_task(snapshot: Snapshot, config: PipelineConfig, run_dir: Path) -> ValidationReport:
    logger = get_run_logger()
    champion = Registry(config.registry.path).champion_card(config.registry_name)
    report = validate_snapshot(snapshot, config, run_dir, previous_rows=drift_baseline(snapshot, champion))
    create_markdown_artifact(
        markdown=report_markdown(report),
        key=artifact_key("validation", config.registry_name),
        description=f"data-quality report for {snapshot.source}",
    )
    for check in report.warnings:
        logger.warning("data warning: %s: %s", check.name, check.details)
    raise_for_failures(report)
    logger.info("data validation passed: %d checks, %d warnings", len(report.checks), len(report.warnings))
    return report
