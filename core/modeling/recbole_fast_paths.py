"""RecBole 1.2.1 fast paths for large data sets: named replacements of seven RecBole methods.

Nothing is replaced on import: ``install_fast_paths()`` (idempotent) puts them in place, and
``core.modeling.dataset.load_recbole_data`` calls it before it builds a dataset. Each one
replaces a per-row Python loop with vectorised code and produces the same objects RecBole's
own code does (checked by tests/core/modeling/test_dataset_fastload.py against the originals,
which stay in ``ORIGINALS``):

1. ``Dataset._load_feat`` -> ``load_feat``: the .inter file is read from its Parquet sidecar
   (written by ``core.modeling.dataset.write_atomic_files``) instead of
   pd.read_csv(engine="python"): same columns, dtypes (object str tokens, float64 floats),
   NaN for pandas' default NA strings.
2. ``Interaction.__getitem__`` -> ``interaction_getitem``: an index array/list becomes one
   LongTensor (RecBole turns it into a Python list first, then indexes every field with it).
3. ``Dataset._grouped_index`` / ``_split_index_by_leave_one_out`` -> ``grouped_index`` /
   ``split_index_by_leave_one_out``: numpy grouping, same groups in the same
   (first-appearance) order, same indices in each part.
4. ``Sampler.get_used_ids`` -> ``get_used_ids``: the same per-user sets, filled group-wise.
5. ``FullSortEvalDataLoader.__init__`` -> ``full_sort_init`` (general models): the same
   per-user tensors, built from contiguous user blocks (views of one tensor per kind).
6. ``AbstractDataLoader.__init__`` -> ``abstract_loader_init``: torch's DataLoader gets
   range(n), not list(range(n)).
7. ``SequentialDataset.data_augmentation`` -> ``data_augmentation`` (SASRec & co.): the
   one-row-per-prefix table, its (rows x MAX_ITEM_LIST_LENGTH) list fields filled by gathers.

4-5 run with the cyclic garbage collector paused (it cost ~7 s of a 10M-row build).
Sets are filled with the same values in the same order as RecBole's loops, so even the
iteration order of every set (and the tensors made from them) is unchanged.
Once installed, each path defers to RecBole's original while ``recbole_fast_paths(False)``
is in effect, or always when the process started with ``RECFLOW_RECBOLE_FAST=0``.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
from collections.abc import Callable, Iterator
from logging import getLogger
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import torch

# RecBole's version guards run before RecBole is imported.
from core.modeling import recbole_adapter  # noqa: F401

# isort: split
from recbole.data.dataloader.abstract_dataloader import AbstractDataLoader
from recbole.data.dataloader.general_dataloader import FullSortEvalDataLoader
from recbole.data.dataset import Dataset, SequentialDataset
from recbole.data.interaction import Interaction
from recbole.data.transform import construct_transform
from recbole.sampler.sampler import Sampler
from recbole.utils import FeatureSource, FeatureType, ModelType

STAMP_KEY = "recflow.inter_stamp"
_STAMP_BYTES = 1 << 20
_AUGMENT_CHUNK = 1 << 15  # augmented rows per gather (x MAX_ITEM_LIST_LENGTH int64 indices: 13 MB at 50)
_FAST_PATHS = os.environ.get("RECFLOW_RECBOLE_FAST", "1") != "0"
# pandas' read_csv turns these strings into NaN (its default na_values; RecBole passes no
# keep_default_na), so a token equal to one of them becomes a missing id.
_PANDAS_NA_STRINGS = frozenset(
    ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
     "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]
)


def sidecar_path(inter_path: Path | str) -> Path:
    return Path(f"{inter_path}.parquet")


def inter_stamp(inter_path: Path) -> str:
    """Size plus a hash of the first and last MiB: cheap, and survives a copy of the run folder."""
    size = inter_path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with inter_path.open("rb") as fh:
        digest.update(fh.read(_STAMP_BYTES))
        if size > _STAMP_BYTES:
            fh.seek(max(_STAMP_BYTES, size - _STAMP_BYTES))
            digest.update(fh.read())
    return f"{size}:{digest.hexdigest()}"



@contextlib.contextmanager
def recbole_fast_paths(enabled: bool) -> Iterator[None]:
    """Switch the installed fast paths on or off for a block (on unless RECFLOW_RECBOLE_FAST=0)."""
    global _FAST_PATHS
    previous, _FAST_PATHS = _FAST_PATHS, enabled
    try:
        yield
    finally:
        _FAST_PATHS = previous


def load_inter_sidecar(inter_path: Path | str, columns: list[str], types: list[str]) -> pd.DataFrame | None:
    """The .inter file's ``columns`` (``name:type`` headers) as RecBole's ``_load_feat`` reads them.

    From the Parquet sidecar when one matches the .inter file, else ``None`` (the caller reads
    the text file). Tokens become object arrays of ``str`` with NaN where pandas' reader would
    see NA (one Python string per distinct token, shared by its rows); floats become float64.
    """
    inter_path = Path(inter_path)
    sidecar = sidecar_path(inter_path)
    if not sidecar.is_file():
        return None
    try:
        stamp = pl.read_parquet_metadata(sidecar).get(STAMP_KEY)
        if stamp is None or stamp != inter_stamp(inter_path) or set(columns) - set(pl.read_parquet_schema(sidecar)):
            return None
        frame = pl.read_parquet(sidecar, columns=columns)
    except (OSError, pl.exceptions.PolarsError):
        return None
    data: dict[str, np.ndarray] = {}
    for name, kind in zip(columns, types):
        series = frame.get_column(name)
        if kind == "token":
            data[name] = _token_array(series)
        else:
            data[name] = series.cast(pl.Float64).to_numpy().astype(np.float64, copy=False)
    return pd.DataFrame(data, columns=columns)


def _token_array(series: pl.Series) -> np.ndarray:
    text = series.cast(pl.String)
    categories = text.drop_nulls().unique(maintain_order=True)
    codes = text.cast(pl.Enum(categories)).to_physical().cast(pl.Int64).fill_null(-1).to_numpy()
    values = np.empty(categories.len() + 1, dtype=object)
    values[:-1] = categories.to_list()
    values[-1] = np.nan  # code -1: a null in the sidecar, an empty field in the .inter file
    na = np.fromiter((v in _PANDAS_NA_STRINGS for v in values[:-1]), dtype=bool, count=categories.len())
    values[:-1][na] = np.nan
    return values[codes]


# RecBole's methods as they were before ``install_fast_paths`` (the fallbacks call them from here).
ORIGINALS: dict[str, Callable[..., Any]] = {}
# Where each fast path goes: (class, attribute, ORIGINALS key, replacement name in this module).
_TARGETS: list[tuple[type, str, str, str]] = [
    (Dataset, "_load_feat", "load_feat", "load_feat"),
    (Interaction, "__getitem__", "getitem", "interaction_getitem"),
    (Dataset, "_grouped_index", "grouped_index", "grouped_index"),
    (Dataset, "_split_index_by_leave_one_out", "split_loo", "split_index_by_leave_one_out"),
    (Sampler, "get_used_ids", "used_ids", "get_used_ids"),
    (FullSortEvalDataLoader, "__init__", "full_sort_init", "full_sort_init"),
    (AbstractDataLoader, "__init__", "loader_init", "abstract_loader_init"),
    (SequentialDataset, "data_augmentation", "data_augmentation", "data_augmentation"),
]


def replaced_methods() -> list[tuple[type, str]]:
    """Every (RecBole class, attribute) ``install_fast_paths`` replaces."""
    return [(cls, attr) for cls, attr, _, _ in _TARGETS]


def installed() -> bool:
    """Whether ``install_fast_paths`` has run in this process."""
    return bool(ORIGINALS)


def install_fast_paths() -> None:
    """Replace RecBole's methods with the fast paths, once per process (later calls do nothing)."""
    if ORIGINALS:
        return
    replacements = globals()
    for cls, attr, key, _name in _TARGETS:
        ORIGINALS[key] = cls.__dict__[attr]
    for cls, attr, _key, name in _TARGETS:
        setattr(cls, attr, replacements[name])


# 1. ------------------------------------------------------------------ .inter from Parquet
def load_feat(self: Any, filepath: str, source: Any) -> Any:
    if not _FAST_PATHS or source != FeatureSource.INTERACTION or not sidecar_path(filepath).is_file():
        return ORIGINALS["load_feat"](self, filepath, source)
    load_col, unload_col = self._get_load_and_unload_col(source)
    if load_col == set():
        return None
    separator, encoding = self.config["field_separator"], self.config["encoding"]
    with open(filepath, encoding=encoding) as fh:
        head = fh.readline()[:-1]
    fields: list[tuple[str, Any, str]] = []
    for field_type in head.split(separator):
        field, _, type_name = field_type.partition(":")
        try:
            ftype = FeatureType(type_name)
        except ValueError:
            return ORIGINALS["load_feat"](self, filepath, source)  # RecBole raises its own error
        if ftype not in (FeatureType.TOKEN, FeatureType.FLOAT):
            return ORIGINALS["load_feat"](self, filepath, source)  # sequences: RecBole's parser
        if load_col is not None and field not in load_col:
            continue
        if unload_col is not None and field in unload_col:
            continue
        fields.append((field, ftype, field_type))
    if not fields:
        return ORIGINALS["load_feat"](self, filepath, source)  # RecBole warns and returns None
    frame = load_inter_sidecar(
        filepath, [f for _, _, f in fields], ["token" if t == FeatureType.TOKEN else "float" for _, t, _ in fields]
    )
    if frame is None:
        return ORIGINALS["load_feat"](self, filepath, source)
    for field, ftype, _ in fields:  # what RecBole records per loaded field
        self.field2source[field] = source
        self.field2type[field] = ftype
        self.field2seqlen[field] = 1
        if ftype == FeatureType.FLOAT:
            self.field2bucketnum[field] = 2
    frame.columns = [field for field, _, _ in fields]
    return frame



# 2. ------------------------------------------------------------------ one index tensor
def _index_tensor(index: Any) -> torch.Tensor | None:
    if isinstance(index, torch.Tensor):
        if index.dim() != 1 or index.is_floating_point() or index.is_complex():
            return None
        return index.cpu() if index.dtype == torch.bool else index.cpu().long()
    if isinstance(index, list):
        if not index:
            return None
        try:
            index = np.asarray(index)
        except ValueError:
            return None
    if isinstance(index, np.ndarray) and index.ndim == 1 and index.dtype.kind in "biu" and index.size:
        return torch.from_numpy(index.astype(bool if index.dtype.kind == "b" else np.int64, copy=False))
    return None


def interaction_getitem(self: Any, index: Any) -> Any:
    if not _FAST_PATHS or isinstance(index, str):
        return ORIGINALS["getitem"](self, index)
    tensor = _index_tensor(index)
    if tensor is None:
        return ORIGINALS["getitem"](self, index)
    return Interaction({k: v[tensor.to(v.device)] for k, v in self.interaction.items()})


# 3. ------------------------------------------------------------------ grouping and LOO split
def grouped_index(self: Any, group_by_list: Any) -> Any:
    keys = np.asarray(group_by_list)
    if not _FAST_PATHS or keys.ndim != 1 or keys.dtype.kind not in "biuf" or keys.size == 0:
        return ORIGINALS["grouped_index"](self, group_by_list)
    order = np.argsort(keys, kind="stable")
    starts = np.flatnonzero(np.r_[True, keys[order][1:] != keys[order][:-1]])
    groups = np.split(order, starts[1:])  # each group's rows in ascending order
    first_seen = np.argsort(order[starts], kind="stable")  # RecBole's dict keeps first appearance
    return [groups[g] for g in first_seen]


def split_index_by_leave_one_out(self: Any, grouped_index: Any, leave_one_num: int) -> Any:
    groups = list(grouped_index)
    if not _FAST_PATHS or not groups or not all(isinstance(g, np.ndarray) for g in groups):
        return ORIGINALS["split_loo"](self, groups, leave_one_num)
    lengths = np.fromiter((len(g) for g in groups), dtype=np.int64, count=len(groups))
    flat = np.concatenate(groups)
    position = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    held_out = np.repeat(np.minimum(leave_one_num, lengths - 1), lengths)
    kept = np.repeat(lengths, lengths) - held_out
    # RecBole: the first len - held_out rows go to part 0, the i-th held-out row to
    # part (leave_one_num + 1) - held_out + i.
    part = np.where(position < kept, 0, leave_one_num + 1 - held_out + (position - kept))
    return [flat[part == p] for p in range(leave_one_num + 1)]


# 4. ------------------------------------------------------------------ sampler's used ids
def get_used_ids(self: Any) -> Any:
    if not _FAST_PATHS:
        return ORIGINALS["used_ids"](self)
    with _gc_paused():
        return _fill_used_ids(self)


def _fill_used_ids(self: Any) -> Any:
    # One Python int per item id, shared by every set (RecBole's loop stores one numpy
    # scalar per row: 10M rows, 320 MB of scalars).
    item_objects = _int_objects(self.item_num)
    used_item_id = {}
    last = [set() for _ in range(self.user_num)]
    for phase, dataset in zip(self.phases, self.datasets):
        cur = np.array([set(s) for s in last])
        uids = dataset.inter_feat[self.uid_field].numpy()
        iids = dataset.inter_feat[self.iid_field].numpy()
        if uids.size:
            order = np.argsort(uids, kind="stable")  # each user's items in row order
            sorted_uids = uids[order]
            starts = np.flatnonzero(np.r_[True, sorted_uids[1:] != sorted_uids[:-1]])
            items = item_objects[iids[order]].tolist()
            bounds = np.r_[starts, uids.size].tolist()
            for uid, lo, hi in zip(sorted_uids[starts].tolist(), bounds[:-1], bounds[1:]):
                cur[uid].update(items[lo:hi])
        last = used_item_id[phase] = cur
    for used_item_set in used_item_id[self.phases[-1]]:
        if len(used_item_set) + 1 == self.item_num:  # [pad] is a item.
            raise ValueError(
                "Some users have interacted with all items, "
                "which we can not sample negative items for them. "
                "Please set `user_inter_num_interval` to filter those users."
            )
    return used_item_id


# 5. ------------------------------------------------------------------ full-sort eval loader
def full_sort_init(self: Any, config: Any, dataset: Any, sampler: Any, shuffle: bool = False) -> None:
    if not _FAST_PATHS or config["MODEL_TYPE"] == ModelType.SEQUENTIAL or len(dataset) == 0:
        ORIGINALS["full_sort_init"](self, config, dataset, sampler, shuffle=shuffle)
        return
    with _gc_paused():
        _full_sort_fill(self, config, dataset, sampler, shuffle)


def _full_sort_fill(self: Any, config: Any, dataset: Any, sampler: Any, shuffle: bool) -> None:
    self.logger = getLogger()
    self.uid_field = dataset.uid_field
    self.iid_field = dataset.iid_field
    self.is_sequential = False
    user_num = dataset.user_num
    items_num = np.zeros(user_num, dtype=np.int64)
    positive = np.array([None] * user_num)
    history = np.array([None] * user_num)
    dataset.sort(by=self.uid_field, ascending=True)
    uids = dataset.inter_feat[self.uid_field].numpy()
    iids = _int_objects(dataset.item_num)[dataset.inter_feat[self.iid_field].numpy()].tolist()
    starts = np.flatnonzero(np.r_[True, uids[1:] != uids[:-1]])
    bounds = np.r_[starts, uids.size].tolist()
    uid_list = uids[starts]
    used = sampler.used_ids
    # Each user's sets as RecBole builds them (so the same element order), their
    # elements laid end to end: one tensor per kind, a view of it per user.
    flat: tuple[list[int], list[int]] = ([], [])
    sizes: tuple[list[int], list[int]] = ([], [])
    for uid, lo, hi in zip(uid_list.tolist(), bounds[:-1], bounds[1:]):
        positive_item = set(iids[lo:hi])
        history_item = used[uid] - positive_item
        flat[0].extend(positive_item)
        flat[1].extend(history_item)
        sizes[0].append(len(positive_item))
        sizes[1].append(len(history_item))
    views = [torch.split(torch.from_numpy(np.array(f, dtype=np.int64)), n) for f, n in zip(flat, sizes)]
    del flat
    for uid, pos, hist, n in zip(uid_list.tolist(), views[0], views[1], sizes[0]):
        positive[uid], history[uid], items_num[uid] = pos, hist, n
    self.uid2items_num, self.uid2positive_item, self.uid2history_item = items_num, positive, history
    self.uid_list = torch.tensor(uid_list, dtype=torch.int64)
    self.user_df = dataset.join(Interaction({self.uid_field: self.uid_list}))
    self.sample_size = len(self.user_df)
    if shuffle:
        self.logger.warning("FullSortEvalDataLoader can't shuffle")
        shuffle = False
    AbstractDataLoader.__init__(self, config, dataset, sampler, shuffle=shuffle)


# 6. ------------------------------------------------------------------ loader index list
def abstract_loader_init(self: Any, config: Any, dataset: Any, sampler: Any, shuffle: bool = False) -> None:
    if not _FAST_PATHS or not config["single_spec"]:
        ORIGINALS["loader_init"](self, config, dataset, sampler, shuffle=shuffle)
        return
    # RecBole's own __init__, but torch's DataLoader indexes range(n) instead of
    # list(range(n)) (10M rows: 360 MB of ints); same sampler, same batches.
    self.shuffle = shuffle
    self.config = config
    self._dataset = dataset
    self._sampler = sampler
    self._batch_size = self.step = self.model = None
    self._init_batch_size_and_step()
    self.generator = torch.Generator()
    self.generator.manual_seed(config["seed"])
    self.transform = construct_transform(config)
    self.is_sequential = config["MODEL_TYPE"] == ModelType.SEQUENTIAL
    torch.utils.data.DataLoader.__init__(
        self,
        dataset=range(self.sample_size),
        batch_size=self.step,
        collate_fn=self.collate_fn,
        num_workers=config["worker"],
        shuffle=shuffle,
        sampler=None,
        generator=self.generator,
    )


# 7. ------------------------------------------------------------------ sequential augmentation
def data_augmentation(self: Any) -> None:
    if not _FAST_PATHS:
        return ORIGINALS["data_augmentation"](self)
    self.logger.debug("data_augmentation")
    self._aug_presets()
    self._check_field("uid_field", "time_field")
    plan = _augmentation_plan(self)
    if plan is None:
        return ORIGINALS["data_augmentation"](self)  # a layout RecBole's loop handles its own way
    max_len, shapes = plan
    self.sort(by=[self.uid_field, self.time_field], ascending=True)
    feat = self.inter_feat
    uids = feat[self.uid_field].numpy()
    n = uids.size
    # RecBole's loop: every row after a user's first is a target; its history is the
    # up to max_len rows before it, from the same user (rows are sorted by user, time).
    starts = np.flatnonzero(np.r_[True, uids[1:] != uids[:-1]])
    position = np.arange(n, dtype=np.int64) - np.repeat(starts, np.diff(np.r_[starts, n]))
    target = np.flatnonzero(position > 0)
    if target.size == 0:
        return ORIGINALS["data_augmentation"](self)  # (sorting again changes nothing)
    lengths = np.minimum(position[target], max_len).astype(np.int64)
    del position
    first = target - lengths  # the row each history starts at
    rows = target.size
    new_data = feat[target]
    new_dict = {self.item_list_length_field: torch.from_numpy(lengths)}
    outs: dict[str, torch.Tensor] = {}
    padded: dict[str, torch.Tensor] = {}
    for field, (list_field, shape) in shapes.items():
        value = feat[field]
        # Row n is the padding: RecBole's zeros (torch.zeros of the field's dtype).
        padded[field] = torch.cat([value, value.new_zeros((1, *value.shape[1:]))])
        outs[field] = new_dict[list_field] = torch.empty((rows, *shape), dtype=value.dtype)
    offsets = np.arange(max_len, dtype=np.int64)
    for lo in range(0, rows, _AUGMENT_CHUNK):  # chunks bound the index matrix, not a row loop
        hi = min(lo + _AUGMENT_CHUNK, rows)
        index = np.where(offsets < lengths[lo:hi, None], first[lo:hi, None] + offsets, n)
        index = torch.from_numpy(index.reshape(-1))
        for field, out in outs.items():
            # index_select straight into the rows' block (5-7x faster than out[lo:hi] = value[index]).
            block = out[lo:hi].view(-1, *out.shape[2:])
            address = block.data_ptr()
            torch.index_select(padded[field], 0, index, out=block)
            if block.data_ptr() != address:  # torch reallocated it (not with this shape): copy back
                out[lo:hi] = block.view(hi - lo, *out.shape[1:])
    del padded
    new_data.update(Interaction(new_dict))
    self.inter_feat = new_data
    return None


def _augmentation_plan(self: Any) -> tuple[int, dict[str, tuple[str, tuple[int, ...]]]] | None:
    """(max_len, field -> (list field, list shape per row)) as RecBole's loop allocates them,
    or None where the gather would not reproduce it exactly."""
    max_len = self.config["MAX_ITEM_LIST_LENGTH"]
    feat = self.inter_feat
    if type(max_len) is not int or max_len < 1 or self.uid_field not in feat or len(feat) < 2:
        return None
    uid = feat[self.uid_field]
    if uid.dim() != 1 or uid.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        return None
    numerical = self.config["numerical_features"] or []
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
    for field in feat:
        if field == self.uid_field:
            continue
        list_field = getattr(self, f"{field}_list_field")
        list_len = self.field2seqlen[list_field]
        if type(list_len) is int:
            shape: tuple[int, ...] = (list_len,)
        elif isinstance(list_len, tuple) and all(type(v) is int for v in list_len):
            shape = list_len
        else:
            return None
        if self.field2type[field] in (FeatureType.FLOAT, FeatureType.FLOAT_SEQ) and field in numerical:
            shape += (2,)
        value = feat[field]
        # RecBole copies value[history] into shape[1:]-shaped rows: only the same shape is a plain copy.
        if shape[0] != max_len or tuple(value.shape[1:]) != shape[1:] or value.device.type != "cpu":
            return None
        shapes[field] = (list_field, shape)
    return max_len, shapes


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while hundreds of thousands of sets and tensors are made.

    Each full collection walks every tracked object; building the samplers' sets and the
    loaders' tensors triggered enough of them to cost a third of a 10M-row build.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _int_objects(n: int) -> np.ndarray:
    """An object array of the Python ints 0..n-1 (indexing it shares them instead of creating new ones)."""
    return np.arange(n, dtype=np.int64).astype(object)
