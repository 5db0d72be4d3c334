"""Re-scoring the champion on tonight's split: the nightly gate's like-for-like comparison."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from recflow_testdata import TinyRun

from core.modeling.champion_rescore import ChampionNotComparable, rescore_champion
from core.modeling.dataset import load_recbole_data
from core.modeling.evaluation import ranking_metrics
from core.modeling.export import export_model
from core.modeling.training import load_trained


@pytest.fixture(scope="module")
def champion_dir(tiny_run: TinyRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    record, _ = export_model(tiny_run.config, tiny_run.splits, tiny_run.trained, tiny_run.run_dir)
    out = tmp_path_factory.mktemp("champion") / "v1"
    shutil.copytree(record.card_path.parent, out)
    return out


def _data(tiny_run: TinyRun):
    return load_recbole_data(tiny_run.config, tiny_run.splits, tiny_run.trained.checkpoint.parent)


def test_champion_on_its_own_data_scores_what_the_candidate_scored(tiny_run: TinyRun, champion_dir: Path) -> None:
    data = _data(tiny_run)
    model = load_trained(data, tiny_run.trained.checkpoint)
    _, direct = ranking_metrics(data, model, tiny_run.run_dir / "checkpoints" / "direct.pth")
    rescored = rescore_champion(data, champion_dir, tiny_run.run_dir / "checkpoints" / "champion.pth")
    assert set(rescored) == set(direct)
    assert direct["ndcg@10"] > 0.1  # a real model, not an all-zero comparison
    for key, value in direct.items():
        assert rescored[key] == pytest.approx(value, abs=1e-4), key


def test_items_the_champion_never_saw_count_as_misses(tiny_run: TinyRun, champion_dir: Path, tmp_path: Path) -> None:
    # A champion trained when half of tonight's items did not exist yet.
    partial = tmp_path / "v0"
    shutil.copytree(champion_dir, partial)
    items = json.loads((partial / "item_ids.json").read_text())
    renamed = [tok if i == 0 or i % 2 == 0 else f"old-{tok}" for i, tok in enumerate(items)]
    (partial / "item_ids.json").write_text(json.dumps(renamed))
    data = _data(tiny_run)
    full = rescore_champion(data, champion_dir, tmp_path / "a.pth")
    half = rescore_champion(data, partial, tmp_path / "b.pth")
    assert half["hit@20"] < full["hit@20"]
    # It can only ever hit the items it knows: at most the test targets among them.
    test_targets = data.test.dataset.inter_feat[data.dataset.iid_field].numpy()
    known_share = float((test_targets % 2 == 0).mean())  # internal ids: the even ones were kept
    assert half["hit@20"] <= known_share + 1e-6


def test_champion_without_onnx_is_not_comparable(tiny_run: TinyRun, champion_dir: Path, tmp_path: Path) -> None:
    no_onnx = tmp_path / "v2"
    shutil.copytree(champion_dir, no_onnx)
    (no_onnx / "model.onnx").unlink()
    with pytest.raises(ChampionNotComparable, match="no model.onnx"):
        rescore_champion(_data(tiny_run), no_onnx, tmp_path / "c.pth")


@pytest.mark.parametrize("name,params", [
    ("GRU4Rec", {"embedding_size": 16, "hidden_size": 16}),
    ("BERT4Rec", {"hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1}),
])
def test_all_position_models_are_rescored_as_they_scored(
    tiny_csv: Path, tmp_path: Path, name: str, params: dict
) -> None:
    """GRU4Rec and BERT4Rec trained on all positions export and re-score like SASRec."""
    from recflow_testdata import tiny_config

    from core.data.extract import extract
    from core.modeling.dataset import build_dataset
    from core.modeling.training import train

    config = tiny_config(tmp_path, tiny_csv, {"model.name": name, "model.params": params, "training.epochs": 3})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    splits = build_dataset(extract(config, run_dir), config, run_dir)
    trained = train(config, splits, run_dir)
    assert trained.objective == "all_positions"
    record, _ = export_model(config, splits, trained, run_dir)
    assert record.exported and record.max_abs_diff is not None and record.max_abs_diff <= 1e-4
    data = load_recbole_data(config, splits, trained.checkpoint.parent)
    _, direct = ranking_metrics(data, load_trained(data, trained.checkpoint), run_dir / "direct.pth")
    rescored = rescore_champion(data, record.card_path.parent, run_dir / "champion.pth")
    assert direct["ndcg@10"] > 0.02  # hits to compare, not an all-zero comparison
    for key, value in direct.items():
        assert rescored[key] == pytest.approx(value, abs=1e-4), key
