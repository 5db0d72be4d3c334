"""Data validation: the GX suite plus recflow's own polars checks, on small generated snapshots."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import polars as pl
import pytest

from core.config import PipelineConfig, load_config
from core.data.extract import extract
from core.data.validation import (
    DEFAULT_SUITE,
    REPORT_FILE,
    SUITE_FILES,
    failure_message,
    load_suite,
    raise_for_failures,
    report_markdown,
    select_suite,
    validate_snapshot,
)
from core.errors import ConfigError, DataValidationError
from core.records import ITEM, RATING, TIME, USER, CheckResult, Snapshot, ValidationReport

T0 = datetime(2020, 1, 1, tzinfo=UTC)
NOT_NULL = "expect_column_values_to_not_be_null"
SPLIT_USERS = "enough users with >= 5 interactions for the split"


def _rows(users: int = 4, per_user: int = 6) -> list[dict[str, Any]]:
    return [
        {USER: f"u{u}", ITEM: f"i{(u + k) % 7}", TIME: T0 + timedelta(hours=u * 100 + k), RATING: float(1 + k % 5)}
        for u in range(users)
        for k in range(per_user)
    ]


def _frame(rows: list[dict[str, Any]], rating: bool = True) -> pl.DataFrame:
    schema: dict[str, pl.DataType] = {USER: pl.String(), ITEM: pl.String(), TIME: pl.Datetime("us", "UTC")}
    if rating:
        schema[RATING] = pl.Float32()
    return pl.DataFrame([{k: r[k] for k in schema} for r in rows], schema=schema)


def _snapshot(frame: pl.DataFrame, tmp_path: Path) -> Snapshot:
    path = tmp_path / "snapshot.parquet"
    frame.write_parquet(path)
    return Snapshot(
        path=path,
        source="test",
        rows=frame.height,
        users=frame.get_column(USER).n_unique() if USER in frame.columns else 0,
        items=frame.get_column(ITEM).n_unique() if ITEM in frame.columns else 0,
        has_rating=RATING in frame.columns,
        fingerprint="test",
    )


@pytest.fixture(scope="module")
def config() -> PipelineConfig:
    return load_config()


def _validate(frame: pl.DataFrame, tmp_path: Path, config: PipelineConfig) -> ValidationReport:
    return validate_snapshot(_snapshot(frame, tmp_path), config, tmp_path)


def _check(report: ValidationReport, name: str) -> CheckResult:
    matches = [c for c in report.checks if c.name == name]
    assert matches, f"no check named {name!r} in {[c.name for c in report.checks]}"
    return matches[0]


def test_clean_data_passes_and_writes_report(
    tmp_path: Path, config: PipelineConfig, capfd: pytest.CaptureFixture[str]
) -> None:
    report = _validate(_frame(_rows()), tmp_path, config)
    out, err = capfd.readouterr()
    assert "Calculating Metrics" not in out + err  # GX's tqdm bars are off
    assert report.success, failure_message(report)
    assert report.failures == [] and report.warnings == []
    assert report.suite == "interactions"
    assert report.expectations_loaded == 9
    assert report.report_path == tmp_path / REPORT_FILE
    # Suite order is kept, rating expectations run, own checks follow.
    names = [c.name for c in report.checks]
    assert names[0] == "expect_table_row_count_to_be_between(min_value=1)"
    assert f"{NOT_NULL}(rating)" in names and "at least 2 users" in names
    assert _check(report, f"{NOT_NULL}(user_id)").details == "0 of 24 values (0%)"
    saved = json.loads((tmp_path / REPORT_FILE).read_text())
    assert saved["success"] is True
    assert len(saved["checks"]) == len(report.checks)
    assert ValidationReport.model_validate(saved) == report
    raise_for_failures(report)  # no exception


def test_rating_expectations_skipped_without_rating_column(tmp_path: Path, config: PipelineConfig) -> None:
    report = _validate(_frame(_rows(), rating=False), tmp_path, config)
    assert report.success, failure_message(report)
    assert report.expectations_loaded == 9  # loaded, not dropped, just not applicable
    assert not [c.name for c in report.checks if "(rating)" in c.name]


def test_null_user_ids_fail_with_examples(tmp_path: Path, config: PipelineConfig) -> None:
    rows = _rows()
    rows[0][USER] = None
    rows[7][USER] = None
    report = _validate(_frame(rows), tmp_path, config)
    assert not report.success
    check = _check(report, f"{NOT_NULL}(user_id)")
    assert not check.success and check.severity == "error"
    assert check.details.startswith("2 of 24 values (8.33%)")
    assert check.examples[0].startswith("item_id=i0 timestamp=2020-01-01T00:00:00")
    assert len(check.examples) == 2
    message = failure_message(report)
    assert message.startswith("data validation failed (1 check): expect_column_values_to_not_be_null(user_id): 2 of 24")
    assert str(tmp_path / REPORT_FILE) in message


def test_unparseable_timestamps_fail_through_extract(tmp_path: Path) -> None:
    csv = tmp_path / "events.csv"
    lines = ["user_id,item_id,timestamp"] + [f"u{u},i{k},2021-03-0{1 + k} 10:00:00" for u in range(3) for k in range(6)]
    lines[5] = "u0,i4,yesterday-ish"
    csv.write_text("\n".join(lines) + "\n")
    cfg = load_config(overrides={"source.kind": "file", "source.path": str(csv)})
    report = validate_snapshot(extract(cfg, tmp_path), cfg, tmp_path)
    assert not report.success
    check = _check(report, f"{NOT_NULL}(timestamp)")
    assert not check.success
    assert check.details.startswith("1 of 18 values")
    assert "unparseable" in check.details
    assert check.examples == ["user_id=u0 item_id=i4"]
    assert [c.name for c in report.failures] == [f"{NOT_NULL}(timestamp)"]


def test_zero_rows_fail_with_no_rows(tmp_path: Path, config: PipelineConfig) -> None:
    report = _validate(_frame([]), tmp_path, config)
    assert not report.success
    rows = _check(report, "expect_table_row_count_to_be_between(min_value=1)")
    assert not rows.success
    assert rows.details.startswith("no rows")
    failing = {c.name for c in report.failures}
    assert {"at least 2 users", "at least 2 items", SPLIT_USERS} <= failing


def test_future_timestamps_fail(tmp_path: Path, config: PipelineConfig) -> None:
    rows = _rows()
    rows[3][TIME] = datetime(2100, 1, 1, tzinfo=UTC)
    rows[4][TIME] = datetime.now(UTC) + timedelta(hours=2)  # within the default 24 h tolerance
    report = _validate(_frame(rows), tmp_path, config)
    check = _check(report, "timestamps not in the future (> 24 h ahead fails)")
    assert not check.success and check.severity == "error"
    assert check.details.startswith("1 of 24 timestamps")
    assert check.examples == ["2100-01-01T00:00:00+00:00"]
    assert [c.name for c in report.failures] == [check.name]


def test_duplicates_over_one_percent_fail(tmp_path: Path, config: PipelineConfig) -> None:
    rows = _rows()
    rows += [dict(rows[0]), dict(rows[0]), dict(rows[9])]  # 3 of 27 rows = 11%
    report = _validate(_frame(rows), tmp_path, config)
    check = _check(report, "no duplicate (user_id, item_id, timestamp) rows (> 1% fails)")
    assert not check.success and check.severity == "error"
    assert check.details.startswith("3 of 27 rows (11.1%)")
    assert check.examples[0] == "user_id=u0 item_id=i0 timestamp=2020-01-01T00:00:00+00:00"
    assert len(check.examples) == 2
    assert not report.success


def test_few_duplicates_only_warn(tmp_path: Path, config: PipelineConfig) -> None:
    rows = _rows(users=20, per_user=10)
    rows.append(dict(rows[0]))  # 1 of 201 rows = 0.5%
    report = _validate(_frame(rows), tmp_path, config)
    check = _check(report, "no duplicate (user_id, item_id, timestamp) rows (> 1% fails)")
    assert not check.success and check.severity == "warning"
    assert report.success
    assert report.warnings == [check]
    assert "| warn |" in report_markdown(report)


def test_too_few_users_for_split_fail(tmp_path: Path, config: PipelineConfig) -> None:
    rows = _rows(users=1, per_user=8) + [r for r in _rows(users=3, per_user=2) if r[USER] != "u0"]
    report = _validate(_frame(rows), tmp_path, config)
    assert _check(report, "at least 2 users").success
    split = _check(report, SPLIT_USERS)
    assert not split.success
    assert split.details.startswith("1 of 3 users have >= 5 interactions")
    dropped = _check(report, "users with < 5 interactions (filtered out before training)")
    assert not dropped.success and dropped.severity == "warning"
    assert dropped.examples == ["u1 (2 interactions)", "u2 (2 interactions)"]
    assert [c.name for c in report.failures] == [SPLIT_USERS]


def test_missing_column_fails_without_crashing(tmp_path: Path, config: PipelineConfig) -> None:
    report = _validate(_frame(_rows()).drop(ITEM), tmp_path, config)
    failing = {c.name for c in report.failures}
    assert "expect_column_to_exist(item_id)" in failing
    not_null = _check(report, f"{NOT_NULL}(item_id)")
    assert not not_null.success and "could not be evaluated" in not_null.details


def test_report_markdown_and_raise(tmp_path: Path, config: PipelineConfig) -> None:
    rows = _rows()
    rows[2][ITEM] = None
    report = _validate(_frame(rows), tmp_path, config)
    markdown = report_markdown(report)
    assert markdown.startswith("## Data validation FAILED")
    assert "| check | result | details | examples |" in markdown
    assert "| expect_column_values_to_not_be_null(item_id) | FAIL | 1 of 24 values (4.17%)" in markdown
    assert "| at least 2 users | pass |" in markdown
    with pytest.raises(DataValidationError) as err:
        raise_for_failures(report)
    assert err.value.report_path == str(tmp_path / REPORT_FILE)
    assert "expect_column_values_to_not_be_null(item_id)" in str(err.value)


def _write_suite(tmp_path: Path, expectations: list[dict[str, Any]]) -> Path:
    path = tmp_path / "suite.json"
    path.write_text(json.dumps({"name": "custom", "expectations": expectations}))
    return path


def test_load_suite_rejects_unknown_expectation_type(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write_suite(
        tmp_path,
        [
            {"type": "expect_column_to_exist", "kwargs": {"column": "user_id"}},
            {"type": "expect_column_values_to_be_sparkly", "kwargs": {"column": "user_id"}},
        ],
    )
    with pytest.raises(ConfigError, match="built 1 of 2 expectations; dropped: expect_column_values_to_be_sparkly"):
        load_suite(path)
    # GX's logged traceback for the dropped expectation is swallowed; the ConfigError says it all.
    assert not [r for r in caplog.records if r.name.startswith("great_expectations")]


def test_load_suite_rejects_bad_kwargs_and_bad_json(tmp_path: Path) -> None:
    path = _write_suite(tmp_path, [{"type": "expect_column_values_to_not_be_null", "kwargs": {}}])
    with pytest.raises(ConfigError, match="is invalid: .*column"):
        load_suite(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_suite(path)
    with pytest.raises(ConfigError, match="not found"):
        load_suite(tmp_path / "missing.json")


def test_custom_suite_with_warning_severity(tmp_path: Path, config: PipelineConfig) -> None:
    suite = _write_suite(
        tmp_path,
        [
            {
                "type": "expect_column_values_to_not_be_null",
                "kwargs": {"column": "rating"},
                "meta": {"severity": "warning"},
            }
        ],
    )
    rows = _rows()
    rows[1][RATING] = None
    report = validate_snapshot(_snapshot(_frame(rows), tmp_path), config, tmp_path, suite_path=suite)
    assert report.suite == "custom" and report.expectations_loaded == 1
    check = _check(report, f"{NOT_NULL}(rating)")
    assert not check.success and check.severity == "warning"
    assert report.success


def test_default_suite_loads_completely() -> None:
    suite = load_suite(DEFAULT_SUITE)
    listed = json.loads(DEFAULT_SUITE.read_text())["expectations"]
    assert len(suite.expectations) == len(listed) == 9


# --------------------------------------------------------------------------- question_attempts suite

QA_COLUMNS = ("is_correct", "response_time_seconds", "difficulty_level", "topic", "subtopic")
BETWEEN = "expect_column_values_to_be_between"
TYPE_LIST = "expect_column_values_to_be_in_type_list"
IN_SET = "expect_column_values_to_be_in_set"


def _qa_frame(users: int = 4, per_user: int = 6, **columns: list[Any]) -> pl.DataFrame:
    """Clean question attempts; ``columns`` replaces (or, set to None, drops) an extra column."""
    base = _frame(_rows(users, per_user), rating=False)
    n = base.height
    extra: dict[str, Any] = {
        "is_correct": pl.Series([k % 3 != 0 for k in range(n)], dtype=pl.Boolean),
        "response_time_seconds": pl.Series([1.5 * (k % 7) for k in range(n)], dtype=pl.Float64),
        "difficulty_level": pl.Series([1 + k % 5 for k in range(n)], dtype=pl.Int64),
        "topic": pl.Series([f"t{k % 3}" for k in range(n)], dtype=pl.String),
        "subtopic": pl.Series([f"s{k % 4}" for k in range(n)], dtype=pl.String),
    }
    for name, values in columns.items():
        if values is None:
            extra.pop(name)
        else:
            extra[name] = pl.Series(values)
    return base.with_columns(**extra)


def _config(**overrides: Any) -> PipelineConfig:
    return load_config(overrides={f"validation.{k}": v for k, v in overrides.items()})


def test_auto_suite_picks_question_attempts_and_clean_data_passes(tmp_path: Path, config: PipelineConfig) -> None:
    report = _validate(_qa_frame(), tmp_path, config)
    assert report.suite == "question_attempts"
    assert report.success, failure_message(report)
    assert report.warnings == []
    assert report.expectations_loaded == len(json.loads(SUITE_FILES["question_attempts"].read_text())["expectations"])
    names = {c.name for c in report.checks}
    for column in QA_COLUMNS:
        assert f"expect_column_to_exist({column})" in names
    assert {f"{BETWEEN}(difficulty_level)", f"{IN_SET}(is_correct)", f"{NOT_NULL}(topic)"} <= names
    assert select_suite(config, [USER, ITEM, TIME, *QA_COLUMNS]) == "question_attempts"


def test_auto_suite_falls_back_to_interactions_without_all_extra_columns(
    tmp_path: Path, config: PipelineConfig
) -> None:
    frame = _qa_frame(subtopic=None)
    report = _validate(frame, tmp_path, config)
    assert report.suite == "interactions" and report.success
    assert not [c for c in report.checks if "is_correct" in c.name]
    # Asked for explicitly, the question_attempts suite names what is missing.
    strict = _validate(frame, tmp_path, _config(suite="question_attempts"))
    assert strict.suite == "question_attempts"
    assert [c.name for c in strict.failures] == ["expect_column_to_exist(subtopic)"]
    assert [c.name for c in strict.warnings] == [f"{NOT_NULL}(subtopic)"]  # its null check only warns
    missing = _check(strict, "expect_column_to_exist(subtopic)")
    assert "missing" in missing.details and "columns.extra" in missing.details
    # ... and the interactions suite can be forced on a question_attempts snapshot.
    assert _validate(_qa_frame(), tmp_path, _config(suite="interactions")).suite == "interactions"


def test_negative_response_time_fails_and_nulls_pass(tmp_path: Path, config: PipelineConfig) -> None:
    n = _qa_frame().height
    times: list[float | None] = [2.0] * n
    times[3], times[5], times[8] = -1.0, None, -0.5
    report = _validate(_qa_frame(response_time_seconds=times), tmp_path, config)
    check = _check(report, f"{BETWEEN}(response_time_seconds)")
    assert not check.success and check.severity == "error"
    assert check.details.startswith("2 of 24 values")
    assert "negative response time" in check.details
    assert check.examples == ["-1.0", "-0.5"]
    assert [c.name for c in report.failures] == [check.name]


def test_difficulty_out_of_range_fails_and_config_range_overrides_suite(tmp_path: Path, config: PipelineConfig) -> None:
    levels = [1 + k % 5 for k in range(_qa_frame().height)]
    levels[2], levels[10] = 7, 0
    frame = _qa_frame(difficulty_level=levels)
    name = f"{BETWEEN}(difficulty_level)"
    report = _validate(frame, tmp_path, config)  # default range (1, 5)
    check = _check(report, name)
    assert not check.success and check.severity == "error"
    assert check.details.startswith("2 of 24 values") and "difficulty_range" in check.details
    assert sorted(check.examples) == ["0", "7"]
    assert not report.success
    wide = _validate(frame, tmp_path, _config(difficulty_range=[0, 10]))
    assert _check(wide, name).success and wide.success
    narrow = _validate(_qa_frame(), tmp_path, _config(difficulty_range=[1, 3]))
    assert _check(narrow, name).details.startswith("9 of 24 values")  # levels 4 and 5
    # load_suite patches the kwargs; the JSON's own bounds stay the default.
    suite = load_suite(SUITE_FILES["question_attempts"], _config(difficulty_range=[2, 4]))
    between = [e.configuration.kwargs for e in suite.expectations if e.configuration.type == BETWEEN]
    assert {"column": "difficulty_level", "min_value": 2.0, "max_value": 4.0} in between
    plain = [e.configuration.kwargs for e in load_suite(SUITE_FILES["question_attempts"]).expectations]
    assert {"column": "difficulty_level", "min_value": 1, "max_value": 5} in plain
    with pytest.raises(ConfigError, match="min_value 5.0 is above max_value 1.0"):
        load_suite(SUITE_FILES["question_attempts"], _config(difficulty_range=[5, 1]))


def test_is_correct_must_be_boolean(tmp_path: Path, config: PipelineConfig) -> None:
    n = _qa_frame().height
    answers: list[str | None] = ["true" if k % 2 else "false" for k in range(n)]
    answers[4], answers[6] = "maybe", None
    report = _validate(_qa_frame(is_correct=answers), tmp_path, config)
    assert report.suite == "question_attempts"  # the column exists; its content is wrong
    type_check = _check(report, f"{TYPE_LIST}(is_correct)")
    assert not type_check.success
    # Only the values that are not booleans are counted and shown: "true"/"false" text is fine.
    assert type_check.details.startswith("is_correct is String: 1 of 24 values (4.17%) are not boolean")
    assert "boolean column" in type_check.details
    assert type_check.examples == ["maybe"]
    in_set = _check(report, f"{IN_SET}(is_correct)")
    assert not in_set.success and in_set.details.startswith("1 of 24 values (4.17%)")
    assert in_set.examples == ["maybe"]
    nulls = _check(report, f"{NOT_NULL}(is_correct)")
    assert not nulls.success and nulls.details.startswith("1 of 24 values")
    assert {c.name for c in report.failures} == {type_check.name, in_set.name, nulls.name}
    # A real boolean column with a null fails only the null check.
    flags: list[bool | None] = [k % 2 == 0 for k in range(n)]
    flags[0] = None
    report = _validate(_qa_frame(is_correct=flags), tmp_path, config)
    assert [c.name for c in report.failures] == [f"{NOT_NULL}(is_correct)"]


def test_missing_topics_only_warn(tmp_path: Path, config: PipelineConfig) -> None:
    n = _qa_frame().height
    topics: list[str | None] = [f"t{k % 3}" for k in range(n)]
    topics[0] = topics[1] = None
    report = _validate(_qa_frame(topic=topics, subtopic=[None] * n), tmp_path, config)
    assert report.success, failure_message(report)
    assert [(c.name, c.severity) for c in report.warnings] == [
        (f"{NOT_NULL}(topic)", "warning"),
        (f"{NOT_NULL}(subtopic)", "warning"),
    ]
    assert _check(report, f"{NOT_NULL}(topic)").details.startswith("2 of 24 values")


# --------------------------------------------------------------------------- config-driven own checks


def test_duplicate_threshold_comes_from_config(tmp_path: Path) -> None:
    rows = _rows()
    rows += [dict(rows[0]), dict(rows[0]), dict(rows[9])]  # 3 of 27 rows = 11.1%
    frame = _frame(rows)
    lenient = _validate(frame, tmp_path, _config(max_duplicate_fraction=0.2))
    check = _check(lenient, "no duplicate (user_id, item_id, timestamp) rows (> 20% fails)")
    assert not check.success and check.severity == "warning" and lenient.success
    strict = _validate(frame, tmp_path, _config(max_duplicate_fraction=0.1))
    check = _check(strict, "no duplicate (user_id, item_id, timestamp) rows (> 10% fails)")
    assert check.severity == "error" and not strict.success
    zero = _validate(_frame(_rows() + [dict(_rows()[0])]), tmp_path, _config(max_duplicate_fraction=0))
    assert [c.name for c in zero.failures] == ["no duplicate (user_id, item_id, timestamp) rows (> 0% fails)"]


def test_future_tolerance_comes_from_config(tmp_path: Path) -> None:
    rows = _rows()
    rows[5][TIME] = datetime.now(UTC) + timedelta(hours=30)
    frame = _frame(rows)
    report = _validate(frame, tmp_path, _config(future_tolerance_hours=24))
    check = _check(report, "timestamps not in the future (> 24 h ahead fails)")
    assert not check.success and check.details.startswith("1 of 24 timestamps")
    relaxed = _validate(frame, tmp_path, _config(future_tolerance_hours=48))
    assert _check(relaxed, "timestamps not in the future (> 48 h ahead fails)").success and relaxed.success
    soon = _rows()
    soon[-1][TIME] = datetime.now(UTC) + timedelta(minutes=40)
    tight = _validate(_frame(soon), tmp_path, _config(future_tolerance_hours=0.5))
    assert not _check(tight, "timestamps not in the future (> 0.5 h ahead fails)").success


def test_row_count_drop_against_previous_snapshot(tmp_path: Path, config: PipelineConfig) -> None:
    snapshot = _snapshot(_frame(_rows()), tmp_path)  # 24 rows
    name = "row count vs the previous snapshot (> 50% drop fails)"
    dropped = validate_snapshot(snapshot, config, tmp_path, previous_rows=60)  # -60%
    check = _check(dropped, name)
    assert not check.success and check.severity == "error"
    assert check.details == "row count dropped 60% vs the previous snapshot (60 → 24 rows)"
    assert [c.name for c in dropped.failures] == [name]
    fine = validate_snapshot(snapshot, config, tmp_path, previous_rows=40)  # -40%
    assert _check(fine, name).success and fine.success
    assert _check(fine, name).details == "40 → 24 rows (-40%)"
    assert validate_snapshot(snapshot, config, tmp_path, previous_rows=48).success  # exactly -50% passes
    assert not [c for c in validate_snapshot(snapshot, config, tmp_path).checks if c.name == name]
    stricter = validate_snapshot(snapshot, _config(max_row_drop=0.3), tmp_path, previous_rows=40)
    assert [c.name for c in stricter.failures] == ["row count vs the previous snapshot (> 30% drop fails)"]


def test_item_filter_leaves_too_few_items(tmp_path: Path) -> None:
    # Every user rates each item once: with min_item_interactions above the user count, no item survives.
    rows = [
        {USER: f"u{u}", ITEM: f"i{k}", TIME: T0 + timedelta(hours=10 * u + k), RATING: 1.0}
        for u in range(3)
        for k in range(6)
    ]
    cfg = load_config(overrides={"dataset.min_item_interactions": 4, "dataset.split": "ratio"})
    report = _validate(_frame(rows), tmp_path, cfg)
    items = _check(report, "at least 2 items left after filtering")
    assert not items.success and items.details.startswith("0 of 6 items remain")
    users = _check(report, SPLIT_USERS)
    assert not users.success and "0 remain after items with < 4" in users.details and "'ratio'" in users.details


def test_bad_config_kwargs_path_is_a_config_error(tmp_path: Path) -> None:
    path = _write_suite(
        tmp_path,
        [
            {
                "type": "expect_column_values_to_be_between",
                "kwargs": {"column": "difficulty_level", "min_value": 1},
                "meta": {"config_kwargs": {"min_value": "validation.difficulty_rnage.0"}},
            }
        ],
    )
    with pytest.raises(ConfigError, match="'validation.difficulty_rnage.0' is not in the configuration"):
        load_suite(path)


def test_gx_gets_only_needed_columns_with_ids_as_categoricals(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             config: PipelineConfig) -> None:
    import core.data.validation as validation

    seen: list[pd.DataFrame] = []
    original = validation._to_pandas

    def spy(frame: pl.DataFrame, height: int) -> pd.DataFrame:
        seen.append(original(frame, height))
        return seen[-1]

    monkeypatch.setattr(validation, "_to_pandas", spy)
    frame = _frame(_rows()).with_columns(pl.lit("unused").alias("notes"))
    frame = frame.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(None).otherwise(pl.col(USER)).alias(USER))
    report = _validate(frame, tmp_path, config)
    (copy,) = seen
    assert list(copy.columns) == [USER, ITEM, TIME, RATING]  # no "notes"
    assert isinstance(copy[USER].dtype, pd.CategoricalDtype) and isinstance(copy[ITEM].dtype, pd.CategoricalDtype)
    assert copy[USER].isna().sum() == 1 and copy[USER].iloc[0] == "u0"
    assert str(copy[TIME].dt.tz) == "UTC"
    assert _check(report, f"{NOT_NULL}(user_id)").details.startswith("1 of 24 values")
    # A suite that names no column still sees the row count.
    suite = _write_suite(tmp_path, [{"type": "expect_table_row_count_to_be_between", "kwargs": {"min_value": 30}}])
    seen.clear()
    counted = validate_snapshot(_snapshot(frame, tmp_path), config, tmp_path, suite_path=suite)
    assert seen[0].shape == (24, 0)
    assert _check(counted, "expect_table_row_count_to_be_between(min_value=30)").details == "24 rows"


def test_ids_recbole_reads_as_missing(tmp_path: Path, config: PipelineConfig) -> None:
    name = "no ids that RecBole reads as missing (NA, null, None, nan, ...)"
    rows = _rows()
    for r in rows[:6]:
        r[USER] = "NA"  # a learner really called "NA": pandas (so RecBole) reads it as missing
    report = _validate(_frame(rows), tmp_path, config)
    check = _check(report, name)
    assert not check.success and check.severity == "warning" and report.success
    assert check.details.startswith("6 user_id values (25% of rows) are pandas NA strings")
    assert check.examples == ["user_id='NA'"]
    rows[7][ITEM] = "null"
    both = _check(_validate(_frame(rows), tmp_path, config), name)
    assert both.severity == "error" and "drops the wrong rows" in both.details
    assert both.examples == ["user_id='NA'", "item_id='null'"]
    assert _check(_validate(_frame(_rows()), tmp_path, config), name).success


def test_recbole_na_tokens_are_pandas_defaults() -> None:
    from pandas._libs.parsers import STR_NA_VALUES

    from core.data.validation import RECBOLE_NA_TOKENS

    assert RECBOLE_NA_TOKENS == STR_NA_VALUES


# ------------------------------------------------ question_attempts columns in a --data file


def _attempts_csv(path: Path, *, users: int = 30, seed: int = 3, **replace: Callable[[pl.DataFrame], pl.Expr]) -> Path:
    """Synthetic question attempts written as a CSV with their own column names."""
    from core.data.sources.synthetic import generate_question_attempts

    frame = generate_question_attempts(users, seed=seed)
    frame = frame.with_columns(pl.col("created_at").dt.to_string("%Y-%m-%dT%H:%M:%S%.f%:z"))
    for column, make in replace.items():
        frame = frame.with_columns(make(frame).alias(column))
    frame.write_csv(path)
    return path


def _every(n: int, every: int) -> pl.Series:
    return pl.Series([k % every == 0 for k in range(n)])


def _file_config(path: Path) -> PipelineConfig:
    # What `recflow run --data FILE --user-col user_id --item-col question_id --time-col created_at` builds.
    return load_config(overrides={"source.kind": "file", "source.path": str(path), "columns.user": "user_id",
                                  "columns.item": "question_id", "columns.time": "created_at"})


def test_a_data_file_with_question_attempt_columns_gets_their_rules(tmp_path: Path) -> None:
    cfg = _file_config(_attempts_csv(tmp_path / "attempts.csv"))
    assert cfg.columns.extra == []  # nothing named them: the file's own columns decide
    snapshot = extract(cfg, tmp_path)
    assert set(QA_COLUMNS) <= set(pl.read_parquet_schema(snapshot.path))
    report = validate_snapshot(snapshot, cfg, tmp_path)
    assert report.suite == "question_attempts"
    assert report.success, failure_message(report)


def test_a_data_file_with_a_maybe_in_is_correct_is_stopped(tmp_path: Path) -> None:
    path = _attempts_csv(
        tmp_path / "attempts.csv",
        is_correct=lambda f: pl.when(_every(f.height, 50)).then(pl.lit("maybe"))
        .otherwise(pl.col("is_correct").cast(pl.String)),
    )
    cfg = _file_config(path)
    report = validate_snapshot(extract(cfg, tmp_path), cfg, tmp_path)
    assert report.suite == "question_attempts" and not report.success
    n = pl.read_csv(path).height
    bad = len(range(0, n, 50))
    assert 0 < bad < n / 40  # about 2 % of the rows
    in_set = _check(report, f"{IN_SET}(is_correct)")
    assert in_set.details.startswith(f"{bad} of {n} values")
    assert in_set.examples == ["maybe"]
    type_check = _check(report, f"{TYPE_LIST}(is_correct)")
    assert type_check.details.startswith(f"is_correct is String: {bad} of {n} values")
    with pytest.raises(DataValidationError, match=rf"is_correct\): {bad} of {n} values .* e\.g\. \[maybe\]"):
        raise_for_failures(report)


def test_a_data_file_with_negative_response_times_is_stopped(tmp_path: Path) -> None:
    path = _attempts_csv(
        tmp_path / "attempts.csv",
        response_time_seconds=lambda f: pl.when(_every(f.height, 40)).then(pl.lit(-7.5))
        .otherwise(pl.col("response_time_seconds")),
    )
    cfg = _file_config(path)
    report = validate_snapshot(extract(cfg, tmp_path), cfg, tmp_path)
    assert report.suite == "question_attempts"
    assert [c.name for c in report.failures] == [f"{BETWEEN}(response_time_seconds)"]
    check = report.failures[0]
    n = pl.read_csv(path).height
    assert check.details.startswith(f"{len(range(0, n, 40))} of {n} values")
    assert check.examples == ["-7.5"]


def test_explicit_extra_columns_still_win_for_a_data_file(tmp_path: Path) -> None:
    path = _attempts_csv(tmp_path / "attempts.csv")
    cfg = load_config(overrides={"source.kind": "file", "source.path": str(path), "columns.item": "question_id",
                                 "columns.time": "created_at", "columns.extra": ["topic"]})
    snapshot = extract(cfg, tmp_path)
    assert pl.read_parquet_schema(snapshot.path).names() == [USER, ITEM, TIME, "topic"]
    assert validate_snapshot(snapshot, cfg, tmp_path).suite == "interactions"
