"""train under GPU memory pressure and crashes: OOM step-down with gradient accumulation, crash resume.

No GPU needed: ``inject_oom`` makes the model raise the real ``torch.OutOfMemoryError`` on
(micro-)batches above a threshold, which is what CUDA raises when an allocation fails.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from recflow_testdata import TINY_MODEL_PARAMS, tiny_config

from core.config import PipelineConfig
from core.data.extract import extract
from core.errors import TrainingError
from core.modeling import recbole_adapter as rb
from core.modeling.dataset import build_dataset
from core.modeling.evaluation import evaluate
from core.modeling.training import LATEST_CHECKPOINT, train
from core.records import DatasetSplits, TrainedModel

NO_DROPOUT = TINY_MODEL_PARAMS | {"hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0, "dropout_prob": 0.0}
# The all-position loop for each sequential model, and RecBole's own loop (last_item).
LOOPS = {
    "SASRec": {"model.name": "SASRec"},
    "GRU4Rec": {"model.name": "GRU4Rec"},
    "BERT4Rec": {"model.name": "BERT4Rec"},
    "SASRec-last_item": {"model.name": "SASRec", "training.objective": "last_item"},
}
# Deterministic losses: accumulation then equals the whole batch exactly (BERT4Rec draws its masks per
# micro-batch, so its accumulated run is its own, still reproducible, run).
EXACT_LOOPS = ["SASRec", "GRU4Rec", "SASRec-last_item"]


def _oom_method(loop: str) -> str:
    """What a train step calls with the micro-batch: RecBole's loss, or the model's forward (all positions)."""
    return "calculate_loss" if loop.endswith("last_item") else "forward"


@contextlib.contextmanager
def inject_oom(model_name: str, threshold: int, method: str = "calculate_loss") -> Iterator[list[int]]:
    """Make ``model_name``'s ``method`` raise CUDA's OOM error on inputs of more than ``threshold`` rows.

    ``forward`` raises only in training mode (evaluation runs forward too). Yields the input
    sizes seen in training (failed calls included).
    """
    cls = rb.resolve_model(model_name)
    original = cls.__dict__[method]
    seen: list[int] = []

    def wrapped(self: Any, first: Any, *rest: Any) -> Any:
        if method == "forward" and not self.training:
            return original(self, first, *rest)
        rows = len(first)
        seen.append(rows)
        if rows > threshold:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; {rows} rows > {threshold} injected)"
            )
        return original(self, first, *rest)

    setattr(cls, method, wrapped)
    try:
        yield seen
    finally:
        setattr(cls, method, original)


def _setup(tmp_path: Path, tiny_csv: Path, name: str, overrides: dict[str, Any]) -> tuple[PipelineConfig, DatasetSplits, Path]:
    config = tiny_config(tmp_path, tiny_csv, overrides)
    run_dir = tmp_path / name
    run_dir.mkdir()
    splits = build_dataset(extract(config, run_dir), config, run_dir)
    return config, splits, run_dir


def _run(tmp_path: Path, tiny_csv: Path, name: str, loop: str, overrides: dict[str, Any] | None = None) -> TrainedModel:
    config, splits, run_dir = _setup(tmp_path, tiny_csv, name, LOOPS[loop] | {"model.params": NO_DROPOUT} | (overrides or {}))
    return train(config, splits, run_dir)


def _weights(trained: TrainedModel) -> dict[str, torch.Tensor]:
    return rb.load_checkpoint(trained.checkpoint)["state_dict"]


def _assert_same_training(a: TrainedModel, b: TrainedModel, atol: float = 1e-5) -> None:
    assert [e.epoch for e in a.epochs] == [e.epoch for e in b.epochs]
    for x, y in zip(a.epochs, b.epochs):
        assert x.train_loss == pytest.approx(y.train_loss, abs=atol)
        assert x.valid_score == pytest.approx(y.valid_score, abs=atol)
    assert a.best_epoch == b.best_epoch
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        if key.endswith("key.bias"):
            # Its true gradient is 0 (softmax ignores a shift shared by all keys): Adam turns the
            # float noise left in it into lr-sized steps, so only its scale is comparable.
            assert float(wa[key].abs().max()) < 1e-2 and float(wb[key].abs().max()) < 1e-2
            continue
        assert torch.allclose(wa[key], wb[key], atol=atol), (key, float((wa[key] - wb[key]).abs().max()))


@pytest.fixture(scope="module", params=list(LOOPS))
def loop(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def accumulated_4(tmp_path_factory: pytest.TempPathFactory, tiny_csv: Path, loop: str) -> TrainedModel:
    """Started at batch 32 as 4 micro-batches of 8, no faults."""
    return _run(tmp_path_factory.mktemp("acc4"), tiny_csv, "run", loop, {"training.grad_accumulation": 4})


def test_injected_oom_steps_down_to_micro_batch_8(
    tmp_path: Path, tiny_csv: Path, loop: str, accumulated_4: TrainedModel, caplog: pytest.LogCaptureFixture
) -> None:
    model = LOOPS[loop]["model.name"]
    with caplog.at_level(logging.WARNING, logger="recflow.training"), \
            inject_oom(model, threshold=10, method=_oom_method(loop)) as seen:
        trained = _run(tmp_path, tiny_csv, "run", loop)
    assert trained.objective == ("last_item" if loop.endswith("last_item") else "all_positions")
    assert trained.train_batch_size == 32  # the effective batch is unchanged
    assert trained.micro_batch_size == 8
    assert trained.grad_accumulation == 4
    assert trained.oom_retries == [
        "epoch 0: CUDA OOM at micro-batch 32 -> 16 x2",
        "epoch 0: CUDA OOM at micro-batch 16 -> 8 x4",
    ]
    assert [r.getMessage().split(" (")[0] for r in caplog.records if "CUDA OOM" in r.getMessage()] == trained.oom_retries
    assert seen[:2] == [32, 16] and max(seen[2:]) == 8
    assert not (trained.checkpoint.parent / LATEST_CHECKPOINT).exists()  # finished: nothing to resume
    # The failed attempts were rolled back: exactly the run started at 8 x 4 (dropout 0).
    _assert_same_training(trained, accumulated_4)
    assert accumulated_4.oom_retries == [] and accumulated_4.micro_batch_size == 8


def test_oom_below_the_floor_names_the_sizes_tried(tmp_path: Path, tiny_csv: Path, loop: str) -> None:
    with inject_oom(LOOPS[loop]["model.name"], threshold=4, method=_oom_method(loop)), \
            pytest.raises(TrainingError) as err:
        _run(tmp_path, tiny_csv, "run", loop, {"training.epochs": 1})
    message = str(err.value)
    assert "CUDA OOM" in message and "32, 16, 8" in message
    assert "min_micro_batch=8" in message


@pytest.mark.parametrize("exact", EXACT_LOOPS)
def test_grad_accumulation_matches_the_whole_batch(tmp_path: Path, tiny_csv: Path, exact: str) -> None:
    whole = _run(tmp_path, tiny_csv, "whole", exact)
    halves = _run(tmp_path, tiny_csv, "halves", exact, {"training.grad_accumulation": 2})
    assert (whole.micro_batch_size, whole.grad_accumulation) == (32, 1)
    assert (halves.micro_batch_size, halves.grad_accumulation) == (16, 2)
    # Sums in another order: float noise (~1e-7) that Adam's normalised steps carry to ~1e-5 in
    # 14 steps, against weight changes of ~1e-2.
    _assert_same_training(whole, halves, atol=5e-5)


def test_eval_oom_halves_the_eval_batch(tmp_path: Path, tiny_csv: Path, loop: str, accumulated_4: TrainedModel) -> None:
    # 80 valid users in one batch of the default eval_batch_size 4096: halve until <= 30 rows.
    with inject_oom(LOOPS[loop]["model.name"], threshold=30, method="full_sort_predict") as seen:
        trained = _run(tmp_path, tiny_csv, "run", loop, {"training.grad_accumulation": 4})
    assert trained.oom_retries[0] == "evaluation: CUDA OOM at eval batch 4096 -> 2048"
    assert trained.oom_retries[-1] == "evaluation: CUDA OOM at eval batch 32 -> 16"
    assert max(seen[-5:]) == 16
    _assert_same_training(trained, accumulated_4, atol=1e-6)


_CRASHING_TRAINER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from core.config import PipelineConfig
    from core.records import DatasetSplits
    from core.modeling.training import train

    config = PipelineConfig.model_validate_json(Path(sys.argv[1]).read_text())
    splits = DatasetSplits.model_validate_json(Path(sys.argv[2]).read_text())

    def on_epoch(stats):
        print("epoch", stats.epoch, stats.valid_score, flush=True)
        if stats.epoch == 1:  # two epochs done and latest.pth written: die like an OOM-killed worker
            os.kill(os.getpid(), signal.SIGKILL)

    train(config, splits, Path(sys.argv[3]), on_epoch=on_epoch)
    """
)


@pytest.mark.parametrize(
    "loop,params",
    [("SASRec", TINY_MODEL_PARAMS), ("SASRec", NO_DROPOUT), ("GRU4Rec", TINY_MODEL_PARAMS),
     ("BERT4Rec", TINY_MODEL_PARAMS), ("SASRec-last_item", TINY_MODEL_PARAMS)],
    ids=["sasrec-dropout", "sasrec-no-dropout", "gru4rec", "bert4rec", "sasrec-last_item"],
)
def test_resume_after_sigkill_matches_an_uninterrupted_run(
    tmp_path: Path, tiny_csv: Path, loop: str, params: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    overrides = LOOPS[loop] | {"training.epochs": 4, "model.params": params}
    config, splits, run_dir = _setup(tmp_path, tiny_csv, "crashed", overrides)
    (tmp_path / "config.json").write_text(config.model_dump_json())
    (tmp_path / "splits.json").write_text(splits.model_dump_json())
    script = tmp_path / "crash.py"
    script.write_text(_CRASHING_TRAINER)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "config.json"), str(tmp_path / "splits.json"), str(run_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("epoch")] == ["0", "1"]
    latest = run_dir / "checkpoints" / LATEST_CHECKPOINT
    assert latest.is_file()
    assert rb.load_checkpoint(latest)["epoch"] == 1

    seen: list[int] = []
    with caplog.at_level(logging.WARNING, logger="recflow.training"):
        resumed = train(config, splits, run_dir, on_epoch=lambda s: seen.append(s.epoch))
    assert resumed.resumed_from_epoch == 1  # 0-based, as in `epochs`: epochs 0 and 1 were restored
    assert seen == [2, 3]  # only the new epochs reach the callback
    assert [e.epoch for e in resumed.epochs] == [0, 1, 2, 3]
    assert any("resuming from epoch 2" in r.getMessage() for r in caplog.records)
    assert not latest.exists()

    ref_config, ref_splits, ref_dir = _setup(tmp_path, tiny_csv, "uninterrupted", overrides)
    reference = train(ref_config, ref_splits, ref_dir)
    assert reference.resumed_from_epoch is None
    assert resumed.best_epoch == reference.best_epoch
    assert resumed.best_valid_score == pytest.approx(reference.best_valid_score, abs=1e-6)
    for x, y in zip(resumed.epochs, reference.epochs):
        assert x.train_loss == pytest.approx(y.train_loss, abs=1e-6)
        assert x.valid_score == pytest.approx(y.valid_score, abs=1e-6)
    test_resumed = evaluate(config, splits, resumed, run_dir).test
    test_reference = evaluate(ref_config, ref_splits, reference, ref_dir).test
    assert test_resumed.keys() == test_reference.keys()
    for key in test_reference:
        assert test_resumed[key] == pytest.approx(test_reference[key], abs=1e-6), key


def test_a_latest_checkpoint_of_another_config_is_ignored(tmp_path: Path, tiny_csv: Path) -> None:
    config, splits, run_dir = _setup(tmp_path, tiny_csv, "run", {"training.epochs": 1, "model.params": NO_DROPOUT})
    first = train(config, splits, run_dir)
    torch.save({"fingerprint": "another config", "epoch": 0}, run_dir / "checkpoints" / LATEST_CHECKPOINT)
    again = train(config, splits, run_dir)
    assert again.resumed_from_epoch is None
    assert again.best_valid_score == first.best_valid_score
