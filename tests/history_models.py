"""Tiny EASE, item-based ItemKNN and FM runs, trained and exported once per test process.

Shared by the export tests (tests/core/modeling/test_export_history.py) and the serving tests
(tests/core/serving/test_serving_history.py); each build takes a few seconds on the tiny data
(``recflow_testdata``: 80 users x 40 items; FM on its 1-5 rating column).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recflow_testdata import make_interactions, tiny_config, write_csv, write_rating_csv

from core.config import PipelineConfig
from core.modeling.dataset import RecBoleData
from core.records import DatasetSplits, ExportedModel, TrainedModel

# Per model: the config overrides of its tiny run.
OVERRIDES: dict[str, dict[str, Any]] = {
    "EASE": {"model.name": "EASE", "model.params": {"reg_weight": 10.0}, "training.epochs": 1},
    "ItemKNN": {"model.name": "ItemKNN", "model.params": {"k": 10, "shrink": 0.0}, "training.epochs": 1},
    "FM": {"model.name": "FM", "model.params": {"embedding_size": 8}, "columns.rating": "rating",
           "evaluation.task": "rating", "dataset.split": "ratio", "training.epochs": 1,
           "training.learning_rate": 0.01},
}


@dataclass
class ExportedRun:
    """One tiny trained model, its RecBole data and its export folder (``run_dir/export``)."""

    config: PipelineConfig
    run_dir: Path
    splits: DatasetSplits
    trained: TrainedModel
    data: RecBoleData
    record: ExportedModel
    section: dict[str, Any]

    @property
    def export_dir(self) -> Path:
        return self.run_dir / "export"


_RUNS: dict[tuple[str, str], ExportedRun] = {}


def train_and_export(model: str, overrides: dict[str, Any] | None = None) -> ExportedRun:
    """The tiny ``model`` run, trained and exported (cached per model and overrides for this process)."""
    from core.data.extract import extract
    from core.modeling.dataset import build_recbole_data
    from core.modeling.export import export_model
    from core.modeling.training import train

    key = (model, repr(sorted((overrides or {}).items())))
    if key in _RUNS:
        return _RUNS[key]
    root = Path(tempfile.mkdtemp(prefix=f"recflow-test-{model.lower()}-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    rows = make_interactions()
    csv = write_rating_csv(rows, root / "ratings.csv") if model == "FM" else write_csv(rows, root / "data.csv")
    config = tiny_config(root, csv, OVERRIDES[model] | (overrides or {}))
    run_dir = root / "run"
    run_dir.mkdir()
    splits, data = build_recbole_data(extract(config, run_dir), config, run_dir)
    trained = train(config, splits, run_dir, data=data)
    record, section = export_model(config, splits, trained, run_dir, data=data)
    _RUNS[key] = ExportedRun(config, run_dir, splits, trained, data, record, section)
    return _RUNS[key]
