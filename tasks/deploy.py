from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from core.config import PipelineConfig
from core.records import Evaluation, ExportedModel, Promotion, TrainedModel
from core.registry import Registry


@task(name="deploy", cache_policy=NO_CACHE)
def deploy_task(
    config: PipelineConfig,
    trained: TrainedModel,
    evaluation: Evaluation,
    exported: ExportedModel,
    run_dir: Path,
) -> Promotion:
    logger = get_run_logger()
    export_dir = exported.card_path.parent
    files = [p for p in sorted(export_dir.iterdir()) if p.is_file() and p.name != exported.card_path.name]
    files += [evaluation.metrics_path, run_dir / "config.yaml", trained.checkpoint]
    registry = Registry(config.registry.path)
    card = json.loads(exported.card_path.read_text())
    promotion = registry.publish(config.registry_name, registry.new_version(), files, card, evaluation.gate.promote)
    if promotion.promoted:
        logger.info("registered %s/%s and promoted it to champion", promotion.model_name, promotion.version)
    else:
        logger.info("registered %s/%s; champion unchanged (%s)", promotion.model_name, promotion.version,
                    promotion.champion or "none yet")
    return promotion
