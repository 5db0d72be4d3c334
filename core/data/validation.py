"""validate: the data-quality gate between extract and dataset building.

Two kinds of checks make up one ``ValidationReport``:

* a Great Expectations suite from ``expectations/`` (column presence, nulls, row count,
  types and value ranges), run with an ephemeral GX context on a pandas copy of the
  snapshot, and
* recflow's own checks, computed with polars, for what GX cannot say simply (or cheaply):
  enough users and items for the split, users RecBole will filter out, timestamps in the
  future, duplicate interactions, and the row count against the previous snapshot.

Suites, one per schema:

* ``interactions`` (``expectations/interactions.json``): the canonical columns
  (user_id, item_id, timestamp, optional rating);
* ``question_attempts`` (``expectations/question_attempts.json``): the same plus the ed-tech
  columns is_correct, response_time_seconds, difficulty_level, topic and subtopic
  (carried into the snapshot through ``columns.extra``; a ``--data`` file that has all five
  keeps them without it, see ``core/data/sources/file.py``).

``validation.suite: auto`` picks ``question_attempts`` when the snapshot has all five of
those columns, else ``interactions``; ``validate_snapshot(..., suite_path=...)`` overrides both.

Each expectation's ``meta`` may hold ``severity`` ("error" | "warning"; a warning never
blocks the run), ``hint`` (appended to the details of a failure) and ``config_kwargs``:
a mapping from a GX kwarg to a dotted path into ``PipelineConfig`` (an integer part
indexes a list). ``load_suite(path, config)`` replaces those kwargs with the config's
values before GX builds the suite, so the JSON keeps working defaults and the config wins:
``{"min_value": "validation.difficulty_range.0", "max_value": "validation.difficulty_range.1"}``
makes ``validation.difficulty_range`` the bounds of ``difficulty_level``.

Thresholds of the own checks come from ``config.validation``: ``max_duplicate_fraction``,
``future_tolerance_hours``, ``max_row_drop`` (with ``previous_rows``).

Speed and memory on large snapshots: the snapshot is read once with only the columns the
suite and the own checks need; GX gets only the columns its expectations name, with
text columns as pandas categoricals (integer codes, not one Python string per row);
duplicates, future timestamps, per-user counts and drift are polars expressions.

Quirks: numpy stays < 2 for RecBole, so polars -> pandas is done column by column here
rather than through ``DataFrame.to_pandas()``; GX runs in an ephemeral context with its
progress bars off; ``load_suite`` refuses a suite of which GX built fewer expectations
than the JSON lists (GX logs and drops an expectation type it does not know).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, Literal

# Must be set before GX is imported: recflow never sends usage statistics.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

import great_expectations as gx
import pandas as pd
import polars as pl
from great_expectations.core.expectation_validation_result import ExpectationValidationResult
from great_expectations.data_context.types.base import ProgressBarsConfig
from great_expectations.exceptions import GreatExpectationsError

from core.config import QUESTION_ATTEMPTS_COLUMNS, PipelineConfig
from core.errors import ConfigError, DataSourceError, DataValidationError
from core.records import ITEM, RATING, TIME, USER, CheckResult, Snapshot, ValidationReport

# Package data (the ``expectations`` package): the checkout's folder, or its copy in an installed recflow.
SUITES_DIR = Path(str(resources.files("expectations")))
SUITE_FILES = {
    "interactions": SUITES_DIR / "interactions.json",
    "question_attempts": SUITES_DIR / "question_attempts.json",
}
DEFAULT_SUITE = SUITE_FILES["interactions"]
# The columns that make a snapshot a question_attempts one (suite "auto"): the extra
# columns of the question_attempts column mapping.
QUESTION_ATTEMPT_COLUMNS = tuple(QUESTION_ATTEMPTS_COLUMNS["extra"])
REPORT_FILE = "validation_report.json"
MAX_EXAMPLES = 5
# Columns a snapshot may lack; expectations on them are skipped (not failed) when absent.
OPTIONAL_COLUMNS = (RATING,)
# pandas' read_csv default NA strings: RecBole reads an id equal to one of them as missing.
RECBOLE_NA_TOKENS = frozenset(
    ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
     "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]
)
# GX kwargs that name columns (what GX needs in its pandas copy).
_COLUMN_KWARGS = ("column", "column_A", "column_B")

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


def load_suite(path: Path, config: PipelineConfig | None = None) -> gx.ExpectationSuite:
    """Build the GX suite from its JSON file, refusing a suite GX only partly understood.

    ``gx.ExpectationSuite(**json)`` logs and *drops* an expectation whose type it does not
    know (a typo would silently weaken the gate), so the built count is compared with the
    listed one. With ``config``, kwargs named in an expectation's ``meta.config_kwargs``
    take the config's values (see the module docstring); without it the JSON's own values
    stay, but the config paths are still checked against a default config.
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
        _apply_config_kwargs(entry, config, path)
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


def _apply_config_kwargs(entry: dict[str, Any], config: PipelineConfig | None, path: Path) -> None:
    """Replace the kwargs named in ``meta.config_kwargs`` with values from ``config`` (in place)."""
    meta = entry.get("meta")
    mapping = meta.get("config_kwargs") if isinstance(meta, dict) else None
    if mapping is None:
        return
    where = f"expectation suite {path}: {entry.get('type')}"
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise ConfigError(f"{where}: meta.config_kwargs must map kwarg names to dotted config paths")
    kwargs = entry.setdefault("kwargs", {})
    if not isinstance(kwargs, dict):
        return  # GX reports the bad kwargs
    reference = config if config is not None else PipelineConfig()
    for kwarg, dotted in mapping.items():
        value = _config_value(reference, dotted, where)
        if config is not None:
            kwargs[kwarg] = value
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    if isinstance(low, (int, float)) and isinstance(high, (int, float)) and low > high:
        column = kwargs.get("column", "?")
        raise ConfigError(f"{where}({column}): min_value {low} is above max_value {high} (from {mapping})")


def _config_value(config: PipelineConfig, dotted: str, where: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        try:
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        except (AttributeError, IndexError, KeyError, TypeError):
            raise ConfigError(f"{where}: meta.config_kwargs path {dotted!r} is not in the configuration") from None
    if isinstance(node, (list, tuple)):
        return list(node)
    if isinstance(node, Path):
        return str(node)
    return node


def select_suite(config: PipelineConfig, columns: Sequence[str]) -> str:
    """The suite for a snapshot with ``columns``: ``validation.suite``, or by schema when it is "auto"."""
    choice = config.validation.suite
    if choice != "auto":
        return choice
    return "question_attempts" if set(QUESTION_ATTEMPT_COLUMNS) <= set(columns) else "interactions"


# --------------------------------------------------------------------------- validation


def validate_snapshot(
    snapshot: Snapshot,
    config: PipelineConfig,
    run_dir: Path,
    suite_path: Path | None = None,
    *,
    previous_rows: int | None = None,
) -> ValidationReport:
    """Run the GX suite and recflow's own checks; write ``validation_report.json`` to ``run_dir``.

    ``suite_path`` overrides the suite ``config.validation.suite`` selects. ``previous_rows``
    is the size of the previous comparable snapshot: fewer than ``(1 - max_row_drop)`` times
    as many rows now fails the run.
    """
    path = Path(snapshot.path)
    if not path.is_file():
        raise DataSourceError(f"snapshot not found: {path} (run extract first)")
    schema = pl.read_parquet_schema(path)
    suite = load_suite(suite_path or SUITE_FILES[select_suite(config, list(schema))], config)
    runnable = _applicable(suite, list(schema), snapshot.has_rating)
    gx_columns = _suite_columns(runnable, list(schema))
    wanted = set(gx_columns) | {USER, ITEM, TIME}
    # One read, of only the columns something looks at.
    frame = pl.read_parquet(path, columns=[c for c in schema if c in wanted])
    checks = _run_suite(runnable, frame, gx_columns) + _own_checks(frame, config, previous_rows)
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


def _suite_columns(suite: gx.ExpectationSuite, columns: Sequence[str]) -> list[str]:
    """The snapshot columns the suite's expectations name (all of them for table-schema expectations)."""
    named: set[str] = set()
    for expectation in suite.expectations:
        cfg = expectation.configuration
        if cfg.type.startswith("expect_table_column"):  # e.g. expect_table_columns_to_match_set
            return list(columns)
        named |= {str(cfg.kwargs[k]) for k in _COLUMN_KWARGS if cfg.kwargs.get(k) is not None}
        named |= {str(c) for c in cfg.kwargs.get("column_list") or ()}
    return [c for c in columns if c in named]


def _run_suite(suite: gx.ExpectationSuite, frame: pl.DataFrame, columns: Sequence[str]) -> list[CheckResult]:
    context = gx.get_context(mode="ephemeral")
    # GX draws tqdm bars on every validation unless the context disables them.
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    batch = (
        context.data_sources.add_pandas("recflow")
        .add_dataframe_asset("snapshot")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": _to_pandas(frame.select(columns), frame.height)})
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


def _to_pandas(frame: pl.DataFrame, height: int) -> pd.DataFrame:
    """GX's pandas copy: text as categoricals, nullable booleans as pandas' "boolean".

    Column by column through numpy: polars' ``to_pandas()`` goes through pyarrow, which
    recflow does not rely on next to numpy 1 (RecBole). Text columns become
    ``pd.Categorical`` built from polars' codes: 10M ids cost 40 MB of int32 codes and a
    few hundred thousand strings instead of 10M Python string objects.
    """
    data: dict[str, Any] = {}
    for series in frame.iter_columns():
        dtype = series.dtype
        if dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum):
            data[series.name] = _categorical(series)
        elif dtype == pl.Boolean and series.null_count():
            data[series.name] = pd.arrays.BooleanArray(
                series.fill_null(False).to_numpy(), series.is_null().to_numpy()
            )
        elif isinstance(dtype, pl.Datetime) and dtype.time_zone:
            # to_numpy() yields naive UTC instants.
            values = pd.Series(series.to_numpy(), name=series.name).dt.tz_localize("UTC")
            data[series.name] = values if dtype.time_zone == "UTC" else values.dt.tz_convert(dtype.time_zone)
        else:
            data[series.name] = series.to_numpy()
    # The index carries the row count when GX needs no column at all (a row-count-only suite).
    return pd.DataFrame(data, columns=frame.columns, index=pd.RangeIndex(height))


def _categorical(series: pl.Series) -> pd.Categorical:
    text = series.cast(pl.String)
    categories = text.drop_nulls().unique().sort()
    codes = text.cast(pl.Enum(categories)).to_physical().cast(pl.Int32).fill_null(-1).to_numpy()
    return pd.Categorical.from_codes(codes, categories=pd.Index(categories.to_numpy(), dtype=object))


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
    elif cfg.type == "expect_column_values_to_be_in_type_list" and column in frame.columns:
        # GX names numpy/pandas classes (e.g. CategoricalDtypeType for text); say what the data is.
        details = f"{column} is {frame.schema[column]}"
        if not success and frame.schema[column] == pl.String:
            # A text column where booleans/numbers belong (a CSV column with one odd value in it):
            # name the values that are not what the column should hold, not all of them.
            kind = "boolean" if set(map(str, kwargs.get("type_list") or ())) & _BOOL_TYPES else "numeric"
            bad_values = _text_not_parsing(frame.get_column(column), kind)
            if bad_values.len():
                details += f": {_bad_count(bad_values, frame.height)} are not {kind}"
                examples = _unique_strings(bad_values.head(200).to_list())
    elif cfg.type == "expect_column_values_to_be_in_set" and column in frame.columns \
            and frame.schema[column] == pl.String and not success:
        # GX compares text with the set's own values: "true" is not True, so every value of a text
        # is_correct column would count as bad. Compare text as text; count and show only real misfits.
        allowed = {str(v).lower() if isinstance(v, bool) else str(v) for v in kwargs.get("value_set") or ()}
        series = frame.get_column(column).drop_nulls()
        folded = series.str.to_lowercase() if any(isinstance(v, bool) for v in kwargs.get("value_set") or ()) else series
        bad_values = series.filter(~folded.is_in(list(allowed)))
        details = f"{_bad_count(bad_values, frame.height)}" if bad_values.len() else "0 values"
        examples = _unique_strings(bad_values.head(200).to_list())
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


def _own_checks(frame: pl.DataFrame, config: PipelineConfig, previous_rows: int | None = None) -> list[CheckResult]:
    """Checks GX cannot express simply; each needs its columns (a missing column already fails in GX).

    Written for 10M-row snapshots: aggregations over the id columns, no copies of them.
    """
    checks: list[CheckResult] = []
    if USER in frame.columns:
        checks.append(_at_least_two(frame, USER, "users"))
    if ITEM in frame.columns:
        checks.append(_at_least_two(frame, ITEM, "items"))
    if USER in frame.columns:
        checks.extend(_split_checks(frame, config))
    if {USER, ITEM} & set(frame.columns):
        checks.append(_ids_recbole_reads_as_missing(frame))
    if TIME in frame.columns and isinstance(frame.schema[TIME], pl.Datetime):
        checks.append(_not_in_future(frame, config.validation.future_tolerance_hours))
    if {USER, ITEM, TIME} <= set(frame.columns):
        checks.append(_duplicates(frame, config.validation.max_duplicate_fraction))
    if previous_rows is not None:
        checks.append(_row_drift(frame.height, previous_rows, config.validation.max_row_drop))
    return checks


def _at_least_two(frame: pl.DataFrame, column: str, label: str) -> CheckResult:
    values = frame.get_column(column)
    n = values.n_unique() - (1 if values.null_count() else 0)
    return CheckResult(name=f"at least 2 {label}", success=n >= 2, details=f"{n} distinct {column} values")


def _split_checks(frame: pl.DataFrame, config: PipelineConfig) -> list[CheckResult]:
    """What survives RecBole's filters, and whether that is enough for the split.

    RecBole drops rows without a user or item, then repeatedly drops users with fewer than
    ``min_user_interactions`` and items with fewer than ``min_item_interactions`` rows until
    nothing changes; this replays that in polars. Both splits (time-ordered leave-one-out,
    and the ratio split, which gives every user of >= 3 rows one valid and one test row)
    need >= 3 rows per user, which ``min_user_interactions >= 3`` guarantees, and at least
    2 users and 2 items left to train on.
    """
    d = config.dataset
    need_user, need_item = d.min_user_interactions, d.min_item_interactions
    keys = [c for c in (USER, ITEM) if c in frame.columns]
    rows = frame.select(keys)  # shares the columns, copies nothing
    if any(rows.get_column(c).null_count() for c in keys):
        rows = rows.drop_nulls()
    counts = rows.group_by(USER).agg(pl.len().alias("n"))
    total = counts.height
    short = counts.filter(pl.col("n") < need_user).sort(["n", USER])
    kept = total - short.height
    users_left, items_left, items_total = kept, None, None
    if ITEM in keys:
        users_left, items_left, items_total = _left_after_filtering(rows, counts, short, need_user, need_item)
    split = "leave-one-out" if d.split == "loo" else "ratio"
    details = f"{kept} of {total} users have >= {need_user} interactions"
    if users_left != kept:
        details += f"; {users_left} remain after items with < {need_item} interactions are dropped too"
    checks = [
        CheckResult(
            name=f"enough users with >= {need_user} interactions for the split",
            success=users_left >= 2,
            details=f"{details}; the '{d.split}' ({split}) split needs at least 2",
        ),
        CheckResult(
            name=f"users with < {need_user} interactions (filtered out before training)",
            success=short.height == 0,
            severity="warning",
            details=f"{short.height} of {total} users ({_pct(short.height, total)}) have fewer than "
            f"{need_user} interactions",
            examples=[f"{u} ({n} interactions)" for u, n in short.head(MAX_EXAMPLES).iter_rows()],
        ),
    ]
    if items_left is not None:
        checks.append(
            CheckResult(
                name="at least 2 items left after filtering",
                success=items_left >= 2,
                details=f"{items_left} of {items_total} items remain once users with < {need_user} and items "
                f"with < {need_item} interactions are dropped",
            )
        )
    return checks


def _left_after_filtering(
    rows: pl.DataFrame, user_counts: pl.DataFrame, short: pl.DataFrame, need_user: int, need_item: int
) -> tuple[int, int, int]:
    """(users, items, items before) left after RecBole's ``_filter_by_inter_num``."""
    item_counts = rows.group_by(ITEM).agg(pl.len().alias("n"))
    if need_item <= 1:
        # Dropping whole users changes no other user's count and leaves every item >= 1 row:
        # one round. An item is lost when all its rows belong to dropped users.
        if short.height == 0:
            return user_counts.height, item_counts.height, item_counts.height
        dropped = rows.filter(pl.col(USER).is_in(short.get_column(USER))).group_by(ITEM).agg(pl.len().alias("d"))
        lost = dropped.join(item_counts, on=ITEM).filter(pl.col("d") == pl.col("n")).height
        return user_counts.height - short.height, item_counts.height - lost, item_counts.height
    left = rows
    while True:  # rare settings: replay the rounds on the rows themselves
        bad_users = left.group_by(USER).agg(pl.len().alias("n")).filter(pl.col("n") < need_user).get_column(USER)
        bad_items = left.group_by(ITEM).agg(pl.len().alias("n")).filter(pl.col("n") < need_item).get_column(ITEM)
        if bad_users.len() == 0 and bad_items.len() == 0:
            break
        left = left.filter(~pl.col(USER).is_in(bad_users) & ~pl.col(ITEM).is_in(bad_items))
    return left.get_column(USER).n_unique(), left.get_column(ITEM).n_unique(), item_counts.height


def _ids_recbole_reads_as_missing(frame: pl.DataFrame) -> CheckResult:
    """Ids such as "NA", "null" or "None" are NaN to RecBole (pandas' default NA strings).

    RecBole drops their rows; and when both users and items have some, RecBole 1.2.1's
    ``_filter_nan_user_or_item`` mixes index labels with positions and drops other rows (or
    fails), so that case blocks the run.
    """
    found: dict[str, pl.Series] = {}
    for column in (USER, ITEM):
        if column in frame.columns and frame.schema[column] == pl.String:
            values = frame.get_column(column)
            hits = values.filter(values.is_in(pl.Series(list(RECBOLE_NA_TOKENS), dtype=pl.String)))
            if hits.len():
                found[column] = hits
    rows = sum(h.len() for h in found.values())
    name = "no ids that RecBole reads as missing (NA, null, None, nan, ...)"
    if not found:
        return CheckResult(name=name, success=True, details="none")
    severity: Severity = "error" if len(found) == 2 else "warning"
    parts = [f"{h.len()} {c} values" for c, h in found.items()]
    details = f"{' and '.join(parts)} ({_pct(rows, frame.height)} of rows) are pandas NA strings: RecBole drops them"
    if severity == "error":
        details += "; with both users and items affected RecBole 1.2.1 drops the wrong rows — rename these ids"
    examples = [f"{c}={v!r}" for c, h in found.items() for v in h.unique(maintain_order=True).head(MAX_EXAMPLES)]
    return CheckResult(name=name, success=False, severity=severity, details=details, examples=examples[:MAX_EXAMPLES])


def _not_in_future(frame: pl.DataFrame, tolerance_hours: float) -> CheckResult:
    dtype = frame.schema[TIME]
    limit = datetime.now(UTC) + timedelta(hours=tolerance_hours)
    times = frame.get_column(TIME).drop_nulls()
    if isinstance(dtype, pl.Datetime) and dtype.time_zone is None:
        bound = pl.lit(limit.replace(tzinfo=None), dtype=pl.Datetime(dtype.time_unit))
    else:
        bound = pl.lit(limit).dt.convert_time_zone(str(getattr(dtype, "time_zone", "UTC")))
    late = times.to_frame().filter(pl.col(TIME) > bound).get_column(TIME)
    name = f"timestamps not in the future (> {tolerance_hours:g} h ahead fails)"
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


def _duplicates(frame: pl.DataFrame, max_fraction: float) -> CheckResult:
    """Exact repeats of (user, item, time): a few are noise (warning), many mean a broken export.

    Distinct row hashes prove there are no repeats without a hash table of the rows
    themselves; only when hashes repeat are the rows compared.
    """
    keyed = frame.select(USER, ITEM, TIME)
    if any(keyed.get_column(c).null_count() for c in keyed.columns):
        keyed = keyed.drop_nulls()
    rows = keyed.height
    dups = 0
    if rows and keyed.hash_rows(seed=0).n_unique() != rows:
        dups = rows - keyed.n_unique()
    share = dups / rows if rows else 0.0
    severity: Severity = "error" if share > max_fraction or dups == 0 else "warning"
    examples: list[str] = []
    if dups:
        examples = [
            " ".join(f"{c}={_fmt(v)}" for c, v in zip(keyed.columns, row))
            for row in keyed.filter(keyed.is_duplicated()).unique(maintain_order=True).head(MAX_EXAMPLES).iter_rows()
        ]
    return CheckResult(
        name=f"no duplicate ({USER}, {ITEM}, {TIME}) rows (> {100 * max_fraction:g}% fails)",
        success=dups == 0,
        severity=severity,
        details=f"{dups} of {rows} rows ({_pct(dups, rows)}) repeat an earlier row",
        examples=examples,
    )


def _row_drift(rows: int, previous: int, max_drop: float) -> CheckResult:
    """Far fewer rows than last time usually means a broken source or filter, not less activity."""
    name = f"row count vs the previous snapshot (> {100 * max_drop:g}% drop fails)"
    if previous <= 0:
        return CheckResult(name=name, success=True, details=f"{rows} rows; the previous snapshot had none")
    if rows < (1 - max_drop) * previous:
        return CheckResult(
            name=name,
            success=False,
            details=f"row count dropped {_pct(previous - rows, previous)} vs the previous snapshot "
            f"({previous} → {rows} rows)",
        )
    change = 100 * (rows - previous) / previous
    return CheckResult(name=name, success=True, details=f"{previous} → {rows} rows ({change:+.3g}%)")


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


_BOOL_TYPES = {"bool", "bool_", "boolean", "BooleanDtype"}


def _text_not_parsing(series: pl.Series, kind: str) -> pl.Series:
    """The non-null text values that do not read as ``kind`` ("boolean": true/false in any case)."""
    values = series.drop_nulls()
    if kind == "boolean":
        return values.filter(~values.str.strip_chars().str.to_lowercase().is_in(["true", "false"]))
    return values.filter(values.str.strip_chars().cast(pl.Float64, strict=False).is_null())


def _bad_count(bad_values: pl.Series, total: int) -> str:
    return f"{bad_values.len()} of {total} values ({_pct(bad_values.len(), total)})"


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
    "QUESTION_ATTEMPT_COLUMNS",
    "REPORT_FILE",
    "SUITE_FILES",
    "failure_message",
    "load_suite",
    "raise_for_failures",
    "report_markdown",
    "select_suite",
    "validate_snapshot",
]
