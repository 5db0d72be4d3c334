from __future__ import annotations

import base64
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run

from core.config import PipelineConfig
from core.modeling.dataset import RecBoleData
from core.modeling.tracking import TRAINING_CURVE
from core.modeling.training import train
from core.records import DatasetSplits, EpochStats, TrainedModel
from tasks._common import artifact_key, retry_unless_user_error

# A larger PNG is linked by path rather than embedded (artifacts are stored in Prefect's database).
MAX_EMBEDDED_PNG = 200_000


# A retry (e.g. after a worker hiccup) resumes from checkpoints/latest.pth in the same run folder.
@task(name="train", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_user_error, cache_policy=NO_CACHE)
def train_task(
    config: PipelineConfig, splits: DatasetSplits, run_dir: Path, data: RecBoleData | None = None
) -> TrainedModel:
    """Train on ``data`` (the flow's RecBole data; None: built here from the run folder)."""
    logger = get_run_logger()
    if task_run.run_count > 1:
        # The failed attempt may have left the loaders mid-epoch: a retry builds fresh data, and
        # resumes from latest.pth, which restores every RNG state (the loader's included).
        data = None
    total = config.training.epochs
    budget = f", at most {config.training.max_minutes:g} min" if config.training.max_minutes else ""
    logger.info(
        "training %s for up to %d epochs%s (early stopping after %d without gain), batch %s, on %s",
        config.model.name, total, budget, config.training.early_stopping_patience,
        config.training.train_batch_size or "default", config.training.device,
    )

    def on_epoch(stats: EpochStats) -> None:
        logger.info(
            "epoch %d/%d  loss %.4f  train %.1fs  valid %s %.4f",
            stats.epoch + 1, total, stats.train_loss, stats.train_seconds,
            config.evaluation.valid_metric, stats.valid_score if stats.valid_score is not None else float("nan"),
        )

    trained = train(config, splits, run_dir, on_epoch=on_epoch, data=data)
    if trained.auto_batch is not None:
        logger.info("train_batch_size=auto -> %d (%s: %s)", trained.auto_batch.batch, trained.auto_batch.method,
                    trained.auto_batch.reason)
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
    for sign in trained.warning_signs:
        logger.warning("warning sign: %s", sign)
    create_markdown_artifact(
        markdown=tracking_markdown(trained, run_dir),
        key=artifact_key("training-health", config.registry_name),
        description=f"{trained.model_name}: early-warning signs and the training curve",
    )
    unit = "windows" if trained.objective == "all_positions" else "rows"
    logger.info("best epoch %d (%s %.4f), %d parameters, %.1fs on %s; %s ended training (%s objective, %s %s "
                "an epoch)", trained.best_epoch + 1, trained.valid_metric, trained.best_valid_score or float("nan"),
                trained.parameters, trained.seconds, trained.device, trained.stop_reason, trained.objective,
                trained.train_rows, unit)
    return trained


def tracking_markdown(trained: TrainedModel, run_dir: Path) -> str:
    """Warning signs (or "none") and the training curve (embedded if small, else its path)."""
    lines = ["## Warning signs", ""]
    lines += [f"- {sign}" for sign in trained.warning_signs] or ["none"]
    png = run_dir / TRAINING_CURVE
    if png.is_file():
        lines += ["", "## Training curve", ""]
        data = png.read_bytes()
        if len(data) < MAX_EMBEDDED_PNG:
            lines.append(f"![training curve](data:image/png;base64,{base64.b64encode(data).decode()})")
        else:
            lines.append(f"`{png}`")
    lines += ["", f"Run folder: `{run_dir}` (training_log.jsonl, tensorboard/, wandb/)"]
    return "\n".join(lines)
