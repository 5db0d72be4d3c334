"""Seed repeats: the preset and the study's best configuration trained with the same K seeds, so a
gain smaller than the seed noise is called that.

The preset enters the study as its first trial (when its values lie in the space), and the best
configuration was a trial too: both already hold a result for the config's own seed, so K seeds
cost 2(K-1) more runs. Every repeat trains under the trial cap, like the trials it is compared
with. Results are stored per run (``seeds/<label>-seed<N>/``), so a resumed study repeats nothing.

"Better" follows the issue's rule: the gap of the means exceeds twice the pooled standard deviation.
"""

from __future__ import annotations

import math
import shutil
import statistics
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from core.config import PipelineConfig, effective_value
from core.errors import ConfigError
from core.experiments.space import CategoricalParam, FloatParam, SearchSpace, recbole_defaults
from core.experiments.study import RUN_OVERHEAD_MINUTES, TRAINED_FILE, StudySettings
from core.experiments.trial import ScoredRun, fit_and_score, trial_config
from core.records import DatasetSplits

SEEDS_DIR = "seeds"
RESULT_FILE = "result.json"
PRESET_ATTR = "preset"  # user attr of the trial that ran the preset's own values
Label = Literal["preset", "best"]


class SeedJob(BaseModel):
    """One seed repeat to run (or read back): which configuration, which seed, where."""

    label: Label
    seed: int
    params: dict[str, Any] = Field(description="the space's values of this configuration")
    run_dir: Path
    reuse_trial: int | None = Field(default=None, description="a trial that already ran this configuration and seed")
    reused: ScoredRun | None = None


class SeedSummary(BaseModel):
    label: Label
    params: dict[str, Any]
    seeds: list[int]
    test: list[float]
    valid: list[float]
    mean: float
    std: float | None = Field(description="sample std over seeds; None with one seed")
    run_dirs: list[Path]


class SeedComparison(BaseModel):
    """Preset vs best over the same seeds, on the test metric; the verdict in words."""

    metric: str
    preset: SeedSummary
    best: SeedSummary
    gap: float = Field(description="best mean - preset mean, signed so that > 0 means the best is better")
    pooled_std: float | None
    better: bool = Field(description="the gap exceeds 2x the pooled std")
    verdict: str


def reserve_minutes(settings: StudySettings) -> float:
    """Time the seed repeats need after the search, at worst: 2(K-1) runs plus the search's last
    trial, each at the trial cap plus overhead. 0 without ``--seeds``."""
    if settings.seeds < 1:
        return 0.0
    return (2 * (settings.seeds - 1) + 1) * (settings.trial_minutes + RUN_OVERHEAD_MINUTES)


def search_settings(settings: StudySettings) -> StudySettings:
    """The settings the search runs under: with ``--seeds`` and ``--timeout``, the timeout covers
    the whole command, so the search stops starting trials early enough for the repeats."""
    if settings.timeout_minutes is None or settings.seeds < 1:
        return settings
    left = settings.timeout_minutes - reserve_minutes(settings)
    if left <= 0:
        raise ConfigError(f"--timeout {settings.timeout_minutes:g} leaves no time to search: --seeds "
                          f"{settings.seeds} at --trial-minutes {settings.trial_minutes:g} need up to "
                          f"{reserve_minutes(settings):.1f} minutes after it (raise --timeout, or lower "
                          f"--trial-minutes or --seeds)")
    return settings.model_copy(update={"timeout_minutes": left})


def seed_list(base_seed: int, k: int) -> list[int]:
    """K seeds starting at the config's own, so the trials' runs count as the first repeat."""
    return [base_seed + i for i in range(k)]


def preset_values(base: PipelineConfig, space: SearchSpace) -> dict[str, Any] | None:
    """The preset's own value of every key in ``space`` (RecBole's default where the preset sets
    none), or None when one lies outside the space (then the preset is not a trial)."""
    defaults = recbole_defaults(base.model.name)
    out: dict[str, Any] = {}
    for path, param in space.params.items():
        node = effective_value(base, path)
        if node is None and path.startswith("model.params."):
            node = defaults.get(path.removeprefix("model.params."))
        if not _in_domain(param, node):
            return None
        out[path] = node
    return out


def _in_domain(param: Any, value: Any) -> bool:
    if isinstance(param, CategoricalParam):
        return value in param.choices
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(param, FloatParam):
        return param.low <= value <= param.high and (param.step is None or
                                                     math.isclose((value - param.low) / param.step,
                                                                  round((value - param.low) / param.step)))
    return float(value).is_integer() and param.low <= value <= param.high and (value - param.low) % param.step == 0


def enqueue_preset(study: Any, base: PipelineConfig, space: SearchSpace, *, shared: bool = False) -> bool:
    """Make the preset the study's first trial (a new study only); False when it is not in the space,
    or when the study is ``shared`` by several processes: Optuna cannot enqueue atomically, so two
    workers starting together would both queue it (the seed repeats then run the preset instead)."""
    values = preset_values(base, space)
    if values is None or shared or study.trials:
        return False
    study.enqueue_trial(values, user_attrs={PRESET_ATTR: True}, skip_if_exists=True)
    return True


def _finished_run(trial: Any, metric: str) -> ScoredRun | None:
    """A complete trial's figures as a seed result (its checkpoint folder may be gone)."""
    a = trial.user_attrs
    if a.get(f"test_{metric}") is None:
        return None
    from core.records import TrainedModel

    trained_file = Path(str(a.get("run_dir", ""))) / TRAINED_FILE
    trained = TrainedModel.model_validate_json(trained_file.read_text()) if trained_file.is_file() else None
    if trained is None:
        return None
    return ScoredRun(valid=a.get(f"valid_{metric}"), test=a[f"test_{metric}"], attrs=dict(a), trained=trained)


def plan(study: Any, base: PipelineConfig, space: SearchSpace, settings: StudySettings) -> list[SeedJob]:
    """The runs of the preset and the best configuration over ``settings.seeds`` seeds; a complete
    trial of the same values at the config's seed stands in for that run."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete or settings.seeds < 1:
        return []
    metric = base.evaluation.valid_metric.lower()
    best = study.best_trial
    preset = preset_values(base, space)
    preset_trial = next((t for t in complete if t.user_attrs.get(PRESET_ATTR)), None)
    jobs: list[SeedJob] = []
    same = preset == dict(best.params)
    for label, params, trial in (("preset", preset, preset_trial), ("best", dict(best.params), best)):
        if params is None:  # the preset is outside the space: its values are the base config's own
            params = {}
        for seed in seed_list(base.training.seed, settings.seeds):
            reuse = trial if trial is not None and seed == base.training.seed else None
            reused = _finished_run(reuse, metric) if reuse is not None else None
            # When the best is the preset, its repeats are the preset's (one run per seed).
            folder = f"{'preset' if same else label}-seed{seed}"
            jobs.append(SeedJob(label=label, seed=seed, params=params,
                                run_dir=(settings.dir / SEEDS_DIR / folder).resolve(),
                                reuse_trial=reuse.number if reused is not None and reuse is not None else None,
                                reused=reused))
    return jobs


def run_job(job: SeedJob, base: PipelineConfig, splits: DatasetSplits, settings: StudySettings) -> ScoredRun:
    """Train one repeat under the trial cap, or read it back (a trial's or an earlier call's result)."""
    if job.reused is not None:
        return job.reused
    done = job.run_dir / RESULT_FILE
    if done.is_file():
        return ScoredRun.model_validate_json(done.read_text())
    config = trial_config(base, job.params | {"training.seed": job.seed}, settings)
    run = fit_and_score(config, splits, job.run_dir)
    done.write_text(run.model_dump_json(indent=2))
    return run


def drop_preset_checkpoints(jobs: list[SeedJob]) -> list[Path]:
    """Only the preset repeats' figures are needed; the best's checkpoints feed the ensemble and --promote."""
    keep = {j.run_dir for j in jobs if j.label == "best"}
    dropped = []
    for job in jobs:
        if job.label == "preset" and job.reused is None and job.run_dir not in keep:
            shutil.rmtree(job.run_dir / "checkpoints", ignore_errors=True)
            dropped.append(job.run_dir)
    return dropped


def summarise(label: Label, jobs: list[SeedJob], runs: list[ScoredRun]) -> SeedSummary:
    test = [float(r.test) for r in runs if r.test is not None]
    valid = [float(r.valid) for r in runs if r.valid is not None]
    return SeedSummary(label=label, params=jobs[0].params if jobs else {}, seeds=[j.seed for j in jobs],
                       test=test, valid=valid, mean=statistics.fmean(test) if test else float("nan"),
                       std=statistics.stdev(test) if len(test) > 1 else None,
                       run_dirs=[Path(str(r.attrs.get("run_dir", j.run_dir))) for j, r in zip(jobs, runs, strict=True)])


def compare(preset: SeedSummary, best: SeedSummary, metric: str, *, maximize: bool = True) -> SeedComparison:
    """Best vs preset over the same seeds: better only when the gap exceeds 2x the pooled std."""
    gap = (best.mean - preset.mean) * (1 if maximize else -1)
    pooled = (math.sqrt((preset.std**2 + best.std**2) / 2)
              if preset.std is not None and best.std is not None else None)
    better = pooled is not None and gap > 2 * pooled
    n = len(best.test)
    if best.params == preset.params:
        verdict = "the best configuration is the preset itself"
    elif pooled is None:
        verdict = f"one seed only: no noise estimate (gap {gap:+.4f})"
    elif better:
        verdict = f"better: the gap {gap:+.4f} exceeds 2x the pooled std ({2 * pooled:.4f}) over {n} seeds"
    else:
        verdict = (f"within seed noise: the gap {gap:+.4f} does not exceed 2x the pooled std "
                   f"({2 * pooled:.4f}) over {n} seeds")
    return SeedComparison(metric=metric, preset=preset, best=best, gap=gap, pooled_std=pooled, better=better,
                          verdict=verdict)


def format_summary(s: SeedSummary) -> str:
    spread = f" ± {s.std:.4f}" if s.std is not None else ""
    return f"{s.mean:.4f}{spread} ({', '.join(f'{v:.4f}' for v in s.test)})"
