"""Bare RecBole vs recflow: the same SASRec run on ml-100k, timed and scored side by side.

    python benchmarks/bare_recbole.py                 # 2 epochs per side
    python benchmarks/bare_recbole.py --epochs 1 --threads 2

Each side runs in its own subprocess (this script re-invokes itself with ``--side``):

* ``bare``: RecBole 1.2.1 as a user runs it, following its documented quick-start steps
  by hand (``recbole.quick_start`` is not imported: it imports ray): ``Config``,
  ``init_seed``, ``init_logger``, ``create_dataset``, ``data_preparation``, ``get_model``,
  ``get_trainer``, ``trainer.fit``, then the test evaluation. No GLIBC_TUNABLES in its
  environment, and the ``torch.autograd.set_detect_anomaly(True)`` that importing RecBole's
  sequential models switches on stays on: that is what a RecBole user gets.
  The one unavoidable patch: on torch >= 2.6 ``trainer.evaluate(load_best_model=True)``
  fails (it calls ``torch.load`` without ``weights_only=False`` on a checkpoint that pickles
  a ``Config``), so the best checkpoint is loaded here with ``weights_only=False`` and the
  test set is evaluated with ``load_best_model=False``, exactly as RecBole would otherwise.
  It runs with its working directory in a temp folder (it writes ./log, ./log_tensorboard,
  ./saved there).
* ``recflow``: ``core.config.load_config`` + ``core.data.extract.extract`` +
  ``core.modeling.dataset.build_recbole_data`` + ``core.modeling.training.train`` + ``core.modeling.evaluation.ranking_metrics``
  in a temp run folder, in a process with the GLIBC_TUNABLES that recflow's CLI sets.

Both sides use the same RecBole configuration (checked: the parent compares the two sides'
full final RecBole configs key by key and prints any difference not known to be harmless).
They do *not* see the same split, though: ml-100k has many same-second ratings, which RecBole
orders by file row and recflow's snapshot by item id, so for about 30% of users the test item
differs (the parent counts it). Metrics therefore differ between the sides even though each
side is deterministic.

Per-epoch train time is measured the same way on both sides: ``time.perf_counter`` around
the trainer's ``_train_epoch``. The parent also measures each process's wall and CPU time and
the CPU time other processes used meanwhile (from /proc/stat), and warns when that exceeds
10% of the machine: the timings are only meaningful on an otherwise idle machine.
The parent prints a table and, last, one JSON line (``... | tail -1 | jq``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------
# The shared configuration
# ---------------------------------------------------------------------------------------

METRICS = ["Recall", "MRR", "NDCG", "Hit", "Precision"]
TOPK = [10]
SEED = 2020


def bare_config_dict(epochs: int) -> dict[str, Any]:
    """What a RecBole user passes as ``config_dict`` (SASRec's own defaults otherwise)."""
    return {
        "MAX_ITEM_LIST_LENGTH": 50,
        "train_batch_size": 1024,
        "learning_rate": 0.001,
        "epochs": epochs,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "metrics": METRICS,
        "topk": TOPK,
        "valid_metric": "NDCG@10",
        "train_neg_sample_args": None,  # SASRec's CE loss trains without negative samples
        "seed": SEED,
        "user_inter_num_interval": "[5,inf)",
        # Presentation only, so both sides report alike: no progress bars, 6 decimals.
        "show_progress": False,
        "metric_decimal_place": 6,
    }


def recflow_overrides(epochs: int, threads: int | None, runs_dir: Path) -> dict[str, Any]:
    """The same run through recflow's typed config (recflow maps it onto the dict above)."""
    return {
        "runs_dir": runs_dir,
        "model.name": "SASRec",
        "dataset.split": "loo",
        "dataset.max_seq_length": 50,
        "dataset.min_user_interactions": 5,
        "dataset.min_item_interactions": 1,  # no item filter, as in bare
        "training.epochs": epochs,
        "training.train_batch_size": 1024,
        "training.eval_batch_size": 4096,  # RecBole's default
        "training.learning_rate": 0.001,
        "training.seed": SEED,
        "training.early_stopping_patience": 10,  # RecBole's default stopping_step
        "training.threads": threads,
        "evaluation.metrics": METRICS,
        "evaluation.topk": TOPK,
        "evaluation.valid_metric": "NDCG@10",
        "evaluation.gate_metric": "NDCG@10",
    }


# The sides' full RecBole configs (``final_config_dict``, after RecBole fills in its defaults)
# are compared key by key. These keys are expected to differ, and why that is harmless:
BENIGN_CONFIG_DIFFS = {
    "dataset": "a name: recflow's atomic files are not called ml-100k (RecBole would swap in its own copy)",
    "data_path": "a location",
    "checkpoint_dir": "a location",
    "load_col": "the same four columns, in another order",
    "normalize_all": "only the rating column is normalised (ml-100k.yaml); SASRec never reads ratings",
    "item_inter_num_interval": "None and [1,inf) both keep every item",
    "entity_kg_num_interval": "knowledge-graph models only",
    "relation_kg_num_interval": "knowledge-graph models only",
    "use_gpu": "bare asks for a GPU by default; the resolved 'device' is compared too",
}


# ---------------------------------------------------------------------------------------
# Helpers used inside each side's process
# ---------------------------------------------------------------------------------------


def _effective_config(config: Any) -> dict[str, Any]:
    """RecBole's whole final config, JSON-safe (the device becomes its string)."""
    return json.loads(json.dumps(dict(config.final_config_dict), default=str))


def _split_summary(dataset: Any, train: Any, valid: Any, test: Any) -> dict[str, Any]:
    """Sizes, plus each test user's (target item, history) in raw tokens, to compare the splits."""
    ds = test._dataset
    uid, iid = ds.uid_field, ds.iid_field
    list_field, len_field = iid + ds.config["LIST_SUFFIX"], ds.config["ITEM_LIST_LENGTH_FIELD"]
    users = ds.id2token(uid, ds.inter_feat[uid].numpy())
    targets = ds.id2token(iid, ds.inter_feat[iid].numpy())
    lists = ds.inter_feat[list_field].numpy()
    lengths = ds.inter_feat[len_field].numpy()
    test_cases = {}
    for u, t, seq, n in zip(users, targets, lists, lengths):
        history = " ".join(ds.id2token(iid, seq[:n]).tolist())
        test_cases[str(u)] = [str(t), hashlib.sha1(history.encode()).hexdigest()[:16]]
    return {
        "users": int(dataset.user_num - 1),
        "items": int(dataset.item_num - 1),
        "interactions": int(dataset.inter_num),
        "train_sequences": len(train.dataset),
        "valid_sequences": len(valid._dataset),
        "test_sequences": len(test._dataset),
        "test_cases": test_cases,
    }


def _process_info() -> dict[str, Any]:
    import recbole
    import torch

    return {
        "torch": torch.__version__,
        "recbole": recbole.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # Linux: KiB
    }


def _metric(result: dict[str, Any], name: str) -> float:
    return round(float(result[name.lower()]), 6)


def fit_bare(model_name: str, config_dict: dict[str, Any], threads: int | None) -> dict[str, Any]:
    """RecBole's documented path, step by step (as recbole.quick_start.run_recbole does it), up to
    ``trainer.fit``. Also used by ``benchmarks/training.py`` for other models and configs."""
    t_start = time.perf_counter()
    import torch

    if threads:
        torch.set_num_threads(threads)
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

    t_imported = time.perf_counter()
    # RecBole's Config also parses sys.argv ("--key=value"); this script's own flags are not for it.
    sys.argv = sys.argv[:1]
    config = Config(model=model_name, dataset="ml-100k", config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    t_data = time.perf_counter()

    # Measurement only: time each _train_epoch call, as recflow's trainer does for itself.
    epoch_seconds: list[float] = []
    epoch_cpu_seconds: list[float] = []  # the process's CPU time (all threads): less sensitive to contention
    anomaly: list[bool] = []
    original = trainer._train_epoch

    def timed_train_epoch(*args: Any, **kwargs: Any) -> Any:
        anomaly.append(torch.is_anomaly_enabled())
        t0, c0 = time.perf_counter(), time.process_time()
        loss = original(*args, **kwargs)
        epoch_seconds.append(time.perf_counter() - t0)
        epoch_cpu_seconds.append(time.process_time() - c0)
        return loss

    trainer._train_epoch = timed_train_epoch
    _best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=True, show_progress=config["show_progress"]
    )
    t_fit = time.perf_counter()
    return {
        "config": config, "dataset": dataset, "train": train_data, "valid": valid_data, "test": test_data,
        "model": model, "trainer": trainer, "epoch_seconds": epoch_seconds, "epoch_cpu_seconds": epoch_cpu_seconds,
        "anomaly": anomaly,
        "best_valid_result": best_valid_result,
        "t": {"start": t_start, "imported": t_imported, "data": t_data, "fit": t_fit},
    }


def run_bare(epochs: int, threads: int | None) -> dict[str, Any]:
    """Bare RecBole's SASRec (``fit_bare``), then the test evaluation of its best checkpoint."""
    import torch

    fitted = fit_bare("SASRec", bare_config_dict(epochs), threads)
    config, model, trainer = fitted["config"], fitted["model"], fitted["trainer"]
    train_data, valid_data, test_data, dataset = fitted["train"], fitted["valid"], fitted["test"], fitted["dataset"]
    epoch_seconds, anomaly, best_valid_result = fitted["epoch_seconds"], fitted["anomaly"], fitted["best_valid_result"]
    t_start, t_imported, t_data, t_fit = (fitted["t"][k] for k in ("start", "imported", "data", "fit"))

    # The one unavoidable patch (torch >= 2.6): load the best checkpoint with weights_only=False,
    # then evaluate without RecBole reloading it (its torch.load would refuse the pickled Config).
    checkpoint = torch.load(trainer.saved_model_file, map_location=trainer.device, weights_only=False)
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    test_result = trainer.evaluate(test_data, load_best_model=False, show_progress=config["show_progress"])
    t_end = time.perf_counter()
    return {
        "side": "bare",
        **_process_info(),
        "anomaly_detection": any(anomaly),
        "device": str(config["device"]),
        "epoch_train_seconds": [round(s, 3) for s in epoch_seconds],
        "best_epoch": int(checkpoint["epoch"]),
        "valid_ndcg@10": _metric(best_valid_result, "ndcg@10"),
        "test_ndcg@10": _metric(test_result, "ndcg@10"),
        "test_mrr@10": _metric(test_result, "mrr@10"),
        "test": {k: round(float(v), 6) for k, v in test_result.items()},
        "seconds": {
            "imports": round(t_imported - t_start, 3),
            "data": round(t_data - t_imported, 3),
            "fit": round(t_fit - t_data, 3),
            "test_eval": round(t_end - t_fit, 3),
            "total": round(t_end - t_start, 3),
        },
        "config": _effective_config(config),
        "split": _split_summary(dataset, train_data, valid_data, test_data),
    }


def run_recflow(epochs: int, threads: int | None, work: Path) -> dict[str, Any]:
    """recflow's own steps (what the Prefect tasks call), without the flow around them."""
    t_start = time.perf_counter()
    import torch

    from core.config import load_config
    from core.data.extract import extract
    from core.modeling.dataset import build_recbole_data
    from core.modeling.evaluation import ranking_metrics
    from core.modeling.training import load_trained, train

    t_imported = time.perf_counter()
    cfg = load_config(overrides=recflow_overrides(epochs, threads, work / "runs"))
    run_dir = work / "runs" / "bench"
    run_dir.mkdir(parents=True)
    snapshot = extract(cfg, run_dir)
    splits, data = build_recbole_data(snapshot, cfg, run_dir)
    t_data = time.perf_counter()

    anomaly: list[bool] = []
    trained = train(cfg, splits, run_dir, on_epoch=lambda _stats: anomaly.append(torch.is_anomaly_enabled()), data=data)
    t_fit = time.perf_counter()

    model = load_trained(data, trained.checkpoint)
    _valid, test = ranking_metrics(data, model, trained.checkpoint)
    t_end = time.perf_counter()
    return {
        "side": "recflow",
        **_process_info(),
        "anomaly_detection": any(anomaly),
        "device": trained.device,
        "epoch_train_seconds": [e.train_seconds for e in trained.epochs],
        "best_epoch": trained.best_epoch,
        "valid_ndcg@10": round(float(trained.best_valid_score), 6),
        "test_ndcg@10": _metric(test, "ndcg@10"),
        "test_mrr@10": _metric(test, "mrr@10"),
        "test": test,
        "seconds": {
            "imports": round(t_imported - t_start, 3),
            "data": round(t_data - t_imported, 3),
            "fit": round(t_fit - t_data, 3),
            "test_eval": round(t_end - t_fit, 3),
            "total": round(t_end - t_start, 3),
        },
        "config": _effective_config(data.config),
        "split": _split_summary(data.dataset, data.train, data.valid, data.test),
    }


def child_main(args: argparse.Namespace) -> None:
    if args.side == "bare":
        result = run_bare(args.epochs, args.threads)
    else:
        result = run_recflow(args.epochs, args.threads, Path.cwd())
    Path(args.result).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------
# The parent: run both sides, compare, print
# ---------------------------------------------------------------------------------------


def _malloc_tunables() -> str:
    try:
        from cli import _MALLOC_TUNABLES  # the exact value recflow's CLI re-executes itself with

        return _MALLOC_TUNABLES
    except ImportError:
        return "glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=4294967295"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes on the machine have spent busy since boot (Linux /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _run_side(side: str, args: argparse.Namespace, scratch: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one side in its own process; return its result and how the process ran."""
    work = scratch / side
    work.mkdir()
    result_file = scratch / f"{side}.json"
    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    if side == "recflow":
        env["GLIBC_TUNABLES"] = _malloc_tunables()  # as recflow's CLI runs itself
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--epochs", str(args.epochs),
           "--result", str(result_file)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print(f"running {side} ({args.epochs} epoch(s)) ...", file=sys.stderr, flush=True)
    log = scratch / f"{side}.log"
    load_before = os.getloadavg()[0]
    busy_before = _busy_cpu_seconds()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=work, env=env, stdout=None if args.verbose else fh,
                              stderr=None if args.verbose else subprocess.STDOUT)
    wall = time.perf_counter() - t0
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy_after = _busy_cpu_seconds()
    if proc.returncode != 0 or not result_file.exists():
        tail = "" if args.verbose else "\n".join(log.read_text().splitlines()[-40:])
        sys.exit(f"error: the {side} side failed (exit {proc.returncode}):\n{tail}")
    print(f"  {side} done in {wall:.1f}s", file=sys.stderr, flush=True)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    # CPU time the rest of the machine used meanwhile: the contention this side ran under.
    others = None if busy_before is None or busy_after is None else max(busy_after - busy_before - cpu, 0.0)
    stats = {
        "wall_seconds": round(wall, 3),
        "cpu_seconds": round(cpu, 3),
        "other_processes_cpu_seconds": None if others is None else round(others, 1),
        "loadavg_1m_before": round(load_before, 2),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
    }
    return json.loads(result_file.read_text()), stats


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def _compare_configs(a: dict[str, Any], b: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(benign, unexpected) differences between the two sides' full RecBole configs."""
    benign, unexpected = {}, {}
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va == vb:
            continue
        entry = {"bare": va, "recflow": vb}
        same_columns = key == "load_col" and isinstance(va, dict) and isinstance(vb, dict) and (
            {k: sorted(v) for k, v in va.items()} == {k: sorted(v) for k, v in vb.items()})
        if key in BENIGN_CONFIG_DIFFS and (key != "load_col" or same_columns):
            benign[key] = {**entry, "why_harmless": BENIGN_CONFIG_DIFFS[key]}
        else:
            unexpected[key] = entry
    return benign, unexpected


def _compare_splits(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    ca, cb = a["test_cases"], b["test_cases"]
    common = set(ca) & set(cb)
    return {
        "test_users_bare": len(ca),
        "test_users_recflow": len(cb),
        "test_users_common": len(common),
        "same_test_item": sum(ca[u][0] == cb[u][0] for u in common),
        "same_test_item_and_history": sum(ca[u] == cb[u] for u in common),
    }


def parent_main(args: argparse.Namespace) -> None:
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="recflow-bench-") as tmp:
        scratch = Path(tmp)
        bare, bare_proc = _run_side("bare", args, scratch)
        rec, rec_proc = _run_side("recflow", args, scratch)
        if args.keep:
            kept = Path(tempfile.mkdtemp(prefix="recflow-bench-kept-"))
            shutil.copytree(scratch, kept, dirs_exist_ok=True)
            print(f"kept the scratch folders in {kept}", file=sys.stderr)

    benign, unexpected = _compare_configs(bare.pop("config"), rec.pop("config"))
    split_cmp = _compare_splits(bare["split"], rec["split"])
    for side in (bare, rec):
        side["split"].pop("test_cases")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env = {
        "python": platform.python_version(),
        "torch": bare["torch"],
        "recbole": bare["recbole"],
        "cpu_count": os.cpu_count(),
        "cpus_usable": cpus,
        "cpu_model": _cpu_model(),
        "threads_flag": args.threads,
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print()
    print(f"python {env['python']}  torch {env['torch']}  recbole {env['recbole']}  device {bare['device']}")
    print(f"CPUs: {env['cpu_count']} ({cpus} usable)  model: {env['cpu_model']}  "
          f"torch threads: bare {bare['torch_threads']}, recflow {rec['torch_threads']}")
    print(f"SASRec on ml-100k, {args.epochs} epoch(s), batch 1024, lr 0.001, max_len 50, "
          f"LOO (TO), full ranking, seed {SEED}")
    print()

    rows: list[tuple[str, str, str, str]] = []

    def row(label: str, b: Any, r: Any, ratio: Any = "") -> None:
        rows.append((label, str(b), str(r), str(ratio)))

    eb, er = bare["epoch_train_seconds"], rec["epoch_train_seconds"]
    for i in range(max(len(eb), len(er))):
        b = eb[i] if i < len(eb) else None
        r = er[i] if i < len(er) else None
        row(f"epoch {i} train s", f"{b:.2f}" if b is not None else "-", f"{r:.2f}" if r is not None else "-",
            f"{_ratio(b, r):.2f}x" if b and r else "")
    mean_b, mean_r = sum(eb) / len(eb), sum(er) / len(er)
    ratio_mean = _ratio(mean_b, mean_r)
    if len(eb) > 1 or len(er) > 1:
        row("mean epoch train s", f"{mean_b:.2f}", f"{mean_r:.2f}", f"{ratio_mean:.2f}x")
    row("fit s (train + valid)", f"{bare['seconds']['fit']:.1f}", f"{rec['seconds']['fit']:.1f}",
        f"{_ratio(bare['seconds']['fit'], rec['seconds']['fit']):.2f}x")
    row("data prep s", f"{bare['seconds']['data']:.1f}", f"{rec['seconds']['data']:.1f}")
    row("process wall s", f"{bare_proc['wall_seconds']:.1f}", f"{rec_proc['wall_seconds']:.1f}",
        f"{_ratio(bare_proc['wall_seconds'], rec_proc['wall_seconds']):.2f}x")
    row("process CPU s", f"{bare_proc['cpu_seconds']:.1f}", f"{rec_proc['cpu_seconds']:.1f}",
        f"{_ratio(bare_proc['cpu_seconds'], rec_proc['cpu_seconds']):.2f}x")
    if bare_proc["other_processes_cpu_seconds"] is not None and rec_proc["other_processes_cpu_seconds"] is not None:
        row("other processes' CPU s", f"{bare_proc['other_processes_cpu_seconds']:.1f}",
            f"{rec_proc['other_processes_cpu_seconds']:.1f}")
    row("peak RSS MiB", f"{bare['max_rss_mib']:.0f}", f"{rec['max_rss_mib']:.0f}")
    row("best epoch", bare["best_epoch"], rec["best_epoch"])
    row("valid NDCG@10 (best)", f"{bare['valid_ndcg@10']:.4f}", f"{rec['valid_ndcg@10']:.4f}")
    row("test NDCG@10", f"{bare['test_ndcg@10']:.4f}", f"{rec['test_ndcg@10']:.4f}")
    row("test MRR@10", f"{bare['test_mrr@10']:.4f}", f"{rec['test_mrr@10']:.4f}")
    row("anomaly detection", "on" if bare["anomaly_detection"] else "off",
        "on" if rec["anomaly_detection"] else "off")
    row("GLIBC_TUNABLES", "set" if bare["glibc_tunables"] else "unset", "set" if rec["glibc_tunables"] else "unset")
    row("users / items / train seqs",
        f"{bare['split']['users']}/{bare['split']['items']}/{bare['split']['train_sequences']}",
        f"{rec['split']['users']}/{rec['split']['items']}/{rec['split']['train_sequences']}")

    header = ("", "bare RecBole", "recflow", "bare/recflow")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    line = "  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(header))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
    print()
    print(f"config: {'no unexpected differences' if not unexpected else 'UNEXPECTED DIFFERENCES: ' + json.dumps(unexpected)}"
          f" in RecBole's final config; benign: {', '.join(benign) or 'none'}")
    print(f"test split: {split_cmp['same_test_item']}/{split_cmp['test_users_common']} users have the same test item, "
          f"{split_cmp['same_test_item_and_history']} the same item and history (same-second ratings are ordered "
          f"by file row in bare RecBole, by item id in recflow's snapshot)")
    # Contention: other processes took more than 10% of the machine's CPU time during a side.
    shares = [p["other_processes_cpu_seconds"] / (p["wall_seconds"] * cpus) for p in (bare_proc, rec_proc)
              if p["other_processes_cpu_seconds"] is not None and p["wall_seconds"] > 0]
    busy = any(share > 0.10 for share in shares)
    if busy:
        print(f"warning: other processes used {max(shares):.0%} of the machine's CPU time during a side: "
              f"the timings are inflated, not necessarily evenly (rerun on an idle machine)")
    total = time.perf_counter() - t_all
    print(f"total wall time: {total:.1f}s")
    print(json.dumps({
        "benchmark": "bare_recbole",
        "epochs": args.epochs,
        "env": env,
        "ratio_mean_epoch_train": ratio_mean,
        "bare": {**bare, "process": bare_proc},
        "recflow": {**rec, "process": rec_proc},
        "config_diff": {"benign": benign, "unexpected": unexpected},
        "split_comparison": split_cmp,
        "cpu_contention_warning": busy,
        "total_wall_seconds": round(total, 3),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2, help="training epochs per side (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--verbose", action="store_true", help="stream each side's RecBole log")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folders (logs, checkpoints)")
    parser.add_argument("--side", choices=["bare", "recflow"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if args.side:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
