"""What ``recflow ab-report`` is told: where the logs are, the outcome window and the thresholds."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from core.config import NotifyConfig, PipelineConfig
from core.serving.outcome_log import EVENTS_DIR as EVENTS_DIR  # the serving log's layout, re-exported
from core.serving.outcome_log import REQUESTS_DIR as REQUESTS_DIR

EXPERIMENT_RECORD = "experiment.json"  # <log dir>/experiment.json unless --record says otherwise
PAST_RECORDS_DIR = "experiments"  # <log dir>/experiments/<id>.json: experiments replaced since
LEARNERS_FILE = "learners.parquet"  # per-(arm, learner) sums: pseudonymous session ids only
DEFAULT_NIGHTLY = "training-pipeline/nightly"


class DriftThresholds(BaseModel):
    """Past any of these the report warns (and may trigger a nightly run)."""

    model_config = ConfigDict(extra="forbid")

    unknown_share: float = Field(default=0.05, ge=0, le=1, description="share of history items the version never saw")
    item_psi: float = Field(default=0.2, ge=0, description="PSI of item popularity (0.1: watch, 0.2: act)")
    history_psi: float = Field(default=0.2, ge=0, description="PSI of history lengths")
    min_learners: int = Field(default=30, ge=1, description="fewer learners than this: no drift verdict")


class ABReportSettings(BaseModel):
    """Everything one A/B report run needs (the flow's parameter)."""

    model_config = ConfigDict(extra="forbid")

    log_dir: Path
    out_dir: Path
    attempts: PipelineConfig | None = Field(
        default=None, description="where question_attempts come from (a file or a source); None: events only"
    )
    window_hours: float = Field(default=24.0, gt=0, description="an outcome counts this long after the request")
    experiment: str | None = Field(default=None, description="experiment id; default: the only one in the log")
    record: Path | None = Field(default=None, description="experiment record JSON; default: the log dir's record of "
                                "the experiment (experiment.json, or experiments/<id>.json once replaced)")
    registry: Path | None = Field(default=None, description="registry with the served versions' data profiles")
    control: str | None = Field(default=None, description="the arm others are compared with; default: the record's first")
    alpha: float = Field(default=0.05, gt=0, lt=1, description="1 - confidence of the intervals")
    srm_alpha: float = Field(default=0.001, gt=0, lt=1, description="a sample-ratio p-value below this flags SRM")
    drift: DriftThresholds = Field(default_factory=DriftThresholds)
    trigger_nightly: bool = Field(default=False, description="start the nightly deployment when drift warns")
    nightly_deployment: str = DEFAULT_NIGHTLY
    notify: NotifyConfig = Field(default_factory=NotifyConfig)

