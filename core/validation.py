"""validate: the data-quality gate between extract and dataset building.

Two kinds of checks make up one ``ValidationReport``:

* the Great Expectations suite in ``expectations/interactions.json`` (column presence,
  nulls, row count, rating type), run with an ephemeral GX context on a pandas copy of
  the snapshot, and
* recflow's own checks, computed with polars, for what GX cannot say simply: enough
  users and items for a split, users RecBole will filter out, timestamps in the future,
  duplicate interactions.

Each expectation's ``meta`` may hold ``severity`` ("error" | "warning"; a warning never
blocks the run) and ``hint`` (appended to the details of a failure).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

# Must be set before GX is imported: recflow never sends usage statistics.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

import great_expectations as gx  # noqa: E402
import pandas as pd  # noqa: E402
import polars as pl  # noqa: E402
from great_expectations.core.expectation_validation_result import ExpectationValidationResult  # noqa: E402
from great_expectations.data_context.types.base import ProgressBarsConfig  # noqa: E402
from great_expectations.exceptions import GreatExpectationsError  # noqa: E402

from core.config import PipelineConfig  # noqa: E402
from core.errors import ConfigError, DataSourceError, DataValidationError  # noqa: E402
from core.records import ITEM, RATING, TIME, USER, CheckResult, Snapshot, ValidationReport  # noqa: E402

DEFAULT_SUITE = Path(__file__).resolve().parent.parent / "expectations" / "interactions.json"
REPORT_FILE = "validation_report.json"
FUTURE_TOLERANCE = timedelta(days=1)
MAX_DUPLICATE_SHARE = 0.01
MAX_EXAMPLES = 5
# Columns a snapshot may lack; expectations on them are skipped (not failed) when absent.
OPTIONAL_COLUMNS = (RATING,)

Severity = Literal["error", "warning"]
_SUITE_LOGGER = "great_expectations.core.expectation_suite"


# --------------------------------------------------------------------------- suite loading


class _ListHandler(logging.Handler):
    """Keeps GX's "could not add expectation" messages instead of printing their tracebacks."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _captured_suite_log() -> Iterator[list[str]]:
    logger = logging.getLogger(_SUITE_LOGGER)
    handler = _ListHandler()
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def load_suite(path: Path) -> gx.ExpectationSuite:
    """Build the GX suite from its JSON file, refusing a suite GX only partly understood.

    ``gx.ExpectationSuite(**json)`` logs and *drops* an expectation whose type it does not
    know (a typo would silently weaken the gate), so the built count is compared with the
    listed one.
    """
    path = Path(path)
    try:
        raw: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"expectation suite not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read expectation suite {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"expectation suite {path} is not valid JSON: {exc}") from None
    listed = raw.get("expectations") if isinstance(raw, dict) else None
    if not isinstance(listed, list) or not all(isinstance(e, dict) for e in listed):
        raise ConfigError(f"expectation suite {path} must be a JSON object with an 'expectations' list of objects")
    for entry in listed:
        meta = entry.get("meta")
        severity = meta.get("severity") if isinstance(meta, dict) else None
        if severity not in (None, "error", "warning"):
            raise ConfigError(
                f"expectation suite {path}: {entry.get('type')} has meta.severity {severity!r}; "
                "use 'error' or 'warning'"
            )
    with _captured_suite_log() as gx_messages:
        try:
            suite = gx.ExpectationSuite(**raw)
        except (ValueError, TypeError, GreatExpectationsError) as exc:
            # Bad kwargs (e.g. a missing "column") raise rather than drop.
            raise ConfigError(f"expectation suite {path} is invalid: {_one_line(exc)}") from None
    if len(suite.expectations) != len(listed):
        built = Counter(e.expectation_type for e in suite.expectations)
        wanted = Counter(str(e.get("type", "<no type>")) for e in listed)
        dropped = sorted(set((wanted - built).elements()))
        reasons = "; ".join(m.rsplit("not valid: ", 1)[-1] for m in gx_messages)
        raise ConfigError(
            f"expectation suite {path}: GX built {len(suite.expectations)} of {len(listed)} expectations; "
            f"dropped: {', '.join(dropped) or '?'}" + (f" ({reasons})" if reasons else "")
        )
    return suite


# --------------------------------------------------------------------------- validation


def validate_snapshot(
    snapshot: Snapshot, config: PipelineConfig, run_dir: Path, suite_path: Path | None = None
) -> ValidationReport:
    """Run the GX suite and recflow's own checks; write ``validation_report.json`` to ``run_dir``."""
    suite = load_suite(suite_path or DEFAULT_SUITE)
    if not Path(snapshot.path).is_file():
        raise DataSourceError(f"snapshot not found: {snapshot.path} (run extract first)")
    frame = pl.read_parquet(snapshot.path)
    runnable = _applicable(suite, frame.columns, snapshot.has_rating)
    checks = _run_suite(runnable, frame) + _own_checks(frame, config)
    report_path = Path(run_dir) / REPORT_FILE
    report = ValidationReport(
        suite=suite.name,
        expectations_loaded=len(suite.expectations),
        success=not any(not c.success and c.severity == "error" for c in checks),
        checks=checks,
        report_path=report_path,
    )
    report_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = report_path.with_suffix(".json.tmp")
    tmp.write_text(report.model_dump_json(indent=2), encoding="utf-8")
    tmp.replace(report_path)
    return report


def _applicable(suite: gx.ExpectationSuite, columns: Sequence[str], has_rating: bool) -> gx.ExpectationSuite:
    """The suite minus expectations on optional columns the snapshot does not have."""
    absent = {c for c in OPTIONAL_COLUMNS if c not in columns or (c == RATING and not has_rating)}
    kept = [e.configuration for e in suite.expectations if getattr(e, "column", None) not in absent]
    if len(kept) == len(suite.expectations):
        return suite
    return gx.ExpectationSuite(name=suite.name, expectations=kept, meta=dict(suite.meta))


def _run_suite(suite: gx.ExpectationSuite, frame: pl.DataFrame) -> list[CheckResult]:
    context = gx.get_context(mode="ephemeral")
    # GX draws tqdm bars on every validation unless the context disables them.
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    batch = (
        context.data_sources.add_pandas("recflow")
        .add_dataframe_asset("snapshot")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": _to_pandas(frame)})
    )
    outcome = batch.validate(suite, result_format={"result_format": "BASIC", "partial_unexpected_count": 20})
    # GX returns results in metric-resolution order; report them in suite order.
    order = {_config_key(e.configuration.type, e.configuration.kwargs): i for i, e in enumerate(suite.expectations)}
    results = sorted(
        outcome.results,
        key=lambda r: order.get(_config_key(r.expectation_config.type, r.expectation_config.kwargs), len(order)),
    )
    return [_check_from_result(r, frame) for r in results]


def _config_key(kind: str, kwargs: dict[str, Any]) -> str:
    return kind + json.dumps({k: v for k, v in kwargs.items() if k != "batch_id"}, sort_keys=True, default=str)


def _to_pandas(frame: pl.DataFrame) -> pd.DataFrame:
    # Column by column through numpy: polars' to_pandas() needs a working pyarrow, and the
    # pyarrow wheel here wants numpy 2 while RecBole keeps numpy 1.
    data: dict[str, pd.Series] = {}
    for series in frame.iter_columns():
        values = pd.Series(series.to_numpy(), name=series.name)
        if isinstance(series.dtype, pl.Datetime) and series.dtype.time_zone:
            # to_numpy() yields naive UTC instants.
            values = values.dt.tz_localize("UTC").dt.tz_convert(series.dtype.time_zone)
        data[series.name] = values
    return pd.DataFrame(data, columns=frame.columns)


def _check_from_result(result: ExpectationValidationResult, frame: pl.DataFrame) -> CheckResult:
    cfg = result.expectation_config
    kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
    meta: dict[str, Any] = dict(cfg.meta or {})
    column = kwargs.get("column")
    name = _expectation_name(cfg.type, kwargs)
    success = bool(result.success)
    outcome: dict[str, Any] = dict(result.result or {})
    error = _exception_message(result.exception_info)
    examples: list[str] = []
    if error is not None:
        details = f"could not be evaluated: {error}"
    elif cfg.type == "expect_column_to_exist":
        details = "present" if success else f"column {column!r} is missing"
    elif cfg.type == "expect_table_row_count_to_be_between":
        rows = outcome.get("observed_value")
        details = "no rows" if rows == 0 else f"{rows} rows"
    elif "unexpected_count" in outcome:
        bad, total = int(outcome.get("unexpected_count") or 0), int(outcome.get("element_count") or 0)
        details = f"{bad} of {total} values ({_pct(bad, total)})" if total else "0 values"
        if not success and cfg.type == "expect_column_values_to_not_be_null" and isinstance(column, str):
            # A null shows nothing; the rows around it let a person find it in the source.
            examples = _null_row_examples(frame, column)
        elif not success:
            examples = _unique_strings(outcome.get("partial_unexpected_list") or [])
    elif "observed_value" in outcome:
        details = f"observed {outcome['observed_value']}"
    else:
        details = ""
    if not success and meta.get("hint"):
        details = f"{details} — {meta['hint']}" if details else str(meta["hint"])
    return CheckResult(
        name=name, success=success, severity=_severity(meta, cfg), details=details, examples=examples[:MAX_EXAMPLES]
    )


def _expectation_name(kind: str, kwargs: dict[str, Any]) -> str:
    if "column" in kwargs:
        return f"{kind}({kwargs['column']})"
    if "column_list" in kwargs:
        return f"{kind}({', '.join(map(str, kwargs['column_list']))})"
    args = ", ".join(f"{k}={v}" for k, v in kwargs.items() if v is not None)
    return f"{kind}({args})" if args else kind


def _severity(meta: dict[str, Any], cfg: Any) -> Severity:
    # meta.severity is recflow's switch; GX 1.x also has its own Expectation.severity
    # (critical/warning/info), honoured when meta says nothing.
    if meta.get("severity") in ("error", "warning"):
        return meta["severity"]  # type: ignore[no-any-return]
    native = str(getattr(getattr(cfg, "severity", None), "value", "critical"))
    return "error" if native == "critical" else "warning"


def _exception_message(info: Any) -> str | None:
    """GX's exception_info is either one dict or a dict of dicts keyed by metric id."""
    if not isinstance(info, dict) or not info:
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message") or "error")
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message") or "error")
    return None


def _null_row_examples(frame: pl.DataFrame, column: str) -> list[str]:
    if column not in frame.columns:
        return []
    context = [c for c in (USER, ITEM, TIME) if c != column and c in frame.columns]
    rows = frame.filter(pl.col(column).is_null()).head(MAX_EXAMPLES)
    if not context:
        return ["None"] * min(rows.height, 1)
    return [" ".join(f"{c}={_fmt(v)}" for c, v in zip(context, row)) for row in rows.select(context).iter_rows()]


# --------------------------------------------------------------------------- recflow's own checks


def _own_checks(frame: pl.DataFrame, config: PipelineConfig) -> list[CheckResult]:
    """Checks GX cannot express simply; each needs its columns (a missing column already fails in GX)."""
    checks: list[CheckResult] = []
    if USER in frame.columns:
        checks.append(_at_least_two(frame, USER, "users"))
    if ITEM in frame.columns:
        checks.append(_at_least_two(frame, ITEM, "items"))
    if USER in frame.columns:
        checks.extend(_split_users(frame, config))
    if TIME in frame.columns and isinstance(frame.schema[TIME], pl.Datetime):
        checks.append(_not_in_future(frame))
    if {USER, ITEM, TIME} <= set(frame.columns):
        checks.append(_duplicates(frame))
    return checks


def _at_least_two(frame: pl.DataFrame, column: str, label: str) -> CheckResult:
    n = frame.get_column(column).drop_nulls().n_unique()
    return CheckResult(name=f"at least 2 {label}", success=n >= 2, details=f"{n} distinct {column} values")


def _split_users(frame: pl.DataFrame, config: PipelineConfig) -> list[CheckResult]:
    """RecBole drops users below min_user_interactions; too few survivors leave nothing to split."""
    need = config.dataset.min_user_interactions
    counts = frame.filter(pl.col(USER).is_not_null()).group_by(USER).agg(pl.len().alias("n"))
    total = counts.height
    kept = counts.filter(pl.col("n") >= need).height
    short = counts.filter(pl.col("n") < need).sort(["n", USER])
    enough = CheckResult(
        name=f"enough users with >= {need} interactions for the split",
        success=kept >= 2,
        details=f"{kept} of {total} users have >= {need} interactions; "
        f"the '{config.dataset.split}' split needs at least 2",
    )
    filtered = CheckResult(
        name=f"users with < {need} interactions (filtered out before training)",
        success=short.height == 0,
        severity="warning",
        details=f"{short.height} of {total} users ({_pct(short.height, total)}) have fewer than {need} interactions",
        examples=[f"{u} ({n} interactions)" for u, n in short.head(MAX_EXAMPLES).iter_rows()],
    )
    return [enough, filtered]


def _not_in_future(frame: pl.DataFrame) -> CheckResult:
    dtype = frame.schema[TIME]
    limit = datetime.now(timezone.utc) + FUTURE_TOLERANCE
    times = frame.get_column(TIME).drop_nulls()
    if isinstance(dtype, pl.Datetime) and dtype.time_zone is None:
        bound = pl.lit(limit.replace(tzinfo=None), dtype=pl.Datetime(dtype.time_unit))
    else:
        bound = pl.lit(limit).dt.convert_time_zone(str(getattr(dtype, "time_zone", "UTC")))
    late = times.to_frame().filter(pl.col(TIME) > bound).get_column(TIME)
    name = f"timestamps not in the future (> {FUTURE_TOLERANCE.days} day ahead fails)"
    if late.len() == 0:
        latest = _fmt(times.max()) if times.len() else "none"
        return CheckResult(name=name, success=True, details=f"latest timestamp {latest}")
    return CheckResult(
        name=name,
        success=False,
        details=f"{late.len()} of {times.len()} timestamps ({_pct(late.len(), times.len())}) are after "
        f"{limit:%Y-%m-%d %H:%M} UTC",
        examples=[_fmt(t) for t in late.unique().sort(descending=True).head(MAX_EXAMPLES)],
    )


def _duplicates(frame: pl.DataFrame) -> CheckResult:
    """Exact repeats of (user, item, time): a few are noise (warning), many mean a broken export."""
    keyed = frame.select(USER, ITEM, TIME).drop_nulls()
    rows = keyed.height
    dups = rows - keyed.n_unique() if rows else 0
    share = dups / rows if rows else 0.0
    severity: Severity = "error" if share > MAX_DUPLICATE_SHARE or dups == 0 else "warning"
    examples = [
        " ".join(f"{c}={_fmt(v)}" for c, v in zip(keyed.columns, row))
        for row in keyed.filter(keyed.is_duplicated()).unique(maintain_order=True).head(MAX_EXAMPLES).iter_rows()
    ]
    return CheckResult(
        name=f"no duplicate ({USER}, {ITEM}, {TIME}) rows (> {MAX_DUPLICATE_SHARE:.0%} fails)",
        success=dups == 0,
        severity=severity,
        details=f"{dups} of {rows} rows ({_pct(dups, rows)}) repeat an earlier row",
        examples=examples,
    )


# --------------------------------------------------------------------------- presentation


def failure_message(report: ValidationReport) -> str:
    """One paragraph for an exception or a log line: each failing check with a few bad values."""
    failures = report.failures
    if not failures:
        return (
            f"data validation passed ({len(report.checks)} checks, {len(report.warnings)} warnings)"
            f" — full report: {report.report_path}"
        )
    parts = []
    for check in failures:
        text = f"{check.name}: {check.details}"
        if check.examples:
            text += f" e.g. [{', '.join(check.examples[:3])}]"
        parts.append(text)
    plural = "s" if len(failures) != 1 else ""
    return (
        f"data validation failed ({len(failures)} check{plural}): {'; '.join(parts)}"
        f" — full report: {report.report_path}"
    )


def report_markdown(report: ValidationReport) -> str:
    """A markdown table of every check, for a Prefect artifact."""
    verdict = "passed" if report.success else "FAILED"
    lines = [
        f"## Data validation {verdict}",
        "",
        f"Suite `{report.suite}` ({report.expectations_loaded} expectations loaded); {len(report.checks)} checks, "
        f"{len(report.failures)} failed, {len(report.warnings)} warning(s). Report: `{report.report_path}`",
        "",
        "| check | result | details | examples |",
        "|---|---|---|---|",
    ]
    for check in report.checks:
        result = "pass" if check.success else ("FAIL" if check.severity == "error" else "warn")
        cells = [check.name, result, check.details, ", ".join(check.examples)]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def raise_for_failures(report: ValidationReport) -> None:
    if not report.success:
        raise DataValidationError(failure_message(report), report_path=str(report.report_path))


# --------------------------------------------------------------------------- helpers


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.3g}%" if whole else "0%"


def _fmt(value: Any) -> str:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return str(value)


def _unique_strings(values: Sequence[Any]) -> list[str]:
    seen: dict[str, None] = {}
    for v in values:
        seen.setdefault(_fmt(v), None)
    return list(seen)


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(text.split()) if text else type(exc).__name__


__all__ = [
    "DEFAULT_SUITE",
    "REPORT_FILE",
    "failure_message",
    "load_suite",
    "raise_for_failures",
    "report_markdown",
    "validate_snapshot",
]
