"""Shared fixtures. Data helpers live in ``recflow_testdata``.

Expensive artifacts (one trained tiny SASRec) are session-scoped and shared by the
training, evaluation and export tests.

Markers (registered in pyproject.toml): ``slow`` = trains a model or starts a service;
``services`` = starts a real service (PostgreSQL, sshd, a Prefect server). ``pytest -m "not slow"``
is the inner loop (no training, no services); plain ``pytest`` runs everything. Tests are marked
here by the fixtures they use (so a session fixture that trains is only ever used by slow
tests), by module (``SLOW_MODULES``: modules that train in most of their tests) or in the module itself.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Keep Prefect (imported by the flow tests) off ~/.prefect and off the network. Must happen
# before anything imports prefect.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="recflow-test-prefect-"))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

import pytest
from recflow_testdata import DATA_FILE, Interaction, TinyRun, make_interactions, tiny_config, write_csv

from core.records import EpochStats

# Fixtures that start a service (PostgreSQL, sshd, a Prefect server and worker).
SERVICE_FIXTURES = frozenset({"prefect_harness", "pg_cluster", "sshd", "ship_settings", "stack"})
# Fixtures that train a model (or load MovieLens-100k through RecBole).
TRAINING_FIXTURES = frozenset({"tiny_run", "user_export", "rating_run", "ml100k_snapshot"})
# Modules owned elsewhere that train (or start fresh interpreters importing torch) nearly
# throughout, and single slow tests in otherwise fast modules (measured with --durations).
SLOW_MODULES = frozenset({
    "tests/core/modeling/test_training.py",
    "tests/core/modeling/test_training_resilience.py",
    "tests/core/modeling/test_batch_finder.py",
    "tests/core/modeling/test_imports.py",
    "tests/core/modeling/test_champion_rescore.py",
})
SLOW_TESTS = frozenset({
    "tests/core/modeling/test_dataset_fastload.py::test_ml100k_sasrec_identical_splits",
    "tests/core/modeling/test_dataset_fastload.py::test_ml100k_bpr_identical_splits_loaders_and_metrics",
    "tests/core/modeling/test_seq_objectives.py::test_sampled_losses_train",
    "tests/core/modeling/test_export.py::test_general_model_export_and_scorer",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(str(config.rootpath))
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        rel = Path(str(item.path)).resolve().relative_to(root).as_posix()
        name = getattr(item, "originalname", item.name)
        if fixtures & SERVICE_FIXTURES:
            item.add_marker(pytest.mark.services)
        if fixtures & (SERVICE_FIXTURES | TRAINING_FIXTURES) or rel in SLOW_MODULES or f"{rel}::{name}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_rows() -> list[Interaction]:
    return make_interactions()


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory: pytest.TempPathFactory, tiny_rows: list[Interaction]) -> Path:
    return write_csv(tiny_rows, tmp_path_factory.mktemp("data") / DATA_FILE)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_csv: Path) -> TinyRun:
    """One tiny SASRec trained on the tiny CSV (about 2 s), shared by many tests."""
    from core.data.extract import extract
    from core.modeling.dataset import build_recbole_data
    from core.modeling.training import train

    root = tmp_path_factory.mktemp("tiny-run")
    config = tiny_config(root, tiny_csv)
    run_dir = root / "run"
    run_dir.mkdir()
    snapshot = extract(config, run_dir)
    splits, data = build_recbole_data(snapshot, config, run_dir)  # as the flow does: one build, handed on
    seen: list[EpochStats] = []
    trained = train(config, splits, run_dir, on_epoch=seen.append, data=data)
    return TinyRun(config, run_dir, snapshot, splits, trained, seen)
