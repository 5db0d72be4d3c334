from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from core.config import PipelineConfig
from core.evaluation import evaluate, metrics_table
from core.records import DatasetSplits, Evaluation, TrainedModel
from core.registry import Registry
from core.tracking import log_final_metrics
from tasks._common import artifact_key


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(config: PipelineConfig, splits: DatasetSplits, trained: TrainedModel, run_dir: Path) -> Evaluation:
    logger = get_run_logger()
    champion_card = Registry(config.registry.path).champion_card(config.registry_name)
    result = evaluate(config, splits, trained, run_dir, champion_card)
    key = artifact_key(config.registry_name)
    create_table_artifact(table=metrics_table(result), key=f"metrics-{key}",
                          description="test metrics: candidate vs Pop baseline vs champion")
    gate = result.gate
    verdict = "PROMOTE" if gate.promote else "REJECT"
    create_markdown_artifact(
        markdown=f"## Gate: {verdict}\n\n" + "\n".join(f"- {r}" for r in gate.reasons),
        key=f"gate-{key}",
        description="promotion gate decision",
    )
    logger.info("test %s: candidate %.4f, Pop %.4f%s", gate.metric, gate.candidate, gate.baseline,
                f", champion {gate.champion:.4f}" if gate.champion is not None else "")
    logger.info("gate: %s (%s)", verdict, "; ".join(gate.reasons))
    t = config.tracking
    if t.wandb and t.wandb_mode != "disabled":
        log_final_metrics(run_dir, {"test": result.test, "baseline": result.baseline},
                          project=t.wandb_project, mode=t.wandb_mode)
    return result
