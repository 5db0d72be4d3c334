"""Time to quality: CPU-seconds bare RecBole and recflow need to reach the same test NDCG@10.

    python benchmarks/time_to_quality.py                      # prepare, bare (resumes), recflow, report
    nohup python benchmarks/time_to_quality.py --bare-only > benchmarks/.ttq/bare.log 2>&1 &
    python benchmarks/time_to_quality.py --skip-bare          # recflow + report on the bare epochs so far
    python benchmarks/time_to_quality.py --report-only        # just the table from what is saved

SASRec on MovieLens-100k, one torch thread per side, the same split on both sides: both read
recflow's own atomic file (``core.data.extract.extract`` + ``core.modeling.dataset.build_dataset``, written once
into ``<work>/data``), so same-second ratings are ordered the same way (by item id) on both.

* ``bare``: RecBole 1.2.1's own ``Config``, ``create_dataset``, ``data_preparation``, ``get_model``,
  ``get_trainer`` and ``trainer.fit`` in a process that never imports ``core`` (importing
  ``core.modeling.dataset.load_recbole_data`` installs recflow's RecBole fast paths). RecBole's SASRec defaults (dropout
  0.5), lr 0.001, batch 1024 (as ``bare_recbole.py``; RecBole's default is 2048), stopping_step 10,
  epoch cap 300. Anomaly detection, which importing RecBole's sequential models switches on, is
  switched off again (it is a ~2x slowdown that says nothing about the objective). It checkpoints
  after every epoch (model, optimizer, every RNG, early-stopping state, cumulative CPU and wall
  seconds) and resumes from there when run again, so a run can span sessions. Each epoch's test
  NDCG@10/Hit@10 is evaluated too (its cost is not counted).
* ``recflow``: ``core.modeling.training.train`` with recflow's defaults (``training.objective:
  all_positions``), and optionally ``last_item`` for a few epochs; each epoch's test metrics come
  from the ``latest.pth`` recflow writes before its ``on_epoch`` callback (not counted either).

CPU-seconds (``time.process_time``: every thread of the process) are the measure: the machine is
shared, and wall time moves with other people's load. Counted: the training epochs and their
validation, from after the data is loaded. Files under ``--work`` (default ``benchmarks/.ttq``):
``data/`` (atomic file, recflow's split), ``bare/epochs.jsonl`` (one line per bare epoch),
``bare/status.json``, ``bare/resume.pth``, ``recflow_<objective>.json``, ``summary.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_WORK = HERE / ".ttq"
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=4294967295"  # as cli.py

SEED = 2020
MAX_LEN = 50
BARE_BATCH = 1024  # benchmarks/bare_recbole.py's (RecBole's own default is 2048)
BARE_LR = 0.001  # RecBole's default
BARE_STOPPING_STEP = 10  # RecBole's default
BARE_EPOCH_CAP = 300  # RecBole's default
# recflow's sides: name -> (training.objective, overrides on top of recflow's defaults).
# "patience10" gives recflow bare RecBole's stopping rule (10 epochs without a new best, ties count).
RECFLOW_SIDES: dict[str, tuple[str, dict[str, Any]]] = {
    "all_positions": ("all_positions", {}),
    "all_positions_patience10": ("all_positions", {"training.early_stopping_patience": BARE_STOPPING_STEP,
                                                   "training.early_stopping_min_gain": 0.0}),
    "last_item": ("last_item", {}),
    # recflow's defaults on two more seeds (--seed-sides): the spread a single-seed comparison hides.
    "all_positions_seed1": ("all_positions", {"training.seed": 1}),
    "all_positions_seed2": ("all_positions", {"training.seed": 2}),
}
TERMINAL = ("early stopping", "epoch cap")  # a bare run that stopped so is finished; a CPU budget is not


# ---------------------------------------------------------------------------------------
# Small helpers (no torch, no RecBole, no core)
# ---------------------------------------------------------------------------------------


def _paths(work: Path) -> dict[str, Path]:
    data = work / "data"
    bare = work / "bare"
    return {
        "data": data,
        "recbole_data": data / "recbole",
        "inter": data / "recbole" / "interactions" / "interactions.inter",
        "splits": data / "splits.json",
        "recflow_split": data / "recflow_split.json",
        "recflow_config": data / "recflow_recbole_config.json",
        "prepare": data / "prepare.json",
        "bare": bare,
        "bare_resume": bare / "resume.pth",
        "bare_best": bare / "best.pth",
        "bare_epochs": bare / "epochs.jsonl",
        "bare_status": bare / "status.json",
        "bare_split": bare / "split.json",
        "bare_config": bare / "recbole_config.json",
        "summary": work / "summary.json",
    }


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes on the machine have spent busy since boot (Linux /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    except (OSError, IndexError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_state() -> dict[str, Any]:
    """The commit recflow ran at, and which of core/ differed from it (others may be editing)."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD"), "core_modified": git("status", "--porcelain", "--", "core").splitlines()}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------
# --prepare: recflow's atomic file and recflow's split (imports core)
# ---------------------------------------------------------------------------------------


def _split_cases(valid_loader: Any, test_loader: Any) -> dict[str, dict[str, str]]:
    """Per user (raw token): the valid item, the test item and a hash of the test history (raw tokens).

    Works on plain RecBole objects, so the bare side uses it too.
    """
    cases: dict[str, dict[str, str]] = {}
    for name, loader in (("valid", valid_loader), ("test", test_loader)):
        ds = loader._dataset
        uid, iid = ds.uid_field, ds.iid_field
        users = ds.id2token(uid, ds.inter_feat[uid].numpy())
        items = ds.id2token(iid, ds.inter_feat[iid].numpy())
        for u, i in zip(users, items):
            cases.setdefault(str(u), {})[name] = str(i)
        if name == "test":
            lists = ds.inter_feat[iid + ds.config["LIST_SUFFIX"]].numpy()
            lengths = ds.inter_feat[ds.config["ITEM_LIST_LENGTH_FIELD"]].numpy()
            for u, seq, n in zip(users, lists, lengths):
                history = " ".join(ds.id2token(iid, seq[:n]).tolist())
                cases[str(u)]["test_history"] = hashlib.sha1(history.encode()).hexdigest()[:16]
    return cases


def _effective_config(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dict(config.final_config_dict), default=str))


def prepare(work: Path) -> None:
    """Write recflow's atomic file for ml-100k (extract + build_dataset) and recflow's split."""
    p = _paths(work)
    c0, t0 = time.process_time(), time.perf_counter()
    from core.config import load_config
    from core.data.extract import extract
    from core.modeling.dataset import build_recbole_data

    cfg = load_config(None, {"runs_dir": work / "runs", "training.threads": 1})
    p["data"].mkdir(parents=True, exist_ok=True)
    snapshot = extract(cfg, p["data"])
    splits, data = build_recbole_data(snapshot, cfg, p["data"])
    assert Path(splits.data_dir) / splits.dataset_name / f"{splits.dataset_name}.inter" == p["inter"], splits
    _write_json(p["recflow_split"], _split_cases(data.valid, data.test))
    _write_json(p["recflow_config"], _effective_config(data.config))
    _write_json(p["prepare"], {
        "inter_sha256": _file_sha256(p["inter"]),
        "snapshot_rows": snapshot.rows, "users": splits.users, "items": splits.items,
        "interactions": splits.interactions, "cpu_s": round(time.process_time() - c0, 2),
        "wall_s": round(time.perf_counter() - t0, 2),
    })
    p["splits"].write_text(splits.model_dump_json(indent=1))  # last: its presence means "prepared"
    print(f"prepared {p['inter']}: {splits.users} users, {splits.items} items, {splits.interactions} interactions")


def ensure_prepared(work: Path) -> None:
    p = _paths(work)
    if p["splits"].is_file() and p["inter"].is_file():
        return
    print(f"preparing recflow's atomic file in {p['data']} ...", flush=True)
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--work", str(work), "--prepare"],
                   cwd=REPO, check=True)


# ---------------------------------------------------------------------------------------
# --bare-only: RecBole's SASRec on the atomic file, resumable (never imports core)
# ---------------------------------------------------------------------------------------


class _BudgetReached(Exception):
    pass


def bare_config_dict(work: Path, epochs: int) -> dict[str, Any]:
    p = _paths(work)
    with p["inter"].open() as fh:
        header = [h.split(":")[0] for h in fh.readline().rstrip("\n").split("\t")]
    return {
        "data_path": str(p["recbole_data"]),
        "checkpoint_dir": str(p["bare"] / "saved"),
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "TIME_FIELD": "timestamp",
        "RATING_FIELD": "rating",
        "load_col": {"inter": header},
        "user_inter_num_interval": "[5,inf)",
        "MAX_ITEM_LIST_LENGTH": MAX_LEN,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "metrics": ["NDCG", "Hit"],
        "topk": [10],
        "valid_metric": "NDCG@10",
        "metric_decimal_place": 6,
        "epochs": epochs,
        "train_batch_size": BARE_BATCH,
        "learning_rate": BARE_LR,
        "stopping_step": BARE_STOPPING_STEP,
        "loss_type": "CE",
        "train_neg_sample_args": None,  # CE: no negative sampling
        "seed": SEED,
        "show_progress": False,
    }


def _bare_fingerprint(config_dict: dict[str, Any], inter_sha: str, threads: int) -> str:
    """What a resume checkpoint must have been written under (the epoch cap and paths may change)."""
    parts = {k: v for k, v in config_dict.items() if k not in ("epochs", "data_path", "checkpoint_dir")}
    return hashlib.sha256(json.dumps([parts, inter_sha, threads], sort_keys=True).encode()).hexdigest()


def run_bare(work: Path, threads: int, budget_minutes: float, epoch_cap: int) -> None:
    p = _paths(work)
    if not p["inter"].is_file():
        sys.exit(f"error: {p['inter']} is missing (run without --bare-only once, or with --prepare)")
    p["bare"].mkdir(parents=True, exist_ok=True)
    import fcntl

    lock = (p["bare"] / "lock").open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until this process exits
    except BlockingIOError:
        lock.seek(0)
        print(f"another bare run is going on in {p['bare']} (pid {lock.read().strip() or '?'}); not starting a second")
        return
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    import torch

    torch.set_num_threads(threads)
    import random

    import numpy as np
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.data.dataset import Dataset
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

    leaked = sorted(m for m in sys.modules if m == "core" or m.startswith("core."))
    if leaked or getattr(Dataset._load_feat, "_recflow", False):
        sys.exit(f"error: recflow modules in the bare process: {leaked}")

    config_dict = bare_config_dict(work, epoch_cap)
    inter_sha = _file_sha256(p["inter"])
    fingerprint = _bare_fingerprint(config_dict, inter_sha, threads)
    state: dict[str, Any] | None = None
    if p["bare_resume"].is_file():
        state = torch.load(p["bare_resume"], map_location="cpu", weights_only=False)  # our own file
        if state["fingerprint"] != fingerprint:
            sys.exit(f"error: {p['bare_resume']} was written with another configuration, data or --threads; "
                     f"delete {p['bare']} to start over")
        if state["stop_reason"] in TERMINAL and (state["stop_reason"] != "epoch cap" or state["epoch"] + 1 >= epoch_cap):
            print(f"bare run already finished ({state['stop_reason']} after epoch {state['epoch']}); nothing to do")
            return
        if state["cumulative_cpu_s"] >= budget_minutes * 60 and state["stop_reason"] not in TERMINAL:
            print(f"bare CPU budget already spent ({state['cumulative_cpu_s']:.0f} s >= {budget_minutes * 60:.0f} s "
                  f"after epoch {state['epoch']}); raise --bare-budget-minutes to continue")
            return

    c_prep, t_prep = time.process_time(), time.perf_counter()
    os.chdir(p["bare"])  # RecBole writes ./log and ./log_tensorboard
    sys.argv = sys.argv[:1]  # RecBole's Config parses --key=value from argv too
    config = Config(model="SASRec", dataset="interactions", config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    split = _split_cases(valid_data, test_data)
    if p["bare_split"].is_file() and json.loads(p["bare_split"].read_text()) != split:
        sys.exit(f"error: bare RecBole's split differs from the one it built before ({p['bare_split']})")
    _write_json(p["bare_split"], split)
    _write_json(p["bare_config"], _effective_config(config))
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    # Importing RecBole's sequential models switches anomaly detection on (sine.py): off again.
    torch.autograd.set_detect_anomaly(False)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    trainer.saved_model_file = str(p["bare_best"])  # a fixed name, so it survives a resume
    prep = {"cpu_s": round(time.process_time() - c_prep, 2), "wall_s": round(time.perf_counter() - t_prep, 2)}

    records: list[dict[str, Any]] = []
    base_cpu = base_wall = 0.0
    sessions: list[dict[str, Any]] = []
    if state is not None:
        model.load_state_dict(state["state_dict"])
        model.load_other_parameter(state.get("other_parameter"))
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.start_epoch = int(state["epoch"]) + 1
        trainer.cur_step = int(state["cur_step"])
        trainer.best_valid_score = state["best_valid_score"]
        trainer.best_valid_result = state["best_valid_result"]
        trainer.train_loss_dict.update(state["train_loss"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["random"])
        train_data.generator.set_state(rng["loader"])
        records = list(state["records"])
        base_cpu, base_wall = float(state["cumulative_cpu_s"]), float(state["cumulative_wall_s"])
        sessions = list(state.get("sessions", []))
        print(f"resuming after epoch {state['epoch']} (cumulative {base_cpu:.1f} CPU s, {base_wall:.1f} wall s, "
              f"{len(records)} epochs recorded)", flush=True)
    # The records file always matches the checkpoint (a line written after the last save is dropped).
    tmp = p["bare_epochs"].with_name(p["bare_epochs"].name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, p["bare_epochs"])
    session = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "from_epoch": trainer.start_epoch,
               "prep": prep, "pid": os.getpid()}
    sessions.append(session)

    # Measurement only: each epoch's train CPU/wall seconds and whether anomaly detection was on.
    epoch_train: dict[int, tuple[float, float, bool]] = {}
    original_train_epoch = trainer._train_epoch

    def timed_train_epoch(train, epoch_idx, *a: Any, **kw: Any) -> Any:
        c, t, anomaly = time.process_time(), time.perf_counter(), torch.is_anomaly_enabled()
        loss = original_train_epoch(train, epoch_idx, *a, **kw)
        epoch_train[epoch_idx] = (time.process_time() - c, time.perf_counter() - t, anomaly)
        return loss

    trainer._train_epoch = timed_train_epoch
    budget_s = budget_minutes * 60
    overhead = {"cpu": 0.0, "wall": 0.0}  # this session's test evaluations and checkpoint writes
    stop_reason = ["epoch cap"]

    def callback(epoch_idx: int, valid_score: float) -> None:
        c_cb, t_cb = time.process_time(), time.perf_counter()
        cum_cpu = base_cpu + (c_cb - c_fit - overhead["cpu"])
        cum_wall = base_wall + (t_cb - t_fit - overhead["wall"])
        busy = _busy_cpu_seconds()
        torch_rng = torch.get_rng_state()
        test = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
        torch.set_rng_state(torch_rng)  # (evaluation draws nothing; belt and braces)
        train_cpu, train_wall, anomaly = epoch_train.get(epoch_idx, (float("nan"), float("nan"), False))
        prev_cpu = records[-1]["cumulative_cpu_s"] if records else 0.0
        record = {
            "epoch": epoch_idx,
            "valid_ndcg@10": round(float(valid_score), 6),
            "test_ndcg@10": round(float(test["ndcg@10"]), 6),
            "test_hit@10": round(float(test["hit@10"]), 6),
            "cumulative_cpu_s": round(cum_cpu, 3),
            "cumulative_wall_s": round(cum_wall, 3),
            "epoch_cpu_s": round(cum_cpu - prev_cpu, 3),
            "train_cpu_s": round(train_cpu, 3),
            "train_wall_s": round(train_wall, 3),
            "train_loss": round(float(trainer.train_loss_dict.get(epoch_idx, float("nan"))) / len(train_data), 6),
            "best_so_far": bool(trainer.cur_step == 0),
            "anomaly_detection": anomaly,
            # other processes' share of the machine's CPU since the previous epoch ended
            "machine_busy_others": _others_share(last, busy, c_cb, t_cb),
        }
        last.update(busy=busy, cpu=c_cb, wall=t_cb)
        records.append(record)
        early_stop = trainer.cur_step > trainer.stopping_step
        over_budget = cum_cpu >= budget_s and not early_stop
        reason = "early stopping" if early_stop else "cpu budget" if over_budget else (
            "epoch cap" if epoch_idx + 1 >= trainer.epochs else None)
        new_state = {
            "fingerprint": fingerprint,
            "epoch": epoch_idx,
            "cur_step": trainer.cur_step,
            "best_valid_score": trainer.best_valid_score,
            "best_valid_result": trainer.best_valid_result,
            "state_dict": model.state_dict(),
            "other_parameter": model.other_parameter(),
            "optimizer": trainer.optimizer.state_dict(),
            "train_loss": dict(trainer.train_loss_dict),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate(),
                    "loader": train_data.generator.get_state()},
            "records": records,
            "cumulative_cpu_s": cum_cpu,
            "cumulative_wall_s": cum_wall,
            "stop_reason": reason,
            "sessions": sessions,
        }
        tmp_state = p["bare_resume"].with_name("resume.tmp")
        torch.save(new_state, tmp_state, pickle_protocol=4)
        os.replace(tmp_state, p["bare_resume"])
        with p["bare_epochs"].open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        _write_bare_status(p, records, reason, epoch_cap, budget_minutes, threads, sessions)
        print(f"[ttq bare] epoch {epoch_idx}: valid NDCG@10 {record['valid_ndcg@10']:.4f}  test NDCG@10 "
              f"{record['test_ndcg@10']:.4f}  epoch CPU {record['epoch_cpu_s']:.1f} s  cumulative CPU "
              f"{cum_cpu:.1f} s  wall {cum_wall:.1f} s" + (f"  -> {reason}" if reason else ""), flush=True)
        overhead["cpu"] += time.process_time() - c_cb
        overhead["wall"] += time.perf_counter() - t_cb
        if reason:
            stop_reason[0] = reason
        if over_budget:
            raise _BudgetReached

    c_fit, t_fit = time.process_time(), time.perf_counter()
    last = {"busy": _busy_cpu_seconds(), "cpu": c_fit, "wall": t_fit}
    with contextlib.suppress(_BudgetReached):
        trainer.fit(train_data, valid_data, verbose=True, saved=True, show_progress=False, callback_fn=callback)
    print(f"[ttq bare] stopped: {stop_reason[0]} after {len(records)} epochs", flush=True)


def _others_share(last: dict[str, Any], busy: float | None, cpu: float, wall: float) -> float | None:
    if busy is None or last["busy"] is None or wall <= last["wall"]:
        return None
    others = max(busy - last["busy"] - (cpu - last["cpu"]), 0.0)
    return round(others / ((wall - last["wall"]) * (os.cpu_count() or 1)), 3)


def _write_bare_status(p: dict[str, Path], records: list[dict[str, Any]], reason: str | None, epoch_cap: int,
                       budget_minutes: float, threads: int, sessions: list[dict[str, Any]]) -> None:
    import recbole
    import torch

    _write_json(p["bare_status"], {
        "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "epochs_done": len(records),
        "stop_reason": reason,
        "finished": reason in TERMINAL,
        "epoch_cap": epoch_cap,
        "budget_cpu_minutes": budget_minutes,
        "threads": threads,
        "torch": torch.__version__,
        "recbole": recbole.__version__,
        "sessions": sessions,
    })


# ---------------------------------------------------------------------------------------
# --recflow-side: core.modeling.training.train on the same atomic file (imports core)
# ---------------------------------------------------------------------------------------


def run_recflow(work: Path, side: str, threads: int, epochs: int | None, max_minutes: float | None) -> None:
    """recflow's defaults plus the side's overrides, one thread; test metrics of every epoch from latest.pth."""
    objective, side_overrides = RECFLOW_SIDES[side]
    p = _paths(work)
    c_start = time.process_time()
    import torch

    torch.set_num_threads(threads)
    from core.config import load_config
    from core.modeling import recbole_adapter as rb
    from core.modeling.dataset import load_recbole_data
    from core.modeling.evaluation import ranking_metrics, seen_masked_metrics
    from core.modeling.runtime import rng_state, set_rng_state
    from core.modeling.training import build_model, load_trained, make_trainer, train
    from core.records import DatasetSplits

    run_dir = work / "recflow" / side
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: a resumed one would not measure time to quality
    run_dir.mkdir(parents=True)
    overrides: dict[str, Any] = {"runs_dir": work / "recflow", "training.threads": threads,
                                 "training.objective": objective, **side_overrides}
    if epochs:
        overrides["training.epochs"] = epochs
    cfg = load_config(None, overrides)
    if max_minutes is not None:  # 0: no wall-time budget
        cfg.training.max_minutes = max_minutes or None
    splits = DatasetSplits.model_validate_json(p["splits"].read_text())
    checkpoints = run_dir / "checkpoints"
    data = load_recbole_data(cfg, splits, checkpoints)  # passed to train() below
    if side == "all_positions":  # the config diff in the report compares bare with the defaults as trained
        _write_json(p["recflow_config"], _effective_config(data.config))
    c_data, t_data = time.process_time(), time.perf_counter()
    # The split this process trains on must be the one --prepare recorded (the code may have changed since).
    split_same = _split_cases(data.valid, data.test) == json.loads(p["recflow_split"].read_text())
    c_split, t_split = time.process_time() - c_data, time.perf_counter() - t_data
    c_data, t_data = c_data + c_split, t_data + t_split

    overhead = {"cpu": 0.0, "wall": 0.0}
    records: list[dict[str, Any]] = []
    probe: dict[str, Any] = {}
    last = {"busy": _busy_cpu_seconds(), "cpu": c_data, "wall": t_data}

    def on_epoch(stats: Any) -> None:
        c_cb, t_cb = time.process_time(), time.perf_counter()
        busy = _busy_cpu_seconds()
        cum_cpu, cum_wall = c_cb - c_data - overhead["cpu"], t_cb - t_data - overhead["wall"]
        rng = rng_state()  # building the probe model draws from torch's RNG: put it back after
        state = rb.load_checkpoint(checkpoints / "latest.pth")  # written for this epoch before on_epoch
        if not probe:
            probe["model"] = build_model(data)
            probe["trainer"] = make_trainer(data, probe["model"], checkpoints / "probe.pth")
        model = probe["model"]
        model.load_state_dict(state["state_dict"])
        model.load_other_parameter(state.get("other_parameter"))
        model.eval()
        test = probe["trainer"].evaluate(data.test, load_best_model=False)
        set_rng_state(rng)
        prev = records[-1]["cumulative_cpu_s"] if records else 0.0
        records.append({
            "epoch": stats.epoch,
            "valid_ndcg@10": round(float(stats.valid_score), 6),
            "test_ndcg@10": round(float(test["ndcg@10"]), 6),
            "test_hit@10": round(float(test["hit@10"]), 6),
            "cumulative_cpu_s": round(cum_cpu, 3),
            "cumulative_wall_s": round(cum_wall, 3),
            "epoch_cpu_s": round(cum_cpu - prev, 3),
            "train_wall_s": stats.train_seconds,
            "train_loss": stats.train_loss,
            "machine_busy_others": _others_share(last, busy, c_cb, t_cb),
        })
        last.update(busy=busy, cpu=c_cb, wall=t_cb)
        r = records[-1]
        print(f"[ttq recflow {side}] epoch {r['epoch']}: valid NDCG@10 {r['valid_ndcg@10']:.4f}  test NDCG@10 "
              f"{r['test_ndcg@10']:.4f}  epoch CPU {r['epoch_cpu_s']:.1f} s  cumulative CPU {cum_cpu:.1f} s", flush=True)
        overhead["cpu"] += time.process_time() - c_cb
        overhead["wall"] += time.perf_counter() - t_cb

    trained = train(cfg, splits, run_dir, on_epoch=on_epoch, data=data)
    c_fit, t_fit = time.process_time(), time.perf_counter()
    model = load_trained(data, trained.checkpoint)
    valid, test = ranking_metrics(data, model, trained.checkpoint)
    _masked_valid, masked_test = seen_masked_metrics(data, model, trained.checkpoint)
    at_best = next(r for r in records if r["epoch"] == trained.best_epoch)
    if abs(at_best["test_ndcg@10"] - test["ndcg@10"]) > 1e-6:
        print(f"warning: epoch {trained.best_epoch}'s test NDCG@10 from latest.pth ({at_best['test_ndcg@10']}) "
              f"differs from best.pth's ({test['ndcg@10']})", flush=True)
    rc = data.config
    _write_json(work / f"recflow_{side}.json", {
        "objective": trained.objective,
        "loss": trained.loss,
        "stop_reason": trained.stop_reason,
        "best_epoch": trained.best_epoch,
        "epochs": records,
        "final_valid": valid,
        "final_test": test,
        "final_test_seen_masked": masked_test,
        "train_cpu_s": round(c_fit - c_data - overhead["cpu"], 3),
        "train_wall_s": round(t_fit - t_data - overhead["wall"], 3),
        "probe_cpu_s": round(overhead["cpu"], 3),
        "data_cpu_s": round(c_data - c_start, 3),
        "config": {
            "training.epochs": cfg.training.epochs,
            "training.max_minutes": cfg.training.max_minutes,
            "training.early_stopping_patience": cfg.training.early_stopping_patience,
            "training.early_stopping_min_gain": cfg.training.early_stopping_min_gain,
            "training.window_stride": cfg.training.window_stride,
            "train_batch_size": trained.train_batch_size,
            "train_rows": trained.train_rows,
            "learning_rate": rc["learning_rate"],
            "hidden_dropout_prob": rc["hidden_dropout_prob"],
            "attn_dropout_prob": rc["attn_dropout_prob"],
            "fast_cpu_dropout": cfg.training.fast_cpu_dropout,
        },
        "split_same_as_prepare": split_same,
        "git": _git_state(),
        "threads": torch.get_num_threads(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    })
    print(f"[ttq recflow {side}] {trained.stop_reason} after {len(records)} epochs; best epoch "
          f"{trained.best_epoch}, test NDCG@10 {test['ndcg@10']:.4f}", flush=True)


# ---------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------


def compare_splits(work: Path) -> dict[str, Any] | None:
    """Bare RecBole's split vs recflow's, per user by raw tokens: the valid item, the test item, the history."""
    p = _paths(work)
    if not (p["bare_split"].is_file() and p["recflow_split"].is_file()):
        return None
    bare, rec = json.loads(p["bare_split"].read_text()), json.loads(p["recflow_split"].read_text())
    users = sorted(set(bare) | set(rec))
    differ = {k: [u for u in users if bare.get(u, {}).get(k) != rec.get(u, {}).get(k)]
              for k in ("valid", "test", "test_history")}
    return {
        "users_bare": len(bare),
        "users_recflow": len(rec),
        "users_only_one_side": len(set(bare) ^ set(rec)),
        "valid_item_differs": len(differ["valid"]),
        "test_item_differs": len(differ["test"]),
        "test_history_differs": len(differ["test_history"]),
        "users_differing": len(set().union(*differ.values())),
        "examples": sorted(set().union(*differ.values()))[:5],
    }


def config_diff(work: Path) -> dict[str, Any] | None:
    """Keys of RecBole's final config that differ between the bare side and recflow's defaults."""
    p = _paths(work)
    if not (p["bare_config"].is_file() and p["recflow_config"].is_file()):
        return None
    bare, rec = json.loads(p["bare_config"].read_text()), json.loads(p["recflow_config"].read_text())
    return {k: {"bare": bare.get(k), "recflow": rec.get(k)} for k in sorted(set(bare) | set(rec))
            if bare.get(k) != rec.get(k) and k not in ("checkpoint_dir", "data_path")}


def _best_index(records: list[dict[str, Any]]) -> int | None:
    """RecBole's early stopping: an epoch as good as the best so far becomes the best (``>=``)."""
    best, index = -math.inf, None
    for i, r in enumerate(records):
        if r["valid_ndcg@10"] >= best:
            best, index = r["valid_ndcg@10"], i
    return index


def summarize_curve(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not records:
        return None
    b = _best_index(records)
    assert b is not None
    oracle = max(range(len(records)), key=lambda i: (records[i]["test_ndcg@10"], -i))
    best = records[b]
    return {
        "epochs": len(records),
        "mean_epoch_cpu_s": round(records[-1]["cumulative_cpu_s"] / len(records), 2),
        "best_epoch": best["epoch"],
        "best_valid_ndcg@10": best["valid_ndcg@10"],
        "test_ndcg@10": best["test_ndcg@10"],
        "test_hit@10": best["test_hit@10"],
        "cpu_s_to_best_epoch": best["cumulative_cpu_s"],
        "cpu_s_total": records[-1]["cumulative_cpu_s"],
        "wall_s_total": records[-1]["cumulative_wall_s"],
        "max_test_ndcg@10": records[oracle]["test_ndcg@10"],
        "max_test_epoch": records[oracle]["epoch"],
        "cpu_s_to_max_test": records[oracle]["cumulative_cpu_s"],
        "mean_machine_busy_others": _mean([r.get("machine_busy_others") for r in records]),
    }


def _mean(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(sum(vals) / len(vals), 3) if vals else None


def time_to(records: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first epoch whose test NDCG@10 reaches ``target``, and the CPU-seconds spent by then."""
    for r in records:
        if r["test_ndcg@10"] >= target:
            return {"epoch": r["epoch"], "cpu_s": r["cumulative_cpu_s"], "test_ndcg@10": r["test_ndcg@10"]}
    return None


def report(work: Path) -> dict[str, Any]:
    p = _paths(work)
    bare_records = _read_jsonl(p["bare_epochs"])
    bare_status = json.loads(p["bare_status"].read_text()) if p["bare_status"].is_file() else {}
    recflow = {obj: json.loads((work / f"recflow_{obj}.json").read_text())
               for obj in RECFLOW_SIDES if (work / f"recflow_{obj}.json").is_file()}
    split = compare_splits(work)
    cfg_diff = config_diff(work)
    bare = summarize_curve(bare_records)
    finished = bool(bare_status.get("finished"))
    target = bare["test_ndcg@10"] if bare else None
    sides: dict[str, Any] = {"bare": {"summary": bare, "status": bare_status}}
    for obj, res in recflow.items():
        sides[f"recflow_{obj}"] = {"summary": summarize_curve(res["epochs"]), "result": res}
    reach: dict[str, Any] = {}
    if target is not None:
        for name in sides:
            recs = bare_records if name == "bare" else recflow[name.removeprefix("recflow_")]["epochs"]
            reach[name] = time_to(recs, target)
    ratios: dict[str, Any] = {}
    for name in sides:
        if name == "bare" or not reach.get("bare") or not sides[name]["summary"]:
            continue
        r = reach.get(name)
        s = sides[name]["summary"]
        ratios[name] = {
            "bare_cpu_to_target_over_recflow": round(reach["bare"]["cpu_s"] / r["cpu_s"], 2) if r else None,
            "bare_cpu_to_best_epoch_over_recflow": round(bare["cpu_s_to_best_epoch"] / s["cpu_s_to_best_epoch"], 2),
            "bare_cpu_total_over_recflow": round(bare["cpu_s_total"] / s["cpu_s_total"], 2),
        }

    # ---- the table
    names = list(sides)
    heads = {"bare": "bare RecBole", "recflow_all_positions": "recflow all_pos",
             "recflow_all_positions_patience10": "all_pos patience 10", "recflow_last_item": "recflow last_item",
             "recflow_all_positions_seed1": "all_pos seed 1", "recflow_all_positions_seed2": "all_pos seed 2"}
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, fn: Any) -> None:
        cells = []
        for n in names:
            try:
                v = fn(n)
            except (KeyError, TypeError, ZeroDivisionError):
                v = None
            cells.append("-" if v is None else str(v))
        rows.append((label, cells))

    summ = lambda n: sides[n]["summary"]
    row("epochs trained", lambda n: summ(n)["epochs"])
    row("stopped by", lambda n: (bare_status.get("stop_reason") or "still running") if n == "bare"
        else sides[n]["result"]["stop_reason"])
    row("CPU s per epoch (train+valid)", lambda n: f"{summ(n)['mean_epoch_cpu_s']:.1f}")
    row("best valid epoch", lambda n: summ(n)["best_epoch"])
    row("valid NDCG@10 (best epoch)", lambda n: f"{summ(n)['best_valid_ndcg@10']:.4f}")
    row("test NDCG@10 (best epoch)", lambda n: f"{summ(n)['test_ndcg@10']:.4f}")
    row("test Hit@10 (best epoch)", lambda n: f"{summ(n)['test_hit@10']:.4f}")
    row("test NDCG@10 seen-masked", lambda n: None if n == "bare"
        else f"{sides[n]['result']['final_test_seen_masked']['ndcg@10']:.4f}")
    row("CPU s to best epoch", lambda n: f"{summ(n)['cpu_s_to_best_epoch']:.0f}")
    row("CPU s in all (to stop)", lambda n: f"{summ(n)['cpu_s_total']:.0f}")
    row("max test NDCG@10 (epoch)", lambda n: f"{summ(n)['max_test_ndcg@10']:.4f} ({summ(n)['max_test_epoch']})")
    if target is not None:
        row(f"CPU s to test NDCG@10 >= {target:.4f}", lambda n: (f"{reach[n]['cpu_s']:.0f} (ep {reach[n]['epoch']})"
                                                             if reach.get(n) else "not reached"))
        row("  bare / this side", lambda n: None if n == "bare"
            else f"{ratios[n]['bare_cpu_to_target_over_recflow']:.2f}x")
    row("dropout (hidden/attn)", lambda n: "0.5/0.5" if n == "bare" else
        f"{sides[n]['result']['config']['hidden_dropout_prob']}/{sides[n]['result']['config']['attn_dropout_prob']}")
    row("batch", lambda n: f"{BARE_BATCH} rows" if n == "bare" else
        f"{sides[n]['result']['config']['train_batch_size']} "
        f"{'windows' if sides[n]['result']['objective'] == 'all_positions' else 'rows'}")
    row("patience", lambda n: BARE_STOPPING_STEP if n == "bare"
        else sides[n]["result"]["config"]["training.early_stopping_patience"])
    row("other processes' CPU share", lambda n: f"{summ(n)['mean_machine_busy_others']:.0%}")

    print(f"Time to quality: SASRec on ml-100k (recflow's atomic file, leave-one-out, full ranking), "
          f"{bare_status.get('threads', 1)} torch thread per side, CPU-seconds of training (train + valid epochs)")
    print(f"machine: {os.cpu_count()} CPUs ({_cpu_model()}), python {platform.python_version()}")
    header = ["", *[heads.get(n, n) for n in names]]
    widths = [max(len(header[0]), *(len(r[0]) for r in rows))] + [
        max(len(header[i + 1]), *(len(r[1][i]) for r in rows)) for i in range(len(names))]
    line = "  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(header))
    print(line)
    print("-" * len(line))
    for label, cells in rows:
        print("  ".join([label.ljust(widths[0]), *(c.rjust(widths[i + 1]) for i, c in enumerate(cells))]))
    if split is not None:
        print(f"split: {split['users_differing']} of {split['users_bare']} users differ between bare RecBole and recflow "
              f"(valid item {split['valid_item_differs']}, test item {split['test_item_differs']}, test history "
              f"{split['test_history_differs']}, users on one side only {split['users_only_one_side']})")
    else:
        print("split: not compared yet (the bare side writes its split when it starts)")
    for obj, res in recflow.items():
        if res.get("split_same_as_prepare") is False:
            print(f"WARNING: recflow {obj} trained on another split than --prepare recorded (the code changed?): "
                  f"delete {p['data']} and {work / 'bare'} and start over")
    if cfg_diff is not None:
        print("RecBole config, bare vs recflow's defaults: " + "; ".join(
            f"{k} {v['bare']} vs {v['recflow']}" for k, v in cfg_diff.items()))
    if bare and not finished:
        print(f"bare RecBole has not finished ({bare_status.get('stop_reason') or 'still running'} after "
              f"{bare['epochs']} epochs): its best test NDCG@10 is a lower bound, and its CPU s to reach it may grow")
    summary = {
        "benchmark": "time_to_quality",
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "cpu_model": _cpu_model(), "python": platform.python_version()},
        "bare_finished": finished,
        "target_test_ndcg@10": target,
        "split": split,
        "config_diff": cfg_diff,
        "sides": {n: sides[n]["summary"] for n in names},
        "bare_status": bare_status,
        "recflow": {obj: {k: v for k, v in res.items() if k != "epochs"} for obj, res in recflow.items()},
        "reach_target": reach,
        "ratios": ratios,
    }
    _write_json(p["summary"], summary)
    print(f"summary: {p['summary']}")
    return summary


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------


def _run_child(args: argparse.Namespace, extra: list[str], log: Path | None, tunables: bool) -> int:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("GLIBC_TUNABLES", None)
    if tunables:
        env["GLIBC_TUNABLES"] = MALLOC_TUNABLES  # as recflow's CLI re-executes itself
    cmd = [sys.executable, str(Path(__file__).resolve()), "--work", str(args.work), "--threads", str(args.threads),
           *extra]
    if log is None:
        return subprocess.run(cmd, cwd=REPO, env=env).returncode
    with log.open("a") as fh:
        return subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="work folder (default benchmarks/.ttq)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per side (default 1)")
    parser.add_argument("--bare-only", action="store_true", help="run (or resume) the bare RecBole side here, then exit")
    parser.add_argument("--bare-budget-minutes", type=float, default=150.0,
                        help="stop the bare side once its training has used this many CPU minutes (default 150); "
                        "a later run with a higher budget continues")
    parser.add_argument("--bare-epochs", type=int, default=BARE_EPOCH_CAP, help="bare epoch cap (default 300)")
    parser.add_argument("--skip-bare", action="store_true",
                        help="do not run the bare side; report on the bare epochs recorded so far")
    parser.add_argument("--rerun-recflow", action="store_true",
                        help="train the recflow side(s) again even if their results are saved")
    parser.add_argument("--last-item-epochs", type=int, default=2,
                        help="also train recflow with training.objective=last_item for this many epochs (0: skip)")
    parser.add_argument("--recflow-max-minutes", type=float, default=None,
                        help="training.max_minutes for recflow (default: recflow's default; 0: no wall-time budget)")
    parser.add_argument("--seed-sides", action="store_true",
                        help="also train recflow's defaults with seeds 1 and 2 (the seed spread)")
    parser.add_argument("--report-only", action="store_true", help="print the table from the saved results only")
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--recflow-side", choices=list(RECFLOW_SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--recflow-epochs", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work = work = args.work.resolve()
    if args.prepare:
        prepare(work)
        return
    if args.recflow_side:
        run_recflow(work, args.recflow_side, args.threads, args.recflow_epochs, args.recflow_max_minutes)
        return
    ensure_prepared(work)
    if args.bare_only:
        run_bare(work, args.threads, args.bare_budget_minutes, args.bare_epochs)
        return
    if not args.report_only:
        if not args.skip_bare:
            log = work / "bare.log"
            print(f"bare RecBole: running or resuming (budget {args.bare_budget_minutes:g} CPU minutes; log {log}) ...",
                  flush=True)
            _run_child(args, ["--bare-only", "--bare-budget-minutes", str(args.bare_budget_minutes),
                              "--bare-epochs", str(args.bare_epochs)], log, tunables=False)
        sides = [("all_positions", None), ("all_positions_patience10", None)] + (
            [("last_item", args.last_item_epochs)] if args.last_item_epochs > 0 else []) + (
            [("all_positions_seed1", None), ("all_positions_seed2", None)] if args.seed_sides else [])
        for objective, epochs in sides:
            if (work / f"recflow_{objective}.json").is_file() and not args.rerun_recflow:
                print(f"recflow {objective}: reusing {work / f'recflow_{objective}.json'} (--rerun-recflow to retrain)")
                continue
            print(f"recflow {objective}: training ...", flush=True)
            extra = ["--recflow-side", objective]
            if epochs:
                extra += ["--recflow-epochs", str(epochs)]
            if args.recflow_max_minutes is not None:
                extra += ["--recflow-max-minutes", str(args.recflow_max_minutes)]
            rc = _run_child(args, extra, work / f"recflow_{objective}.log", tunables=True)
            if rc != 0:
                sys.exit(f"error: the recflow {objective} side failed (exit {rc}); see {work / f'recflow_{objective}.log'}")
    report(work)


if __name__ == "__main__":
    main()
