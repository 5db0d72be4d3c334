"""Training windows for all-position sequential training, cut from RecBole's train split.

RecBole trains a sequential model on one row per prefix ("augmentation"): the encoder runs
over up to ``max_seq_length`` items to score a single target. All-position training runs
each window once and scores a target at every position, so an epoch costs a small fraction
of the compute for the same targets.

A user's training sequence is exactly what RecBole's train split holds for that user: its
rows are the prefixes ``s[:j] -> s[j]`` for ``j = 1 .. m-1`` in time order, so the sequence
is the first row's first item followed by every row's target (same internal ids, same order;
no valid or test item can be in it).

Windows are cut back from the newest item with a stride ``stride <= max_len``: window ``k``
ends at target ``e_k = (m - 1) - k * stride`` and holds up to ``max_len`` inputs before it.
Each target is trained in exactly one window, the one where it is among the last ``stride``
positions (the oldest window, which starts at the sequence's first item, trains all it holds),
so every target sees at least ``max_len - stride`` items of context (or all of its history
when that is shorter): evaluation scores a user's next item after the last
``max_len`` items, and targets trained with short contexts only would not match that.
Windows are left-aligned (position 0 = the window's first item, padding 0 at the end), as
RecBole pads its sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sequences:
    """Per-user item sequences in CSR form: user ``u``'s items are ``items[offsets[u]:offsets[u+1]]``."""

    offsets: np.ndarray  # int64, [users + 1]
    items: np.ndarray  # int64, [interactions]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass(frozen=True)
class Windows:
    """Model inputs and per-position targets (0: no target at that position)."""

    inputs: np.ndarray  # int64, [windows, max_len]
    targets: np.ndarray  # int64, [windows, max_len]
    lengths: np.ndarray  # int64, [windows]: items in each window's input

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def trained_targets(self) -> int:
        return int(np.count_nonzero(self.targets))


def sequences_from_train_rows(users: np.ndarray, first_items: np.ndarray, targets: np.ndarray) -> Sequences:
    """Rebuild each user's training sequence from RecBole's augmented train rows.

    Args:
        users: the user id of each train row, rows of a user in time order.
        first_items: each row's first history item (``item_id_list[:, 0]``).
        targets: each row's target item.

    Returns:
        One sequence per user that has train rows, in order of first appearance: the first
        row's first item, then every row's target.
    """
    users = np.asarray(users)
    if users.size == 0:
        return Sequences(np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64))
    order = np.argsort(users, kind="stable")  # group rows by user, keeping time order within
    users, first_items, targets = users[order], np.asarray(first_items)[order], np.asarray(targets)[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    counts = np.diff(np.r_[starts, users.size])
    offsets = np.zeros(starts.size + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts + 1)
    items = np.empty(int(offsets[-1]), dtype=np.int64)
    heads = offsets[:-1]
    items[heads] = first_items[starts]
    # Row i of user g lands at offsets[g] + 1 + (i - starts[g]).
    group = np.repeat(np.arange(starts.size), counts)
    items[heads[group] + 1 + (np.arange(users.size) - starts[group])] = targets
    return Sequences(offsets, items)


def cut_windows(sequences: Sequences, max_len: int, stride: int, *, keep_all_targets: bool = False) -> Windows:
    """Cut every sequence into windows of ``max_len`` inputs, newest first, ``stride`` apart.

    Args:
        sequences: per-user training sequences.
        max_len: inputs per window (the model's ``max_seq_length``).
        stride: targets newly trained per window, ``1 <= stride <= max_len``.
        keep_all_targets: keep every target of every window (windows then overlap in targets).

    Returns:
        The windows of all users, each target in exactly one of them.
    """
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride must be in 1..{max_len}, got {stride}")
    lengths = sequences.lengths
    n_targets = np.maximum(lengths - 1, 0)
    # Windows step back by stride until one reaches the sequence's start (end <= max_len): that one
    # trains every target it holds.
    per_user = np.where(n_targets > 0, 1 + -(-np.maximum(n_targets - max_len, 0) // stride), 0)
    user = np.repeat(np.arange(lengths.size), per_user)
    k = np.arange(user.size) - np.repeat(np.cumsum(per_user) - per_user, per_user)
    end = n_targets[user] - k * stride  # the newest target index in the user's sequence
    start = np.maximum(end - max_len, 0)  # first input index
    oldest = (start == 0) | keep_all_targets
    first_trained = np.where(oldest, 1, end - stride + 1)  # oldest window: every target it holds
    pos = np.arange(max_len)
    input_idx = start[:, None] + pos[None, :]
    target_idx = input_idx + 1
    n_inputs = end - start
    valid = pos[None, :] < n_inputs[:, None]
    base = sequences.offsets[user][:, None]
    flat = sequences.items
    inputs = np.where(valid, flat[np.where(valid, base + input_idx, 0)], 0)
    trained = valid & (target_idx >= first_trained[:, None])
    targets = np.where(trained, flat[np.where(trained, base + target_idx, 0)], 0)
    return Windows(inputs.astype(np.int64), targets.astype(np.int64), n_inputs.astype(np.int64))


def item_windows(sequences: Sequences, max_len: int, stride: int) -> np.ndarray:
    """Windows of up to ``max_len`` consecutive items, newest first, ``stride`` apart (BERT4Rec's input).

    Every item of every sequence is in at least one window; ``[windows, max_len]``, left-aligned.
    """
    # The items as next-item targets of a sequence with one placeholder in front.
    lengths = sequences.lengths
    offsets = sequences.offsets + np.arange(lengths.size + 1)
    items = np.zeros(int(offsets[-1]), dtype=np.int64)
    keep = np.ones(items.size, dtype=bool)
    keep[offsets[:-1]] = False
    items[keep] = sequences.items
    items[~keep] = -1  # never read as a target
    return cut_windows(Sequences(offsets, items), max_len, stride, keep_all_targets=True).targets
