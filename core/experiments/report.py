"""What a study leaves for people: the leaderboard (CSV), the plots (PNG), the best configuration
as a preset YAML, and only the best trials' folders on disk.

Plots come from ``optuna.visualization.matplotlib`` on the Agg backend (plotly's image export
needs a browser). A plot that cannot be drawn (too few trials) is skipped with the reason.
"""

from __future__ import annotations

import csv
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from core.config import PipelineConfig, dump_config
from core.experiments.seeds import SeedComparison
from core.experiments.space import apply_overrides
from core.experiments.study import StudySettings

log = logging.getLogger("recflow.tuning")

LEADERBOARD_FILE = "leaderboard.csv"
BEST_FILE = "best.yaml"
BASE_FILE = "base.yaml"
PLOTS = {
    "optimization_history": "optimization_history.png",
    "param_importances": "param_importances.png",
    "parallel_coordinate": "parallel_coordinate.png",
}
_STATE_ORDER = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "WAITING": 3, "FAIL": 4}


class StudyReport(BaseModel):
    """Where a study's results are, and its totals (the flow's return value, the CLI's table)."""

    study: str
    dir: Path
    leaderboard: list[dict[str, Any]]
    leaderboard_csv: Path
    plots: list[Path] = Field(default_factory=list)
    skipped_plots: dict[str, str] = Field(default_factory=dict, description="plot -> why it was not drawn")
    best_yaml: Path | None = None
    best_trial: int | None = None
    metric: str
    counted: int = Field(description="complete + pruned trials")
    failed: int = 0
    minutes: float = 0.0
    core_hours: float = 0.0
    gpu_hours: float = 0.0
    cost: float | None = Field(default=None, description="GPU-hours (core-hours on CPU) x --gpu-cost-per-hour")
    removed_dirs: list[Path] = Field(default_factory=list)
    seeds: SeedComparison | None = Field(default=None, description="preset vs best over the same seeds")
    ensemble: str | None = Field(default=None, description="the seed ensemble's figures and verdict, one line")
    registered: list[str] = Field(default_factory=list, description="entry/version registered by --promote, "
                                                                    "--register-top")


def leaderboard(study: Any, metric: str, cost_per_hour: float | None = None) -> list[dict[str, Any]]:
    """One row per trial, best first: complete trials by value, then pruned, then the rest.
    ``cost_per_hour`` adds a cost column: GPU-hours (core-hours on CPU) times the price."""
    maximize = study.direction.name == "MAXIMIZE"
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        rows.append({
            "trial": t.number,
            "state": t.state.name,
            f"valid_{metric}": a.get(f"valid_{metric}"),
            f"test_{metric}": a.get(f"test_{metric}"),
            "epochs": a.get("epochs"),
            "minutes": a.get("minutes"),
            "device": a.get("device"),
            "core_hours": a.get("core_hours"),
            "gpu_hours": a.get("gpu_hours"),
            **({"cost": _cost(a, cost_per_hour)} if cost_per_hour is not None else {}),
            "stop_reason": a.get("stop_reason"),
            "preset": bool(a.get("preset", False)),
            **{k: v for k, v in sorted(t.params.items())},
            "error": a.get("error"),
        })

    def key(row: dict[str, Any]) -> tuple[int, float]:
        v = row[f"valid_{metric}"]
        score = float("inf") if v is None else (-v if maximize else v)
        return _STATE_ORDER.get(row["state"], 5), score

    return sorted(rows, key=key)


def _cost(attrs: dict[str, Any], per_hour: float) -> float | None:
    hours = attrs.get("gpu_hours") if attrs.get("gpu_hours") is not None else attrs.get("core_hours")
    return None if hours is None else round(float(hours) * per_hour, 4)


def write_leaderboard(rows: list[dict[str, Any]], path: Path) -> Path:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_plots(study: Any, out_dir: Path) -> tuple[list[Path], dict[str, str]]:
    """The three PNGs that can be drawn; the others with the reason they were skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    params = {k for t in complete for k in t.params}
    written: list[Path] = []
    skipped: dict[str, str] = {}
    for name, file in PLOTS.items():
        if not complete:
            skipped[name] = "no complete trial"
            continue
        if name == "param_importances" and (len(complete) < 2 or not params):
            skipped[name] = "needs at least 2 complete trials"
            continue
        if name == "parallel_coordinate" and not params:
            skipped[name] = "no parameters"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ax = getattr(ovm, f"plot_{name}")(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(9, 5.5)
            fig.tight_layout()
            fig.savefig(out_dir / file, dpi=100)
            plt.close(fig)
            written.append(out_dir / file)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # e.g. importances with no variance
            skipped[name] = f"{type(exc).__name__}: {exc}"
            plt.close("all")
    return written, skipped


def write_best(study: Any, base: PipelineConfig, out: Path) -> int | None:
    """The best complete trial's configuration as a preset: the study's base config (preset and
    flags, without the trial cap) with the trial's values. None when no trial completed."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        out.unlink(missing_ok=True)
        return None
    best = study.best_trial
    dump_config(apply_overrides(base, dict(best.params), origin=f"best trial {best.number}"), out)
    header = (f"# Best trial {best.number} of study {study.study_name}: valid {best.value:.6g}.\n"
              f"# recflow run --config {out}\n")
    out.write_text(header + out.read_text())
    return int(best.number)


def keep_top_trials(study: Any, settings: StudySettings) -> list[Path]:
    """Delete the folders of finished trials outside the best ``keep_top`` complete ones; a
    running trial (another process's) is left alone. Returns the folders removed."""
    from optuna.trial import TrialState

    rows = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                  key=lambda t: t.value, reverse=study.direction.name == "MAXIMIZE")
    keep = {t.number for t in rows[: max(settings.keep_top, settings.register_top)]}  # --register-top needs them
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    removed = []
    for t in study.get_trials(deepcopy=False, states=finished):
        folder = settings.trial_dir(t.number)
        if t.number not in keep and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def report_study(study: Any, base: PipelineConfig, settings: StudySettings,
                 seeds: SeedComparison | None = None) -> StudyReport:
    """Leaderboard CSV, plots, best.yaml and the top-k trial folders, in ``studies/<name>/``."""
    from optuna.trial import TrialState

    out = settings.dir
    out.mkdir(parents=True, exist_ok=True)
    metric = base.evaluation.valid_metric.lower()
    rows = leaderboard(study, metric, settings.gpu_cost_per_hour)
    csv_path = write_leaderboard(rows, out / LEADERBOARD_FILE)
    plots, skipped = write_plots(study, out)
    best = write_best(study, base, out / BEST_FILE)
    removed = keep_top_trials(study, settings)

    def total(key: str) -> float:
        return round(sum(float(r[key] or 0.0) for r in rows), 4)

    return StudyReport(
        study=settings.name, dir=out, leaderboard=rows, leaderboard_csv=csv_path, plots=plots,
        skipped_plots=skipped, best_yaml=out / BEST_FILE if best is not None else None, best_trial=best,
        metric=metric, counted=sum(r["state"] in ("COMPLETE", "PRUNED") for r in rows),
        failed=sum(r["state"] == TrialState.FAIL.name for r in rows),
        minutes=total("minutes"), core_hours=total("core_hours"), gpu_hours=total("gpu_hours"),
        cost=total("cost") if settings.gpu_cost_per_hour is not None else None,
        removed_dirs=removed, seeds=seeds,
    )
