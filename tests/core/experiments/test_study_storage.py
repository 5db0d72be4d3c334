"""The study storage's liveness settings (heartbeat, grace) and opening it while other workers
create Optuna's tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from cli import app
from core.experiments import study as study_mod
from core.experiments.study import GRACE_SECONDS, HEARTBEAT_SECONDS, StudySettings, make_storage


def test_defaults_and_chosen_values_reach_the_storage(tmp_path: Path) -> None:
    default = make_storage(StudySettings(name="s", root=tmp_path, trials=1))
    assert (default.heartbeat_interval, default.grace_period) == (HEARTBEAT_SECONDS, GRACE_SECONDS)
    quick = make_storage(StudySettings(name="q", root=tmp_path, trials=1, heartbeat_seconds=1, grace_seconds=2))
    assert (quick.heartbeat_interval, quick.grace_period) == (1, 2)


def test_a_grace_not_above_the_heartbeat_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"10 s must exceed the heartbeat interval \(10 s\)"):
        StudySettings(name="s", root=tmp_path, trials=1, heartbeat_seconds=10, grace_seconds=10)


def test_the_cli_names_the_flag(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["tune", "--space", "sasrec", "--study", "s", "--trials", "2", "--studies-dir",
                                      str(tmp_path), "--heartbeat-seconds", "5", "--grace-seconds", "3"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == ("error: --grace-seconds: 3 s must exceed the heartbeat interval (5 s), "
                                     "or live trials look dead"), result.output


def _duplicate_table() -> Exception:
    from sqlalchemy.exc import ProgrammingError

    return ProgrammingError("CREATE TABLE studies", {}, Exception('relation "studies" already exists'))


def test_losing_the_table_creation_race_opens_the_storage_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fault is faked (two workers creating the tables in the same instant); the storage is real."""
    from optuna.storages import RDBStorage

    calls: list[int] = []

    def racing(*args: Any, **kwargs: Any) -> RDBStorage:
        calls.append(1)
        if len(calls) == 1:
            raise _duplicate_table()
        return RDBStorage(*args, **kwargs)

    monkeypatch.setattr("optuna.storages.RDBStorage", racing)
    monkeypatch.setattr(study_mod.time, "sleep", lambda _s: None)
    storage = make_storage(StudySettings(name="s", root=tmp_path, trials=1))
    assert isinstance(storage, RDBStorage) and len(calls) == 2


def test_a_race_that_never_settles_is_one_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.errors import ConfigError

    def always(*_a: Any, **_k: Any) -> None:
        raise _duplicate_table()

    monkeypatch.setattr("optuna.storages.RDBStorage", always)
    monkeypatch.setattr(study_mod.time, "sleep", lambda _s: None)
    with pytest.raises(ConfigError, match="cannot open the study database .*already exists"):
        make_storage(StudySettings(name="s", root=tmp_path, trials=1))
