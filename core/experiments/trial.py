"""One tuning trial: train the trial's configuration on the study's shared split, report every
epoch's valid score to Optuna's pruner, evaluate the best checkpoint, record what it cost.

``run_trial`` attaches to the trial through the study storage by number, so it runs the same in
the driver's process (a local subflow) or in another one (a worker sharing the database).
``make_objective`` is the driver's side: sample, build the trial config, hand it to a runner.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from core.config import PipelineConfig, dump_config
from core.errors import TrialFailedError
from core.experiments.space import SearchSpace, apply_overrides, sample
from core.experiments.study import TRAINED_FILE, StudySettings, make_pruner, make_storage
from core.records import DatasetSplits, EpochStats, TrainedModel
from core.release.artifacts import CONFIG_FILE


class TrialOutcome(BaseModel):
    """What the driver needs back from a trial (everything else is in the trial's user attrs)."""

    number: int
    value: float = Field(description="the study's objective: the valid metric of the best checkpoint")
    pruned: bool = False
    attrs: dict[str, Any] = Field(default_factory=dict)


# run_trial's signature; the Prefect flow passes one that runs it as a subflow.
TrialRunner = Callable[[PipelineConfig, DatasetSplits, StudySettings, int], TrialOutcome]


class PruningHook:
    """``on_epoch`` for ``train``: reports the epoch's valid score to the trial; returns True
    (stop training) when the pruner says this trial is worse than the others were by now."""

    def __init__(self, trial: Any) -> None:
        self.trial = trial
        self.pruned_at: int | None = None

    def __call__(self, stats: EpochStats) -> bool:
        if stats.valid_score is None or not math.isfinite(stats.valid_score):
            return False
        self.trial.report(float(stats.valid_score), stats.epoch)
        if self.trial.should_prune():
            self.pruned_at = stats.epoch
            return True
        return False


def trial_config(base: PipelineConfig, overrides: dict[str, Any], settings: StudySettings) -> PipelineConfig:
    """The base config with the trial's values, its time cap, and no W&B run (the study's
    leaderboard and plots are the record; TensorBoard and the training log stay)."""
    fixed = {"training.max_minutes": settings.trial_minutes, "tracking.wandb": False}
    return apply_overrides(base, overrides | fixed, origin=f"trial {overrides}")


def attach_trial(settings: StudySettings, number: int) -> Any:
    """The running trial ``number`` of the study, opened from its storage with the study's pruner."""
    import optuna

    storage = make_storage(settings)
    study = optuna.load_study(study_name=settings.name, storage=storage, pruner=make_pruner(settings))
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(settings.name), number)
    return optuna.trial.Trial(study, trial_id)


class ScoredRun(BaseModel):
    """A configuration trained and evaluated in one folder: a trial or a seed repeat."""

    valid: float | None
    test: float | None
    attrs: dict[str, Any] = Field(default_factory=dict, description="figures and cost, as the leaderboard shows them")
    trained: TrainedModel


def fit_and_score(config: PipelineConfig, splits: DatasetSplits, run_dir: Path,
                  on_epoch: Callable[[EpochStats], bool] | None = None) -> ScoredRun:
    """Train ``config`` on the study's split in ``run_dir``, evaluate its best checkpoint on valid
    and test, and record what it cost (``trained.json`` beside it, so it can be registered later)."""
    import torch

    from core.modeling.dataset import load_recbole_data
    from core.modeling.evaluation import ranking_metrics, rating_metrics
    from core.modeling.training import load_trained, train

    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(config, run_dir / CONFIG_FILE)
    start = time.perf_counter()
    # Every run builds its own RecBole data: model params (and max_seq_length) change the loaders.
    data = load_recbole_data(config, splits, run_dir / "checkpoints")
    trained = train(config, splits, run_dir, on_epoch=on_epoch, data=data)
    model = load_trained(data, trained.checkpoint)
    if config.evaluation.task == "rating":
        valid, test = rating_metrics(data, model)
    else:
        valid, test = ranking_metrics(data, model, trained.checkpoint)
    (run_dir / TRAINED_FILE).write_text(trained.model_dump_json(indent=2))
    hours = (time.perf_counter() - start) / 3600
    metric = config.evaluation.valid_metric.lower()
    on_gpu = not trained.device.startswith("cpu")
    threads = config.training.threads or torch.get_num_threads()
    attrs: dict[str, Any] = {
        f"valid_{metric}": valid.get(metric),
        f"test_{metric}": test.get(metric),
        "epochs": len(trained.epochs),
        "best_epoch": trained.best_epoch,
        "minutes": round(hours * 60, 3),
        "device": trained.device,
        # The cost of a run in the unit its hardware is billed in: GPU-hours, else core-hours.
        "gpu_hours": round(hours, 5) if on_gpu else None,
        "core_hours": None if on_gpu else round(hours * threads, 5),
        "stop_reason": trained.stop_reason,
        "seed": config.training.seed,
        "run_dir": str(run_dir),
    }
    return ScoredRun(valid=valid.get(metric), test=test.get(metric), attrs=attrs, trained=trained)


def run_trial(config: PipelineConfig, splits: DatasetSplits, settings: StudySettings, number: int) -> TrialOutcome:
    """Train and evaluate trial ``number`` in ``settings.trial_dir(number)``; its figures go to the
    trial's user attrs. A pruned trial still has its best checkpoint evaluated, so the leaderboard
    shows where it stood."""
    trial = attach_trial(settings, number)
    hook = PruningHook(trial)
    run = fit_and_score(config, splits, settings.trial_dir(number).resolve(), on_epoch=hook)
    attrs = run.attrs | ({"stop_reason": "pruned"} if hook.pruned_at is not None else {})
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    if run.valid is None:
        raise TrialFailedError(f"trial {number}: no valid {config.evaluation.valid_metric} after training")
    return TrialOutcome(number=number, value=float(run.valid), pruned=hook.pruned_at is not None, attrs=attrs)


def make_objective(
    base: PipelineConfig, space: SearchSpace, splits: DatasetSplits, settings: StudySettings,
    runner: TrialRunner = run_trial,
) -> Callable[[Any], float]:
    """Optuna's objective: sample the trial, run it through ``runner``, report pruned or its value.

    Any failure of the run (diverged, out of memory, a crashed subflow) becomes ``TrialFailedError``:
    the trial is FAIL and the study goes on (``study.optimize`` stops after several in a row).
    """
    import optuna

    def objective(trial: Any) -> float:
        config = trial_config(base, sample(trial, space), settings)
        try:
            outcome = runner(config, splits, settings, trial.number)
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}".strip()[:500]
            trial.set_user_attr("error", message)
            raise TrialFailedError(f"trial {trial.number} failed: {message}") from exc
        if outcome.pruned:
            raise optuna.TrialPruned(f"pruned at epoch {outcome.attrs.get('epochs')}")
        return outcome.value

    return objective
