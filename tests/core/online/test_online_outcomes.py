"""Joining the request log with attempts and events: windows, shadow rows, correctness, bad logs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from core.errors import OutcomeLogError
from core.online.outcomes import (
    OUTCOME_SCHEMA,
    join_outcomes,
    per_learner,
    read_events,
    read_requests,
    select_experiment,
)

T0 = datetime(2026, 1, 5, 12, tzinfo=UTC)
H = timedelta(hours=1)


def _requests(rows: list[tuple[str, str, str | None, bool, datetime, list[str]]]) -> pl.DataFrame:
    """(request_id, arm, session, shadow, ts, rec_items) -> contract-shaped log rows."""
    return pl.DataFrame({
        "request_id": [r[0] for r in rows], "ts": [r[4] for r in rows], "experiment": ["e1"] * len(rows),
        "arm": [r[1] for r in rows], "shadow": [r[3] for r in rows], "entry": ["m"] * len(rows),
        "version": ["v1"] * len(rows), "session": [r[2] for r in rows],
        "items": [["x"]] * len(rows), "n_items": pl.Series([1] * len(rows), dtype=pl.Int32),
        "n_unknown": pl.Series([0] * len(rows), dtype=pl.Int32), "rec_items": [r[5] for r in rows],
        "rec_scores": [[1.0] * len(r[5]) for r in rows],
    }, schema_overrides={"ts": pl.Datetime("us", "UTC"), "rec_scores": pl.List(pl.Float32)})


def _outcomes(rows: list[tuple[str, str, datetime, bool | None]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=OUTCOME_SCHEMA, orient="row")


def test_an_attempt_counts_only_within_the_window_after_the_request() -> None:
    req = _requests([("r1", "a", "s1", False, T0, ["q1", "q2"]), ("r2", "b", "s2", False, T0, ["q1"])])
    out = _outcomes([
        ("s1", "q1", T0 + 2 * H, True),  # in the window
        ("s1", "q2", T0 - H, True),  # before the request: not an outcome of it
        ("s2", "q1", T0 + 30 * H, True),  # after a 24 h window
        ("s1", "q9", T0 + H, True),  # not recommended
    ])
    j = join_outcomes(req, out, timedelta(hours=24)).sort("request_id")
    assert j["attempted"].to_list() == [1, 0] and j["hit"].to_list() == [True, False]
    assert j["correct"].to_list() == [1, 0]
    wide = join_outcomes(req, out, timedelta(hours=48)).sort("request_id")
    assert wide["hit"].to_list() == [True, True]


def test_correctness_is_the_first_graded_attempt_and_ungraded_attempts_still_hit() -> None:
    req = _requests([("r1", "a", "s1", False, T0, ["q1", "q2", "q3"])])
    out = _outcomes([
        ("s1", "q1", T0 + 2 * H, False), ("s1", "q1", T0 + 3 * H, True),  # wrong first, then right
        ("s1", "q2", T0 + H, None), ("s1", "q2", T0 + 2 * H, True),  # an ungraded attempt, then graded
        ("s1", "q3", T0 + H, None),  # attempted, never graded
    ])
    row = join_outcomes(req, out, timedelta(hours=24)).row(0, named=True)
    assert (row["attempted"], row["graded"], row["correct"]) == (3, 2, 1)


def test_shadow_unassigned_and_sessionless_rows_are_no_arm_s_outcomes() -> None:
    req = _requests([
        ("r1", "a", "s1", False, T0, ["q1"]),
        ("r1", "shadow", "s1", True, T0, ["q1"]),  # scored, never shown
        ("r2", "unassigned", "s2", False, T0, ["q1"]),
        ("r3", "a", None, False, T0, ["q1"]),
    ])
    out = _outcomes([("s1", "q1", T0 + H, True), ("s2", "q1", T0 + H, True)])
    j = join_outcomes(req, out, timedelta(hours=24))
    assert j["request_id"].to_list() == ["r1"] and j["arm"].to_list() == ["a"]


def test_per_learner_sums_requests_of_one_learner_together() -> None:
    req = _requests([("r1", "a", "s1", False, T0, ["q1"]), ("r2", "a", "s1", False, T0 + 48 * H, ["q2"]),
                     ("r3", "b", "s2", False, T0, ["q1"])])
    out = _outcomes([("s1", "q1", T0 + H, True), ("s2", "q1", T0 + H, False)])
    rows = per_learner(join_outcomes(req, out, timedelta(hours=24))).to_dicts()
    assert [(r["arm"], r["requests"], r["hits"], r["graded"], r["correct"]) for r in rows] == [
        ("a", 2, 1, 1, 1), ("b", 1, 1, 1, 0)]


def test_events_become_outcomes(tmp_path: Path) -> None:
    (tmp_path / "events").mkdir()
    pl.DataFrame({
        "event_id": ["e1", "e2", "e3"], "ts": [T0, T0 + H, T0], "session": ["s1", "s1", "s2"],
        "item": ["q1", "q1", "q2"], "kind": ["attempt", "correct", "click"], "value": [1.0, 0.0, 1.0],
    }, schema_overrides={"ts": pl.Datetime("us", "UTC")}).write_parquet(tmp_path / "events" / "events-w0-1.parquet")
    ev = read_events(tmp_path)
    assert ev.schema == OUTCOME_SCHEMA
    assert ev.select("item", "correct").rows() == [("q1", None), ("q1", False)]  # "click" is no outcome
    assert read_events(tmp_path / "nowhere").height == 0


def test_a_missing_or_empty_log_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OutcomeLogError, match="no log folder"):
        read_requests(tmp_path / "nope")
    with pytest.raises(OutcomeLogError, match="no request log"):
        read_requests(tmp_path)
    (tmp_path / "requests").mkdir()
    _requests([("r1", "a", "s1", False, T0, ["q1"])]).head(0).write_parquet(tmp_path / "requests" / "r-0.parquet")
    with pytest.raises(OutcomeLogError, match="no rows"):
        read_requests(tmp_path)
    (tmp_path / "requests" / "r-1.parquet").write_bytes(b"not parquet")
    with pytest.raises(OutcomeLogError, match="cannot read"):
        read_requests(tmp_path)


def test_several_files_are_one_log_and_an_experiment_is_chosen(tmp_path: Path) -> None:
    (tmp_path / "requests").mkdir()
    _requests([("r1", "a", "s1", False, T0, ["q1"])]).write_parquet(tmp_path / "requests" / "w0.parquet")
    _requests([("r2", "b", "s2", False, T0, ["q1"])]).with_columns(experiment=pl.lit("e2")).write_parquet(
        tmp_path / "requests" / "w1.parquet")
    # A compaction interrupted by a crash leaves a file's rows twice: read once.
    _requests([("r1", "a", "s1", False, T0, ["q1"])]).write_parquet(tmp_path / "requests" / "w0-compacted.parquet")
    log = read_requests(tmp_path)
    assert log.height == 2
    with pytest.raises(OutcomeLogError, match="2 experiments"):
        select_experiment(log, None)
    rows, exp = select_experiment(log, "e2")
    assert exp == "e2" and rows["request_id"].to_list() == ["r2"]
    with pytest.raises(OutcomeLogError, match="not in the log"):
        select_experiment(log, "e3")


def test_collect_reads_attempts_as_the_extract_does_and_says_when_ids_do_not_line_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.config import load_config
    from core.online.outcomes import collect
    from core.online.settings import ABReportSettings
    from core.online.simulate import SimArm, SimSettings, simulate, write_log

    key = "a-test-pseudonym-key-32-bytes-ok"
    monkeypatch.setenv("RECFLOW_PSEUDONYM_KEY", key)
    sim = simulate(SimSettings(arms=(SimArm("a", 0.5), SimArm("b", 0.5)), learners=100), key)
    write_log(sim, tmp_path / "logs")
    sim.attempts.write_csv(tmp_path / "attempts.csv")

    def run(pseudonymize: bool):
        cfg = load_config(None, {"source.kind": "file", "source.path": tmp_path / "attempts.csv",
                                 "columns.user": "user_id", "columns.item": "question_id",
                                 "columns.time": "created_at", "privacy.pseudonymize": pseudonymize})
        return collect(ABReportSettings(log_dir=tmp_path / "logs", out_dir=tmp_path / "out", attempts=cfg))

    hashed = run(True)
    assert hashed.matched_learners == 100 and hashed.outcome_rows["attempts"] == sim.attempts.height
    assert hashed.served_rows == sim.requests.height and (tmp_path / "out" / "learners.parquet").is_file()
    learners = pl.read_parquet(hashed.learners_path)
    assert learners["hits"].sum() > 0 and not set(learners["session"]) & set(sim.attempts["user_id"])
    assert run(False).matched_learners == 0  # raw ids never match the log's pseudonyms


def test_the_record_of_the_reported_experiment_is_found_current_or_archived(tmp_path: Path) -> None:
    import json

    from core.online.analysis import find_record

    def record(exp_id: str) -> str:
        return json.dumps({"id": exp_id, "salt": "s", "arms": [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}]})

    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiment.json").write_text(record("e2"))
    (tmp_path / "experiments" / "e1.json").write_text(record("e1"))  # replaced by e2
    assert find_record(tmp_path, "e2")["id"] == "e2" and find_record(tmp_path, None)["id"] == "e2"
    assert find_record(tmp_path, "e1")["id"] == "e1"
    assert find_record(tmp_path, "e3") is None
    assert find_record(tmp_path, "e2", tmp_path / "experiments" / "e1.json")["id"] == "e1"
    with pytest.raises(OutcomeLogError, match="no experiment record"):
        find_record(tmp_path, "e2", tmp_path / "nope.json")
    (tmp_path / "experiment.json").write_text('{"id": "e2"}')
    with pytest.raises(OutcomeLogError, match="no `arms` list"):
        find_record(tmp_path, "e2")


def test_attempts_with_is_correct_but_not_every_question_attempts_column_still_give_correctness(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.config import load_config
    from core.online.outcomes import read_attempts
    from core.online.simulate import SimArm, SimSettings, simulate

    monkeypatch.setenv("RECFLOW_PSEUDONYM_KEY", "a-test-pseudonym-key-32-bytes-ok")
    sim = simulate(SimSettings(arms=(SimArm("a", 0.5), SimArm("b", 0.5)), learners=50), "k" * 32)
    columns = {"columns.user": "user_id", "columns.item": "question_id", "columns.time": "created_at"}
    sim.attempts.select("user_id", "question_id", "created_at", "is_correct").write_csv(tmp_path / "four.csv")
    sim.attempts.select("user_id", "question_id", "created_at").write_csv(tmp_path / "three.csv")

    four = read_attempts(load_config(None, {"source.kind": "file", "source.path": tmp_path / "four.csv", **columns}))
    assert four.height == sim.attempts.height
    assert four["correct"].to_list() == sim.attempts["is_correct"].to_list()
    three = read_attempts(load_config(None, {"source.kind": "file", "source.path": tmp_path / "three.csv", **columns}))
    assert three.height == sim.attempts.height and three["correct"].null_count() == three.height
