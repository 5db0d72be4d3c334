"""Seed repeats on tiny inputs: the preset's values in a space, the 2x pooled-std rule, the time reserve."""

from __future__ import annotations

from pathlib import Path

import pytest
from tuning_testdata import study_settings, tiny_space

from core.config import load_config
from core.errors import ConfigError
from core.experiments.seeds import (
    SeedSummary,
    compare,
    preset_values,
    reserve_minutes,
    search_settings,
    seed_list,
)


def _summary(label: str, test: list[float], params: dict | None = None) -> SeedSummary:
    import statistics

    return SeedSummary(label=label, params=params or {"lr": label}, seeds=list(range(len(test))), test=test,
                       valid=test, mean=statistics.fmean(test),
                       std=statistics.stdev(test) if len(test) > 1 else None, run_dirs=[Path(".")] * len(test))


def test_seed_list_starts_at_the_config_seed() -> None:
    assert seed_list(2020, 3) == [2020, 2021, 2022]


def test_a_gap_beyond_twice_the_pooled_std_is_better() -> None:
    result = compare(_summary("preset", [0.070, 0.072, 0.071]), _summary("best", [0.080, 0.081, 0.079]), "NDCG@10")
    assert result.better and result.gap == pytest.approx(0.009)
    assert result.pooled_std == pytest.approx(0.001)
    assert result.verdict.startswith("better")


def test_a_gap_within_the_noise_is_not() -> None:
    result = compare(_summary("preset", [0.070, 0.078, 0.074]), _summary("best", [0.076, 0.080, 0.072]), "NDCG@10")
    assert not result.better and "within seed noise" in result.verdict


def test_lower_is_better_for_rating_errors() -> None:
    result = compare(_summary("preset", [0.95, 0.96, 0.94]), _summary("best", [0.90, 0.91, 0.89]), "RMSE",
                     maximize=False)
    assert result.better and result.gap == pytest.approx(0.05)


def test_one_seed_has_no_noise_estimate() -> None:
    result = compare(_summary("preset", [0.07]), _summary("best", [0.09]), "NDCG@10")
    assert not result.better and result.pooled_std is None and "one seed" in result.verdict


def test_the_same_configuration_is_called_the_preset() -> None:
    same = {"lr": 0.001}
    result = compare(_summary("preset", [0.07, 0.08], same), _summary("best", [0.07, 0.08], same), "NDCG@10")
    assert result.verdict == "the best configuration is the preset itself"


def test_preset_values_read_config_and_recbole_defaults(tmp_path: Path) -> None:
    config = load_config("ml-100k-sasrec")
    space = tiny_space(tmp_path, """\
params:
  training.learning_rate: {type: float, low: 3.0e-4, high: 3.0e-3, log: true}
  model.params.hidden_size: {type: categorical, choices: [32, 64, 128]}
  model.params.n_layers: {type: int, low: 1, high: 3}
""")
    # hidden_size and n_layers are not in the preset: RecBole's SASRec defaults (64, 2).
    assert preset_values(config, space) == {"training.learning_rate": 0.001, "model.params.hidden_size": 64,
                                            "model.params.n_layers": 2}


def test_a_preset_outside_the_space_is_not_a_trial(tmp_path: Path) -> None:
    space = tiny_space(tmp_path, "params:\n  training.learning_rate: {type: float, low: 0.01, high: 0.1}\n")
    assert preset_values(load_config("ml-100k-sasrec"), space) is None


def test_the_timeout_keeps_room_for_the_repeats(tmp_path: Path) -> None:
    settings = study_settings(tmp_path, seeds=3, timeout_minutes=30, trial_minutes=1.5)
    assert reserve_minutes(settings) == pytest.approx(5 * 2.0)  # 4 repeats + the last trial, each 1.5 + 0.5
    assert search_settings(settings).timeout_minutes == pytest.approx(20)
    assert search_settings(settings.model_copy(update={"seeds": 0})).timeout_minutes == 30


def test_a_timeout_too_short_for_the_repeats_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--timeout 5 leaves no time to search"):
        search_settings(study_settings(tmp_path, seeds=3, timeout_minutes=5, trial_minutes=2))


def test_the_shipped_sasrec_space_holds_the_preset() -> None:
    from core.experiments.space import load_space

    # window_stride is unset in the preset: it counts as what training uses (max_seq_length // 2).
    assert preset_values(load_config("ml-100k-sasrec"), load_space("sasrec")) == {
        "training.learning_rate": 0.001, "model.params.hidden_size": 64, "model.params.n_layers": 2,
        "model.params.hidden_dropout_prob": 0.5, "model.params.attn_dropout_prob": 0.5, "training.window_stride": 25}
