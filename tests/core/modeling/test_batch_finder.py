"""Batch finder (``training.train_batch_size: auto``) on CPU.

No GPU needed: out-of-memory is the real ``torch.OutOfMemoryError`` (what CUDA raises when an
allocation fails), injected above a row threshold, and device memory is a fake reader
(``FakeMemory``: a fixed base plus so many bytes per row). The probe steps themselves are the
real ones: the actual SASRec, real train batches from RecBole's loader, backward, Adam step.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from recflow_testdata import TinyRun, tiny_config

from core.config import PipelineConfig, load_config
from core.data.extract import extract
from core.errors import ConfigError, TrainingError
from core.modeling import batch_finder
from core.modeling import recbole_adapter as rb
from core.modeling.dataset import RecBoleData, build_dataset, load_recbole_data
from core.modeling.evaluation import evaluate
from core.modeling.runtime import rng_state
from core.modeling.tracking import AUTO_BATCH
from core.modeling.training import build_model, make_trainer, train
from core.records import AutoBatch, BatchProbe, DatasetSplits, ExportedModel, TrainedModel
from core.release.model_card import build_card

REPO = Path(__file__).resolve().parents[3]


# --------------------------------------------------------------------------- fakes
def oom_above(threshold: int, seen: list[int] | None = None, peak_per_row: int = 1_000) -> batch_finder.FitsFn:
    """A ``fits`` whose device runs out of memory above ``threshold`` rows (the real error type)."""

    def fits(batch: int) -> int:
        if seen is not None:
            seen.append(batch)
        if batch > threshold:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({batch} rows injected)")
        return batch * peak_per_row

    return fits


@contextlib.contextmanager
def inject_oom(model_name: str, threshold: int) -> Iterator[list[int]]:
    """Make the model's ``calculate_loss`` raise CUDA's OOM error on more than ``threshold`` rows; yields the sizes seen."""
    cls = rb.resolve_model(model_name)
    original = cls.__dict__["calculate_loss"]
    seen: list[int] = []

    def wrapped(self: Any, interaction: Any) -> Any:
        seen.append(len(interaction))
        if len(interaction) > threshold:
            raise torch.OutOfMemoryError(f"CUDA out of memory ({len(interaction)} rows > {threshold} injected)")
        return original(self, interaction)

    cls.calculate_loss = wrapped
    try:
        yield seen
    finally:
        cls.calculate_loss = original


class FakeMemory:
    """A device with ``total`` bytes whose step peak is ``base + per_row x rows`` of the last loss computed."""

    def __init__(self, seen: list[int], *, total: int, base: int = 100_000, per_row: int = 1_000) -> None:
        self.seen, self.total, self.base, self.per_row = seen, total, base, per_row
        self.samples = 0
        self._peak = 0

    def available_bytes(self) -> int:
        return self.total

    def reset(self) -> None:
        self._peak = 0

    def sample(self) -> None:
        self.samples += 1
        self._peak = max(self._peak, self.base + self.per_row * self.seen[-1])

    def peak_bytes(self) -> int:
        return self._peak


# --------------------------------------------------------------------------- the search
def test_doubles_then_binary_searches_to_the_oom_threshold() -> None:
    seen: list[int] = []
    batch, probes = batch_finder.search_batch(oom_above(700, seen), budget_bytes=None, cap=100_000)
    assert batch == 700
    # Doubling from 64 until 1024 fails, then bisection between 512 (fit) and 1024 (failed).
    assert seen == [64, 128, 256, 512, 1024, 768, 640, 704, 672, 688, 696, 700, 702, 701]
    assert [p.outcome for p in probes] == ["fits"] * 4 + ["oom", "oom", "fits", "oom"] + ["fits"] * 4 + ["oom"] * 2
    assert probes[4].peak_bytes is None and probes[3].peak_bytes == 512_000


def test_stops_within_the_headroom_before_any_oom() -> None:
    # 20% headroom of 1,000,000 bytes: budget 800,000; a step takes 50,000 + 1,000 per row -> at most 750 rows.
    budget = int((1 - 0.2) * 1_000_000)
    seen: list[int] = []
    fits = oom_above(2_000, seen)
    batch, probes = batch_finder.search_batch(lambda b: fits(b) + 50_000, budget_bytes=budget, cap=100_000)
    assert batch == 750
    assert {p.outcome for p in probes} == {"fits", "over budget"}  # 1024 is over budget, never OOM
    assert max(p.peak_bytes or 0 for p in probes if p.outcome == "fits") <= budget


def test_caps_at_the_training_rows() -> None:
    seen: list[int] = []
    assert batch_finder.search_batch(oom_above(10_000, seen), budget_bytes=None, cap=300)[0] == 300
    assert seen == [64, 128, 256, 300]


def test_a_failing_start_halves_down_first() -> None:
    seen: list[int] = []
    assert batch_finder.search_batch(oom_above(40, seen), budget_bytes=None, cap=10_000)[0] == 40
    assert seen == [64, 32, 48, 40, 44, 42, 41]


def test_nothing_fits_names_the_probes() -> None:
    with pytest.raises(TrainingError) as err:
        batch_finder.search_batch(oom_above(5), budget_bytes=None, cap=10_000, floor=8)
    assert "not even a batch of 8 rows fits" in str(err.value)
    assert "64 (oom), 32 (oom), 16 (oom), 8 (oom)" in str(err.value)


def test_other_errors_are_not_taken_for_oom() -> None:
    def broken(batch: int) -> int:
        raise RuntimeError("shape mismatch in the model")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        batch_finder.search_batch(broken, budget_bytes=None, cap=1_000)


# --------------------------------------------------------------------------- config and CLI
def test_config_accepts_auto_or_a_positive_integer() -> None:
    assert load_config(overrides={"training.train_batch_size": "auto"}).training.train_batch_size == "auto"
    assert load_config(overrides={"training.train_batch_size": "512"}).training.train_batch_size == 512
    with pytest.raises(ConfigError) as err:
        load_config(overrides={"training.train_batch_size": "lots"})
    assert str(err.value).count("training.train_batch_size") == 1  # one message, not one per union member
    assert "must be a positive integer or 'auto', got 'lots'" in str(err.value)
    with pytest.raises(ConfigError, match="auto_batch_headroom"):
        load_config(overrides={"training.auto_batch_headroom": 1.0})


def test_cli_batch_size_flag(tmp_path: Path) -> None:
    env = {**os.environ, "RECFLOW_NO_REEXEC": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "run", "--batch-size", "lots", "--summary-json", "s.json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training.train_batch_size" in errors[0] and "'lots'" in errors[0]
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- real probe steps
@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory: pytest.TempPathFactory, tiny_csv: Path) -> tuple[PipelineConfig, DatasetSplits]:
    root = tmp_path_factory.mktemp("finder")
    # RecBole's own loop (its train rows); the all-position loop is probed in test_probed_auto_on_windows.
    config = tiny_config(root, tiny_csv, {"training.train_batch_size": "auto", "training.objective": "last_item"})
    run_dir = root / "data"
    run_dir.mkdir()
    return config, build_dataset(extract(config, run_dir), config, run_dir)


def _model_and_trainer(config: PipelineConfig, splits: DatasetSplits, tmp_path: Path) -> tuple[RecBoleData, Any, Any]:
    data = load_recbole_data(config, splits, tmp_path / "checkpoints")
    model = build_model(data)
    (tmp_path / "checkpoints").mkdir(exist_ok=True)
    trainer = make_trainer(data, model, tmp_path / "checkpoints" / "best.pth")
    return data, model, trainer


def _same_rng(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (
        torch.equal(a["torch"], b["torch"])
        and all(np.array_equal(x, y) for x, y in zip(a["numpy"][1:3], b["numpy"][1:3]))
        and a["random"] == b["random"]
        and torch.equal(a["loader"], b["loader"])
    )


def test_real_probe_steps_find_the_batch_and_leave_no_trace(
    tiny_split: tuple[PipelineConfig, DatasetSplits], tmp_path: Path
) -> None:
    config, splits = tiny_split
    data, model, trainer = _model_and_trainer(config, splits, tmp_path)
    rows = batch_finder.training_rows(data.train)
    assert rows > 1024  # else the cap, not the search, would decide
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    before = rng_state(data.train)

    with inject_oom("SASRec", threshold=700) as seen:
        memory = FakeMemory(seen, total=10**9)  # plenty: the OOM decides
        choice = batch_finder.find_train_batch(
            config.training, model, data.train, data.config,
            optimizer_factory=lambda: trainer._build_optimizer(params=model.parameters()),
            amp_dtype=None, memory=memory,
        )
    assert (choice.batch, choice.method, choice.device) == (700, "probed", "cpu")
    assert [p.batch for p in choice.probes] == [64, 128, 256, 512, 1024, 768, 640, 704, 672, 688, 696, 700, 702, 701]
    assert seen == [p.batch for p in choice.probes]  # every probe ran the model on a real batch of that size
    assert memory.samples == 3 * sum(p.outcome == "fits" for p in choice.probes)  # forward, backward, step
    assert choice.probes[3].peak_bytes == 100_000 + 1_000 * 512
    assert choice.budget_bytes == int(0.8 * 10**9)
    # Probing trained the model a step per probe; all of it was rolled back.
    after = model.state_dict()
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    assert all(p.grad is None for p in model.parameters())
    assert _same_rng(before, rng_state(data.train))


def test_a_probe_step_really_trains(tiny_split: tuple[PipelineConfig, DatasetSplits], tmp_path: Path) -> None:
    """The step the finder measures changes the weights (so the restore above is what kept them)."""
    config, splits = tiny_split
    data, model, trainer = _model_and_trainer(config, splits, tmp_path)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with inject_oom("SASRec", threshold=10_000) as seen:
        fits = batch_finder.make_fits(
            model, trainer._build_optimizer(params=model.parameters()), data.train,
            device=torch.device("cpu"), amp_dtype=None, memory=FakeMemory(seen, total=10**9),
        )
        peak = fits(128)
    assert seen == [128] and peak == 100_000 + 128_000
    changed = [k for k in weights if not torch.equal(weights[k], model.state_dict()[k])]
    assert "item_embedding.weight" in changed


def test_auto_max_caps_the_search(tiny_split: tuple[PipelineConfig, DatasetSplits], tmp_path: Path) -> None:
    config, splits = tiny_split
    capped = config.model_copy(update={"training": config.training.model_copy(update={"auto_batch_max": 300})})
    data, model, trainer = _model_and_trainer(capped, splits, tmp_path)
    with inject_oom("SASRec", threshold=10_000) as seen:
        choice = batch_finder.find_train_batch(
            capped.training, model, data.train, data.config,
            optimizer_factory=lambda: trainer._build_optimizer(params=model.parameters()),
            amp_dtype=None, memory=FakeMemory(seen, total=10**9),
        )
    assert choice.batch == 300 and [p.batch for p in choice.probes] == [64, 128, 256, 300]
    assert "auto_batch_max" in choice.reason


def test_resume_reuses_the_crashed_attempts_batch(
    tiny_split: tuple[PipelineConfig, DatasetSplits], tmp_path: Path
) -> None:
    config, splits = tiny_split
    data, model, trainer = _model_and_trainer(config, splits, tmp_path)
    prior = {"batch": 96, "method": "probed", "reason": "largest batch within 20% headroom", "device": "cuda",
             "budget_bytes": 123, "probes": [{"batch": 64, "outcome": "fits", "peak_bytes": 100}]}
    choice = batch_finder.prepare_train_batch(config.training, data, model, trainer, prior=prior)
    assert choice is not None and (choice.batch, choice.method) == (96, "resumed")
    assert data.config["train_batch_size"] == 96 and data.train.step == 96
    assert len(next(iter(data.train))) == 96  # the loader really yields the batch


# --------------------------------------------------------------------------- through train()
def _train(config: PipelineConfig, splits: DatasetSplits, run_dir: Path) -> TrainedModel:
    run_dir.mkdir(parents=True)
    return train(config, splits, run_dir)


def _weights(trained: TrainedModel) -> dict[str, torch.Tensor]:
    return rb.load_checkpoint(trained.checkpoint)["state_dict"]


def test_auto_on_cpu_trains_with_the_default(tiny_split: tuple[PipelineConfig, DatasetSplits], tmp_path: Path) -> None:
    config, splits = tiny_split
    trained = _train(config, splits, tmp_path / "run")
    assert trained.train_batch_size == 1024 and trained.micro_batch_size == 1024
    assert trained.auto_batch is not None
    assert (trained.auto_batch.method, trained.auto_batch.batch, trained.auto_batch.probes) == ("default", 1024, [])
    assert "cpu has no memory limit to probe" in trained.auto_batch.reason
    assert json.loads((tmp_path / "run" / AUTO_BATCH).read_text())["batch"] == 1024
    assert TrainedModel.model_validate_json(trained.model_dump_json()).auto_batch == trained.auto_batch


def test_probed_auto_trains_exactly_like_the_batch_it_found(
    tiny_split: tuple[PipelineConfig, DatasetSplits], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole path through train(): probing (real steps, dropout on) leaves no trace, and the
    loader trains at the batch found, so the run equals one configured with that batch."""
    config, splits = tiny_split
    with inject_oom("SASRec", threshold=300) as seen:
        # This CPU "has" 1 MB: 20% headroom leaves 800,000 bytes = 100,000 + 1,000 x 700 rows; OOM at 300 decides.
        monkeypatch.setattr(batch_finder, "memory_reader_for", lambda device: FakeMemory(seen, total=1_000_000))
        auto = _train(config, splits, tmp_path / "auto")
    assert auto.auto_batch is not None and auto.auto_batch.method == "probed"
    assert auto.train_batch_size == 300 and auto.micro_batch_size == 300
    assert max(seen[len(auto.auto_batch.probes):]) == 300  # training itself ran at the found batch
    fixed_config = config.model_copy(update={"training": config.training.model_copy(update={"train_batch_size": 300})})
    fixed = _train(fixed_config, splits, tmp_path / "fixed")
    assert fixed.auto_batch is None
    assert [e.train_loss for e in auto.epochs] == [e.train_loss for e in fixed.epochs]
    assert [e.valid_score for e in auto.epochs] == [e.valid_score for e in fixed.epochs]
    wa, wf = _weights(auto), _weights(fixed)
    assert all(torch.equal(wa[k], wf[k]) for k in wa)


def test_the_model_card_records_the_choice(tiny_run: TinyRun, tmp_path: Path) -> None:
    choice = AutoBatch(batch=700, method="probed", device="cuda", reason="largest batch within 20% headroom",
                       budget_bytes=800, probes=[BatchProbe(batch=64, outcome="fits", peak_bytes=120)])
    trained = tiny_run.trained.model_copy(update={"auto_batch": choice, "train_batch_size": 700})
    evaluation = evaluate(tiny_run.config, tiny_run.splits, tiny_run.trained, tmp_path, None)
    exported = ExportedModel(exported=False, reason="export disabled in config", card_path=tmp_path / "card.json")
    card = json.loads(json.dumps(
        build_card(tiny_run.config, tiny_run.snapshot, tiny_run.splits, trained, evaluation, exported, {}), default=str))
    assert card["training"]["train_batch_size"] == 700
    assert card["training"]["auto_batch"] == choice.model_dump(mode="json")
    assert build_card(tiny_run.config, tiny_run.snapshot, tiny_run.splits, tiny_run.trained, evaluation, exported,
                      {})["training"]["auto_batch"] is None


def test_probed_auto_on_windows_trains_like_the_batch_it_found(
    tiny_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All-position training: probes are real steps of the window loss on batches of windows."""
    config = tiny_config(tmp_path, tiny_csv, {"training.train_batch_size": "auto"})
    (tmp_path / "data").mkdir()
    splits = build_dataset(extract(config, tmp_path / "data"), config, tmp_path / "data")
    cls = rb.resolve_model("SASRec")
    original = cls.forward
    seen: list[int] = []

    def forward(self: Any, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.training:
            seen.append(len(item_seq))
            if len(item_seq) > 100:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return original(self, item_seq, lengths)

    monkeypatch.setattr(cls, "forward", forward)
    monkeypatch.setattr(batch_finder, "memory_reader_for", lambda device: FakeMemory(seen, total=10**9))
    auto = _train(config, splits, tmp_path / "auto")
    assert auto.objective == "all_positions" and auto.auto_batch is not None
    assert auto.train_batch_size == 100 and auto.auto_batch.method == "probed"
    assert [p.batch for p in auto.auto_batch.probes][:3] == [64, 128, 96]
    fixed_config = config.model_copy(update={"training": config.training.model_copy(update={"train_batch_size": 100})})
    fixed = _train(fixed_config, splits, tmp_path / "fixed")
    assert [e.train_loss for e in auto.epochs] == [e.train_loss for e in fixed.epochs]
    wa, wf = _weights(auto), _weights(fixed)
    assert all(torch.equal(wa[k], wf[k]) for k in wa)
