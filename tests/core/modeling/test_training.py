"""train: any RecBole model by name; best checkpoint, per-epoch stats, determinism, side effects."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from recflow_testdata import TinyRun, tiny_config

from core.data.extract import extract
from core.modeling import recbole_adapter as rb
from core.modeling.dataset import build_dataset
from core.modeling.training import BEST_CHECKPOINT, plateaued, train
from core.records import EpochStats


def test_trained_model_record(tiny_run: TinyRun) -> None:
    trained = tiny_run.trained
    assert trained.model_name == "SASRec"
    assert trained.checkpoint == tiny_run.run_dir / "checkpoints" / BEST_CHECKPOINT
    assert trained.checkpoint.is_file()
    assert not list(trained.checkpoint.parent.glob("*.tmp"))  # atomic save left nothing behind
    assert trained.device == "cpu"
    assert trained.train_batch_size == 32
    assert trained.valid_metric == "NDCG@10"
    assert [e.epoch for e in trained.epochs] == [0, 1]
    # 16-dim SASRec over 41 item ids (40 + padding), 10 positions, 1 layer: a few thousand weights.
    assert 1_000 < trained.parameters < 10_000
    assert trained.seconds > 0


def test_epoch_stats_reach_the_callback(tiny_run: TinyRun) -> None:
    assert tiny_run.epochs_seen == tiny_run.trained.epochs
    for stats in tiny_run.epochs_seen:
        assert isinstance(stats, EpochStats)
        assert math.isfinite(stats.train_loss) and stats.train_loss > 0
        # mean CE over 41 classes starts near ln(41) = 3.71, not a sum over batches
        assert stats.train_loss < 2 * math.log(41)
        assert stats.valid_score is not None and 0 <= stats.valid_score <= 1
        assert stats.train_seconds >= 0 and stats.valid_seconds is not None and stats.valid_seconds >= 0


def test_best_epoch_is_the_best_valid_score(tiny_run: TinyRun) -> None:
    trained = tiny_run.trained
    scores = [e.valid_score for e in trained.epochs]
    assert trained.best_valid_score == max(scores)
    assert trained.best_epoch == scores.index(max(scores))
    state = rb.load_checkpoint(trained.checkpoint)
    assert state["epoch"] == trained.best_epoch
    assert {"state_dict", "config", "optimizer"} <= set(state)


def test_model_learns_the_sequence(tiny_run: TinyRun) -> None:
    # Random ranking of 40 items gives NDCG@10 around 0.1; the walk structure is learnable.
    assert tiny_run.trained.best_valid_score is not None
    assert tiny_run.trained.best_valid_score > 0.2


def test_training_is_deterministic_and_writes_only_into_the_run_folder(
    tiny_run: TinyRun, tiny_csv: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path, tiny_csv)
    run_dir = tmp_path / "again"
    run_dir.mkdir()
    splits = build_dataset(extract(config, run_dir), config, run_dir)
    again = train(config, splits, run_dir)
    assert [e.train_loss for e in again.epochs] == [e.train_loss for e in tiny_run.trained.epochs]
    assert again.best_valid_score == tiny_run.trained.best_valid_score
    assert (run_dir / "tensorboard").is_dir()
    # RecBole's defaults would write ./log_tensorboard, ./saved and ./log in the working directory.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]
    # Importing RecBole's sequential models switches anomaly detection on (2x slower).
    assert torch.is_anomaly_enabled() is False


def test_train_takes_the_callers_data_and_refuses_another_runs(
    tiny_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.modeling import training
    from core.modeling.dataset import build_recbole_data

    config = tiny_config(tmp_path, tiny_csv, {"training.epochs": 1})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    splits, data = build_recbole_data(extract(config, run_dir), config, run_dir)

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("train built its own data")

    monkeypatch.setattr(training, "load_recbole_data", no_build)
    other = tiny_config(tmp_path, tiny_csv, {"training.epochs": 1, "training.learning_rate": 0.5})
    with pytest.raises(ValueError, match="another configuration"):
        train(other, splits, run_dir, data=data)
    trained = train(config, splits, run_dir, data=data)
    assert trained.checkpoint.is_file() and len(trained.epochs) == 1


def test_general_model_by_name(tiny_csv: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, tiny_csv, {"model.name": "BPR", "model.params": {"embedding_size": 8},
                                              "training.epochs": 1})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    splits = build_dataset(extract(config, run_dir), config, run_dir)
    trained = train(config, splits, run_dir)
    assert trained.model_name == "BPR"
    assert len(trained.epochs) == 1
    # user and item embeddings: (80 + 1 + 40 + 1) x 8
    assert trained.parameters == (81 + 41) * 8
    assert trained.checkpoint.is_file()


def test_fast_cpu_dropout_matches_torch_dropout_in_distribution() -> None:
    import torch

    from core.modeling.training import FastCPUDropout, use_fast_cpu_dropout

    torch.manual_seed(0)
    x = torch.ones(200_000, requires_grad=True)
    layer = FastCPUDropout(0.3).train()
    y = layer(x)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.7) < 0.005  # keep rate 1 - p
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.7))  # inverted scaling
    y.sum().backward()
    assert torch.equal(x.grad, (y.detach() != 0).float() / 0.7)  # gradient flows through kept units only
    assert torch.equal(layer.eval()(x), x)  # identity at inference
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.Sequential(torch.nn.Dropout(0.1)))
    assert use_fast_cpu_dropout(model) == 2
    assert [type(m).__name__ for m in model.modules()].count("Dropout") == 0


def _train_tiny(tmp_path: Path, tiny_csv: Path, overrides: dict, on_epoch=None):  # type: ignore[no-untyped-def]
    config = tiny_config(tmp_path, tiny_csv, overrides)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    splits = build_dataset(extract(config, run_dir), config, run_dir)
    return train(config, splits, run_dir, on_epoch=on_epoch)


def test_the_default_run_trains_all_positions_until_early_stopping(tiny_run: TinyRun, tiny_csv: Path, tmp_path: Path) -> None:
    assert tiny_run.trained.objective == "all_positions" and tiny_run.trained.loss == "ce"
    assert tiny_run.trained.stop_reason == "epoch cap"  # the tiny config caps at 2 epochs
    trained = _train_tiny(tmp_path, tiny_csv, {"training.epochs": 200, "training.early_stopping_patience": 2})
    scores = [e.valid_score for e in trained.epochs]
    assert trained.stop_reason == "early stopping" and len(scores) < 200
    # It stopped at the first epoch where `patience + 1` epochs gained < 1% on the best, and kept the best.
    assert plateaued(scores, patience=2, min_gain=0.01) and not plateaued(scores[:-1], patience=2, min_gain=0.01)
    assert trained.best_valid_score == max(scores) and trained.best_epoch == scores.index(max(scores))


def test_the_time_budget_ends_training_and_keeps_the_best_epoch(
    tiny_csv: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    # 0.0001 min = 6 ms: crossed by the first epoch.
    with caplog.at_level(logging.WARNING, logger="recflow.training"):
        trained = _train_tiny(tmp_path, tiny_csv, {"training.epochs": 50, "training.max_minutes": 0.0001})
    assert trained.stop_reason == "time budget" and [e.epoch for e in trained.epochs] == [0]
    assert trained.checkpoint.is_file() and trained.best_epoch == 0
    assert not (trained.checkpoint.parent / "latest.pth").exists()
    assert any("max_minutes" in r.getMessage() for r in caplog.records)


def test_last_item_objective_trains_recbole_rows(tiny_csv: Path, tmp_path: Path) -> None:
    trained = _train_tiny(tmp_path, tiny_csv, {"training.objective": "last_item", "training.epochs": 1})
    assert trained.objective == "last_item" and trained.loss is None
    (tmp_path / "windows").mkdir()
    windows = _train_tiny(tmp_path / "windows", tiny_csv, {"training.epochs": 1})
    # RecBole's rows (one per prefix) are many more than the windows holding the same targets.
    assert trained.train_rows is not None and windows.train_rows is not None
    assert trained.train_rows > 4 * windows.train_rows


def test_a_sequential_model_without_all_positions_falls_back_to_last_item(
    tiny_csv: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    with caplog.at_level(logging.WARNING, logger="recflow.training"):
        trained = _train_tiny(tmp_path, tiny_csv, {"model.name": "NARM", "model.params": {"embedding_size": 16,
                                                   "hidden_size": 16}, "training.epochs": 1})
    assert trained.objective == "last_item"
    assert any("NARM has no all-position objective" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "loss,extra",
    # BCE learns slower than softmax from scratch: gBCE at t=0 (plain BCE over the sampled items)
    # and a gentler learning rate; t itself is checked in test_seq_objectives.
    [("sampled_softmax", {}), ("gbce", {"training.gbce_t": 0.0, "training.learning_rate": 0.001})],
)
def test_sampled_losses_learn_the_sequence(tiny_csv: Path, tmp_path: Path, loss: str, extra: dict) -> None:
    overrides = {"training.loss": loss, "training.negatives": 8, "training.epochs": 8} | extra
    trained = _train_tiny(tmp_path, tiny_csv, overrides)
    assert trained.loss == loss
    # A random ranking of 40 items scores NDCG@10 0.11; BCE learns this tiny set slower than softmax.
    floor = 0.25 if loss == "sampled_softmax" else 0.17
    assert trained.best_valid_score is not None and trained.best_valid_score > floor


def test_plateau_rule() -> None:
    rising = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    assert not plateaued(rising, patience=2, min_gain=0.01)
    creeping = [0.80, 0.85, 0.851, 0.852, 0.853]  # +0.1% an epoch after the best real gain
    assert plateaued(creeping, patience=2, min_gain=0.01)
    assert not plateaued(creeping, patience=2, min_gain=0.0)  # RecBole's rule: any gain counts
    assert not plateaued([0.8, 0.7, 0.7], patience=2, min_gain=0.01)  # patience + 1 stale epochs needed
    assert plateaued([0.8, 0.7, 0.7, 0.79], patience=2, min_gain=0.0)
    assert plateaued([1.0, 0.9, 0.899, 0.898, 0.897], patience=2, min_gain=0.05, bigger=False)  # RMSE
    assert not plateaued([1.0, 0.9, 0.8, 0.7], patience=2, min_gain=0.05, bigger=False)
    assert not plateaued([], patience=1, min_gain=0.0)
