"""The nightly case end to end: a champion exists, new rows arrive, and the flow re-scores the
champion's ONNX model on tonight's split; the gate compares the candidate with those figures,
not with the champion's stored ones (measured on last night's data)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from recflow_testdata import DATA_FILE, Interaction, tiny_config, write_csv

from core.config import PipelineConfig
from core.records import PipelineResult
from core.release.registry import Registry

pytestmark = pytest.mark.slow

REGISTRY_NAME = "interactions-sasrec"
# Seeded CPU training on fixed data: tonight's model (more data) beats the re-scored champion.
EXPECTED_TONIGHT = "promoted"


@dataclass
class Nightly:
    config: PipelineConfig
    registry: Registry
    last_night: PipelineResult
    tonight: PipelineResult


def _older_rows(rows: list[Interaction], keep_out: int) -> list[Interaction]:
    """Every user's interactions but their last ``keep_out``: what existed last night."""
    by_user: dict[str, list[Interaction]] = {}
    for r in rows:
        by_user.setdefault(r.user, []).append(r)
    newest = {u: sorted(t.instant for t in rs)[-keep_out] for u, rs in by_user.items()}
    return [r for r in rows if r.instant < newest[r.user]]


@pytest.fixture(scope="module")
def nightly(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory, tiny_rows: list[Interaction]) -> Nightly:
    from flows.training_pipeline import training_pipeline

    root = tmp_path_factory.mktemp("nightly")
    data = root / "data" / DATA_FILE  # one path, rewritten each night: the same registry entry
    config = tiny_config(root, write_csv(_older_rows(tiny_rows, 3), data))
    assert config.registry_name == REGISTRY_NAME
    last_night = training_pipeline(config)
    write_csv(tiny_rows, data)  # tonight: every user has three new interactions
    tonight = training_pipeline(config)
    return Nightly(config, Registry(config.registry.path), last_night, tonight)


def _tonights_split_rescored(nightly: Nightly, scratch: Path) -> dict[str, float]:
    """The champion's ONNX model evaluated directly on tonight's split, outside the flow."""
    from core.data.extract import extract
    from core.modeling.champion_rescore import rescore_champion
    from core.modeling.dataset import build_dataset, load_recbole_data

    scratch.mkdir(parents=True)
    snapshot = extract(nightly.config, scratch)  # tonight's file, read again: the run's own snapshot
    card = json.loads((Path(nightly.tonight.run_dir) / "export" / "model_card.json").read_text())  # type: ignore[arg-type]
    assert snapshot.fingerprint == card["data"]["fingerprint"]
    splits = build_dataset(snapshot, nightly.config, scratch)
    (scratch / "checkpoints").mkdir()
    data = load_recbole_data(nightly.config, splits, scratch / "checkpoints")
    champion_dir = nightly.registry.entry(REGISTRY_NAME) / str(nightly.last_night.model_version)
    return rescore_champion(data, champion_dir, scratch / "checkpoints" / "champion.pth")


def test_last_night_made_a_champion(nightly: Nightly) -> None:
    assert nightly.last_night.status == "promoted"
    assert nightly.last_night.champion == nightly.last_night.model_version


def test_tonight_the_champion_is_rescored_on_tonights_split(nightly: Nightly, tmp_path: Path) -> None:
    last, now = nightly.last_night, nightly.tonight
    stored = last.metrics["test"]  # the champion's figures on last night's split
    metrics = json.loads((Path(now.run_dir) / "metrics.json").read_text())  # type: ignore[arg-type]
    rescored = metrics["champion"]
    assert rescored is not None and set(rescored) == set(stored)
    # What the flow re-scored is what the champion scores on tonight's split, evaluated directly.
    direct = _tonights_split_rescored(nightly, tmp_path / "direct")
    assert rescored == pytest.approx(direct, abs=1e-6)
    # ... and not last night's stored figures: the test targets moved three interactions on.
    assert rescored["ndcg@10"] != stored["ndcg@10"]

    gate = now.gate
    assert gate is not None and gate.champion_version == last.model_version
    assert gate.champion == rescored["ndcg@10"]  # the bar is the re-scored champion
    assert any(f"champion {last.model_version} was trained on other data: re-scored" in r for r in gate.reasons)
    assert gate.candidate == now.metrics["test"]["ndcg@10"]
    beats = gate.candidate > gate.champion and gate.candidate > gate.baseline
    assert gate.promote is beats
    card = json.loads((nightly.registry.entry(REGISTRY_NAME) / str(now.model_version)
                       / "model_card.json").read_text())
    assert card["data"]["rows"] == last_rows_plus_new(nightly)


def last_rows_plus_new(nightly: Nightly) -> int:
    last_card = json.loads((nightly.registry.entry(REGISTRY_NAME) / str(nightly.last_night.model_version)
                            / "model_card.json").read_text())
    return int(last_card["data"]["rows"]) + 3 * int(last_card["data"]["users"])


def test_tonights_outcome_is_pinned(nightly: Nightly) -> None:
    """Seeded CPU training on fixed data: one outcome is right, and the champion pointer follows it."""
    now = nightly.tonight
    assert now.status == EXPECTED_TONIGHT
    expected_champion = now.model_version if EXPECTED_TONIGHT == "promoted" else nightly.last_night.model_version
    assert nightly.registry.champion_version(REGISTRY_NAME) == expected_champion == now.champion


