"""Per-learner statistics for an A/B test: ratio estimates with intervals, arm differences, SRM.

The learner is the randomisation unit, so every interval treats a learner's requests together:
a rate is ``sum(numerator) / sum(denominator)`` over learners, and its variance comes from the
delta method on the per-learner sums (requests of one learner are not independent draws).
Arms hold different learners, so the variance of a difference is the sum of the two.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from pydantic import BaseModel
from scipy import stats


class Estimate(BaseModel):
    """A rate with its interval; ``low``/``high`` are None when it cannot be computed (< 2 learners)."""

    value: float | None
    low: float | None
    high: float | None
    se: float | None
    learners: int  # learners with a non-zero denominator


class Difference(BaseModel):
    """``treatment - control`` of one metric, its interval and two-sided p-value."""

    metric: str
    control: str
    treatment: str
    value: float | None
    low: float | None
    high: float | None
    p_value: float | None
    significant: bool  # the interval excludes 0


class SRMResult(BaseModel):
    """Sample-ratio mismatch: learners per arm against the shares the experiment record implies."""

    observed: dict[str, int]
    expected: dict[str, float]  # expected learner counts
    chi2: float
    dof: int
    p_value: float
    flagged: bool


def z_value(alpha: float) -> float:
    """The two-sided normal quantile for ``1 - alpha`` confidence."""
    return float(stats.norm.ppf(1 - alpha / 2))


def ratio_estimate(num: np.ndarray, den: np.ndarray, alpha: float = 0.05) -> Estimate:
    """``sum(num) / sum(den)`` over learners with its delta-method interval.

    Args:
        num: per-learner numerators (e.g. requests with a hit).
        den: per-learner denominators (e.g. requests); learners with 0 are left out.
        alpha: 1 - confidence.

    Returns:
        The estimate; value None when no learner has a denominator.
    """
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    keep = den > 0
    num, den = num[keep], den[keep]
    n = int(den.size)
    if n == 0:
        return Estimate(value=None, low=None, high=None, se=None, learners=0)
    mx, my = num.mean(), den.mean()
    ratio = float(mx / my)
    if n < 2:
        return Estimate(value=ratio, low=None, high=None, se=None, learners=n)
    cov = np.cov(num, den, ddof=1)
    var = (cov[0, 0] - 2 * ratio * cov[0, 1] + ratio**2 * cov[1, 1]) / (n * my**2)
    se = float(math.sqrt(max(var, 0.0)))
    z = z_value(alpha)
    return Estimate(value=ratio, low=ratio - z * se, high=ratio + z * se, se=se, learners=n)


def difference(metric: str, control: tuple[str, Estimate], treatment: tuple[str, Estimate],
               alpha: float = 0.05) -> Difference:
    """``treatment - control`` with a normal interval (independent arms: variances add).

    Args:
        metric: the metric's name, for the report.
        control: (arm name, its estimate).
        treatment: (arm name, its estimate).
        alpha: 1 - confidence.

    Returns:
        The difference; value/interval None when either side has no interval.
    """
    (c_name, c), (t_name, t) = control, treatment
    if c.value is None or t.value is None or c.se is None or t.se is None:
        value = None if c.value is None or t.value is None else t.value - c.value
        return Difference(metric=metric, control=c_name, treatment=t_name, value=value, low=None, high=None,
                          p_value=None, significant=False)
    value = t.value - c.value
    se = math.sqrt(c.se**2 + t.se**2)
    z = z_value(alpha)
    if se == 0:
        p = 1.0 if value == 0 else 0.0
    else:
        p = float(2 * stats.norm.sf(abs(value) / se))
    low, high = value - z * se, value + z * se
    return Difference(metric=metric, control=c_name, treatment=t_name, value=value, low=low, high=high,
                      p_value=p, significant=bool(low > 0 or high < 0))


def srm_test(observed: Mapping[str, int], shares: Mapping[str, float], alpha: float = 0.001) -> SRMResult:
    """Chi-square goodness of fit of learners per arm against the expected shares.

    Args:
        observed: learners seen per arm.
        shares: the share of learners each arm should get (any positive scale; normalised here).
            Arms absent from ``observed`` count 0 learners.
        alpha: a p-value below this flags a mismatch (0.001 is the usual, strict choice: an SRM
            check runs on every report, and a false alarm stops an experiment).

    Returns:
        The test result.
    """
    arms = [a for a in shares if shares[a] > 0]
    if len(arms) < 2:
        raise ValueError("a sample-ratio check needs at least two arms with a positive weight")
    total_share = sum(shares[a] for a in arms)
    obs = np.array([observed.get(a, 0) for a in arms], dtype=float)
    n = obs.sum()
    exp = np.array([shares[a] / total_share for a in arms]) * n
    chi2 = float(((obs - exp) ** 2 / np.where(exp > 0, exp, 1)).sum()) if n > 0 else 0.0
    dof = len(arms) - 1
    p = float(stats.chi2.sf(chi2, dof)) if n > 0 else 1.0
    return SRMResult(observed={a: int(o) for a, o in zip(arms, obs)}, expected=dict(zip(arms, exp.tolist())),
                     chi2=chi2, dof=dof, p_value=p, flagged=bool(p < alpha))
