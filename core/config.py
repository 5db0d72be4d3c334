"""The typed configuration tree.

One ``PipelineConfig`` drives a run. It loads from YAML presets in ``configs/``,
takes CLI overrides, and is the typed parameter of the Prefect flow (so the
Prefect UI renders it as a form). Every default here runs on a laptop CPU on
MovieLens-100k in a few minutes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import ConfigError

Device = Literal["auto", "cpu", "cuda", "mps"]
METRIC_NAMES = ("Recall", "MRR", "NDCG", "Hit", "Precision")


class _Strict(BaseModel):
    # A typo in a YAML key must fail loudly rather than be ignored.
    model_config = ConfigDict(extra="forbid")


class SourceConfig(_Strict):
    """Where interactions come from."""

    kind: Literal["ml-100k", "file"] = "ml-100k"
    path: Path | None = Field(default=None, description="CSV or Parquet file (kind=file)")
    format: Literal["auto", "csv", "parquet"] = "auto"
    separator: str = Field(default=",", description="CSV field separator")

    @model_validator(mode="after")
    def _file_needs_path(self) -> "SourceConfig":
        if self.kind == "file" and self.path is None:
            raise ValueError("source.kind 'file' needs source.path (use --data PATH)")
        return self


class ColumnsConfig(_Strict):
    """Names of the source's columns; they are mapped to user_id/item_id/timestamp/rating."""

    user: str = "user_id"
    item: str = "item_id"
    time: str = "timestamp"
    rating: str | None = None


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
    # Defaults sized for the default run (SASRec, ml-100k, 2-core CPU, a few minutes):
    # a higher learning rate than RecBole's 0.001 beats Pop after the first epoch.
    epochs: int = Field(default=2, ge=1)
    train_batch_size: int = Field(default=1024, ge=1)
    eval_batch_size: int = Field(default=4096, ge=1)
    learning_rate: float = Field(default=0.003, gt=0)
    device: Device = "auto"
    seed: int = 2020
    early_stopping_patience: int = Field(default=5, ge=1, description="epochs without valid gain")
    threads: int | None = Field(default=None, ge=1, description="CPU threads; default: all cores")


class EvaluationConfig(_Strict):
    metrics: list[str] = Field(default_factory=lambda: list(METRIC_NAMES))
    topk: list[int] = Field(default_factory=lambda: [5, 10, 20])
    valid_metric: str = Field(default="NDCG@10", description="picks the best epoch")
    gate_metric: str = Field(default="NDCG@10", description="decides promotion")
    min_improvement: float = Field(
        default=0.0, ge=0, description="candidate must exceed Pop and champion by more than this"
    )

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in METRIC_NAMES]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRIC_NAMES)}")
        return v

    @model_validator(mode="after")
    def _metric_is_computed(self) -> "EvaluationConfig":
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


class PipelineConfig(_Strict):
    """Everything a run needs. Defaults: SASRec on the MovieLens-100k copy in RecBole's wheel."""

    runs_dir: Path = Field(default=Path("runs"), description="one sub-folder per run")
    source: SourceConfig = Field(default_factory=SourceConfig)
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)

    @property
    def data_name(self) -> str:
        if self.source.kind == "file" and self.source.path is not None:
            return self.source.path.stem
        return self.source.kind

    @property
    def registry_name(self) -> str:
        if self.registry.model_name:
            return self.registry.model_name
        return f"{self.data_name}-{self.model.name}".lower().replace("_", "-")


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


def load_config(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load a YAML preset (or the defaults) and apply dotted overrides like ``{"training.epochs": 2}``.

    Relative paths inside a YAML file are kept as written (relative to the working directory),
    matching how the CLI resolves ``--data``.
    """
    raw: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
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
