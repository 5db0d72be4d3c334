"""Pruning with real training and Optuna's real median pruner: a clearly worse trial stops early."""

from __future__ import annotations

from pathlib import Path

import pytest
from recflow_testdata import tiny_config
from tuning_testdata import run_core_study, study_settings, tiny_space, tiny_study_config

from core.experiments.study import open_study, study_direction
from core.modeling.dataset import build_recbole_data
from core.modeling.training import LATEST_CHECKPOINT, train

pytestmark = pytest.mark.slow  # trains tiny models

EPOCHS = 6
LR_ONLY = "params:\n  training.learning_rate: {type: float, low: 1.0e-7, high: 1.0e-2, log: true}\n"


def test_a_clearly_worse_trial_is_pruned_and_stops_training(tmp_path: Path, tiny_csv: Path) -> None:
    config = tiny_study_config(tmp_path, tiny_csv, {"training.epochs": EPOCHS})
    space = tiny_space(tmp_path, LR_ONLY)
    # Prune from the second trial on, from the first epoch: the tiny model learns in two epochs.
    settings = study_settings(tmp_path, trials=2, pruner="median", startup_trials=1, warmup_epochs=0)
    study = open_study(settings, direction=study_direction(config))
    study.enqueue_trial({"training.learning_rate": 1e-2})  # learns
    study.enqueue_trial({"training.learning_rate": 1e-7})  # cannot move its weights in six epochs
    _, started = run_core_study(config, space, settings, study=study)
    assert started == 2
    good, bad = study.trials
    assert good.state.name == "COMPLETE" and good.user_attrs["epochs"] == EPOCHS
    assert bad.state.name == "PRUNED"
    assert bad.user_attrs["stop_reason"] == "pruned"
    assert bad.user_attrs["epochs"] < EPOCHS  # training stopped, not just the trial's label
    assert len(bad.intermediate_values) == bad.user_attrs["epochs"]
    last = max(bad.intermediate_values)
    assert bad.intermediate_values[last] < good.intermediate_values[last]
    # The pruned trial's best checkpoint was still evaluated, for the leaderboard.
    assert 0 <= bad.user_attrs["test_ndcg@10"] < good.user_attrs["test_ndcg@10"]


def test_on_epoch_returning_true_ends_training_cleanly(tmp_path: Path, tiny_csv: Path) -> None:
    from core.data.extract import extract

    config = tiny_config(tmp_path, tiny_csv, {"training.epochs": 5})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    splits, data = build_recbole_data(extract(config, run_dir), config, run_dir)
    seen: list[int] = []
    trained = train(config, splits, run_dir, on_epoch=lambda s: seen.append(s.epoch) or s.epoch == 1, data=data)
    assert seen == [0, 1] and len(trained.epochs) == 2
    assert trained.stop_reason == "stopped by caller"
    assert trained.checkpoint.is_file() and not (run_dir / "checkpoints" / LATEST_CHECKPOINT).exists()
