"""train: any RecBole model by name, with recflow's additions on top of RecBole's trainer.

Additions (the trainer side lives in ``core.modeling.trainer_mixin``): the best checkpoint is
written atomically into the run folder, TensorBoard goes into the run folder, each epoch
reports loss/time/valid score to a callback (the Prefect task logs it), gradient
accumulation and out-of-memory step-down, AMP/TF32/compile/clip, fast CPU dropout, an
all-position objective for sequential models, and anomaly detection stays off.

``train`` runs as named steps: ``_build_setup`` (seed, model, loader, trainer) ->
``_resume_from_latest`` (a crashed attempt's ``latest.pth``) -> ``prepare_train_batch``
(``core.modeling.batch_finder``) -> ``_open_tracker`` -> ``_fit`` (RecBole's ``fit`` with
``_EpochHook`` as its per-epoch callback) -> ``_trained_model``.

Crash resume: after every evaluated epoch ``checkpoints/latest.pth`` is written atomically
(model, optimizer, epoch, early-stopping state, k, the epoch stats and every RNG state,
the train loader's shuffle generator included). ``train`` on a run folder that holds one
(an attempt died) continues after its epoch, as the uninterrupted run would have; a
finished ``train`` deletes it.

The RecBole data (``RecBoleData``) is the caller's: pass the one the flow built (``data=``),
or ``train`` builds its own from the run folder's atomic files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.config import PipelineConfig, default_window_stride
from core.errors import TrainingError
from core.modeling import batch_finder, tracking
from core.modeling import recbole_adapter as rb
from core.modeling.dataset import RecBoleData, check_data, load_recbole_data
from core.modeling.ensemble_model import is_ensemble_checkpoint, load_ensemble
from core.modeling.runtime import oom_kind
from core.modeling.seq_objectives import AllPositionLoss, all_position_kind
from core.modeling.trainer_mixin import make_trainer
from core.records import AutoBatch, DatasetSplits, EpochStats, TrainedModel
from core.release.artifacts import CHECKPOINT_FILE

BEST_CHECKPOINT = CHECKPOINT_FILE
LATEST_CHECKPOINT = "latest.pth"
# Returns True to stop training after this epoch (a tuning trial the pruner gave up on); None or
# False to go on. Training then ends as on early stopping: best.pth kept, stop_reason "stopped by caller".
EpochCallback = Callable[[EpochStats], bool | None]
log = logging.getLogger("recflow.training")

__all__ = [
    "BEST_CHECKPOINT",
    "LATEST_CHECKPOINT",
    "FastCPUDropout",
    "amp_dtype_for",
    "build_model",
    "load_trained",
    "make_trainer",
    "plateaued",
    "train",
    "train_loader",
    "use_fast_cpu_dropout",
]


def amp_dtype_for(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``training.amp`` on ``device``; None: float32 (with a warning when asked for)."""
    if amp == "off":
        return None
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    if device.type == "cuda":
        if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            log.warning("training.amp=bf16: this GPU has no bfloat16; training in float32 (try amp=fp16)")
            return None
        return dtype
    if device.type == "cpu" and dtype is torch.bfloat16:
        return dtype
    log.warning("training.amp=%s is not supported on %s: training in float32", amp, device.type)
    return None


def set_tf32(enabled: bool, device: torch.device) -> None:
    """CUDA: TF32 matmuls and cuDNN convolutions on/off (no effect elsewhere)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def compile_model(model: torch.nn.Module) -> bool:
    """torch.compile the model's ``forward`` in place (RecBole calls ``self.forward`` from its losses,
    so compiling ``__call__`` would miss it). torch compiles lazily: a compile error on the first call
    is logged and that call (and every later one) runs uncompiled."""
    original = model.forward
    try:
        compiled = torch.compile(original)
    except Exception as exc:
        log.warning("torch.compile failed (%s: %s); training uncompiled", type(exc).__name__, exc)
        return False

    def forward(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except Exception as exc:
            if oom_kind(exc) is not None:
                raise
            log.warning("torch.compile failed (%s: %s); training uncompiled", type(exc).__name__, exc)
            model.forward = original  # type: ignore[method-assign]
            return original(*args, **kwargs)

    model.forward = forward  # type: ignore[method-assign]
    return True


class FastCPUDropout(torch.nn.Module):
    """Inverted dropout from ``rand >= p``: the same distribution as ``nn.Dropout``.

    torch's CPU dropout draws a Bernoulli per element (~4x slower than ``rand``); in SASRec
    it was ~40% of a CPU training step. Used on CPU only: CUDA's fused dropout is fast.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p >= 1.0:
            return torch.zeros_like(x)
        keep = torch.rand_like(x).ge_(self.p)
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_cpu_dropout(model: torch.nn.Module) -> int:
    """Swap every ``nn.Dropout`` for ``FastCPUDropout``; returns how many were swapped."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Dropout:
                setattr(parent, name, FastCPUDropout(child.p))
                swapped += 1
    return swapped


def build_model(data: RecBoleData) -> torch.nn.Module:
    model_cls = rb.resolve_model(data.config["model"])
    try:
        model = model_cls(data.config, data.train.dataset)
    except (KeyError, ValueError, AttributeError, TypeError) as exc:
        raise TrainingError(f"RecBole model {data.config['model']} cannot be built on this data: {exc}") from None
    return model.to(data.config["device"])


def load_trained(data: RecBoleData, checkpoint: Path) -> torch.nn.Module:
    """The trained model in ``checkpoint``, built on ``data``, in eval mode.

    Args:
        data: the RecBole data the model was trained on.
        checkpoint: a RecBole checkpoint (``train``'s ``best.pth``) or an ensemble's
            (``core.modeling.ensemble_model``: an ``EnsembleModel`` of its members comes back).

    Returns:
        The model, ready to score.
    """
    state = rb.load_checkpoint(checkpoint, data.config["device"])
    if is_ensemble_checkpoint(state):
        return load_ensemble(state, lambda: build_model(data), str(data.config["model"])).to(data.config["device"])
    model = build_model(data)
    model.load_state_dict(state["state_dict"])
    model.load_other_parameter(state.get("other_parameter"))
    model.eval()
    return model


def _resume_fingerprint(config: PipelineConfig) -> str:
    """What a latest.pth must have been written under to be resumed (threads do not matter)."""
    parts = config.model_dump(mode="json", include={"dataset", "model", "training", "evaluation"})
    for knob in ("threads", "compile", "dataloader_workers"):  # speed only, same results
        parts["training"].pop(knob, None)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class _RunPaths:
    """Where one training run keeps its checkpoints."""

    checkpoints: Path
    best: Path
    latest: Path

    @classmethod
    def of(cls, run_dir: Path) -> _RunPaths:
        checkpoints = run_dir / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        return cls(checkpoints, checkpoints / BEST_CHECKPOINT, checkpoints / LATEST_CHECKPOINT)


@dataclass
class _Setup:
    """What one ``train`` call trains: the data, the model, the loader and loss it trains on, the trainer."""

    data: RecBoleData
    model: torch.nn.Module
    loader: Any
    objective_loss: AllPositionLoss | None
    trainer: Any


@dataclass
class _Resume:
    """What a crashed attempt's ``latest.pth`` hands on (the defaults: training from scratch)."""

    epochs: list[EpochStats] = field(default_factory=list)
    from_epoch: int | None = None
    finished: bool = False
    stop_reason: str | None = None
    auto_batch: dict[str, Any] | None = None


def train(
    config: PipelineConfig,
    splits: DatasetSplits,
    run_dir: Path,
    on_epoch: EpochCallback | None = None,
    *,
    data: RecBoleData | None = None,
) -> TrainedModel:
    """Train ``config.model`` on ``splits``; resumes from ``run_dir/checkpoints/latest.pth`` if an attempt died.

    ``data``: the RecBole data built for this run (``core.modeling.dataset.build_recbole_data``);
    None builds it here. Training consumes its train loader (shuffle state, batch size), so
    pass a handle no other training has used. ``on_epoch`` sees only epochs trained by this
    call (the returned ``epochs`` holds all of them); it returns True to end training after
    that epoch (``stop_reason`` "stopped by caller"; a tuning trial pruned by Optuna).
    """
    paths = _RunPaths.of(run_dir)
    if data is None:
        data = load_recbole_data(config, splits, paths.checkpoints)
    else:
        check_data(data, config, splits, paths.checkpoints)
    setup = _build_setup(config, data, paths)
    resume = _resume_from_latest(config, setup, paths)
    auto_batch = batch_finder.prepare_train_batch(
        config.training, data, setup.model, setup.trainer, prior=resume.auto_batch,
        loader=setup.loader, loss_fn=setup.objective_loss,
    )
    tracker = _open_tracker(config, run_dir, data, auto_batch)
    hook = _EpochHook(config, setup, paths.latest, tracker, resume, auto_batch, on_epoch)
    start = time.perf_counter()
    best_score = _fit(setup, hook, resume, tracker)
    seconds = time.perf_counter() - start
    return _trained_model(config, setup, paths, hook, resume, auto_batch, tracker, best_score, seconds)


def _build_setup(config: PipelineConfig, data: RecBoleData, paths: _RunPaths) -> _Setup:
    """Threads and device flags, then the model (seeded as RecBole seeds it), its train loader and loss, its trainer."""
    from recbole.utils import init_seed

    t = config.training
    if t.threads:
        torch.set_num_threads(t.threads)
    # As RecBole's own run_recbole: seed right before the model is built, so its initial
    # weights do not depend on what ran before in this process.
    init_seed(data.config["seed"], data.config["reproducibility"])
    device = data.config["device"]
    set_tf32(t.tf32, device)
    model = build_model(data)
    if t.fast_cpu_dropout and device.type == "cpu":
        use_fast_cpu_dropout(model)
    if t.compile:
        compile_model(model)
    loader, objective_loss = train_loader(config, data, model)
    trainer = make_trainer(
        data,
        model,
        paths.best,
        grad_accumulation=t.grad_accumulation,
        min_micro_batch=t.min_micro_batch,
        amp_dtype=amp_dtype_for(t.amp, device),
        clip_grad_norm=t.clip_grad_norm,
        objective_loss=objective_loss,
    )
    return _Setup(data, model, loader, objective_loss, trainer)


def _resume_from_latest(config: PipelineConfig, setup: _Setup, paths: _RunPaths) -> _Resume:
    """Restore a crashed attempt's ``latest.pth`` into the trainer, when it was written under this configuration."""
    if not paths.latest.is_file():
        return _Resume()
    state = rb.load_checkpoint(paths.latest, setup.data.config["device"])
    if state.get("fingerprint") != _resume_fingerprint(config) or not paths.best.is_file():
        log.warning("ignoring %s: written by a run with another configuration; training from scratch", paths.latest)
        return _Resume()
    trainer = setup.trainer
    trainer.restore_latest(state, setup.loader)
    resume = _Resume(
        epochs=[EpochStats.model_validate(e) for e in state["epochs"]],
        from_epoch=int(state["epoch"]),
        finished=bool(state.get("stopped")) or trainer.start_epoch >= trainer.epochs,
        stop_reason=state.get("stop_reason"),
        auto_batch=state.get("auto_batch"),
    )
    log.warning(
        "resuming from epoch %d: epochs 0-%d restored from %s (0-based epoch numbers)",
        trainer.start_epoch,
        resume.from_epoch,
        paths.latest,
    )
    return resume


def _open_tracker(
    config: PipelineConfig, run_dir: Path, data: RecBoleData, auto_batch: AutoBatch | None
) -> tracking.RunTracker:
    """The run's tracker (training log, W&B, GPU sampler, curve), told the batch choice."""
    track = config.tracking
    device = data.config["device"]
    tracker = tracking.RunTracker(
        run_dir,
        model_name=str(data.config["model"]),
        valid_metric=config.evaluation.valid_metric,
        wandb_enabled=track.wandb,
        wandb_project=track.wandb_project,
        wandb_mode=track.wandb_mode,
        config=config.model_dump(mode="json"),
        gpu_sample_fn=tracking.cuda_sample_fn(device) if device.type == "cuda" else None,
        gpu_interval=track.gpu_sample_seconds,
        plot=track.training_curve,
    )
    if auto_batch is not None:
        tracker.auto_batch(auto_batch.model_dump(mode="json"))
    return tracker


class _EpochHook:
    """RecBole's per-epoch ``callback_fn``: records the epoch, writes ``latest.pth``, reports, decides to stop.

    ``epochs`` holds every epoch (a resumed attempt's first); ``stop_reason`` why training ended.
    """

    def __init__(
        self,
        config: PipelineConfig,
        setup: _Setup,
        latest: Path,
        tracker: tracking.RunTracker,
        resume: _Resume,
        auto_batch: AutoBatch | None,
        on_epoch: EpochCallback | None,
    ) -> None:
        self.config, self.setup, self.latest, self.tracker = config, setup, latest, tracker
        self.on_epoch = on_epoch
        self.epochs: list[EpochStats] = list(resume.epochs)
        self.stop_reason = (resume.stop_reason or "epoch cap") if resume.finished else "epoch cap"
        self.fingerprint = _resume_fingerprint(config)
        self.auto_batch = auto_batch.model_dump(mode="json") if auto_batch is not None else None
        minutes = config.training.max_minutes
        self.budget_s = minutes * 60 if minutes else None
        self.last_valid = time.perf_counter()

    def __call__(self, epoch_idx: int, valid_score: float) -> None:
        stats = self._record(epoch_idx, valid_score)
        trainer = self.setup.trainer
        recbole_stop = trainer.cur_step > trainer.stopping_step  # RecBole ends fit() itself
        early_stop = recbole_stop or self._plateaued()
        spent = sum(e.train_seconds + (e.valid_seconds or 0.0) for e in self.epochs)
        over_budget = self.budget_s is not None and spent >= self.budget_s and not early_stop
        # Written before anyone hears of the epoch: a crash from here on resumes after it.
        trainer.save_latest(
            self.latest,
            epoch_idx,
            self.setup.loader,
            {
                "fingerprint": self.fingerprint,
                "epochs": [e.model_dump() for e in self.epochs],
                "stopped": early_stop or over_budget,
                "stop_reason": "early stopping" if early_stop else "time budget" if over_budget else None,
                "auto_batch": self.auto_batch,
            },
        )
        caller_stop = bool(self.on_epoch(stats)) if self.on_epoch is not None else False
        t = self.config.training
        if early_stop:
            self.stop_reason = "early stopping"
            if not recbole_stop:
                log.info("valid %s gained < %g of its best in %d epochs: stopping", self.config.evaluation.valid_metric,
                         t.early_stopping_min_gain, t.early_stopping_patience + 1)
                raise _StopTrainingError
        elif over_budget:
            self.stop_reason = "time budget"
            log.warning("training.max_minutes=%g reached after epoch %d: keeping the best epoch",
                        t.max_minutes, epoch_idx)
            raise _StopTrainingError
        elif caller_stop:
            self.stop_reason = "stopped by caller"
            log.info("on_epoch asked to stop after epoch %d: keeping the best epoch", epoch_idx)
            raise _StopTrainingError

    def _record(self, epoch_idx: int, valid_score: float) -> EpochStats:
        """The epoch's stats, appended to ``epochs`` and sent to the tracker."""
        trainer = self.setup.trainer
        # RecBole sums batch losses; report the mean so epochs of any batch size compare.
        loss = trainer.train_loss_dict.get(epoch_idx, float("nan")) / max(len(self.setup.loader), 1)
        train_s = trainer._epoch_seconds.get(epoch_idx, 0.0)
        stats = EpochStats(
            epoch=epoch_idx,
            train_loss=round(float(loss), 6),
            train_seconds=round(train_s, 3),
            valid_score=float(valid_score),
            valid_seconds=round(max(time.perf_counter() - self.last_valid - train_s, 0.0), 3),
        )
        self.last_valid = time.perf_counter()
        self.epochs.append(stats)
        self.tracker.epoch(
            stats,
            lr=float(trainer.optimizer.param_groups[0]["lr"]),
            grad_accumulation=trainer.grad_accumulation,
            valid_result=trainer.last_valid_result,
        )
        return stats

    def _plateaued(self) -> bool:
        t = self.config.training
        return plateaued(
            [e.valid_score for e in self.epochs if e.valid_score is not None],
            patience=t.early_stopping_patience,
            min_gain=t.early_stopping_min_gain,
            bigger=bool(self.setup.data.config["valid_metric_bigger"]),
        )


def _fit(setup: _Setup, hook: _EpochHook, resume: _Resume, tracker: tracking.RunTracker) -> float | None:
    """RecBole's ``fit`` with ``hook`` (skipped when the crashed attempt had trained every epoch);
    returns the best valid score. TensorBoard and the tracker are closed whatever happens."""
    trainer = setup.trainer
    failed = True
    try:
        if resume.finished:
            best_score = trainer.best_valid_score
        else:
            hook.last_valid = time.perf_counter()
            try:
                best_score, _ = trainer.fit(setup.loader, setup.data.valid, verbose=False, saved=True, callback_fn=hook)
            except _StopTrainingError:
                best_score = trainer.best_valid_score
        failed = False
    except ValueError as exc:
        if "nan" in str(exc).lower():
            raise TrainingError(f"training diverged (loss is NaN); lower training.learning_rate: {exc}") from None
        raise
    finally:
        torch.autograd.set_detect_anomaly(False)
        trainer.tensorboard.close()
        best_result = getattr(trainer, "best_valid_result", None) or {}
        tracker.close(
            hook.epochs,
            summary={f"best_valid/{k}": float(v) for k, v in best_result.items()},
            failed=failed,
        )
    return best_score


def _trained_model(
    config: PipelineConfig,
    setup: _Setup,
    paths: _RunPaths,
    hook: _EpochHook,
    resume: _Resume,
    auto_batch: AutoBatch | None,
    tracker: tracking.RunTracker,
    best_score: float | None,
    seconds: float,
) -> TrainedModel:
    """The record of the finished run; deletes ``latest.pth`` (nothing left to resume)."""
    if not paths.best.exists():
        raise TrainingError("training finished without saving a checkpoint (no validation epoch ran)")
    paths.latest.unlink(missing_ok=True)  # this attempt finished: nothing to resume
    data, trainer, epochs = setup.data, setup.trainer, hook.epochs
    windows = setup.objective_loss is not None
    # The signs read "higher valid score is better": flip RMSE/MAE (rating task) so they hold.
    signed = epochs if data.config["valid_metric_bigger"] else [
        e.model_copy(update={"valid_score": -e.valid_score if e.valid_score is not None else None}) for e in epochs
    ]
    return TrainedModel(
        model_name=data.config["model"],
        checkpoint=paths.best,
        best_epoch=int(rb.load_checkpoint(paths.best)["epoch"]),
        best_valid_score=float(best_score) if best_score is not None else None,
        valid_metric=config.evaluation.valid_metric,
        epochs=epochs,
        device=str(data.config["device"]),
        train_batch_size=int(data.config["train_batch_size"]),
        parameters=sum(p.numel() for p in setup.model.parameters()),
        seconds=round(seconds, 3),
        micro_batch_size=trainer.micro_batch_size,
        grad_accumulation=trainer.grad_accumulation,
        oom_retries=list(trainer.oom_retries),
        resumed_from_epoch=resume.from_epoch,
        warning_signs=tracking.warning_signs(signed, gpu_peak_fraction=tracker.gpu_peak_fraction),
        gpu_peak_fraction=tracker.gpu_peak_fraction,
        amp=config.training.amp if trainer.amp_dtype is not None else "off",
        auto_batch=auto_batch,
        objective="all_positions" if windows else "last_item",
        loss=config.training.loss if windows else None,
        stop_reason=hook.stop_reason,
        train_rows=setup.loader.sample_size if hasattr(setup.loader, "sample_size") else None,
    )


BERT4REC_LAST_ONLY = 0.2


class _StopTrainingError(Exception):
    """Raised from the epoch callback to end ``fit``: a plateau RecBole's rule misses, the time budget,
    or ``on_epoch`` returning True."""


def plateaued(scores: list[float], *, patience: int, min_gain: float, bigger: bool = True) -> bool:
    """Whether the last ``patience + 1`` valid scores all failed to beat the best before them by ``min_gain``.

    Args:
        scores: valid scores, one per evaluated epoch, oldest first.
        patience: epochs without a gain that are tolerated (RecBole's ``stopping_step``).
        min_gain: the smallest gain that counts, as a fraction of the best score so far.
        bigger: whether higher scores are better.

    Returns:
        True when training should stop. With ``min_gain`` 0 this is RecBole's own rule; a
        positive one also stops a curve that still creeps up by a rounding error each epoch.
    """
    if not scores:
        return False
    best, stale = scores[0], 0
    for score in scores[1:]:
        margin = min_gain * abs(best)
        if (score > best + margin) if bigger else (score < best - margin):
            best, stale = score, 0
        else:
            stale += 1
    return stale > patience


def train_loader(config: PipelineConfig, data: RecBoleData, model: torch.nn.Module) -> tuple[Any, AllPositionLoss | None]:
    """What training reads batches from, and the loss that scores them (None: the model's own).

    Sequential models that support it train on all positions of windows cut from the train
    split (``training.objective: all_positions``); everything else uses RecBole's loader.
    """
    from recbole.utils import ModelType

    t = config.training
    kind = all_position_kind(str(data.config["model"]))
    if t.objective != "all_positions" or data.config["MODEL_TYPE"] != ModelType.SEQUENTIAL:
        return data.train, None
    if kind is None:
        log.warning("%s has no all-position objective: training RecBole's last_item way", data.config["model"])
        return data.train, None
    from core.modeling.window_loader import WindowLoader

    max_len = int(data.config["MAX_ITEM_LIST_LENGTH"])
    stride = min(t.window_stride or default_window_stride(max_len), max_len)
    # BERT4Rec: its mask_ratio, its mask token (the id after the last item), and the share of
    # windows that predict only their newest item.
    mask = (float(data.config["mask_ratio"] or 0.2), int(model.n_items), BERT4REC_LAST_ONLY) if kind == "masked" else None
    try:
        loader = WindowLoader.build(data.config, data.train.dataset, stride, seed=t.seed, mask=mask)
    except ValueError as exc:
        raise TrainingError(f"all-position training: {exc}") from None
    if t.loss == "gbce":
        log.warning("training.loss=gbce did not learn in recflow's ml-100k measurements (benchmarks/README.md); "
                    "sampled_softmax matched full cross-entropy there")
    return loader, AllPositionLoss(model, kind, t.loss, t.negatives, t.gbce_t)
