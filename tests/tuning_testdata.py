"""Tuning test helpers: a tiny search space and a study run through core (no Prefect), as the flow runs it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recflow_testdata import tiny_config

from core.config import PipelineConfig
from core.experiments.space import SearchSpace, load_space
from core.experiments.study import (
    StudySettings,
    open_study,
    optimize,
    save_splits,
    stored_splits,
    study_direction,
    study_fingerprint,
)
from core.experiments.trial import TrialRunner, make_objective, run_trial

# Two knobs the tiny SASRec (n_heads 1) takes any value of.
TINY_SPACE = """\
params:
  training.learning_rate: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
  model.params.hidden_size: {type: categorical, choices: [8, 16]}
"""


def tiny_space(tmp: Path, body: str = TINY_SPACE) -> SearchSpace:
    path = tmp / "space.yaml"
    path.write_text(body)
    return load_space(path)


def tiny_study_config(tmp: Path, data: Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    return tiny_config(tmp, data, {"training.epochs": 3} | (overrides or {}))


def study_settings(tmp: Path, **kw: Any) -> StudySettings:
    # No pruning unless a test asks: three tiny trials must all complete.
    return StudySettings(**{"name": "s", "root": tmp / "studies", "trials": 3, "pruner": "none"} | kw)


def run_core_study(
    config: PipelineConfig, space: SearchSpace, settings: StudySettings, runner: TrialRunner = run_trial,
    study: Any = None,
) -> tuple[Any, int]:
    """Data once (extract, split), then trials until the study holds ``settings.trials``; returns (study, started)."""
    from core.data.extract import extract
    from core.modeling.dataset import build_dataset

    study = study or open_study(settings, direction=study_direction(config), fingerprint=study_fingerprint(config, space))
    splits = stored_splits(settings)
    if splits is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        splits = build_dataset(extract(config, settings.data_dir), config, settings.data_dir.resolve())
        save_splits(splits, settings)
    return study, optimize(study, make_objective(config, space, splits, settings, runner=runner), settings)
