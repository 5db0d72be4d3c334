"""recflow's additions to whichever RecBole trainer a model needs, and the factory that mixes them in.

``make_trainer`` builds ``Recflow<Trainer>`` = ``RecflowTrainerMixin`` + RecBole's trainer
class for the model. The mixin adds:

- Gradient accumulation (``training.grad_accumulation`` = k): every train batch is split
  into k micro-batches of ``ceil(train_batch_size / k)`` rows, each loss weighted by its
  share of the batch, one optimizer step per batch: the same effective batch and the same
  data order as k = 1 (k = 1 runs RecBole's own ``_train_epoch``).
- GPU out-of-memory (CUDA's ``torch.OutOfMemoryError``, MPS's "MPS backend out of memory"):
  an epoch that runs out of memory is rolled back (model, optimizer and RNG states from an
  in-memory CPU copy taken at the epoch's start) and retried with k doubled, down to
  ``training.min_micro_batch`` rows; an evaluation that runs out of memory is retried with
  half the eval batch. Each step-down is logged to ``recflow.training`` and recorded in
  ``oom_retries``.
- Mixed precision with our dtype (``amp_dtype``), gradient clipping, an all-position loss
  (``objective_loss``), valid metrics into TensorBoard, per-epoch train seconds.
- Checkpoints: ``best.pth`` written atomically; ``save_latest`` / ``restore_latest`` for
  crash resume (every RNG state, the train loader's shuffle generator included).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from core.errors import TrainingError
from core.modeling import recbole_adapter as rb
from core.modeling.dataset import RecBoleData
from core.modeling.runtime import (
    free_memory,
    oom_kind,
    rng_state,
    set_rng_state,
    to_cpu,
)
from core.modeling.seq_objectives import target_share

log = logging.getLogger("recflow.training")


class RecflowTrainerMixin:
    """Mixed into whichever RecBole trainer class the model needs."""

    config: Any
    model: Any
    optimizer: Any
    device: Any
    cur_step: int
    best_valid_score: float
    saved_model_file: str
    train_loss_dict: dict[int, float]
    test_batch_size: int
    _epoch_seconds: dict[int, float]
    grad_accumulation: int
    min_micro_batch: int
    oom_retries: list[str]
    _micro_sizes_tried: list[int]
    amp_dtype: torch.dtype | None
    last_valid_result: dict[str, float] | None
    objective_loss: Callable[[Any], Any] | None

    # ------------------------------------------------------------------ training
    @property
    def micro_batch_size(self) -> int:
        return math.ceil(int(self.config["train_batch_size"]) / self.grad_accumulation)

    def _accumulation_supported(self) -> bool:
        # Only the plain Trainer's loop is re-implemented with accumulation; KG/MKR/... trainers
        # have their own _train_epoch.
        from recbole.trainer.trainer import Trainer

        for cls in type(self).__mro__[1:]:
            if cls is not RecflowTrainerMixin and "_train_epoch" in cls.__dict__:
                return cls.__dict__["_train_epoch"] is Trainer._train_epoch and bool(self.config["single_spec"])
        return False

    def _train_epoch(self, train_data: Any, epoch_idx: int, loss_func: Any = None, show_progress: bool = False) -> Any:
        start = time.perf_counter()
        # Cheap for these models: the state an out-of-memory retry of this epoch starts from.
        snapshot = {
            "model": to_cpu(self.model.state_dict()),
            "optimizer": to_cpu(self.optimizer.state_dict()),
            "rng": rng_state(train_data),
        }
        if not self._micro_sizes_tried:
            self._micro_sizes_tried.append(self.micro_batch_size)
        while True:
            kind = None
            try:
                loss = self._run_epoch(train_data, epoch_idx, loss_func, show_progress)
                break
            except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
                kind = oom_kind(exc)
                if kind is None:
                    raise
            # Outside the except block: the failed attempt's frames (and tensors) are gone.
            assert kind is not None
            self.optimizer.zero_grad(set_to_none=True)
            free_memory()
            self._step_down(epoch_idx, kind)
            self.model.load_state_dict(snapshot["model"])
            self.optimizer.load_state_dict(snapshot["optimizer"])
            set_rng_state(snapshot["rng"], train_data)
        self._epoch_seconds[epoch_idx] = time.perf_counter() - start
        return loss

    def _step_down(self, epoch_idx: int, kind: str) -> None:
        old = self.micro_batch_size
        factor = self.grad_accumulation * 2
        new = math.ceil(int(self.config["train_batch_size"]) / factor)
        tried = ", ".join(str(n) for n in self._micro_sizes_tried)
        if not self._accumulation_supported():
            raise TrainingError(
                f"{kind} in training epoch {epoch_idx} at batch {old}; gradient accumulation is not supported "
                f"for {type(self).__name__}: lower training.train_batch_size"
            )
        if new < self.min_micro_batch or new >= old:
            raise TrainingError(
                f"{kind} in training epoch {epoch_idx} at every micro-batch size tried ({tried}); the next, {new}, "
                f"is below training.min_micro_batch={self.min_micro_batch}: use a smaller model or a bigger GPU"
            )
        self.grad_accumulation = factor
        self._micro_sizes_tried.append(new)
        event = f"epoch {epoch_idx}: {kind} at micro-batch {old} -> {new} x{factor}"
        self.oom_retries.append(event)
        log.warning("%s (effective batch %s unchanged); retrying the epoch", event, self.config["train_batch_size"])

    def _run_epoch(self, train_data: Any, epoch_idx: int, loss_func: Any, show_progress: bool) -> Any:
        loss_func = loss_func or self.objective_loss
        if self.grad_accumulation == 1 and (self.amp_dtype is None or not self._accumulation_supported()):
            if self.amp_dtype is not None:
                log.warning("training.amp is not supported for %s: training in float32", type(self).__name__)
                self.amp_dtype = None
            return super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)  # type: ignore[misc]
        if not self._accumulation_supported():
            raise TrainingError(
                f"training.grad_accumulation={self.grad_accumulation} is not supported for {type(self).__name__}"
            )
        return self._accumulated_epoch(train_data, loss_func)

    def _accumulated_epoch(self, train_data: Any, loss_func: Any) -> Any:
        """RecBole's Trainer._train_epoch, each batch as micro-batches with one optimizer step.

        Also the loop for mixed precision (``training.amp``, any k): autocast with our dtype
        (RecBole's own loop autocasts to float16 only), a gradient scaler for float16 only.
        """
        from recbole.trainer import trainer as rbt

        self.model.train()
        loss_func = loss_func or self.model.calculate_loss
        micro = self.micro_batch_size
        total_loss: Any = None
        dtype = self.amp_dtype
        use_scaler = dtype is torch.float16 and self.device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        for interaction in train_data:
            interaction = interaction.to(self.device)
            self.optimizer.zero_grad()
            rows = len(interaction)
            for lo in range(0, rows, micro):
                part = interaction[lo : lo + micro]
                # The models' losses are batch means: weighting by the share of rows (of trained
                # positions, for windows) makes the summed gradient and the reported loss the whole batch's.
                share = target_share(part, interaction)
                weight = share if share is not None else len(part) / rows
                if dtype is not None:
                    with torch.autocast(device_type=self.device.type, dtype=dtype):
                        losses = loss_func(part)
                else:
                    with torch.autocast(device_type=self.device.type, enabled=self.enable_amp):  # type: ignore[attr-defined]
                        losses = loss_func(part)
                if isinstance(losses, tuple):
                    loss = sum(losses)
                    parts = tuple(per_loss.item() * weight for per_loss in losses)
                    total_loss = parts if total_loss is None else tuple(map(sum, zip(total_loss, parts)))
                else:
                    loss = losses
                    value = losses.item() * weight
                    total_loss = value if total_loss is None else total_loss + value
                self._check_nan(loss)  # type: ignore[attr-defined]
                scaler.scale(loss * weight).backward()
                del losses, loss, part
            if self.clip_grad_norm:  # type: ignore[attr-defined]
                if use_scaler:
                    scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
                rbt.clip_grad_norm_(self.model.parameters(), **self.clip_grad_norm)  # type: ignore[attr-defined]
            scaler.step(self.optimizer)
            scaler.update()
        return total_loss

    # ------------------------------------------------------------------ evaluation
    def _valid_epoch(self, valid_data: Any, show_progress: bool = False) -> Any:
        score, result = super()._valid_epoch(valid_data, show_progress=show_progress)  # type: ignore[misc]
        self.last_valid_result = dict(result) if result else None
        tensorboard = getattr(self, "tensorboard", None)
        if tensorboard is not None and result:
            epoch = max(self.train_loss_dict) if self.train_loss_dict else 0  # the epoch just trained
            for name, value in result.items():
                tensorboard.add_scalar(f"valid/{name}", float(value), epoch)
        return score, result

    def evaluate(self, eval_data: Any, load_best_model: bool = True, model_file: Any = None,
                 show_progress: bool = False) -> Any:
        while True:
            kind = None
            try:
                return super().evaluate(  # type: ignore[misc]
                    eval_data, load_best_model=load_best_model, model_file=model_file, show_progress=show_progress
                )
            except RuntimeError as exc:
                kind = oom_kind(exc)
                if kind is None:
                    raise
            assert kind is not None
            collector = getattr(self, "eval_collector", None)
            if collector is not None:  # drop the failed pass's partial batches
                for key in ("rec.topk", "rec.meanrank", "rec.score", "rec.items", "data.label"):
                    if key in collector.data_struct:
                        del collector.data_struct[key]
            free_memory()
            self._halve_eval_batch(eval_data, kind)

    def _halve_eval_batch(self, eval_data: Any, kind: str) -> None:
        config = eval_data.config
        old_rows, old_step = int(eval_data._batch_size), int(eval_data.step)
        saved = config["eval_batch_size"]
        config["eval_batch_size"] = max(old_rows // 2, 1)
        try:
            eval_data._init_batch_size_and_step()
        finally:
            config["eval_batch_size"] = saved
        if eval_data.step >= old_step:
            eval_data._init_batch_size_and_step()  # leave the loader as it was
            raise TrainingError(f"{kind} in evaluation at the smallest eval batch ({old_rows} rows)")
        # torch's DataLoader built its BatchSampler from the old step; it reads batch_size per iteration.
        sampler = getattr(eval_data, "batch_sampler", None)
        if sampler is not None and hasattr(sampler, "batch_size"):
            sampler.batch_size = eval_data.step
        self.test_batch_size = min(int(self.test_batch_size), int(eval_data._batch_size))
        event = f"evaluation: {kind} at eval batch {old_rows} -> {eval_data._batch_size}"
        self.oom_retries.append(event)
        log.warning("%s; retrying the evaluation", event)

    # ------------------------------------------------------------------ checkpoints
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
        atomic_save(state, target)

    def save_latest(self, target: Path, epoch: int, train_data: Any, extra: dict[str, Any]) -> None:
        """Everything needed to continue after ``epoch`` as if the process had not died."""
        scheduler = getattr(self, "scheduler", None)
        state = {
            "epoch": epoch,
            "cur_step": self.cur_step,
            "best_valid_score": self.best_valid_score,
            "best_valid_result": getattr(self, "best_valid_result", None),
            "state_dict": self.model.state_dict(),
            "other_parameter": self.model.other_parameter(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "grad_accumulation": self.grad_accumulation,
            "micro_sizes_tried": list(self._micro_sizes_tried),
            "oom_retries": list(self.oom_retries),
            "train_loss": dict(self.train_loss_dict),
            "rng": rng_state(train_data),
            **extra,
        }
        atomic_save(state, target)

    def restore_latest(self, state: dict[str, Any], train_data: Any) -> None:
        self.model.load_state_dict(state["state_dict"])
        self.model.load_other_parameter(state.get("other_parameter"))
        self.optimizer.load_state_dict(state["optimizer"])
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        self.start_epoch = int(state["epoch"]) + 1
        self.cur_step = state["cur_step"]
        self.best_valid_score = state["best_valid_score"]
        self.best_valid_result = state.get("best_valid_result")
        self.grad_accumulation = int(state["grad_accumulation"])
        self._micro_sizes_tried = list(state.get("micro_sizes_tried", []))
        self.oom_retries = list(state.get("oom_retries", []))
        self.train_loss_dict.update(state.get("train_loss", {}))
        set_rng_state(state["rng"], train_data)


def atomic_save(state: dict[str, Any], target: Path) -> None:
    """``torch.save`` to a temp file, then rename: a crash never leaves a truncated checkpoint."""
    tmp = target.with_suffix(".tmp")
    torch.save(state, tmp, pickle_protocol=4)
    os.replace(tmp, target)


def make_trainer(
    data: RecBoleData,
    model: torch.nn.Module,
    checkpoint: Path,
    *,
    grad_accumulation: int = 1,
    min_micro_batch: int = 8,
    amp_dtype: torch.dtype | None = None,
    clip_grad_norm: float | None = None,
    objective_loss: Callable[[Any], Any] | None = None,
) -> Any:
    """RecBole's trainer for ``data``'s model with ``RecflowTrainerMixin`` on top; TensorBoard logs go
    to ``<run_dir>/tensorboard`` (``checkpoint`` is ``<run_dir>/checkpoints/best.pth``)."""
    base = rb.trainer_class(data.config)
    cls = type(f"Recflow{base.__name__}", (RecflowTrainerMixin, base), {})
    with rb.tensorboard_dir(checkpoint.parent.parent / "tensorboard"):
        trainer = cls(data.config, model)
    trainer.saved_model_file = str(checkpoint)
    trainer._epoch_seconds = {}
    trainer.grad_accumulation = grad_accumulation
    trainer.min_micro_batch = min_micro_batch
    trainer.oom_retries = []
    trainer._micro_sizes_tried = []
    trainer.amp_dtype = amp_dtype
    trainer.last_valid_result = None
    trainer.objective_loss = objective_loss
    if clip_grad_norm is not None:
        trainer.clip_grad_norm = {"max_norm": float(clip_grad_norm)}
    return trainer
