"""Training tracking: what a run leaves in its folder besides checkpoints.

- ``training_log.jsonl``: one JSON line per finished epoch (appended as it finishes).
- ``training_curve.png``: loss and valid score per epoch (matplotlib, Agg backend).
- ``wandb/``: a Weights & Biases run, offline by default (``wandb sync`` uploads it later).
- ``gpu_usage.csv``: on CUDA, a background thread samples GPU utilisation and memory.
- ``warning_signs``: plateau / train-valid gap / GPU memory near full.

TensorBoard events are written by RecBole's trainer into ``tensorboard/`` (see
``core.modeling.recbole_adapter.tensorboard_dir``). No Prefect here: ``tasks/train.py`` turns the
results into artifacts.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from core.records import EpochStats

TRAINING_LOG = "training_log.jsonl"
TRAINING_CURVE = "training_curve.png"
GPU_USAGE = "gpu_usage.csv"
AUTO_BATCH = "auto_batch.json"
WANDB_DIR = "wandb"
GPU_COLUMNS = ("seconds", "utilization", "memory_allocated", "max_memory_reserved", "memory_free", "memory_total")
log = logging.getLogger("recflow.tracking")

Sample = Mapping[str, float | None]
SampleFn = Callable[[], Sample]


# --------------------------------------------------------------------------- epoch log
def append_epoch_log(run_dir: Path, stats: EpochStats, *, lr: float | None, grad_accumulation: int) -> None:
    """Append one epoch to ``run_dir/training_log.jsonl`` (flushed, so a crash keeps it)."""
    line = {
        "epoch": stats.epoch,
        "loss": stats.train_loss,
        "train_seconds": stats.train_seconds,
        "valid_score": stats.valid_score,
        "lr": lr,
        "grad_accumulation": grad_accumulation,
    }
    with (run_dir / TRAINING_LOG).open("a") as fh:
        fh.write(json.dumps(line) + "\n")


def read_epoch_log(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / TRAINING_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- curve
def plot_training_curve(epochs: list[EpochStats], path: Path, *, valid_metric: str = "valid score") -> Path | None:
    """Loss (left axis) and valid score (right axis) per epoch, 600x300 px. None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed: no %s", path.name)
        return None
    fig = Figure(figsize=(7.5, 3.75), dpi=80)  # 600 x 300 px
    ax = fig.add_subplot(1, 1, 1)
    xs = [e.epoch + 1 for e in epochs]
    ax.plot(xs, [e.train_loss for e in epochs], "o-", color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="tab:blue")
    valid = [(e.epoch + 1, e.valid_score) for e in epochs if e.valid_score is not None]
    if valid:
        ax2 = ax.twinx()
        ax2.plot([v[0] for v in valid], [v[1] for v in valid], "s-", color="tab:orange", label=valid_metric)
        ax2.set_ylabel(f"valid {valid_metric}", color="tab:orange")
    ax.set_title("training curve")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- warnings
def warning_signs(
    epochs: list[EpochStats],
    *,
    gpu_peak_fraction: float | None,
    plateau_epochs: int = 3,
    gap_epochs: int = 2,
    gpu_limit: float = 0.9,
) -> list[str]:
    """Early-warning signs of a training run, as sentences ([] when healthy).

    - plateau: the valid score did not improve in the last ``plateau_epochs`` (>= 3) epochs;
    - train/valid gap: the train loss kept falling while the valid score fell for ``gap_epochs`` epochs;
    - GPU memory: the peak used fraction exceeded ``gpu_limit``.
    """
    signs: list[str] = []
    scores = [e.valid_score for e in epochs if e.valid_score is not None and math.isfinite(e.valid_score)]
    n = max(plateau_epochs, 3)
    if len(scores) > n:
        best_before = max(scores[:-n])
        if max(scores[-n:]) <= best_before:
            signs.append(
                f"validation plateau: no improvement over {best_before:.4f} in the last {n} epochs "
                "(lower the learning rate, or stop earlier)"
            )
    if len(epochs) > gap_epochs:
        tail = epochs[-(gap_epochs + 1) :]
        losses = [e.train_loss for e in tail]
        valid = [e.valid_score for e in tail]
        if all(v is not None for v in valid):
            loss_falling = all(b < a for a, b in zip(losses, losses[1:]))
            valid_falling = all(b < a for a, b in zip(valid, valid[1:]))  # type: ignore[operator]
            if loss_falling and valid_falling:
                signs.append(
                    f"train/valid gap: train loss still falling while the valid score fell for {gap_epochs} "
                    "epochs (overfitting: more regularisation/dropout, or fewer epochs)"
                )
    if gpu_peak_fraction is not None and gpu_peak_fraction > gpu_limit:
        signs.append(
            f"GPU memory: peak {gpu_peak_fraction:.0%} of the device (> {gpu_limit:.0%}); "
            "an out-of-memory step-down is close: lower the batch or use training.grad_accumulation"
        )
    return signs


# --------------------------------------------------------------------------- GPU usage
def cuda_sample_fn(device: Any = None) -> SampleFn:
    """A sampler of the CUDA device's utilisation and memory (bytes)."""
    import torch

    def sample() -> dict[str, float | None]:
        try:
            util: float | None = float(torch.cuda.utilization(device))
        except Exception:  # needs pynvml / amdsmi
            util = None
        free, total = torch.cuda.mem_get_info(device)
        return {
            "utilization": util,
            "memory_allocated": float(torch.cuda.memory_allocated(device)),
            "max_memory_reserved": float(torch.cuda.max_memory_reserved(device)),
            "memory_free": float(free),
            "memory_total": float(total),
        }

    return sample


class GpuSampler:
    """Samples ``sample_fn`` every ``interval`` seconds in a daemon thread into a CSV file."""

    def __init__(self, path: Path, sample_fn: SampleFn, interval: float = 5.0) -> None:
        self.path = path
        self.sample_fn = sample_fn
        self.interval = interval
        self.rows = 0
        self.peak_fraction: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.perf_counter()

    def start(self) -> GpuSampler:
        new = not self.path.exists()
        self._fh = self.path.open("a", newline="")
        self._writer = csv.writer(self._fh)
        if new:
            self._writer.writerow(GPU_COLUMNS)
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="recflow-gpu-sampler", daemon=True)
        self._thread.start()
        return self

    def _take(self) -> None:
        try:
            s = self.sample_fn()
        except Exception as exc:  # a sampler must never break training
            log.warning("GPU sampling failed, stopped: %s", exc)
            self._stop.set()
            return
        row = [round(time.perf_counter() - self._t0, 3)] + [s.get(c) for c in GPU_COLUMNS[1:]]
        self._writer.writerow(["" if v is None else v for v in row])
        self._fh.flush()
        self.rows += 1
        total, free, reserved = s.get("memory_total"), s.get("memory_free"), s.get("max_memory_reserved")
        if total:
            used = max(total - (free if free is not None else total), reserved or 0.0)
            self.peak_fraction = max(self.peak_fraction or 0.0, used / total)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._take()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=max(self.interval, 1.0) + 5)
        self._thread = None
        self._fh.close()


# --------------------------------------------------------------------------- W&B
def _quiet_wandb_env() -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    os.environ.setdefault("WANDB_DISABLE_GIT", "true")
    os.environ.setdefault("WANDB_DISABLE_CODE", "true")


def start_wandb(
    run_dir: Path, *, project: str, mode: str, name: str, config: dict[str, Any], run_id: str | None = None
) -> Any:
    """A W&B run writing under ``run_dir/wandb/``; None if wandb is missing, disabled, or fails to start."""
    if mode == "disabled":
        return None
    _quiet_wandb_env()
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed: no W&B run (pip install wandb)")
        return None
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        # Never prompt for a login from a pipeline: record offline, `wandb sync` later.
        log.warning("tracking.wandb_mode=online but WANDB_API_KEY is not set: recording offline instead")
        mode = "offline"
    try:
        settings = wandb.Settings(
            silent=True,
            console="off",
            disable_git=True,
            save_code=False,
            x_disable_stats=True,  # GPU usage has its own sampler (gpu_usage.csv)
            x_disable_meta=True,
            x_disable_machine_info=True,
            x_save_requirements=False,
        )
        return wandb.init(
            project=project,
            name=name,
            id=run_id,
            resume="allow" if run_id else None,
            mode=mode,  # type: ignore[arg-type]
            dir=str(run_dir),
            config=config,
            settings=settings,
            reinit="finish_previous",
        )
    except Exception as exc:
        log.warning("W&B run could not start (%s: %s); continuing without it", type(exc).__name__, exc)
        return None


# --------------------------------------------------------------------------- the tracker
class RunTracker:
    """Everything ``train`` tracks for one call; ``close`` always runs (even on an exception)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        model_name: str,
        valid_metric: str,
        wandb_enabled: bool = True,
        wandb_project: str = "recflow",
        wandb_mode: str = "offline",
        config: dict[str, Any] | None = None,
        gpu_sample_fn: SampleFn | None = None,
        gpu_interval: float = 5.0,
        plot: bool = True,
    ) -> None:
        self.run_dir = run_dir
        self.model_name = model_name
        self.valid_metric = valid_metric
        self.plot = plot
        self.wandb_run: Any = None
        self.sampler: GpuSampler | None = None
        self.wandb_seconds = 0.0
        if wandb_enabled:
            t = time.perf_counter()
            self.wandb_run = start_wandb(
                run_dir,
                project=wandb_project,
                mode=wandb_mode,
                name=f"{run_dir.name}-{model_name}",
                config=config or {},
            )
            self.wandb_seconds += time.perf_counter() - t
        if gpu_sample_fn is not None:
            self.sampler = GpuSampler(run_dir / GPU_USAGE, gpu_sample_fn, gpu_interval).start()

    def epoch(
        self,
        stats: EpochStats,
        *,
        lr: float | None,
        grad_accumulation: int,
        valid_result: Mapping[str, float] | None = None,
    ) -> None:
        append_epoch_log(self.run_dir, stats, lr=lr, grad_accumulation=grad_accumulation)
        if self.wandb_run is not None:
            t = time.perf_counter()
            row: dict[str, Any] = {"epoch": stats.epoch, "train/loss": stats.train_loss,
                                   "train/seconds": stats.train_seconds, "lr": lr}
            if stats.valid_score is not None:
                row[f"valid/{self.valid_metric}"] = stats.valid_score
            for k, v in (valid_result or {}).items():
                row[f"valid/{k}"] = float(v)
            try:
                self.wandb_run.log(row, step=stats.epoch)
            except Exception as exc:
                log.warning("W&B log failed: %s", exc)
            self.wandb_seconds += time.perf_counter() - t

    def auto_batch(self, choice: Mapping[str, Any]) -> None:
        """train_batch_size=auto: the batch chosen and the probes, in ``auto_batch.json`` and W&B."""
        (self.run_dir / AUTO_BATCH).write_text(json.dumps(dict(choice), indent=2))
        if self.wandb_run is not None:
            try:
                self.wandb_run.summary["auto_batch/batch"] = choice["batch"]
                self.wandb_run.summary["auto_batch/method"] = choice["method"]
                self.wandb_run.summary["auto_batch/probes"] = len(choice.get("probes") or [])
            except Exception as exc:
                log.warning("W&B summary failed: %s", exc)

    @property
    def gpu_peak_fraction(self) -> float | None:
        return self.sampler.peak_fraction if self.sampler is not None else None

    def close(self, epochs: list[EpochStats], *, summary: Mapping[str, Any] | None = None, failed: bool = False) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        if self.plot and epochs:
            try:
                plot_training_curve(epochs, self.run_dir / TRAINING_CURVE, valid_metric=self.valid_metric)
            except Exception as exc:  # a plot must never fail a training run
                log.warning("could not draw %s: %s", TRAINING_CURVE, exc)
        if self.wandb_run is not None:
            t = time.perf_counter()
            try:
                for k, v in (summary or {}).items():
                    self.wandb_run.summary[k] = v
            except Exception as exc:
                log.warning("W&B summary failed: %s", exc)
            finally:
                try:
                    self.wandb_run.finish(exit_code=1 if failed else 0)
                except Exception as exc:
                    log.warning("W&B finish failed: %s", exc)
                self.wandb_run = None
            self.wandb_seconds += time.perf_counter() - t


def log_final_metrics(
    run_dir: Path, metrics: Mapping[str, Mapping[str, float]], *, project: str = "recflow", mode: str = "offline"
) -> bool:
    """Add final (e.g. test) metrics to the run's W&B run as summary values ``<split>/<metric>``.

    For the evaluation step: resumes the run ``train`` recorded under ``run_dir/wandb``.
    Returns False when there is none (or wandb is missing).
    """
    run_id = wandb_run_id(run_dir)
    if run_id is None:
        return False
    run = start_wandb(run_dir, project=project, mode=mode, name=run_dir.name, config={}, run_id=run_id)
    if run is None:
        return False
    try:
        for split, values in metrics.items():
            for k, v in values.items():
                run.summary[f"{split}/{k}"] = float(v)
    finally:
        run.finish()
    return True


def wandb_run_id(run_dir: Path) -> str | None:
    """The id of the (latest) W&B run under ``run_dir/wandb``, from its ``*-run-<id>`` folder name."""
    runs = sorted((run_dir / WANDB_DIR).glob("*-run-*"), key=lambda p: p.name)
    return runs[-1].name.rsplit("-", 1)[-1] if runs else None
