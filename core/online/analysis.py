"""Per-learner sums -> per-arm rates, arm differences and the sample-ratio check."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from pydantic import BaseModel

from core.errors import OutcomeLogError
from core.online.ab_stats import Difference, Estimate, SRMResult, difference, ratio_estimate, srm_test
from core.online.settings import EXPERIMENT_RECORD, PAST_RECORDS_DIR

HIT_RATE = "hit rate"
CORRECTNESS = "correctness"
_TIME_KEYS = ("at", "ts", "changed_at", "time")


class ArmResult(BaseModel):
    """One arm's traffic and rates (each rate's interval computed per learner)."""

    arm: str
    requests: int
    learners: int
    hit_rate: Estimate  # requests with some listed item attempted in the window / requests
    correctness: Estimate  # listed items answered right on the first graded attempt / graded ones


class Analysis(BaseModel):
    control: str | None
    arms: list[ArmResult]
    differences: list[Difference]
    srm: SRMResult | None
    srm_note: str | None = None


def read_record(path: Path) -> dict[str, Any] | None:
    """The experiment record JSON; None when there is no file; ``OutcomeLogError`` when it is malformed."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("arms"), list):
            raise ValueError("it has no `arms` list")
        for arm in record["arms"]:
            str(arm["name"]), float(arm.get("weight", 0.0))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OutcomeLogError(f"cannot read the experiment record {path}: {exc}") from None
    return record


def find_record(log_dir: Path, experiment: str | None, explicit: Path | None = None) -> dict[str, Any] | None:
    """The record of ``experiment``: ``explicit`` if given, else ``<log dir>/experiment.json`` when it is that
    experiment, else the archived ``<log dir>/experiments/<id>.json`` (``recflow serve`` moves a replaced one there).

    Args:
        log_dir: the serving log folder.
        experiment: the experiment id the report is about (None: whatever experiment.json holds).
        explicit: a record file the user named (--record); it must exist.

    Returns:
        The record, or None when there is none for this experiment.
    """
    if explicit is not None:
        if not explicit.is_file():
            raise OutcomeLogError(f"no experiment record {explicit} (--record)")
        return read_record(explicit)
    current = read_record(log_dir / EXPERIMENT_RECORD)
    if current is not None and (experiment is None or current.get("id") == experiment):
        return current
    return read_record(log_dir / PAST_RECORDS_DIR / f"{experiment}.json") if experiment else None


def _parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)  # the contract's times are UTC


def _weights(entry: dict[str, Any]) -> dict[str, float]:
    w = entry.get("weights", entry.get("arms"))
    if isinstance(w, dict):
        return {str(k): float(v) for k, v in w.items()}
    return {str(a["name"]): float(a.get("weight", 0.0)) for a in w or [] if not a.get("shadow")}


def weight_schedule(record: dict[str, Any]) -> list[tuple[datetime | None, dict[str, float]]]:
    """(from when, live-arm weights) in time order; the first entry holds the record's arms."""
    live = {str(a["name"]): float(a.get("weight", 0.0)) for a in record["arms"] if not a.get("shadow")}
    schedule: list[tuple[datetime | None, dict[str, float]]] = [(None, live)]
    changes = []
    for entry in record.get("history") or []:
        if not isinstance(entry.get("weights", entry.get("arms")), (dict, list)):
            continue  # "resumed", "stopped": no weight change
        at = next((entry[k] for k in _TIME_KEYS if k in entry), None)
        changes.append((_parse_time(at), _weights(entry)))
    changes.sort(key=lambda c: c[0] or datetime.min.replace(tzinfo=UTC))
    return schedule + changes


def expected_learner_shares(first_seen: list[datetime], record: dict[str, Any]) -> dict[str, float]:
    """Expected learners per arm: each learner's arm drawn by the weights in force when first seen."""
    schedule = weight_schedule(record)
    totals: dict[str, float] = {}
    for t in first_seen:
        weights = schedule[0][1]
        for at, w in schedule[1:]:
            if at is None or at <= t:
                weights = w
        s = sum(v for v in weights.values() if v > 0)
        for arm, v in weights.items():
            if v > 0 and s > 0:
                totals[arm] = totals.get(arm, 0.0) + v / s
    return totals


def analyse(learners: pl.DataFrame, record: dict[str, Any] | None, *, control: str | None = None,
            alpha: float = 0.05, srm_alpha: float = 0.001) -> Analysis:
    """Per-arm rates, every arm against the control, and the SRM check.

    Args:
        learners: ``outcomes.per_learner`` rows (arm, session, requests, hits, graded, correct, first_ts).
        record: the experiment record (None: no SRM check).
        control: the arm to compare with; default the record's first live arm, else the first by name.
        alpha: 1 - confidence of the intervals.
        srm_alpha: SRM flags below this p-value.

    Returns:
        The analysis.
    """
    arms_seen = sorted(learners["arm"].unique().to_list())
    order = [str(a["name"]) for a in (record or {}).get("arms", []) if not a.get("shadow")]
    names = [a for a in order if a in arms_seen] + [a for a in arms_seen if a not in order]
    results = []
    for name in names:
        rows = learners.filter(pl.col("arm") == name)
        results.append(ArmResult(
            arm=name, requests=int(rows["requests"].sum()), learners=rows.height,
            hit_rate=ratio_estimate(rows["hits"].to_numpy(), rows["requests"].to_numpy(), alpha),
            correctness=ratio_estimate(rows["correct"].to_numpy(), rows["graded"].to_numpy(), alpha),
        ))
    ctrl = control or (names[0] if names else None)
    if ctrl is not None and ctrl not in names:
        raise OutcomeLogError(f"control arm {ctrl!r} has no served requests (arms: {', '.join(names) or 'none'})")
    by_name = {r.arm: r for r in results}
    diffs = []
    for r in results:
        if r.arm == ctrl or ctrl is None:
            continue
        c = by_name[ctrl]
        diffs.append(difference(HIT_RATE, (ctrl, c.hit_rate), (r.arm, r.hit_rate), alpha))
        diffs.append(difference(CORRECTNESS, (ctrl, c.correctness), (r.arm, r.correctness), alpha))
    srm, note = None, None
    if record is None:
        note = "no experiment record: sample-ratio check skipped"
    else:
        first = learners.group_by("session").agg(pl.col("first_ts").min())["first_ts"].to_list()
        shares = expected_learner_shares(first, record)
        if len([v for v in shares.values() if v > 0]) < 2:
            note = "the record has fewer than two live arms with weight: sample-ratio check skipped"
        else:
            # A learner is counted once, in the arm of their first request (assignment is sticky).
            firsts = learners.sort("first_ts").group_by("session").first()
            observed = {str(a): int(n) for a, n in firsts.group_by("arm").len().iter_rows()}
            srm = srm_test(observed, shares, srm_alpha)
            stray = sorted(set(observed) - set(shares))
            if stray:
                note = f"arm(s) {', '.join(stray)} are not in the record's weights: left out of the check"
    return Analysis(control=ctrl, arms=results, differences=diffs, srm=srm, srm_note=note)


def learners_in_several_arms(learners: pl.DataFrame) -> int:
    """Learners seen in more than one arm (a weight change or a broken assignment)."""
    counts = learners.group_by("session").len()["len"].to_numpy()
    return int(np.sum(counts > 1))
