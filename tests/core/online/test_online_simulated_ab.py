"""The whole measurement on simulated learners: a known difference is recovered, A/A flags ~5 %, SRM.

The simulated learners never see the arm (``simulate.respond`` gets only whether the list holds
their true next question); arms differ only in how often their list holds it.
"""

from __future__ import annotations

import inspect
from datetime import timedelta

import polars as pl
import pytest

from core.data.privacy import pseudonymize_ids
from core.online.analysis import analyse
from core.online.outcomes import attempts_outcomes, join_outcomes, per_learner
from core.online.simulate import SimArm, SimSettings, expected_hit_rate, respond, simulate

KEY = b"a-test-pseudonym-key-32-bytes-ok"


def _analyse(s: SimSettings, record_weights: dict[str, float] | None = None):
    sim = simulate(s, KEY)
    record = sim.record if record_weights is None else {
        **sim.record, "arms": [{**a, "weight": record_weights[a["name"]]} for a in sim.record["arms"]],
        "history": []}
    # The attempts carry raw ids, as question_attempts does: pseudonymised here as the extract would.
    attempts = pseudonymize_ids(sim.attempts.rename({"question_id": "item_id", "created_at": "timestamp"}), KEY)
    joined = join_outcomes(sim.requests, attempts_outcomes(attempts), timedelta(hours=s.window_hours))
    return analyse(per_learner(joined), record)


def test_learners_decide_without_the_arm() -> None:
    assert "arm" not in " ".join(inspect.signature(respond).parameters)


def test_a_known_difference_is_recovered_with_an_interval_excluding_zero() -> None:
    # p_hit 0.5, base 0.05: recall 0.3 -> hit rate 0.1925, recall 0.5 -> 0.2875 (difference 0.095).
    s = SimSettings(arms=(SimArm("control", 0.3), SimArm("treatment", 0.5)), learners=3_000, seed=3, shadow=True)
    a = _analyse(s)
    truth = {arm.name: expected_hit_rate(arm.recall, s.p_hit, s.base_rate) for arm in s.arms}
    by_arm = {r.arm: r for r in a.arms}
    # Within 4 standard errors (a 95 % interval misses 1 time in 20 by design; 4 se about 1 in 16,000).
    for name, rate in truth.items():
        est = by_arm[name].hit_rate
        assert abs(est.value - rate) < 4 * est.se, (name, rate, est)
    hit = next(d for d in a.differences if d.metric == "hit rate")
    assert hit.significant and hit.low > 0
    assert abs(hit.value - (truth["treatment"] - truth["control"])) < 4 * (hit.high - hit.low) / (2 * 1.96)
    # Correctness depends on skill only, never on the arm: no difference expected.
    corr = next(d for d in a.differences if d.metric == "correctness")
    assert corr.low <= 0 <= corr.high
    assert a.srm is not None and not a.srm.flagged


def test_a_a_tests_flag_a_difference_about_five_percent_of_the_time() -> None:
    seeds = 200
    flags = sum(
        next(d for d in _analyse(SimSettings(arms=(SimArm("a", 0.4), SimArm("b", 0.4)), learners=300, seed=seed))
             .differences if d.metric == "hit rate").significant
        for seed in range(seeds)
    )
    # Binomial(200, 0.05): mean 10, sd 3.1; [3, 19] holds 99.5 % of it. Both ends matter: an
    # interval that is too wide would pass "at most 5 %" by never flagging anything.
    assert 3 <= flags <= 19, f"{flags}/{seeds} A/A tests flagged a difference"


def test_srm_flags_a_45_55_assignment_against_a_50_50_record() -> None:
    arms = (SimArm("a", 0.4, weight=0.45), SimArm("b", 0.4, weight=0.55))
    bad = _analyse(SimSettings(arms=arms, learners=20_000, requests_per_learner=1, seed=5),
                   record_weights={"a": 0.5, "b": 0.5})
    assert bad.srm is not None and bad.srm.flagged
    fair = _analyse(SimSettings(arms=(SimArm("a", 0.4), SimArm("b", 0.4)), learners=20_000,
                                requests_per_learner=1, seed=5))
    assert fair.srm is not None and not fair.srm.flagged


def test_srm_follows_the_record_s_weight_history() -> None:
    # All learners arrive after a change to 20/80: the check must expect 20/80, not the record's 50/50.
    s = SimSettings(arms=(SimArm("a", 0.4, weight=0.2), SimArm("b", 0.4, weight=0.8)), learners=10_000,
                    requests_per_learner=1, seed=2, record_weights={"a": 0.5, "b": 0.5})
    sim = simulate(s, KEY)
    # The history as `recflow serve` writes it (core/serving/arms.py): actions, some without weights.
    record = {**sim.record, "history": [
        {"at": "2025-12-01T00:00:00Z", "action": "started", "weights": {"a": 0.5, "b": 0.5}},
        {"at": "2025-12-20T00:00:00Z", "action": "resumed"},
        {"at": "2026-01-01T00:00:00+00:00", "action": "weights", "weights": {"a": 0.2, "b": 0.8}, "by": "cli"},
        {"at": "2026-01-02T00:00:00+00:00", "action": "resumed"}]}
    attempts = pseudonymize_ids(sim.attempts.rename({"question_id": "item_id", "created_at": "timestamp"}), KEY)
    learners = per_learner(join_outcomes(sim.requests, attempts_outcomes(attempts), timedelta(hours=24)))
    assert not analyse(learners, record).srm.flagged
    assert analyse(learners, {**record, "history": []}).srm.flagged


def test_the_simulated_log_keeps_the_contract() -> None:
    sim = simulate(SimSettings(arms=(SimArm("a", 0.4), SimArm("b", 0.4)), learners=50, shadow=True,
                               history_mean=80), KEY)
    r = sim.requests
    assert r.schema["ts"] == pl.Datetime("us", "UTC") and r.schema["rec_items"] == pl.List(pl.String)
    assert r.schema["n_items"] == pl.Int32 and r.schema["rec_scores"] == pl.List(pl.Float32)
    assert r.filter(pl.col("items").is_null())["n_items"].min() > 200  # null only past the cap
    kept = r.filter(pl.col("items").is_not_null())
    assert (kept["items"].list.len() == kept["n_items"]).all()
    assert r["shadow"].sum() == r.height // 2
    assert not set(sim.attempts["user_id"]) & set(r["session"])  # the log holds pseudonyms only


@pytest.mark.parametrize("recall", [0.0, 1.0])
def test_extreme_recalls_give_the_expected_rates(recall: float) -> None:
    s = SimSettings(arms=(SimArm("a", recall), SimArm("b", recall)), learners=2_000, seed=11)
    a = _analyse(s)
    want = expected_hit_rate(recall, s.p_hit, s.base_rate)
    for arm in a.arms:
        assert abs(arm.hit_rate.value - want) < 4 * arm.hit_rate.se, (arm, want)
