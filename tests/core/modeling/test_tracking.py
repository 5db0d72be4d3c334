"""Tracking: run-folder files, W&B offline, TensorBoard, GPU sampler, warning signs, AMP."""

from __future__ import annotations

import csv
import json
import math
import threading
import time
from pathlib import Path

import pytest
import torch
from recflow_testdata import TinyRun, tiny_config

from core.modeling import tracking
from core.records import EpochStats


def _epochs(losses: list[float], scores: list[float]) -> list[EpochStats]:
    return [EpochStats(epoch=i, train_loss=loss, train_seconds=1.0, valid_score=s) for i, (loss, s) in
            enumerate(zip(losses, scores))]


# ------------------------------------------------------------------ run folder after train()
def test_training_log_has_one_line_per_epoch(tiny_run: TinyRun) -> None:
    lines = tracking.read_epoch_log(tiny_run.run_dir)
    assert [line["epoch"] for line in lines] == [e.epoch for e in tiny_run.trained.epochs]
    for line, stats in zip(lines, tiny_run.trained.epochs):
        assert set(line) == {"epoch", "loss", "train_seconds", "valid_score", "lr", "grad_accumulation"}
        assert line["loss"] == stats.train_loss and line["valid_score"] == stats.valid_score
        assert line["lr"] == pytest.approx(tiny_run.config.training.learning_rate)
        assert line["grad_accumulation"] == 1


def test_training_curve_is_a_png(tiny_run: TinyRun) -> None:
    data = (tiny_run.run_dir / tracking.TRAINING_CURVE).read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) < 200_000


def test_wandb_offline_run_is_recorded(tiny_run: TinyRun) -> None:
    pytest.importorskip("wandb")
    runs = list((tiny_run.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb")), list(runs[0].iterdir())
    assert tracking.wandb_run_id(tiny_run.run_dir) == runs[0].name.rsplit("-", 1)[-1]


def test_tensorboard_events_exist(tiny_run: TinyRun) -> None:
    events = list((tiny_run.run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert "Loss/Train" in tags
    assert f"valid/{tiny_run.config.evaluation.valid_metric.lower()}" in tags


def test_no_gpu_usage_on_cpu(tiny_run: TinyRun) -> None:
    assert not (tiny_run.run_dir / tracking.GPU_USAGE).exists()
    assert tiny_run.trained.gpu_peak_fraction is None


def test_wandb_disabled_and_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert tracking.start_wandb(tmp_path, project="p", mode="disabled", name="n", config={}) is None
    import builtins

    real_import = builtins.__import__

    def no_wandb(name: str, *args: object, **kwargs: object) -> object:
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    tracker = tracking.RunTracker(tmp_path, model_name="SASRec", valid_metric="NDCG@10")
    stats = EpochStats(epoch=0, train_loss=1.0, train_seconds=0.1, valid_score=0.2)
    tracker.epoch(stats, lr=0.01, grad_accumulation=1)
    tracker.close([stats])
    assert not (tmp_path / "wandb").exists()
    assert len(tracking.read_epoch_log(tmp_path)) == 1
    assert (tmp_path / tracking.TRAINING_CURVE).read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------ warning signs
def test_warning_signs_healthy_curve_is_empty() -> None:
    epochs = _epochs([5.0, 4.0, 3.5, 3.2, 3.0], [0.10, 0.15, 0.18, 0.20, 0.21])
    assert tracking.warning_signs(epochs, gpu_peak_fraction=0.5) == []


def test_warning_signs_plateau() -> None:
    epochs = _epochs([5.0, 5.0, 5.0, 5.0, 5.0], [0.20, 0.19, 0.20, 0.195, 0.20])
    signs = tracking.warning_signs(epochs, gpu_peak_fraction=None)
    assert len(signs) == 1 and signs[0].startswith("validation plateau")


def test_warning_signs_gap() -> None:
    epochs = _epochs([5.0, 4.0, 3.0, 2.0], [0.10, 0.20, 0.18, 0.16])
    signs = tracking.warning_signs(epochs, gpu_peak_fraction=None)
    assert len(signs) == 1 and signs[0].startswith("train/valid gap")


def test_warning_signs_gpu_memory() -> None:
    epochs = _epochs([5.0, 4.0], [0.1, 0.2])
    signs = tracking.warning_signs(epochs, gpu_peak_fraction=0.95)
    assert [s.split(":")[0] for s in signs] == ["GPU memory"]
    assert tracking.warning_signs(epochs, gpu_peak_fraction=None) == []


# ------------------------------------------------------------------ GPU sampler
def test_gpu_sampler_writes_rows_and_stops(tmp_path: Path) -> None:
    calls = []

    def fake() -> dict[str, float | None]:
        calls.append(1)
        return {"utilization": 50.0, "memory_allocated": 1.0, "max_memory_reserved": 8.0,
                "memory_free": 4.0, "memory_total": 10.0}

    path = tmp_path / tracking.GPU_USAGE
    sampler = tracking.GpuSampler(path, fake, interval=0.01).start()
    deadline = time.time() + 5
    while sampler.rows < 3 and time.time() < deadline:
        time.sleep(0.01)
    sampler.stop()
    assert not any(t.name == "recflow-gpu-sampler" for t in threading.enumerate())
    rows = list(csv.reader(path.open()))
    assert tuple(rows[0]) == tracking.GPU_COLUMNS
    assert len(rows) - 1 == sampler.rows >= 3
    assert float(rows[1][1]) == 50.0
    assert sampler.peak_fraction == pytest.approx(0.8)  # max(10 - 4, 8) / 10
    n = len(calls)
    time.sleep(0.05)
    assert len(calls) == n  # stopped


def test_gpu_sampler_failure_stops_quietly(tmp_path: Path) -> None:
    def broken() -> dict[str, float | None]:
        raise RuntimeError("NVML gone")

    sampler = tracking.GpuSampler(tmp_path / "g.csv", broken, interval=0.01).start()
    time.sleep(0.05)
    sampler.stop()
    assert sampler.rows == 0 and sampler.peak_fraction is None


# ------------------------------------------------------------------ AMP / compile on the tiny model
def _cpu_bf16_autocast_works() -> bool:
    try:
        a = torch.randn(4, 4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return (a @ a).dtype is torch.bfloat16
    except Exception:
        return False


def _train_tiny(tmp_path: Path, tiny_run: TinyRun, **overrides: object):  # type: ignore[no-untyped-def]
    from core.modeling.training import train

    config = tiny_config(tmp_path, tiny_run.config.source.path,
                         {"tracking.wandb": False, "tracking.training_curve": False, **overrides})
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    return train(config, tiny_run.splits, run_dir)


@pytest.mark.skipif(not _cpu_bf16_autocast_works(),
                    reason="this torch build cannot autocast a CPU matmul to bfloat16")
@pytest.mark.parametrize("model", [
    {"model.name": "SASRec"},
    {"model.name": "GRU4Rec", "model.params": {"embedding_size": 16, "hidden_size": 16}},
    {"model.name": "BERT4Rec"},
], ids=["sasrec", "gru4rec", "bert4rec"])
def test_amp_bf16_on_cpu_trains_close_to_fp32(tmp_path: Path, tiny_run: TinyRun, model: dict) -> None:
    # All-position training (the default) builds its own splits for GRU4Rec/BERT4Rec from the same file.
    bf16 = _train_tiny(tmp_path / "bf16", tiny_run, **{"training.amp": "bf16", "training.clip_grad_norm": 5.0}, **model)
    fp32 = _train_tiny(tmp_path / "fp32", tiny_run, **{"training.clip_grad_norm": 5.0}, **model)
    assert bf16.amp == "bf16" and fp32.amp == "off"
    assert bf16.objective == fp32.objective == "all_positions"
    for a, b in zip(bf16.epochs, fp32.epochs):
        assert math.isfinite(a.train_loss)
        assert a.train_loss == pytest.approx(b.train_loss, rel=0.05)


def test_amp_fp16_on_cpu_falls_back_to_fp32(tmp_path: Path, tiny_run: TinyRun) -> None:
    trained = _train_tiny(tmp_path, tiny_run, **{"training.amp": "fp16", "training.epochs": 1})
    assert trained.amp == "off"
    assert trained.epochs[0].train_loss == pytest.approx(tiny_run.trained.epochs[0].train_loss, rel=1e-6)


def test_compile_failure_trains_uncompiled(tmp_path: Path, tiny_run: TinyRun,
                                           monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    def failing_compile(fn):  # type: ignore[no-untyped-def]
        def compiled(*args, **kwargs):  # type: ignore[no-untyped-def]
            raise RuntimeError("backend compiler failed")
        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    with caplog.at_level("WARNING", logger="recflow.training"):
        trained = _train_tiny(tmp_path, tiny_run, **{"training.compile": True, "training.epochs": 1})
    assert "torch.compile failed" in caplog.text
    assert trained.epochs[0].train_loss == pytest.approx(tiny_run.trained.epochs[0].train_loss, rel=1e-6)


def test_tracking_markdown_embeds_small_png(tiny_run: TinyRun) -> None:
    from tasks.train import tracking_markdown

    md = tracking_markdown(tiny_run.trained, tiny_run.run_dir)
    assert "## Warning signs" in md
    assert "data:image/png;base64," in md
    assert json.dumps(md)  # plain text
