"""Data profiles and drift: shifted simulated traffic warns, unshifted traffic does not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from core.errors import ChecksumError
from core.online.drift import compare, jsd, popularity_buckets, psi
from core.online.profile import build_profile, read_profile, write_profile
from core.online.settings import DriftThresholds
from core.online.simulate import SimArm, SimSettings, simulate
from core.release.artifacts import DATA_PROFILE_FILE, write_checksums

KEY = "a-test-pseudonym-key-32-bytes-ok"
ARMS = (SimArm("a", 0.4), SimArm("b", 0.4))


def test_profile_counts_items_and_history_lengths() -> None:
    frame = pl.DataFrame({"user_id": ["u1"] * 3 + ["u2"] * 6, "item_id": ["a", "a", "b", "a", "c", "c", "c", "c", "d"]})
    p = build_profile(frame, top_n=2)
    assert (p.rows, p.learners, p.items) == (9, 2, 4)
    assert p.top_items == [("c", pytest.approx(4 / 9)), ("a", pytest.approx(3 / 9))]
    assert p.tail_share == pytest.approx(2 / 9)
    counts = dict(zip(p.history_edges, p.history_counts))
    assert counts[3] == 1 and counts[5] == 1 and sum(p.history_counts) == 2  # lengths 3 and 6
    assert "u1" not in json.dumps(p.model_dump())  # no learner id in the profile


def test_psi_and_jsd_are_zero_on_equal_distributions_and_grow_with_shift() -> None:
    p = np.array([0.5, 0.3, 0.2])
    assert psi(p, p * 1000) == pytest.approx(0, abs=1e-9) and jsd(p, p) == pytest.approx(0, abs=1e-9)
    assert psi(p, p[::-1]) > 0.2 and 0 < jsd(p, p[::-1]) < 1


def test_popularity_buckets_hold_similar_training_mass() -> None:
    sim = simulate(SimSettings(arms=ARMS, learners=500), KEY)
    bucket_of, shares = popularity_buckets(build_profile(sim.training))
    assert shares.sum() == pytest.approx(1.0) and len(shares) <= 11
    assert max(shares[:-1]) < 0.35  # the head is cut, not one bucket
    assert bucket_of["q0"] == 0 and max(bucket_of.values()) == len(shares) - 2  # the last bucket: the tail


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unshifted_traffic_does_not_warn(seed: int) -> None:
    sim = simulate(SimSettings(arms=ARMS, learners=600, seed=seed), KEY)
    r = compare(build_profile(sim.training), sim.requests, DriftThresholds(), entry="m", version="v1")
    assert r.warnings == [], r
    assert r.unknown_share == 0 and r.item_psi < 0.1 and r.history_psi < 0.1


@pytest.mark.parametrize("shift", [{"shift_popularity": True}, {"unknown_rate": 0.2}, {"history_scale": 4.0}])
def test_shifted_traffic_warns(shift: dict) -> None:
    base = simulate(SimSettings(arms=ARMS, learners=600, seed=4), KEY)
    shifted = simulate(SimSettings(arms=ARMS, learners=600, seed=4, **shift), KEY)
    r = compare(build_profile(base.training), shifted.requests, DriftThresholds(), entry="m", version="v1")
    assert r.warnings, r
    name = {"shift_popularity": "item-popularity", "unknown_rate": "unknown-item", "history_scale": "history-length"}
    assert any(name[next(iter(shift))] in w for w in r.warnings)


def test_too_little_traffic_or_no_profile_gives_no_verdict() -> None:
    sim = simulate(SimSettings(arms=ARMS, learners=10, unknown_rate=0.5), KEY)
    few = compare(build_profile(sim.training), sim.requests, DriftThresholds(), entry="m", version="v1")
    assert few.warnings == [] and "no drift verdict" in few.note
    none = compare(None, sim.requests, DriftThresholds(), entry="m", version="v0")
    assert none.item_psi is None and "no data profile" in none.note and none.unknown_share > 0


def test_a_registered_profile_is_read_through_its_checksum(tmp_path: Path) -> None:
    version = tmp_path / "v1"
    profile = build_profile(pl.DataFrame({"user_id": ["u", "u"], "item_id": ["a", "b"]}))
    write_profile(profile, version)
    write_checksums(version)
    assert read_profile(version) == profile
    (version / DATA_PROFILE_FILE).write_text((version / DATA_PROFILE_FILE).read_text().replace('"a"', '"z"'))
    with pytest.raises(ChecksumError):
        read_profile(version)
    older = tmp_path / "v0"
    older.mkdir()
    write_checksums(older)
    assert read_profile(older) is None
