"""Thin Prefect tasks of ``recflow tune`` (flows/tuning_pipeline.py); the work is in core/experiments."""

from __future__ import annotations

import base64

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from core.config import PipelineConfig, dump_config
from core.experiments.report import BASE_FILE, StudyReport, report_study
from core.experiments.space import SearchSpace, check_space
from core.experiments.study import (
    StudySettings,
    open_study,
    save_splits,
    stored_splits,
    study_direction,
    study_fingerprint,
)
from core.experiments.trial import TrialOutcome, run_trial
from core.modeling.dataset import build_dataset
from core.records import DatasetSplits, Snapshot
from tasks._common import artifact_key
from tasks.train import MAX_EMBEDDED_PNG


@task(name="prepare-study", cache_policy=NO_CACHE)
def prepare_study_task(config: PipelineConfig, space: SearchSpace, settings: StudySettings) -> DatasetSplits | None:
    """Create (or resume) the study and its folder; the shared split when a run before built it."""
    check_space(space, config)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(settings, direction=study_direction(config), fingerprint=study_fingerprint(config, space))
    dump_config(config, settings.dir / BASE_FILE)
    splits = stored_splits(settings)
    done = len(study.trials)
    get_run_logger().info("study %s in %s: %d trial(s) so far, %d wanted; data %s", settings.name, settings.dir,
                          done, settings.trials, "already split (reused)" if splits else "to extract")
    return splits


@task(name="build-study-data", cache_policy=NO_CACHE)
def build_study_data_task(snapshot: Snapshot, config: PipelineConfig, settings: StudySettings) -> DatasetSplits:
    """The split every trial trains and is compared on, built once and stored with the study."""
    splits = build_dataset(snapshot, config, settings.data_dir.resolve())
    save_splits(splits, settings)
    get_run_logger().info("study data: %d users, %d items, %d interactions (%s)", splits.users, splits.items,
                          splits.interactions, splits.eval_protocol)
    return splits


@task(name="trial", cache_policy=NO_CACHE)
def trial_task(config: PipelineConfig, splits: DatasetSplits, settings: StudySettings, number: int) -> TrialOutcome:
    outcome = run_trial(config, splits, settings, number)
    a = outcome.attrs
    get_run_logger().info("trial %d %s: valid %.4f after %s epochs, %.1f min on %s", number,
                          "pruned" if outcome.pruned else "complete", outcome.value, a["epochs"], a["minutes"],
                          a["device"])
    return outcome


@task(name="report-study", cache_policy=NO_CACHE)
def report_task(config: PipelineConfig, settings: StudySettings) -> StudyReport:
    """Leaderboard CSV, plots and best.yaml on disk; the leaderboard and plots as Prefect artifacts."""
    report = report_study(open_study(settings), config, settings)
    key = artifact_key("tuning", settings.name)
    create_table_artifact(table=report.leaderboard, key=f"{key}-leaderboard",
                          description=f"study {settings.name}: every trial, best first ({report.leaderboard_csv})")
    create_markdown_artifact(markdown=plots_markdown(report), key=f"{key}-plots",
                             description=f"study {settings.name}: optimisation history, importances, parallel coordinates")
    get_run_logger().info("study %s: %d trials counted, %d failed; best trial %s; %s", settings.name, report.counted,
                          report.failed, report.best_trial, report.dir)
    return report


def plots_markdown(report: StudyReport) -> str:
    """Each plot embedded when small (else its path), the skipped ones with the reason, and the files."""
    lines = [f"# Study {report.study}", ""]
    for png in report.plots:
        lines += [f"## {png.stem.replace('_', ' ')}", ""]
        data = png.read_bytes()
        lines.append(f"![{png.stem}](data:image/png;base64,{base64.b64encode(data).decode()})"
                     if len(data) < MAX_EMBEDDED_PNG else f"`{png.resolve()}`")
        lines.append("")
    lines += [f"- {name}: not drawn ({why})" for name, why in report.skipped_plots.items()]
    lines += ["", f"Leaderboard: `{report.leaderboard_csv.resolve()}`"]
    if report.best_yaml:
        lines.append(f"Best configuration (trial {report.best_trial}): `recflow run --config {report.best_yaml.resolve()}`")
    return "\n".join(lines)
