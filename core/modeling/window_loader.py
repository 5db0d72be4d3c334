"""The train loader of all-position training: shuffled batches of windows as RecBole Interactions.

It stands in for RecBole's train loader inside RecBole's trainer (``fit``, early stopping,
evaluation and checkpoints stay RecBole's), so it offers what the trainer, the batch
finder and crash resume read from one: ``dataset``, ``generator``, ``sample_size``,
``collate_fn``, ``_init_batch_size_and_step`` and ``len``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from core.modeling.seq_objectives import INPUTS, LENGTHS, TARGETS, mask_items
from core.modeling.sequence_windows import Windows, cut_windows, item_windows, sequences_from_train_rows

log = logging.getLogger("recflow.training")


def windows_from_train_split(train_dataset: Any, max_len: int, stride: int, *, masked: bool) -> Windows:
    """Windows cut from RecBole's (augmented) train split.

    Args:
        train_dataset: RecBole's train dataset (one row per prefix).
        max_len: the model's ``MAX_ITEM_LIST_LENGTH``.
        stride: see ``cut_windows``.
        masked: BERT4Rec-style models read whole windows of items (newest included) instead
            of inputs with next-item targets.

    Returns:
        The windows to train on.
    """
    feat = train_dataset.inter_feat
    uid, iid = train_dataset.uid_field, train_dataset.iid_field
    seqs = sequences_from_train_rows(
        feat[uid].numpy(), feat[train_dataset.item_id_list_field][:, 0].numpy(), feat[iid].numpy()
    )
    if not masked:
        return cut_windows(seqs, max_len, stride)
    items = item_windows(seqs, max_len, stride)
    return Windows(items, np.zeros_like(items), (items > 0).sum(1))


class WindowLoader:
    """Batches of ``train_batch_size`` windows, reshuffled every epoch by ``generator``."""

    def __init__(self, config: Any, train_dataset: Any, windows: Windows, seed: int,
                 mask: tuple[float, int, float] | None = None) -> None:
        from recbole.data.interaction import Interaction

        self._interaction = Interaction
        self.config = config
        self.dataset = train_dataset
        self.windows = windows
        self.shuffle = True
        self.neg_sample_args = {"distribution": "none"}
        self.generator = torch.Generator().manual_seed(seed)
        self.mask = mask  # (mask_ratio, mask token, share of windows masked at the newest item only): BERT4Rec
        self._tensors = (
            torch.from_numpy(windows.inputs),
            torch.from_numpy(windows.targets),
            torch.from_numpy(windows.lengths),
        )
        self._init_batch_size_and_step()

    @classmethod
    def build(cls, config: Any, train_dataset: Any, stride: int, *, seed: int,
              mask: tuple[float, int, float] | None = None) -> WindowLoader:
        masked = mask is not None
        start = time.perf_counter()
        windows = windows_from_train_split(train_dataset, int(config["MAX_ITEM_LIST_LENGTH"]), stride, masked=masked)
        if len(windows) == 0:
            raise ValueError("no training windows: every user has a single training item")
        log.info(
            "all-position training: %d windows of <= %d items, %d targets (stride %d), built in %.2f s",
            len(windows), windows.inputs.shape[1], windows.trained_targets, stride, time.perf_counter() - start,
        )
        return cls(config, train_dataset, windows, seed, mask)

    @property
    def sample_size(self) -> int:
        return len(self.windows)

    def _init_batch_size_and_step(self) -> None:
        self.step = max(1, min(int(self.config["train_batch_size"]), self.sample_size))

    def __len__(self) -> int:
        return -(-self.sample_size // self.step)

    def collate_fn(self, index: np.ndarray | torch.Tensor) -> Any:
        index = torch.as_tensor(index, dtype=torch.long)
        inputs, targets, lengths = (t[index] for t in self._tensors)
        width = max(int(lengths.max()), 1) if len(index) else 1  # trim padding every row shares
        if self.mask is not None:
            inputs, targets = mask_items(inputs, self.mask[0], self.mask[1], self.generator, self.mask[2])
        return self._interaction({INPUTS: inputs[:, :width], TARGETS: targets[:, :width], LENGTHS: lengths})

    def __iter__(self) -> Iterator[Any]:
        order = torch.randperm(self.sample_size, generator=self.generator)
        for lo in range(0, self.sample_size, self.step):
            yield self.collate_fn(order[lo : lo + self.step])
