"""Shared fixtures. Data helpers live in ``recflow_testdata``.

Expensive artifacts (one trained tiny SASRec) are session-scoped and shared by the
training, evaluation and export tests.
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

import pytest  # noqa: E402
from recflow_testdata import DATA_FILE, Interaction, TinyRun, make_interactions, tiny_config, write_csv  # noqa: E402

from core.records import EpochStats  # noqa: E402


@pytest.fixture(scope="session")
def tiny_rows() -> list[Interaction]:
    return make_interactions()


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory: pytest.TempPathFactory, tiny_rows: list[Interaction]) -> Path:
    return write_csv(tiny_rows, tmp_path_factory.mktemp("data") / DATA_FILE)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_csv: Path) -> TinyRun:
    """One tiny SASRec trained on the tiny CSV (about 2 s), shared by many tests."""
    from core.modeling.dataset import build_recbole_data
    from core.data.extract import extract
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
