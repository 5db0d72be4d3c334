"""Peer comparison: RecTools' SASRecModel trained on recflow's own ml-100k split, scored by recflow's protocol.

    python benchmarks/rectools_peer.py                    # export (if needed), train RecTools, table + summary.json
    python benchmarks/rectools_peer.py --export           # recflow side only: write the split (and check it)
    python benchmarks/rectools_peer.py --seed 7           # another seed (summary_seed7.json)
    python benchmarks/rectools_peer.py --stopping-step 5 --epoch-cap 200   # recflow's figures unscaled

RecTools (``rectools[torch]==0.19.0``) lives in its own virtual environment,
``benchmarks/.rectools-venv`` (recflow pins numpy<2 and pandas<3 and must not be disturbed); see
benchmarks/README.md for how to make it. Two processes, each in its own environment:

* ``--export`` (recflow's environment, imports ``core``): loads the split ``time_to_quality.py
  --prepare`` wrote to ``benchmarks/.ttq/data`` through ``core.modeling.dataset.load_recbole_data`` and writes
  ``benchmarks/.ttq/peer/split.csv``, one row per interaction: user and item as raw tokens
  (``dataset.id2token``), its position in the user's sequence and its part (``train``, ``valid``,
  ``test``). A user's train sequence is rebuilt from RecBole's augmented train rows exactly as
  recflow's all-position training does (``sequences_from_train_rows``: the first row's first history
  item, then every row's target). Checks: 943 users, every valid/test row's history (RecBole's
  ``item_id_list``, the last 50 items) equals the last 50 of train (valid) or train + valid (test), and
  the valid/test items equal ``recflow_split.json``. If the checkpoint of the time-to-quality
  benchmark's ``last_item`` run is still there, it also scores that recflow model from the exported
  histories with this file's metric code and compares with the metrics recflow recorded for it.
* ``--side rectools`` (RecTools' environment, never imports ``core``): builds a RecTools ``Dataset`` of
  train + valid interactions (the datetime is each item's position in the user's sequence, so the order
  is recflow's exactly), trains ``SASRecModel`` with the valid item of every user as RecTools' validation
  fold (``get_val_mask_func``: excluded from training), computes valid NDCG@10 itself after every epoch
  from RecTools' validation logits, stops early with RecBole's rule (the one recflow's reference run
  used) and restores the best epoch's weights. RecTools trains each user's newest 51 items only (one
  sequence per user), 38,762 targets an epoch against recflow's 97,171 (every train target once), so
  by default recflow's patience (5: stop after 6 epochs without a gain) and epoch cap (200) are scaled
  by that ratio (``--stopping-step auto`` -> 14, ``--epoch-cap auto`` -> 501). Then
  ``model.recommend(k=10)`` on a dataset of train interactions (valid) and of train + valid
  interactions (test: the valid item is in the history, as in recflow), once with
  ``filter_viewed=False`` (recflow's ``test``) and once with ``filter_viewed=True`` (recflow's
  ``test_seen_masked``).

Metrics: NDCG@10 and Hit@10 over all 943 users, one held-out item each (a user whose item RecTools
cannot rank, e.g. an item never seen in training, counts as a miss). CPU-seconds
(``time.process_time``) are the measure; counted as training: ``fit`` (epochs and their validation),
from after the dataset is built.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TTQ = HERE / ".ttq"
PEER = TTQ / "peer"
SPLIT = PEER / "split.csv"
EXPORT = PEER / "export.json"
RECTOOLS_PYTHON = HERE / ".rectools-venv" / "bin" / "python"
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=4294967295"  # as cli.py

K = 10
N_USERS = 943
MAX_LEN = 50
SEED = 2020
# recflow's defaults for SASRec (configs + RecBole's SASRec yaml), all-position training.
RECFLOW = {"n_layers": 2, "n_heads": 2, "hidden_size": 64, "inner_size": 256, "dropout": 0.2,
           "max_len": MAX_LEN, "lr": 1e-3, "batch_size": 128, "loss": "softmax (CE)", "stopping_step": 5,
           "epoch_cap": 200}


# ---------------------------------------------------------------------------------------
# The metric (shared by both environments: plain Python)
# ---------------------------------------------------------------------------------------


def ndcg_hit(top: dict[str, list[str]], truth: dict[str, str], n_users: int | None = None) -> dict[str, float]:
    """Mean NDCG@K and Hit@K, one held-out item per user (RecBole's full-ranking metrics for one positive).

    NDCG = 1/log2(rank + 1) when the item is at 1-based ``rank`` <= K of the user's list, else 0.
    Users of ``truth`` without a list count as misses; the mean is over ``n_users`` (default: all of ``truth``).
    """
    ndcg = hits = 0.0
    for user, item in truth.items():
        ranked = top.get(user, [])[:K]
        if item in ranked:
            hits += 1.0
            ndcg += 1.0 / math.log2(ranked.index(item) + 2)
    n = n_users or len(truth)
    return {"ndcg@10": ndcg / n, "hit@10": hits / n}


def _self_check_metric() -> None:
    # ranks 1 and 3 and a miss: NDCG (1 + 1/log2(4) + 0) / 3 = 0.5, Hit 2/3; a list past K is cut.
    truth = {"a": "x", "b": "y", "c": "z", "d": "w"}
    top = {"a": ["x", "q"], "b": ["q", "r", "y"], "c": ["q"], "d": [str(i) for i in range(K)] + ["w"]}
    got = ndcg_hit(top, truth)
    assert abs(got["ndcg@10"] - 1.5 / 4) < 1e-12 and abs(got["hit@10"] - 0.5) < 1e-12, got
    assert abs(ndcg_hit(top, {"b": "y"})["ndcg@10"] - 0.5) < 1e-12


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# --export: recflow's split as raw tokens (recflow's environment)
# ---------------------------------------------------------------------------------------


def export_split(threads: int) -> None:
    c0 = time.process_time()
    import hashlib

    import numpy as np
    import pandas as pd
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(REPO))
    from core.config import load_config
    from core.modeling.dataset import load_recbole_data
    from core.modeling.sequence_windows import sequences_from_train_rows
    from core.records import DatasetSplits

    splits_path = TTQ / "data" / "splits.json"
    if not splits_path.is_file():
        sys.exit(f"error: {splits_path} is missing: run `python benchmarks/time_to_quality.py --prepare` first")
    PEER.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, {"runs_dir": PEER / "runs", "training.threads": threads})
    splits = DatasetSplits.model_validate_json(splits_path.read_text())
    data = load_recbole_data(cfg, splits, PEER / "checkpoints")
    ds = data.dataset
    uid, iid = ds.uid_field, ds.iid_field
    list_field, len_field = ds.item_id_list_field, ds.item_list_length_field

    tr = data.train.dataset.inter_feat
    train_users = tr[uid].numpy()
    seqs = sequences_from_train_rows(train_users, tr[list_field][:, 0].numpy(), tr[iid].numpy())
    seq_users = np.unique(train_users)  # sequences_from_train_rows groups rows by a stable sort on the user id
    assert len(seq_users) == len(seqs.lengths)
    train_seq = {int(u): seqs.items[seqs.offsets[k]:seqs.offsets[k + 1]] for k, u in enumerate(seq_users)}

    held: dict[str, dict[int, tuple[int, np.ndarray]]] = {}
    for part, loader in (("valid", data.valid), ("test", data.test)):
        feat = loader._dataset.inter_feat
        lists, lengths = feat[list_field].numpy(), feat[len_field].numpy()
        held[part] = {int(u): (int(i), lists[r, :n]) for r, (u, i, n) in
                      enumerate(zip(feat[uid].numpy(), feat[iid].numpy(), lengths))}

    users = sorted(train_seq)
    problems: list[str] = []
    if len(users) != N_USERS or set(held["valid"]) != set(users) or set(held["test"]) != set(users):
        problems.append(f"users: train {len(users)}, valid {len(held['valid'])}, test {len(held['test'])}")
    rows: list[tuple[str, str, int, str]] = []
    for u in users:
        seq = train_seq[u]
        v_item, v_hist = held["valid"][u]
        t_item, t_hist = held["test"][u]
        if not np.array_equal(v_hist, seq[-MAX_LEN:]):
            problems.append(f"user {u}: valid history is not the train sequence's last {MAX_LEN}")
        if not np.array_equal(t_hist, np.r_[seq, v_item][-MAX_LEN:]):
            problems.append(f"user {u}: test history is not train + valid's last {MAX_LEN}")
        tok_u = str(ds.id2token(uid, u))
        items = ds.id2token(iid, np.r_[seq, v_item, t_item]).tolist()
        parts = ["train"] * len(seq) + ["valid", "test"]
        rows += [(tok_u, str(it), pos, part) for pos, (it, part) in enumerate(zip(items, parts))]
    df = pd.DataFrame(rows, columns=["user", "item", "pos", "part"])

    recorded = json.loads((TTQ / "data" / "recflow_split.json").read_text())
    for tok_u, g in df[df.part != "train"].groupby("user"):
        got = dict(zip(g.part, g.item))
        rec = recorded.get(tok_u, {})
        if (got.get("valid"), got.get("test")) != (rec.get("valid"), rec.get("test")):
            problems.append(f"user {tok_u}: valid/test {got} differ from recflow_split.json {rec}")
            continue
        hist = " ".join(g_ for g_ in df[(df.user == tok_u) & (df.part != "test")].sort_values("pos").item[-MAX_LEN:])
        if hashlib.sha1(hist.encode()).hexdigest()[:16] != rec.get("test_history"):
            problems.append(f"user {tok_u}: test history hash differs from recflow_split.json")
    if problems:
        sys.exit("error: the exported split does not check out:\n  " + "\n  ".join(problems[:20]))
    df.to_csv(SPLIT, index=False)

    train_items = set(df[df.part == "train"].item)
    info: dict[str, Any] = {
        "users": int(df.user.nunique()),
        "interactions": len(df),
        "train_interactions": int((df.part == "train").sum()),
        "items_in_train": len(train_items),
        "items_in_catalogue": int(ds.item_num - 1),  # less padding
        "valid_items_not_in_train": int((~df[df.part == "valid"].item.isin(train_items)).sum()),
        "test_items_not_in_train_or_valid": int((~df[df.part == "test"].item.isin(
            set(df[df.part != "test"].item))).sum()),
        "train_len_min_median_max": [int(x) for x in np.percentile(seqs.lengths, [0, 50, 100])],
        "checks": "943 users; valid/test history = last 50 of train / train+valid; valid/test items and test "
                  "history hash = recflow_split.json",
        "recflow_model_check": _check_recflow_model(data, df),
        "cpu_s": round(time.process_time() - c0, 2),
    }
    _write_json(EXPORT, info)
    print(f"exported {SPLIT}: {info['users']} users, {info['interactions']} interactions "
          f"({info['train_interactions']} train)", flush=True)
    if info["recflow_model_check"]:
        print(f"recflow model check: {info['recflow_model_check']}", flush=True)


def _check_recflow_model(data: Any, df: Any) -> dict[str, Any] | None:
    """Score the saved recflow model of time_to_quality's last_item run from the exported histories.

    Checks the export and ``ndcg_hit`` together against the metrics recflow recorded for the same
    checkpoint (RecBole's evaluator); None when that checkpoint is gone.
    """
    ckpt = TTQ / "recflow" / "last_item" / "checkpoints" / "best.pth"
    recorded_path = TTQ / "recflow_last_item.json"
    if not (ckpt.is_file() and recorded_path.is_file()):
        return None
    import numpy as np
    import torch
    from recbole.data.interaction import Interaction

    from core.modeling.training import load_trained

    recorded = json.loads(recorded_path.read_text())
    model = load_trained(data, ckpt)
    ds = data.dataset
    ordered = df.sort_values(["user", "pos"])
    by_user = {u: g for u, g in ordered.groupby("user")}
    users = sorted(by_user)
    out: dict[str, Any] = {"checkpoint": str(ckpt.relative_to(REPO))}
    for part, history_parts in (("valid", ("train",)), ("test", ("train", "valid"))):
        hists = [by_user[u][by_user[u].part.isin(history_parts)].item.tolist() for u in users]
        truth = {u: by_user[u][by_user[u].part == part].item.iloc[0] for u in users}
        seq = np.zeros((len(users), MAX_LEN), dtype=np.int64)
        lens = np.zeros(len(users), dtype=np.int64)
        for r, h in enumerate(hists):
            ids = ds.token2id(ds.iid_field, h[-MAX_LEN:])
            seq[r, :len(ids)] = ids
            lens[r] = len(ids)
        with torch.no_grad():
            batch = Interaction({model.ITEM_SEQ: torch.from_numpy(seq), model.ITEM_SEQ_LEN: torch.from_numpy(lens)})
            scores = model.full_sort_predict(batch).view(len(users), -1)
        scores[:, 0] = -torch.inf  # padding, as RecBole's full-sort evaluation
        for masked in (False, True):
            s = scores.clone()
            if masked:
                for r, h in enumerate(hists):
                    s[r, torch.as_tensor(ds.token2id(ds.iid_field, h))] = -torch.inf
            top_ids = torch.topk(s, K, dim=1).indices.numpy()
            top = {u: ds.id2token(ds.iid_field, top_ids[r]).tolist() for r, u in enumerate(users)}
            got = ndcg_hit(top, truth)
            key = f"{part}{'_seen_masked' if masked else ''}"
            ref = {"valid": recorded["final_valid"], "test": recorded["final_test"],
                   "test_seen_masked": recorded["final_test_seen_masked"]}.get(key)
            out[key] = {"ours_ndcg@10": round(got["ndcg@10"], 6), "ours_hit@10": round(got["hit@10"], 6)}
            if ref:
                out[key].update({"recflow_ndcg@10": ref["ndcg@10"], "recflow_hit@10": ref["hit@10"]})
                if abs(got["ndcg@10"] - ref["ndcg@10"]) > 1e-5 or abs(got["hit@10"] - ref["hit@10"]) > 1e-5:
                    out[key]["mismatch"] = True
    return out


# ---------------------------------------------------------------------------------------
# --side rectools: RecTools' SASRecModel (RecTools' environment; never imports core)
# ---------------------------------------------------------------------------------------

_STATE: dict[str, Any] = {}  # the validation callback's state (RecTools keeps its trainer factory as a function)


def leave_last_out(interactions: Any) -> Any:
    """RecTools val mask: every user's newest interaction of the fit dataset (the valid item)."""
    from rectools import Columns

    newest = interactions.groupby(Columns.User)[Columns.Datetime].transform("max")
    return (interactions[Columns.Datetime] == newest).values


def make_trainer(epoch_cap: int = 200) -> Any:
    from pytorch_lightning import Trainer

    return Trainer(accelerator="cpu", devices=1, max_epochs=epoch_cap, min_epochs=1, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, check_val_every_n_epoch=1, deterministic=False,
                   callbacks=[_ValidNDCG()])


def _callback_base() -> type:
    from pytorch_lightning.callbacks import Callback

    return Callback


class _ValidNDCG:  # made a Lightning Callback in _install_callback (imports only in RecTools' environment)
    pass


def _install_callback(stopping_step: int) -> None:
    import copy

    import torch

    Callback = _callback_base()

    class ValidNDCG(Callback):  # type: ignore[misc, valid-type]
        """Valid NDCG@10/Hit@10 (all items ranked, padding excluded, seen items not masked: recflow's
        valid metric) from RecTools' validation logits; RecBole's early stopping (a tie counts as an
        improvement; stop after ``stopping_step + 1`` epochs without one); the best weights kept."""

        def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            _STATE["acc"] = [0.0, 0.0, 0]

        def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                    dataloader_idx: int = 0) -> None:
            logits = outputs["logits"].detach().reshape(len(batch["y"]), -1).clone()
            logits[:, 0] = -torch.inf  # RecTools' padding token
            target = batch["y"][:, -1]
            rank = (logits > logits.gather(1, target[:, None])).sum(1) + 1
            hit = rank <= K
            acc = _STATE["acc"]
            acc[0] += float((hit / torch.log2(rank.double() + 1)).sum())
            acc[1] += float(hit.sum())
            acc[2] += len(target)

        def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            ndcg_sum, hits, n = _STATE["acc"]
            ndcg, hit = ndcg_sum / N_USERS, hits / N_USERS  # users outside RecTools' val fold: misses
            records = _STATE["records"]
            records.append({"epoch": len(records), "valid_ndcg@10": round(ndcg, 6), "valid_hit@10": round(hit, 6),
                            "valid_users_ranked": n,
                            "cumulative_cpu_s": round(time.process_time() - _STATE["c_fit"], 3)})
            if ndcg >= _STATE["best"]:
                _STATE.update(best=ndcg, best_epoch=records[-1]["epoch"], bad=0,
                              best_state=copy.deepcopy(pl_module.torch_model.state_dict()))
            else:
                _STATE["bad"] += 1
                if _STATE["bad"] > stopping_step:
                    trainer.should_stop = True
                    _STATE["stop_reason"] = "early stopping"
            r = records[-1]
            print(f"[rectools] epoch {r['epoch']}: valid NDCG@10 {ndcg:.4f}  Hit@10 {hit:.4f}  "
                  f"cumulative CPU {r['cumulative_cpu_s']:.1f} s", flush=True)

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            loss = trainer.callback_metrics.get("train_loss")
            if _STATE["records"] and loss is not None:
                _STATE["records"][-1]["train_loss"] = round(float(loss), 5)

    global _ValidNDCG
    _ValidNDCG = ValidNDCG  # type: ignore[misc]


def run_rectools(seed: int, threads: int, stopping_step: str, epoch_cap: str, out: Path) -> None:
    c0 = time.process_time()
    import warnings

    import numpy as np
    import pandas as pd
    import torch

    torch.set_num_threads(threads)
    import logging

    import pytorch_lightning as pl
    import rectools
    from rectools import Columns
    from rectools.dataset import Dataset
    from rectools.models import SASRecModel
    from rectools.models.nn.item_net import IdEmbeddingsItemNet

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # "GPU available: False ..." and the like
    warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="rectools")
    warnings.filterwarnings("ignore", message=".*(Pydantic serializer warnings|LeafSpec).*")
    _self_check_metric()
    df = pd.read_csv(SPLIT, dtype={"user": str, "item": str, "pos": "int64", "part": str})
    if df.user.nunique() != N_USERS:
        sys.exit(f"error: {SPLIT} has {df.user.nunique()} users, expected {N_USERS}")
    train_lengths = df[df.part == "train"].groupby("user").size()
    recflow_targets = int((train_lengths - 1).sum())  # all-position training: every train target once an epoch
    rectools_targets = int((np.minimum(train_lengths, MAX_LEN + 1) - 1).sum())  # each user's newest 51 items
    ratio = recflow_targets / rectools_targets
    scaled = {"stopping_step": round((RECFLOW["stopping_step"] + 1) * ratio) - 1,
              "epoch_cap": round(RECFLOW["epoch_cap"] * ratio)}
    stopping_step_n = scaled["stopping_step"] if stopping_step == "auto" else int(stopping_step)
    epoch_cap_n = scaled["epoch_cap"] if epoch_cap == "auto" else int(epoch_cap)
    print(f"[rectools] trained targets an epoch: RecTools {rectools_targets}, recflow {recflow_targets} "
          f"(x{ratio:.2f}); stopping_step {stopping_step_n}, epoch cap {epoch_cap_n}", flush=True)
    _install_callback(stopping_step_n)

    def interactions(parts: tuple[str, ...]) -> pd.DataFrame:
        sub = df[df.part.isin(parts)]
        return pd.DataFrame({
            Columns.User: sub.user.values, Columns.Item: sub.item.values, Columns.Weight: 1.0,
            # the position in the user's sequence as the time: RecTools sorts by it (stable), so the order is recflow's
            Columns.Datetime: pd.to_datetime(sub.pos.values, unit="s"),
        })

    fit_ds = Dataset.construct(interactions(("train", "valid")))  # valid rows: RecTools' validation fold
    train_ds = Dataset.construct(interactions(("train",)))
    truth = {part: dict(zip(g.user, g.item)) for part, g in df[df.part != "train"].groupby("part")}
    users = sorted(df.user.unique())

    pl.seed_everything(seed, workers=True, verbose=False)
    model = SASRecModel(
        n_blocks=2, n_heads=2, n_factors=64, dropout_rate=0.2, session_max_len=MAX_LEN,
        train_min_user_interactions=2, loss="softmax", lr=1e-3, batch_size=128,
        item_net_block_types=(IdEmbeddingsItemNet,),  # no item features
        get_val_mask_func=leave_last_out, get_trainer_func=make_trainer,
        get_trainer_func_kwargs={"epoch_cap": epoch_cap_n},
        recommend_batch_size=256, recommend_torch_device="cpu", verbose=0,
    )
    _STATE.update(records=[], best=-1.0, best_epoch=None, bad=0, stop_reason="epoch cap", best_state=None)
    c_data = time.process_time()
    _STATE["c_fit"] = c_data
    t_fit = time.perf_counter()
    model.fit(fit_ds)
    c_fit, wall_fit = time.process_time() - c_data, time.perf_counter() - t_fit
    records = _STATE["records"]
    prep = model.data_preparator
    train_targets = int(sum(max(min(n, MAX_LEN + 1) - 1, 0) for n in
                            prep.train_dataset.interactions.df.groupby(Columns.User).size()))
    assert train_targets == rectools_targets, (train_targets, rectools_targets)
    model.lightning_model.torch_model.load_state_dict(_STATE["best_state"])

    c_rec = time.process_time()
    results: dict[str, Any] = {}
    tops: dict[str, dict[str, list[str]]] = {}
    for part, ds in (("valid", train_ds), ("test", fit_ds)):
        for masked in (False, True):
            reco = model.recommend(users=users, dataset=ds, k=K, filter_viewed=masked)
            reco = reco.sort_values([Columns.User, Columns.Rank])
            top = {u: g[Columns.Item].astype(str).tolist() for u, g in reco.groupby(Columns.User)}
            key = f"{part}{'_seen_masked' if masked else ''}"
            tops[key] = top
            results[key] = {k: round(v, 6) for k, v in ndcg_hit(top, truth[part], N_USERS).items()}
            results[key]["users_with_list"] = len(top)
    rec_cpu = time.process_time() - c_rec
    best = next(r for r in records if r["epoch"] == _STATE["best_epoch"])
    if abs(best["valid_ndcg@10"] - results["valid"]["ndcg@10"]) > 1e-5:
        print(f"warning: valid NDCG@10 from recommend() ({results['valid']['ndcg@10']}) differs from the "
              f"validation callback's at the best epoch ({best['valid_ndcg@10']})", flush=True)

    known = set(prep.get_known_item_ids().astype(str))
    import importlib.metadata as md

    summary = {
        "side": "rectools",
        "seed": seed,
        "versions": {name: md.version(name) for name in ("rectools", "torch", "pytorch-lightning", "numpy", "pandas")},
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "nice": os.nice(0),
        "epochs_run": len(records),
        "best_epoch": _STATE["best_epoch"],
        "stop_reason": _STATE["stop_reason"],
        "train_cpu_s": round(c_fit, 3),
        "train_wall_s": round(wall_fit, 3),
        "train_cpu_s_to_best_epoch": best["cumulative_cpu_s"],
        "mean_epoch_cpu_s": round(c_fit / max(len(records), 1), 3),
        "data_cpu_s": round(c_data - c0, 3),
        "recommend_cpu_s": round(rec_cpu, 3),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "metrics": results,
        "train_sequences": int(prep.train_dataset.user_id_map.size),
        "trained_targets_per_epoch": train_targets,
        "recflow_trained_targets_per_epoch": recflow_targets,
        "items_known_to_model": len(known),
        "valid_items_unknown_to_model": sum(i not in known for i in truth["valid"].values()),
        "test_items_unknown_to_model": sum(i not in known for i in truth["test"].values()),
        "config": {
            "n_blocks": model.n_blocks, "n_heads": model.n_heads, "n_factors": model.n_factors,
            "dropout_rate": model.dropout_rate, "session_max_len": model.session_max_len, "loss": model.loss,
            "lr": model.lr, "adam_betas": [0.9, 0.98], "batch_size": model.batch_size,
            "train_min_user_interactions": model.train_min_user_interactions,
            "use_key_padding_mask": model.use_key_padding_mask, "use_causal_attn": model.use_causal_attn,
            "pos_encoding": model.pos_encoding_type.__name__,
            "transformer_layers": model.transformer_layers_type.__name__,
            "item_net": [t.__name__ for t in model.item_net_block_types],
            "stopping_step": stopping_step_n, "epoch_cap": epoch_cap_n,
            "stopping_step_arg": stopping_step, "epoch_cap_arg": epoch_cap,
            "scaled_from_recflow": {"stopping_step": RECFLOW["stopping_step"], "epoch_cap": RECFLOW["epoch_cap"],
                                    "targets_ratio": round(ratio, 4), **scaled},
        },
        "epochs": records,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    _write_json(out, summary)
    _write_json(out.with_name(out.stem + "_top10.json"), tops)
    print(f"[rectools] {summary['stop_reason']} after {len(records)} epochs; best epoch {summary['best_epoch']}; "
          f"rectools {rectools.__version__}", flush=True)


# ---------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads), GLIBC_TUNABLES=MALLOC_TUNABLES)
    env.pop("VIRTUAL_ENV", None)
    return env


def _recflow_reference() -> dict[str, Any] | None:
    path = TTQ / "recflow_all_positions.json"
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    return {"source": str(path.relative_to(REPO)), "best_epoch": d.get("best_epoch"),
            "epochs_run": len(d.get("epochs", [])), "train_cpu_s": d.get("train_cpu_s"),
            "valid": {k: d["final_valid"][k] for k in ("ndcg@10", "hit@10")},
            "test": {k: d["final_test"][k] for k in ("ndcg@10", "hit@10")},
            "test_seen_masked": {k: d["final_test_seen_masked"][k] for k in ("ndcg@10", "hit@10")},
            "finished": d.get("finished")}


def report(summary: dict[str, Any], ref: dict[str, Any] | None) -> None:
    m = summary["metrics"]
    print()
    print(f"RecTools {summary['versions']['rectools']} SASRecModel on recflow's ml-100k split (seed {summary['seed']}, "
          f"{summary['threads']} thread)")
    print(f"{'':34}{'RecTools':>12}{'recflow':>12}")

    def row(label: str, ours: Any, theirs: Any, fmt: str = "{:.4f}") -> None:
        f = lambda v: "-" if v is None else fmt.format(v)
        print(f"{label:34}{f(ours):>12}{f(theirs):>12}")

    r = ref or {}
    row("training CPU-s (fit, with valid)", summary["train_cpu_s"], r.get("train_cpu_s"), "{:.1f}")
    row("epochs run / best epoch", f"{summary['epochs_run']}/{summary['best_epoch']}",
        f"{r.get('epochs_run')}/{r.get('best_epoch')}" if ref else None, "{}")
    row("CPU-s to the best epoch", summary["train_cpu_s_to_best_epoch"], None, "{:.1f}")
    c = summary["config"]
    row("stopping step / epoch cap", f"{c['stopping_step']}/{c['epoch_cap']}", "5/200" if ref else None, "{}")
    row("trained targets an epoch", summary["trained_targets_per_epoch"],
        summary.get("recflow_trained_targets_per_epoch"), "{}")
    for key, label in (("valid", "valid"), ("valid_seen_masked", "valid, seen masked"), ("test", "test"),
                       ("test_seen_masked", "test, seen masked")):
        for metric in ("ndcg@10", "hit@10"):
            row(f"{label} {metric.replace('ndcg', 'NDCG').replace('hit', 'Hit')}", m[key][metric],
                r.get(key, {}).get(metric))
    row("peak RSS MiB", summary["peak_rss_mib"], None, "{:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", action="store_true", help="write the split (recflow's environment) and exit")
    parser.add_argument("--reexport", action="store_true", help="export the split again even if it is there")
    parser.add_argument("--side", choices=["rectools"], help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=SEED, help=f"seed for RecTools (default {SEED}, recflow's)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--stopping-step", default="auto",
                        help="RecBole-style early stopping: stop after N+1 epochs without a valid NDCG@10 >= best; "
                             "'auto' (default): recflow's 5 scaled by trained targets an epoch (14)")
    parser.add_argument("--epoch-cap", default="auto",
                        help="'auto' (default): recflow's 200 scaled by trained targets an epoch (501)")
    parser.add_argument("--rectools-python", type=Path, default=RECTOOLS_PYTHON,
                        help=f"RecTools' environment's python (default {RECTOOLS_PYTHON.relative_to(REPO)})")
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    suffix = "".join(f"_{name}{value}" for name, value, default in (
        ("seed", args.seed, SEED), ("stop", args.stopping_step, "auto"), ("cap", args.epoch_cap, "auto"))
        if str(value) != str(default))
    out = args.out or PEER / f"summary{suffix}.json"
    if args.export:
        export_split(args.threads)
        return
    if args.side == "rectools":
        run_rectools(args.seed, args.threads, args.stopping_step, args.epoch_cap, out)
        return
    _self_check_metric()
    if args.reexport or not SPLIT.is_file():
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--export", "--threads", str(args.threads)],
                       cwd=REPO, env=_child_env(args.threads), check=True)
    if not args.rectools_python.is_file():
        sys.exit(f"error: {args.rectools_python} is missing: make RecTools' environment (benchmarks/README.md)")
    print("RecTools: training ...", flush=True)
    subprocess.run([str(args.rectools_python), str(Path(__file__).resolve()), "--side", "rectools",
                    "--seed", str(args.seed), "--threads", str(args.threads), "--stopping-step",
                    str(args.stopping_step), "--epoch-cap", str(args.epoch_cap), "--out", str(out)],
                   cwd=REPO, env=_child_env(args.threads), check=True)
    summary = json.loads(out.read_text())
    ref = _recflow_reference()
    summary["recflow_reference"] = ref
    summary["export"] = json.loads(EXPORT.read_text()) if EXPORT.is_file() else None
    _write_json(out, summary)
    report(summary, ref)
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
