"""extract -> validate -> train -> evaluate -> export -> register, as one Prefect flow.

Run it ad hoc from Python::

    from core.config import load_config
    from flows.training_pipeline import training_pipeline
    result = training_pipeline(load_config("configs/ml-100k-sasrec.yaml"))

A failing step raises ``PipelineFailed`` naming the step; the champion is never touched
unless the gate passed and the new version is complete in the registry.
With ``shipping.enabled`` a promoted version is then shipped to the production host
(``ship`` step, core/release/shipping/sftp.py); a rejected run ships nothing.
"""

from __future__ import annotations

from prefect import flow

import flows  # noqa: F401  (Prefect environment defaults)
from core.config import PipelineConfig
from core.records import PipelineResult
from flows._hooks import notify_on_completion, notify_on_failure
from flows._stages import stage
from tasks.build import build_task
from tasks.evaluate import evaluate_task
from tasks.export import export_task
from tasks.extract import commit_snapshot_task, extract_task, prepare_run_task
from tasks.register import promote_task, register_task
from tasks.ship import ship_task
from tasks.train import train_task
from tasks.validate import validate_task


# Hooks post the outcome to the configured webhook (config.notify); they never change it.
@flow(
    name="training-pipeline",
    log_prints=True,
    on_completion=[notify_on_completion],
    on_failure=[notify_on_failure],
    on_crashed=[notify_on_failure],
)
def training_pipeline(config: PipelineConfig = PipelineConfig()) -> PipelineResult:  # noqa: B008
    with stage("extract"):
        run_dir = prepare_run_task(config)
    with stage("extract", run_dir):
        snapshot = extract_task(config, run_dir)
    with stage("validate", run_dir):
        validate_task(snapshot, config, run_dir)
        commit_snapshot_task(config, snapshot)
    with stage("train", run_dir):
        # The RecBole data is built once here; the flow owns it and hands it to each step.
        splits, data = build_task(snapshot, config, run_dir)
        trained = train_task(config, splits, run_dir, data)
    with stage("evaluate", run_dir):
        evaluation = evaluate_task(config, splits, trained, run_dir, data)
    with stage("export", run_dir):
        exported = export_task(config, snapshot, splits, trained, evaluation, run_dir, data)
    del data  # nothing after export reads it: free the dataset and loaders
    ship = config.shipping.enabled and evaluation.gate.promote
    with stage("register", run_dir):
        # When shipping, the local champion moves only once the production host has the version.
        promotion = register_task(config, trained, evaluation, exported, run_dir, promote=evaluation.gate.promote and not ship)
    shipped: str | None = None
    # Only a version that passed the gate leaves this machine; a rejected run leaves production as it was.
    if ship:
        with stage("ship", run_dir):
            shipped = ship_task(config, promotion).version
            promotion = promote_task(config, promotion)
    return PipelineResult(
        status="promoted" if promotion.promoted else "rejected",
        stage="register",
        run_dir=run_dir,
        metrics={"test": evaluation.test, "valid": evaluation.valid, "baseline": evaluation.baseline}
        | ({"test_seen_masked": evaluation.test_seen_masked} if evaluation.test_seen_masked else {}),
        gate=evaluation.gate,
        model_version=promotion.version,
        registry=promotion.registry,
        champion=promotion.champion,
        shipped=shipped,
    )
