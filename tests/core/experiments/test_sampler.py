"""The study sampler: workers sharing a study with one seed draw different points, and a study is
reproducible from its seed."""

from __future__ import annotations

import optuna
import pytest

from core.experiments.sampler import TrialSeededTPESampler, trial_seed

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _objective(trial: optuna.Trial) -> float:
    lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    width = trial.suggest_categorical("width", [16, 32, 64, 128])
    return -abs(lr - 0.01) - abs(width - 64) / 1000


def _two_workers(seed: int, trials: int) -> list[tuple[float, int]]:
    """Two samplers with the same seed taking turns on one study, as two processes would."""
    storage = optuna.storages.InMemoryStorage()
    a = optuna.create_study(study_name="s", storage=storage, sampler=TrialSeededTPESampler(seed), direction="maximize")
    b = optuna.load_study(study_name="s", storage=storage, sampler=TrialSeededTPESampler(seed))
    for i in range(trials):
        (a, b)[i % 2].optimize(_objective, n_trials=1)
    return [(t.params["lr"], t.params["width"]) for t in a.trials]


def test_workers_with_one_seed_draw_different_points() -> None:
    points = _two_workers(seed=0, trials=14)  # 10 random startup trials, then TPE
    lrs = [lr for lr, _ in points]
    assert len(set(lrs)) == len(lrs), points


def test_plain_tpe_shows_why_it_is_needed() -> None:
    storage = optuna.storages.InMemoryStorage()
    a = optuna.create_study(study_name="s", storage=storage, sampler=optuna.samplers.TPESampler(seed=0))
    b = optuna.load_study(study_name="s", storage=storage, sampler=optuna.samplers.TPESampler(seed=0))
    a.optimize(_objective, n_trials=1)
    b.optimize(_objective, n_trials=1)
    assert a.trials[0].params == a.trials[1].params


def test_a_study_is_reproducible_from_its_seed() -> None:
    assert _two_workers(seed=3, trials=12) == _two_workers(seed=3, trials=12)
    assert _two_workers(seed=3, trials=4) != _two_workers(seed=4, trials=4)


@pytest.mark.parametrize(("seed", "number"), [(0, 0), (2**31, 5), (-1, 7)])
def test_trial_seeds_are_in_numpy_range(seed: int, number: int) -> None:
    assert 0 <= trial_seed(seed, number) < 2**32
