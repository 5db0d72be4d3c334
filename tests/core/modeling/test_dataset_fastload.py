"""RecBole fast paths (core.modeling.recbole_fast_paths): the same DataFrame, splits, samplers, loaders
and metrics as RecBole's own code (``recbole_fast_paths.ORIGINALS``), on tricky tokens and on ml-100k."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from logging import getLogger
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import pytest
import torch
from recbole.data.dataset import Dataset
from recbole.data.interaction import Interaction
from recbole.utils import FeatureSource

from core.config import PipelineConfig, load_config
from core.data.extract import extract
from core.modeling import recbole_adapter as rb
from core.modeling import recbole_fast_paths as fast_paths
from core.modeling.dataset import (
    RecBoleData,
    build_recbole_data,
    load_inter_sidecar,
    recbole_config_dict,
    recbole_fast_paths,
    write_atomic_files,
)
from core.modeling.devices import resolve_device
from core.records import ITEM, RATING, TIME, USER, DatasetSplits, Snapshot


@pytest.fixture(autouse=True, scope="module")
def _fast_paths_installed() -> None:
    """Tests here call RecBole directly: put the fast paths in place (as load_recbole_data does)."""
    fast_paths.install_fast_paths()


def test_install_replaces_each_method_once_and_keeps_the_originals() -> None:
    fast_paths.install_fast_paths()  # a second call changes nothing
    for cls, attr in fast_paths.replaced_methods():
        assert getattr(cls.__dict__[attr], "__module__", None) == fast_paths.__name__, (cls, attr)
    assert all(f.__module__.startswith("recbole.") for f in fast_paths.ORIGINALS.values())
    assert len(fast_paths.ORIGINALS) == len(fast_paths.replaced_methods()) == 8


T0 = datetime(2023, 1, 1, tzinfo=UTC)
# Ids a CSV round trip can get wrong: separators, quotes, newlines, pandas' NA strings,
# spaces, leading zeros, unicode, numbers in text.
TRICKY = ["u\t1", 'say "hi"', "multi\nline", "NA", "null", "#N/A", " padded ", "007", "7", "ü-é", "1e3", "n/a x",
          "None", "", "nan", "-1.#IND", "a,b", "'q'", "\\back", "x\r", " NA", "NAN", "Null"]
# The ones pandas' read_csv (so RecBole) turns into NaN.
NA_LIKE = {"NA", "null", "#N/A", "None", "", "nan", "-1.#IND"}


def _snapshot(tmp_path: Path, users: list[str | None], items: list[str | None], rating: bool = True) -> Snapshot:
    n = len(users)
    frame = pl.DataFrame(
        {
            USER: users,
            ITEM: items,
            TIME: [T0 + timedelta(seconds=37 * k, microseconds=(k * 7919) % 1_000_000) for k in range(n)],
            RATING: [float(1 + k % 5) for k in range(n)],
        },
        schema={USER: pl.String, ITEM: pl.String, TIME: pl.Datetime("us", "UTC"), RATING: pl.Float32},
    )
    if not rating:
        frame = frame.drop(RATING)
    path = tmp_path / "snapshot.parquet"
    frame.write_parquet(path)
    return Snapshot(path=path, source="t", rows=n, users=0, items=0, has_rating=rating, fingerprint="f")


def _tricky_snapshot(tmp_path: Path, missing_items: bool = True) -> Snapshot:
    """Every tricky string as a user (6 rows each) and as an item; a null user id too.

    ``missing_items=False`` keeps items RecBole would read as missing (null, "NA", ...) out:
    RecBole 1.2.1's ``_filter_nan_user_or_item`` mixes index labels and positions once it
    has dropped rows for missing users, and then fails (or drops the wrong rows) on missing items.
    """
    users: list[str | None] = []
    items: list[str | None] = []
    item_pool = TRICKY if missing_items else [t for t in TRICKY if t not in NA_LIKE]
    for u, user in enumerate(TRICKY):
        for k in range(6):
            users.append(user)
            items.append(item_pool[(u + k) % len(item_pool)] if k != 3 else f"item{k}")
    users[5] = None
    if missing_items:
        items[8] = None
    return _snapshot(tmp_path, users, items)


def _rb_config(config: PipelineConfig, data_dir: Path, tmp_path: Path, has_rating: bool = True) -> Any:
    cfg = recbole_config_dict(config, data_dir, tmp_path / "ckpt", has_rating)
    return rb.make_config(config.model.name, cfg, resolve_device("cpu"))


def _load_feat(rb_config: Any, inter: Path, fast: bool) -> tuple[pd.DataFrame, dict[str, Any]]:
    """RecBole's _load_feat on a bare Dataset, with or without the fast path."""
    dataset = Dataset.__new__(Dataset)
    dataset.config, dataset.dataset_name, dataset.logger = rb_config, rb.DATASET_NAME, getLogger()
    dataset._get_preset()
    dataset._get_field_from_config()
    with recbole_fast_paths(fast):
        frame = dataset._load_feat(str(inter), FeatureSource.INTERACTION)
    props = {n: dict(getattr(dataset, n)) for n in ("field2type", "field2source", "field2seqlen", "field2bucketnum")}
    return frame, props


def _assert_same_frame(fast: pd.DataFrame, slow: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(fast, slow, check_exact=True)
    for column in slow.columns:
        assert fast[column].dtype == slow[column].dtype
        # Missing tokens are float NaN on both sides (not None), strings are str.
        assert [type(v) for v in fast[column]] == [type(v) for v in slow[column]], column


def _assert_same_interaction(a: Interaction, b: Interaction) -> None:
    assert list(a.interaction) == list(b.interaction)
    for key in a.interaction:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def _build(snapshot: Snapshot, config: PipelineConfig, run_dir: Path, fast: bool) -> tuple[DatasetSplits, RecBoleData]:
    with recbole_fast_paths(fast):
        return build_recbole_data(snapshot, config, run_dir)


def _assert_same_data(fast: RecBoleData, slow: RecBoleData) -> None:
    for name in ("field2type", "field2source", "field2seqlen", "field2token_id"):
        assert getattr(fast.dataset, name) == getattr(slow.dataset, name), name
    assert fast.dataset.field2id_token.keys() == slow.dataset.field2id_token.keys()
    for field, tokens in slow.dataset.field2id_token.items():
        assert fast.dataset.field2id_token[field].tolist() == tokens.tolist(), field
    _assert_same_interaction(fast.dataset.inter_feat, slow.dataset.inter_feat)
    for part in ("train", "valid", "test"):
        a, b = getattr(fast, part), getattr(slow, part)
        assert type(a) is type(b)
        _assert_same_interaction(a._dataset.inter_feat, b._dataset.inter_feat)
        if hasattr(b, "uid2positive_item"):  # full-sort loaders of general models
            assert torch.equal(a.uid_list, b.uid_list)
            assert np.array_equal(a.uid2items_num, b.uid2items_num)
            for mine, theirs in ((a.uid2positive_item, b.uid2positive_item), (a.uid2history_item, b.uid2history_item)):
                assert len(mine) == len(theirs)
                for x, y in zip(mine, theirs):
                    # Same values in the same order (the sets were filled in the same order).
                    assert (x is None and y is None) or torch.equal(x, y)
            _assert_same_interaction(a.user_df, b.user_df)
        sa, sb = a._sampler, b._sampler
        assert (sa is None) == (sb is None)
        if sb is not None:
            assert sa.phase == sb.phase
            assert [list(s) for s in sa.used_ids] == [list(s) for s in sb.used_ids]


# --------------------------------------------------------------------------- the loaded DataFrame


def test_sidecar_frame_equals_recbole_read_csv_on_tricky_tokens(tmp_path: Path) -> None:
    snapshot = _tricky_snapshot(tmp_path)
    inter = write_atomic_files(snapshot, tmp_path / "data")
    assert Path(f"{inter}.parquet").is_file()
    rb_config = _rb_config(load_config(overrides={"model.name": "BPR"}), tmp_path / "data", tmp_path)
    slow, slow_props = _load_feat(rb_config, inter, fast=False)
    fast, fast_props = _load_feat(rb_config, inter, fast=True)
    _assert_same_frame(fast, slow)
    assert fast_props == slow_props
    # pandas' NA strings and the null ids are NaN; the rest survive as written.
    users = fast["user_id"]
    assert users.isna().sum() == 6 * len(NA_LIKE) + 1  # their 6 rows each, and the null user
    assert {"u\t1", 'say "hi"', "multi\nline", " padded ", "007", "7", "1e3", "x\r"} <= set(users.dropna())


def test_stale_or_missing_sidecar_falls_back_to_the_text_file(tmp_path: Path) -> None:
    snapshot = _snapshot(tmp_path, [f"u{k % 3}" for k in range(30)], [f"i{k % 7}" for k in range(30)], rating=False)
    inter = write_atomic_files(snapshot, tmp_path / "data")
    columns, types = ["user_id:token", "item_id:token", "timestamp:float"], ["token", "token", "float"]
    assert load_inter_sidecar(inter, columns, types) is not None
    assert load_inter_sidecar(inter, columns + ["rating:float"], types + ["float"]) is None  # not in the sidecar
    # An edited .inter file no longer matches the stamp: RecBole's reader takes over.
    lines = inter.read_text().splitlines(keepends=True)
    inter.write_text("".join(lines[:-1]))
    assert load_inter_sidecar(inter, columns, types) is None
    rb_config = _rb_config(load_config(overrides={"model.name": "BPR"}), tmp_path / "data", tmp_path, has_rating=False)
    fast, _ = _load_feat(rb_config, inter, fast=True)
    slow, _ = _load_feat(rb_config, inter, fast=False)
    assert len(fast) == 29
    _assert_same_frame(fast, slow)
    Path(f"{inter}.parquet").unlink()
    assert load_inter_sidecar(inter, columns, types) is None


def test_interaction_index_fast_path_matches_recbole() -> None:
    data = Interaction({"a": torch.arange(10) * 3, "b": torch.arange(20, dtype=torch.float32).view(10, 2)})
    indexes: list[Any] = [
        [3, 1, 1, 9], np.array([0, 5, 2]), torch.tensor([4, 4, 0]), np.array([True] * 5 + [False] * 5),
        [np.int64(2), np.int64(7)], np.array([1, 2], dtype=np.uint8), torch.tensor([1, 8], dtype=torch.int32),
        [], slice(2, 5), 3, [-1, -2],
    ]
    for index in indexes:
        with recbole_fast_paths(False):
            expected = data[index]
        with recbole_fast_paths(True):
            got = data[index]
        _assert_same_interaction(got, expected)


# --------------------------------------------------------------------------- whole builds


@pytest.mark.parametrize("split", ["loo", "ratio"])
def test_tricky_tokens_build_the_same_dataset(tmp_path: Path, split: str) -> None:
    snapshot = _tricky_snapshot(tmp_path, missing_items=False)
    config = load_config(
        overrides={"model.name": "BPR", "dataset.split": split, "dataset.min_user_interactions": 3,
                   "training.device": "cpu"}
    )
    _, slow = _build(snapshot, config, tmp_path / "slow", fast=False)
    _, fast = _build(snapshot, config, tmp_path / "fast", fast=True)
    _assert_same_data(fast, slow)


@pytest.fixture(scope="module")
def ml100k_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    run_dir = tmp_path_factory.mktemp("ml100k")
    return extract(load_config(), run_dir)


def test_ml100k_bpr_identical_splits_loaders_and_metrics(ml100k_snapshot: Snapshot, tmp_path: Path) -> None:
    from core.modeling.evaluation import ranking_metrics
    from core.modeling.training import build_model, make_trainer

    config = load_config(
        overrides={"model.name": "BPR", "model.params": {"embedding_size": 16}, "training.epochs": 1,
                   "training.device": "cpu", "training.train_batch_size": 4096}
    )
    splits_slow, slow = _build(ml100k_snapshot, config, tmp_path / "slow", fast=False)
    splits_fast, fast = _build(ml100k_snapshot, config, tmp_path / "fast", fast=True)
    # The .inter text is byte for byte what recflow wrote before the fast paths (integer-second
    # timestamps divide exactly either way), so the slow side is the previous code path.
    before = pl.read_parquet(ml100k_snapshot.path).select(
        pl.col(USER).alias(f"{USER}:token"),
        pl.col(ITEM).alias(f"{ITEM}:token"),
        (pl.col(TIME).dt.epoch("us").cast(pl.Float64) / 1_000_000).alias(f"{TIME}:float"),
        pl.col(RATING).cast(pl.Float64).alias(f"{RATING}:float"),
    )
    inter = splits_fast.data_dir / "interactions" / "interactions.inter"
    assert inter.read_text() == before.write_csv(separator="\t", quote_style="necessary")
    assert splits_fast == splits_slow.model_copy(update={"data_dir": splits_fast.data_dir})
    assert (splits_fast.users, splits_fast.items, splits_fast.interactions) == (943, 1682, 100_000)
    assert [len(d._dataset) for d in (fast.train, fast.valid, fast.test)] == [98_114, 943, 943]
    _assert_same_data(fast, slow)

    metrics = {}
    from recbole.utils import init_seed

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster, and immune to a busy machine
    try:
        for name, data in (("slow", slow), ("fast", fast)):
            with recbole_fast_paths(name == "fast"):
                init_seed(data.config["seed"], data.config["reproducibility"])
                model = build_model(data)
                checkpoint = tmp_path / name / "best.pth"
                trainer = make_trainer(data, model, checkpoint)
                trainer.fit(data.train, data.valid, verbose=False, saved=False)
                trainer.tensorboard.close()
                metrics[name] = ranking_metrics(data, model, checkpoint)
    finally:
        torch.set_num_threads(threads)
    assert metrics["fast"] == metrics["slow"]
    assert metrics["fast"][1]["ndcg@10"] > 0


def test_ml100k_sasrec_identical_splits(ml100k_snapshot: Snapshot, tmp_path: Path) -> None:
    config = load_config(overrides={"model.name": "SASRec", "training.device": "cpu"})
    _, slow = _build(ml100k_snapshot, config, tmp_path / "slow", fast=False)
    _, fast = _build(ml100k_snapshot, config, tmp_path / "fast", fast=True)
    _assert_same_data(fast, slow)
    assert len(fast.train._dataset) == 100_000 - 2 * 943 - 943  # one sample per row after each user's first


def test_random_microsecond_timestamps_and_float32_ratings_read_back_identically(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    n = 30_000
    micros = rng.integers(-2_000_000_000_000_000, 4_000_000_000_000_000, n)
    micros[:6] = [0, 1, 999_999, 1_000_000, -1, 1_672_531_496_063_352]
    frame = pl.DataFrame(
        {
            USER: [f"u{k % 97}" for k in range(n)],
            ITEM: [f"i{k % 89}" for k in range(n)],
            TIME: pl.Series(micros).cast(pl.Datetime("us")).dt.replace_time_zone("UTC"),
            RATING: pl.Series(rng.choice([0.1, 0.7, 1.0, 3.3, 4.5, 2.0 / 3.0], n)).cast(pl.Float32),
        }
    )
    path = tmp_path / "s.parquet"
    frame.write_parquet(path)
    snapshot = Snapshot(path=path, source="t", rows=n, users=97, items=89, has_rating=True, fingerprint="f")
    inter = write_atomic_files(snapshot, tmp_path / "data")
    assert Path(f"{inter}.parquet").is_file()
    rb_config = _rb_config(load_config(overrides={"model.name": "BPR"}), tmp_path / "data", tmp_path)
    slow, _ = _load_feat(rb_config, inter, fast=False)
    fast, _ = _load_feat(rb_config, inter, fast=True)
    _assert_same_frame(fast, slow)
    # float32 0.1 is written as 0.10000000149011612 and read back 1 ulp off: the sidecar agrees.
    assert 0.10000000149011612 not in set(slow["rating"]) and len(set(slow["rating"])) == 6
    # The timestamps are the exact micro-second instants (correctly rounded), not 1 ulp off.
    assert np.array_equal(slow["timestamp"].to_numpy(), micros / 1e6)


def test_na_strings_are_pandas_defaults() -> None:
    from pandas._libs.parsers import STR_NA_VALUES

    assert fast_paths._PANDAS_NA_STRINGS == STR_NA_VALUES


# --------------------------------------------------------------------------- sequential augmentation


def _augmentation_fallback(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every time the fast data_augmentation hands over to RecBole's loop."""
    originals = fast_paths.ORIGINALS
    calls: list[str] = []
    loop = originals["data_augmentation"]

    def recorded(self: Any) -> None:
        calls.append("loop")
        loop(self)

    monkeypatch.setitem(originals, "data_augmentation", recorded)
    return calls


def _varied_users_snapshot(tmp_path: Path, seed: int = 3) -> Snapshot:
    """Users of 1..23 interactions (some under min_user_interactions, most longer than the
    history), rows shuffled, times out of row order with ties inside a user, float ratings."""
    rng = np.random.default_rng(seed)
    lengths = [1, 2, 3, 4, 5, 6, 7, 9, 12, 15, 23, 3, 8, 4]
    users = np.repeat([f"u{k}" for k in range(len(lengths))], lengths)
    n = users.size
    items = [f"i{v}" for v in rng.integers(0, 17, n)]
    seconds = rng.integers(0, 40, n) * 60  # few distinct values: ties within a user
    order = rng.permutation(n)
    frame = pl.DataFrame(
        {
            USER: users[order].tolist(),
            ITEM: [items[k] for k in order],
            TIME: [T0 + timedelta(seconds=int(seconds[k]), microseconds=int(k) * 13) for k in order],
            RATING: rng.choice([1.0, 2.5, 3.0, 4.5, 5.0], n)[order].tolist(),
        },
        schema={USER: pl.String, ITEM: pl.String, TIME: pl.Datetime("us", "UTC"), RATING: pl.Float32},
    )
    path = tmp_path / "snapshot.parquet"
    frame.write_parquet(path)
    return Snapshot(path=path, source="t", rows=n, users=0, items=0, has_rating=True, fingerprint="f")


@pytest.mark.parametrize(("model", "max_len", "split"), [("SASRec", 4, "loo"), ("GRU4Rec", 2, "ratio"),
                                                          ("SASRec", 50, "loo")])
def test_sequential_augmentation_builds_the_same_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str, max_len: int, split: str
) -> None:
    snapshot = _varied_users_snapshot(tmp_path)
    config = load_config(
        overrides={"model.name": model, "dataset.max_seq_length": max_len, "dataset.split": split,
                   "dataset.min_user_interactions": 3, "training.device": "cpu"}
    )
    _, slow = _build(snapshot, config, tmp_path / "slow", fast=False)
    fallback = _augmentation_fallback(monkeypatch)
    _, fast = _build(snapshot, config, tmp_path / "fast", fast=True)
    assert fallback == []  # the vectorised path built it
    _assert_same_data(fast, slow)  # the augmented inter_feat, field by field, and train/valid/test
    feat = fast.dataset.inter_feat
    assert {"item_id_list", "timestamp_list", "rating_list", "item_length"} <= set(feat.interaction)
    assert feat["item_id_list"].shape[1] == max_len and feat["rating_list"].dtype == torch.float32
    lengths = feat["item_length"]
    assert int(lengths.min()) == 1 and int(lengths.max()) == min(max_len, 22)


def _write_seq_inter(data_dir: Path, seed: int = 5) -> None:
    """An .inter file with token_seq and float_seq columns next to the usual ones."""
    rng = np.random.default_rng(seed)
    lengths = [3, 4, 6, 9, 14, 5, 3]
    lines = ["user_id:token\titem_id:token\ttimestamp:float\trating:float\ttags:token_seq\tscores:float_seq"]
    rows = []
    for u, count in enumerate(lengths):
        for _ in range(count):
            tags = " ".join(f"t{v}" for v in rng.integers(0, 6, rng.integers(1, 4)))
            scores = " ".join(f"{v:.2f}" for v in rng.random(rng.integers(1, 5)))
            rows.append(f"u{u}\ti{rng.integers(0, 11)}\t{int(rng.integers(0, 30)) * 10}\t{rng.integers(1, 6)}.5"
                        f"\t{tags}\t{scores}")
    lines += [rows[k] for k in rng.permutation(len(rows))]
    folder = data_dir / rb.DATASET_NAME
    folder.mkdir(parents=True)
    (folder / f"{rb.DATASET_NAME}.inter").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("numerical", [[], ["rating", "scores"], ["timestamp", "rating"]])
def test_sequential_augmentation_seq_fields_and_numerical_features(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, numerical: list[str]
) -> None:
    from recbole.data.dataset import SequentialDataset

    _write_seq_inter(tmp_path / "data")
    config = load_config(overrides={"model.name": "SASRec", "dataset.max_seq_length": 5, "dataset.split": "loo",
                                    "dataset.min_user_interactions": 3, "training.device": "cpu"})
    built: dict[bool, tuple[Any, Any]] = {}
    for fast in (False, True):
        cfg = recbole_config_dict(config, tmp_path / "data", tmp_path / f"ckpt-{fast}", True)
        cfg["load_col"] = {"inter": [USER, ITEM, TIME, RATING, "tags", "scores"]}
        cfg["numerical_features"] = numerical
        rb_config = rb.make_config("SASRec", cfg, resolve_device("cpu"))
        fallback = _augmentation_fallback(monkeypatch) if fast else []
        with recbole_fast_paths(fast):
            dataset = rb.create_dataset(rb_config)
            parts = rb.data_preparation(rb_config, dataset)
        assert isinstance(dataset, SequentialDataset) and fallback == []
        built[fast] = dataset, parts
    (fast_ds, fast_parts), (slow_ds, slow_parts) = built[True], built[False]
    assert fast_ds.field2seqlen == slow_ds.field2seqlen and fast_ds.field2type == slow_ds.field2type
    _assert_same_interaction(fast_ds.inter_feat, slow_ds.inter_feat)
    for a, b in zip(fast_parts, slow_parts):
        _assert_same_interaction(a._dataset.inter_feat, b._dataset.inter_feat)
    feat = fast_ds.inter_feat
    assert feat["tags_list"].dim() == 3 and feat["tags_list"].shape[1] == 5
    assert feat["scores_list"].dim() == (4 if "scores" in numerical else 3)
    for field in numerical:
        assert feat[f"{field}_list"].shape[-1] == 2


def test_sequential_augmentation_falls_back_for_shapes_it_does_not_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A list field wider than MAX_ITEM_LIST_LENGTH (RecBole's loop fills its first columns): its own loop builds it.
    from recbole.data.dataset import SequentialDataset

    snapshot = _varied_users_snapshot(tmp_path)
    config = load_config(overrides={"model.name": "SASRec", "dataset.max_seq_length": 4,
                                    "dataset.min_user_interactions": 3, "training.device": "cpu"})
    presets = SequentialDataset._aug_presets

    def odd_presets(self: Any) -> None:
        presets(self)
        self.field2seqlen[self.rating_list_field] = 6

    monkeypatch.setattr(SequentialDataset, "_aug_presets", odd_presets)
    fallback = _augmentation_fallback(monkeypatch)
    _, fast = _build(snapshot, config, tmp_path / "fast", fast=True)
    assert fallback == ["loop"]
    feat = fast.dataset.inter_feat
    assert feat["rating_list"].shape[1] == 6 and feat["item_id_list"].shape[1] == 4
    assert not feat["rating_list"][:, 4:].any()
