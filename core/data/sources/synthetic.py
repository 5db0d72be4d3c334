"""Synthetic ed-tech question attempts with learnable sequential structure.

The generated table has the schema of a real ``question_attempts`` table::

    user_id                str               uuid4-looking, deterministic per seed
    question_id            str               "q-<topic>-<subtopic>-<n>"
    created_at             datetime[us, UTC]
    is_correct             bool
    response_time_seconds  float32           > 0
    difficulty_level       int8              1..5
    topic                  str
    subtopic               str

How it is simulated:

* A fixed curriculum: 5 topics x 4 subtopics, 160 questions by default (8 per subtopic), in a
  fixed order; difficulty rises from 1 to 5 within each subtopic. ``questions_per_subtopic=q``
  gives 20 * q questions; ``questions=N`` gives exactly N, spread over the 20 subtopics as evenly
  as possible (the first ``N % 20`` subtopics get one question more; with N < 20 only the first N
  subtopics exist, one question each).
* Each learner (ability ~ N(0, 1)) starts somewhere in the curriculum and moves forward: mostly to
  the next question, sometimes skipping one, jumping to the next subtopic, or retrying a question
  they just got wrong. After the last question they start again from the first (review).
* P(correct) = sigmoid(ability - (difficulty - 3) * 0.8).
* Response time is lognormal, longer for harder questions and for wrong answers.
* Timestamps increase per learner: sessions of a few minutes, separated by gaps of days.
* Attempts per learner are uniform integers in ``[lo, hi]`` with ``lo = round(0.4 * M)`` (at least
  1) and ``hi = round(2 * M - lo)``, so their mean is ``M = attempts_per_user`` (within 0.25).
  The default M = 37.5 gives today's 15 to 60 attempts (1M rows is about 26,700 learners).
* Realistic sizes: ``generate_question_attempts(22_000, questions=8_000, attempts_per_user=39)``
  is about 858k attempts over all 8,000 questions (``recflow data synth --users 22000
  --questions 8000 --attempts-per-user 39``).

The simulation is vectorised over learners (one numpy step per attempt index), so millions of
rows generate in seconds. ``start`` defaults to a fixed date, so a seed always gives the same
table.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl

from core.config import QUESTION_ATTEMPTS_COLUMNS, SourceConfig
from core.data.sources.base import canonicalise, in_window
from core.errors import ConfigError

TOPICS: dict[str, tuple[str, ...]] = {
    "arithmetic": ("fractions", "decimals", "percentages", "ratios"),
    "algebra": ("linear-equations", "inequalities", "quadratics", "functions"),
    "geometry": ("angles", "triangles", "circles", "area-volume"),
    "statistics": ("averages", "spread", "charts", "sampling"),
    "probability": ("counting", "events", "conditional", "expectation"),
}
MIN_ATTEMPTS, MAX_ATTEMPTS = 15, 60
DEFAULT_QUESTIONS_PER_SUBTOPIC = 8
DEFAULT_QUESTIONS = len(TOPICS) * 4 * DEFAULT_QUESTIONS_PER_SUBTOPIC  # 160
DEFAULT_ATTEMPTS_PER_USER = (MIN_ATTEMPTS + MAX_ATTEMPTS) / 2  # 37.5
DEFAULT_START = datetime(2024, 1, 1, tzinfo=UTC)
EXTRA_COLUMNS = tuple(QUESTION_ATTEMPTS_COLUMNS["extra"])
SCHEMA = pl.Schema(
    {
        "user_id": pl.String,
        "question_id": pl.String,
        "created_at": pl.Datetime("us", "UTC"),
        "is_correct": pl.Boolean,
        "response_time_seconds": pl.Float32,
        "difficulty_level": pl.Int8,
        "topic": pl.String,
        "subtopic": pl.String,
    }
)

# Moves after an attempt (probabilities). A wrong answer is retried with P_RETRY; otherwise the
# learner skips one question, jumps to the next subtopic, or (the rest) takes the next question.
P_RETRY = 0.35
P_SKIP = 0.07
P_JUMP = 0.05
# Sessions: after each attempt a new session starts with this probability (about 8 attempts,
# a few minutes, per session); sessions are days apart.
P_NEW_SESSION = 0.12
_US = 1_000_000
_DAY_US = 86_400 * _US
ENROLMENT_DAYS = 180  # learners' first attempts are spread over this many days after `start`


_SUBTOPICS: tuple[tuple[str, str], ...] = tuple((topic, sub) for topic, subs in TOPICS.items() for sub in subs)


def subtopic_sizes(questions_per_subtopic: int | None = None, *, questions: int | None = None) -> list[int]:
    """Questions in each of the 20 subtopics, in curriculum order (zeros dropped).

    ``questions`` (the bank's total) is spread as evenly as possible: the first ``questions % 20``
    subtopics get one more, so the sizes sum to exactly ``questions``. Without it, every subtopic
    has ``questions_per_subtopic`` questions (8 when neither is given).
    """
    if questions is not None:
        if questions_per_subtopic is not None:
            raise ConfigError("give either questions or questions_per_subtopic, not both")
        if isinstance(questions, bool) or not isinstance(questions, (int, np.integer)) or questions < 1:
            raise ConfigError(f"the question bank needs at least 1 question, got {questions!r}")
        base, extra = divmod(int(questions), len(_SUBTOPICS))
        return [base + (i < extra) for i in range(len(_SUBTOPICS)) if base + (i < extra) > 0]
    q = DEFAULT_QUESTIONS_PER_SUBTOPIC if questions_per_subtopic is None else questions_per_subtopic
    if q < 1:
        raise ConfigError(f"questions_per_subtopic must be >= 1, got {q}")
    return [int(q)] * len(_SUBTOPICS)


def curriculum(questions_per_subtopic: int | None = None, *, questions: int | None = None) -> pl.DataFrame:
    """The curriculum in its fixed order: position, question_id, topic, subtopic, difficulty_level.

    Sizes as in :func:`subtopic_sizes` (160 questions by default).
    """
    sizes = subtopic_sizes(questions_per_subtopic, questions=questions)
    rows = [
        (f"q-{topic}-{sub}-{n + 1}", topic, sub, 1 + (n * 5) // q)
        for (topic, sub), q in zip(_SUBTOPICS, sizes)
        for n in range(q)
    ]
    qid, topic, sub, diff = zip(*rows)
    return pl.DataFrame(
        {
            "position": pl.Series(range(len(rows)), dtype=pl.Int32),
            "question_id": pl.Series(qid, dtype=pl.String),
            "topic": pl.Series(topic, dtype=pl.String),
            "subtopic": pl.Series(sub, dtype=pl.String),
            "difficulty_level": pl.Series(diff, dtype=pl.Int8),
        }
    )


def attempts_range(attempts_per_user: float | None = None) -> tuple[int, int]:
    """``(lo, hi)``: each learner's attempt count is uniform in ``[lo, hi]``, mean ``attempts_per_user``.

    ``lo = round(0.4 * M)`` (at least 1) and ``hi = round(2 * M - lo)``, so the mean
    ``(lo + hi) / 2`` is within 0.25 of M. The default M = 37.5 gives (15, 60).
    """
    m = DEFAULT_ATTEMPTS_PER_USER if attempts_per_user is None else attempts_per_user
    if isinstance(m, bool) or not isinstance(m, (int, float, np.integer, np.floating)) or not np.isfinite(m) or m < 1:
        raise ConfigError(f"attempts per learner must be a number >= 1, got {attempts_per_user!r}")
    lo = max(1, int(np.floor(0.4 * m + 0.5)))
    hi = max(lo, int(np.floor(2.0 * m - lo + 0.5)))
    return lo, hi


def generate_question_attempts(
    users: int,
    seed: int = 0,
    *,
    questions_per_subtopic: int | None = None,
    questions: int | None = None,
    attempts_per_user: float | None = None,
    start: datetime | None = None,
) -> pl.DataFrame:
    """Question attempts of ``users`` learners, ordered by learner then time (see the module doc).

    ``questions``: total questions in the bank (default 160); ``attempts_per_user``: mean attempts
    per learner (default 37.5). The defaults reproduce the original generator exactly.
    """
    frame, _ = _simulate(
        users,
        seed,
        questions_per_subtopic=questions_per_subtopic,
        questions=questions,
        attempts_per_user=attempts_per_user,
        start=start,
    )
    return frame


def _simulate(
    users: int,
    seed: int,
    *,
    questions_per_subtopic: int | None = None,
    questions: int | None = None,
    attempts_per_user: float | None = None,
    start: datetime | None = None,
) -> tuple[pl.DataFrame, np.ndarray]:
    """The attempts and each learner's latent ability (index i = i-th learner's user_id)."""
    if isinstance(users, bool) or not isinstance(users, (int, np.integer)) or users < 1:
        raise ConfigError(f"synthetic data needs at least 1 learner, got {users!r}")
    users = int(users)
    sizes = subtopic_sizes(questions_per_subtopic, questions=questions)
    lo, hi = attempts_range(attempts_per_user)
    cur = curriculum(questions_per_subtopic, questions=questions)
    size = cur.height
    # first position of the next subtopic, for each position (== size after the last subtopic)
    ends = np.cumsum(sizes)
    next_block = np.repeat(ends, sizes).astype(np.int64)
    difficulty = cur.get_column("difficulty_level").to_numpy().astype(np.float64)
    rng = np.random.default_rng(seed)

    user_ids = _uuid4_strings(rng, users)
    ability = rng.standard_normal(users)
    lengths = rng.integers(lo, hi + 1, size=users)
    pos = rng.integers(0, size, size=users)
    steps = int(lengths.max())

    positions = np.empty((users, steps), dtype=np.int32)
    correct = np.empty((users, steps), dtype=bool)
    for t in range(steps):
        positions[:, t] = pos
        logit = ability - (difficulty[pos] - 3.0) * 0.8
        c = rng.random(users) < 1.0 / (1.0 + np.exp(-logit))
        correct[:, t] = c
        move = rng.random(users)
        retry = ~c & (rng.random(users) < P_RETRY)
        nxt = np.where(move < P_SKIP, pos + 2, np.where(move < P_SKIP + P_JUMP, next_block[pos], pos + 1))
        pos = np.where(retry, pos, nxt) % size

    # Keep each learner's first `lengths[i]` attempts; row-major order = learner, then attempt.
    keep = np.arange(steps) < lengths[:, None]
    pos_rows = positions[keep]
    correct_rows = correct[keep]
    n = pos_rows.shape[0]
    learner = np.repeat(np.arange(users, dtype=np.int64), lengths)
    first = np.zeros(n, dtype=bool)
    first[np.cumsum(lengths) - lengths] = True

    diff_rows = difficulty[pos_rows]
    log_rt = np.log(25.0) + 0.25 * (diff_rows - 3.0) + 0.4 * ~correct_rows + 0.5 * rng.standard_normal(n)
    response = np.maximum(np.exp(log_rt), 1.0).astype(np.float32)

    # Gap before each attempt: within a session, the answer time plus a pause; between sessions,
    # hours to days. The first attempt's "gap" is the learner's enrolment offset from `start`.
    pause_us = (rng.exponential(12.0, n) + 1.0) * _US + response.astype(np.float64) * _US
    days_us = (rng.exponential(2.0, n) + 0.3) * _DAY_US
    new_session = rng.random(n) < P_NEW_SESSION
    gaps = np.where(new_session, days_us, pause_us).astype(np.int64)
    enrol = (rng.random(users) * ENROLMENT_DAYS * _DAY_US).astype(np.int64)
    gaps[first] = enrol
    total = np.cumsum(gaps)
    base = (total[first] - enrol)[learner]  # cumulative sum before each learner's first row
    origin = _epoch_us(start or DEFAULT_START)
    created = origin + total - base

    frame = pl.DataFrame(
        {
            "user_id": user_ids.gather(learner),
            "question_id": cur.get_column("question_id").gather(pos_rows),
            "created_at": pl.Series(created, dtype=pl.Int64).cast(pl.Datetime("us")).dt.replace_time_zone("UTC"),
            "is_correct": pl.Series(correct_rows, dtype=pl.Boolean),
            "response_time_seconds": pl.Series(response, dtype=pl.Float32),
            "difficulty_level": cur.get_column("difficulty_level").gather(pos_rows),
            "topic": cur.get_column("topic").gather(pos_rows),
            "subtopic": cur.get_column("subtopic").gather(pos_rows),
        },
        schema=SCHEMA,
    )
    return frame, ability


def _uuid4_strings(rng: np.random.Generator, count: int) -> pl.Series:
    """``count`` version-4 UUID strings drawn from ``rng`` (so deterministic per seed)."""
    raw = np.frombuffer(rng.bytes(16 * count), dtype=np.uint8).reshape(count, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40  # version 4
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    hexed = pl.Series(np.frombuffer(raw.tobytes().hex().encode(), dtype="S32")).cast(pl.Binary).cast(pl.String)
    parts = [hexed.str.slice(a, b - a) for a, b in ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32))]
    return pl.select(pl.concat_str(parts, separator="-")).to_series().alias("user_id")


def _epoch_us(t: datetime) -> int:
    aware = t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    delta = aware - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * _US + delta.microseconds


class SyntheticSource:
    """``source.synthetic_users`` learners generated from ``source.synthetic_seed``.

    ``source.synthetic_questions`` (default 160) and ``source.synthetic_attempts_per_user``
    (default 37.5) size the bank (YAML: ``source: {synthetic_questions: 8000}``).
    """

    name = "synthetic"

    def __init__(self, source: SourceConfig, *, since: datetime | None = None) -> None:
        self.source = source
        self.since = since

    def scan(self) -> pl.LazyFrame:
        s = self.source
        frame = generate_question_attempts(
            s.synthetic_users,
            s.synthetic_seed,
            questions=s.synthetic_questions,
            attempts_per_user=s.synthetic_attempts_per_user,
        ).lazy()
        canonical = canonicalise(
            frame,
            user="user_id",
            item="question_id",
            time="created_at",
            rating=None,
            extra=list(EXTRA_COLUMNS),
            origin="synthetic",
        )
        return in_window(canonical, self.since, self.source.until)


class SyntheticSummary(NamedTuple):
    """What :func:`write_question_bank` wrote."""

    rows: int  # attempts
    learners: int  # distinct user_id
    questions: int  # distinct question_id present (at most bank_size)
    bank_size: int  # questions in the curriculum


def write_question_bank(
    users: int,
    out: Path,
    seed: int = 0,
    *,
    questions: int | None = None,
    attempts_per_user: float | None = None,
) -> SyntheticSummary:
    """Write ``users`` learners' attempts to ``out`` (.csv or .parquet, by extension).

    CSV timestamps are ISO 8601 with an explicit offset, e.g. ``2024-01-03T09:12:44.123456+00:00``.
    Arguments are checked before anything is written.
    """
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in {".csv", ".parquet", ".pq"}:
        raise ConfigError(f"cannot write synthetic data to {out}: the file name must end in .csv or .parquet")
    frame = generate_question_attempts(users, seed, questions=questions, attempts_per_user=attempts_per_user)
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        frame.write_csv(out, datetime_format="%Y-%m-%dT%H:%M:%S%.6f%:z")
    else:
        frame.write_parquet(out)
    return SyntheticSummary(
        rows=frame.height,
        learners=frame.get_column("user_id").n_unique(),
        questions=frame.get_column("question_id").n_unique(),
        bank_size=sum(subtopic_sizes(questions=questions)) if questions is not None else DEFAULT_QUESTIONS,
    )


def write_synthetic(
    users: int,
    out: Path,
    seed: int = 0,
    *,
    questions: int | None = None,
    attempts_per_user: float | None = None,
) -> int:
    """Like :func:`write_question_bank`, returning only the row count."""
    return write_question_bank(users, out, seed, questions=questions, attempts_per_user=attempts_per_user).rows


__all__ = [
    "DEFAULT_ATTEMPTS_PER_USER",
    "DEFAULT_QUESTIONS",
    "EXTRA_COLUMNS",
    "SCHEMA",
    "SyntheticSource",
    "SyntheticSummary",
    "attempts_range",
    "curriculum",
    "generate_question_attempts",
    "subtopic_sizes",
    "write_question_bank",
    "write_synthetic",
]
