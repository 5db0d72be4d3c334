"""Training benchmark: per-epoch time and peak memory of the zoo presets on ml-100k, recflow vs bare RecBole.

    python benchmarks/training.py                          # every configs/ml-100k-*.yaml, 1 epoch per side
    python benchmarks/training.py --presets sasrec,bpr --epochs 2 --out bench.json
    python benchmarks/training.py --presets bpr --threads 2

For each preset (globbed at run time, so new presets are picked up), two subprocesses, one
after the other:

* ``recflow``: ``core.config.load_config(preset)`` (``training.epochs`` and ``threads`` from
  the flags) + ``extract`` + ``build_recbole_data`` + ``core.modeling.training.train`` in a temp run folder,
  with the ``GLIBC_TUNABLES`` that recflow's CLI sets. It writes the RecBole config dict
  recflow built (``core.modeling.dataset.recbole_config_dict``; the batch it trained at, ``auto`` resolved).
* ``bare``: RecBole's documented steps (``benchmarks/bare_recbole.py``'s ``fit_bare``) with that
  same dict, minus recflow's paths, on RecBole's own ml-100k copy, no ``GLIBC_TUNABLES``, anomaly
  detection as RecBole leaves it. The same model configuration in the same run; the data differ
  only as ``bare_recbole.py`` explains (same-second ratings are ordered differently).

Measured per side: per-epoch train seconds (``time.perf_counter`` around the trainer's
``_train_epoch``, the same on both sides), ``trainer.fit`` seconds, the process's peak RSS and CPU
time (``os.wait4`` on that child: its own rusage), on CUDA ``torch.cuda.max_memory_allocated``, and
the CPU time other processes used meanwhile (``/proc/stat``; above 10% of the machine the timings
are inflated and the script says so). Ratios are bare / recflow: above 1 means recflow is faster
or smaller. Last: one JSON object (also written to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]  # bare_recbole (its helpers) and recflow's packages

import bare_recbole as bare_lib  # noqa: E402

PRESET_GLOB = "ml-100k-*.yaml"


# ---------------------------------------------------------------------------------------
# Inside each side's process
# ---------------------------------------------------------------------------------------


def _cuda_peak_mib() -> float | None:
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def run_recflow_side(preset: Path, epochs: int, threads: int | None, work: Path) -> dict[str, Any]:
    t_start = time.perf_counter()
    import torch

    from core.config import load_config
    from core.data.extract import extract
    from core.modeling.dataset import _has_rating_column, build_recbole_data, recbole_config_dict
    from core.modeling.trainer_mixin import RecflowTrainerMixin
    from core.modeling.training import train

    # Measurement only: the process's CPU time per epoch, as fit_bare records it on the bare side.
    epoch_cpu: list[float] = []
    original = RecflowTrainerMixin._train_epoch

    def cpu_timed(self: Any, *a: Any, **kw: Any) -> Any:
        c0 = time.process_time()
        try:
            return original(self, *a, **kw)
        finally:
            epoch_cpu.append(time.process_time() - c0)

    RecflowTrainerMixin._train_epoch = cpu_timed  # type: ignore[method-assign]
    t_imported = time.perf_counter()
    cfg = load_config(preset, overrides={"training.epochs": epochs, "training.threads": threads,
                                         "runs_dir": work / "runs", "registry.path": work / "registry"})
    run_dir = work / "runs" / "bench"
    run_dir.mkdir(parents=True)
    splits, data = build_recbole_data(extract(cfg, run_dir), cfg, run_dir)
    t_data = time.perf_counter()
    anomaly: list[bool] = []
    trained = train(cfg, splits, run_dir, on_epoch=lambda _s: anomaly.append(torch.is_anomaly_enabled()), data=data)
    t_fit = time.perf_counter()
    # What bare RecBole gets: recflow's own dict, at the batch recflow trained with (auto resolved).
    rb_dict = recbole_config_dict(cfg, splits.data_dir, run_dir / "checkpoints", _has_rating_column(splits))
    rb_dict["train_batch_size"] = trained.train_batch_size
    for key in ("data_path", "checkpoint_dir"):  # recflow's locations; bare uses RecBole's own
        rb_dict.pop(key)
    return {
        "side": "recflow",
        "model": trained.model_name,
        "device": trained.device,
        "train_batch_size": trained.train_batch_size,
        "auto_batch": trained.auto_batch.model_dump(mode="json") if trained.auto_batch else None,
        "anomaly_detection": any(anomaly),
        "epoch_train_seconds": [e.train_seconds for e in trained.epochs],
        "epoch_cpu_seconds": [round(c, 3) for c in epoch_cpu],
        "seconds": {"imports": round(t_imported - t_start, 3), "data": round(t_data - t_imported, 3),
                    "fit": round(t_fit - t_data, 3)},
        "cuda_peak_mib": _cuda_peak_mib(),
        "torch_threads": torch.get_num_threads(),
        "recbole_config_dict": rb_dict,
        # RecBole's whole final config as recflow ran it, to diff with bare's.
        "config": bare_lib._effective_config(data.config),
    }


def run_bare_side(model: str, config_dict: dict[str, Any], threads: int | None) -> dict[str, Any]:
    fitted = bare_lib.fit_bare(model, config_dict, threads)
    import torch

    t = fitted["t"]
    return {
        "side": "bare",
        "model": model,
        "device": str(fitted["config"]["device"]),
        "train_batch_size": int(fitted["config"]["train_batch_size"]),
        "anomaly_detection": any(fitted["anomaly"]),
        "epoch_train_seconds": [round(s, 3) for s in fitted["epoch_seconds"]],
        "epoch_cpu_seconds": [round(c, 3) for c in fitted["epoch_cpu_seconds"]],
        "seconds": {"imports": round(t["imported"] - t["start"], 3), "data": round(t["data"] - t["imported"], 3),
                    "fit": round(t["fit"] - t["data"], 3)},
        "cuda_peak_mib": _cuda_peak_mib(),
        "torch_threads": torch.get_num_threads(),
        "config": bare_lib._effective_config(fitted["config"]),
    }


def child_main(args: argparse.Namespace) -> None:
    if args.side == "recflow":
        result = run_recflow_side(Path(args.preset), args.epochs, args.threads, Path.cwd())
    else:
        spec = json.loads(Path(args.bare_spec).read_text())
        result = run_bare_side(spec["model"], spec["config_dict"], args.threads)
    Path(args.result).write_text(json.dumps(result, default=str))


# ---------------------------------------------------------------------------------------
# The parent
# ---------------------------------------------------------------------------------------


def find_presets(names: str | None) -> list[Path]:
    """``--presets sasrec,bpr`` (or file names / paths); default every configs/ml-100k-*.yaml."""
    available = sorted((REPO / "configs").glob(PRESET_GLOB))
    if not names:
        return available
    chosen = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        candidates = [Path(name), REPO / "configs" / name, REPO / "configs" / f"{name}.yaml",
                      REPO / "configs" / f"ml-100k-{name.lower()}.yaml"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            stems = ", ".join(p.stem.removeprefix("ml-100k-") for p in available)
            sys.exit(f"error: no preset {name!r} (configs/ml-100k-*.yaml: {stems})")
        chosen.append(found)
    return chosen


def _run_child(cmd: list[str], cwd: Path, env: dict[str, str], log: Path, verbose: bool) -> dict[str, Any]:
    """Run one side; its own rusage (peak RSS, CPU) comes from wait4 on that child alone."""
    busy_before = bare_lib._busy_cpu_seconds()
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=None if verbose else fh,
                                stderr=None if verbose else subprocess.STDOUT)
        _pid, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    busy_after = bare_lib._busy_cpu_seconds()
    cpu = usage.ru_utime + usage.ru_stime
    others = None if busy_before is None or busy_after is None else max(busy_after - busy_before - cpu, 0.0)
    return {
        "returncode": proc.returncode,
        "wall_seconds": round(wall, 3),
        "cpu_seconds": round(cpu, 3),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
        "other_processes_cpu_seconds": None if others is None else round(others, 1),
    }


def _side(side: str, preset: Path, args: argparse.Namespace, scratch: Path, extra: list[str]) -> dict[str, Any]:
    work = scratch / f"{preset.stem}-{side}"
    work.mkdir()
    result_file = work.parent / f"{work.name}.json"
    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    if side == "recflow":
        env["GLIBC_TUNABLES"] = bare_lib._malloc_tunables()  # as recflow's CLI runs itself
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--preset", str(preset.resolve()),
           "--epochs", str(args.epochs), "--result", str(result_file), *extra]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print(f"{preset.stem}: running {side} ({args.epochs} epoch(s)) ...", file=sys.stderr, flush=True)
    proc = _run_child(cmd, work, env, work.parent / f"{work.name}.log", args.verbose)
    if proc["returncode"] != 0 or not result_file.exists():
        log = work.parent / f"{work.name}.log"
        tail = "" if args.verbose else "\n".join(log.read_text().splitlines()[-30:])
        return {"error": f"{side} side failed (exit {proc['returncode']})", "log_tail": tail, "process": proc}
    print(f"  done in {proc['wall_seconds']:.1f}s", file=sys.stderr, flush=True)
    return {**json.loads(result_file.read_text()), "process": proc}


def bench_preset(preset: Path, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    rec = _side("recflow", preset, args, scratch, [])
    if "error" in rec:
        return {"preset": preset.stem, "recflow": rec, "bare": None}
    spec = scratch / f"{preset.stem}-bare-spec.json"
    spec.write_text(json.dumps({"model": rec["model"], "config_dict": rec.pop("recbole_config_dict")}))
    bare = _side("bare", preset, args, scratch, ["--bare-spec", str(spec)])
    out: dict[str, Any] = {"preset": preset.stem, "model": rec["model"], "recflow": rec, "bare": bare}
    if "error" not in bare:
        benign, unexpected = bare_lib._compare_configs(bare.pop("config"), rec.pop("config"))
        out["config_diff"] = {"benign": sorted(benign), "unexpected": unexpected}
        out["ratios"] = _ratios(bare, rec)
    return out


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _ratios(bare: dict[str, Any], rec: dict[str, Any]) -> dict[str, float | None]:
    """bare / recflow: above 1, recflow is faster (time) or smaller (memory)."""
    def r(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a and b else None

    return {
        "mean_epoch_train": r(_mean(bare["epoch_train_seconds"]), _mean(rec["epoch_train_seconds"])),
        "mean_epoch_cpu": r(_mean(bare["epoch_cpu_seconds"]), _mean(rec["epoch_cpu_seconds"])),
        "fit": r(bare["seconds"]["fit"], rec["seconds"]["fit"]),
        "peak_rss": r(bare["process"]["peak_rss_mib"], rec["process"]["peak_rss_mib"]),
        "cuda_peak": r(bare.get("cuda_peak_mib"), rec.get("cuda_peak_mib")),
    }


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(results: list[dict[str, Any]]) -> None:
    cuda = any((r.get("recflow") or {}).get("cuda_peak_mib") for r in results)
    head = (f"{'preset':<18}{'model':<10}{'batch':>6}{'epoch s bare':>14}{'recflow':>9}{'ratio':>7}"
            f"{'CPU s bare':>12}{'recflow':>9}{'ratio':>7}{'RSS MiB bare':>14}{'recflow':>9}{'ratio':>7}")
    if cuda:
        head += f"{'CUDA MiB bare':>15}{'recflow':>9}{'ratio':>7}"
    print(head)
    print("-" * len(head))
    for res in results:
        rec, bare = res.get("recflow") or {}, res.get("bare") or {}
        name = res["preset"].removeprefix("ml-100k-")
        if "error" in rec or "error" in bare or not bare:
            failed = rec if "error" in rec else bare
            print(f"{name:<18}{failed.get('error', 'failed')}")
            continue
        ratios = res["ratios"]
        row = (f"{name:<18}{rec['model']:<10}{rec['train_batch_size']:>6}"
               f"{_fmt(_mean(bare['epoch_train_seconds']), '.2f'):>14}{_fmt(_mean(rec['epoch_train_seconds']), '.2f'):>9}"
               f"{_fmt(ratios['mean_epoch_train'], '.2f'):>6}x"
               f"{_fmt(_mean(bare['epoch_cpu_seconds']), '.2f'):>12}{_fmt(_mean(rec['epoch_cpu_seconds']), '.2f'):>9}"
               f"{_fmt(ratios['mean_epoch_cpu'], '.2f'):>6}x"
               f"{_fmt(bare['process']['peak_rss_mib'], '.0f'):>14}{_fmt(rec['process']['peak_rss_mib'], '.0f'):>9}"
               f"{_fmt(ratios['peak_rss'], '.2f'):>6}x")
        if cuda:
            row += (f"{_fmt(bare.get('cuda_peak_mib'), '.0f'):>15}{_fmt(rec.get('cuda_peak_mib'), '.0f'):>9}"
                    f"{_fmt(ratios['cuda_peak'], '.2f'):>6}x")
        print(row)
    print("epoch s: mean wall seconds per epoch (_train_epoch); CPU s: the process's CPU seconds in those "
          "epochs (all threads); RSS: the process's peak (data prep and evaluation included); ratio: bare / recflow")
    for res in results:
        unexpected = (res.get("config_diff") or {}).get("unexpected") or {}
        if unexpected:
            print(f"{res['preset']}: RecBole configs differ beyond the known-harmless keys: "
                  + ", ".join(f"{k} (bare {v['bare']!r}, recflow {v['recflow']!r})" for k, v in unexpected.items()))


def parent_main(args: argparse.Namespace) -> None:
    presets = find_presets(args.presets)
    if not presets:
        sys.exit(f"error: no presets matched configs/{PRESET_GLOB}")
    t_all = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="recflow-train-bench-") as tmp:
        for preset in presets:
            results.append(bench_preset(preset, args, Path(tmp)))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    shares = []
    for res in results:
        for side in ("recflow", "bare"):
            proc = (res.get(side) or {}).get("process") or {}
            if proc.get("other_processes_cpu_seconds") is not None and proc.get("wall_seconds"):
                shares.append(proc["other_processes_cpu_seconds"] / (proc["wall_seconds"] * cpus))
    contended = max(shares, default=0.0)
    import recbole
    import torch

    env = {
        "python": platform.python_version(), "torch": torch.__version__, "recbole": recbole.__version__,
        "cpu_count": os.cpu_count(), "cpus_usable": cpus, "cpu_model": bare_lib._cpu_model(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads_flag": args.threads, "epochs": args.epochs,
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print()
    print(f"python {env['python']}  torch {env['torch']}  recbole {env['recbole']}  "
          f"CPUs {cpus} ({env['cpu_model']})  GPU {env['cuda'] or 'none'}  {args.epochs} epoch(s) per side")
    print()
    print_table(results)
    if contended > 0.10:
        print(f"warning: other processes used up to {contended:.0%} of the machine's CPU time during a side: "
              f"timings are inflated, not necessarily evenly (rerun on an idle machine)")
    total = round(time.perf_counter() - t_all, 1)
    print(f"total wall time: {total}s")
    summary = {"benchmark": "training", "env": env, "results": results,
               "max_other_processes_cpu_share": round(contended, 3), "total_wall_seconds": total}
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2, default=str))
        print(f"wrote {args.out}", file=sys.stderr)
    print(json.dumps(summary, default=str))
    if any("error" in (r.get("recflow") or {}) or "error" in (r.get("bare") or {"error": 1}) for r in results):
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", help="comma-separated, e.g. sasrec,bpr (default: every configs/ml-100k-*.yaml)")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs per side (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--out", help="also write the JSON summary here")
    parser.add_argument("--verbose", action="store_true", help="stream each side's log")
    parser.add_argument("--side", choices=["bare", "recflow"], help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--bare-spec", help=argparse.SUPPRESS)
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
