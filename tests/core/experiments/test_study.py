"""A real study on SQLite: three tiny trials, the results on disk, a resume that repeats nothing."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tuning_testdata import run_core_study, study_settings, tiny_space, tiny_study_config

from core.config import PipelineConfig, load_config
from core.experiments.report import BEST_FILE, LEADERBOARD_FILE, PLOTS, StudyReport, report_study
from core.experiments.space import SearchSpace
from core.experiments.study import STUDY_DB, StudySettings, open_study

pytestmark = pytest.mark.slow  # trains tiny models

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Done:
    config: PipelineConfig
    space: SearchSpace
    settings: StudySettings
    study: Any
    started: int
    report: StudyReport


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory, tiny_csv: Path) -> Done:
    root = tmp_path_factory.mktemp("study")
    config, space = tiny_study_config(root, tiny_csv), tiny_space(root)
    settings = study_settings(root, keep_top=2)
    study, started = run_core_study(config, space, settings)
    return Done(config, space, settings, study, started, report_study(study, config, settings))


def test_three_trials_complete_with_their_figures(done: Done) -> None:
    assert done.started == 3
    assert (done.settings.dir / STUDY_DB).is_file()
    assert [t.state.name for t in done.study.get_trials()] == ["COMPLETE"] * 3
    rows = done.report.leaderboard
    assert [r["state"] for r in rows] == ["COMPLETE"] * 3 and done.report.counted == 3
    assert [r["valid_ndcg@10"] for r in rows] == sorted((r["valid_ndcg@10"] for r in rows), reverse=True)
    for row in rows:
        assert 0 < row["valid_ndcg@10"] <= 1 and 0 < row["test_ndcg@10"] <= 1
        assert row["epochs"] == 3 and row["minutes"] > 0 and row["core_hours"] > 0 and row["gpu_hours"] is None
        assert row["device"] == "cpu" and row["stop_reason"] == "epoch cap"
        assert {"training.learning_rate", "model.params.hidden_size"} <= set(row)
        # The study's value is the trial's evaluated valid metric.
        assert done.study.trials[row["trial"]].value == pytest.approx(row["valid_ndcg@10"])
    assert done.report.core_hours == pytest.approx(sum(r["core_hours"] for r in rows), abs=1e-3)


def test_the_leaderboard_csv_holds_every_trial(done: Done) -> None:
    path = done.settings.dir / LEADERBOARD_FILE
    assert done.report.leaderboard_csv == path
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["trial"]) for r in rows] == [r["trial"] for r in done.report.leaderboard]
    assert {"state", "valid_ndcg@10", "test_ndcg@10", "epochs", "minutes", "core_hours", "training.learning_rate",
            "model.params.hidden_size"} <= set(rows[0])


def test_plots_are_pngs(done: Done) -> None:
    assert sorted(p.name for p in done.report.plots) == sorted(PLOTS.values())
    assert done.report.skipped_plots == {}
    for png in done.report.plots:
        assert png.read_bytes()[:8] == PNG_MAGIC


def test_best_yaml_is_a_preset_recflow_run_accepts(done: Done) -> None:
    best = done.study.best_trial
    path = done.settings.dir / BEST_FILE
    assert done.report.best_yaml == path and done.report.best_trial == best.number
    config = load_config(path)  # what `recflow run --config studies/<name>/best.yaml` does
    assert config.training.learning_rate == best.params["training.learning_rate"]
    assert config.model.params["hidden_size"] == best.params["model.params.hidden_size"]
    # The base config's own settings, not the trial's cap or its W&B switch.
    assert config.training.max_minutes == done.config.training.max_minutes
    assert config.tracking.wandb == done.config.tracking.wandb
    assert config.model.params["n_layers"] == done.config.model.params["n_layers"]


def test_only_the_top_trials_keep_their_folders(done: Done) -> None:
    ranked = [r["trial"] for r in done.report.leaderboard]
    for number in ranked[:2]:
        assert (done.settings.trial_dir(number) / "checkpoints" / "best.pth").is_file()
        assert (done.settings.trial_dir(number) / "config.yaml").is_file()
    assert not done.settings.trial_dir(ranked[2]).exists()
    assert done.report.removed_dirs == [done.settings.trial_dir(ranked[2])]


def test_a_resumed_study_repeats_no_finished_trial(done: Done) -> None:
    # Runs last in this module: it adds a trial to the shared study.
    before = {t.number: (t.params, t.value) for t in done.study.get_trials()}
    study = open_study(done.settings)  # a fresh process would load it like this
    _, started = run_core_study(done.config, done.space, done.settings, study=study)
    assert started == 0  # 3 of 3 done: nothing to run
    more = done.settings.model_copy(update={"trials": 4})
    _, started = run_core_study(done.config, done.space, more, study=open_study(more))
    assert started == 1
    trials = open_study(more).get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert {t.number: (t.params, t.value) for t in trials[:3]} == before
    assert trials[3].state.name == "COMPLETE"
