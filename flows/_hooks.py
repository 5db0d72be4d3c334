"""Flow state hooks: turn a finished run into a webhook notification (core/release/notify.py).

Hooks run in the flow-run process after the final state is known. They must never change the
run's outcome, so every step here is guarded and a problem is only logged.
"""

from __future__ import annotations

import logging
from typing import Any

from core.config import NotifyConfig, PipelineConfig
from core.errors import PipelineFailed
from core.records import PipelineResult
from core.release.notify import Outcome, notify
from tasks._common import load_prefect_secret

log = logging.getLogger(__name__)


def _config(flow_run: Any) -> PipelineConfig | None:
    """The run's config from its parameters (a dict when the run came from a deployment)."""
    raw = (getattr(flow_run, "parameters", None) or {}).get("config")
    if isinstance(raw, PipelineConfig):
        return raw
    try:
        return PipelineConfig.model_validate(raw or {})
    except Exception:
        return None


def _run_url(flow_run: Any) -> str | None:
    from prefect.settings import PREFECT_UI_URL

    ui = PREFECT_UI_URL.value()
    return f"{str(ui).rstrip('/')}/runs/flow-run/{flow_run.id}" if ui else None


def _run_logger(flow: Any, flow_run: Any) -> Any:
    """The run's own logger, so a delivery warning shows in the run's logs in the UI."""
    try:
        from prefect.logging.loggers import flow_run_logger

        return flow_run_logger(flow_run, flow)
    except Exception:
        return log


def _send(flow: Any, flow_run: Any, build: Any) -> None:
    logger = _run_logger(flow, flow_run)
    try:
        config = _config(flow_run)
        outcome: Outcome = build(config)
        notify(outcome, config.notify if config else NotifyConfig(), secret_loader=load_prefect_secret, logger=logger)
    except Exception as exc:
        logger.warning("notification hook failed (%s: %s)", type(exc).__name__, exc)


def notify_on_completion(flow: Any, flow_run: Any, state: Any) -> None:
    """Promoted or rejected: the gate's decision, figures and reasons."""

    def build(config: PipelineConfig | None) -> Outcome:
        result = state.result()
        if isinstance(result, dict):
            result = PipelineResult.model_validate(result)
        promoted = result.status == "promoted"
        return Outcome(
            event="promotion" if promoted else "rejection",
            flow_run=flow_run.name,
            stage=result.stage,
            model=config.registry_name if config else None,
            version=result.model_version,
            champion=result.champion,
            gate=result.gate,
            reasons=list(result.gate.reasons) if result.gate else [],
            run_url=_run_url(flow_run),
        )

    _send(flow, flow_run, build)


def notify_on_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """Failed or crashed: the step that failed and its one-line error."""

    def build(config: PipelineConfig | None) -> Outcome:
        exc = state.result(raise_on_failure=False)
        if isinstance(exc, PipelineFailed):
            stage, error = exc.stage, exc.error
        else:
            # Not from a step (bad parameters, a crash): the state message says what happened.
            stage, error = "flow", state.message or type(exc).__name__
        return Outcome(
            event="failure",
            flow_run=flow_run.name,
            stage=stage,
            model=config.registry_name if config else None,
            error=error,
            run_url=_run_url(flow_run),
        )

    _send(flow, flow_run, build)
