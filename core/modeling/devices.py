"""Device choice: auto picks CUDA, then Apple MPS, then CPU."""

from __future__ import annotations

import torch

from core.errors import ConfigError

# glibc's default malloc thresholds make torch's CPU training return and re-fault memory every
# step; raising them cut a SASRec epoch ~20% here. They only act when set before the process
# starts: the CLI re-executes itself with them, and deployments set them in the job's env.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=4294967295"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device is 'cuda' but this torch build sees no CUDA GPU (try --device auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("training.device is 'mps' but Apple MPS is not available here (try --device auto)")
    return torch.device(name)
