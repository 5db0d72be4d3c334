"""The synthetic question-attempts generator and source: schema, determinism, learnable structure."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from core.config import ColumnsConfig, SourceConfig, load_config
from core.data.sources import make_source
from core.data.sources.file import FileSource
from core.data.sources.synthetic import (
    EXTRA_COLUMNS,
    SyntheticSource,
    _simulate,
    attempts_range,
    curriculum,
    generate_question_attempts,
    subtopic_sizes,
    write_question_bank,
    write_synthetic,
)
from core.errors import ConfigError
from core.records import ITEM, TIME, USER

UTC = UTC
REPO = Path(__file__).resolve().parents[3]
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
EXPECTED_SCHEMA = {
    "user_id": pl.String,
    "question_id": pl.String,
    "created_at": pl.Datetime("us", "UTC"),
    "is_correct": pl.Boolean,
    "response_time_seconds": pl.Float32,
    "difficulty_level": pl.Int8,
    "topic": pl.String,
    "subtopic": pl.String,
}


@pytest.fixture(scope="module")
def big() -> tuple[pl.DataFrame, np.ndarray]:
    """2000 learners (about 75k attempts) and their latent abilities."""
    return _simulate(2000, 7, questions_per_subtopic=8, start=None)

# Fingerprints of the generator before `questions` / `attempts_per_user` existed (recorded from
# that code): the defaults must keep producing exactly this data.
LEGACY = {
    (50, 0): (1852, "84d88f099df198b9ad2b571a577d908e1fed5de0a63b5e1fd49a8460a732da4c"),
    (120, 5): (4427, "28c596814571e6faf921edaf99ce96d75cacc36a348b543a4aec282da5e13b82"),
}


def _fingerprint(frame: pl.DataFrame) -> str:
    h = hashlib.sha256()
    for col in frame.columns:
        s = frame.get_column(col)
        if s.dtype == pl.String:
            h.update("\n".join(s.to_list()).encode())
        elif s.dtype == pl.Datetime("us", "UTC"):
            h.update(s.dt.epoch("us").to_numpy().astype("<i8").tobytes())
        else:
            h.update(s.to_numpy().tobytes())
    return h.hexdigest()


def _in_time_order(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.sort("user_id", "created_at")


def test_schema_and_value_ranges() -> None:
    frame = generate_question_attempts(300, seed=3)
    assert dict(frame.schema) == EXPECTED_SCHEMA
    assert frame.null_count().sum_horizontal().item() == 0
    assert frame.get_column("user_id").str.contains(UUID4.pattern).all()
    assert frame.get_column("user_id").n_unique() == 300
    assert frame.get_column("response_time_seconds").min() > 0  # type: ignore[operator]
    assert set(frame.get_column("difficulty_level").unique().to_list()) == {1, 2, 3, 4, 5}
    per_user = frame.group_by("user_id").len().get_column("len")
    assert per_user.min() >= 15 and per_user.max() <= 60  # type: ignore[operator]
    assert 0.0 < frame.get_column("is_correct").mean() < 1.0  # type: ignore[operator]
    # question ids name their topic and subtopic, and the curriculum defines them all
    cur = curriculum(8)
    joined = frame.join(cur, on="question_id", how="left", suffix="_cur")
    assert joined.get_column("position").null_count() == 0
    for col in ("topic", "subtopic", "difficulty_level"):
        assert (joined.get_column(col) == joined.get_column(f"{col}_cur")).all()
    assert frame.get_column("question_id").str.starts_with("q-").all()


def test_curriculum_size_follows_questions_per_subtopic() -> None:
    assert curriculum(8).height == 5 * 4 * 8
    small = generate_question_attempts(50, seed=0, questions_per_subtopic=3)
    assert small.get_column("question_id").n_unique() <= 5 * 4 * 3
    assert set(small.get_column("question_id").unique()) <= set(curriculum(3).get_column("question_id"))
    with pytest.raises(ConfigError):
        generate_question_attempts(0)


def test_deterministic_per_seed_and_different_across_seeds() -> None:
    a = generate_question_attempts(200, seed=11)
    b = generate_question_attempts(200, seed=11)
    c = generate_question_attempts(200, seed=12)
    assert a.equals(b)
    assert not a.equals(c)
    assert set(a.get_column("user_id")).isdisjoint(set(c.get_column("user_id")))


def test_start_moves_the_timeline() -> None:
    start = datetime(2030, 6, 1, tzinfo=UTC)
    frame = generate_question_attempts(100, seed=1, start=start)
    assert frame.get_column("created_at").min() >= start  # type: ignore[operator]
    assert frame.get_column("created_at").max() < start + timedelta(days=400)  # type: ignore[operator]
    default = generate_question_attempts(100, seed=1)
    assert default.get_column("created_at").min() < start  # type: ignore[operator]


def test_timestamps_increase_per_learner_in_sessions(big: tuple[pl.DataFrame, np.ndarray]) -> None:
    frame, _ = big
    # Rows come per learner in attempt order, and attempt times strictly increase.
    diffs = frame.select(pl.col("created_at").diff().over("user_id").alias("d")).get_column("d").drop_nulls()
    assert (diffs > timedelta(0)).all()
    # Sessions of minutes separated by days: most gaps are short, but every learner has long ones.
    gaps = diffs.dt.total_seconds()
    assert gaps.median() < 120  # type: ignore[operator]
    assert (gaps > 86_400 / 4).mean() > 0.05  # type: ignore[operator]
    span = frame.group_by("user_id").agg((pl.col("created_at").max() - pl.col("created_at").min()).alias("span"))
    assert (span.get_column("span") > timedelta(days=1)).mean() > 0.9  # type: ignore[operator]


def test_correctness_rises_with_ability_and_falls_with_difficulty(big: tuple[pl.DataFrame, np.ndarray]) -> None:
    frame, ability = big
    # _simulate's ability[i] belongs to the i-th learner in row order.
    users = frame.get_column("user_id").unique(maintain_order=True)
    abilities = pl.DataFrame({"user_id": users, "ability": ability})
    per_user = (
        frame.group_by("user_id")
        .agg(pl.col("is_correct").mean().alias("acc"))
        .join(abilities, on="user_id")
        .with_columns(pl.col("ability").qcut(4, labels=["q1", "q2", "q3", "q4"]).alias("quartile"))
    )
    by_quartile = per_user.group_by("quartile").agg(pl.col("acc").mean()).sort("quartile").get_column("acc")
    assert all(a < b for a, b in zip(by_quartile, by_quartile[1:])), by_quartile.to_list()
    assert by_quartile[3] - by_quartile[0] > 0.3
    assert np.corrcoef(per_user.get_column("ability"), per_user.get_column("acc"))[0, 1] > 0.6

    by_level = frame.group_by("difficulty_level").agg(pl.col("is_correct").mean()).sort("difficulty_level")
    rates = by_level.get_column("is_correct").to_list()
    assert all(a > b for a, b in zip(rates, rates[1:])), rates
    # E[sigmoid(N(0,1) - (d - 3) * 0.8)]: about 0.80 at level 1, 0.5 at 3, 0.20 at 5
    assert rates[0] > 0.72 and abs(rates[2] - 0.5) < 0.05 and rates[4] < 0.28


def test_wrong_answers_take_longer(big: tuple[pl.DataFrame, np.ndarray]) -> None:
    frame, _ = big
    # within each difficulty level (wrong answers are also more common on hard questions)
    median = frame.group_by("difficulty_level", "is_correct").agg(pl.col("response_time_seconds").median())
    ratio = median.pivot("is_correct", index="difficulty_level", values="response_time_seconds")
    assert (ratio.get_column("false") > ratio.get_column("true") * 1.25).all(), ratio
    by_level = frame.group_by("difficulty_level").agg(pl.col("response_time_seconds").median()).sort("difficulty_level")
    times = by_level.get_column("response_time_seconds").to_list()
    assert times[4] > times[0] * 1.5


def test_learners_move_forward_through_the_curriculum(big: tuple[pl.DataFrame, np.ndarray]) -> None:
    frame, _ = big
    cur = curriculum(8).select("question_id", "position")
    size = cur.height
    seq = (
        _in_time_order(frame)
        .join(cur, on="question_id")
        .with_columns(pl.col("position").shift(-1).over("user_id").alias("next"))
        .drop_nulls("next")
    )
    step = ((seq.get_column("next") - seq.get_column("position")) % size).to_numpy()
    # mostly the next question, sometimes a retry (0) or a skip/jump ahead, never backwards in a block
    assert 0.55 < (step == 1).mean() < 0.95
    assert (step == 0).mean() > 0.03
    assert (step >= 2).mean() > 0.03
    assert (step <= 8).mean() > 0.99
    # For most questions the most common next question is the curriculum's next question.
    modal = (
        seq.group_by("position", "next")
        .len()
        .sort("len", "next", descending=[True, False])
        .group_by("position", maintain_order=True)
        .first()
    )
    hits = ((modal.get_column("next") - modal.get_column("position")) % size == 1).mean()
    assert modal.height == size
    assert hits > 0.9  # type: ignore[operator]


def test_retries_follow_wrong_answers(big: tuple[pl.DataFrame, np.ndarray]) -> None:
    frame, _ = big
    seq = _in_time_order(frame).with_columns(
        (pl.col("question_id").shift(-1).over("user_id") == pl.col("question_id")).alias("repeat")
    )
    rate = seq.drop_nulls("repeat").group_by("is_correct").agg(pl.col("repeat").mean()).sort("is_correct")
    after_wrong, after_right = rate.get_column("repeat").to_list()
    assert after_wrong > 0.25 and after_right < 0.02


def test_source_scans_the_canonical_schema_in_the_window() -> None:
    cfg = load_config(overrides={"source.kind": "synthetic", "source.synthetic_users": 120, "source.synthetic_seed": 5})
    source = make_source(cfg)
    assert isinstance(source, SyntheticSource)
    assert source.name == "synthetic"
    full = source.scan().collect()
    assert full.columns == [USER, ITEM, TIME, *EXTRA_COLUMNS]
    assert full.schema[TIME] == pl.Datetime("us", "UTC")
    raw = generate_question_attempts(120, seed=5)
    assert full.height == raw.height
    assert full.get_column(ITEM).equals(raw.get_column("question_id"), check_names=False)

    times = full.get_column(TIME).sort()
    since, until = times[len(times) // 4], times[3 * len(times) // 4]
    config = SourceConfig(kind="synthetic", synthetic_users=120, synthetic_seed=5, until=until)
    windowed = SyntheticSource(config, since=since).scan().collect()
    expected = full.filter((pl.col(TIME) >= since) & (pl.col(TIME) < until))
    assert 0 < windowed.height < full.height
    assert windowed.equals(expected)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_write_synthetic_round_trips_through_the_file_source(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / "nested" / f"attempts{suffix}"
    rows = write_synthetic(80, out, seed=4)
    generated = generate_question_attempts(80, seed=4)
    assert rows == generated.height
    if suffix == ".csv":
        header, first = out.read_text().splitlines()[:2]
        assert header.split(",") == list(EXPECTED_SCHEMA)
        assert re.search(r",\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00,", first), first

    source = FileSource(
        SourceConfig(kind="file", path=out),
        ColumnsConfig(user="user_id", item="question_id", time="created_at", extra=list(EXTRA_COLUMNS)),
    )
    back = source.scan().collect()
    assert back.height == rows
    assert back.select(USER, ITEM, TIME, "is_correct", "topic", "subtopic").equals(
        generated.select(
            pl.col("user_id").alias(USER),
            pl.col("question_id").alias(ITEM),
            pl.col("created_at").alias(TIME),
            "is_correct",
            "topic",
            "subtopic",
        )
    )
    assert (back.get_column("difficulty_level") == generated.get_column("difficulty_level")).all()
    np.testing.assert_allclose(
        back.get_column("response_time_seconds").to_numpy(),
        generated.get_column("response_time_seconds").to_numpy(),
        rtol=1e-6,
    )


def test_write_synthetic_rejects_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\.csv or \.parquet"):
        write_synthetic(10, tmp_path / "attempts.json")
    assert not (tmp_path / "attempts.json").exists()


@pytest.mark.parametrize(("users", "seed"), sorted(LEGACY))
def test_defaults_reproduce_the_original_generator(users: int, seed: int) -> None:
    rows, digest = LEGACY[(users, seed)]
    default = generate_question_attempts(users, seed=seed)
    assert (default.height, _fingerprint(default)) == (rows, digest)
    # the defaults spelled out are the same data
    explicit = generate_question_attempts(users, seed=seed, questions=160, attempts_per_user=37.5)
    assert explicit.equals(default)
    source = SyntheticSource(SourceConfig(kind="synthetic", synthetic_users=users, synthetic_seed=seed))
    assert source.scan().collect().height == rows


@pytest.mark.parametrize("questions", [1, 7, 20, 161, 1234])
def test_questions_sets_the_bank_size_exactly(questions: int) -> None:
    sizes = subtopic_sizes(questions=questions)
    assert sum(sizes) == questions and max(sizes) - min(sizes) <= 1
    cur = curriculum(questions=questions)
    assert cur.height == questions and cur.get_column("question_id").n_unique() == questions
    # difficulty still rises within every subtopic
    ordered = cur.group_by("subtopic", maintain_order=True).agg(pl.col("difficulty_level"))
    for levels in ordered.get_column("difficulty_level").to_list():
        assert levels == sorted(levels) and 1 <= levels[0] <= levels[-1] <= 5

    frame = generate_question_attempts(40, seed=2, questions=questions, attempts_per_user=10)
    present = set(frame.get_column("question_id").unique())
    assert present <= set(cur.get_column("question_id"))
    joined = frame.join(cur, on="question_id", how="left", suffix="_cur")
    assert (joined.get_column("difficulty_level") == joined.get_column("difficulty_level_cur")).all()


def test_enough_attempts_visit_the_whole_bank() -> None:
    frame = generate_question_attempts(400, seed=1, questions=400, attempts_per_user=40)
    assert frame.get_column("question_id").n_unique() > 0.95 * 400


@pytest.mark.parametrize("mean", [1, 2.5, 5, 12, 37.5, 39, 80])
def test_attempts_per_user_sets_the_mean(mean: float) -> None:
    lo, hi = attempts_range(mean)
    assert 1 <= lo <= hi and abs((lo + hi) / 2 - mean) <= 0.25
    frame = generate_question_attempts(1500, seed=9, questions=300, attempts_per_user=mean)
    per_user = frame.group_by("user_id").len().get_column("len")
    assert per_user.len() == 1500
    assert per_user.min() >= lo and per_user.max() <= hi  # type: ignore[operator]
    assert abs(per_user.mean() - mean) <= 0.03 * mean + 0.1  # type: ignore[operator]
    if mean >= 5:
        assert per_user.std() > 0.1 * mean  # type: ignore[operator]  # a spread, not a constant


def test_sized_bank_is_deterministic_per_seed() -> None:
    a = generate_question_attempts(60, seed=3, questions=500, attempts_per_user=20)
    b = generate_question_attempts(60, seed=3, questions=500, attempts_per_user=20)
    c = generate_question_attempts(60, seed=4, questions=500, attempts_per_user=20)
    assert a.equals(b) and not a.equals(c)


def test_large_bank_stays_sequential() -> None:
    questions = 2000
    frame = generate_question_attempts(1500, seed=0, questions=questions, attempts_per_user=30)
    cur = curriculum(questions=questions).select("question_id", "position")
    seq = (
        frame.join(cur, on="question_id")
        .with_columns(pl.col("position").shift(-1).over("user_id").alias("next"))
        .drop_nulls("next")
    )
    step = ((seq.get_column("next") - seq.get_column("position")) % questions).to_numpy()
    assert 0.6 < (step == 1).mean() < 0.95  # mostly the next question in the curriculum
    assert (step == 0).mean() > 0.05  # retries
    # the next question is far more predictable than the most popular question
    top_share = frame.get_column("question_id").value_counts().get_column("count").max() / frame.height
    assert top_share < 0.05


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"questions": 0}, "at least 1 question"),
        ({"questions": -3}, "at least 1 question"),
        ({"attempts_per_user": 0.5}, ">= 1"),
        ({"attempts_per_user": float("nan")}, ">= 1"),
        ({"questions": 10, "questions_per_subtopic": 2}, "not both"),
    ],
)
def test_nonsense_sizes_are_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        generate_question_attempts(5, **kwargs)


def test_write_question_bank_reports_what_it_wrote(tmp_path: Path) -> None:
    out = tmp_path / "bank.parquet"
    written = write_question_bank(30, out, seed=1, questions=50, attempts_per_user=8)
    back = pl.read_parquet(out)
    assert written.rows == back.height
    assert written.learners == back.get_column("user_id").n_unique() == 30
    assert written.questions == back.get_column("question_id").n_unique() <= 50
    assert written.bank_size == 50
    assert write_synthetic(30, tmp_path / "bank.csv", seed=1, questions=50, attempts_per_user=8) == written.rows


def test_cli_data_synth(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli import app

    out = tmp_path / "bank.csv"
    args = ["data", "synth", "--users", "40", "--questions", "100", "--attempts-per-user", "12", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    frame = pl.read_csv(out)
    assert frame.get_column("user_id").n_unique() == 40
    present = frame.get_column("question_id").n_unique()
    summary = f"wrote {frame.height} question attempts by 40 learners over {present} questions (bank of 100)"
    assert summary in result.output
    expected = generate_question_attempts(40, questions=100, attempts_per_user=12)
    keys = ["user_id", "question_id", "is_correct", "topic", "subtopic"]
    assert frame.select(keys).equals(expected.select(keys))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--questions", "0"], "--questions must be at least 1"),
        (["--attempts-per-user", "0"], "--attempts-per-user must be at least 1"),
        (["--users", "1"], "--users must be at least 2"),
        (["--out", "bank.json"], ".csv or .parquet"),
    ],
)
def test_cli_data_synth_rejects_nonsense(tmp_path: Path, args: list[str], needle: str) -> None:
    cmd = [sys.executable, "-m", "cli", "data", "synth", "--out", str(tmp_path / "bank.csv"), *args]
    env = {**os.environ, "RECFLOW_NO_REEXEC": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not any(tmp_path.iterdir())
