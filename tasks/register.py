"""The register step: put a version into the local registry and (when it passed the gate) promote it."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from core.config import PipelineConfig
from core.records import Evaluation, ExportedModel, Promotion, TrainedModel
from core.release.artifacts import CONFIG_FILE
from core.release.registry import Registry


@task(name="register", cache_policy=NO_CACHE)
def register_task(
    config: PipelineConfig,
    trained: TrainedModel,
    evaluation: Evaluation,
    exported: ExportedModel,
    run_dir: Path,
    promote: bool | None = None,
) -> Promotion:
    """Register the version; switch the champion if ``promote`` (default: the gate's decision)."""
    logger = get_run_logger()
    promote = evaluation.gate.promote if promote is None else promote
    export_dir = exported.card_path.parent
    files = [p for p in sorted(export_dir.iterdir()) if p.is_file() and p.name != exported.card_path.name]
    files += [evaluation.metrics_path, run_dir / CONFIG_FILE, trained.checkpoint]
    registry = Registry(config.registry.path)
    card = json.loads(exported.card_path.read_text())
    promotion = registry.publish(config.registry_name, registry.new_version(), files, card, promote)
    if promotion.promoted:
        logger.info("registered %s/%s and promoted it to champion", promotion.model_name, promotion.version)
    else:
        logger.info("registered %s/%s; champion unchanged (%s)", promotion.model_name, promotion.version,
                    promotion.champion or "none yet")
    return promotion


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(config: PipelineConfig, promotion: Promotion) -> Promotion:
    """Switch the local champion to a version registered (and shipped) earlier in this run."""
    promoted = Registry(config.registry.path).promote(promotion.model_name, promotion.version)
    get_run_logger().info("promoted %s/%s to champion", promoted.model_name, promoted.version)
    return promoted
