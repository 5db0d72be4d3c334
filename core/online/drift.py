"""Serving traffic against the training profile of the version that served it.

Three signals, each with a threshold (``DriftThresholds``):

- unknown-item share: history items the version never saw (``n_unknown / n_items`` of the log);
- item-popularity shift: PSI between the training popularity and the traffic's, over buckets of
  roughly equal training mass (items ranked by training popularity, the tail in one bucket);
- history-length shift: PSI between the histogram of training history lengths and that of the
  traffic's learners.

Traffic is counted once per learner (their latest served request: the history they have now),
which is what the training profile counts too; a learner with many requests weighs no more.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
from pydantic import BaseModel

from core.online.profile import DataProfile, history_histogram
from core.online.settings import ABReportSettings, DriftThresholds

POPULARITY_BUCKETS = 10
EPS = 1e-4  # PSI/JSD smoothing: an empty bucket is "very rare", not "impossible"


class DriftResult(BaseModel):
    """One served version's traffic against its training profile."""

    entry: str
    version: str
    learners: int
    requests: int
    unknown_share: float | None
    item_psi: float | None
    item_jsd: float | None
    history_psi: float | None
    warnings: list[str]
    note: str | None = None  # why there is no verdict (no profile, too little traffic)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    x = x / x.sum() + EPS  # shares first, so counts and shares are smoothed alike
    return x / x.sum()


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index ``sum((a - e) * ln(a / e))`` over smoothed shares."""
    e, a = _normalise(expected), _normalise(actual)
    return float(((a - e) * np.log(a / e)).sum())


def jsd(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0: same, 1: disjoint)."""
    p, q = _normalise(p), _normalise(q)
    m = (p + q) / 2
    return float(0.5 * (p * np.log2(p / m)).sum() + 0.5 * (q * np.log2(q / m)).sum())


def popularity_buckets(profile: DataProfile, n_buckets: int = POPULARITY_BUCKETS) -> tuple[dict[str, int], np.ndarray]:
    """Items of the profile's top list -> bucket, and the training share of each bucket (last: the tail).

    Buckets are cut along the popularity ranking when their training mass reaches
    ``(1 - tail) / n_buckets``, so each holds about the same training mass.
    """
    head_mass = 1.0 - profile.tail_share
    target = head_mass / n_buckets if head_mass > 0 else 1.0
    bucket_of: dict[str, int] = {}
    shares: list[float] = [0.0]
    for item, share in profile.top_items:
        if shares[-1] >= target and len(shares) < n_buckets:
            shares.append(0.0)
        bucket_of[item] = len(shares) - 1
        shares[-1] += share
    return bucket_of, np.array([*shares, profile.tail_share])


def latest_per_learner(served: pl.DataFrame) -> pl.DataFrame:
    """Each learner's latest served request (requests without a session count once each)."""
    keyed = served.with_columns(pl.coalesce(pl.col("session"), pl.col("request_id")).alias("_learner"))
    return keyed.sort("ts").group_by("_learner").last().drop("_learner")


def compare(profile: DataProfile | None, traffic: pl.DataFrame, thresholds: DriftThresholds, *,
            entry: str, version: str) -> DriftResult:
    """Drift of one version's traffic (its served request rows) against its profile.

    Args:
        profile: the version's training profile; None: no verdict (the note says why).
        traffic: request-log rows served by this version (``items``, ``n_items``, ``n_unknown``, ...).
        thresholds: when to warn.
        entry: registry entry, for the report.
        version: version, for the report.

    Returns:
        The figures and any warnings.
    """
    latest = latest_per_learner(traffic)
    base = {"entry": entry, "version": version, "learners": latest.height, "requests": traffic.height}
    n_items = int(latest["n_items"].fill_null(0).sum())
    unknown = float(latest["n_unknown"].fill_null(0).sum()) / n_items if n_items else None
    empty = {"unknown_share": unknown, "item_psi": None, "item_jsd": None, "history_psi": None}
    if profile is None:
        return DriftResult(**base, **empty, warnings=[], note=f"{entry} {version} has no data profile "
                           "(registered before profiles existed); only the unknown-item share is reported")
    if latest.height < thresholds.min_learners:
        return DriftResult(**base, **empty, warnings=[], note=f"{latest.height} learners in the traffic, fewer than "
                           f"{thresholds.min_learners}: no drift verdict")
    bucket_of, expected = popularity_buckets(profile)
    tail = len(expected) - 1
    items = latest.select(pl.col("items").explode().drop_nulls())["items"]
    counts = items.value_counts()
    actual = np.zeros(len(expected))
    for item, n in zip(counts["items"].to_list(), counts["count"].to_list()):
        actual[bucket_of.get(item, tail)] += n
    hist = history_histogram(latest["n_items"], profile.history_edges)
    result = DriftResult(
        **base, unknown_share=unknown,
        item_psi=psi(expected, actual) if actual.sum() else None,
        item_jsd=jsd(expected, actual) if actual.sum() else None,
        history_psi=psi(np.array(profile.history_counts), np.array(hist)),
        warnings=[],
    )
    checks = [("unknown-item share", result.unknown_share, thresholds.unknown_share),
              ("item-popularity PSI", result.item_psi, thresholds.item_psi),
              ("history-length PSI", result.history_psi, thresholds.history_psi)]
    result.warnings = [f"{entry} {version}: {name} {value:.3f} > {limit:g}"
                       for name, value, limit in checks if value is not None and not math.isnan(value) and value > limit]
    return result


def check(settings: ABReportSettings) -> list[DriftResult]:
    """Drift of each served version (non-shadow rows of the report's experiment) against its profile.

    Args:
        settings: the report's settings; no registry: no drift check (empty list).

    Returns:
        One result per (entry, version) that served traffic.
    """
    from core.errors import RecflowError
    from core.online.outcomes import read_requests, select_experiment
    from core.online.profile import read_profile

    if settings.registry is None:
        return []
    requests, _ = select_experiment(read_requests(settings.log_dir), settings.experiment)
    served = requests.filter(~pl.col("shadow").fill_null(False) & pl.col("version").is_not_null())
    results = []
    for (entry, version), rows in sorted(served.group_by(["entry", "version"]), key=lambda g: str(g[0])):
        version_dir = settings.registry / str(entry) / str(version)
        profile, note = None, None
        if not version_dir.is_dir():
            note = f"{entry} {version} is not in {settings.registry}"
        else:
            try:
                profile = read_profile(version_dir)
            except RecflowError as exc:  # a profile that fails its checksum is no baseline
                note = str(exc)
        result = compare(profile, rows, settings.drift, entry=str(entry), version=str(version))
        if note:
            result.note = note
        results.append(result)
    return results
