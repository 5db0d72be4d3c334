"""The study's sampler: Optuna's TPE, with each trial's random draws seeded by the trial number.

A TPE sampler seeded once per process draws the same sequence in every process: two workers
sharing a study with the same ``--seed`` would sample the same points (the startup trials are
pure random draws) and train each one twice. Seeding every trial from (seed, trial number)
gives each trial its own draws, because trial numbers are unique across the study's storage,
while a study is still reproducible from its seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna
from optuna.samplers import BaseSampler, TPESampler
from optuna.trial import TrialState

# Spreads (seed, trial number) pairs apart before NumPy seeds from them (a prime, < 2**32).
_STRIDE = 1_000_003


def trial_seed(seed: int, number: int) -> int:
    """The seed of trial ``number`` of a study seeded with ``seed``.

    Args:
        seed: the study's ``--seed``.
        number: the trial's number in the study (unique across processes).

    Returns:
        A seed in NumPy's range ``[0, 2**32)``.
    """
    return (seed * _STRIDE + number) % 2**32


class TrialSeededTPESampler(BaseSampler):
    """TPE whose draws for a trial depend on the study's history and (seed, trial number) only.

    A fresh ``TPESampler`` is built per trial in ``before_trial`` (TPE keeps no state across
    trials that the history does not hold), and every sampling call goes to it.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._tpe = TPESampler(seed=seed)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._tpe = TPESampler(seed=trial_seed(self.seed, trial.number))
        self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                        search_space: dict[str, Any]) -> dict[str, Any]:
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, param_name: str,
                           param_distribution: Any) -> Any:
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._tpe.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._tpe.reseed_rng()
