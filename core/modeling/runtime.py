"""Memory and RNG helpers shared by training, the trainer mixin and the batch finder.

No RecBole here, and nothing from the rest of ``core.modeling``: both the trainer and the
batch finder import these, so neither has to import the other.
"""

from __future__ import annotations

import copy
import gc
import random
from typing import Any

import numpy as np
import torch


def oom_kind(exc: BaseException) -> str | None:
    """'CUDA OOM' / 'MPS OOM' when ``exc`` is a GPU out-of-memory error, else None."""
    if isinstance(exc, torch.OutOfMemoryError):
        return "CUDA OOM"
    if isinstance(exc, RuntimeError) and "MPS backend out of memory" in str(exc):
        return "MPS OOM"
    return None


def free_memory() -> None:
    """Collect garbage and hand cached device memory back (after an out-of-memory error or a probe)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()


def to_cpu(obj: Any) -> Any:
    """A deep copy of ``obj`` with every tensor cloned onto the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
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
    """Put back what ``rng_state`` recorded (the loader's generator when ``train_data`` has one)."""
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    generator = getattr(train_data, "generator", None)
    if state.get("loader") is not None and isinstance(generator, torch.Generator):
        generator.set_state(state["loader"].cpu())
