"""Exceptions a user can cause. Each carries a message a person can act on.

The CLI turns any ``RecflowError`` into one line on stderr and a non-zero exit;
anything else is a bug in recflow and keeps its traceback.
"""

from __future__ import annotations


class RecflowError(Exception):
    """Base class for errors caused by input, config or environment."""


class ConfigError(RecflowError):
    """The configuration (YAML, CLI flags or flow parameters) is invalid."""


class DataSourceError(RecflowError):
    """A source cannot be read: missing file, wrong format, unknown column."""


class DataValidationError(RecflowError):
    """The data failed the data-quality suite; ``report_path`` holds the details."""

    def __init__(self, message: str, report_path: str | None = None) -> None:
        super().__init__(message)
        self.report_path = report_path


class ModelNotFoundError(RecflowError):
    """The requested RecBole model name does not exist."""


class TrainingError(RecflowError):
    """Training could not complete (diverged, no valid data, device unavailable)."""


class ExportError(RecflowError):
    """ONNX export or its parity check failed."""


class RegistryError(RecflowError):
    """The model registry is unreadable or in an inconsistent state."""


class PipelineFailed(RecflowError):
    """Raised by the flow when a step fails; names the step."""

    def __init__(self, stage: str, error: str, run_dir: str | None = None) -> None:
        super().__init__(f"{stage} failed: {error}")
        self.stage = stage
        self.error = error
        self.run_dir = run_dir
