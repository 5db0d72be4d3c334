"""The model card: what the gate of a later run and a person read about a version."""

from __future__ import annotations

import json
from pathlib import Path

from recflow_testdata import TinyRun

from core.modeling.evaluation import evaluate
from core.records import ExportedModel
from core.release.model_card import build_card, library_versions, write_card


def test_card_contents_round_trip(tiny_run: TinyRun, tmp_path: Path) -> None:
    evaluation = evaluate(tiny_run.config, tiny_run.splits, tiny_run.trained, tmp_path, None)
    exported = ExportedModel(exported=False, reason="export disabled in config", card_path=tmp_path / "card.json")
    card = build_card(tiny_run.config, tiny_run.snapshot, tiny_run.splits, tiny_run.trained, evaluation, exported, {})
    path = write_card(card, tmp_path / "sub" / "model_card.json")
    loaded = json.loads(path.read_text())
    assert loaded["model"] == "SASRec"
    assert loaded["registry_name"] == "interactions-sasrec"
    # What comparable() needs to accept this card as a champion on the same data:
    assert loaded["data"]["fingerprint"] == tiny_run.snapshot.fingerprint
    assert loaded["data"]["eval_protocol"] == tiny_run.splits.eval_protocol
    assert loaded["data"]["rows"] == tiny_run.snapshot.rows
    assert (loaded["data"]["users"], loaded["data"]["items"]) == (80, tiny_run.splits.items)
    assert loaded["data"]["time_range"] == [tiny_run.snapshot.min_time, tiny_run.snapshot.max_time]
    assert evaluation.test_seen_masked is not None  # SASRec: also scored with seen items masked
    assert loaded["metrics"] == {"test": evaluation.test, "valid": evaluation.valid,
                                 "baseline_pop": evaluation.baseline, "test_seen_masked": evaluation.test_seen_masked}
    assert loaded["gate"]["promote"] is evaluation.gate.promote
    assert loaded["training"]["epochs_run"] == 2
    assert loaded["training"]["best_epoch"] == tiny_run.trained.best_epoch
    assert loaded["export"] == {"exported": False, "onnx": False, "reason": "export disabled in config"}
    assert loaded["config"]["dataset"]["max_seq_length"] == 10
    assert loaded["libraries"]["recbole"] == "1.2.1"


def test_library_versions_names_everything() -> None:
    versions = library_versions()
    assert {"python", "recflow", "torch", "numpy", "polars", "onnxruntime", "prefect"} <= set(versions)
    assert versions["recflow"] != "not installed"
