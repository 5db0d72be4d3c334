"""recflow's one door to RecBole 1.2.1: version guards, config, models, trainers, checkpoints.

Importing this module imports RecBole and changes nothing in it. What it guards against:

- numpy 2 breaks ``Config`` and pandas 3 silently breaks its fillna: refuse to run on them.
- ``recbole.quick_start`` imports ray: never imported.
- ``Config`` overwrites ``CUDA_VISIBLE_DEVICES`` with its ``gpu_id``: we restore it, and pick
  the device ourselves.
- Importing the sequential models switches on ``torch.autograd.set_detect_anomaly(True)``
  (a ~2x slowdown): switched back off after every model import.
- Checkpoints pickle a ``Config``: torch >= 2.6 needs ``weights_only=False`` (our own files only).
- The trainer writes TensorBoard logs to ``./log_tensorboard`` in the working directory:
  ``tensorboard_dir`` routes them into the run folder while a trainer is built (and only then).
- ``Config`` parses ``sys.argv`` too: hidden from it while it is built.
- The dataset name ``ml-100k`` is hard-wired to the wheel's copy: our atomic files use another name.

The scale fast paths (vectorised replacements of RecBole methods) live in
``core.modeling.recbole_fast_paths`` and are installed by an explicit call, never on import.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from core.errors import ConfigError, ModelNotFoundError


def _check_stack() -> None:
    if int(np.__version__.split(".")[0]) >= 2:
        raise ConfigError(f"RecBole 1.2.1 needs numpy<2 (found {np.__version__}); reinstall recflow")
    if int(pd.__version__.split(".")[0]) >= 3:
        raise ConfigError(f"RecBole 1.2.1 needs pandas<3 (found {pd.__version__}); reinstall recflow")


_check_stack()

import recbole
import recbole.trainer.trainer as _recbole_trainer_module
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.utils import get_model, get_trainer

# RecBole 1.2.1 uses pandas chained-assignment fillna; pandas 2.x warns on every dataset build.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\.")

RECBOLE_DIR = Path(recbole.__file__).parent
# Our atomic files never use the name "ml-100k": RecBole would swap in the wheel's copy.
DATASET_NAME = "interactions"

__all__ = [
    "DATASET_NAME",
    "RECBOLE_DIR",
    "Config",
    "available_models",
    "canonical_model_name",
    "create_dataset",
    "data_preparation",
    "load_checkpoint",
    "make_config",
    "resolve_model",
    "tensorboard_dir",
    "trainer_class",
]


@lru_cache(maxsize=1)
def available_models() -> dict[str, str]:
    """Lower-case name -> RecBole class name, from the model YAMLs the wheel ships."""
    names = [p.stem for p in (RECBOLE_DIR / "properties" / "model").glob("*.yaml")]
    return {n.lower(): n for n in names}


def resolve_model(name: str) -> type[torch.nn.Module]:
    """Return the RecBole model class for ``name`` (case-insensitive), anomaly detection off."""
    models = available_models()
    canonical = models.get(name.lower())
    if canonical is None:
        close = difflib.get_close_matches(name.lower(), list(models), n=3)
        hint = f"; did you mean {', '.join(models[c] for c in close)}?" if close else ""
        raise ModelNotFoundError(f"unknown model '{name}' (not a RecBole 1.2.1 model){hint}")
    try:
        cls = get_model(canonical)
    finally:
        torch.autograd.set_detect_anomaly(False)
    return cls


def canonical_model_name(name: str) -> str:
    resolve_model(name)
    return available_models()[name.lower()]


def make_config(model: str, config_dict: dict[str, Any], device: torch.device) -> Config:
    """Build a RecBole ``Config`` without its side effects on the environment."""
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    argv = sys.argv
    # Config also parses sys.argv ("--epochs=3" would override config_dict): hide ours.
    sys.argv = argv[:1]
    try:
        with _quiet_recbole():
            config = Config(model=canonical_model_name(model), dataset=DATASET_NAME, config_dict=config_dict)
    finally:
        sys.argv = argv
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
        torch.autograd.set_detect_anomaly(False)
    config["device"] = device
    config["use_gpu"] = device.type == "cuda"
    return config


def trainer_class(config: Config) -> type:
    """RecBole's trainer class for the config's model (its type and name decide)."""
    return get_trainer(config["MODEL_TYPE"], config["model"])


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load one of *our* checkpoints (they pickle a RecBole Config, hence weights_only=False)."""
    return torch.load(path, map_location=device, weights_only=False)


@contextlib.contextmanager
def tensorboard_dir(path: Path) -> Iterator[None]:
    """While the block runs, a RecBole trainer built in it writes TensorBoard logs into ``path``.

    RecBole's ``Trainer.__init__`` calls ``recbole.trainer.trainer.get_tensorboard`` (which
    writes to ``./log_tensorboard``); it is swapped for the block only and put back after.
    """

    def get_tensorboard(_logger: logging.Logger) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        path.mkdir(parents=True, exist_ok=True)
        return SummaryWriter(str(path))

    original = _recbole_trainer_module.get_tensorboard
    _recbole_trainer_module.get_tensorboard = get_tensorboard
    try:
        yield
    finally:
        _recbole_trainer_module.get_tensorboard = original


@contextlib.contextmanager
def _quiet_recbole() -> Iterator[None]:
    # RecBole logs its whole config at INFO through the root logger; keep it off the console.
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)
