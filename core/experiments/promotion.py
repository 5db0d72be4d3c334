"""Which of a study's models go to the registry: ``--register-top N`` (variants for A/B tests,
never promoted by the search) and ``--promote`` (the study's best model, through the champion gate).

The best model is chosen on valid, never on test: the best trial, the best configuration's seed
repeats (trained under the same cap), or their ensemble when it beats its best member.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from core.config import PipelineConfig, load_config
from core.experiments.study import TRAINED_FILE, StudySettings
from core.records import TrainedModel
from core.release.artifacts import CONFIG_FILE


class ReleaseCandidate(BaseModel):
    """A trained model folder to evaluate, export and register; ``promote``: the gate may promote it."""

    label: str = Field(description="e.g. 'trial-7', 'best-seed2021', 'ensemble'")
    run_dir: Path
    valid: float
    promote: bool = False

    def trained(self) -> TrainedModel:
        return TrainedModel.model_validate_json((self.run_dir / TRAINED_FILE).read_text())

    def config(self) -> PipelineConfig:
        return load_config(self.run_dir / CONFIG_FILE)


def _registrable(run_dir: Path) -> bool:
    return (run_dir / TRAINED_FILE).is_file() and (run_dir / CONFIG_FILE).is_file()


def top_trials(study: Any, settings: StudySettings, n: int) -> list[ReleaseCandidate]:
    """The ``n`` best complete trials whose folders are still on disk, best first."""
    from optuna.trial import TrialState

    maximize = study.direction.name == "MAXIMIZE"
    done = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.value,
                  reverse=maximize)
    out = [ReleaseCandidate(label=f"trial-{t.number}", run_dir=settings.trial_dir(t.number).resolve(),
                            valid=float(t.value)) for t in done]
    return [c for c in out if _registrable(c.run_dir)][:n]


def choose(study: Any, settings: StudySettings, extra: list[ReleaseCandidate]) -> list[ReleaseCandidate]:
    """The models to register: the top trials (``register_top``) and, with ``promote``, the best on
    valid among the best trial and ``extra`` (seed repeats, ensemble), marked ``promote``. A model
    in both lists is registered once."""
    maximize = study.direction.name == "MAXIMIZE"
    chosen = top_trials(study, settings, settings.register_top)
    if settings.promote:
        pool = top_trials(study, settings, 1) + [c for c in extra if _registrable(c.run_dir)]
        if pool:
            best = max(pool, key=lambda c: c.valid if maximize else -c.valid)
            chosen = [c for c in chosen if c.run_dir != best.run_dir] + [best.model_copy(update={"promote": True})]
    return chosen
