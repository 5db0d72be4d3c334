"""Data scale: extract -> validate -> dataset build on millions of synthetic interactions.

    python benchmarks/data_scale.py                      # 10M rows, Parquet and CSV, BPR
    python benchmarks/data_scale.py --rows 1000000 --formats csv
    python benchmarks/data_scale.py --rows 1000000 --model SASRec --formats parquet
    python benchmarks/data_scale.py --profile build      # + the top of cProfile for that step

Synthetic data (vectorised numpy, seeded): ``rows / 40`` users (lognormal activity, ~40
interactions on average; a few percent fall under ``min_user_interactions`` 5 and are
filtered), ``min(50000, rows / 20)`` items with a skewed popularity, and a little
sequential structure (half of each user's interactions walk the items in order from a
per-user start), at strictly increasing times per user over two years. Rows are shuffled.
It is written once to a temp folder as Parquet (typed UTC timestamps) and as CSV
(ISO-8601 ``...Z`` text timestamps).

For each format, each step runs in a fresh subprocess (this script re-invokes itself
with ``--step``), so each step's peak RSS is its own: the child's
``getrusage(RUSAGE_SELF).ru_maxrss`` (imports included), and its time is
``time.perf_counter`` around the one call (imports excluded; *process s* is the whole
child). The steps are recflow's own functions with a file-source config, as the flow
calls them:

* extract  ``core.data.extract.extract``  (source -> sorted snapshot.parquet + fingerprint)
* validate ``core.data.validation.validate_snapshot`` (GX suite + polars checks; ``previous_rows``
  set to the row count, so the drift check runs too)
* build    ``core.modeling.dataset.build_recbole_data`` (atomic files + RecBole dataset + split + dataloaders)

Children run with the GLIBC_TUNABLES recflow's CLI sets (as a real run has them), unless
``--no-tunables``; ``--no-fast`` switches off core.modeling.dataset's RecBole fast paths
(RECFLOW_RECBOLE_FAST=0: RecBole's own loading, splitting, samplers and loaders) for a
before/after comparison. The model is BPR by default (a general recommender).

Sequential models (``--model SASRec``, GRU4Rec, BERT4Rec, ...): RecBole's SequentialDataset
augments the data to one row per prefix of every user history, with one
(rows x MAX_ITEM_LIST_LENGTH) tensor per interaction field (item id, timestamp[, rating]);
RecBole fills them in a Python loop over rows, the fast path by gathers. The build step then
also times (separately, after the build's own figures are taken) what all-position training
does next: ``core.modeling.window_loader.windows_from_train_split`` on the built train split
(max_len = the config's ``max_seq_length``, stride 25, unmasked; masked for BERT4Rec). Its
peak RSS is reported apart from the build's. At 10M rows the augmented tensors alone are
2-4 GB per field (length 50: int64 ids 4 GB, float32 2 GB), beyond this machine: size
sequential runs at ~1M rows.

The goals (per format):
* general models, 10M rows: extract + validate + build <= 60 s and every step's peak RSS
  <= 4 GiB on the 2-core machine;
* SASRec at 1M rows builds the training data in <= 15 s: the build step, and build + window
  cut, are printed against it.
The table prints the ratios. Run it on an otherwise idle machine (the script prints the load
average before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GOAL_SECONDS = 60.0
GOAL_RSS_MIB = 4096.0
GOAL_SEQ_SECONDS = 15.0  # SASRec at 1M rows: the training data (build, then windows) within 15 s
WINDOW_STRIDE = 25
STEPS = ("extract", "validate", "build")
# The same tunables as cli.py's _MALLOC_TUNABLES (not imported: the CLI pulls in typer/prefect).
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=4294967295"


# --------------------------------------------------------------------------- data


def generate(rows: int, folder: Path, seed: int = 0) -> dict[str, Path]:
    """Write the synthetic interactions as interactions.parquet and interactions.csv."""
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(seed)
    n_users = max(2, rows // 40)
    n_items = max(10, min(50_000, rows // 20))
    # Users: lognormal activity (mean ~40 rows, a tail of users under min_user_interactions).
    weights = rng.lognormal(0.0, 1.0, n_users)
    user = np.searchsorted(np.cumsum(weights / weights.sum()), rng.random(rows)).clip(0, n_users - 1)
    # Rank of each row within its user (0, 1, 2, ... in generation order).
    order = np.argsort(user, kind="stable")
    sorted_users = user[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    lengths = np.diff(np.r_[starts, rows])
    rank = np.empty(rows, dtype=np.int64)
    rank[order] = np.arange(rows) - np.repeat(starts, lengths)
    # Items: skewed popularity, or the user's walk through the catalogue.
    popular = (n_items * rng.random(rows) ** 3).astype(np.int64)
    walk = (rng.integers(0, n_items, n_users)[user] + rank) % n_items
    item = np.where(rng.random(rows) < 0.5, walk, popular)
    # Times: a per-user start in 2022-2023, then about an hour between interactions.
    base = 1_640_995_200  # 2022-01-01T00:00:00Z
    start = rng.integers(0, 2 * 365 * 86_400, n_users)[user]
    seconds = base + start + rank * 3_600 + rng.integers(0, 3_600, rows)
    shuffle = rng.permutation(rows)
    frame = pl.DataFrame(
        {"u": user[shuffle], "i": item[shuffle], "t": (seconds[shuffle] * 1_000_000).astype(np.int64)}
    ).select(
        (pl.lit("u") + pl.col("u").cast(pl.String)).alias("user_id"),
        (pl.lit("i") + pl.col("i").cast(pl.String)).alias("item_id"),
        pl.col("t").cast(pl.Datetime("us")).dt.replace_time_zone("UTC").alias("timestamp"),
    )
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"parquet": folder / "interactions.parquet", "csv": folder / "interactions.csv"}
    frame.write_parquet(paths["parquet"])
    frame.with_columns(pl.col("timestamp").dt.strftime("%Y-%m-%dT%H:%M:%SZ")).write_csv(paths["csv"])
    return paths


# --------------------------------------------------------------------------- one step (child)


def _config(data: Path, work: Path, model: str) -> Any:
    from core.config import load_config

    return load_config(
        overrides={
            "source.kind": "file",
            "source.path": str(data),
            "model.name": model,
            "runs_dir": str(work / "runs"),
            "registry.path": str(work / "registry"),
            "training.device": "cpu",
        }
    )


def run_step(step: str, data: Path, run_dir: Path, model: str, profile: bool) -> dict[str, Any]:
    started = time.perf_counter()
    from core.config import PipelineConfig  # noqa: F401  (imports are timed apart from the step)

    if step == "extract":
        from core.data.extract import extract as call
    elif step == "validate":
        from core.data.validation import validate_snapshot as call
    else:
        from core.modeling.dataset import build_recbole_data as call
    from core.records import Snapshot

    imported = time.perf_counter()
    config = _config(data, run_dir.parent, model)
    snapshot_json = run_dir / "snapshot.json"
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if step == "extract":
        snapshot = call(config, run_dir)
        snapshot_json.write_text(snapshot.model_dump_json())
        extra = {"rows": snapshot.rows, "users": snapshot.users, "items": snapshot.items}
    else:
        snapshot = Snapshot.model_validate_json(snapshot_json.read_text())
        if step == "validate":
            report = call(snapshot, config, run_dir, previous_rows=snapshot.rows)
            extra = {
                "suite": report.suite,
                "success": report.success,
                "failures": [f"{c.name}: {c.details}" for c in report.failures],
                "warnings": [f"{c.name}: {c.details}" for c in report.warnings],
            }
        else:
            splits, built = call(snapshot, config, run_dir)
            extra = {"users": splits.users, "items": splits.items, "interactions": splits.interactions}
    seconds = time.perf_counter() - t0
    if profiler is not None:
        import io
        import pstats

        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(35)
        extra["profile"] = out.getvalue()
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if step == "build":  # after the build's own figures
        extra.update(_window_cut(built))
    return {
        "step": step,
        "seconds": seconds,
        "import_seconds": imported - started,
        "peak_rss_mib": peak_rss_mib,
        **extra,
    }


def _window_cut(data: Any) -> dict[str, Any]:
    """Sequential models: time all-position training's window cut on the built train split."""
    from recbole.utils import ModelType

    if data.config["MODEL_TYPE"] != ModelType.SEQUENTIAL:
        return {}
    from core.modeling.window_loader import windows_from_train_split

    train = data.train.dataset
    max_len = int(data.config["MAX_ITEM_LIST_LENGTH"])
    masked = data.config["model"] == "BERT4Rec"
    t0 = time.perf_counter()
    windows = windows_from_train_split(train, max_len, WINDOW_STRIDE, masked=masked)
    seconds = time.perf_counter() - t0
    return {
        "train_rows": len(train),
        "windows": len(windows),
        "window_max_len": max_len,
        "window_stride": WINDOW_STRIDE,
        "window_masked": masked,
        "window_seconds": seconds,
        "window_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# --------------------------------------------------------------------------- parent


def _load() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _child(step: str, data: Path, run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ)
    if args.tunables:
        env["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    env["RECFLOW_RECBOLE_FAST"] = "1" if args.fast else "0"
    env.setdefault("GX_ANALYTICS_ENABLED", "False")
    cmd = [sys.executable, __file__, "--step", step, "--data", str(data), "--run-dir", str(run_dir),
           "--model", args.model]
    if args.profile == step:
        cmd.append("--profile-step")
    busy0, own0 = _busy_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    own1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    own_cpu = (own1.ru_utime - own0.ru_utime) + (own1.ru_stime - own0.ru_stime)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"step {step} on {data.name} failed (exit {proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = wall
    result["cpu_seconds"] = own_cpu
    # CPU time the rest of the machine used meanwhile: contention inflates the timings.
    result["other_cpu_seconds"] = max(0.0, _busy_seconds() - busy0 - own_cpu)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--formats", default="parquet,csv", help="comma-separated: parquet, csv")
    parser.add_argument("--model", default="BPR", help="RecBole model for the build (default BPR)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--no-tunables", dest="tunables", action="store_false", help="run steps without GLIBC_TUNABLES")
    parser.add_argument("--no-fast", dest="fast", action="store_false",
                        help="RecBole's own code paths (RECFLOW_RECBOLE_FAST=0), for comparison")
    parser.add_argument("--profile", choices=STEPS, default=None, help="print cProfile's top for this step")
    # Child mode.
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--profile-step", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.step:
        sys.path.insert(0, str(REPO))
        result = run_step(args.step, args.data, args.run_dir, args.model, args.profile_step)
        print(json.dumps(result))
        return

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="recflow-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {_load()}  (cores: {os.cpu_count()})", flush=True)
    t0 = time.perf_counter()
    paths = generate(args.rows, work / "data", args.seed)
    sizes = ", ".join(f"{k} {paths[k].stat().st_size / 2**20:.0f} MiB" for k in formats)
    print(f"generated {args.rows:,} rows in {time.perf_counter() - t0:.1f}s ({sizes}) under {work}", flush=True)
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        for fmt in formats:
            run_dir = work / f"run-{fmt}"
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            results[fmt] = []
            for step in STEPS:
                r = _child(step, paths[fmt], run_dir, args)
                results[fmt].append(r)
                print(f"  {fmt:7} {step:8} {r['seconds']:7.1f}s  peak RSS {r['peak_rss_mib']:6.0f} MiB", flush=True)
                if "window_seconds" in r:
                    print(f"  {fmt:7} {'windows':8} {r['window_seconds']:7.1f}s  peak RSS "
                          f"{r['window_peak_rss_mib']:6.0f} MiB  ({r['windows']:,} windows)", flush=True)
                if r.get("profile"):
                    print(r["profile"])
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    load_after = _load()
    _print_table(args, results)
    print(f"load average after: {load_after}")
    for steps in results.values():
        for r in steps:
            r.pop("profile", None)
    print(json.dumps({"rows": args.rows, "model": args.model, "tunables": args.tunables, "fast": args.fast,
                      "results": results, "load_after": load_after}, default=str))


def _print_table(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> None:
    print()
    print(f"{args.rows:,} rows, model {args.model}, GLIBC_TUNABLES {'set' if args.tunables else 'unset'}, "
          f"RecBole fast paths {'on' if args.fast else 'off'}, {os.cpu_count()} cores")
    header = (f"{'format':8} {'step':10} {'seconds':>8} {'process s':>10} {'peak RSS MiB':>13} {'CPU s':>7} "
              f"{'other CPU s':>12}")
    print(header)
    print("-" * len(header))
    for fmt, steps in results.items():
        for r in steps:
            print(f"{fmt:8} {r['step']:10} {r['seconds']:8.1f} {r['process_seconds']:10.1f} {r['peak_rss_mib']:13.0f} "
                  f"{r['cpu_seconds']:7.1f} {r['other_cpu_seconds']:12.1f}")
        total = sum(r["seconds"] for r in steps)
        wall = sum(r["process_seconds"] for r in steps)
        peak = max(r["peak_rss_mib"] for r in steps)
        cpu = sum(r["cpu_seconds"] for r in steps)
        other = sum(r["other_cpu_seconds"] for r in steps)
        print(f"{fmt:8} {'total':10} {total:8.1f} {wall:10.1f} {peak:13.0f} {cpu:7.1f} {other:12.1f}")
        print(f"{fmt:8} {'vs goal':10} {total / GOAL_SECONDS:7.2f}x {wall / GOAL_SECONDS:9.2f}x "
              f"{peak / GOAL_RSS_MIB:12.2f}x   (goal {GOAL_SECONDS:.0f} s, {GOAL_RSS_MIB:.0f} MiB; <= 1.00x meets it)")
        validate = next((r for r in steps if r["step"] == "validate"), None)
        if validate and not validate.get("success", True):
            print(f"{fmt:8} validation FAILED: {validate['failures']}")
        build = next((r for r in steps if r["step"] == "build"), None)
        if build:
            print(f"{fmt:8} dataset: {build['users']:,} users, {build['items']:,} items, "
                  f"{build['interactions']:,} interactions after filtering")
        if build and "window_seconds" in build:
            both = build["seconds"] + build["window_seconds"]
            print(f"{fmt:8} sequential training data ({args.model}, {build['train_rows']:,} augmented train rows):")
            print(f"{fmt:8}   build {build['seconds']:.1f} s (peak RSS {build['peak_rss_mib']:.0f} MiB), "
                  f"window cut {build['window_seconds']:.1f} s ({build['windows']:,} windows of "
                  f"<= {build['window_max_len']}, stride {build['window_stride']}; peak RSS "
                  f"{build['window_peak_rss_mib']:.0f} MiB)")
            print(f"{fmt:8}   vs goal (SASRec at 1M rows builds the training data in <= {GOAL_SEQ_SECONDS:.0f} s): "
                  f"build {build['seconds'] / GOAL_SEQ_SECONDS:.2f}x, build + windows {both / GOAL_SEQ_SECONDS:.2f}x "
                  f"(<= 1.00x meets it)")
    print("seconds: the step's call; process s: its whole subprocess (imports included); CPU s: the subprocess's")
    print("CPU time; other CPU s: what the rest of the machine used meanwhile (well above 0: the timings are inflated)")
    print()


if __name__ == "__main__":
    main()
