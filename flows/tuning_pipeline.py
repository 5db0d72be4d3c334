"""recflow tune as one Prefect flow: the data once, then one subflow run per Optuna trial, then the results.

    from core.config import load_config
    from core.experiments.space import load_space
    from core.experiments.study import StudySettings
    from flows.tuning_pipeline import tuning_pipeline
    report = tuning_pipeline(load_config("ml-100k-sasrec"), load_space("sasrec"), StudySettings(name="s1", trials=16))

Extract, validate and split run on the first call of a study only; a re-run (same --study) reads
the stored split and continues the study until it holds ``settings.trials`` complete + pruned trials.
"""

from __future__ import annotations

from prefect import flow

import flows  # noqa: F401  (Prefect environment defaults)
from core.config import PipelineConfig
from core.experiments.report import StudyReport
from core.experiments.seeds import search_settings
from core.experiments.space import SearchSpace
from core.experiments.study import StudySettings, open_study, optimize, stored_snapshot
from core.experiments.trial import TrialOutcome, make_objective
from core.records import DatasetSplits
from flows._stages import stage
from flows.release_pipeline import release_model
from flows.tuning_dispatch import trial_runner
from tasks.extract import extract_task
from tasks.tune import (
    build_study_data_task,
    compare_seeds_task,
    ensemble_task,
    prepare_study_task,
    release_candidates_task,
    report_task,
    seed_plan_task,
    seed_run_task,
    trial_task,
)
from tasks.validate import validate_task


@flow(name="tuning-trial", flow_run_name="trial-{number}")
def tuning_trial(config: PipelineConfig, splits: DatasetSplits, settings: StudySettings, number: int) -> TrialOutcome:
    """One trial, its own flow run: attaches to the trial in the study storage by number."""
    return trial_task(config, splits, settings, number)


@flow(name="tuning-pipeline", log_prints=True)
def tuning_pipeline(config: PipelineConfig, space: SearchSpace, settings: StudySettings) -> StudyReport:
    with stage("tune", settings.dir):
        splits = prepare_study_task(config, space, settings)
    if splits is None:  # the study's first run: one snapshot and split for every trial
        with stage("extract", settings.data_dir):
            snapshot = extract_task(config, settings.data_dir)
        with stage("validate", settings.data_dir):
            validate_task(snapshot, config, settings.data_dir)
        with stage("build", settings.data_dir):
            splits = build_study_data_task(snapshot, config, settings)
    with stage("tune", settings.dir):
        # Optuna drives; each trial it asks for runs as a subflow (a failed one is a FAIL trial).
        runner, n_jobs = trial_runner(settings, config, local=tuning_trial)  # --pool: one flow run per pool slot
        optimize(open_study(settings), make_objective(config, space, splits, settings, runner=runner),
                 search_settings(settings), n_jobs)
    comparison, ensemble, ensemble_line = None, None, None
    if settings.seeds:  # the preset and the best configuration over the same seeds; the latter's ensemble
        with stage("seeds", settings.dir):
            jobs = seed_plan_task(config, space, settings)
            comparison = compare_seeds_task(config, jobs, [seed_run_task(j, config, splits, settings) for j in jobs],
                                            settings)
            ensemble, ensemble_line = ensemble_task(comparison, splits, settings)
    registered: list[str] = []
    if settings.promote or settings.register_top:  # through the same gate and registry as a training run
        snapshot = stored_snapshot(settings)
        for c in release_candidates_task(settings, comparison, [ensemble] if ensemble else []):
            p = release_model(c.config(), snapshot, splits, c.trained(), c.run_dir, c.label, c.promote)
            registered.append(f"{p.model_name}/{p.version}" + (" (champion)" if p.promoted else ""))
    with stage("report", settings.dir):
        return report_task(config, settings, comparison, ensemble_line, registered)
