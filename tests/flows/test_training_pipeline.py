"""The Prefect flow end to end on tiny data: promote, compare with the champion, fail cleanly."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from recflow_testdata import DATA_FILE, Interaction, tiny_config, write_csv

from core.config import PipelineConfig
from core.errors import PipelineFailed
from core.records import PipelineResult
from core.release.registry import CHAMPION, Registry
from core.serving.scorer import OnnxScorer
from flows.training_pipeline import training_pipeline

REGISTRY_NAME = "interactions-sasrec"  # <data file stem>-<model>
VERSION_FILES = {"model.onnx", "signature.json", "item_ids.json", "user_ids.json", "metrics.json", "config.yaml",
                 "best.pth", "model_card.json", "checksums.json", "data_profile.json"}


@dataclass
class FlowEnv:
    root: Path
    config: PipelineConfig
    registry: Registry


@pytest.fixture(scope="module")
def env(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory, tiny_rows: list[Interaction]) -> FlowEnv:
    root = tmp_path_factory.mktemp("flow")
    config = tiny_config(root, write_csv(tiny_rows, root / "good" / DATA_FILE))
    assert config.registry_name == REGISTRY_NAME
    return FlowEnv(root, config, Registry(config.registry.path))


@pytest.fixture(scope="module")
def first(env: FlowEnv) -> PipelineResult:
    return training_pipeline(env.config)


@pytest.fixture(scope="module")
def second(env: FlowEnv, first: PipelineResult) -> PipelineResult:
    return training_pipeline(env.config)


def _champion_target(env: FlowEnv) -> str:
    return os.readlink(env.registry.entry(REGISTRY_NAME) / CHAMPION)


def test_first_run_is_promoted(env: FlowEnv, first: PipelineResult) -> None:
    assert first.status == "promoted"
    assert (first.stage, first.error) == ("register", None)
    assert first.gate is not None and first.gate.promote is True
    assert first.gate.champion is None and first.gate.champion_version is None
    assert set(first.metrics) == {"test", "valid", "baseline", "test_seen_masked"}
    assert first.metrics["test"]["ndcg@10"] > first.metrics["baseline"]["ndcg@10"]
    assert first.model_version is not None
    assert first.champion == first.model_version
    assert first.registry == env.config.registry.path.resolve()
    assert env.registry.champion_version(REGISTRY_NAME) == first.model_version
    assert _champion_target(env) == first.model_version


def test_run_folder_holds_every_step(first: PipelineResult, env: FlowEnv) -> None:
    run_dir = first.run_dir
    assert run_dir is not None and run_dir.parent == env.config.runs_dir.resolve()
    for rel in ("config.yaml", "snapshot.parquet", "validation_report.json", "recbole/interactions/interactions.inter",
                "checkpoints/best.pth", "metrics.json", "export/model.onnx", "export/model_card.json"):
        assert (run_dir / rel).is_file(), rel


def test_registered_version_is_complete_and_servable(env: FlowEnv, first: PipelineResult) -> None:
    version_dir = env.registry.entry(REGISTRY_NAME) / CHAMPION
    assert {p.name for p in version_dir.iterdir()} == VERSION_FILES
    card = env.registry.champion_card(REGISTRY_NAME)
    assert card is not None
    assert card["version"] == first.model_version
    assert card["model"] == "SASRec" and card["registry_name"] == REGISTRY_NAME
    assert card["data"]["rows"] == len(Path(env.config.source.path).read_text().splitlines()) - 1
    assert card["data"]["users"] == 80
    assert card["data"]["eval_protocol"] == "loo|min_user=5|min_item=1"
    assert card["metrics"]["test"] == first.metrics["test"]
    assert card["gate"]["promote"] is True
    assert card["export"]["exported"] is True and card["export"]["parity"]["max_abs_diff"] <= 1e-4
    assert card["training"]["epochs_run"] == 2
    assert card["config"]["training"]["epochs"] == 2
    recs = OnnxScorer(version_dir).recommend(["i1", "i2", "i3"], k=5)
    assert len(recs) == 5 and all(r.item.startswith("i") for r in recs)


def test_second_identical_run_is_compared_with_the_champion(
    env: FlowEnv, first: PipelineResult, second: PipelineResult
) -> None:
    assert second.gate is not None
    assert second.gate.champion_version == first.model_version
    assert second.gate.champion == first.metrics["test"]["ndcg@10"]
    # Same data, same seed: the same model, which does not beat itself.
    assert second.metrics["test"] == first.metrics["test"]
    assert second.status == "rejected"
    assert second.model_version != first.model_version
    assert second.champion == first.model_version
    assert env.registry.versions(REGISTRY_NAME) == sorted([first.model_version, second.model_version])
    assert _champion_target(env) == first.model_version


def test_broken_csv_fails_at_validate_and_keeps_the_champion(
    env: FlowEnv, second: PipelineResult, first: PipelineResult
) -> None:
    before = _champion_target(env)
    versions = env.registry.versions(REGISTRY_NAME)
    broken = env.root / "broken" / DATA_FILE  # same stem: the same registry entry
    broken.parent.mkdir()
    lines = ["user_id,item_id,timestamp"]
    lines += [f"u{u},i{k},2023-01-0{1 + k % 9}T10:00:00Z" for u in range(6) for k in range(8)]
    lines += [",i1,2023-01-01T00:00:00Z", ",i2,2023-01-02T00:00:00Z", "u1,i3,yesterday", "u2,i4,31/02/2023"]
    broken.write_text("\n".join(lines) + "\n")
    config = env.config.model_copy(update={"source": env.config.source.model_copy(update={"path": broken})})
    with pytest.raises(PipelineFailed) as info:
        training_pipeline(config)
    failed = info.value
    assert failed.stage == "validate"
    assert "data validation failed" in failed.error
    assert "expect_column_values_to_not_be_null(user_id): 2 of 52" in failed.error
    assert "expect_column_values_to_not_be_null(timestamp): 2 of 52" in failed.error
    assert failed.run_dir is not None and (Path(failed.run_dir) / "validation_report.json").is_file()
    assert _champion_target(env) == before == first.model_version
    assert env.registry.versions(REGISTRY_NAME) == versions


def test_missing_file_fails_at_extract(env: FlowEnv, first: PipelineResult) -> None:
    config = env.config.model_copy(
        update={"source": env.config.source.model_copy(update={"path": env.root / "nope" / DATA_FILE})}
    )
    with pytest.raises(PipelineFailed) as info:
        training_pipeline(config)
    assert info.value.stage == "extract"
    assert info.value.error.startswith("data file not found")
    assert _champion_target(env) == first.model_version
