"""Two `recflow tune` workers share one PostgreSQL study; one is killed (SIGKILL) inside a trial.

The real user path: each worker is `python -m cli tune --storage-env ...` in its own folder and
Prefect home (two hosts sharing only the database); the database is the session's throwaway
PostgreSQL 15 cluster. The heartbeat is 1 s and the grace 2 s (`--heartbeat-seconds`,
`--grace-seconds`), so the survivor finds the dead worker's trial within a trial or two: the
study still ends with --trials complete trials, the killed trial is FAIL, its parameters ran
again to completion, and no parameter set completed twice. A re-run starts nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pg_cluster import PgCluster
from recflow_testdata import TINY_YAML, Interaction, write_csv
from tuning_testdata import TINY_SPACE

pytest_plugins = ["pg_fixtures"]
pytestmark = [pytest.mark.services, pytest.mark.slow,
              # RetryHeartbeatStaleTrialCallback.retried_trial_number: experimental in Optuna, what recflow uses
              pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]

REPO = Path(__file__).resolve().parents[3]
URL_ENV = "RECFLOW_TEST_STUDY_URL"
STUDY = "shared"
TRIALS = 4
# Bounds on waiting for the processes, so a hang fails the test instead of stalling CI.
WAIT_FOR_TRIAL_S = 240
WAIT_FOR_SURVIVOR_S = 400


@pytest.fixture()
def study_url(pg_cluster: PgCluster) -> Iterator[str]:
    """A fresh database owned by a password-authenticated role that may create Optuna's tables."""
    from psycopg import sql

    name = f"study_{uuid.uuid4().hex[:8]}"
    password = "tun3r:p@ss"
    pg_cluster.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name), sql.Literal(password)))
    pg_cluster.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(name)))
    # The cluster lets no other role in without a line in pg_hba.conf; this one gives its password.
    hba = pg_cluster.data / "pg_hba.conf"
    hba.write_text(f"host {name} {name} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    pg_cluster.execute("SELECT pg_reload_conf()")
    from urllib.parse import quote

    yield f"postgresql+psycopg://{name}:{quote(password, safe='')}@127.0.0.1:{pg_cluster.port}/{name}"
    pg_cluster.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _worker_dir(tmp_path: Path, name: str, rows: list[Interaction]) -> Path:
    """One worker's own folder (its host): data file, config, space and Prefect home."""
    home = tmp_path / name
    (home / "prefect-home").mkdir(parents=True)
    (home / "tiny.yaml").write_text(TINY_YAML)
    (home / "space.yaml").write_text(TINY_SPACE)
    write_csv(rows, home / "answers.csv", user_col="learner", item_col="question_id", time_col="created_at")
    return home


def _env(home: Path, url: str) -> dict[str, str]:
    return {**os.environ, URL_ENV: url, "RECFLOW_NO_REEXEC": "1", "PREFECT_HOME": str(home / "prefect-home"),
            "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


CMD = [sys.executable, "-m", "cli", "tune", "--config", "tiny.yaml", "--space", "space.yaml", "--study", STUDY,
       "--trials", str(TRIALS), "--pruner", "none", "--device", "cpu", "--epochs", "4", "--data", "answers.csv",
       "--user-col", "learner", "--item-col", "question_id", "--time-col", "created_at",
       "--storage-env", URL_ENV, "--heartbeat-seconds", "1", "--grace-seconds", "2"]


def _start(home: Path, url: str) -> subprocess.Popen[str]:
    # Its own session: the kill takes the worker and anything it started, as a host going down would.
    return subprocess.Popen(CMD, cwd=home, env=_env(home, url), stdout=(home / "out.log").open("w"),
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _load(url: str) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # No heartbeat and no table creation: the test only reads, so it neither fails a trial itself
    # nor takes part in the workers' race to create Optuna's tables.
    storage = optuna.storages.RDBStorage(url, skip_table_creation=True, skip_compatibility_check=True)
    return optuna.load_study(study_name=STUDY, storage=storage)


def _running_trial_of(url: str, home: Path) -> Any | None:
    """A RUNNING trial of the worker in ``home`` that has reported an epoch (so it is mid-training)."""
    from optuna.exceptions import StorageInternalError
    from optuna.trial import TrialState
    from sqlalchemy.exc import SQLAlchemyError

    if not (home / "studies" / STUDY / "trials").is_dir():
        return None  # no trial started there yet: leave the database to the workers
    try:
        study = _load(url)
    except (KeyError, SQLAlchemyError, StorageInternalError):
        return None  # the tables or the study do not exist yet
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owned = (home / "studies" / STUDY / "trials" / f"{trial.number:04d}").is_dir()
        if owned and trial.intermediate_values:
            return trial
    return None


def _log(home: Path) -> str:
    path = home / "out.log"
    return f"--- {home.name} ---\n{path.read_text()[-6000:] if path.is_file() else ''}"


def test_two_workers_one_killed_mid_trial(tmp_path: Path, tiny_rows: list[Interaction], study_url: str) -> None:
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    a_home, b_home = _worker_dir(tmp_path, "a", tiny_rows), _worker_dir(tmp_path, "b", tiny_rows)
    a, b = _start(a_home, study_url), _start(b_home, study_url)
    try:
        deadline = time.monotonic() + WAIT_FOR_TRIAL_S
        victim = None
        while victim is None and a.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            victim = _running_trial_of(study_url, a_home)
        assert victim is not None, f"worker a never got inside a trial\n{_log(a_home)}\n{_log(b_home)}"
        os.killpg(a.pid, signal.SIGKILL)
        a.wait(timeout=30)
        b.wait(timeout=WAIT_FOR_SURVIVOR_S)
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert a.returncode == -signal.SIGKILL
    assert b.returncode == 0, _log(b_home)

    study = _load(study_url)
    trials = study.get_trials(deepcopy=False)
    states = {t.number: t.state for t in trials}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    context = f"{states}\n{_log(b_home)}"
    # The killed trial: failed by the survivor, nothing else failed or left running/waiting.
    assert states[victim.number] == TrialState.FAIL, context
    assert [t.number for t in trials if t.state != TrialState.COMPLETE] == [victim.number], context
    assert len(complete) == TRIALS, context
    # Nothing lost: the killed trial's parameters were queued again and trained to the end.
    retries = [t for t in complete if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == victim.number]
    assert len(retries) == 1 and retries[0].params == victim.params, context
    assert retries[0].user_attrs["epochs"] >= 1 and retries[0].user_attrs["valid_ndcg@10"] is not None
    # No parameter set completed twice (two workers seeded alike must still draw different points).
    param_sets = [tuple(sorted(t.params.items())) for t in complete]
    assert len(set(param_sets)) == len(param_sets), context
    assert "stopped beating" in (b_home / "out.log").read_text(), _log(b_home)
    # The survivor's leaderboard lists the study's trials, the failed one included.
    assert f"study {STUDY}: {TRIALS} trials (complete + pruned), 1 failed" in (b_home / "out.log").read_text()

    # Re-running the command with the same --study starts nothing new.
    again = subprocess.run(CMD, cwd=b_home, env=_env(b_home, study_url), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(_load(study_url).get_trials(deepcopy=False)) == len(trials)
