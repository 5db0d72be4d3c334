"""build: snapshot -> RecBole atomic files, and the RecBole dataset/dataloaders over them.

The split itself is RecBole's (time-ordered leave-one-out or ratio, grouped by user), so
our metrics are exactly what RecBole's evaluator computes. ``load_recbole_data`` rebuilds
the dataloaders from the atomic files deterministically and caches them per process, so
train, evaluate and export in one flow run share one build, and a retry on another
process needs only the run folder.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import torch
import yaml

from core import recbole_compat as rb
from core.config import PipelineConfig
from core.devices import resolve_device
from core.errors import DataValidationError
from core.records import ITEM, RATING, TIME, USER, DatasetSplits, Snapshot

DATA_SUBDIR = "recbole"


@dataclass
class RecBoleData:
    """The in-memory RecBole objects for one run (never crosses a task boundary)."""

    config: Any  # recbole.config.Config
    dataset: Any
    train: Any
    valid: Any
    test: Any


def eval_protocol(config: PipelineConfig) -> str:
    """A stable id of what makes test metrics comparable: split and filters."""
    d = config.dataset
    split = "loo" if d.split == "loo" else "ratio:" + ",".join(f"{r:g}" for r in d.ratios)
    return f"{split}|min_user={d.min_user_interactions}|min_item={d.min_item_interactions}"


def write_atomic_files(snapshot: Snapshot, data_dir: Path) -> Path:
    """Write ``<data_dir>/<name>/<name>.inter`` (tab-separated, typed header) for RecBole.

    Next to it goes ``<name>.inter.parquet``, the same columns as Parquet, stamped with the
    .inter file's size and a hash of its ends: RecBole then loads that instead of parsing
    the text file with pandas' python engine (see ``load_inter_sidecar``). A sidecar whose
    stamp does not match the .inter file is ignored. The sidecar holds exactly the floats
    pandas parses from the text (see ``_as_pandas_parses``); where that cannot be
    guaranteed no sidecar is written and RecBole reads the text file.

    Timestamps are epoch microseconds / 1e6 with numpy's correctly rounded division (polars'
    division by a constant is not: about 30% of its values needed 17 digits and came back
    from pandas' parser 1 ulp off).
    """
    target = data_dir / rb.DATASET_NAME
    target.mkdir(parents=True, exist_ok=True)
    clean = [
        pl.col(USER).alias(f"{USER}:token"),
        pl.col(ITEM).alias(f"{ITEM}:token"),
        pl.col(TIME).dt.epoch("us").alias(f"{TIME}:float"),
    ]
    if snapshot.has_rating:
        clean.append(pl.col(RATING).cast(pl.Float64).alias(f"{RATING}:float"))
    frame = pl.scan_parquet(snapshot.path).select(clean).collect()
    micros = frame.get_column(f"{TIME}:float").to_numpy()
    # Exact integers below 2**53: each value's shortest repr has <= 16 digits, which pandas'
    # float parser reads back exactly (its "high" precision path; verified by the tests).
    sidecar_ok = bool(frame.height == 0 or np.nanmax(np.abs(micros.astype(np.float64))) < 2**53)
    frame = frame.with_columns(pl.Series(f"{TIME}:float", micros.astype(np.float64) / 1e6))
    path = target / f"{rb.DATASET_NAME}.inter"
    sidecar = _sidecar_path(path)
    sidecar.unlink(missing_ok=True)  # never leave a sidecar that describes an older .inter
    # RecBole reads with pandas' default quoting: quote what needs it (tabs, quotes in ids).
    frame.write_csv(path, separator="\t", quote_style="necessary")
    if snapshot.has_rating and sidecar_ok:
        # e.g. a float32 rating 0.1 is written as 0.10000000149011612, which pandas reads 1 ulp off.
        parsed = _as_pandas_parses(frame.get_column(f"{RATING}:float"))
        sidecar_ok = parsed is not None
        if parsed is not None:
            frame = frame.with_columns(parsed)
    if sidecar_ok:
        tmp = sidecar.with_name(sidecar.name + ".tmp")
        frame.write_parquet(tmp, compression="lz4", statistics=False, metadata={_STAMP_KEY: _inter_stamp(path)})
        tmp.replace(sidecar)
    return path


def _as_pandas_parses(values: pl.Series, limit: int = 100_000) -> pl.Series | None:
    """``values`` as pandas' python-engine parser reads them back from their CSV text.

    Done on the distinct values; ``None`` when there are more than ``limit`` of them.
    """
    import io

    distinct = values.drop_nulls().unique()
    if distinct.len() > limit:
        return None
    text = pl.DataFrame({"v": distinct}).write_csv()
    parsed = pd.read_csv(io.StringIO(text), dtype={"v": np.float64}, engine="python")["v"].to_numpy()
    if np.array_equal(parsed, distinct.to_numpy(), equal_nan=True):
        return values
    return values.replace(distinct, pl.Series(parsed, dtype=pl.Float64))


def _model_loss_type(model_name: str, params: dict[str, Any]) -> str | None:
    if "loss_type" in params:
        return str(params["loss_type"])
    canonical = rb.available_models()[model_name.lower()]
    defaults = yaml.safe_load((rb.RECBOLE_DIR / "properties" / "model" / f"{canonical}.yaml").read_text()) or {}
    return defaults.get("loss_type")


def recbole_config_dict(
    config: PipelineConfig, data_dir: Path, checkpoint_dir: Path, has_rating: bool
) -> dict[str, Any]:
    d, t, e = config.dataset, config.training, config.evaluation
    split = {"LS": "valid_and_test"} if d.split == "loo" else {"RS": list(d.ratios)}
    load_cols = [USER, ITEM, TIME] + ([RATING] if has_rating else [])
    out: dict[str, Any] = {
        "data_path": str(data_dir),
        "checkpoint_dir": str(checkpoint_dir),
        "USER_ID_FIELD": USER,
        "ITEM_ID_FIELD": ITEM,
        "TIME_FIELD": TIME,
        "RATING_FIELD": RATING,
        "load_col": {"inter": load_cols},
        "user_inter_num_interval": f"[{d.min_user_interactions},inf)",
        "item_inter_num_interval": f"[{d.min_item_interactions},inf)",
        "MAX_ITEM_LIST_LENGTH": d.max_seq_length,
        "eval_args": {"split": split, "order": "TO", "group_by": "user", "mode": "full"},
        "metrics": list(e.metrics),
        "topk": list(e.topk),
        "valid_metric": e.valid_metric,
        "metric_decimal_place": 6,
        "epochs": t.epochs,
        "train_batch_size": t.train_batch_size,
        "eval_batch_size": t.eval_batch_size,
        "learning_rate": t.learning_rate,
        "stopping_step": t.early_stopping_patience,
        "seed": t.seed,
        "reproducibility": True,
        "show_progress": False,
        "log_wandb": False,
        "save_dataset": False,
        "save_dataloaders": False,
        "worker": t.dataloader_workers,
    }
    out.update(config.model.params)
    if _model_loss_type(config.model.name, config.model.params) == "CE":
        out["train_neg_sample_args"] = None
    return out


_CACHE: dict[str, RecBoleData] = {}


def load_recbole_data(
    config: PipelineConfig, splits: DatasetSplits, checkpoint_dir: Path, *, model_name: str | None = None
) -> RecBoleData:
    """RecBole config, dataset and train/valid/test loaders for ``model_name`` (default: the config's)."""
    name = model_name or config.model.name
    has_rating = _has_rating_column(splits)
    run_config = config.model_copy(deep=True)
    run_config.model.name = name
    if model_name is not None:
        run_config.model.params = {}
    device = resolve_device(config.training.device)
    cfg_dict = recbole_config_dict(run_config, splits.data_dir, checkpoint_dir, has_rating)
    key = hashlib.sha256(json.dumps([name, cfg_dict, str(device)], sort_keys=True, default=str).encode()).hexdigest()
    if key in _CACHE:
        return _CACHE[key]
    rb_config = rb.make_config(name, cfg_dict, device)
    # RecBole seeds torch/numpy/random globally from its config; do it before building.
    from recbole.utils import init_seed

    init_seed(rb_config["seed"], rb_config["reproducibility"])
    try:
        dataset = rb.create_dataset(rb_config)
        train, valid, test = rb.data_preparation(rb_config, dataset)
    except (ValueError, IndexError) as exc:
        d = config.dataset
        raise DataValidationError(
            f"cannot build train/valid/test from this data ({exc}); check dataset.min_user_interactions "
            f"({d.min_user_interactions}) and dataset.min_item_interactions ({d.min_item_interactions})"
        ) from None
    data = RecBoleData(rb_config, dataset, train, valid, test)
    _CACHE.clear()  # one run's data at a time keeps memory flat in long-lived workers
    _CACHE[key] = data
    return data


def _has_rating_column(splits: DatasetSplits) -> bool:
    inter = splits.data_dir / splits.dataset_name / f"{splits.dataset_name}.inter"
    with inter.open() as fh:
        return f"{RATING}:float" in fh.readline()


def build_dataset(snapshot: Snapshot, config: PipelineConfig, run_dir: Path) -> DatasetSplits:
    """Write the atomic files and build the split once, to count what training will see."""
    rb.resolve_model(config.model.name)  # fail fast on an unknown model name, before any work
    data_dir = run_dir / DATA_SUBDIR
    write_atomic_files(snapshot, data_dir)
    splits = DatasetSplits(
        data_dir=data_dir,
        dataset_name=rb.DATASET_NAME,
        users=0,
        items=0,
        interactions=0,
        split=config.dataset.split,
        fingerprint=snapshot.fingerprint,
        eval_protocol=eval_protocol(config),
    )
    data = load_recbole_data(config, splits, run_dir / "checkpoints")
    ds = data.dataset
    if ds.user_num <= 2 or ds.item_num <= 2:
        raise DataValidationError(
            f"after filtering users with < {config.dataset.min_user_interactions} interactions, "
            f"{ds.user_num - 1} users and {ds.item_num - 1} items remain: too few to train"
        )
    # RecBole reserves id 0 for padding, so counts are num - 1.
    return splits.model_copy(update={"users": ds.user_num - 1, "items": ds.item_num - 1, "interactions": ds.inter_num})




# --------------------------------------------------------------------------- RecBole fast paths
#
# RecBole 1.2.1 patches for large data sets (to move into core/recbole_compat.py). Each one
# replaces a per-row Python loop with vectorised code and produces the same objects RecBole's
# own code does (checked by tests/core/test_dataset_fastload.py against the originals):
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
#
# 4-5 run with the cyclic garbage collector paused (it cost ~7 s of a 10M-row build).
# Sets are filled with the same values in the same order as RecBole's loops, so even the
# iteration order of every set (and the tensors made from them) is unchanged.
# ``recbole_fast_paths(False)`` switches them all off (tests and benchmarks compare both).

_STAMP_KEY = "recflow.inter_stamp"
_STAMP_BYTES = 1 << 20
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
    from recbole.data.dataset import Dataset
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

    Dataset._load_feat = _load_feat
    Interaction.__getitem__ = _getitem
    Dataset._grouped_index = _grouped_index
    Dataset._split_index_by_leave_one_out = _split_index_by_leave_one_out
    Sampler.get_used_ids = _get_used_ids
    FullSortEvalDataLoader.__init__ = _full_sort_init
    AbstractDataLoader.__init__ = _abstract_loader_init


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
