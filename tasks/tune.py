"""Thin Prefect tasks of ``recflow tune`` (flows/tuning_pipeline.py); the work is in core/experiments."""

from __future__ import annotations

import base64

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from core.config import PipelineConfig, dump_config, load_config
from core.experiments import seeds as seed_runs
from core.experiments.ensemble import build_ensemble
from core.experiments.promotion import ReleaseCandidate, choose
from core.experiments.report import BASE_FILE, StudyReport, report_study
from core.experiments.seeds import SeedComparison, SeedJob
from core.experiments.space import SearchSpace, check_space
from core.experiments.study import (
    TRAINED_FILE,
    StudySettings,
    open_study,
    save_snapshot,
    save_splits,
    stored_splits,
    study_direction,
    study_fingerprint,
)
from core.experiments.trial import ScoredRun, TrialOutcome, run_trial
from core.modeling.dataset import build_dataset
from core.records import DatasetSplits, Snapshot
from core.release.artifacts import CONFIG_FILE
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
    if seed_runs.enqueue_preset(study, config, space, shared=settings.storage_env is not None):
        get_run_logger().info("the preset's own values are trial 0 (the baseline every trial is compared with)")
    done = len(study.trials)
    get_run_logger().info("study %s in %s: %d trial(s) so far, %d wanted; data %s", settings.name, settings.dir,
                          done, settings.trials, "already split (reused)" if splits else "to extract")
    return splits


@task(name="build-study-data", cache_policy=NO_CACHE)
def build_study_data_task(snapshot: Snapshot, config: PipelineConfig, settings: StudySettings) -> DatasetSplits:
    """The split every trial trains and is compared on, built once and stored with the study."""
    splits = build_dataset(snapshot, config, settings.data_dir.resolve())
    save_splits(splits, settings)
    save_snapshot(snapshot, settings)
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


@task(name="plan-seed-repeats", cache_policy=NO_CACHE)
def seed_plan_task(config: PipelineConfig, space: SearchSpace, settings: StudySettings) -> list[SeedJob]:
    jobs = seed_runs.plan(open_study(settings), config, space, settings)
    reused = sum(j.reused is not None for j in jobs)
    get_run_logger().info("seed repeats: %d runs (%d read from the trials, %d to train), seeds %s", len(jobs),
                          reused, len(jobs) - reused, sorted({j.seed for j in jobs}))
    return jobs


@task(name="seed-repeat", task_run_name="{job.label}-seed{job.seed}", cache_policy=NO_CACHE)
def seed_run_task(job: SeedJob, config: PipelineConfig, splits: DatasetSplits, settings: StudySettings) -> ScoredRun:
    run = seed_runs.run_job(job, config, splits, settings)
    get_run_logger().info("%s seed %d: valid %s, test %s after %s epochs", job.label, job.seed,
                          _fmt(run.valid), _fmt(run.test), run.attrs.get("epochs"))
    return run


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


@task(name="compare-seeds", cache_policy=NO_CACHE)
def compare_seeds_task(config: PipelineConfig, jobs: list[SeedJob], runs: list[ScoredRun],
                       settings: StudySettings) -> SeedComparison | None:
    """Preset vs best over the same seeds (test metric, mean +- std), as a file and a Prefect artifact."""
    if not jobs:
        get_run_logger().warning("no seed repeats: the study has no complete trial")
        return None
    by_label = {label: [(j, r) for j, r in zip(jobs, runs, strict=True) if j.label == label]
                for label in ("preset", "best")}
    preset, best = (seed_runs.summarise(label, [j for j, _ in pairs], [r for _, r in pairs])  # type: ignore[arg-type]
                    for label, pairs in by_label.items())
    comparison = seed_runs.compare(preset, best, config.evaluation.valid_metric,
                                   maximize=study_direction(config) == "maximize")
    seed_runs.drop_preset_checkpoints(jobs)
    (settings.dir / seed_runs.SEEDS_DIR / "comparison.json").write_text(comparison.model_dump_json(indent=2))
    key = artifact_key("tuning", settings.name)
    create_table_artifact(table=[
        {"configuration": s.label, "seeds": ", ".join(map(str, s.seeds)), f"test {comparison.metric}":
         seed_runs.format_summary(s), "parameters": ", ".join(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else
                                f"{k.rsplit('.', 1)[-1]}={v}" for k, v in s.params.items()) or "preset"}
        for s in (preset, best)], key=f"{key}-seeds", description=f"study {settings.name}: {comparison.verdict}")
    get_run_logger().info("seeds: preset %s, best %s: %s", seed_runs.format_summary(preset),
                          seed_runs.format_summary(best), comparison.verdict)
    return comparison


@task(name="ensemble", cache_policy=NO_CACHE)
def ensemble_task(comparison: SeedComparison | None, splits: DatasetSplits,
                  settings: StudySettings) -> tuple[ReleaseCandidate | None, str | None]:
    """The best configuration's seed models as one model (mean log-softmax); a release candidate
    (--promote) only if it beats its best member on valid."""
    logger = get_run_logger()
    if comparison is None or len(comparison.best.run_dirs) < 2:
        return None, None
    members = comparison.best.run_dirs
    out = (settings.dir / seed_runs.SEEDS_DIR / "ensemble").resolve()
    result = build_ensemble(load_config(members[0] / CONFIG_FILE), splits, members, out)
    (out / TRAINED_FILE).write_text(result.trained.model_dump_json(indent=2))
    metric = result.valid_metric.lower()
    best = max(m.valid.get(metric, float("-inf")) for m in result.members)
    line = (f"ensemble of {len(members)} seed models: valid {result.valid[metric]:.4f} (best member {best:.4f}), "
            f"test {result.test.get(metric, float('nan')):.4f}; "
            + ("beats its best member (a --promote candidate)" if result.beats_best_member
               else "does not beat its best member (not registered)"))
    logger.info(line)
    if not result.beats_best_member:
        return None, line
    return ReleaseCandidate(label="ensemble", run_dir=out, valid=result.valid[metric]), line


@task(name="release-candidates", cache_policy=NO_CACHE)
def release_candidates_task(settings: StudySettings, comparison: SeedComparison | None,
                            extra: list[ReleaseCandidate] | None = None) -> list[ReleaseCandidate]:
    """--register-top and --promote: which trained folders go through evaluate -> export -> register."""
    repeats = [] if comparison is None else [
        ReleaseCandidate(label=f"best-seed{seed}", run_dir=run_dir, valid=valid)
        for seed, run_dir, valid in zip(comparison.best.seeds, comparison.best.run_dirs, comparison.best.valid,
                                        strict=False)]
    chosen = choose(open_study(settings), settings, repeats + (extra or []))
    get_run_logger().info("to register: %s", ", ".join(f"{c.label}{' (gate decides promotion)' if c.promote else ''}"
                                                        for c in chosen) or "nothing (no complete trial on disk)")
    return chosen


@task(name="report-study", cache_policy=NO_CACHE)
def report_task(config: PipelineConfig, settings: StudySettings, seeds: SeedComparison | None = None,
                ensemble: str | None = None, registered: list[str] | None = None) -> StudyReport:
    """Leaderboard CSV, plots and best.yaml on disk; the leaderboard and plots as Prefect artifacts."""
    report = report_study(open_study(settings), config, settings, seeds)
    report.ensemble, report.registered = ensemble, registered or []
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
