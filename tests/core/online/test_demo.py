"""The end-to-end A/B demo (`python -m core.online.demo`): its split, its verdict, and one real run.

The slow test runs every step for real at a small size (synth, two `recflow run`s, `recflow serve`
with two arms, simulated learners over HTTP, `recflow ab-report`) and checks that the report names
the arm that is better by construction (trained with the preset, not stopped after one epoch) as the
winner.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from core.online.demo import STRONG, WEAK, main, split_future, verdict

REPO = Path(__file__).resolve().parents[3]


def test_split_holds_out_each_learners_last_attempts_by_time(tmp_path: Path) -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    # Rows out of time order on purpose: the split must sort by time, not trust the file's order.
    rows = [("a", f"q{i}", t0 + timedelta(hours=i), True) for i in (5, 0, 3, 1, 4, 2)]
    rows += [("b", f"q{i}", t0 + timedelta(hours=10 + i), False) for i in range(4)]
    attempts = tmp_path / "attempts.csv"
    pl.DataFrame(rows, schema=["user_id", "question_id", "created_at", "is_correct"], orient="row").write_csv(attempts)
    future = split_future(attempts, tmp_path / "train.csv", tmp_path / "future.csv", steps=2)
    train = pl.read_csv(tmp_path / "train.csv")
    assert sorted(future.filter(pl.col("user_id") == "a").rows()) == [("a", "q4", 0), ("a", "q5", 1)]
    assert sorted(future.filter(pl.col("user_id") == "b").rows()) == [("b", "q2", 0), ("b", "q3", 1)]
    assert sorted(train.filter(pl.col("user_id") == "a")["question_id"]) == ["q0", "q1", "q2", "q3"]
    assert train.height + future.height == len(rows)


def _report(value: float, low: float, high: float) -> dict[str, object]:
    diff = {"metric": "hit rate", "control": WEAK, "treatment": STRONG, "value": value, "low": low, "high": high,
            "p_value": 0.01, "significant": low > 0 or high < 0}
    arms = [{"arm": WEAK, "hit_rate": {"value": 0.2}}, {"arm": STRONG, "hit_rate": {"value": 0.2 + value}}]
    return {"analysis": {"differences": [diff], "arms": arms}}


def test_verdict_names_the_winner_only_when_the_interval_excludes_zero() -> None:
    assert verdict(_report(0.3, 0.2, 0.4))["winner"] == STRONG
    assert verdict(_report(-0.3, -0.4, -0.2))["winner"] == WEAK
    assert verdict(_report(0.01, -0.02, 0.04))["winner"] is None


def test_a_folder_in_use_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "something").write_text("x")
    assert main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "is not empty" in err and "Traceback" not in err


@pytest.mark.slow
def test_the_demo_finds_the_better_arm(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "core.online.demo", str(out), "--learners", "300", "--epochs", "2",
                           "--seed", "3"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "demo_result.json").read_text())
    assert result["winner"] == STRONG, result
    assert result["low"] > 0
    report = (out / "ab-report" / "ab_report.md").read_text()
    assert STRONG in report and WEAK in report and "**differs**" in report
    assert f"winner: {STRONG}" in done.stdout
    # The log holds pseudonyms, never the raw learner ids the learners sent as `session`.
    raw = set(pl.read_csv(out / "outcomes.csv")["user_id"])
    sessions = set(pl.read_parquet(out / "serving-log" / "requests" / "*.parquet")["session"])
    assert sessions and not raw & sessions
