"""The Optuna study behind ``recflow tune``: where it is stored, how it samples and prunes, and
the optimisation loop that stops at ``--trials`` complete + pruned trials across every process.

Storage: SQLite in ``studies/<name>/study.db`` (embedded, nothing to start), or the URL in the
environment variable ``storage_env`` (PostgreSQL when workers on several hosts share a study).
Both go through Optuna's ``RDBStorage`` with heartbeats: a trial whose process died stops
beating, the next ``optimize`` in any process marks it FAIL, and its parameters are queued
once more, so the study goes on and nothing sampled is lost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from core.config import PipelineConfig
from core.errors import ConfigError, TrialFailedError, TuningError
from core.experiments.space import SearchSpace
from core.records import DatasetSplits, Snapshot

log = logging.getLogger("recflow.tuning")

STUDY_DB = "study.db"
DATA_DIR = "data"  # studies/<name>/data/: the snapshot, validation report and split every trial shares
SPLITS_FILE = "splits.json"
SNAPSHOT_FILE = "snapshot.json"  # the Snapshot record of the study's data (for model cards at --promote)
TRAINED_FILE = "trained.json"  # a trial's or seed run's TrainedModel record, beside its checkpoints
# Default seconds between a running trial's heartbeats, and the silence after which it counts
# as dead (StudySettings.heartbeat_seconds / grace_seconds).
HEARTBEAT_SECONDS = 60
GRACE_SECONDS = 180
# Opening the storage: tries while other workers create the same tables at the same moment.
SCHEMA_ATTEMPTS = 4
DEFAULT_TRIAL_MINUTES = 10.0
MIN_TRIAL_MINUTES = 0.25
# Minutes a run spends outside its training cap (data build, evaluation), for time budgets.
RUN_OVERHEAD_MINUTES = 0.5
# Trials failing one after another in this process: the search itself is broken; stop and say so.
MAX_FAILURES_IN_A_ROW = 3


class StudySettings(BaseModel):
    """How a study runs (CLI flags of ``recflow tune``); the config and the space are separate."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="study name: its folder under root and its name in the storage")
    root: Path = Field(default=Path("studies"), description="studies/<name>/ holds the data, trials and results")
    trials: int = Field(ge=1, description="total complete + pruned trials of the study, across processes")
    timeout_minutes: float | None = Field(default=None, gt=0, description="this process starts no trial after this")
    trial_minutes: float = Field(default=None, gt=0, validate_default=True,  # type: ignore[assignment]
                                 description="training.max_minutes of each trial; default: sized so the "
                                             "trials and seed repeats fit --timeout, else 10")
    pruner: Literal["median", "hyperband", "none"] = "median"
    # Median pruner: compare only once a few trials finished, and never in a trial's first epochs
    # (early valid scores are noisy and say little about where a curve ends).
    startup_trials: int = Field(default=4, ge=0, description="median: trials finished before any pruning")
    warmup_epochs: int = Field(default=5, ge=0, description="median: epochs of a trial never pruned")
    storage_env: str | None = Field(default=None, description="env var holding a database URL; None: SQLite")
    seed: int = Field(default=0, description="TPE sampler seed")
    keep_top: int = Field(default=3, ge=1, description="trial folders (checkpoints) kept: the best this many")
    seeds: int = Field(default=0, ge=0, description="re-run the preset and the best configuration with this many "
                                                    "seeds and compare mean +- std; 0: no repeats")
    pools: list[str] = Field(default_factory=list, description="Prefect work pools the trials run on (one flow "
                                                               "run per trial); empty: subflows in this process")
    promote: bool = Field(default=False, description="send the best model through the champion gate and registry")
    register_top: int = Field(default=0, ge=0, description="register the N best trials' models as variants")
    gpu_cost_per_hour: float | None = Field(default=None, ge=0, description="price of a GPU-hour (core-hour "
                                                                           "on CPU) for the cost column")
    # A worker's trial beats every heartbeat_seconds; silent for grace_seconds, it is dead (FAIL,
    # its parameters queued again). Short values suit a test; on shared hosts keep the grace long
    # enough to ride out a stalled disk or network.
    heartbeat_seconds: int = Field(default=HEARTBEAT_SECONDS, ge=1, description="seconds between a running "
                                                                              "trial's heartbeats")
    grace_seconds: int = Field(default=GRACE_SECONDS, ge=1, description="a trial silent this long is failed "
                                                                      "and its parameters queued again")

    @model_validator(mode="before")
    @classmethod
    def _trial_cap(cls, data: Any) -> Any:
        """No --trial-minutes: with --timeout, share it among every run the study will make (trials,
        seed repeats and one run of slack), less each run's overhead; without, 10 minutes."""
        if isinstance(data, dict) and data.get("trial_minutes") is None:
            timeout, seeds = data.get("timeout_minutes"), int(data.get("seeds") or 0)
            runs = int(data.get("trials") or 1) + (2 * (seeds - 1) + 1 if seeds else 0)
            data = data | {"trial_minutes": DEFAULT_TRIAL_MINUTES if timeout is None else
                           round(max(MIN_TRIAL_MINUTES, float(timeout) / runs - RUN_OVERHEAD_MINUTES), 2)}
        return data

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v):
            raise ValueError(f"study name {v!r}: use letters, digits, '.', '_' or '-' (it names a folder)")
        return v

    @field_validator("grace_seconds")
    @classmethod
    def _grace_above_heartbeat(cls, v: int, info: ValidationInfo) -> int:
        beat = info.data.get("heartbeat_seconds")
        if beat is not None and v <= beat:
            raise ValueError(f"{v} s must exceed the heartbeat interval ({beat} s), or live trials look dead")
        return v

    @property
    def dir(self) -> Path:
        return self.root / self.name

    def trial_dir(self, number: int) -> Path:
        return self.dir / "trials" / f"{number:04d}"

    @property
    def data_dir(self) -> Path:
        return self.dir / DATA_DIR


def stored_splits(settings: StudySettings) -> DatasetSplits | None:
    """The split this study's trials share, once built (a resumed study reads it again, so new
    rows in a live source do not change what the remaining trials are compared on)."""
    path = settings.data_dir / SPLITS_FILE
    if not path.is_file():
        return None
    splits = DatasetSplits.model_validate_json(path.read_text())
    return splits if splits.data_dir.is_dir() else None


def save_splits(splits: DatasetSplits, settings: StudySettings) -> Path:
    path = settings.data_dir / SPLITS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(splits.model_dump_json(indent=2))
    tmp.replace(path)  # a half-written file would look like a built study
    return path


def save_snapshot(snapshot: Snapshot, settings: StudySettings) -> Path:
    """The study's Snapshot record (source, rows, fingerprint): model cards of registered trials need it."""
    path = settings.data_dir / SNAPSHOT_FILE
    path.write_text(snapshot.model_dump_json(indent=2))
    return path


def stored_snapshot(settings: StudySettings) -> Snapshot:
    path = settings.data_dir / SNAPSHOT_FILE
    if not path.is_file():
        raise TuningError(f"study {settings.name!r} has no {SNAPSHOT_FILE} in {settings.data_dir} (made before "
                          f"--promote existed?): start a new --study to register its models")
    return Snapshot.model_validate_json(path.read_text())


def storage_url(settings: StudySettings) -> str:
    """The database URL: from ``storage_env`` when set, else SQLite in the study folder."""
    if settings.storage_env:
        url = os.environ.get(settings.storage_env, "").strip()
        if not url:
            raise ConfigError(f"--storage-env {settings.storage_env}: the environment variable is not set "
                              f"(export it with the study database URL, e.g. postgresql+psycopg://user@host/db)")
        return url
    settings.dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(settings.dir / STUDY_DB).resolve()}"


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def make_storage(settings: StudySettings) -> Any:
    """Optuna's RDBStorage with heartbeats; a bad URL or an unreachable database is one ConfigError."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    url = storage_url(settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=1)
    for attempt in range(1, SCHEMA_ATTEMPTS + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    url,
                    heartbeat_interval=settings.heartbeat_seconds,
                    grace_period=settings.grace_seconds,
                    heartbeat_stale_trial_callback=_StaleTrialCallback(retry),
                    engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None,
                )
        except Exception as exc:  # sqlalchemy: bad URL, missing driver, refused connection, bad credentials
            if attempt < SCHEMA_ATTEMPTS and _lost_schema_race(exc):
                time.sleep(0.5 * attempt)  # another worker is creating Optuna's tables: they exist next time
                continue
            where = f"${settings.storage_env}" if settings.storage_env else "the study database"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"cannot open {where} ({_redact(url)}): {first}") from None
    raise AssertionError("unreachable: the last attempt returns or raises")


def _lost_schema_race(exc: Exception) -> bool:
    """Workers started together on an empty database all create Optuna's tables; all but one
    hit a duplicate-table (or duplicate type) error, and simply open the storage again."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    text = str(exc).lower()
    return isinstance(exc, IntegrityError | ProgrammingError) and ("already exists" in text or "duplicate" in text)


class _StaleTrialCallback:
    """A dead worker's trial (no heartbeat for the grace period): already marked FAIL by Optuna;
    log it and queue its parameters once more, so the point is still evaluated."""

    def __init__(self, retry: Callable[[Any, Any], None]) -> None:
        self.retry = retry

    def __call__(self, study: Any, trial: Any) -> None:
        log.warning("trial %d stopped beating (its worker died?): marked FAIL; its parameters are queued again",
                    trial.number)
        self.retry(study, trial)


def make_pruner(settings: StudySettings) -> Any:
    import optuna

    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=settings.startup_trials,
                                           n_warmup_steps=settings.warmup_epochs)
    if settings.pruner == "hyperband":
        # Resources are epochs; "auto" reads the largest epoch count from the finished trials.
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto")
    return optuna.pruners.NopPruner()


def open_study(settings: StudySettings, *, direction: Literal["maximize", "minimize"] | None = None,
               fingerprint: dict[str, str] | None = None) -> Any:
    """Create the study, or load it to resume (any process). ``fingerprint`` (what the study
    searches: config and space hashes) is stored on creation and must match on resume."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(settings)
    from core.experiments.sampler import TrialSeededTPESampler

    # Seeded per trial number: workers sharing the study with one --seed draw different points.
    sampler = TrialSeededTPESampler(settings.seed)
    pruner = make_pruner(settings)
    if direction is None:
        try:
            return optuna.load_study(study_name=settings.name, storage=storage, sampler=sampler, pruner=pruner)
        except KeyError:
            raise TuningError(f"no study {settings.name!r} in the study storage") from None
    study = optuna.create_study(study_name=settings.name, storage=storage, sampler=sampler, pruner=pruner,
                                direction=direction, load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise ConfigError(f"study {settings.name!r} {study.direction.name.lower()}s its metric; this config would "
                          f"{direction} it: use another --study")
    for key, value in (fingerprint or {}).items():
        stored = study.user_attrs.get(key)
        if stored is None:
            study.set_user_attr(key, value)
        elif stored != value:
            what = key.removesuffix("_hash").replace("_", " ")
            raise ConfigError(f"study {settings.name!r} was started with another {what}: resume it with the same "
                              f"--config, --space and data flags, or start a new --study")
    return study


def study_direction(config: PipelineConfig) -> Literal["maximize", "minimize"]:
    return "minimize" if config.evaluation.task == "rating" else "maximize"  # RMSE/MAE: lower wins


def study_fingerprint(config: PipelineConfig, space: SearchSpace) -> dict[str, str]:
    """What a resumed study must search again: the same base config (bar speed-only knobs) and space."""
    dumped = config.model_dump(mode="json")
    for knob in ("device", "threads"):
        dumped["training"].pop(knob, None)
    return {"config_hash": fingerprint(dumped), "space_hash": fingerprint(space.model_dump(mode="json"))}


def fingerprint(obj: Any) -> str:
    """A short, stable hash of a JSON-able value (a config or space dump)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def counted_trials(study: Any) -> int:
    """Trials that count towards ``--trials``: complete and pruned ones (failed trials do not)."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


class _FailureGuard:
    """Stops this process's loop after ``limit`` failed trials in a row: every trial failing means
    a broken search (bad data, a model that cannot train), not bad luck."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_a_row, self.last_error = limit, 0, ""
        self.ran = 0  # trials this process ran to an end (enqueued ones included)

    def __call__(self, study: Any, trial: Any) -> None:
        from optuna.trial import TrialState

        self.ran += 1
        if trial.state == TrialState.FAIL:
            self.in_a_row += 1
            self.last_error = str(trial.user_attrs.get("error", ""))
            if self.in_a_row >= self.limit:
                study.stop()
        else:
            self.in_a_row = 0


def optimize(study: Any, objective: Callable[[Any], float], settings: StudySettings, n_jobs: int = 1) -> int:
    """Run trials until the study holds ``settings.trials`` complete + pruned trials (counted across
    every process sharing it), or ``timeout_minutes`` pass. Returns how many trials this call ran.
    Re-running a finished study starts nothing.

    Args:
        study: the Optuna study (``open_study``).
        objective: Optuna's objective (``make_objective``).
        settings: the study's settings.
        n_jobs: trials run at once, in threads (one per work pool slot when trials run on pools).

    Returns:
        How many trials this call ran to an end.
    """
    import threading

    guard = _FailureGuard(MAX_FAILURES_IN_A_ROW)
    if n_jobs > 1:
        # Optuna pops a queued trial (the preset, a dead worker's parameters) by reading WAITING
        # and then writing RUNNING; on SQLite two threads can both read WAITING and run the same
        # trial twice. One ``ask`` at a time in this process closes that gap.
        lock, ask = threading.Lock(), study.ask

        def one_ask_at_a_time(*args: Any, **kwargs: Any) -> Any:
            with lock:
                return ask(*args, **kwargs)

        study.ask = one_ask_at_a_time
    try:
        return _optimize_rounds(study, objective, settings, n_jobs, guard)
    finally:
        if n_jobs > 1:
            del study.ask  # the class's own again


def _optimize_rounds(study: Any, objective: Callable[[Any], float], settings: StudySettings, n_jobs: int,
                     guard: _FailureGuard) -> int:
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    deadline = time.monotonic() + settings.timeout_minutes * 60 if settings.timeout_minutes else None
    # Each round asks for only the trials still missing, so parallel threads do not start extra
    # ones past --trials; failed trials do not count, so a round short of the goal is followed by another.
    while (missing := settings.trials - counted_trials(study)) > 0:
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            break
        ran = guard.ran
        study.optimize(
            objective,
            n_trials=missing,
            timeout=timeout,
            n_jobs=n_jobs,
            callbacks=[MaxTrialsCallback(settings.trials, states=(TrialState.COMPLETE, TrialState.PRUNED)), guard],
            catch=(TrialFailedError,),
            gc_after_trial=True,
        )
        if guard.in_a_row >= guard.limit:
            raise TuningError(f"{guard.limit} trials failed in a row, stopping the study: {guard.last_error}")
        if guard.ran == ran:  # stopped before any trial ended (timeout, or another process finished the study)
            break
    return guard.ran
