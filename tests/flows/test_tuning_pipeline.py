"""The tuning flow on a real (temporary) Prefect server: data once, one subflow run per trial, the
leaderboard and plots as artifacts and files, a re-run that resumes without repeating a trial."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from tuning_testdata import study_settings, tiny_space, tiny_study_config

from core.config import PipelineConfig, load_config
from core.experiments.report import StudyReport
from core.experiments.space import SearchSpace
from core.experiments.study import SPLITS_FILE, StudySettings, open_study
from flows.tuning_pipeline import tuning_pipeline

pytestmark = pytest.mark.slow


@dataclass
class Tuned:
    config: PipelineConfig
    space: SearchSpace
    settings: StudySettings
    report: StudyReport


@pytest.fixture(scope="module")
def tuned(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory, tiny_csv: Path) -> Tuned:
    root = tmp_path_factory.mktemp("tune-flow")
    config, space, settings = tiny_study_config(root, tiny_csv), tiny_space(root), study_settings(root)
    return Tuned(config, space, settings, tuning_pipeline(config, space, settings))


def _client():  # type: ignore[no-untyped-def]
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def test_three_trials_complete_and_the_results_are_on_disk(tuned: Tuned) -> None:
    report, settings = tuned.report, tuned.settings
    assert report.counted == 3 and report.failed == 0
    assert [r["state"] for r in report.leaderboard] == ["COMPLETE"] * 3
    assert report.leaderboard_csv.is_file() and len(report.leaderboard_csv.read_text().splitlines()) == 4
    assert len(report.plots) == 3 and all(p.is_file() for p in report.plots)
    best = load_config(report.best_yaml)  # `recflow run --config studies/<name>/best.yaml`
    assert best.training.learning_rate == open_study(settings).best_trial.params["training.learning_rate"]
    # Extract, validate and split ran once, into the study folder.
    assert (settings.data_dir / "snapshot.parquet").is_file()
    assert (settings.data_dir / "validation_report.json").is_file()
    assert (settings.data_dir / SPLITS_FILE).is_file()


def test_each_trial_is_its_own_subflow_run(tuned: Tuned) -> None:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with _client() as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["tuning-trial"])))
    assert sorted(r.name for r in runs) == ["trial-0", "trial-1", "trial-2"]
    assert all(r.parent_task_run_id is not None and r.state.is_completed() for r in runs)


def test_the_leaderboard_and_plots_are_artifacts(tuned: Tuned) -> None:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with _client() as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["tuning-s-leaderboard", "tuning-s-plots"]))
        )
    by_key = {a.key: a for a in found}
    assert by_key["tuning-s-leaderboard"].type == "table"
    assert "trial" in str(by_key["tuning-s-leaderboard"].data)
    plots = str(by_key["tuning-s-plots"].data)
    assert plots.count("data:image/png;base64,") == 3 and "best.yaml" in plots


def test_a_rerun_resumes_without_repeating_trials(tuned: Tuned) -> None:
    before = {t.number: (t.params, t.value) for t in open_study(tuned.settings).trials}
    again = tuning_pipeline(tuned.config, tuned.space, tuned.settings)
    assert again.counted == 3
    assert {t.number: (t.params, t.value) for t in open_study(tuned.settings).trials} == before
