"""Ensembles of seed models: scores, figures, the evaluate -> export -> gate path, refusals."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from recflow_testdata import DATA_FILE, make_interactions, tiny_config, write_csv

from core.config import PipelineConfig
from core.data.extract import extract
from core.errors import EnsembleError
from core.experiments.ensemble import EnsembleResult, build_ensemble
from core.modeling import recbole_adapter as rb
from core.modeling.champion_rescore import rescore_champion
from core.modeling.dataset import RecBoleData, build_dataset, load_recbole_data
from core.modeling.ensemble_model import PADDING_SCORE, EnsembleModel, is_ensemble_checkpoint
from core.modeling.evaluation import evaluate
from core.modeling.export import export_model
from core.modeling.training import load_trained, train
from core.records import DatasetSplits, Snapshot
from core.release.artifacts import CHECKPOINT_FILE, CONFIG_FILE
from core.release.model_card import build_card, write_card
from core.release.registry import Registry
from core.serving.scorer import OnnxScorer

pytestmark = pytest.mark.slow  # trains tiny models

SEEDS = (1, 2)
BPR = {"model.name": "BPR", "model.params": {"embedding_size": 8}, "training.epochs": 1}
BERT4REC = {"model.name": "BERT4Rec", "training.epochs": 1, "training.objective": "all_positions"}


@dataclass
class Seeds:
    """Tiny models trained on one shared split, one run folder per seed (as seed repeats leave them)."""

    root: Path
    csv: Path
    config: PipelineConfig
    snapshot: Snapshot
    splits: DatasetSplits
    members: list[Path]


def _train_member(root: Path, csv: Path, splits: DatasetSplits, name: str, overrides: dict[str, Any]) -> Path:
    run_dir = root / name
    train(tiny_config(root, csv, overrides), splits, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory, tiny_csv: Path) -> Seeds:
    root = tmp_path_factory.mktemp("ensemble")
    config = tiny_config(root, tiny_csv)
    data_dir = root / "data"
    data_dir.mkdir()
    snapshot = extract(config, data_dir)
    splits = build_dataset(snapshot, config, data_dir)
    members = [_train_member(root, tiny_csv, splits, f"seed-{s}", {"training.seed": s}) for s in SEEDS]
    return Seeds(root, tiny_csv, config, snapshot, splits, members)


@pytest.fixture(scope="module")
def built(seeds: Seeds) -> tuple[EnsembleResult, RecBoleData]:
    out = seeds.root / "ensemble"
    data = load_recbole_data(seeds.config, seeds.splits, out / "checkpoints")
    return build_ensemble(seeds.config, seeds.splits, seeds.members, out, data=data), data


def _test_batch(data: RecBoleData) -> Any:
    return next(iter(data.test))[0]


def test_scores_are_the_mean_of_member_log_softmax(built: tuple[EnsembleResult, RecBoleData], seeds: Seeds) -> None:
    result, data = built
    ensemble = load_trained(data, result.trained.checkpoint)
    assert isinstance(ensemble, EnsembleModel) and len(ensemble.members) == len(SEEDS)
    members = [load_trained(data, d / "checkpoints" / CHECKPOINT_FILE) for d in seeds.members]
    batch = _test_batch(data)
    with torch.no_grad():
        raw = [m.full_sort_predict(batch).view(len(batch), -1) for m in members]
        got = ensemble.full_sort_predict(batch)
        candidates = ensemble.predict(batch)
    assert not torch.allclose(raw[0], raw[1], atol=1e-3)  # two seeds, two different models
    expected = torch.stack([torch.log_softmax(r[:, 1:], dim=-1) for r in raw]).mean(dim=0)
    assert got.shape == raw[0].shape
    torch.testing.assert_close(got[:, 1:], expected, rtol=0, atol=1e-6)
    assert torch.all(got[:, 0] == PADDING_SCORE)  # padding: below every real item
    targets = batch[data.dataset.iid_field].long()
    torch.testing.assert_close(candidates, got[torch.arange(len(batch)), targets], rtol=0, atol=0)


def test_figures_checkpoint_and_record(built: tuple[EnsembleResult, RecBoleData], seeds: Seeds) -> None:
    result, data = built
    metric = seeds.config.evaluation.valid_metric.lower()
    assert [m.seed for m in result.members] == list(SEEDS)
    assert [m.name for m in result.members] == [d.name for d in seeds.members]
    for member, run_dir in zip(result.members, seeds.members, strict=True):
        state = rb.load_checkpoint(run_dir / "checkpoints" / CHECKPOINT_FILE)
        # The member's valid figure is the one its own training measured for its best epoch.
        assert member.valid[metric] == pytest.approx(state["best_valid_score"], abs=1e-6)
        assert member.best_epoch == state["epoch"]
    best = max(result.members, key=lambda m: m.valid[metric])
    assert result.best_member == best.name
    assert result.beats_best_member is (result.valid[metric] > best.valid[metric])
    trained = result.trained
    assert trained.checkpoint == seeds.root / "ensemble" / "checkpoints" / CHECKPOINT_FILE
    assert trained.checkpoint.is_file() and (seeds.root / "ensemble" / CONFIG_FILE).is_file()
    assert trained.model_name == "SASRec ensemble of 2 seeds (1, 2)"
    assert trained.best_valid_score == result.valid[metric]
    one = load_trained(data, seeds.members[0] / "checkpoints" / CHECKPOINT_FILE)
    assert trained.parameters == len(SEEDS) * sum(p.numel() for p in one.parameters())
    assert trained.seconds > 0
    summary = json.loads(result.summary_path.read_text())
    assert summary["beats_best_member"] == result.beats_best_member and summary["valid"] == result.valid


def test_evaluate_export_register_and_rescore_like_any_version(
    built: tuple[EnsembleResult, RecBoleData], seeds: Seeds
) -> None:
    result, data = built
    config, out = seeds.config, seeds.root / "ensemble"
    evaluation = evaluate(config, seeds.splits, result.trained, out, data=data)
    assert evaluation.valid == result.valid and evaluation.test == result.test
    assert evaluation.test_seen_masked is not None
    assert evaluation.gate.candidate == result.test[config.evaluation.gate_metric.lower()]
    assert evaluation.gate.promote, evaluation.gate.reasons  # the tiny walk is learnt: it beats Pop
    exported, section = export_model(config, seeds.splits, result.trained, out, data=data)
    assert exported.exported is True, exported.reason
    assert exported.max_abs_diff is not None and exported.max_abs_diff <= 1e-4
    assert exported.top10_agreement == 1.0
    card = build_card(config, seeds.snapshot, seeds.splits, result.trained, evaluation, exported, section)
    assert card["model"] == result.trained.model_name
    write_card(card, exported.card_path)
    # Registered as tasks/register.py registers any version: export files, metrics, config, checkpoint.
    files = [p for p in sorted(exported.card_path.parent.iterdir()) if p.is_file() and p != exported.card_path]
    files += [evaluation.metrics_path, out / CONFIG_FILE, result.trained.checkpoint]
    registry = Registry(config.registry.path)
    promotion = registry.publish(config.registry_name, registry.new_version(), files, card, evaluation.gate.promote)
    assert promotion.champion == promotion.version
    champion_dir = registry.entry(config.registry_name) / promotion.version
    assert is_ensemble_checkpoint(rb.load_checkpoint(champion_dir / CHECKPOINT_FILE))
    # As the champion, its verified ONNX graph re-scored on the same split gives the metrics torch gave.
    rescored = rescore_champion(data, champion_dir, out / "checkpoints" / "rescore.pth")
    assert rescored.keys() == result.test.keys()
    for key, value in result.test.items():
        assert rescored[key] == pytest.approx(value, abs=1e-6), key
    recs = OnnxScorer(champion_dir).recommend(["i1", "i2", "i3"], k=5)
    assert len(recs) == 5


def test_one_member_ranks_as_the_member(seeds: Seeds) -> None:
    out = seeds.root / "ensemble-of-one"
    data = load_recbole_data(seeds.config, seeds.splits, out / "checkpoints")
    result = build_ensemble(seeds.config, seeds.splits, seeds.members[:1], out, data=data)
    assert result.valid == result.members[0].valid and result.test == result.members[0].test
    assert result.beats_best_member is False
    member = load_trained(data, seeds.members[0] / "checkpoints" / CHECKPOINT_FILE)
    ensemble = load_trained(data, result.trained.checkpoint)
    batch = _test_batch(data)
    with torch.no_grad():
        m = member.full_sort_predict(batch).view(len(batch), -1)[:, 1:].numpy()
        e = ensemble.full_sort_predict(batch)[:, 1:].numpy()
    # Log-softmax shifts each row by a constant: items in the member's order score non-increasing.
    rows = np.arange(m.shape[0])[:, None]
    order = np.argsort(-m, axis=1, kind="stable")
    assert np.all(np.diff(e[rows, order], axis=1) <= 0)


def test_refuses_members_of_other_models_data_or_architecture(seeds: Seeds, tmp_path: Path) -> None:
    def refused(members: list[Path], match: str) -> None:
        with pytest.raises(EnsembleError, match=match):
            build_ensemble(seeds.config, seeds.splits, members, tmp_path / "out")

    bpr = _train_member(tmp_path, seeds.csv, seeds.splits, "bpr", BPR)
    refused([seeds.members[0], bpr], r"must all be SASRec models \(the config's\); found bpr: BPR")
    wide = _train_member(tmp_path, seeds.csv, seeds.splits, "two-heads", {"model.params.n_heads": 2})
    refused([seeds.members[0], wide], r"member two-heads has another architecture .*n_heads = 2, expected 1")
    other_csv = write_csv(make_interactions(seed=7), tmp_path / "other" / DATA_FILE)
    other_config = tiny_config(tmp_path, other_csv)
    other_dir = tmp_path / "other-data"
    other_dir.mkdir()
    other_splits = build_dataset(extract(other_config, other_dir), other_config, other_dir)
    other = _train_member(tmp_path, other_csv, other_splits, "other", {"training.epochs": 1})
    refused([seeds.members[0], other], r"member other has another data or split .*data_path")
    refused([seeds.members[0], tmp_path / "never-trained"], r"never-trained: no checkpoints/best.pth \(train it first\)")
    refused([seeds.members[0], seeds.members[0]], "listed twice")
    refused([], "at least one member")


def test_general_model_ensemble(seeds: Seeds, tmp_path: Path) -> None:
    members = [_train_member(tmp_path, seeds.csv, seeds.splits, f"bpr-{s}", BPR | {"training.seed": s}) for s in SEEDS]
    config = tiny_config(tmp_path, seeds.csv, BPR)
    out = tmp_path / "bpr-ensemble"
    data = load_recbole_data(config, seeds.splits, out / "checkpoints")
    result = build_ensemble(config, seeds.splits, members, out, data=data)
    assert result.trained.model_name == "BPR ensemble of 2 seeds (1, 2)"
    evaluation = evaluate(config, seeds.splits, result.trained, out, data=data)
    assert evaluation.test == result.test
    exported, section = export_model(config, seeds.splits, result.trained, out, data=data)
    assert exported.exported is True, exported.reason
    assert exported.max_abs_diff is not None and exported.max_abs_diff <= 1e-4
    assert section["kind"] == "user"
    # An ensemble checkpoint loaded on another model's data says so.
    sasrec_data = load_recbole_data(seeds.config, seeds.splits, out / "checkpoints")
    with pytest.raises(EnsembleError, match="holds BPR members; the data is built for SASRec"):
        load_trained(sasrec_data, result.trained.checkpoint)


def test_bert4rec_ensemble_exports_with_parity(seeds: Seeds, tmp_path: Path) -> None:
    # Export traces a batched form of BERT4Rec's mask-token step; the ensemble hands it to every member.
    members = [_train_member(tmp_path, seeds.csv, seeds.splits, f"bert-{s}", BERT4REC | {"training.seed": s})
               for s in SEEDS]
    config = tiny_config(tmp_path, seeds.csv, BERT4REC)
    out = tmp_path / "bert-ensemble"
    data = load_recbole_data(config, seeds.splits, out / "checkpoints")
    result = build_ensemble(config, seeds.splits, members, out, data=data)
    exported, _ = export_model(config, seeds.splits, result.trained, out, data=data)
    assert exported.exported is True, exported.reason
    assert exported.max_abs_diff is not None and exported.max_abs_diff <= 1e-4
    assert exported.top10_agreement == 1.0
