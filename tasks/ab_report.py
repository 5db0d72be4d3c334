"""The A/B report's steps as Prefect tasks: outcomes, statistics, drift, publish, nightly trigger."""

from __future__ import annotations

from collections.abc import Callable

import polars as pl
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from core.online import drift, report
from core.online.analysis import Analysis, analyse, find_record, learners_in_several_arms
from core.online.drift import DriftResult
from core.online.outcomes import OutcomeSummary, collect
from core.online.report import NO_MATCH, ABReport
from core.online.settings import ABReportSettings
from tasks._common import artifact_key, load_prefect_secret, retry_unless_user_error


def _loader(settings: ABReportSettings) -> Callable[[str], str] | None:
    """The Secret-block reader, only when some block is configured (no Prefect API call otherwise)."""
    cfg = settings.attempts
    blocks = [settings.notify.secret_block] + ([cfg.privacy.secret_block, cfg.source.dsn_secret_block,
                                                cfg.source.key_secret_block] if cfg is not None else [])
    return load_prefect_secret if any(blocks) else None


@task(name="ab-outcomes", cache_policy=NO_CACHE, retries=2, retry_condition_fn=retry_unless_user_error)
def outcomes_task(settings: ABReportSettings) -> OutcomeSummary:
    """Read the request log, events and attempts; join them in the window; per-learner sums to disk."""
    summary = collect(settings, secret_loader=_loader(settings))
    if summary.matched_learners == 0:
        get_run_logger().warning(NO_MATCH)
    get_run_logger().info("experiment %s: %d log rows (%d served), outcomes %s", summary.experiment,
                          summary.log_rows, summary.served_rows, summary.outcome_rows)
    return summary


@task(name="ab-stats", cache_policy=NO_CACHE)
def stats_task(settings: ABReportSettings, summary: OutcomeSummary) -> tuple[Analysis, int]:
    """Per-arm rates with per-learner intervals, differences to the control, the SRM check."""
    learners = pl.read_parquet(summary.learners_path)
    record = find_record(settings.log_dir, summary.experiment, settings.record)
    analysis = analyse(learners, record, control=settings.control,
                       alpha=settings.alpha, srm_alpha=settings.srm_alpha)
    if analysis.srm is not None and analysis.srm.flagged:
        get_run_logger().warning("sample ratio mismatch: p %.2g; the differences are not trustworthy",
                                 analysis.srm.p_value)
    return analysis, learners_in_several_arms(learners)


@task(name="ab-drift", cache_policy=NO_CACHE)
def drift_task(settings: ABReportSettings) -> list[DriftResult]:
    """Served traffic against each version's training profile."""
    results = drift.check(settings)
    for w in (w for r in results for w in r.warnings):
        get_run_logger().warning("drift: %s", w)
    return results


@task(name="ab-publish", cache_policy=NO_CACHE)
def publish_task(ab: ABReport, settings: ABReportSettings) -> ABReport:
    """JSON, markdown and PNG in the report folder; table + markdown Prefect artifacts; the webhook."""
    out = settings.out_dir
    files = {"json": out / report.REPORT_JSON, "markdown": out / report.REPORT_MD, "plot": out / report.REPORT_PNG}
    report.plot(ab, files["plot"])
    text = report.markdown(ab)
    files["markdown"].write_text(text)
    ab = ab.model_copy(update={"files": {k: str(v) for k, v in files.items()}})
    files["json"].write_text(ab.model_dump_json(indent=2))
    key = artifact_key("ab-report", ab.experiment or "no-experiment")
    create_table_artifact(table=report.arm_rows(ab), key=f"{key}-arms", description="per-arm rates (per-learner CIs)")
    create_markdown_artifact(markdown=text, key=key, description="A/B report: differences, sample ratio, drift")
    report.send(ab, settings.notify, secret_loader=_loader(settings), logger=get_run_logger())
    return ab


@task(name="trigger-nightly", cache_policy=NO_CACHE)
def trigger_nightly_task(settings: ABReportSettings) -> str:
    """Start the nightly deployment now (drift warned and --trigger-nightly); says what happened.

    A trigger that fails (no such deployment, server unreachable) is a warning in the report,
    never a lost report.
    """
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    try:
        run = run_deployment(name=settings.nightly_deployment, timeout=0, tags=["drift"], as_subflow=False)
    except Exception as exc:
        why = f"{settings.nightly_deployment} not started: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        logger.warning("drift: %s", why)
        return why
    logger.info("drift: started %s as flow run %s", settings.nightly_deployment, run.name)
    return f"{settings.nightly_deployment} started as flow run {run.name}"
