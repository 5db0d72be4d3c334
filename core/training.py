"""train: any RecBole model by name, with recflow's additions on top of RecBole's trainer.

Additions: the best checkpoint is written atomically into the run folder, TensorBoard
goes into the run folder, each epoch reports loss/time/valid score to a callback (the
Prefect task logs it), and anomaly detection stays off.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from core import recbole_compat as rb
from core.config import PipelineConfig
from core.dataset import RecBoleData, load_recbole_data
from core.errors import TrainingError
from core.records import DatasetSplits, EpochStats, TrainedModel

BEST_CHECKPOINT = "best.pth"
EpochCallback = Callable[[EpochStats], None]


class _RecflowTrainerMixin:
    """Mixed into whichever RecBole trainer class the model needs."""

    config: Any
    model: Any
    optimizer: Any
    cur_step: int
    best_valid_score: float
    saved_model_file: str
    train_loss_dict: dict[int, float]
    _epoch_seconds: dict[int, float]

    def _train_epoch(self, train_data: Any, epoch_idx: int, loss_func: Any = None, show_progress: bool = False) -> Any:
        start = time.perf_counter()
        loss = super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)  # type: ignore[misc]
        self._epoch_seconds[epoch_idx] = time.perf_counter() - start
        return loss

    def _save_checkpoint(self, epoch: int, verbose: bool = True, **kwargs: Any) -> None:
        # Temp file + rename: a crash mid-write never leaves a truncated "best" checkpoint.
        target = Path(kwargs.pop("saved_model_file", self.saved_model_file))
        state = {
            "config": self.config,
            "epoch": epoch,
            "cur_step": self.cur_step,
            "best_valid_score": self.best_valid_score,
            "state_dict": self.model.state_dict(),
            "other_parameter": self.model.other_parameter(),
            "optimizer": self.optimizer.state_dict(),
        }
        tmp = target.with_suffix(".tmp")
        torch.save(state, tmp, pickle_protocol=4)
        os.replace(tmp, target)


def make_trainer(data: RecBoleData, model: torch.nn.Module, checkpoint: Path) -> Any:
    base = rb.trainer_class(data.config)
    cls = type(f"Recflow{base.__name__}", (_RecflowTrainerMixin, base), {})
    with rb.tensorboard_dir(checkpoint.parent.parent / "tensorboard"):
        trainer = cls(data.config, model)
    trainer.saved_model_file = str(checkpoint)
    trainer._epoch_seconds = {}
    return trainer


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
    model = build_model(data)
    state = rb.load_checkpoint(checkpoint, data.config["device"])
    model.load_state_dict(state["state_dict"])
    model.load_other_parameter(state.get("other_parameter"))
    model.eval()
    return model


def train(
    config: PipelineConfig,
    splits: DatasetSplits,
    run_dir: Path,
    on_epoch: EpochCallback | None = None,
) -> TrainedModel:
    if config.training.threads:
        torch.set_num_threads(config.training.threads)
    checkpoint_dir = run_dir / "checkpoints"
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = checkpoint_dir / BEST_CHECKPOINT
    data = load_recbole_data(config, splits, checkpoint_dir)
    from recbole.utils import init_seed

    init_seed(data.config["seed"], data.config["reproducibility"])
    model = build_model(data)
    if config.training.fast_cpu_dropout and data.config["device"].type == "cpu":
        use_fast_cpu_dropout(model)
    trainer = make_trainer(data, model, checkpoint)
    epochs: list[EpochStats] = []
    last_valid = [time.perf_counter()]

    def callback(epoch_idx: int, valid_score: float) -> None:
        # RecBole sums batch losses; report the mean so epochs of any batch size compare.
        loss = trainer.train_loss_dict.get(epoch_idx, float("nan")) / max(len(data.train), 1)
        train_s = trainer._epoch_seconds.get(epoch_idx, 0.0)
        stats = EpochStats(
            epoch=epoch_idx,
            train_loss=round(float(loss), 6),
            train_seconds=round(train_s, 3),
            valid_score=float(valid_score),
            valid_seconds=round(max(time.perf_counter() - last_valid[0] - train_s, 0.0), 3),
        )
        last_valid[0] = time.perf_counter()
        epochs.append(stats)
        if on_epoch is not None:
            on_epoch(stats)

    start = time.perf_counter()
    try:
        best_score, _ = trainer.fit(data.train, data.valid, verbose=False, saved=True, callback_fn=callback)
    except ValueError as exc:
        if "nan" in str(exc).lower():
            raise TrainingError(f"training diverged (loss is NaN); lower training.learning_rate: {exc}") from None
        raise
    finally:
        torch.autograd.set_detect_anomaly(False)
        trainer.tensorboard.close()
    if not checkpoint.exists():
        raise TrainingError("training finished without saving a checkpoint (no validation epoch ran)")
    best_epoch = rb.load_checkpoint(checkpoint)["epoch"]
    return TrainedModel(
        model_name=data.config["model"],
        checkpoint=checkpoint,
        best_epoch=int(best_epoch),
        best_valid_score=float(best_score) if best_score is not None else None,
        valid_metric=config.evaluation.valid_metric,
        epochs=epochs,
        device=str(data.config["device"]),
        train_batch_size=int(data.config["train_batch_size"]),
        parameters=sum(p.numel() for p in model.parameters()),
        seconds=round(time.perf_counter() - start, 3),
    )
