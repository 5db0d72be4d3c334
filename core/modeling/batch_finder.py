"""Batch finder: ``training.train_batch_size: auto``.

Instead of per-card tables, the largest train batch that fits *this* device is measured:

1. ``search_batch`` (pure logic, testable anywhere): starting at ``START_BATCH`` rows, double
   while a probe fits, until a probe fails (out of memory, or its peak memory is above the
   budget) or the cap (training rows, ``training.auto_batch_max``) is reached; then binary-search
   between the last batch that fit and the first that failed. A failing start halves down
   to ``training.min_micro_batch`` first.
2. A probe (``make_fits``) is one real training step of the actual model on a real train batch
   of that many rows: forward, loss, backward, optimizer step (so Adam's moments count), with
   the run's autocast dtype. It returns the step's peak device memory, read by a
   ``MemoryReader``: CUDA's ``max_memory_allocated``, MPS's allocated memory sampled after
   forward/backward/step. Tests pass their own reader to run the real step on CPU.
3. The budget is ``(1 - training.auto_batch_headroom)`` x the memory this process can have
   (CUDA: free + what torch already holds, so other processes' use is left out). The headroom
   covers what a probe does not see: allocator fragmentation, evaluation, longer sequences.
4. Probing leaves no trace (``_probing_state``): model weights and buffers, every RNG (torch,
   CUDA, numpy, random, the loader's shuffle generator) are restored exactly, the probe's
   optimizer is dropped and the device cache emptied. A run with ``auto`` that found B trains
   exactly as a run configured with B.

CPU has no memory limit worth probing (it swaps or is OOM-killed rather than raising), so on
CPU ``auto`` means ``TrainingConfig.AUTO_BATCH_DEFAULT`` (1024, the configured default), capped at
the training rows. Trainers with their own epoch loop (KG, MKR, RecVAE, NCL, ...) and models
that do not train by gradient steps (``TRADITIONAL``: ItemKNN, EASE, ...) get the default too.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import torch

from core.config import TrainingConfig
from core.errors import TrainingError
from core.modeling import recbole_adapter as rb
from core.modeling.runtime import (
    free_memory,
    oom_kind,
    rng_state,
    set_rng_state,
    to_cpu,
)
from core.records import AutoBatch, BatchProbe

START_BATCH = 64
# Models that read train_batch_size when they are built: a probe of the built model would not
# match the model built for another batch.
_BATCH_IN_MODEL = frozenset({"DGCF", "FEARec"})
log = logging.getLogger("recflow.training")

# fits(batch) -> the step's peak bytes; raises the device's out-of-memory error when it does not fit.
FitsFn = Callable[[int], int]


# --------------------------------------------------------------------------- the search
def search_batch(
    fits: FitsFn,
    *,
    budget_bytes: int | None,
    cap: int,
    start: int = START_BATCH,
    floor: int = 1,
) -> tuple[int, list[BatchProbe]]:
    """The largest batch in ``[floor, cap]`` that ``fits`` within ``budget_bytes``, and every probe tried.

    Assumes memory grows with the batch (so "fits" is monotone). Raises ``TrainingError`` when
    not even ``floor`` fits; errors other than out-of-memory propagate.
    """
    if cap < 1:
        raise TrainingError("train_batch_size=auto: there are no training rows to size a batch for")
    floor = max(1, min(floor, cap))
    probes: list[BatchProbe] = []

    def ok(batch: int) -> bool:
        kind = None
        try:
            peak = int(fits(batch))
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
            kind = oom_kind(exc)
            if kind is None:
                raise
        if kind is not None:
            # Outside the except block: the failed step's frames (and tensors) are gone.
            free_memory()
            probes.append(BatchProbe(batch=batch, outcome="oom"))
            return False
        over = budget_bytes is not None and peak > budget_bytes
        probes.append(BatchProbe(batch=batch, outcome="over budget" if over else "fits", peak_bytes=peak))
        return not over

    batch = max(floor, min(start, cap))
    last_fit: int | None = None
    first_fail: int | None = None
    while True:  # double up
        if not ok(batch):
            first_fail = batch
            break
        last_fit = batch
        if batch >= cap:
            break
        batch = min(batch * 2, cap)
    while last_fit is None:  # the start did not fit: halve down
        assert first_fail is not None
        batch = first_fail // 2
        if batch < floor:
            tried = ", ".join(f"{p.batch} ({p.outcome})" for p in probes)
            raise TrainingError(
                f"train_batch_size=auto: not even a batch of {floor} rows fits in memory (tried {tried}); "
                "use a smaller model, a lower training.auto_batch_headroom, or a bigger GPU"
            )
        if ok(batch):
            last_fit = batch
        else:
            first_fail = batch
    if first_fail is not None:  # binary search between the last fit and the first failure
        lo, hi = last_fit, first_fail
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(mid):
                lo = mid
            else:
                hi = mid
        last_fit = lo
    return last_fit, probes


# --------------------------------------------------------------------------- device memory
class MemoryReader(Protocol):
    """How a probe measures memory on one device."""

    def available_bytes(self) -> int:
        """Memory this process may use in all (what it holds now included)."""

    def reset(self) -> None:
        """Start measuring one step's peak."""

    def sample(self) -> None:
        """Called after forward, backward and the optimizer step (for devices without a peak counter)."""

    def peak_bytes(self) -> int:
        """The peak since ``reset``."""


class CudaMemory:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def available_bytes(self) -> int:
        free, _total = torch.cuda.mem_get_info(self.device)
        return int(free + torch.cuda.memory_reserved(self.device))

    def reset(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def sample(self) -> None:
        pass  # CUDA keeps its own peak counter

    def peak_bytes(self) -> int:
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device))


class MpsMemory:
    """MPS has no peak counter: the largest allocation seen after forward, backward and step."""

    def __init__(self) -> None:
        self._peak = 0

    def available_bytes(self) -> int:
        recommended = getattr(torch.mps, "recommended_max_memory", None)
        if recommended is None:
            raise TrainingError("train_batch_size=auto on MPS needs torch >= 2.5 (torch.mps.recommended_max_memory)")
        return int(recommended())

    def reset(self) -> None:
        torch.mps.synchronize()
        self._peak = int(torch.mps.current_allocated_memory())

    def sample(self) -> None:
        torch.mps.synchronize()
        self._peak = max(self._peak, int(torch.mps.current_allocated_memory()))

    def peak_bytes(self) -> int:
        return self._peak


def memory_reader_for(device: torch.device) -> MemoryReader | None:
    """The reader for ``device``; None on CPU (nothing to probe)."""
    if device.type == "cuda":
        return CudaMemory(device)
    if device.type == "mps":
        return MpsMemory()
    return None


# --------------------------------------------------------------------------- the real probe
def probe_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    memory: MemoryReader,
    loss_fn: Callable[[Any], Any] | None = None,
) -> int:
    """One training step as the trainer takes it (``loss_fn``: the trainer's loss, default the model's);
    returns its peak memory (bytes)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    memory.reset()
    batch = batch.to(device)
    autocast = (
        torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    )
    with autocast:
        losses = (loss_fn or model.calculate_loss)(batch)  # type: ignore[operator]
    loss = sum(losses) if isinstance(losses, tuple) else losses
    memory.sample()
    loss.backward()  # type: ignore[union-attr]
    memory.sample()
    optimizer.step()
    memory.sample()
    peak = memory.peak_bytes()
    del losses, loss, batch
    optimizer.zero_grad(set_to_none=True)
    return peak


def _loader_times(loader: Any) -> int:
    """Rows per sampled row: RecBole's train loaders emit ``times`` rows per index with negative sampling."""
    args = getattr(loader, "neg_sample_args", None) or {}
    return int(getattr(loader, "times", 1)) if args.get("distribution", "none") != "none" else 1


def training_rows(loader: Any) -> int:
    """Rows one epoch trains on, in ``train_batch_size`` units."""
    return int(loader.sample_size) * _loader_times(loader)


def make_fits(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Any,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    memory: MemoryReader,
    seed: int = 0,
    loss_fn: Callable[[Any], Any] | None = None,
) -> FitsFn:
    """``fits(batch)``: one ``probe_step`` on a real train batch of ``batch`` rows.

    The batch is built as RecBole's loader builds it (``collate_fn``: transform, negative
    sampling), from random rows drawn with a private generator.
    """
    times = _loader_times(loader)
    generator = torch.Generator().manual_seed(seed)

    def fits(batch: int) -> int:
        # RecBole's own mapping (TrainDataLoader._init_batch_size_and_step): batch // times indices.
        n = max(batch // times, 1)
        index = torch.randperm(loader.sample_size, generator=generator)[:n].numpy()
        interaction = loader.collate_fn(np.sort(index))
        try:
            return probe_step(
                model, optimizer, interaction, device=device, amp_dtype=amp_dtype, memory=memory, loss_fn=loss_fn
            )
        finally:
            optimizer.zero_grad(set_to_none=True)
            del interaction

    return fits


@contextlib.contextmanager
def _probing_state(model: torch.nn.Module, loader: Any) -> Iterator[None]:
    """Restore the model's weights/buffers, its train/eval mode and every RNG after probing."""
    weights = to_cpu(model.state_dict())
    rng = rng_state(loader)
    was_training = model.training
    try:
        yield
    finally:
        model.load_state_dict(weights)
        for p in model.parameters():
            p.grad = None
        model.train(was_training)
        set_rng_state(rng, loader)
        free_memory()


# --------------------------------------------------------------------------- the entry point
def _plain_trainer(recbole_config: Any) -> bool:
    """Whether the model trains in RecBole's plain ``Trainer._train_epoch`` loop (what a probe step mirrors)."""
    from recbole.trainer.trainer import Trainer
    from recbole.utils import ModelType

    if recbole_config["MODEL_TYPE"] == ModelType.TRADITIONAL:
        return False
    for cls in rb.trainer_class(recbole_config).__mro__:
        if "_train_epoch" in cls.__dict__:
            return cls.__dict__["_train_epoch"] is Trainer._train_epoch
    return False


def find_train_batch(
    training: TrainingConfig,
    model: torch.nn.Module,
    loader: Any,
    recbole_config: Any,
    *,
    optimizer_factory: Callable[[], torch.optim.Optimizer],
    amp_dtype: torch.dtype | None,
    memory: MemoryReader | None = None,
    loss_fn: Callable[[Any], Any] | None = None,
    default_batch: int | None = None,
) -> AutoBatch:
    """Resolve ``train_batch_size: auto`` for ``model`` on ``loader``'s data; logs the choice.

    ``memory`` defaults to ``memory_reader_for(device)``; None there means the CPU default.
    """
    device = torch.device(recbole_config["device"])
    memory = memory if memory is not None else memory_reader_for(device)
    cap = training_rows(loader)
    if training.auto_batch_max is not None:
        cap = min(cap, training.auto_batch_max)
    wanted = default_batch or training.AUTO_BATCH_DEFAULT
    default = min(wanted, cap)
    if memory is None:
        choice = AutoBatch(
            batch=default,
            method="default",
            device=device.type,
            reason=f"{device.type} has no memory limit to probe: the default {wanted}"
            + (f", capped at {cap}" if default < wanted else ""),
        )
    elif str(recbole_config["model"]) in _BATCH_IN_MODEL:
        choice = AutoBatch(
            batch=default,
            method="default",
            device=device.type,
            reason=f"{recbole_config['model']} sizes itself by train_batch_size when built: the default "
            f"{wanted}",
        )
    elif not _plain_trainer(recbole_config):
        choice = AutoBatch(
            batch=default,
            method="default",
            device=device.type,
            reason=f"{recbole_config['model']} does not train in RecBole's plain loop, so a probe step would not "
            f"match its training: the default {wanted}",
        )
    else:
        budget = int((1.0 - training.auto_batch_headroom) * memory.available_bytes())
        with _probing_state(model, loader):
            optimizer = optimizer_factory()
            try:
                fits = make_fits(
                    model, optimizer, loader, device=device, amp_dtype=amp_dtype, memory=memory, loss_fn=loss_fn
                )
                batch, probes = search_batch(fits, budget_bytes=budget, cap=cap, floor=training.min_micro_batch)
            finally:
                optimizer.zero_grad(set_to_none=True)
                optimizer.state.clear()  # Adam's moments: the probe's, not the run's
                del optimizer
        reached = "all training rows" if batch == training_rows(loader) else (
            "training.auto_batch_max" if batch == cap else f"{training.auto_batch_headroom:.0%} headroom")
        choice = AutoBatch(
            batch=batch,
            method="probed",
            device=device.type,
            budget_bytes=budget,
            probes=probes,
            reason=f"largest batch within {reached} after {len(probes)} probe steps",
        )
    log.warning("train_batch_size=auto -> %d (%s)%s", choice.batch, choice.reason, describe_probes(choice))
    return choice


def describe_probes(choice: AutoBatch) -> str:
    """``; probes: 64 fits 1.2 GiB, 128 oom, ...`` (empty when nothing was probed)."""
    if not choice.probes:
        return ""
    parts = []
    for p in choice.probes:
        size = f" {p.peak_bytes / 2**30:.2f} GiB" if p.peak_bytes is not None else ""
        parts.append(f"{p.batch} {p.outcome}{size}")
    budget = f" (budget {choice.budget_bytes / 2**30:.2f} GiB)" if choice.budget_bytes is not None else ""
    return "; probes: " + ", ".join(parts) + budget


def apply_train_batch(recbole_config: Any, loader: Any, batch: int) -> None:
    """Make ``loader`` (and the trainer, which reads ``recbole_config``) train at ``batch`` rows."""
    recbole_config["train_batch_size"] = batch
    loader._init_batch_size_and_step()
    # torch's DataLoader built its BatchSampler with the old step; it reads batch_size per iteration.
    sampler = getattr(loader, "batch_sampler", None)
    if sampler is not None and hasattr(sampler, "batch_size"):
        sampler.batch_size = loader.step


def prepare_train_batch(
    training: TrainingConfig,
    data: Any,
    model: torch.nn.Module,
    trainer: Any,
    *,
    prior: dict[str, Any] | None,
    loader: Any = None,
    loss_fn: Callable[[Any], Any] | None = None,
) -> AutoBatch | None:
    """Set the batch ``train`` trains with; for ``auto`` find it first (or reuse ``prior``, the choice
    a crashed attempt recorded in latest.pth: its saved state was trained at that batch).

    ``loader``/``loss_fn``: what training reads batches from and scores them with (the
    all-position window loader and its loss; default RecBole's train loader and the model's loss).
    Every call sets its batch: the caller's loaders may have trained at another batch before
    (an ``auto`` choice of an earlier attempt on the same data).
    """
    loader = loader if loader is not None else data.train
    default = training.default_batch(windows=loss_fn is not None)
    if training.train_batch_size != "auto":
        apply_train_batch(data.config, loader, training.train_batch_size or default)
        return None
    if prior is not None:
        choice = AutoBatch.model_validate(prior)
        choice = choice.model_copy(update={"method": "resumed", "reason": f"the crashed attempt's ({choice.reason})"})
        log.warning("train_batch_size=auto -> %d (%s)", choice.batch, choice.reason)
    else:
        choice = find_train_batch(
            training,
            model,
            loader,
            data.config,
            optimizer_factory=lambda: trainer._build_optimizer(params=model.parameters()),
            amp_dtype=trainer.amp_dtype,
            loss_fn=loss_fn,
            default_batch=default,
        )
    apply_train_batch(data.config, loader, choice.batch)
    return choice
