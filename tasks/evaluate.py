from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from core.config import PipelineConfig
from core.modeling.dataset import RecBoleData
from core.modeling.evaluation import BASELINE_NAMES, evaluate, metrics_table
from core.modeling.tracking import log_final_metrics
from core.records import DatasetSplits, Evaluation, GateDecision, TrainedModel
from core.release.registry import Registry
from tasks._common import artifact_key


def gate_markdown(gate: GateDecision, min_improvement: float, baseline_name: str = "Pop baseline") -> str:
    """The gate artifact: the decision, the gate metric for candidate vs champion vs Pop, the reasons."""
    verdict = "PROMOTE" if gate.promote else "REJECT"
    champion = ("none comparable" if gate.champion is None
                else f"{gate.champion:.4f} ({gate.champion_version})")
    return "\n".join([
        f"## Gate: {verdict}",
        "",
        f"| {gate.metric} (test) | value |",
        "| --- | --- |",
        f"| candidate | {gate.candidate:.4f} |",
        f"| champion | {champion} |",
        f"| {baseline_name} | {gate.baseline:.4f} |",
        f"| required margin | {min_improvement:g} |",
        "",
        "**Reasons**",
        "",
        *(f"- {r}" for r in gate.reasons),
    ])


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(
    config: PipelineConfig, splits: DatasetSplits, trained: TrainedModel, run_dir: Path, data: RecBoleData | None = None
) -> Evaluation:
    """Evaluate on ``data`` (the flow's RecBole data, as training left it; None: built here)."""
    logger = get_run_logger()
    registry = Registry(config.registry.path)
    champion_card = registry.champion_card(config.registry_name)
    champion_dir = registry.entry(config.registry_name) / champion_card["version"] if champion_card else None
    result = evaluate(config, splits, trained, run_dir, champion_card, champion_dir, data=data)
    key = artifact_key(config.registry_name)
    baseline_name = BASELINE_NAMES[result.task]  # "Pop baseline" (ranking) or "train-mean baseline" (rating)
    create_table_artifact(table=metrics_table(result), key=f"metrics-{key}",
                          description=f"test metrics: candidate vs {baseline_name} vs champion")
    gate = result.gate
    verdict = "PROMOTE" if gate.promote else "REJECT"
    create_markdown_artifact(
        markdown=gate_markdown(gate, config.evaluation.min_improvement, baseline_name),
        key=f"gate-{key}",
        description="promotion gate decision",
    )
    logger.info("test %s: candidate %.4f, %s %.4f%s", gate.metric, gate.candidate,
                "Pop" if result.task == "ranking" else "train mean", gate.baseline,
                f", champion {gate.champion:.4f}" if gate.champion is not None else "")
    logger.info("gate: %s (%s)", verdict, "; ".join(gate.reasons))
    t = config.tracking
    if t.wandb and t.wandb_mode != "disabled":
        log_final_metrics(run_dir, {"test": result.test, "baseline": result.baseline},
                          project=t.wandb_project, mode=t.wandb_mode)
    return result
