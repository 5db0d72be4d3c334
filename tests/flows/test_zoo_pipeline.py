"""Every model-zoo preset (configs/ml-100k-*.yaml) through the whole flow, on tiny data.

Each preset keeps its own model, split and evaluation settings; only the source (the tiny
CSV, with a 1-5 rating column for rating presets) and the sizes (tiny model params, two
epochs, one thread) are switched. A new preset fails here until its tiny params and its
expected export are added below.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from recflow_testdata import Interaction, tiny_overrides, write_rating_csv
from typer.testing import CliRunner

from core.config import PipelineConfig, load_config
from core.records import DatasetSplits, TrainedModel
from core.release.registry import CHAMPION, Registry
from core.serving.scorer import OnnxScorer
from flows.training_pipeline import training_pipeline

REPO = Path(__file__).resolve().parents[2]
PRESETS = sorted((REPO / "configs").glob("ml-100k-*.yaml"))

# Per model: tiny hyper-parameters (merged over the preset's) and whether ONNX is expected.
TINY = {
    "SASRec": ({"hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1}, True),
    "BERT4Rec": ({"hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1}, True),
    "GRU4Rec": ({"embedding_size": 16, "hidden_size": 16}, True),
    "BPR": ({"embedding_size": 16}, True),
    "MultiVAE": ({"latent_dimension": 16, "mlp_hidden_size": [32]}, True),
    "ItemKNN": ({"k": 10}, True),
    "EASE": ({}, True),
    "FM": ({"embedding_size": 8}, True),
}
# Per model: the outcome of its first run on the tiny data (no champion yet, so: beats the baseline?).
EXPECTED_STATUS = {"SASRec": "promoted", "BERT4Rec": "promoted", "GRU4Rec": "promoted", "BPR": "promoted",
                   "MultiVAE": "promoted", "ItemKNN": "promoted", "EASE": "promoted", "FM": "promoted"}
NO_ONNX_REASON = {"ItemKNN": "traditional model", "EASE": "traditional model", "FM": "rating-prediction model"}
RANKING_KEYS = {f"{m}@{k}" for m in ("recall", "mrr", "ndcg", "hit", "precision") for k in (5, 10, 20)}


def test_the_zoo_has_every_model_the_issue_asks_for() -> None:
    names = {load_config(p).model.name for p in PRESETS}
    assert names == {"SASRec", "GRU4Rec", "BERT4Rec", "BPR", "ItemKNN", "EASE", "MultiVAE", "FM"}
    assert [load_config(p).evaluation.task for p in PRESETS].count("rating") == 1


@pytest.fixture(scope="module")
def rating_csv(tmp_path_factory: pytest.TempPathFactory, tiny_rows: list[Interaction]) -> Path:
    # Ranking presets read only user/item/time from it (columns.rating stays unset for them).
    return write_rating_csv(tiny_rows, tmp_path_factory.mktemp("zoo-data") / "zoo.csv")


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_completes_the_pipeline(
    preset: Path, prefect_harness: None, rating_csv: Path, tmp_path: Path
) -> None:
    preset_config = load_config(preset)
    name = preset_config.model.name
    assert name in TINY, f"add tiny params and the expected export for {name} ({preset.name}) to TINY"
    params, onnx_expected = TINY[name]
    rating = preset_config.evaluation.task == "rating"
    overrides = tiny_overrides(tmp_path, rating_csv) | {"model.params": params}
    if rating:
        overrides |= {"columns.rating": "rating", "training.learning_rate": 0.01}
    config = load_config(preset, overrides)
    assert config.model.name == name and config.evaluation == preset_config.evaluation  # the preset's protocol

    result = training_pipeline(config)

    # A fresh registry (no champion) and seeded CPU training on fixed data: the gate's only bar is
    # the baseline, and each tiny model's outcome against it is fixed.
    assert result.status == EXPECTED_STATUS[name], result.gate
    assert (result.stage, result.error) == ("register", None)
    assert result.gate is not None and result.gate.champion is None
    test, baseline = result.metrics["test"], result.metrics["baseline"]
    assert result.gate is not None and result.gate.metric == preset_config.evaluation.gate_metric
    if rating:
        assert set(test) == set(baseline) == {"rmse", "mae"}
        assert 0 < test["mae"] <= test["rmse"] < 4  # the 1-5 scale, not the [0, 1] training label
        assert result.gate.promote == (test["rmse"] < baseline["rmse"])
    else:
        assert set(test) == set(baseline) == RANKING_KEYS
        assert result.gate.promote == (test["ndcg@10"] > baseline["ndcg@10"])

    # Registered (rejected versions too), with the checkpoint whether or not ONNX exists.
    registry = Registry(config.registry.path)
    assert result.model_version in registry.versions(config.registry_name)
    version_dir = registry.entry(config.registry_name) / str(result.model_version)
    files = {p.name for p in version_dir.iterdir()}
    assert {"best.pth", "metrics.json", "config.yaml", "model_card.json", "item_ids.json"} <= files
    card = json.loads((version_dir / "model_card.json").read_text())
    assert card["model"] == name and card["version"] == result.model_version
    if onnx_expected:
        assert "model.onnx" in files and "signature.json" in files
        assert card["export"]["onnx"] is True and card["export"]["reason"] is None
        assert card["export"]["parity"]["max_abs_diff"] <= 1e-4
        scorer = OnnxScorer(version_dir)
        if rating:  # a pairs graph: one rating per (user, item), on the 1-5 scale
            assert scorer.signature["kind"] == "pairs" and card["export"]["parity"]["pairs"] > 0
            assert scorer.rate_pairs([scorer.user_index["u1"]], [scorer.item_index["i1"]]).shape == (1,)
        else:
            assert card["export"]["parity"]["top10_identical"] == 1.0
            recs = scorer.recommend(["i1", "i2", "i3"], k=5, user=None if scorer.signature["kind"] == "sequential" else "u1")
            assert len(recs) == 5 and all(r.item.startswith("i") for r in recs)
    else:
        assert "model.onnx" not in files and "signature.json" not in files
        assert card["export"]["onnx"] is False and card["export"]["exported"] is False
        assert NO_ONNX_REASON[name] in card["export"]["reason"] and "best.pth" in card["export"]["reason"]
        _recommend_says_why(config.registry.path, config.registry_name, str(result.model_version), name)
    if rating:
        assert card["metrics"]["task"] == "rating" and card["metrics"]["baseline_train_mean"] == baseline
        assert card["data"]["eval_protocol"].endswith("|task=rating")
    else:
        assert card["metrics"]["baseline_pop"] == baseline
    if result.status == "promoted":
        assert (registry.entry(config.registry_name) / CHAMPION).resolve() == version_dir.resolve()


def _recommend_says_why(registry: Path, entry: str, version: str, model: str) -> None:
    """`recflow recommend` on a version without ONNX: one error line naming why, no traceback."""
    from cli import app

    out = CliRunner().invoke(app, ["recommend", entry, "--registry", str(registry), "--version", version])
    assert out.exit_code != 0
    text = out.output.strip()
    assert text.startswith(f"error: {entry} {version} has no ONNX model to score with: {model} is a")
    assert len(text.splitlines()) == 1 and "Traceback" not in text


@pytest.mark.slow
def test_a_graph_that_runs_only_at_its_trace_batch_is_not_exported(
    tmp_path: Path, rating_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exported as the wrong kind (a user graph instead of its history graph), ItemKNN traces (numpy
    scores frozen for the 2-row example) into a graph onnxruntime cannot run on the parity batch:
    export says so instead of failing the run."""
    import core.modeling.export as export
    from core.data.extract import extract
    from core.modeling.dataset import build_dataset
    from core.modeling.training import train

    config = load_config(REPO / "configs" / "ml-100k-itemknn.yaml", tiny_overrides(tmp_path, rating_csv)
                         | {"model.params": TINY["ItemKNN"][0]})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    snapshot = extract(config, run_dir)
    splits = build_dataset(snapshot, config, run_dir)
    trained = train(config, splits, run_dir)
    assert export.export_kind(config, _model(config, splits, trained)) == "history"
    monkeypatch.setattr(export, "export_kind", lambda *_: "user")  # the fault: the wrong graph for the model
    record, section = export.export_model(config, splits, trained, run_dir)
    assert record.exported is False and record.onnx_path is None
    assert record.reason is not None and record.reason.startswith("ItemKNN was traced but its ONNX graph does not run")
    assert section == {"reason": record.reason}
    assert not (run_dir / "export" / "model.onnx").exists()



def _model(config: PipelineConfig, splits: DatasetSplits, trained: TrainedModel) -> torch.nn.Module:
    from core.modeling.dataset import load_recbole_data
    from core.modeling.training import load_trained

    return load_trained(load_recbole_data(config, splits, trained.checkpoint.parent), trained.checkpoint)
