"""Exceptions a user can cause. Each carries a message a person can act on.

The CLI turns any ``RecflowError`` into one line on stderr and a non-zero exit;
anything else is a bug in recflow and keeps its traceback.

Every recflow exception class lives here and its name ends in ``Error``; an old name kept for
existing callers is an alias (``PipelineFailed = PipelineFailedError``), and the module that
defined a class before re-exports it.
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


class ChecksumError(RegistryError):
    """A registered file does not match the sha256 in its version's ``checksums.json`` (or has none)."""


class ServingError(RecflowError):
    """The model cannot be served (no champion, not exportable, wrong registry entry)."""


class ShippingError(RecflowError):
    """Shipping a version to (or rolling back on) the production host failed; production unchanged."""


class HostKeyError(ShippingError):
    """The host's SSH key is not in known_hosts, or differs from it: refused, never auto-added."""


class ShippingAuthError(ShippingError):
    """The host refused the SSH key, or the key cannot be read (missing, encrypted, malformed)."""


class ShippingConnectionError(ShippingError):
    """The connection failed or dropped (transient): the flow's ship task retries only these."""


class ChampionNotComparableError(RecflowError):
    """The champion cannot be evaluated on tonight's data; the reason says why (the gate falls back to Pop)."""


class DeploymentError(RecflowError):
    """The deployments cannot be created: Prefect API unreachable, bad schedule, wrong pool type."""


class TuningError(RecflowError):
    """A hyper-parameter search cannot go on: a bad search space or study storage, or trials failing in a row."""


class TrialFailedError(TuningError):
    """One tuning trial failed (diverged, out of memory, ...): Optuna marks it FAIL and the study goes on."""


class EnsembleError(RecflowError):
    """Seed models that cannot form one ensemble: different models, data or configurations, or no checkpoint."""


class OutcomeLogError(RecflowError):
    """The A/B report cannot read its inputs: no request log, an empty one, unreadable outcomes or record."""


class BadRequestError(RecflowError):
    """A serving request the server refuses; ``status`` is the HTTP status, ``detail`` the reason sent back."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class PipelineFailedError(RecflowError):
    """Raised by the flow when a step fails; names the step."""

    def __init__(self, stage: str, error: str, run_dir: str | None = None) -> None:
        super().__init__(f"{stage} failed: {error}")
        self.stage = stage
        self.error = error
        self.run_dir = run_dir


# Old names, kept so existing imports and ``except`` clauses keep working.
PipelineFailed = PipelineFailedError
ChampionNotComparable = ChampionNotComparableError
