"""The A/B report as files and a message: JSON, markdown, a PNG of per-arm rates, a webhook post."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from core.config import NotifyConfig
from core.online.ab_stats import Estimate
from core.online.analysis import Analysis
from core.online.drift import DriftResult
from core.online.settings import LEARNERS_FILE  # noqa: F401  (the report folder's files, one place)

REPORT_JSON = "ab_report.json"
REPORT_MD = "ab_report.md"
REPORT_PNG = "ab_report.png"

_log = logging.getLogger(__name__)
NO_MATCH = ("no outcome belongs to a learner in the log: are the attempts' ids pseudonymised with the key "
            "the server uses (--pseudonymize, RECFLOW_PSEUDONYM_KEY)?")


class ABReport(BaseModel):
    """What ``recflow ab-report`` found (the flow's return value and ``ab_report.json``)."""

    experiment: str | None
    window_hours: float
    alpha: float
    log_rows: int
    served_rows: int
    shadow_rows: int
    unassigned_rows: int
    outcome_rows: dict[str, int]  # attempts, events
    matched_learners: int = 0  # served learners with any outcome; 0 with outcomes: ids do not line up
    learners_in_several_arms: int
    analysis: Analysis
    drift: list[DriftResult] = Field(default_factory=list)
    nightly_triggered: str | None = None  # what --trigger-nightly did (the run started, or why not)
    files: dict[str, str] = Field(default_factory=dict)

    @property
    def drift_warnings(self) -> list[str]:
        return [w for d in self.drift for w in d.warnings]

    @property
    def significant(self) -> list[str]:
        return [f"{d.metric}: {d.treatment} vs {d.control}" for d in self.analysis.differences if d.significant]


def _pct(e: Estimate) -> str:
    if e.value is None:
        return "n/a"
    if e.low is None or e.high is None:
        return f"{100 * e.value:.2f}%"
    return f"{100 * e.value:.2f}% [{100 * e.low:.2f}, {100 * e.high:.2f}]"


def _pp(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:+.2f} pp"


def arm_rows(report: ABReport) -> list[dict[str, Any]]:
    """The per-arm table (a Prefect table artifact, and the markdown's first table)."""
    return [{"arm": a.arm, "requests": a.requests, "learners": a.learners, "hit rate": _pct(a.hit_rate),
             "correctness": _pct(a.correctness)} for a in report.analysis.arms]


def markdown(report: ABReport) -> str:
    """The report as markdown (the Prefect markdown artifact and ``ab_report.md``)."""
    a = report.analysis
    conf = f"{100 * (1 - report.alpha):.0f}%"
    lines = [f"# A/B report: {report.experiment or 'no experiment id'}", "",
             f"Outcome window {report.window_hours:g} h; {conf} intervals computed per learner (delta method). "
             f"{report.served_rows} served requests ({report.shadow_rows} shadow rows, {report.unassigned_rows} "
             f"unassigned left out); outcomes: {report.outcome_rows.get('attempts', 0)} attempts, "
             f"{report.outcome_rows.get('events', 0)} events.", "",
             "| arm | requests | learners | hit rate | correctness |", "| --- | ---: | ---: | --- | --- |"]
    if report.matched_learners == 0:
        lines[3:3] = [f"**{NO_MATCH}**", ""]
    lines += [f"| {r['arm']} | {r['requests']} | {r['learners']} | {r['hit rate']} | {r['correctness']} |"
              for r in arm_rows(report)]
    if a.differences:
        lines += ["", f"Differences against the control arm `{a.control}`:", "",
                  "| metric | arm | difference | interval | p-value | |", "| --- | --- | ---: | --- | ---: | --- |"]
        for d in a.differences:
            interval = "n/a" if d.low is None or d.high is None else f"[{_pp(d.low)}, {_pp(d.high)}]"
            p = "n/a" if d.p_value is None else f"{d.p_value:.3g}"
            lines.append(f"| {d.metric} | {d.treatment} | {_pp(d.value)} | {interval} | {p} | "
                         f"{'**differs**' if d.significant else 'no evidence of a difference'} |")
    lines += ["", "## Sample ratio"]
    if a.srm is not None:
        s = a.srm
        obs = ", ".join(f"{k} {v} (expected {s.expected[k]:.0f})" for k, v in s.observed.items())
        verdict = "**MISMATCH: the assignment is broken; do not trust the differences**" if s.flagged else "no mismatch"
        lines.append(f"learners {obs}; chi2 {s.chi2:.2f} ({s.dof} dof), p {s.p_value:.3g}: {verdict}")
    if a.srm_note:
        lines.append(a.srm_note)
    if report.learners_in_several_arms:
        lines.append(f"{report.learners_in_several_arms} learners were served by more than one arm.")
    lines += ["", "## Drift against the training profile", ""]
    if not report.drift:
        lines.append("no registry given (--registry): drift not checked")
    else:
        lines += ["| version | learners | unknown items | item PSI | item JSD | history PSI | |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for d in report.drift:
            f = lambda v, fmt: "n/a" if v is None else format(v, fmt)
            lines.append(f"| {d.entry} {d.version} | {d.learners} | {f(d.unknown_share, '.1%')} | "
                         f"{f(d.item_psi, '.3f')} | {f(d.item_jsd, '.3f')} | {f(d.history_psi, '.3f')} | "
                         f"{'WARN' if d.warnings else (d.note or 'ok')} |")
        lines += [f"- {w}" for w in report.drift_warnings]
    if report.nightly_triggered:
        lines.append(f"nightly run: {report.nightly_triggered}")
    return "\n".join(lines) + "\n"


def plot(report: ABReport, path: Path) -> Path:
    """Per-arm hit rate and correctness with their intervals, side by side (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = report.analysis.arms
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric in zip(axes, ("hit_rate", "correctness")):
        values, errs = [], [[], []]
        for arm in arms:
            e: Estimate = getattr(arm, metric)
            v = e.value if e.value is not None else float("nan")
            values.append(100 * v)
            errs[0].append(100 * (v - e.low) if e.low is not None else 0.0)
            errs[1].append(100 * (e.high - v) if e.high is not None else 0.0)
        x = range(len(arms))
        ax.bar(x, values, yerr=errs, capsize=6, color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][: len(arms)] or None)
        ax.set_xticks(list(x), [a.arm for a in arms])
        ax.set_ylabel("%")
        ax.set_title(f"{metric.replace('_', ' ')} ({100 * (1 - report.alpha):.0f}% CI, per learner)")
    fig.suptitle(f"{report.experiment or 'A/B'}: outcome window {report.window_hours:g} h")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def message(report: ABReport) -> str:
    """The notification text: arms, differences that stand out, SRM and drift warnings."""
    lines = [f"recflow A/B report {report.experiment or ''} (window {report.window_hours:g} h)".replace("  ", " ")]
    lines += [f"{r['arm']}: {r['requests']} requests, {r['learners']} learners, hit {r['hit rate']}, "
              f"correct {r['correctness']}" for r in arm_rows(report)]
    for d in report.analysis.differences:
        if d.significant:
            lines.append(f"{d.metric}: {d.treatment} {_pp(d.value)} vs {d.control} [{_pp(d.low)}, {_pp(d.high)}]")
    if report.analysis.srm is not None and report.analysis.srm.flagged:
        lines.append(f"SAMPLE RATIO MISMATCH (p {report.analysis.srm.p_value:.2g})")
    if report.matched_learners == 0:
        lines.append(NO_MATCH)
    lines += [f"drift: {w}" for w in report.drift_warnings]
    if report.nightly_triggered:
        lines.append(f"nightly run: {report.nightly_triggered}")
    return "\n".join(lines)


def send(report: ABReport, config: NotifyConfig, *, secret_loader: Any = None, logger: Any = None) -> bool:
    """Post ``message(report)`` to the configured webhook; never raises, never logs the URL."""
    from core.release.notify import DISCORD_MAX_CHARS, post_json, resolve_webhook_url

    log = logger or _log
    try:
        url = resolve_webhook_url(config, secret_loader, log)
        if url is None:
            return False
        text = message(report)
        if config.format == "discord":
            payload: dict[str, Any] = {"content": text[:DISCORD_MAX_CHARS]}
        elif config.format == "slack":
            payload = {"text": text}
        else:
            payload = {"text": text, "content": text, "status": "ab-report",
                       "report": report.model_dump(mode="json", exclude={"files"})}
        post_json(url, payload, config.timeout_seconds)
        return True
    except Exception as exc:  # a report is never lost to a webhook: warn without the URL
        log.warning("A/B report notification not delivered (%s)", type(exc).__name__)
        return False
