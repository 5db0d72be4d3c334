"""Typed records passed between steps.

They hold paths into the run folder, counts and figures, never DataFrames or
models, so Prefect can persist them and a retry needs nothing but the run folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

# Canonical interaction columns every source produces.
USER, ITEM, TIME, RATING = "user_id", "item_id", "timestamp", "rating"


class Snapshot(BaseModel):
    """Interactions extracted from a source, as Parquet in the run folder."""

    path: Path
    source: str
    rows: int
    users: int
    items: int
    has_rating: bool
    min_time: str | None = None
    max_time: str | None = None
    fingerprint: str = Field(description="sha256 of the canonical snapshot content")
    pseudonymized: bool = False
    added_rows: int | None = Field(default=None, description="rows new since the stored watermark (incremental)")
    previous_rows: int | None = Field(default=None, description="rows of the previous snapshot, for drift checks")
    store_key: str | None = Field(default=None, description="snapshot-store folder (incremental runs)")


class CheckResult(BaseModel):
    name: str
    success: bool
    severity: Literal["error", "warning"] = "error"
    details: str = ""
    examples: list[str] = Field(default_factory=list)


class ValidationReport(BaseModel):
    suite: str
    expectations_loaded: int
    success: bool
    checks: list[CheckResult]
    report_path: Path

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.success and c.severity == "error"]

    @property
    def warnings(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.success and c.severity == "warning"]


class DatasetSplits(BaseModel):
    """RecBole atomic files built from a snapshot plus what the split produced."""

    data_dir: Path
    dataset_name: str
    users: int
    items: int
    interactions: int
    split: str
    fingerprint: str
    eval_protocol: str = Field(description="identifies split + filters; metrics compare only within it")


class EpochStats(BaseModel):
    epoch: int
    train_loss: float
    train_seconds: float
    valid_score: float | None = None
    valid_seconds: float | None = None


class BatchProbe(BaseModel):
    """One try of the batch finder: a real training step at ``batch`` rows."""

    batch: int
    outcome: Literal["fits", "oom", "over budget"]
    peak_bytes: int | None = Field(default=None, description="peak device memory of the step; None after an OOM")


class AutoBatch(BaseModel):
    """How ``training.train_batch_size: auto`` was resolved (core/modeling/batch_finder.py)."""

    batch: int
    method: Literal["probed", "default", "resumed"] = Field(
        description="probed: searched on the GPU; default: nothing to probe (CPU, or a trainer with its own "
        "loop); resumed: the batch of the crashed attempt, from checkpoints/latest.pth"
    )
    reason: str
    device: str
    budget_bytes: int | None = Field(default=None, description="(1 - headroom) x the device memory available")
    probes: list[BatchProbe] = Field(default_factory=list, description="every try, in order")


class TrainedModel(BaseModel):
    model_name: str
    checkpoint: Path
    best_epoch: int
    best_valid_score: float | None
    valid_metric: str
    epochs: list[EpochStats]
    device: str
    train_batch_size: int
    parameters: int
    seconds: float
    micro_batch_size: int | None = Field(
        default=None, description="rows per forward/backward (train_batch_size / grad_accumulation, rounded up)"
    )
    grad_accumulation: int = Field(default=1, description="micro-batches per optimizer step at the end of training")
    oom_retries: list[str] = Field(
        default_factory=list, description="out-of-memory step-downs, e.g. 'epoch 1: CUDA OOM at micro-batch 1024 -> 512 x2'"
    )
    resumed_from_epoch: int | None = Field(
        default=None,
        description="0-based index (as in `epochs`) of the last epoch restored from checkpoints/latest.pth "
        "after a crashed attempt; training continued at the next epoch. None: not resumed",
    )
    warning_signs: list[str] = Field(
        default_factory=list, description="early-warning signs (plateau, train/valid gap, KL collapse, GPU memory)"
    )
    gpu_peak_fraction: float | None = Field(
        default=None, description="CUDA: peak fraction of GPU memory used (sampled); None elsewhere"
    )
    amp: str = Field(default="off", description="mixed precision actually used: off, bf16 or fp16")
    auto_batch: AutoBatch | None = Field(
        default=None, description="train_batch_size=auto: the batch chosen and how; None: the batch was configured"
    )
    objective: Literal["all_positions", "last_item"] = Field(
        default="last_item", description="all_positions: windows with a target at every position; last_item: RecBole's rows"
    )
    loss: str | None = Field(default=None, description="all_positions: ce, sampled_softmax or gbce")
    stop_reason: Literal["early stopping", "time budget", "epoch cap", "stopped by caller"] = Field(
        default="epoch cap", description="what ended training"
    )
    train_rows: int | None = Field(default=None, description="rows (or windows) per epoch")


class GateDecision(BaseModel):
    promote: bool
    metric: str
    candidate: float
    baseline: float
    champion: float | None = None
    champion_version: str | None = None
    reasons: list[str]


class Evaluation(BaseModel):
    test: dict[str, float]
    valid: dict[str, float]
    baseline: dict[str, float]
    champion: dict[str, float] | None = None
    gate: GateDecision
    metrics_path: Path
    task: Literal["ranking", "rating"] = Field(
        default="ranking", description="ranking: top-k metrics vs Pop; rating: RMSE/MAE vs the train mean rating"
    )
    test_seen_masked: dict[str, float] | None = Field(
        default=None, description="sequential models: test metrics with already-seen items masked (as EASE/BPR "
        "are scored, and as serving answers by default); `test` leaves them in, as RecBole does",
    )


class ExportedModel(BaseModel):
    exported: bool
    onnx_path: Path | None = None
    reason: str | None = Field(default=None, description="why not exported, when exported is False")
    max_abs_diff: float | None = None
    top10_agreement: float | None = None
    users_checked: int = 0
    size_bytes: int | None = None
    latency_ms_p50: float | None = None
    card_path: Path


class Promotion(BaseModel):
    registry: Path
    model_name: str
    version: str
    version_dir: Path
    promoted: bool
    champion: str | None = Field(description="champion version after this step")


class PipelineResult(BaseModel):
    status: Literal["promoted", "rejected", "failed"]
    stage: str = Field(description="the last step reached: 'register' when the run finished, else the step that failed")
    error: str | None = None
    run_dir: Path | None = None
    metrics: dict[str, dict[str, float]] = Field(default_factory=dict)
    gate: GateDecision | None = None
    model_version: str | None = None
    registry: Path | None = None
    champion: str | None = None
    shipped: str | None = Field(
        default=None, description="version shipped to the production host as its champion (shipping.enabled)"
    )
