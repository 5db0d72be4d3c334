"""The study loop without training: real Optuna studies on SQLite, trials run by stand-in runners.

What is tested here is recflow's glue (counting, failures, the pruning hook, storage errors);
the runners only stand in for training. Training itself is in test_study.py and test_pruning.py.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from tuning_testdata import study_settings, tiny_space

from core.config import load_config
from core.errors import ConfigError, TuningError
from core.experiments.study import (
    StudySettings,
    counted_trials,
    make_storage,
    open_study,
    optimize,
    study_direction,
    study_fingerprint,
)
from core.experiments.trial import PruningHook, TrialOutcome, make_objective, trial_config
from core.records import DatasetSplits, EpochStats

SPLITS = DatasetSplits(data_dir=Path("unused"), dataset_name="interactions", users=1, items=1, interactions=1,
                       split="loo", fingerprint="x", eval_protocol="loo")


def _outcome(number: int, value: float = 0.1, pruned: bool = False) -> TrialOutcome:
    return TrialOutcome(number=number, value=value, pruned=pruned, attrs={"epochs": 1})


def test_a_failed_trial_is_fail_and_the_study_goes_on(tmp_path: Path) -> None:
    config, space, settings = load_config(), tiny_space(tmp_path), study_settings(tmp_path, trials=3)
    study = open_study(settings, direction="maximize")

    def runner(cfg, splits, st, number):  # type: ignore[no-untyped-def]
        if number == 1:
            raise RuntimeError("CUDA out of memory (stand-in)")
        return _outcome(number, value=0.1 * number)

    started = optimize(study, make_objective(config, space, SPLITS, settings, runner=runner), settings)
    assert started == 4  # the failed one does not count towards --trials
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert "RuntimeError: CUDA out of memory" in study.trials[1].user_attrs["error"]
    assert counted_trials(study) == 3


def test_trials_failing_in_a_row_stop_the_study_with_the_reason(tmp_path: Path) -> None:
    config, space, settings = load_config(), tiny_space(tmp_path), study_settings(tmp_path, trials=5)
    study = open_study(settings, direction="maximize")

    def runner(cfg, splits, st, number):  # type: ignore[no-untyped-def]
        raise ValueError("no such column")

    with pytest.raises(TuningError, match=r"3 trials failed in a row.*no such column"):
        optimize(study, make_objective(config, space, SPLITS, settings, runner=runner), settings)
    assert [t.state.name for t in study.trials] == ["FAIL"] * 3


def test_pruned_and_complete_trials_count_towards_trials(tmp_path: Path) -> None:
    config, space, settings = load_config(), tiny_space(tmp_path), study_settings(tmp_path, trials=4)
    study = open_study(settings, direction="maximize")
    runner = lambda cfg, splits, st, number: _outcome(number, pruned=number % 2 == 1)
    assert optimize(study, make_objective(config, space, SPLITS, settings, runner=runner), settings) == 4
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "COMPLETE", "PRUNED"]
    assert optimize(study, make_objective(config, space, SPLITS, settings, runner=runner), settings) == 0


def test_each_trial_gets_its_values_the_cap_and_no_wandb(tmp_path: Path) -> None:
    config, space = load_config(), tiny_space(tmp_path)
    settings = study_settings(tmp_path, trials=2, trial_minutes=2.5)
    seen = []

    def runner(cfg, splits, st, number):  # type: ignore[no-untyped-def]
        seen.append(cfg)
        return _outcome(number)

    study = open_study(settings, direction="maximize")
    optimize(study, make_objective(config, space, SPLITS, settings, runner=runner), settings)
    for cfg, trial in zip(seen, study.trials):
        assert cfg.training.learning_rate == trial.params["training.learning_rate"]
        assert cfg.model.params["hidden_size"] == trial.params["model.params.hidden_size"]
        assert cfg.training.max_minutes == 2.5 and cfg.tracking.wandb is False
    assert trial_config(config, {}, settings).training.epochs == config.training.epochs


def test_the_pruning_hook_stops_a_trial_behind_the_median() -> None:
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    good = study.ask()
    hook = PruningHook(good)
    assert [hook(EpochStats(epoch=e, train_loss=1.0, train_seconds=1.0, valid_score=s))
            for e, s in enumerate([0.2, 0.3, 0.4])] == [False, False, False]
    study.tell(good, 0.4)
    bad = study.ask()
    hook = PruningHook(bad)
    assert hook(EpochStats(epoch=0, train_loss=1.0, train_seconds=1.0, valid_score=0.25)) is False  # ahead at epoch 0
    assert hook(EpochStats(epoch=1, train_loss=1.0, train_seconds=1.0, valid_score=0.05)) is True  # far behind
    assert hook.pruned_at == 1
    assert study.trials[1].intermediate_values == {0: 0.25, 1: 0.05}
    # An epoch without a valid score (NaN) is not reported and stops nothing.
    assert PruningHook(study.ask())(EpochStats(epoch=0, train_loss=1.0, train_seconds=1.0,
                                              valid_score=float("nan"))) is False


def test_a_study_resumed_with_another_space_or_config_is_refused(tmp_path: Path) -> None:
    config, space, settings = load_config(), tiny_space(tmp_path), study_settings(tmp_path)
    open_study(settings, direction="maximize", fingerprint=study_fingerprint(config, space))
    open_study(settings, direction="maximize", fingerprint=study_fingerprint(config, space))  # same: resumes
    other_space = tiny_space(tmp_path, "params:\n  training.learning_rate: {type: float, low: 0.001, high: 0.1}\n")
    with pytest.raises(ConfigError, match=r"study 's' was started with another space"):
        open_study(settings, direction="maximize", fingerprint=study_fingerprint(config, other_space))
    other = load_config(overrides={"training.epochs": 7})
    with pytest.raises(ConfigError, match=r"another config"):
        open_study(settings, direction="maximize", fingerprint=study_fingerprint(other, space))
    with pytest.raises(ConfigError, match=r"maximizes its metric"):
        open_study(settings, direction="minimize")
    assert study_direction(load_config("ml-100k-fm")) == "minimize"


def test_storage_from_an_env_var_and_its_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = StudySettings(name="shared", root=tmp_path / "studies", trials=1, storage_env="RECFLOW_TEST_STUDY_DB")
    monkeypatch.delenv("RECFLOW_TEST_STUDY_DB", raising=False)
    with pytest.raises(ConfigError, match=r"--storage-env RECFLOW_TEST_STUDY_DB: the environment variable is not set"):
        make_storage(settings)
    monkeypatch.setenv("RECFLOW_TEST_STUDY_DB", "nosuchdb://user:secret@host/db")
    with pytest.raises(ConfigError, match=r"cannot open \$RECFLOW_TEST_STUDY_DB") as info:
        make_storage(settings)
    assert "secret" not in str(info.value)
    monkeypatch.setenv("RECFLOW_TEST_STUDY_DB", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    open_study(settings, direction="maximize")
    assert (tmp_path / "elsewhere.db").is_file() and not (settings.dir / "study.db").exists()
    storage = make_storage(settings)
    assert storage.heartbeat_interval == 60 and storage.grace_period == 180


@pytest.mark.parametrize("name", ["a/b", "../up", "", "x" * 101])
def test_a_study_name_must_be_a_folder_name(name: str) -> None:
    with pytest.raises(ValueError, match="study name"):
        StudySettings(name=name, trials=1)
