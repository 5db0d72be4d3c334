from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from core.config import PipelineConfig
from core.records import DatasetSplits, EpochStats, TrainedModel
from core.training import train
from tasks._common import artifact_key


@task(name="train", cache_policy=NO_CACHE)
def train_task(config: PipelineConfig, splits: DatasetSplits, run_dir: Path) -> TrainedModel:
    logger = get_run_logger()
    total = config.training.epochs
    logger.info(
        "training %s for up to %d epochs, batch %d, on %s",
        config.model.name, total, config.training.train_batch_size, config.training.device,
    )

    def on_epoch(stats: EpochStats) -> None:
        logger.info(
            "epoch %d/%d  loss %.4f  train %.1fs  valid %s %.4f",
            stats.epoch + 1, total, stats.train_loss, stats.train_seconds,
            config.evaluation.valid_metric, stats.valid_score if stats.valid_score is not None else float("nan"),
        )

    trained = train(config, splits, run_dir, on_epoch=on_epoch)
    if trained.resumed_from_epoch is not None:
        logger.warning("resumed a crashed attempt after epoch %d (from checkpoints/latest.pth)",
                       trained.resumed_from_epoch + 1)
    for event in trained.oom_retries:
        logger.warning("out of memory, stepped down: %s (effective batch %d kept)", event, trained.train_batch_size)
    create_table_artifact(
        table=[e.model_dump() for e in trained.epochs],
        key=artifact_key("training-curve", config.registry_name),
        description=f"{trained.model_name}: per-epoch loss, time and valid {trained.valid_metric}",
    )
    logger.info("best epoch %d (%s %.4f), %d parameters, %.1fs on %s", trained.best_epoch + 1,
                trained.valid_metric, trained.best_valid_score or float("nan"), trained.parameters,
                trained.seconds, trained.device)
    return trained
