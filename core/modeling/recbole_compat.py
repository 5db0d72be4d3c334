"""Every RecBole 1.2.1 workaround, applied once, here and nowhere else.

- numpy 2 breaks ``Config`` and pandas 3 silently breaks its fillna: refuse to run on them.
- ``recbole.quick_start`` imports ray: never imported.
- ``Config`` overwrites ``CUDA_VISIBLE_DEVICES`` with its ``gpu_id``: we restore it, and pick
  the device ourselves.
- Importing the sequential models switches on ``torch.autograd.set_detect_anomaly(True)``
  (a ~2x slowdown): switched back off after every model import.
- Checkpoints pickle a ``Config``: torch >= 2.6 needs ``weights_only=False`` (our own files only).
- The trainer writes TensorBoard logs to ``./log_tensorboard`` in the working directory:
  redirected into the run folder.
- ``Config`` parses ``sys.argv`` too: hidden from it while it is built.
- At scale, RecBole's python-engine ``read_csv`` and per-row loops dominate a build: the
  "fast paths" at the end of this module replace them with vectorised code producing the same
  objects (``RECFLOW_RECBOLE_FAST=0`` turns them off).
- The dataset name ``ml-100k`` is hard-wired to the wheel's copy: our atomic files use
  another name, and ``ml100k_inter_path`` locates the wheel's copy for the ml-100k source.
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import hashlib
import logging
import os
import sys
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import torch

from core.errors import ConfigError, ModelNotFoundError


def _check_stack() -> None:
    if int(np.__version__.split(".")[0]) >= 2:
        raise ConfigError(f"RecBole 1.2.1 needs numpy<2 (found {np.__version__}); reinstall recflow")
    if int(pd.__version__.split(".")[0]) >= 3:
        raise ConfigError(f"RecBole 1.2.1 needs pandas<3 (found {pd.__version__}); reinstall recflow")


_check_stack()

import recbole  # noqa: E402  (after the version check on purpose)
import recbole.trainer.trainer as _recbole_trainer_module  # noqa: E402
from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.utils import get_model, get_trainer  # noqa: E402

RECBOLE_DIR = Path(recbole.__file__).parent
# Our atomic files never use the name "ml-100k": RecBole would swap in the wheel's copy.
DATASET_NAME = "interactions"

__all__ = [
    "Config",
    "DATASET_NAME",
    "available_models",
    "create_dataset",
    "data_preparation",
    "load_checkpoint",
    "make_config",
    "ml100k_inter_path",
    "resolve_model",
    "tensorboard_dir",
    "trainer_class",
]


def ml100k_inter_path() -> Path:
    """The MovieLens-100k interactions shipped inside RecBole's wheel."""
    path = RECBOLE_DIR / "dataset_example" / "ml-100k" / "ml-100k.inter"
    if not path.is_file():
        raise ConfigError(f"RecBole's bundled ml-100k is missing at {path}; reinstall recbole==1.2.1")
    return path


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
    return get_trainer(config["MODEL_TYPE"], config["model"])


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load one of *our* checkpoints (they pickle a RecBole Config, hence weights_only=False)."""
    return torch.load(path, map_location=device, weights_only=False)


_TENSORBOARD_DIR: Path | None = None


@contextlib.contextmanager
def tensorboard_dir(path: Path) -> Iterator[None]:
    """Route the RecBole trainer's SummaryWriter into ``path`` instead of ./log_tensorboard."""
    global _TENSORBOARD_DIR
    previous, _TENSORBOARD_DIR = _TENSORBOARD_DIR, path
    try:
        yield
    finally:
        _TENSORBOARD_DIR = previous


def _get_tensorboard(_logger: logging.Logger) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    target = _TENSORBOARD_DIR or Path("runs") / "tensorboard"
    target.mkdir(parents=True, exist_ok=True)
    return SummaryWriter(str(target))


_recbole_trainer_module.get_tensorboard = _get_tensorboard


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


# RecBole 1.2.1 uses pandas chained-assignment fillna; pandas 2.x warns on every dataset build.
import warnings  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\.")


# --------------------------------------------------------------------------- RecBole fast paths
#
# RecBole 1.2.1 patches for large data sets. Each one
# replaces a per-row Python loop with vectorised code and produces the same objects RecBole's
# own code does (checked by tests/core/modeling/test_dataset_fastload.py against the originals):
#
# 1. Dataset._load_feat: the .inter file is read from its Parquet sidecar (written by
#    write_atomic_files) instead of pd.read_csv(engine="python"): same columns, dtypes
#    (object str tokens, float64 floats), NaN for pandas' default NA strings.
# 2. Interaction.__getitem__: an index array/list becomes one LongTensor (RecBole turns it
#    into a Python list first, then indexes every field with it).
# 3. Dataset._grouped_index / _split_index_by_leave_one_out: numpy grouping, same groups in
#    the same (first-appearance) order, same indices in each part.
# 4. Sampler.get_used_ids: the same per-user sets, filled group-wise instead of row by row.
# 5. FullSortEvalDataLoader.__init__ (general models): the same per-user tensors, built
#    from contiguous user blocks instead of row by row (views of one tensor per kind).
# 6. AbstractDataLoader.__init__: torch's DataLoader gets range(n), not list(range(n)).
# 7. SequentialDataset.data_augmentation (SASRec & co.): the one-row-per-prefix table, its
#    (rows x MAX_ITEM_LIST_LENGTH) list fields filled by gathers instead of a loop over rows.
#
# 4-5 run with the cyclic garbage collector paused (it cost ~7 s of a 10M-row build).
# Sets are filled with the same values in the same order as RecBole's loops, so even the
# iteration order of every set (and the tensors made from them) is unchanged.
# ``recbole_fast_paths(False)`` switches them all off (tests and benchmarks compare both).

_STAMP_KEY = "recflow.inter_stamp"
_STAMP_BYTES = 1 << 20
_AUGMENT_CHUNK = 1 << 15  # augmented rows per gather (x MAX_ITEM_LIST_LENGTH int64 indices: 13 MB at 50)
_FAST_PATHS = os.environ.get("RECFLOW_RECBOLE_FAST", "1") != "0"
# pandas' read_csv turns these strings into NaN (its default na_values; RecBole passes no
# keep_default_na), so a token equal to one of them becomes a missing id.
_PANDAS_NA_STRINGS = frozenset(
    ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
     "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]
)


def _sidecar_path(inter_path: Path | str) -> Path:
    return Path(f"{inter_path}.parquet")


def _inter_stamp(inter_path: Path) -> str:
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
    """Switch the fast paths on or off for a block (they are on unless RECFLOW_RECBOLE_FAST=0)."""
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
    sidecar = _sidecar_path(inter_path)
    if not sidecar.is_file():
        return None
    try:
        stamp = pl.read_parquet_metadata(sidecar).get(_STAMP_KEY)
        if stamp is None or stamp != _inter_stamp(inter_path) or set(columns) - set(pl.read_parquet_schema(sidecar)):
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


def _install_recbole_fast_paths() -> None:
    from logging import getLogger

    from recbole.data.dataloader.abstract_dataloader import AbstractDataLoader
    from recbole.data.dataloader.general_dataloader import FullSortEvalDataLoader
    from recbole.data.dataset import Dataset, SequentialDataset
    from recbole.data.interaction import Interaction
    from recbole.data.transform import construct_transform
    from recbole.sampler.sampler import Sampler
    from recbole.utils import FeatureSource, FeatureType, ModelType

    if getattr(Dataset._load_feat, "_recflow", False):
        return
    originals = {
        "load_feat": Dataset._load_feat,
        "getitem": Interaction.__getitem__,
        "grouped_index": Dataset._grouped_index,
        "split_loo": Dataset._split_index_by_leave_one_out,
        "used_ids": Sampler.get_used_ids,
        "full_sort_init": FullSortEvalDataLoader.__init__,
        "loader_init": AbstractDataLoader.__init__,
        "data_augmentation": SequentialDataset.data_augmentation,
    }

    # 1. ------------------------------------------------------------------ .inter from Parquet
    def _load_feat(self: Any, filepath: str, source: Any) -> Any:
        if not _FAST_PATHS or source != FeatureSource.INTERACTION or not _sidecar_path(filepath).is_file():
            return originals["load_feat"](self, filepath, source)
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
                return originals["load_feat"](self, filepath, source)  # RecBole raises its own error
            if ftype not in (FeatureType.TOKEN, FeatureType.FLOAT):
                return originals["load_feat"](self, filepath, source)  # sequences: RecBole's parser
            if load_col is not None and field not in load_col:
                continue
            if unload_col is not None and field in unload_col:
                continue
            fields.append((field, ftype, field_type))
        if not fields:
            return originals["load_feat"](self, filepath, source)  # RecBole warns and returns None
        frame = load_inter_sidecar(
            filepath, [f for _, _, f in fields], ["token" if t == FeatureType.TOKEN else "float" for _, t, _ in fields]
        )
        if frame is None:
            return originals["load_feat"](self, filepath, source)
        for field, ftype, _ in fields:  # what RecBole records per loaded field
            self.field2source[field] = source
            self.field2type[field] = ftype
            self.field2seqlen[field] = 1
            if ftype == FeatureType.FLOAT:
                self.field2bucketnum[field] = 2
        frame.columns = [field for field, _, _ in fields]
        return frame

    _load_feat._recflow = True  # type: ignore[attr-defined]

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

    def _getitem(self: Any, index: Any) -> Any:
        if not _FAST_PATHS or isinstance(index, str):
            return originals["getitem"](self, index)
        tensor = _index_tensor(index)
        if tensor is None:
            return originals["getitem"](self, index)
        return Interaction({k: v[tensor.to(v.device)] for k, v in self.interaction.items()})

    # 3. ------------------------------------------------------------------ grouping and LOO split
    def _grouped_index(self: Any, group_by_list: Any) -> Any:
        keys = np.asarray(group_by_list)
        if not _FAST_PATHS or keys.ndim != 1 or keys.dtype.kind not in "biuf" or keys.size == 0:
            return originals["grouped_index"](self, group_by_list)
        order = np.argsort(keys, kind="stable")
        starts = np.flatnonzero(np.r_[True, keys[order][1:] != keys[order][:-1]])
        groups = np.split(order, starts[1:])  # each group's rows in ascending order
        first_seen = np.argsort(order[starts], kind="stable")  # RecBole's dict keeps first appearance
        return [groups[g] for g in first_seen]

    def _split_index_by_leave_one_out(self: Any, grouped_index: Any, leave_one_num: int) -> Any:
        groups = list(grouped_index)
        if not _FAST_PATHS or not groups or not all(isinstance(g, np.ndarray) for g in groups):
            return originals["split_loo"](self, groups, leave_one_num)
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
    def _get_used_ids(self: Any) -> Any:
        if not _FAST_PATHS:
            return originals["used_ids"](self)
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
    def _full_sort_init(self: Any, config: Any, dataset: Any, sampler: Any, shuffle: bool = False) -> None:
        if not _FAST_PATHS or config["MODEL_TYPE"] == ModelType.SEQUENTIAL or len(dataset) == 0:
            originals["full_sort_init"](self, config, dataset, sampler, shuffle=shuffle)
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
    def _abstract_loader_init(self: Any, config: Any, dataset: Any, sampler: Any, shuffle: bool = False) -> None:
        if not _FAST_PATHS or not config["single_spec"]:
            originals["loader_init"](self, config, dataset, sampler, shuffle=shuffle)
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
    def _data_augmentation(self: Any) -> None:
        if not _FAST_PATHS:
            return originals["data_augmentation"](self)
        self.logger.debug("data_augmentation")
        self._aug_presets()
        self._check_field("uid_field", "time_field")
        plan = _augmentation_plan(self)
        if plan is None:
            return originals["data_augmentation"](self)  # a layout RecBole's loop handles its own way
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
            return originals["data_augmentation"](self)  # (sorting again changes nothing)
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

    Dataset._load_feat = _load_feat
    Interaction.__getitem__ = _getitem
    Dataset._grouped_index = _grouped_index
    Dataset._split_index_by_leave_one_out = _split_index_by_leave_one_out
    Sampler.get_used_ids = _get_used_ids
    FullSortEvalDataLoader.__init__ = _full_sort_init
    AbstractDataLoader.__init__ = _abstract_loader_init
    SequentialDataset.data_augmentation = _data_augmentation
    _data_augmentation._recflow_originals = originals  # type: ignore[attr-defined]  (tests wrap the fallback)


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


_install_recbole_fast_paths()
