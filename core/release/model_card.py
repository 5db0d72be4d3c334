"""The model card: what a person (or the gate of a later run) needs to trust a version."""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from core.config import PipelineConfig
from core.records import DatasetSplits, Evaluation, ExportedModel, Snapshot, TrainedModel

_LIBRARIES = ("recflow", "recbole", "torch", "numpy", "pandas", "polars", "onnx", "onnxruntime", "prefect",
              "great_expectations", "pydantic")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in _LIBRARIES:
        try:
            out[lib] = metadata.version(lib.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[lib] = "not installed"
    return out


def build_card(
    config: PipelineConfig,
    snapshot: Snapshot,
    splits: DatasetSplits,
    trained: TrainedModel,
    evaluation: Evaluation,
    exported: ExportedModel,
    export_section: dict[str, Any],
) -> dict[str, Any]:
    return {
        "model": trained.model_name,
        "registry_name": config.registry_name,
        "created_at": datetime.now(UTC).isoformat(),
        "data": {
            "source": snapshot.source,
            "fingerprint": snapshot.fingerprint,
            "rows": snapshot.rows,
            "users": splits.users,
            "items": splits.items,
            "time_range": [snapshot.min_time, snapshot.max_time],
            "eval_protocol": splits.eval_protocol,
        },
        "training": {
            "device": trained.device,
            "epochs_run": len(trained.epochs),
            "best_epoch": trained.best_epoch,
            "best_valid_score": trained.best_valid_score,
            "objective": trained.objective,
            "loss": trained.loss,
            "stop_reason": trained.stop_reason,
            "train_rows": trained.train_rows,
            "valid_metric": trained.valid_metric,
            "train_batch_size": trained.train_batch_size,
            "micro_batch_size": trained.micro_batch_size,
            "grad_accumulation": trained.grad_accumulation,
            "oom_retries": trained.oom_retries,
            "auto_batch": trained.auto_batch.model_dump(mode="json") if trained.auto_batch is not None else None,
            "resumed_from_epoch": trained.resumed_from_epoch,
            "parameters": trained.parameters,
            "seconds": trained.seconds,
            "epochs": [e.model_dump() for e in trained.epochs],
        },
        "metrics": _metrics_section(evaluation),
        "gate": evaluation.gate.model_dump(),
        # onnx false: no model.onnx in the version; `reason` says why (the checkpoint is still registered).
        "export": {"exported": exported.exported, "onnx": exported.onnx_path is not None and exported.exported,
                   "reason": exported.reason, **export_section},
        "config": config.model_dump(mode="json"),
        "libraries": library_versions(),
    }


def _metrics_section(evaluation: Evaluation) -> dict[str, Any]:
    if evaluation.task == "rating":
        # RMSE/MAE on the original rating scale; the baseline predicts the mean training rating.
        return {"task": "rating", "test": evaluation.test, "valid": evaluation.valid,
                "baseline_train_mean": evaluation.baseline}
    section = {"test": evaluation.test, "valid": evaluation.valid, "baseline_pop": evaluation.baseline}
    if evaluation.test_seen_masked is not None:
        section["test_seen_masked"] = evaluation.test_seen_masked
    return section


def write_card(card: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(card, indent=2, default=str))
    return path
