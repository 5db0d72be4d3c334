"""The typed configuration tree.

One ``PipelineConfig`` drives a run. It loads from YAML presets in ``configs/``,
takes CLI overrides, and is the typed parameter of the Prefect flow (so the
Prefect UI renders it as a form). Every default here runs on a laptop CPU on
MovieLens-100k in a few minutes.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import ConfigError

Device = Literal["auto", "cpu", "cuda", "mps"]
METRIC_NAMES = ("Recall", "MRR", "NDCG", "Hit", "Precision")
# Value metrics of the rating task (RecBole's names); lower is better.
VALUE_METRIC_NAMES = ("RMSE", "MAE")


class _Strict(BaseModel):
    # A typo in a YAML key must fail loudly rather than be ignored.
    model_config = ConfigDict(extra="forbid")


class SourceConfig(_Strict):
    """Where interactions come from. Secrets are never stored here: only the names of the
    environment variables that hold them."""

    kind: Literal["ml-100k", "file", "postgres", "supabase", "synthetic"] = "ml-100k"
    path: Path | None = Field(default=None, description="CSV or Parquet file (kind=file)")
    format: Literal["auto", "csv", "parquet"] = "auto"
    separator: str = Field(default=",", description="CSV field separator")
    dsn_env: str = Field(
        default="RECFLOW_PG_DSN", description="env var holding the Postgres connection string (kind=postgres)"
    )
    dsn_secret_block: str | None = Field(
        default=None, description="Prefect Secret block holding the Postgres connection string; used when dsn_env is unset"
    )
    url: str | None = Field(default=None, description="Supabase project URL (kind=supabase)")
    key_env: str = Field(default="SUPABASE_KEY", description="env var holding the Supabase (anon) key")
    key_secret_block: str | None = Field(
        default=None, description="Prefect Secret block holding the Supabase key; used when key_env is unset"
    )
    table: str = Field(default="question_attempts", description="table to read (postgres, supabase)")
    since: datetime | None = Field(default=None, description="only rows with time >= since")
    until: datetime | None = Field(default=None, description="only rows with time < until")
    page_size: int = Field(default=1000, ge=1, le=1000, description="Supabase page size (hosted cap: 1000)")
    synthetic_users: int = Field(default=300, ge=2, description="learners generated (kind=synthetic)")
    synthetic_seed: int = 0
    synthetic_questions: int = Field(default=160, ge=1, description="questions in the bank (kind=synthetic)")
    synthetic_attempts_per_user: float = Field(default=37.5, ge=1, description="mean attempts per learner (kind=synthetic)")

    @model_validator(mode="after")
    def _needs(self) -> SourceConfig:
        if self.kind == "file" and self.path is None:
            raise ValueError("source.kind 'file' needs source.path (use --data PATH)")
        if self.kind == "supabase" and not self.url:
            raise ValueError("source.kind 'supabase' needs source.url (use --url URL)")
        if self.since and self.until and self.since >= self.until:
            raise ValueError(f"source.since ({self.since}) must be before source.until ({self.until})")
        return self


class ColumnsConfig(_Strict):
    """Names of the source's columns; they are mapped to user_id/item_id/timestamp/rating.
    ``extra`` columns are carried into the snapshot as they are (for validation)."""

    user: str = "user_id"
    item: str = "item_id"
    time: str = "timestamp"
    rating: str | None = None
    extra: list[str] = Field(default_factory=list)

    def source_columns(self) -> list[str]:
        """The source's columns to read: mapped ones, then extras, without repeats."""
        cols = [self.user, self.item, self.time, *([self.rating] if self.rating else []), *self.extra]
        return list(dict.fromkeys(cols))


QUESTION_ATTEMPTS_COLUMNS: dict[str, Any] = {
    "user": "user_id",
    "item": "question_id",
    "time": "created_at",
    "rating": None,
    "extra": ["is_correct", "response_time_seconds", "difficulty_level", "topic", "subtopic"],
}


class PrivacyConfig(_Strict):
    """Learner ids are replaced by a keyed HMAC-SHA256 at extract, before anything is written."""

    pseudonymize: bool | None = Field(
        default=None, description="default: on for postgres/supabase sources, off for files and demos"
    )
    key_env: str = Field(default="RECFLOW_PSEUDONYM_KEY", description="env var holding the HMAC key")
    secret_block: str | None = Field(default=None, description="Prefect Secret block holding the key")


class IncrementalConfig(_Strict):
    """Nightly runs append only rows newer than the stored watermark."""

    enabled: bool = False
    store_dir: Path = Field(default=Path("data-store"), description="snapshot store + watermarks")
    full_refresh: bool = Field(default=False, description="ignore the watermark and re-read everything")


class ValidationConfig(_Strict):
    suite: Literal["auto", "interactions", "question_attempts"] = Field(
        default="auto", description="auto: question_attempts when those columns are present"
    )
    max_duplicate_fraction: float = Field(default=0.01, ge=0, le=1)
    future_tolerance_hours: float = Field(default=24.0, ge=0)
    max_row_drop: float = Field(default=0.5, ge=0, le=1, description="fail if rows drop more than this vs last snapshot")
    difficulty_range: tuple[float, float] = (1.0, 5.0)


class DatasetConfig(_Strict):
    """How the snapshot becomes train/valid/test."""

    split: Literal["loo", "ratio"] = Field(
        default="loo", description="loo: time-ordered leave-one-out; ratio: time-ordered ratio split"
    )
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    max_seq_length: int = Field(default=50, ge=2, description="history length for sequential models")
    min_user_interactions: int = Field(default=5, ge=3)
    min_item_interactions: int = Field(default=1, ge=1)

    @field_validator("ratios")
    @classmethod
    def _ratios_sum_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if abs(sum(v) - 1.0) > 1e-6 or min(v) <= 0:
            raise ValueError(f"dataset.ratios must be three positive numbers summing to 1, got {v}")
        return v


class ModelConfig(_Strict):
    """Any RecBole model by name, with its hyper-parameters overridden in ``params``."""

    name: str = "SASRec"
    params: dict[str, Any] = Field(default_factory=dict, description="RecBole hyper-parameters")


class TrainingConfig(_Strict):
    # Train to convergence: a high epoch cap, early stopping on the valid metric, and a wall-time
    # budget that keeps the best epoch. Figures behind the defaults: benchmarks/README.md.
    epochs: int = Field(default=200, ge=1, description="epoch cap; early stopping normally ends training first")
    # 30: the 850k-attempt bank needs ~18 min of CPU training to early stopping; 15 cut it short.
    max_minutes: float | None = Field(
        default=30.0, gt=0, description="training wall-time budget (train + valid epochs): training ends cleanly "
        "after the epoch that crosses it and keeps the best epoch; None: no budget",
    )
    objective: Literal["all_positions", "last_item"] = Field(
        default="all_positions",
        description="sequential models: all_positions trains every window once with a target at every position "
        "(SASRec, GRU4Rec; BERT4Rec masks items over whole windows); last_item is RecBole's one row per prefix. "
        "Other sequential models always train last_item",
    )
    loss: Literal["ce", "sampled_softmax", "gbce"] = Field(
        default="ce", description="all_positions: full-catalogue cross-entropy, or a sampled loss for huge catalogues "
        "(model.params.loss_type applies to last_item only)",
    )
    negatives: int = Field(default=256, ge=1, description="sampled_softmax/gbce: negatives drawn per batch")
    gbce_t: float = Field(default=0.75, ge=0, le=1, description="gbce: calibration t (0: plain BCE, 1: calibrated)")
    window_stride: int | None = Field(
        default=None, ge=1, description="all_positions: new targets per window, cut back from the newest item; every "
        "target keeps max_seq_length - stride items of context. Default: max_seq_length // 2",
    )
    train_batch_size: int | Literal["auto"] | None = Field(
        default=None,
        description="rows per optimizer step (windows on the all_positions path), or 'auto': on a GPU, probe the "
        "largest batch that fits with auto_batch_headroom spare (core/modeling/batch_finder.py); on CPU, the default. "
        "Default: 128 windows (all_positions), 1024 rows otherwise",
    )
    auto_batch_headroom: float = Field(
        default=0.2, ge=0.0, lt=1.0, description="train_batch_size=auto: fraction of GPU memory left unused"
    )
    auto_batch_max: int | None = Field(
        default=None, ge=1, description="train_batch_size=auto: the largest batch to try; default: no limit"
    )
    eval_batch_size: int = Field(default=4096, ge=1)
    learning_rate: float = Field(default=0.001, gt=0)
    device: Device = "auto"
    seed: int = 2020
    # RecBole's own stopping_step: ml-100k's valid curve (943 users) rises in steps with flat stretches
    # of 5-9 epochs, and patience 5 stopped SASRec at test NDCG@10 0.071 instead of 0.079.
    early_stopping_patience: int = Field(default=10, ge=1, description="epochs without valid gain")
    early_stopping_min_gain: float = Field(
        default=0.005, ge=0, description="the smallest valid gain that resets the patience, as a fraction of the "
        "best score (0.005: 0.5%); smaller gains count as no gain",
    )
    threads: int | None = Field(default=None, ge=1, description="CPU threads; default: all cores")
    fast_cpu_dropout: bool = Field(
        default=True, description="on CPU, dropout from rand>=p (same distribution, ~4x faster than torch's)"
    )
    grad_accumulation: int = Field(
        default=1,
        ge=1,
        description="micro-batches per optimizer step: each train batch is split into this many parts "
        "(same effective batch, less memory); doubled automatically on a GPU out-of-memory error",
    )
    min_micro_batch: int = Field(
        default=8, ge=1, description="smallest micro-batch the out-of-memory step-down may reach before failing"
    )
    amp: Literal["off", "bf16", "fp16"] = Field(
        default="off",
        description="mixed precision: autocast to bfloat16/float16 (CUDA; bf16 also on CPU; off on MPS). "
        "fp16 adds a gradient scaler",
    )
    tf32: bool = Field(default=True, description="CUDA only: TF32 matmuls and cuDNN convolutions (Ampere+)")
    compile: bool = Field(
        default=False, description="torch.compile the model's forward; on failure, warn and train uncompiled"
    )
    clip_grad_norm: float | None = Field(
        default=None, gt=0, description="clip the gradients' total norm to this (RecBole's clip_grad_norm max_norm)"
    )
    dataloader_workers: int = Field(
        default=0, ge=0, description="worker processes loading batches (RecBole's `worker`); 0: in the main process"
    )

    # train_batch_size=auto on CPU (nothing to probe), and what RecBole's loaders are built with
    # until the batch finder has chosen (core/modeling/batch_finder.py).
    AUTO_BATCH_DEFAULT: ClassVar[int] = 1024
    WINDOW_BATCH_DEFAULT: ClassVar[int] = 128

    @property
    def initial_train_batch_size(self) -> int:
        if self.train_batch_size in (None, "auto"):
            return self.AUTO_BATCH_DEFAULT
        return int(self.train_batch_size)

    def default_batch(self, windows: bool) -> int:
        """The batch ``train_batch_size: None`` (and ``auto`` on CPU) means: windows or RecBole rows."""
        return self.WINDOW_BATCH_DEFAULT if windows else self.AUTO_BATCH_DEFAULT

    @field_validator("train_batch_size", mode="before")
    @classmethod
    def _batch_or_auto(cls, v: Any) -> Any:
        # One clear message instead of pydantic's two (one per member of the union).
        if v is None:
            return None
        if isinstance(v, str) and v.strip().lower() == "auto":
            return "auto"
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v.strip())
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"must be a positive integer or 'auto', got {v!r}")
        return v


class EvaluationConfig(_Strict):
    task: Literal["ranking", "rating"] = Field(
        default="ranking",
        description="ranking: full-ranking top-k metrics vs a Pop baseline (higher wins); rating: RMSE/MAE of "
        "predicted ratings on the original scale vs the train mean rating (lower wins; needs a rating column). "
        "Unset: rating when metrics are all RMSE/MAE, else ranking",
    )
    metrics: list[str] = Field(default_factory=lambda: list(METRIC_NAMES))
    topk: list[int] = Field(default_factory=lambda: [5, 10, 20])
    valid_metric: str = Field(default="NDCG@10", description="picks the best epoch")
    gate_metric: str = Field(default="NDCG@10", description="decides promotion")
    min_improvement: float = Field(
        default=0.0, ge=0, description="candidate must beat the baseline and champion by more than this"
    )

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data: Any) -> Any:
        # The task is resolved here so the dumped config always names it; a rating preset only
        # needs `task: rating` (or `metrics: [RMSE, MAE]`), the rest follows.
        if not isinstance(data, dict):
            return data
        data = dict(data)
        metrics = data.get("metrics")
        if data.get("task") is None:
            value_only = isinstance(metrics, list) and bool(metrics) and all(m in VALUE_METRIC_NAMES for m in metrics)
            data["task"] = "rating" if value_only else "ranking"
        if data["task"] == "rating":
            data.setdefault("metrics", list(VALUE_METRIC_NAMES))
            data.setdefault("valid_metric", "RMSE")
            data.setdefault("gate_metric", "RMSE")
        return data

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in METRIC_NAMES and m not in VALUE_METRIC_NAMES]
        if unknown:
            raise ValueError(
                f"unknown metric(s) {unknown}; choose from {list(METRIC_NAMES)} (ranking) "
                f"or {list(VALUE_METRIC_NAMES)} (rating)"
            )
        return v

    @model_validator(mode="after")
    def _metric_is_computed(self) -> EvaluationConfig:
        if self.task == "rating":
            ranking = [m for m in self.metrics if m not in VALUE_METRIC_NAMES]
            if ranking:
                raise ValueError(
                    f"evaluation.task 'rating' computes {list(VALUE_METRIC_NAMES)} only; "
                    f"remove the ranking metric(s) {ranking} from evaluation.metrics"
                )
            for field in ("valid_metric", "gate_metric"):
                value = getattr(self, field)
                if value not in self.metrics:
                    raise ValueError(
                        f"evaluation.{field} '{value}' must be one of the computed rating metrics "
                        f"({', '.join(self.metrics)}), e.g. RMSE"
                    )
            return self
        values = [m for m in self.metrics if m in VALUE_METRIC_NAMES]
        if values:
            raise ValueError(
                f"evaluation.metrics {values} are rating metrics: set evaluation.task: rating "
                f"(and list only {list(VALUE_METRIC_NAMES)}), or drop them for ranking"
            )
        for field in ("valid_metric", "gate_metric"):
            value = getattr(self, field)
            name, _, k = value.partition("@")
            if name not in self.metrics or not k.isdigit() or int(k) not in self.topk:
                raise ValueError(
                    f"evaluation.{field} '{value}' must be one of the computed metrics "
                    f"({', '.join(self.metrics)} at {self.topk}), e.g. NDCG@10"
                )
        return self


class ExportConfig(_Strict):
    enabled: bool = True
    opset: int = 17
    parity_tolerance: float = Field(default=1e-4, gt=0)
    parity_users: int = Field(default=256, ge=1, description="test users checked torch vs ONNX")


class RegistryConfig(_Strict):
    path: Path = Path("registry")
    model_name: str | None = Field(
        default=None, description="registry entry; default '<data>-<model>', e.g. ml-100k-sasrec"
    )


class TrackingConfig(_Strict):
    """What a run records besides checkpoints (see README "Tracking")."""

    wandb: bool = Field(default=True, description="record a Weights & Biases run under <run>/wandb (if installed)")
    wandb_project: str = "recflow"
    wandb_mode: Literal["offline", "online", "disabled"] = Field(
        default="offline", description="offline: no network, `wandb sync` later; online needs WANDB_API_KEY"
    )
    gpu_sample_seconds: float = Field(
        default=5.0, gt=0, description="CUDA: seconds between GPU usage samples (<run>/gpu_usage.csv)"
    )
    training_curve: bool = Field(default=True, description="draw <run>/training_curve.png")


NotifyEvent = Literal["failure", "promotion", "rejection"]


class NotifyConfig(_Strict):
    """Webhook notifications (Discord/Slack-style JSON POST) sent by the flow's hooks (core/release/notify.py).

    The webhook URL is a secret (it alone authorises posting), so it is never in the config: it is
    read from the environment variable ``webhook_env`` or, when that is unset, from the Prefect
    Secret block ``secret_block``. No URL configured: nothing is sent.
    """

    webhook_env: str = Field(default="RECFLOW_WEBHOOK_URL", description="env var holding the webhook URL")
    secret_block: str | None = Field(
        default=None, description="Prefect Secret block holding the webhook URL; used when webhook_env is unset"
    )
    # Named `events`, not `on`: YAML 1.1 reads a bare `on:` key as the boolean true.
    events: list[NotifyEvent] = Field(
        default_factory=lambda: ["failure", "promotion"], description="which run outcomes post a message"
    )
    format: Literal["discord", "slack", "generic"] = Field(
        default="generic", description="discord: {content}; slack: {text}; generic: both plus structured fields"
    )
    timeout_seconds: float = Field(default=5.0, gt=0, le=60, description="POST timeout; a slow webhook never blocks a run")


class ShippingConfig(_Strict):
    """Ship the champion to a production host over SFTP (core/release/shipping/sftp.py).

    Key authentication only, strict host-key checking against ``known_hosts`` (unknown hosts
    are refused, never added). The private key is never in the config: ``key_env`` names an
    environment variable holding a key FILE path or the key text, or ``key_secret_block``
    names a Prefect Secret block holding either.
    """

    enabled: bool = Field(default=False, description="ship each promoted version after deploy")
    host: str | None = Field(default=None, description="production host name or IP")
    port: int = Field(default=22, ge=1, le=65535, description="SSH port")
    username: str | None = Field(default=None, description="SSH login user on the host")
    remote_dir: str | None = Field(
        default=None, description="absolute directory on the host; versions go to <remote_dir>/<model>/<version>/"
    )
    known_hosts: Path = Field(
        default=Path("~/.ssh/known_hosts"), description="known_hosts file the host's key must already be in"
    )
    key_env: str = Field(
        default="RECFLOW_SSH_KEY", description="env var holding the private key file path, or the key text itself"
    )
    passphrase_env: str = Field(
        default="RECFLOW_SSH_KEY_PASSPHRASE", description="env var holding the key's passphrase (if encrypted)"
    )
    key_secret_block: str | None = Field(
        default=None, description="Prefect Secret block holding the key (text or file path); used when key_env is unset"
    )
    keep_versions: int = Field(
        default=5, ge=1, description="versions kept on the host (the champion and the previous one are always kept)"
    )
    connect_timeout: float = Field(default=15.0, gt=0, description="seconds for TCP connect, banner and auth")

    @model_validator(mode="after")
    def _needs_target(self) -> ShippingConfig:
        if self.enabled:
            missing = [f"shipping.{name}" for name in ("host", "username", "remote_dir") if not getattr(self, name)]
            if missing:
                raise ValueError(f"shipping is enabled but {', '.join(missing)} is not set")
        if self.remote_dir is not None and not self.remote_dir.startswith("/"):
            raise ValueError(f"shipping.remote_dir must be an absolute path on the host, got {self.remote_dir!r}")
        if self.remote_dir is not None and "\n" in self.remote_dir:
            raise ValueError("shipping.remote_dir must not contain a newline")
        return self


class PipelineConfig(_Strict):
    """Everything a run needs. Defaults: SASRec on the MovieLens-100k copy in RecBole's wheel."""

    runs_dir: Path = Field(default=Path("runs"), description="one sub-folder per run")
    source: SourceConfig = Field(default_factory=SourceConfig)
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    incremental: IncrementalConfig = Field(default_factory=IncrementalConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    shipping: ShippingConfig = Field(default_factory=ShippingConfig)
    notify: NotifyConfig = Field(default_factory=NotifyConfig)

    @model_validator(mode="after")
    def _question_attempts_columns(self) -> PipelineConfig:
        # Database and synthetic sources default to the ed-tech table's column names.
        # Fields the user set (YAML or flags) win.
        if self.source.kind in ("postgres", "supabase", "synthetic"):
            explicit = self.columns.model_dump(include=self.columns.model_fields_set)
            self.columns = ColumnsConfig(**{**QUESTION_ATTEMPTS_COLUMNS, **explicit})
        return self

    @model_validator(mode="after")
    def _rating_task_needs_ratings(self) -> PipelineConfig:
        # Caught here, before any work: a rating model trained on a source without ratings.
        if self.evaluation.task != "rating":
            return self
        if self.source.kind == "synthetic":
            raise ValueError("evaluation.task 'rating' needs a rating column; the synthetic source has none")
        if self.source.kind != "ml-100k" and not self.columns.rating:
            raise ValueError(
                f"evaluation.task 'rating' needs a rating column: name it with columns.rating (--rating-col); "
                f"the {self.source.kind} source maps none"
            )
        return self

    @property
    def data_name(self) -> str:
        if self.source.kind == "file" and self.source.path is not None:
            return self.source.path.stem
        if self.source.kind in ("postgres", "supabase"):
            return self.source.table.replace("_", "-")
        return self.source.kind

    @property
    def pseudonymize(self) -> bool:
        if self.privacy.pseudonymize is not None:
            return self.privacy.pseudonymize
        return self.source.kind in ("postgres", "supabase")

    @property
    def registry_name(self) -> str:
        if self.registry.model_name:
            return self.registry.model_name
        return f"{self.data_name}-{self.model.name}".lower().replace("_", "-")


def default_window_stride(max_seq_length: int) -> int:
    """training.window_stride when unset: half a window of new targets, half of context."""
    return max(max_seq_length // 2, 1)


def effective_value(config: PipelineConfig, path: str) -> Any:
    """The value a dotted config key takes in a run: the config's own, or what an unset (None)
    key resolves to at training time (so a tuning study can recognise the preset's values)."""
    node: Any = config.model_dump(mode="json")
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if node is None and path == "training.window_stride":
        return default_window_stride(config.dataset.max_seq_length)
    return node


def _format_validation_error(err: ValidationError, origin: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        parts.append(f"{loc}: {e['msg']}")
    return f"invalid configuration ({origin}): " + "; ".join(parts)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _dotted_to_nested(overrides: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def preset_names() -> list[str]:
    """The presets shipped with recflow (``configs/*.yaml``, package data), by name."""
    from importlib import resources

    return sorted(p.name.removesuffix(".yaml") for p in resources.files("configs").iterdir()
                  if p.name.endswith(".yaml"))


def resolve_config_path(path: Path | str) -> Path:
    """A YAML file by path, else a shipped preset by name: ``ml-100k-ease``, ``ml-100k-ease.yaml``
    or ``configs/ml-100k-ease.yaml`` (the checkout-relative path, from any directory)."""
    from importlib import resources

    p = Path(path)
    if p.is_file():
        return p
    if p.parent in (Path("."), Path("configs")):
        name = p.name if p.name.endswith(".yaml") else f"{p.name}.yaml"
        preset = resources.files("configs") / name
        if preset.is_file():
            return Path(str(preset))
    raise ConfigError(f"config file not found: {p} (not a file, nor a preset: {', '.join(preset_names())})")


def load_config(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load a YAML preset (or the defaults) and apply dotted overrides like ``{"training.epochs": 2}``.

    ``path`` is a YAML file or the name of a shipped preset (``resolve_config_path``). Relative
    paths inside a YAML file are kept as written (relative to the working directory), matching
    how the CLI resolves ``--data``.
    """
    raw: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        p = resolve_config_path(path)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        raw = loaded
        origin = str(p)
    if overrides:
        raw = _deep_merge(raw, _dotted_to_nested({k: v for k, v in overrides.items() if v is not None}))
        origin += " + command-line flags"
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, origin)) from None


def dump_config(config: PipelineConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
