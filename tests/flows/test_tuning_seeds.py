"""`recflow tune --seeds K --promote --register-top N` through the real flow: the preset is trial 0,
the preset and the best configuration are repeated over the same K seeds (a trial stands in for
the config's own seed), the top trials are registered without touching the champion, and the
best model goes through the champion gate. A re-run repeats nothing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from tuning_testdata import study_settings, tiny_space, tiny_study_config

from core.config import PipelineConfig
from core.experiments.report import StudyReport
from core.experiments.seeds import PRESET_ATTR, RESULT_FILE, SEEDS_DIR
from core.experiments.study import StudySettings, open_study
from core.release.registry import Registry
from flows.tuning_pipeline import tuning_pipeline

pytestmark = pytest.mark.slow


@dataclass
class Seeded:
    config: PipelineConfig
    settings: StudySettings
    report: StudyReport


@pytest.fixture(scope="module")
def seeded(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory, tiny_csv: Path) -> Seeded:
    root = tmp_path_factory.mktemp("tune-seeds")
    config, space = tiny_study_config(root, tiny_csv), tiny_space(root)
    settings = study_settings(root, name="seeded", seeds=2, promote=True, register_top=2, gpu_cost_per_hour=2.0)
    return Seeded(config, settings, tuning_pipeline(config, space, settings))


def test_the_preset_is_trial_zero(seeded: Seeded) -> None:
    first = open_study(seeded.settings).trials[0]
    assert first.user_attrs.get(PRESET_ATTR) is True
    assert first.params == {"training.learning_rate": seeded.config.training.learning_rate,
                            "model.params.hidden_size": seeded.config.model.params["hidden_size"]}


def test_preset_and_best_ran_over_the_same_seeds(seeded: Seeded) -> None:
    comparison = seeded.report.seeds
    assert comparison is not None
    base = seeded.config.training.seed
    assert comparison.preset.seeds == comparison.best.seeds == [base, base + 1]
    assert len(comparison.preset.test) == len(comparison.best.test) == 2
    # The config's own seed is the trial's run, not a new one.
    study = open_study(seeded.settings)
    assert comparison.preset.test[0] == study.trials[0].user_attrs["test_ndcg@10"]
    assert comparison.best.test[0] == study.best_trial.user_attrs["test_ndcg@10"]
    assert comparison.pooled_std is not None and comparison.verdict
    assert (seeded.settings.dir / SEEDS_DIR / "comparison.json").is_file()


def test_register_top_and_promote_go_through_the_registry(seeded: Seeded) -> None:
    registry = Registry(seeded.config.registry.path)
    entry = registry.entry(seeded.config.registry_name)
    versions = sorted(p.name for p in entry.iterdir() if p.is_dir() and p.name.startswith("v"))
    # Two top trials, plus the promotion candidate unless it was one of them.
    assert 2 <= len(versions) <= 3
    assert len(seeded.report.registered) == len(versions)
    champions = [r for r in seeded.report.registered if r.endswith("(champion)")]
    card = registry.champion_card(seeded.config.registry_name)
    # The gate decided: at most the one promotion candidate became champion, and the card says it passed.
    assert len(champions) <= 1
    if champions:
        assert card is not None and champions[0].split("/")[1].startswith(card["version"])


def test_cost_column_and_total(seeded: Seeded) -> None:
    rows = seeded.report.leaderboard
    assert all(r["cost"] == pytest.approx(2.0 * r["core_hours"], abs=1e-3) for r in rows if r["core_hours"])
    assert seeded.report.cost == pytest.approx(2.0 * seeded.report.core_hours, abs=1e-3)


def test_a_rerun_repeats_no_seed_run(seeded: Seeded, tmp_path: Path) -> None:
    results = sorted((seeded.settings.dir / SEEDS_DIR).glob(f"*/{RESULT_FILE}"))
    assert results, "the repeats beyond the config's own seed were trained"
    stamps = {p: p.stat().st_mtime_ns for p in results}
    again = tuning_pipeline(seeded.config, tiny_space(tmp_path), seeded.settings.model_copy(update={
        "promote": False, "register_top": 0}))
    assert {p: p.stat().st_mtime_ns for p in results} == stamps
    assert again.seeds is not None and again.seeds.best.test == seeded.report.seeds.best.test
    assert json.loads((seeded.settings.dir / SEEDS_DIR / "comparison.json").read_text())["verdict"]


def test_the_seed_ensemble_is_built_and_registers_like_any_model(seeded: Seeded) -> None:
    from core.experiments.promotion import ReleaseCandidate
    from core.experiments.study import stored_snapshot, stored_splits
    from core.release.artifacts import CARD_FILE, MODEL_FILE
    from flows.release_pipeline import release_model

    assert seeded.report.ensemble is not None and seeded.report.ensemble.startswith("ensemble of 2 seed models")
    folder = seeded.settings.dir / SEEDS_DIR / "ensemble"
    candidate = ReleaseCandidate(label="ensemble", run_dir=folder, valid=0.0)
    trained = candidate.trained()
    assert trained.checkpoint.is_file()
    promotion = release_model(candidate.config(), stored_snapshot(seeded.settings), stored_splits(seeded.settings),
                              trained, folder, "ensemble", allow_promote=False)
    assert not promotion.promoted
    assert (promotion.version_dir / MODEL_FILE).is_file()  # one ONNX graph holding both members
    card = json.loads((promotion.version_dir / CARD_FILE).read_text())
    assert card["export"]["exported"] is True
