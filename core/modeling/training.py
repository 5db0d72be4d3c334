"""train: any RecBole model by name, with recflow's additions on top of RecBole's trainer.

Additions: the best checkpoint is written atomically into the run folder, TensorBoard
goes into the run folder, each epoch reports loss/time/valid score to a callback (the
Prefect task logs it), and anomaly detection stays off.

Resilience:

- Gradient accumulation (``training.grad_accumulation`` = k): every train batch is split
  into k micro-batches of ``ceil(train_batch_size / k)`` rows, each loss weighted by its
  share of the batch, one optimizer step per batch: the same effective batch and the same
  data order as k = 1 (k = 1 runs RecBole's own ``_train_epoch``).
- GPU out-of-memory (CUDA's ``torch.OutOfMemoryError``, MPS's "MPS backend out of memory"):
  an epoch that runs out of memory is rolled back (model, optimizer and RNG states from an
  in-memory CPU copy taken at the epoch's start) and retried with k doubled, down to
  ``training.min_micro_batch`` rows; an evaluation that runs out of memory is retried with
  half the eval batch. Each step-down is logged to ``recflow.training`` and recorded in
  ``TrainedModel.oom_retries``.
- Crash resume: after every evaluated epoch ``checkpoints/latest.pth`` is written atomically
  (model, optimizer, epoch, early-stopping state, k, the epoch stats and every RNG state,
  the train loader's shuffle generator included). ``train`` on a run folder that holds one
  (an attempt died) continues after its epoch, as the uninterrupted run would have; a
  finished ``train`` deletes it.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.modeling import recbole_compat as rb
from core.modeling import tracking
from core.config import PipelineConfig
from core.modeling.dataset import RecBoleData, load_recbole_data
from core.errors import TrainingError
from core.records import DatasetSplits, EpochStats, TrainedModel
from core.modeling.seq_objectives import AllPositionLoss, all_position_kind, target_share

BEST_CHECKPOINT = "best.pth"
LATEST_CHECKPOINT = "latest.pth"
EpochCallback = Callable[[EpochStats], None]
log = logging.getLogger("recflow.training")


def oom_kind(exc: BaseException) -> str | None:
    """'CUDA OOM' / 'MPS OOM' when ``exc`` is a GPU out-of-memory error, else None."""
    if isinstance(exc, torch.OutOfMemoryError):
        return "CUDA OOM"
    if isinstance(exc, RuntimeError) and "MPS backend out of memory" in str(exc):
        return "MPS OOM"
    return None


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()


def _to_cpu(obj: Any) -> Any:
    """A deep copy of ``obj`` with every tensor cloned onto the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def rng_state(train_data: Any = None) -> dict[str, Any]:
    """Every RNG training draws from: torch (CPU, CUDA), numpy, random, the train loader's shuffle generator."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "random": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    generator = getattr(train_data, "generator", None)
    state["loader"] = generator.get_state() if isinstance(generator, torch.Generator) else None
    return state


def set_rng_state(state: dict[str, Any], train_data: Any = None) -> None:
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    generator = getattr(train_data, "generator", None)
    if state.get("loader") is not None and isinstance(generator, torch.Generator):
        generator.set_state(state["loader"].cpu())


class _RecflowTrainerMixin:
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
            if cls is not _RecflowTrainerMixin and "_train_epoch" in cls.__dict__:
                return cls.__dict__["_train_epoch"] is Trainer._train_epoch and bool(self.config["single_spec"])
        return False

    def _train_epoch(self, train_data: Any, epoch_idx: int, loss_func: Any = None, show_progress: bool = False) -> Any:
        start = time.perf_counter()
        # Cheap for these models: the state an out-of-memory retry of this epoch starts from.
        snapshot = {
            "model": _to_cpu(self.model.state_dict()),
            "optimizer": _to_cpu(self.optimizer.state_dict()),
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
            _free_memory()
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
            _free_memory()
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
        _atomic_save(state, target)

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
        _atomic_save(state, target)

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


def _atomic_save(state: dict[str, Any], target: Path) -> None:
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
    base = rb.trainer_class(data.config)
    cls = type(f"Recflow{base.__name__}", (_RecflowTrainerMixin, base), {})
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
    model = build_model(data)
    state = rb.load_checkpoint(checkpoint, data.config["device"])
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


def train(
    config: PipelineConfig,
    splits: DatasetSplits,
    run_dir: Path,
    on_epoch: EpochCallback | None = None,
) -> TrainedModel:
    """Train ``config.model`` on ``splits``; resumes from ``run_dir/checkpoints/latest.pth`` if an attempt died.

    ``on_epoch`` sees only epochs trained by this call; the returned ``epochs`` holds all of them.
    """
    if config.training.threads:
        torch.set_num_threads(config.training.threads)
    checkpoint_dir = run_dir / "checkpoints"
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = checkpoint_dir / BEST_CHECKPOINT
    latest = checkpoint_dir / LATEST_CHECKPOINT
    data = load_recbole_data(config, splits, checkpoint_dir)
    from recbole.utils import init_seed

    init_seed(data.config["seed"], data.config["reproducibility"])
    # The loaders are cached per process: restart the shuffle order as a fresh loader would.
    generator = getattr(data.train, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(data.config["seed"])
    device = data.config["device"]
    set_tf32(config.training.tf32, device)
    model = build_model(data)
    if config.training.fast_cpu_dropout and device.type == "cpu":
        use_fast_cpu_dropout(model)
    if config.training.compile:
        compile_model(model)
    loader, objective_loss = train_loader(config, data, model)
    trainer = make_trainer(
        data,
        model,
        checkpoint,
        grad_accumulation=config.training.grad_accumulation,
        min_micro_batch=config.training.min_micro_batch,
        amp_dtype=amp_dtype_for(config.training.amp, device),
        clip_grad_norm=config.training.clip_grad_norm,
        objective_loss=objective_loss,
    )
    epochs: list[EpochStats] = []
    fingerprint = _resume_fingerprint(config)
    resumed_from: int | None = None
    finished = False
    if latest.is_file():
        state = rb.load_checkpoint(latest, data.config["device"])
        if state.get("fingerprint") != fingerprint or not checkpoint.is_file():
            log.warning("ignoring %s: written by a run with another configuration; training from scratch", latest)
        else:
            trainer.restore_latest(state, loader)
            epochs = [EpochStats.model_validate(e) for e in state["epochs"]]
            resumed_from = int(state["epoch"])
            finished = bool(state.get("stopped")) or trainer.start_epoch >= trainer.epochs
            log.warning(
                "resuming from epoch %d: epochs 0-%d restored from %s (0-based epoch numbers)",
                trainer.start_epoch,
                resumed_from,
                latest,
            )
    from core.modeling import batch_finder  # here: it imports this module

    auto_batch = batch_finder.prepare_train_batch(
        config.training, data, model, trainer, prior=state.get("auto_batch") if resumed_from is not None else None,
        loader=loader, loss_fn=objective_loss,
    )
    budget_s = config.training.max_minutes * 60 if config.training.max_minutes else None
    stop_reason = ["epoch cap"]
    last_valid = [time.perf_counter()]

    def callback(epoch_idx: int, valid_score: float) -> None:
        # RecBole sums batch losses; report the mean so epochs of any batch size compare.
        loss = trainer.train_loss_dict.get(epoch_idx, float("nan")) / max(len(loader), 1)
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
        tracker.epoch(
            stats,
            lr=float(trainer.optimizer.param_groups[0]["lr"]),
            grad_accumulation=trainer.grad_accumulation,
            valid_result=trainer.last_valid_result,
        )
        recbole_stop = trainer.cur_step > trainer.stopping_step  # RecBole ends fit() itself
        early_stop = recbole_stop or plateaued(
            [e.valid_score for e in epochs if e.valid_score is not None],
            patience=config.training.early_stopping_patience,
            min_gain=config.training.early_stopping_min_gain,
            bigger=bool(data.config["valid_metric_bigger"]),
        )
        spent = sum(e.train_seconds + (e.valid_seconds or 0.0) for e in epochs)
        over_budget = budget_s is not None and spent >= budget_s and not early_stop
        # Written before anyone hears of the epoch: a crash from here on resumes after it.
        trainer.save_latest(
            latest,
            epoch_idx,
            loader,
            {
                "fingerprint": fingerprint,
                "epochs": [e.model_dump() for e in epochs],
                "stopped": early_stop or over_budget,
                "stop_reason": "early stopping" if early_stop else "time budget" if over_budget else None,
                "auto_batch": auto_batch.model_dump(mode="json") if auto_batch is not None else None,
            },
        )
        if on_epoch is not None:
            on_epoch(stats)
        if early_stop:
            stop_reason[0] = "early stopping"
            if not recbole_stop:
                log.info("valid %s gained < %g of its best in %d epochs: stopping", config.evaluation.valid_metric,
                         config.training.early_stopping_min_gain, config.training.early_stopping_patience + 1)
                raise _StopTraining
        elif over_budget:
            stop_reason[0] = "time budget"
            log.warning("training.max_minutes=%g reached after epoch %d: keeping the best epoch",
                        config.training.max_minutes, epoch_idx)
            raise _StopTraining

    track = config.tracking
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
    start = time.perf_counter()
    failed = True
    try:
        if finished:  # the attempt that died had trained every epoch
            best_score = trainer.best_valid_score
            stop_reason[0] = state.get("stop_reason") or "epoch cap"
        else:
            try:
                best_score, _ = trainer.fit(loader, data.valid, verbose=False, saved=True, callback_fn=callback)
            except _StopTraining:
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
            epochs,
            summary={f"best_valid/{k}": float(v) for k, v in best_result.items()},
            failed=failed,
        )
    if not checkpoint.exists():
        raise TrainingError("training finished without saving a checkpoint (no validation epoch ran)")
    latest.unlink(missing_ok=True)  # this attempt finished: nothing to resume
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
        micro_batch_size=trainer.micro_batch_size,
        grad_accumulation=trainer.grad_accumulation,
        oom_retries=list(trainer.oom_retries),
        resumed_from_epoch=resumed_from,
        warning_signs=tracking.warning_signs(
            # The signs read "higher valid score is better": flip RMSE/MAE (rating task) so they hold.
            epochs if data.config["valid_metric_bigger"] else
            [e.model_copy(update={"valid_score": -e.valid_score if e.valid_score is not None else None}) for e in epochs],
            gpu_peak_fraction=tracker.gpu_peak_fraction, model_name=str(data.config["model"]), kl=None
        ),
        gpu_peak_fraction=tracker.gpu_peak_fraction,
        amp=config.training.amp if trainer.amp_dtype is not None else "off",
        auto_batch=auto_batch,
        objective="all_positions" if objective_loss is not None else "last_item",
        loss=config.training.loss if objective_loss is not None else None,
        stop_reason=stop_reason[0],
        train_rows=loader.sample_size if hasattr(loader, "sample_size") else None,
    )


# BERT4Rec on all positions: windows masked at the newest item only (what evaluation asks).
BERT4REC_LAST_ONLY = 0.2


class _StopTraining(Exception):
    """Raised from the epoch callback to end ``fit``: a plateau RecBole's rule misses, or the time budget."""


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
    stride = min(t.window_stride or max(max_len // 2, 1), max_len)
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
