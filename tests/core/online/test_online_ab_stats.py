"""Per-learner ratio intervals, arm differences and the sample-ratio check on small, hand-checked inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.online.ab_stats import difference, ratio_estimate, srm_test, z_value


def test_ratio_estimate_is_the_ratio_of_sums_with_the_delta_method_interval() -> None:
    num, den = np.array([1, 0, 3, 2]), np.array([2, 1, 4, 2])
    e = ratio_estimate(num, den, alpha=0.05)
    assert e.value == pytest.approx(6 / 9) and e.learners == 4
    # The delta method by hand: (s_x^2 - 2 R s_xy + R^2 s_y^2) / (n * mean(y)^2).
    r, my = 6 / 9, den.mean()
    sx, sy, sxy = np.var(num, ddof=1), np.var(den, ddof=1), np.cov(num, den, ddof=1)[0, 1]
    se = math.sqrt((sx - 2 * r * sxy + r * r * sy) / (4 * my * my))
    assert e.se == pytest.approx(se)
    assert (e.low, e.high) == pytest.approx((r - 1.959964 * se, r + 1.959964 * se), rel=1e-5)


def test_learners_without_a_denominator_are_left_out_and_one_learner_has_no_interval() -> None:
    assert ratio_estimate(np.array([0, 1]), np.array([0, 2])).learners == 1
    one = ratio_estimate(np.array([1]), np.array([2]))
    assert one.value == 0.5 and one.low is None and one.se is None
    none = ratio_estimate(np.array([]), np.array([]))
    assert none.value is None and none.learners == 0


def test_a_learner_with_many_requests_widens_the_interval_compared_with_independent_requests() -> None:
    # 100 learners; one half always hit, the other never: requests of a learner move together.
    num = np.r_[np.full(50, 10), np.zeros(50)]
    den = np.full(100, 10)
    per_learner = ratio_estimate(num, den)
    naive_se = math.sqrt(0.5 * 0.5 / den.sum())  # as if the 1000 requests were independent
    assert per_learner.value == 0.5 and per_learner.se > 2 * naive_se


def test_difference_flags_only_an_interval_that_excludes_zero() -> None:
    a = ratio_estimate(np.r_[np.ones(300), np.zeros(700)], np.ones(1000))
    b = ratio_estimate(np.r_[np.ones(400), np.zeros(600)], np.ones(1000))
    d = difference("hit rate", ("a", a), ("b", b))
    assert d.value == pytest.approx(0.1) and d.significant and d.low > 0 and d.p_value < 1e-4
    same = difference("hit rate", ("a", a), ("a2", a))
    assert same.value == 0 and not same.significant and same.p_value == pytest.approx(1.0)
    assert z_value(0.05) == pytest.approx(1.959964, rel=1e-6)


def test_difference_without_intervals_is_never_significant() -> None:
    one = ratio_estimate(np.array([1]), np.array([1]))
    many = ratio_estimate(np.zeros(50), np.ones(50))
    d = difference("hit rate", ("a", many), ("b", one))
    assert d.value == 1.0 and d.low is None and not d.significant


def test_srm_flags_a_45_55_split_on_a_50_50_record_and_not_a_fair_draw() -> None:
    bad = srm_test({"a": 9_000, "b": 11_000}, {"a": 0.5, "b": 0.5})
    assert bad.flagged and bad.chi2 == pytest.approx(200.0) and bad.expected == {"a": 10_000.0, "b": 10_000.0}
    rng = np.random.default_rng(7)
    n_a = int(rng.binomial(20_000, 0.5))
    fair = srm_test({"a": n_a, "b": 20_000 - n_a}, {"a": 1, "b": 1})
    assert not fair.flagged and fair.p_value > 0.001
    # Unequal weights are honoured: a 20/80 record expects 20/80.
    assert not srm_test({"a": 2_000, "b": 8_000}, {"a": 1, "b": 4}).flagged
    assert srm_test({"a": 5_000, "b": 5_000}, {"a": 1, "b": 4}).flagged


def test_srm_needs_two_live_arms() -> None:
    with pytest.raises(ValueError, match="two arms"):
        srm_test({"a": 10}, {"a": 1.0, "b": 0.0})
