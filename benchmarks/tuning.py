"""recflow's search vs RecBole's own ``HyperTuning``: the same space, data, epoch cap and wall budget.

    python benchmarks/tuning.py --minutes 45                 # one side after the other, 45 min each
    python benchmarks/tuning.py --minutes 45 --concurrent    # both at once, one thread each (2-core box)
    python benchmarks/tuning.py --minutes 1 --epochs 1       # a smoke run

SASRec on MovieLens-100k. Each side runs in its own subprocess:

* ``recflow``: ``recflow tune --config <ml-100k-sasrec + training.threads> --space sasrec --study
  <name> --trials <large> --timeout <minutes> --epochs <cap>``, the command a user runs (TPE,
  median pruning, the all-position objective, one split built once per study).
* ``hypertuning``: RecBole 1.2.1's ``recbole.trainer.hyper_tuning.HyperTuning`` with
  ``algo="bayes"`` (hyperopt's TPE), called directly as RecBole's docs show, with the equivalent of
  RecBole's ``objective_function`` written here (``recbole.quick_start`` is not imported: it
  imports ray): ``Config`` -> ``create_dataset`` -> ``data_preparation`` -> model -> ``Trainer.fit``
  -> test evaluation, each trial from scratch. The process never imports ``core``.

Same data: both read recflow's snapshot of ml-100k (its atomic file, written once into
``<work>/data``), so both split it the same way. Same space: ``configs/spaces/sasrec.yaml``
translated into hyperopt expressions (``loguniform`` over log bounds, ``quniform`` cast to int,
``choice``); a knob RecBole has no counterpart for (``training.window_stride``: recflow's
all-position windows) is searched by recflow only and listed in the JSON. Same epoch cap
(``--epochs``). Same wall budget: neither side starts a trial after ``--minutes``; a trial
running at the deadline finishes, capped at ``--trial-minutes`` of training on both sides
(recflow: ``--trial-minutes``; here: the fit stops after the first epoch past the cap).
HyperTuning's own "10 trials without progress" early stop is switched off so it uses its budget.

Printed: a table (side, trials completed, best valid NDCG@10, test NDCG@10 of that best-valid
trial, wall minutes) and, last, one JSON line; ``<work>/summary.json`` holds the same.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_WORK = HERE / ".tuning"
SPACE = "sasrec"
PRESET = "ml-100k-sasrec"
STUDY = "bench"
MANY_TRIALS = 100_000  # the wall budget ends the search, not a trial count
SEED = 2020
BARE_BATCH = 1024  # as benchmarks/bare_recbole.py and time_to_quality.py (RecBole's default: 2048)
MAX_LEN = 50  # the preset's dataset.max_seq_length
METRIC = "ndcg@10"

# recflow config path -> RecBole config key; paths not here have no RecBole counterpart.
RECBOLE_KEYS = {
    "training.learning_rate": "learning_rate",
    "training.weight_decay": "weight_decay",
    "training.train_batch_size": "train_batch_size",
    "dataset.max_seq_length": "MAX_ITEM_LIST_LENGTH",
}


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _paths(work: Path) -> dict[str, Path]:
    return {
        "data": work / "data",
        "prepared": work / "data" / "prepared.json",
        "recflow": work / "recflow",
        "recflow_config": work / "recflow" / "recflow-config.yaml",
        "hyper": work / "hypertuning",
        "hyper_space": work / "hypertuning" / "space.json",
        "hyper_trials": work / "hypertuning" / "trials.jsonl",
        "hyper_result": work / "hypertuning" / "result.json",
        "summary": work / "summary.json",
    }


# ---------------------------------------------------------------------------------------
# The parent: data, space translation, the two sides, the table (imports core)
# ---------------------------------------------------------------------------------------


def translate_space(space: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """recflow's search space as hyperopt specs over RecBole keys; also the paths left out.

    Args:
        space: a loaded ``core.experiments.space.SearchSpace``.

    Returns:
        (specs, recflow_only): one dict per RecBole knob (name, kind, bounds or choices), and
        the dotted paths that have no RecBole counterpart.
    """
    specs: list[dict[str, Any]] = []
    recflow_only: list[str] = []
    for path, p in space.params.items():
        key = RECBOLE_KEYS.get(path) or (path.removeprefix("model.params.") if path.startswith("model.params.") else None)
        if key is None:
            recflow_only.append(path)
            continue
        if p.type == "categorical":
            specs.append({"name": key, "kind": "choice", "choices": list(p.choices)})
        elif p.type == "int":
            if p.log:
                specs.append({"name": key, "kind": "qloguniform", "low": math.log(p.low), "high": math.log(p.high),
                              "q": p.step, "int": True})
            else:
                specs.append({"name": key, "kind": "quniform", "low": p.low, "high": p.high, "q": p.step, "int": True})
        elif p.log:
            specs.append({"name": key, "kind": "loguniform", "low": math.log(p.low), "high": math.log(p.high)})
        elif p.step:
            specs.append({"name": key, "kind": "quniform", "low": p.low, "high": p.high, "q": p.step, "int": False})
        else:
            specs.append({"name": key, "kind": "uniform", "low": p.low, "high": p.high})
    return specs, recflow_only


def prepare(work: Path, epochs: int, threads: int, users: int | None) -> dict[str, Any]:
    """recflow's snapshot of ml-100k (or of its first ``users`` users) as a RecBole atomic file,
    the recflow side's config (reading the same source), the translated space."""
    from core.config import dump_config, load_config
    from core.data.extract import extract
    from core.experiments.space import load_space
    from core.modeling.dataset import build_dataset

    p = _paths(work)
    for key in ("data", "recflow", "hyper"):
        p[key].mkdir(parents=True, exist_ok=True)
    overrides: dict[str, Any] = {"training.threads": threads, "training.epochs": epochs}
    if users:
        # A smaller data set for smoke runs: both sides read this one file (recflow through its
        # file source, RecBole through the atomic file recflow builds from it).
        import polars as pl

        (p["data"] / "ml-100k").mkdir(exist_ok=True)
        full = extract(load_config(PRESET), p["data"] / "ml-100k")
        frame = pl.read_parquet(full.path)
        keep = frame["user_id"].unique().sort()[:users]
        subset = p["data"] / f"ml-100k-{users}-users.parquet"
        frame.filter(pl.col("user_id").is_in(keep.implode())).write_parquet(subset)
        overrides |= {"source.kind": "file", "source.path": subset.resolve()}
    cfg = load_config(PRESET, overrides)
    dump_config(cfg, p["recflow_config"])
    if not p["prepared"].is_file():
        splits = build_dataset(extract(cfg, p["data"]), cfg, p["data"].resolve())
        _write_json(p["prepared"], {"data_dir": str(splits.data_dir), "dataset": splits.dataset_name,
                                    "subset_users": users, "users": splits.users, "items": splits.items,
                                    "interactions": splits.interactions})
    if json.loads(p["prepared"].read_text()).get("subset_users") != users:
        sys.exit(f"error: {p['data']} was prepared for other data (--users); delete it or pass another --work")
    specs, recflow_only = translate_space(load_space(SPACE))
    _write_json(p["hyper_space"], {"specs": specs, "recflow_only": recflow_only})
    return json.loads(p["prepared"].read_text()) | {"recflow_only": recflow_only}


def recflow_command(work: Path, minutes: float, trial_minutes: float, epochs: int) -> list[str]:
    p = _paths(work)
    return [sys.executable, "-m", "cli", "tune", "--config", str(p["recflow_config"]), "--space", SPACE,
            "--study", STUDY, "--studies-dir", str(p["recflow"]), "--trials", str(MANY_TRIALS),
            "--timeout", str(minutes), "--trial-minutes", str(trial_minutes), "--epochs", str(epochs),
            "--device", "cpu"]


def hyper_command(work: Path, minutes: float, trial_minutes: float, epochs: int, threads: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--side", "hypertuning", "--work", str(work),
            "--minutes", str(minutes), "--trial-minutes", str(trial_minutes), "--epochs", str(epochs),
            "--threads", str(threads)]


def _start(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], float]:
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT), time.perf_counter()


def _finish(proc: subprocess.Popen[bytes], started: float, name: str, log: Path) -> float:
    code = proc.wait()
    wall = time.perf_counter() - started
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        sys.exit(f"error: the {name} side exited with {code} (log: {log}):\n{tail}")
    return wall / 60


def recflow_result(work: Path) -> dict[str, Any]:
    """The recflow side's figures, read from its study storage (SQLite in the study folder)."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = _paths(work)["recflow"] / STUDY / "study.db"
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{db}")
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    tests = [t.user_attrs.get(f"test_{METRIC}") for t in complete]
    return {
        "complete": len(complete),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "best_valid": best.value if best else None,
        "test_at_best_valid": best.user_attrs.get(f"test_{METRIC}") if best else None,
        "max_test": max((x for x in tests if x is not None), default=None),
        "best_params": best.params if best else None,
        "trial_minutes": [t.user_attrs.get("minutes") for t in complete],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = args.work.resolve()
    p = _paths(work)
    print(f"preparing {work} (recflow's ml-100k snapshot, the recflow config, the translated space) ...", flush=True)
    info = prepare(work, args.epochs, args.threads, args.users)
    study_dir = p["recflow"] / STUDY
    if study_dir.exists() or p["hyper_trials"].exists():
        sys.exit(f"error: {work} holds an earlier run's results; remove {study_dir} and {p['hyper']}/trials.jsonl "
                 f"(or pass another --work)")
    env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_HOME": str(work / "prefect-home"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    sides = {
        "recflow": (recflow_command(work, args.minutes, args.trial_minutes, args.epochs), p["recflow"] / "log.txt"),
        "hypertuning": (hyper_command(work, args.minutes, args.trial_minutes, args.epochs, args.threads),
                        p["hyper"] / "log.txt"),
    }
    walls: dict[str, float] = {}
    running: list[subprocess.Popen[bytes]] = []
    try:
        if args.concurrent:
            print(f"both sides at once: {args.minutes:g} min budget each, logs {p['recflow']}/log.txt and "
                  f"{p['hyper']}/log.txt ...", flush=True)
            started = {name: _start(cmd, log, env) for name, (cmd, log) in sides.items()}
            running += [proc for proc, _ in started.values()]
            for name, (proc, t0) in started.items():
                walls[name] = _finish(proc, t0, name, sides[name][1])
        else:
            for name, (cmd, log) in sides.items():
                print(f"{name}: {args.minutes:g} min budget, log {log} ...", flush=True)
                proc, t0 = _start(cmd, log, env)
                running.append(proc)
                walls[name] = _finish(proc, t0, name, log)
    finally:
        for proc in running:  # one side failed (or ^C): do not leave the other running
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results = {"recflow": recflow_result(work), "hypertuning": json.loads(p["hyper_result"].read_text())}
    for name in results:
        results[name]["wall_minutes"] = round(walls[name], 2)
    summary = {
        "budget_minutes": args.minutes, "trial_minutes": args.trial_minutes, "epochs": args.epochs,
        "threads": args.threads, "concurrent": args.concurrent, "cpus": os.cpu_count(), "data": info,
        "sides": results, "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    _write_json(p["summary"], summary)
    return summary


def print_table(summary: dict[str, Any]) -> None:
    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    rows = [("side", "trials complete", "pruned", f"best valid {METRIC}", f"test {METRIC} (best valid)",
             "wall min")]
    for name, r in summary["sides"].items():
        rows.append((name, str(r["complete"]), str(r.get("pruned", 0)), num(r["best_valid"], ".4f"),
                     num(r["test_at_best_valid"], ".4f"), num(r["wall_minutes"], ".1f")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"\nbudget {summary['budget_minutes']:g} min per side, epoch cap {summary['epochs']}, "
          f"{summary['threads']} thread(s) per side, {'concurrent' if summary['concurrent'] else 'one after the other'}")
    for row in rows:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    only = summary["data"].get("recflow_only")
    if only:
        print(f"searched by recflow only (no RecBole counterpart): {', '.join(only)}")


# ---------------------------------------------------------------------------------------
# --side hypertuning: RecBole's HyperTuning on the same atomic file (never imports core)
# ---------------------------------------------------------------------------------------


class _BudgetSpentError(Exception):
    """Raised by the objective once the wall budget is spent: hyperopt's fmin then returns."""


class _TrialCapReachedError(Exception):
    """Raised from RecBole's fit callback when a trial passed --trial-minutes."""


def hyperopt_space(specs: list[dict[str, Any]]) -> dict[str, Any]:
    """hyperopt expressions for the translated specs (what HyperTuning's ``space=`` takes)."""
    from hyperopt import hp
    from hyperopt.pyll import scope

    space: dict[str, Any] = {}
    for s in specs:
        name, kind = s["name"], s["kind"]
        if kind == "choice":
            space[name] = hp.choice(name, s["choices"])
        elif kind == "uniform":
            space[name] = hp.uniform(name, s["low"], s["high"])
        elif kind == "loguniform":
            space[name] = hp.loguniform(name, s["low"], s["high"])
        else:  # quniform / qloguniform
            expr = getattr(hp, kind)(name, s["low"], s["high"], s["q"])
            space[name] = scope.int(expr) if s["int"] else expr
    return space


def bare_config_dict(work: Path, epochs: int) -> dict[str, Any]:
    """The fixed part of every trial: recflow's atomic file, the preset's shared settings."""
    p = _paths(work)
    prepared = json.loads(p["prepared"].read_text())
    data_dir, dataset = Path(prepared["data_dir"]), prepared["dataset"]
    with (data_dir / dataset / f"{dataset}.inter").open() as fh:
        header = [h.split(":")[0] for h in fh.readline().rstrip("\n").split("\t")]
    return {
        "data_path": str(data_dir),
        "checkpoint_dir": str(p["hyper"] / "saved"),
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp", "RATING_FIELD": "rating",
        "load_col": {"inter": header},
        "user_inter_num_interval": "[5,inf)",
        "MAX_ITEM_LIST_LENGTH": MAX_LEN,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "metrics": ["NDCG", "Hit"], "topk": [10], "valid_metric": "NDCG@10", "metric_decimal_place": 6,
        "epochs": epochs, "train_batch_size": BARE_BATCH, "loss_type": "CE", "train_neg_sample_args": None,
        "seed": SEED, "show_progress": False, "state": "WARNING",
    }


def run_hypertuning(work: Path, minutes: float, trial_minutes: float, epochs: int, threads: int) -> None:
    started = time.perf_counter()
    deadline = started + minutes * 60
    p = _paths(work)
    os.environ.setdefault("HYPEROPT_FMIN_SEED", str(SEED))  # fmin's TPE seed (HyperTuning passes none)
    import torch

    torch.set_num_threads(threads)
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.trainer.hyper_tuning import HyperTuning
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

    leaked = sorted(m for m in sys.modules if m == "core" or m.startswith("core."))
    if leaked:
        sys.exit(f"error: recflow modules in the HyperTuning process: {leaked}")
    specs = json.loads(p["hyper_space"].read_text())["specs"]
    fixed = bare_config_dict(work, epochs)
    dataset_name = json.loads(p["prepared"].read_text())["dataset"]
    os.chdir(p["hyper"])  # RecBole writes ./log and ./log_tensorboard
    sys.argv = sys.argv[:1]  # RecBole's Config parses --key=value from argv too
    records: list[dict[str, Any]] = []

    def objective_function(params: dict[str, Any], config_file_list: list[str] | None = None) -> dict[str, Any]:
        """RecBole's quick_start.objective_function, written out (plus the budget and the trial cap)."""
        if records and time.perf_counter() >= deadline:
            raise _BudgetSpentError
        t0 = time.perf_counter()
        config = Config(model="SASRec", dataset=dataset_name, config_file_list=config_file_list,
                        config_dict=fixed | params)
        init_seed(config["seed"], config["reproducibility"])
        init_logger(config)
        dataset = create_dataset(config)
        train_data, valid_data, test_data = data_preparation(config, dataset)
        init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
        model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
        # Importing RecBole's sequential models switches anomaly detection on (sine.py): a ~2x
        # slowdown that says nothing about the search; off, as the other benchmarks do.
        torch.autograd.set_detect_anomaly(False)
        trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
        epochs_run = [0]

        def cap(epoch_idx: int, valid_score: float) -> None:
            epochs_run[0] = epoch_idx + 1
            if time.perf_counter() - t0 >= trial_minutes * 60:
                raise _TrialCapReachedError

        stop = "early stopping or epoch cap"
        try:
            best_valid_score, best_valid_result = trainer.fit(train_data, valid_data, saved=True,
                                                              show_progress=False, callback_fn=cap)
        except _TrialCapReachedError:
            stop = "trial cap"
            best_valid_score, best_valid_result = trainer.best_valid_score, trainer.best_valid_result
        # RecBole's evaluate(load_best_model=True) calls torch.load without weights_only=False and
        # fails on its own checkpoint under torch >= 2.6: load it here, as RecBole would.
        checkpoint = torch.load(trainer.saved_model_file, map_location=config["device"], weights_only=False)
        model.load_state_dict(checkpoint["state_dict"])
        model.load_other_parameter(checkpoint.get("other_parameter"))
        test_result = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
        Path(trainer.saved_model_file).unlink()  # one checkpoint per trial would pile up over a long budget
        record = {"params": params, "valid": float(best_valid_score), "test": float(test_result[METRIC]),
                  "epochs": epochs_run[0], "stop": stop, "minutes": round((time.perf_counter() - t0) / 60, 3),
                  "finished_at_minute": round((time.perf_counter() - started) / 60, 3)}
        records.append(record)
        with p["hyper_trials"].open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(f"trial {len(records)}: valid {record['valid']:.4f} test {record['test']:.4f} after "
              f"{record['epochs']} epochs, {record['minutes']:.1f} min ({stop}); {params}", flush=True)
        return {"model": config["model"], "best_valid_score": best_valid_score,
                "valid_score_bigger": config["valid_metric_bigger"], "best_valid_result": best_valid_result,
                "test_result": test_result}

    # early_stop: HyperTuning stops after this many trials without progress; off, so the wall
    # budget ends the search on both sides.
    tuner = HyperTuning(objective_function, space=hyperopt_space(specs), algo="bayes", max_evals=MANY_TRIALS,
                        early_stop=MANY_TRIALS)
    with contextlib.suppress(_BudgetSpentError):
        tuner.run()
    best = max(records, key=lambda r: r["valid"]) if records else None
    _write_json(p["hyper_result"], {
        "complete": len(records), "pruned": 0, "failed": 0,
        "best_valid": best["valid"] if best else None,
        "test_at_best_valid": best["test"] if best else None,
        "max_test": max((r["test"] for r in records), default=None),
        "best_params": best["params"] if best else None,
        "trial_minutes": [r["minutes"] for r in records],
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=45.0, help="wall budget per side: no trial starts after it")
    ap.add_argument("--trial-minutes", type=float, default=None,
                    help="training time cap of one trial, both sides (default: min(10, --minutes))")
    ap.add_argument("--epochs", type=int, default=None, help="epoch cap, both sides (default: the preset's)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per side")
    ap.add_argument("--users", type=int, default=None,
                    help="keep only the first N users of ml-100k (smoke runs); default: all 943")
    ap.add_argument("--concurrent", action="store_true", help="run both sides at once (use --threads 1 on 2 cores)")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="scratch folder (default benchmarks/.tuning)")
    ap.add_argument("--side", choices=["hypertuning"], help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    for flag, value in (("--minutes", args.minutes), ("--trial-minutes", args.trial_minutes),
                        ("--epochs", args.epochs), ("--threads", args.threads), ("--users", args.users)):
        if value is not None and value <= 0:
            sys.exit(f"error: {flag} must be positive (got {value})")
    if args.trial_minutes is None:
        args.trial_minutes = min(10.0, args.minutes)
    if args.side == "hypertuning":
        run_hypertuning(args.work.resolve(), args.minutes, args.trial_minutes, args.epochs, args.threads)
        return
    sys.path.insert(0, str(REPO))
    if args.epochs is None:
        from core.config import load_config

        args.epochs = load_config(PRESET).training.epochs
    summary = run(args)
    print_table(summary)
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
