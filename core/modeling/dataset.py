"""build: snapshot -> RecBole atomic files, and the RecBole dataset/dataloaders over them.

The split itself is RecBole's (time-ordered leave-one-out or ratio, grouped by user), so
our metrics are exactly what RecBole's evaluator computes. ``load_recbole_data`` builds the
dataset and loaders from the atomic files deterministically, every time it is called: there
is no cache. The caller owns the result (``RecBoleData``): the flow builds it once
(``build_recbole_data``, in the build task) and hands it to train, evaluate and export; a
retry, or a resumed run in another process, builds it again from the run folder alone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import yaml

from core.config import PipelineConfig
from core.errors import ConfigError, DataValidationError
from core.modeling import recbole_adapter as rb
from core.modeling import recbole_fast_paths as fast_paths
from core.modeling.devices import resolve_device
from core.modeling.recbole_fast_paths import load_inter_sidecar, recbole_fast_paths  # noqa: F401  (re-exported)
from core.records import ITEM, RATING, TIME, USER, DatasetSplits, Snapshot

DATA_SUBDIR = "recbole"


@dataclass(eq=False)
class RecBoleData:
    """The in-memory RecBole objects for one run: a handle its caller owns and passes on.

    Built by ``load_recbole_data`` (or ``build_recbole_data``); never persisted, never cached.
    Training consumes the train loader (its shuffle state and batch size), evaluation and
    export read it afterwards, as RecBole's own pipeline does.
    """

    config: Any  # recbole.config.Config
    dataset: Any
    train: Any
    valid: Any
    test: Any
    # evaluation.task=rating: the (min, max) rating the label was scaled to [0, 1] from.
    rating_scale: tuple[float, float] | None = None
    # What it was built from (model, RecBole config dict, device): see ``data_key``.
    key: str = ""


def eval_protocol(config: PipelineConfig) -> str:
    """A stable id of what makes test metrics comparable: split and filters."""
    d = config.dataset
    split = "loo" if d.split == "loo" else "ratio:" + ",".join(f"{r:g}" for r in d.ratios)
    protocol = f"{split}|min_user={d.min_user_interactions}|min_item={d.min_item_interactions}"
    # Rating metrics never compare with ranking ones (ranking ids stay as they were).
    return protocol + "|task=rating" if config.evaluation.task == "rating" else protocol


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
    sidecar = fast_paths.sidecar_path(path)
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
        frame.write_parquet(tmp, compression="lz4", statistics=False, metadata={fast_paths.STAMP_KEY: fast_paths.inter_stamp(path)})
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
        "train_batch_size": t.initial_train_batch_size,  # "auto" is resolved by core/modeling/batch_finder.py
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
    if e.task == "rating":
        # Pointwise training on the rating itself (scaled to [0, 1] in load_recbole_data, no negative
        # sampling) and "labeled" evaluation: RecBole predicts each held-out (user, item) pair.
        out["LABEL_FIELD"] = RATING
        out["train_neg_sample_args"] = None
        out["eval_args"]["mode"] = "labeled"
    out.update(config.model.params)
    if _model_loss_type(config.model.name, config.model.params) == "CE":
        out["train_neg_sample_args"] = None
    return out


def data_key(
    config: PipelineConfig, splits: DatasetSplits, checkpoint_dir: Path, *, model_name: str | None = None
) -> str:
    """What ``load_recbole_data`` would build for these arguments, as a hash (equal keys: equal data)."""
    return _recbole_inputs(config, splits, checkpoint_dir, model_name)[3]


def _recbole_inputs(
    config: PipelineConfig, splits: DatasetSplits, checkpoint_dir: Path, model_name: str | None
) -> tuple[str, PipelineConfig, dict[str, Any], str, Any]:
    name = model_name or config.model.name
    run_config = config.model_copy(deep=True)
    run_config.model.name = name
    if model_name is not None:
        run_config.model.params = {}
    device = resolve_device(config.training.device)
    cfg_dict = recbole_config_dict(run_config, splits.data_dir, checkpoint_dir, _has_rating_column(splits))
    key = hashlib.sha256(json.dumps([name, cfg_dict, str(device)], sort_keys=True, default=str).encode()).hexdigest()
    return name, run_config, cfg_dict, key, device


def check_data(data: RecBoleData, config: PipelineConfig, splits: DatasetSplits, checkpoint_dir: Path) -> None:
    """Raise ``ValueError`` when ``data`` was not built for these arguments (a handle passed to the wrong run)."""
    if data.key != data_key(config, splits, checkpoint_dir):
        raise ValueError("this RecBoleData was built for another configuration or run folder")


def load_recbole_data(
    config: PipelineConfig, splits: DatasetSplits, checkpoint_dir: Path, *, model_name: str | None = None
) -> RecBoleData:
    """Build the RecBole config, dataset and train/valid/test loaders for ``model_name`` (default: the config's).

    Every call builds (a few seconds at ml-100k scale, minutes at 10M rows): keep the result
    and pass it on rather than calling again. RecBole's fast paths are installed first
    (``core.modeling.recbole_fast_paths``; ``RECFLOW_RECBOLE_FAST=0`` keeps RecBole's own code).
    """
    name, run_config, cfg_dict, key, device = _recbole_inputs(config, splits, checkpoint_dir, model_name)
    fast_paths.install_fast_paths()
    rb_config = rb.make_config(name, cfg_dict, device)
    # RecBole seeds torch/numpy/random globally from its config; do it before building.
    from recbole.utils import init_seed

    init_seed(rb_config["seed"], rb_config["reproducibility"])
    try:
        dataset = rb.create_dataset(rb_config)
        rating_scale = _scale_ratings(dataset) if run_config.evaluation.task == "rating" else None
        train, valid, test = rb.data_preparation(rb_config, dataset)
    except (ValueError, IndexError) as exc:
        d = config.dataset
        raise DataValidationError(
            f"cannot build train/valid/test from this data ({exc}); check dataset.min_user_interactions "
            f"({d.min_user_interactions}) and dataset.min_item_interactions ({d.min_item_interactions})"
        ) from None
    return RecBoleData(rb_config, dataset, train, valid, test, rating_scale, key)


def _scale_ratings(dataset: Any) -> tuple[float, float]:
    """Min-max scale the rating label to [0, 1] in place (before the split); returns (min, max).

    RecBole's pointwise models train a sigmoid output with BCE, so the label must lie in [0, 1];
    evaluation maps predictions back with (min, max) to report RMSE/MAE on the original scale.
    """
    values = dataset.inter_feat[RATING].to_numpy(dtype=np.float64)
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise DataValidationError("evaluation.task 'rating' needs a numeric rating on every interaction")
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        raise DataValidationError(f"evaluation.task 'rating': every rating is {lo:g}, nothing to predict")
    dataset.inter_feat[RATING] = ((values - lo) / (hi - lo)).astype(np.float32)
    return lo, hi


def check_rating_setup(config: PipelineConfig, has_rating: bool | None = None) -> None:
    """evaluation.task=rating needs ratings in the data and a model that predicts a label per (user, item).

    ``has_rating`` None: the data is not read yet (the CLI's preflight); only the model is checked.
    """
    if config.evaluation.task != "rating":
        return
    if has_rating is False:
        raise DataValidationError(
            "evaluation.task 'rating' needs a rating column, and this data has none (set columns.rating)"
        )
    from recbole.utils import InputType, ModelType

    cls = rb.resolve_model(config.model.name)
    kind, input_type = getattr(cls, "type", None), getattr(cls, "input_type", None)
    if kind not in (ModelType.CONTEXT, ModelType.GENERAL) or input_type != InputType.POINTWISE:
        raise ConfigError(
            f"evaluation.task 'rating' needs a model that predicts a rating per (user, item) pair, e.g. FM, "
            f"DeepFM or NeuMF; {config.model.name} is a {str(getattr(kind, 'name', 'other')).lower()} model "
            f"trained to rank items"
        )


def _has_rating_column(splits: DatasetSplits) -> bool:
    inter = splits.data_dir / splits.dataset_name / f"{splits.dataset_name}.inter"
    with inter.open() as fh:
        return f"{RATING}:float" in fh.readline()


def build_dataset(snapshot: Snapshot, config: PipelineConfig, run_dir: Path) -> DatasetSplits:
    """Write the atomic files and build the split once, to count what training will see.

    The RecBole data built on the way is dropped: ``build_recbole_data`` returns it too.
    """
    return build_recbole_data(snapshot, config, run_dir)[0]


def build_recbole_data(snapshot: Snapshot, config: PipelineConfig, run_dir: Path) -> tuple[DatasetSplits, RecBoleData]:
    """Write the atomic files, build the RecBole data over them and count what training will see.

    Returns the split record (what crosses task boundaries and survives the process) and the
    in-memory data, which the caller owns and passes to ``train`` / ``evaluate`` / export.
    """
    rb.resolve_model(config.model.name)  # fail fast on an unknown model name, before any work
    check_rating_setup(config, snapshot.has_rating)
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
    counted = splits.model_copy(update={"users": ds.user_num - 1, "items": ds.item_num - 1, "interactions": ds.inter_num})
    return counted, data
