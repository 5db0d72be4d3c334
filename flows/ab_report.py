"""The A/B report: serving log + outcomes -> per-arm rates, differences, SRM, drift -> artifacts + webhook.

    from core.online.settings import ABReportSettings
    from flows.ab_report import ab_report
    report = ab_report(ABReportSettings(log_dir=Path("serve-logs"), out_dir=Path("ab-report"), ...))
"""

from __future__ import annotations

from prefect import flow

import flows  # noqa: F401  (Prefect environment defaults)
from core.online.report import ABReport
from core.online.settings import ABReportSettings
from tasks.ab_report import drift_task, outcomes_task, publish_task, stats_task, trigger_nightly_task


@flow(name="ab-report", log_prints=True)
def ab_report(settings: ABReportSettings) -> ABReport:
    summary = outcomes_task(settings)
    analysis, mixed = stats_task(settings, summary)
    drift = drift_task(settings)
    nightly = None
    if settings.trigger_nightly and any(d.warnings for d in drift):
        nightly = trigger_nightly_task(settings)
    ab = ABReport(experiment=summary.experiment, window_hours=settings.window_hours, alpha=settings.alpha,
                  log_rows=summary.log_rows, served_rows=summary.served_rows, shadow_rows=summary.shadow_rows,
                  unassigned_rows=summary.unassigned_rows, outcome_rows=summary.outcome_rows,
                  matched_learners=summary.matched_learners,
                  learners_in_several_arms=mixed, analysis=analysis, drift=drift, nightly_triggered=nightly)
    return publish_task(ab, settings)
