"""Data validation: the GX suite plus recflow's own polars checks, on small generated snapshots."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from core.config import PipelineConfig, load_config
from core.errors import ConfigError, DataValidationError
from core.extract import extract
from core.records import ITEM, RATING, TIME, USER, CheckResult, Snapshot, ValidationReport
from core.validation import (
    DEFAULT_SUITE,
    REPORT_FILE,
    failure_message,
    load_suite,
    raise_for_failures,
    report_markdown,
    validate_snapshot,
)

T0 = datetime(2020, 1, 1, tzinfo=timezone.utc)
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
    rows[3][TIME] = datetime(2100, 1, 1, tzinfo=timezone.utc)
    rows[4][TIME] = datetime.now(timezone.utc) + timedelta(hours=2)  # within the 1-day tolerance
    report = _validate(_frame(rows), tmp_path, config)
    check = _check(report, "timestamps not in the future (> 1 day ahead fails)")
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
