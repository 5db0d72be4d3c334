"""Training windows: every train target exactly once, with enough context, from RecBole's own train split."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from recflow_testdata import tiny_config

from core.data.extract import extract
from core.modeling.dataset import build_dataset, load_recbole_data
from core.modeling.sequence_windows import Sequences, cut_windows, item_windows, sequences_from_train_rows
from core.modeling.window_loader import WindowLoader, windows_from_train_split


def _seqs(*lists: list[int]) -> Sequences:
    offsets = np.cumsum([0] + [len(x) for x in lists])
    return Sequences(offsets.astype(np.int64), np.concatenate([np.asarray(x, dtype=np.int64) for x in lists]))


def test_small_example_by_hand() -> None:
    w = cut_windows(_seqs([1, 2, 3, 4, 5, 6, 7], [8, 9]), max_len=3, stride=2)
    # Newest window first; left-aligned; 0 marks padding and positions trained in a newer/older window.
    assert w.inputs.tolist() == [[4, 5, 6], [2, 3, 4], [1, 2, 0], [8, 0, 0]]
    assert w.targets.tolist() == [[0, 6, 7], [0, 4, 5], [2, 3, 0], [9, 0, 0]]
    assert w.lengths.tolist() == [3, 3, 2, 1]


@pytest.mark.parametrize("max_len,stride", [(5, 5), (5, 2), (5, 1), (50, 25), (3, 3)])
def test_each_target_once_with_enough_context(max_len: int, stride: int) -> None:
    # Distinct items: item 1000*u + k is user u's k-th item, so a target tells where it came from.
    lengths = (1, 2, 3, 7, 12, 40, 101)
    lists = [[1000 * (u + 1) + k for k in range(n)] for u, n in enumerate(lengths)]
    w = cut_windows(_seqs(*lists), max_len=max_len, stride=stride)
    assert sorted(w.targets[w.targets > 0].tolist()) == sorted(x for seq in lists for x in seq[1:])
    assert w.trained_targets == sum(n - 1 for n in lengths)
    for inputs, targets, n in zip(w.inputs, w.targets, w.lengths):
        assert (inputs[:n] > 0).all() and (inputs[n:] == 0).all() and (targets[n:] == 0).all()
        assert n <= max_len
        for pos in np.flatnonzero(targets):
            index = int(targets[pos]) % 1000  # the target's place in its user's sequence
            context = pos + 1  # items before it inside the window
            assert int(inputs[pos]) == int(targets[pos]) - 1  # the item right before it
            assert int(inputs[0]) == int(targets[pos]) - context  # the window is contiguous
            assert min(max_len - stride + 1, index) <= context <= min(max_len, index)


def test_context_is_full_for_long_histories() -> None:
    seq = list(range(1, 201))
    w = cut_windows(_seqs(seq), max_len=50, stride=10)
    for inputs, targets in zip(w.inputs, w.targets):
        for pos in np.flatnonzero(targets):
            target = int(targets[pos])
            if target > 50:  # enough history to fill the context
                assert pos + 1 >= 40, (target, pos)
            assert int(inputs[pos]) == target - 1  # the input right before is the previous item


def test_item_windows_cover_every_item() -> None:
    w = item_windows(_seqs([1, 2, 3, 4, 5, 6, 7], [8, 9]), max_len=3, stride=3)
    assert w.tolist() == [[5, 6, 7], [2, 3, 4], [1, 0, 0], [8, 9, 0]]
    w = item_windows(_seqs([1, 2, 3, 4, 5]), max_len=3, stride=2)
    assert w.tolist() == [[3, 4, 5], [1, 2, 3]]


def test_stride_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="stride"):
        cut_windows(_seqs([1, 2, 3]), max_len=3, stride=4)


def test_sequences_from_train_rows() -> None:
    users = np.array([5, 5, 3, 5, 3])
    first = np.array([1, 1, 8, 1, 8])
    targets = np.array([2, 3, 9, 4, 10])
    seqs = sequences_from_train_rows(users, first, targets)
    assert seqs.offsets.tolist() == [0, 3, 7]
    assert seqs.items.tolist() == [8, 9, 10, 1, 2, 3, 4]


def test_windows_hold_exactly_recbole_train_targets(tmp_path: Path, tiny_csv: Path) -> None:
    config = tiny_config(tmp_path, tiny_csv)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    splits = build_dataset(extract(config, run_dir), config, run_dir)
    data = load_recbole_data(config, splits, run_dir / "checkpoints")
    train = data.train.dataset.inter_feat
    w = windows_from_train_split(data.train.dataset, max_len=10, stride=5, masked=False)
    # The multiset of trained targets is RecBole's train targets: no valid or test item, none twice.
    assert Counter(w.targets[w.targets > 0].tolist()) == Counter(train["item_id"].numpy().tolist())
    # Masked (BERT4Rec) windows: every train item of every user appears, newest included.
    m = windows_from_train_split(data.train.dataset, max_len=10, stride=10, masked=True)
    per_user_items = len(train) + len(np.unique(train["user_id"].numpy()))
    assert int((m.inputs > 0).sum()) == per_user_items and not m.targets.any()
    loader = WindowLoader(data.config, data.train.dataset, w, seed=1)
    batches = list(loader)
    assert len(batches) == len(loader) and sum(len(b) for b in batches) == len(w)
