"""evaluate -> export -> register for a model trained elsewhere (a tuning trial, a seed repeat, an
ensemble): the same steps and the same champion gate as the training pipeline's second half.

``allow_promote=False`` registers the version without ever touching the champion (variants kept
for A/B tests); ``True`` lets the gate decide, exactly as a training run does.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

import flows  # noqa: F401  (Prefect environment defaults)
from core.config import PipelineConfig
from core.records import DatasetSplits, Promotion, Snapshot, TrainedModel
from flows._stages import stage
from tasks.evaluate import evaluate_task
from tasks.export import export_task
from tasks.register import register_task


@flow(name="release-model", flow_run_name="release-{label}")
def release_model(config: PipelineConfig, snapshot: Snapshot, splits: DatasetSplits, trained: TrainedModel,
                  run_dir: Path, label: str, allow_promote: bool) -> Promotion:
    with stage("evaluate", run_dir):
        evaluation = evaluate_task(config, splits, trained, run_dir)
    with stage("export", run_dir):
        exported = export_task(config, snapshot, splits, trained, evaluation, run_dir)
    with stage("register", run_dir):
        # A search never bypasses the gate: it may promote only what the gate passed.
        return register_task(config, trained, evaluation, exported, run_dir,
                             promote=allow_promote and evaluation.gate.promote)
