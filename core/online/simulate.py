"""Simulated learners for tests and demos: a request log and the attempts that follow it.

Each learner has a true sequence of next questions (drawn from a Zipf popularity). At each of
their requests the arm's recommender puts the true next question into the list with the arm's
``recall`` (that is the only thing an arm changes: the quality of its list). The learner then
acts without ever seeing the arm (``respond``): when the list holds their true next question they
attempt it within the window with probability ``p_hit``; independently they attempt another
listed item with probability ``base_rate``; a true next question not taken from the list is
attempted anyway, but after the window. Correctness comes from a per-learner skill.

The expected hit rate of an arm (some listed item attempted in the window) is
``1 - (1 - recall * p_hit) * (1 - base_rate)`` (``expected_hit_rate``).

Everything is vectorised over learners x requests; a few thousand requests take milliseconds.
Learner ids in the log are pseudonymised with the extract's function (``core.data.privacy``);
the attempts keep the raw ids, as the question_attempts table does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa

from core.data.privacy import pseudonym
from core.online.settings import EVENTS_DIR, EXPERIMENT_RECORD, REQUESTS_DIR

HISTORY_CAP = 200  # the log's `items` is null past this (the contract's cap)
START = datetime(2026, 1, 5, tzinfo=UTC)
GAP_WINDOWS = 3  # a learner's requests are 3 windows apart, so windows never overlap


@dataclass(frozen=True)
class SimArm:
    """One arm: its recommender's recall of the true next question, and its traffic weight."""

    name: str
    recall: float
    weight: float = 1.0
    entry: str = "sim-model"
    version: str | None = None


@dataclass(frozen=True)
class SimSettings:
    """A simulated experiment; the ``shift_*``/``unknown_rate``/``history_scale`` knobs make drifted traffic."""

    arms: tuple[SimArm, ...]
    learners: int = 400
    requests_per_learner: int = 5  # mean; each learner makes 1 .. 2m-1 requests
    k: int = 10
    items: int = 300
    p_hit: float = 0.5
    base_rate: float = 0.05
    window_hours: float = 24.0
    history_mean: float = 12.0
    zipf: float = 1.0
    seed: int = 0
    experiment: str = "sim-exp"
    record_weights: dict[str, float] | None = None  # weights the record states (default: the arms' own)
    shadow: bool = False  # also log a shadow arm's (never shown) list per request
    shift_popularity: bool = False  # traffic prefers what training found rare
    unknown_rate: float = 0.0  # share of traffic items training never saw
    history_scale: float = 1.0  # traffic histories this many times longer
    start: datetime = field(default=START)


class Simulation(NamedTuple):
    requests: pl.DataFrame  # the request log (contract schema)
    attempts: pl.DataFrame  # question_attempts rows, raw learner ids
    record: dict[str, Any]  # the experiment record
    training: pl.DataFrame  # a training snapshot from the unshifted population (user_id, item_id, timestamp)


def expected_hit_rate(recall: float, p_hit: float, base_rate: float) -> float:
    """The hit rate an arm with ``recall`` should show (see the module docstring)."""
    return 1 - (1 - recall * p_hit) * (1 - base_rate)


def respond(holds_truth: np.ndarray, skill: np.ndarray, rng: np.random.Generator, *, p_hit: float,
            base_rate: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What learners do with a list; they see whether it holds their true next question, never the arm.

    Args:
        holds_truth: [learners, requests] whether the list holds the true next question.
        skill: [learners] ability; P(correct) = sigmoid(skill).
        rng: the random generator.
        p_hit: P(take the true next question from the list).
        base_rate: P(take some other listed item).

    Returns:
        (took the true next question, took another item, first correct, second correct).
    """
    shape = holds_truth.shape
    took_truth = holds_truth & (rng.random(shape) < p_hit)
    took_other = rng.random(shape) < base_rate
    p_correct = (1 / (1 + np.exp(-skill)))[:, None]
    return took_truth, took_other, rng.random(shape) < p_correct, rng.random(shape) < p_correct


def _lists(tokens: pa.Array, index: np.ndarray, offsets: np.ndarray, null: np.ndarray | None = None) -> pl.Series:
    """A list[str] column from flat token indices and row offsets (arrow, no Python lists)."""
    values = tokens.take(pa.array(index.astype(np.int64)))
    mask = pa.array(null) if null is not None else None
    return pl.Series(pl.from_arrow(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, mask=mask)))


def _popularity(n: int, zipf: float) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** zipf
    return p / p.sum()


def _lengths(rng: np.random.Generator, n: int, s: SimSettings, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(history length before the first request, requests) per learner."""
    h0 = np.maximum(1, np.round(rng.geometric(1 / s.history_mean, n) * scale)).astype(int)
    reqs = rng.integers(1, 2 * s.requests_per_learner, n)
    return h0, reqs


def simulate(s: SimSettings, key: bytes | str) -> Simulation:
    """Simulate one experiment.

    Args:
        s: the settings.
        key: the pseudonymisation key (the same one the extract uses).

    Returns:
        The request log, the attempts, the experiment record and a training snapshot.
    """
    rng = np.random.default_rng(s.seed)
    n, m, window = s.learners, s.items, timedelta(hours=s.window_hours)
    base_pop = _popularity(m, s.zipf)
    pop = base_pop[::-1].copy() if s.shift_popularity else base_pop
    h0, reqs = _lengths(rng, n, s, s.history_scale)
    width = int((h0 + reqs).max())
    seq = rng.choice(m, size=(n, width), p=pop)
    if s.unknown_rate > 0:  # items nobody trained on: ids past the catalogue, each new
        new = rng.random((n, width)) < s.unknown_rate
        seq[new] = m + np.arange(int(new.sum()))
    vocab = np.array([f"q{i}" if i < m else f"new{i}" for i in range(max(m, int(seq.max()) + 1))], dtype=object)

    weights = np.array([a.weight for a in s.arms], dtype=float)
    arm = rng.choice(len(s.arms), size=n, p=weights / weights.sum())
    recall = np.array([a.recall for a in s.arms])[arm]
    skill = rng.normal(0.0, 1.0, n)

    r_max = int(reqs.max())
    live = np.arange(r_max)[None, :] < reqs[:, None]  # [n, r_max] requests that happen
    pos_truth = h0[:, None] + np.arange(r_max)[None, :]
    truth = np.take_along_axis(seq, np.minimum(pos_truth, width - 1), axis=1)
    # The recommender's side (the only place the arm matters): does its list hold the truth?
    holds = (rng.random((n, r_max)) < recall[:, None]) & (truth < m)
    rec = rng.integers(0, m, size=(n, r_max, s.k))
    rec = np.where(rec == truth[..., None], (rec + 1) % m, rec)
    slot = rng.integers(0, s.k, size=(n, r_max))
    np.put_along_axis(rec, slot[..., None], np.where(holds, truth, np.take_along_axis(rec, slot[..., None], 2)[..., 0])[..., None], 2)
    took_truth, took_other, ok_truth, ok_other = respond(holds, skill, rng, p_hit=s.p_hit, base_rate=s.base_rate)

    offset = rng.random(n) * s.window_hours
    ts = (np.datetime64(s.start.replace(tzinfo=None), "us") + (offset * 3.6e9).astype("timedelta64[us]")[:, None]
          + (np.arange(r_max) * GAP_WINDOWS * s.window_hours * 3.6e9).astype("timedelta64[us]")[None, :])
    window_us = np.timedelta64(int(window.total_seconds() * 1e6), "us")
    raw = np.array([f"learner-{s.seed}-{i}" for i in range(n)], dtype=object)
    session = np.array([pseudonym(key, r) for r in raw], dtype=object)

    li, ri = np.nonzero(live)
    n_items = h0[li] + ri
    tokens = pa.array(vocab.tolist(), pa.string())
    in_history = np.arange(width)[None, :] < n_items[:, None]
    offsets = np.concatenate([[0], np.cumsum(n_items)])
    history_rows = seq[li]
    unknown = ((history_rows >= m) & in_history).sum(axis=1).astype(np.int32)
    ids = rng.integers(0, 2**63, size=(len(li), 2))
    names = np.array([a.name for a in s.arms], dtype=object)
    rows: dict[str, Any] = {
        "request_id": [f"{a:016x}{b:016x}" for a, b in ids],
        "ts": pl.Series(ts[li, ri]).dt.replace_time_zone("UTC"),
        "experiment": [s.experiment] * len(li),
        "arm": names[arm[li]].tolist(),
        "shadow": [False] * len(li),
        "entry": [s.arms[a].entry for a in arm[li]],
        "version": [s.arms[a].version or "v-sim" for a in arm[li]],
        "session": session[li].tolist(),
        "items": _lists(tokens, history_rows[in_history], offsets, null=n_items > HISTORY_CAP),
        "n_items": n_items.astype(np.int32),
        "n_unknown": unknown,
        "rec_items": _lists(tokens, rec[li, ri].ravel(), np.arange(len(li) + 1) * s.k),
        "rec_scores": pl.Series(np.tile(np.linspace(1, 0.1, s.k, dtype=np.float32), (len(li), 1))).cast(
            pl.List(pl.Float32)),
    }
    requests = pl.DataFrame(rows)
    if s.shadow:  # a shadow arm scores the same requests; learners never see its list
        shadow_recs = rng.integers(0, m, size=(len(li), s.k))
        requests = pl.concat([requests, requests.with_columns(
            arm=pl.lit("shadow"), shadow=pl.lit(True), version=pl.lit("v-shadow"),
            rec_items=_lists(tokens, shadow_recs.ravel(), np.arange(len(li) + 1) * s.k))])

    # Attempts after requests: the truth in the window when taken from the list, else after it;
    # another listed item in the window with the base rate.
    u = rng.uniform(0.05, 0.95, size=(n, r_max))
    late = np.timedelta64(int(1.5 * window.total_seconds() * 1e6), "us")
    t_truth = ts + np.where(took_truth, (u * window_us.astype(float)).astype("timedelta64[us]"), late)
    other_slot = np.where(holds, (slot + 1) % s.k, slot)
    other = np.take_along_axis(rec, other_slot[..., None], 2)[..., 0]
    t_other = ts + (rng.uniform(0.05, 0.95, size=(n, r_max)) * window_us.astype(float)).astype("timedelta64[us]")
    do_other = live & took_other
    user = np.concatenate([raw[li], raw[np.nonzero(do_other)[0]]])
    attempts = pl.DataFrame({
        "user_id": user.tolist(),
        "question_id": np.concatenate([vocab[truth[li, ri]], vocab[other[do_other]]]).tolist(),
        "created_at": pl.Series(np.concatenate([t_truth[li, ri], t_other[do_other]])).dt.replace_time_zone("UTC"),
        "is_correct": np.concatenate([ok_truth[li, ri], ok_other[do_other]]),
    }).with_columns(response_time_seconds=pl.lit(30.0, pl.Float32), difficulty_level=pl.lit(3, pl.Int8),
                    topic=pl.lit("sim"), subtopic=pl.lit("sim"))

    stated = s.record_weights or {a.name: a.weight for a in s.arms}
    started = s.start.isoformat()
    record = {
        "id": s.experiment, "salt": f"sim-{s.seed}", "started_at": started, "stopped_at": None,
        "arms": [{"name": a.name, "entry": a.entry, "version": a.version, "weight": stated[a.name], "shadow": False}
                 for a in s.arms],
        "history": [{"at": started, "weights": dict(stated)}],
    }
    return Simulation(requests, attempts, record, _training(s, base_pop))


def _training(s: SimSettings, pop: np.ndarray) -> pl.DataFrame:
    """A training snapshot from the unshifted population: histories as long as the traffic's latest ones."""
    rng = np.random.default_rng(s.seed + 10_007)
    h0, reqs = _lengths(rng, s.learners, s, 1.0)
    lengths = h0 + reqs - 1
    users = np.repeat(np.arange(s.learners), lengths)
    items = rng.choice(len(pop), size=int(lengths.sum()), p=pop)
    return pl.DataFrame({"user_id": [f"t{u}" for u in users], "item_id": [f"q{i}" for i in items],
                         "timestamp": pl.Series(np.full(len(users), np.datetime64("2025-12-01", "us")))
                         .dt.replace_time_zone("UTC")})


def write_log(sim: Simulation, log_dir: Any, *, files: int = 2) -> None:
    """Write the simulation as a serving log folder: requests in ``files`` Parquet parts, the record.

    Args:
        sim: the simulation.
        log_dir: the folder (created).
        files: how many request files (as several serve workers would write).
    """
    import json
    from pathlib import Path

    log_dir = Path(log_dir)
    (log_dir / REQUESTS_DIR).mkdir(parents=True, exist_ok=True)
    (log_dir / EVENTS_DIR).mkdir(parents=True, exist_ok=True)
    step = -(-sim.requests.height // files)
    for i in range(files):
        part = sim.requests.slice(i * step, step)
        if part.height:
            part.write_parquet(log_dir / REQUESTS_DIR / f"requests-w{i}-20260105T000000Z-{i:04d}.parquet")
    (log_dir / EXPERIMENT_RECORD).write_text(json.dumps(sim.record, indent=2))


def write_demo(root: Any, key: bytes | str, *, learners: int = 2_000, seed: int = 0, drifted: bool = False) -> None:
    """A demo folder for ``recflow ab-report``: ``logs/``, ``attempts.csv`` (raw ids) and ``registry/``.

    Two arms of one entry (control v1 with recall 0.3, treatment v2 with recall 0.5), both
    versions registered with the training profile (``drifted``: the traffic is not like it).

    Args:
        root: the folder to fill.
        key: the pseudonymisation key (the report needs the same one: ``RECFLOW_PSEUDONYM_KEY``).
        learners: simulated learners.
        seed: the simulation's seed.
        drifted: reverse the traffic's item popularity and add 10 % unknown items.
    """
    from pathlib import Path

    from core.online.profile import build_profile, write_profile
    from core.release.artifacts import write_checksums

    root = Path(root)
    arms = (SimArm("control", 0.3, version="v1"), SimArm("treatment", 0.5, version="v2"))
    shift: dict[str, Any] = {"shift_popularity": True, "unknown_rate": 0.1} if drifted else {}
    sim = simulate(SimSettings(arms=arms, learners=learners, seed=seed, shadow=True, **shift), key)
    write_log(sim, root / "logs")
    sim.attempts.write_csv(root / "attempts.csv")
    trained_on = build_profile(simulate(SimSettings(arms=arms, learners=learners, seed=seed), key).training)
    for arm in arms:
        version_dir = root / "registry" / arm.entry / str(arm.version)
        write_profile(trained_on, version_dir)
        write_checksums(version_dir)


if __name__ == "__main__":  # python -m core.online.simulate DIR [--drifted]
    import os
    import sys

    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    demo_key = os.environ.get("RECFLOW_PSEUDONYM_KEY")
    if len(args) != 1 or not demo_key:
        sys.exit("usage: RECFLOW_PSEUDONYM_KEY=... python -m core.online.simulate DIR [--drifted]")
    write_demo(args[0], demo_key, drifted="--drifted" in sys.argv)
    print(f"recflow ab-report --log-dir {args[0]}/logs --attempts {args[0]}/attempts.csv --pseudonymize "
          f"--registry {args[0]}/registry")
