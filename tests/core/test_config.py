"""The typed configuration tree: defaults, YAML presets, dotted overrides and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import PipelineConfig, dump_config, load_config
from core.errors import ConfigError


def test_defaults_are_sasrec_on_ml100k() -> None:
    cfg = load_config()
    assert cfg.source.kind == "ml-100k"
    assert cfg.model.name == "SASRec"
    assert cfg.training.device == "auto"
    assert cfg.evaluation.gate_metric == "NDCG@10"
    assert cfg.data_name == "ml-100k"
    assert cfg.registry_name == "ml-100k-sasrec"


def test_dotted_overrides_nest_and_none_is_ignored() -> None:
    cfg = load_config(
        overrides={
            "training.epochs": 7,
            "model.params": {"hidden_size": 16},
            "columns.user": None,  # an unset CLI flag: keeps the default
            "evaluation.min_improvement": 0.01,
        }
    )
    assert cfg.training.epochs == 7
    assert cfg.model.params == {"hidden_size": 16}
    assert cfg.columns.user == "user_id"
    assert cfg.evaluation.min_improvement == 0.01
    # untouched siblings keep their defaults
    defaults = load_config()
    assert cfg.training.train_batch_size == defaults.training.train_batch_size
    assert cfg.training.learning_rate == defaults.training.learning_rate


def test_yaml_then_overrides_deep_merge(tmp_path: Path) -> None:
    path = tmp_path / "preset.yaml"
    path.write_text("training:\n  epochs: 4\n  learning_rate: 0.01\nmodel:\n  name: BPR\n")
    cfg = load_config(path, {"training.epochs": 9})
    assert cfg.training.epochs == 9  # flag wins
    assert cfg.training.learning_rate == 0.01  # YAML sibling survives the merge
    assert cfg.model.name == "BPR"


def test_file_source_and_registry_name(tmp_path: Path) -> None:
    cfg = load_config(overrides={"source.kind": "file", "source.path": "data/My_Clicks.csv", "model.name": "GRU4Rec"})
    assert cfg.source.path == Path("data/My_Clicks.csv")  # relative path kept as written
    assert cfg.data_name == "My_Clicks"
    assert cfg.registry_name == "my-clicks-gru4rec"
    named = load_config(overrides={"registry.model_name": "prod-recs"})
    assert named.registry_name == "prod-recs"


def test_dump_then_load_round_trips(tmp_path: Path) -> None:
    cfg = load_config(
        overrides={
            "source.kind": "file",
            "source.path": str(tmp_path / "x.csv"),
            "columns.rating": "stars",
            "dataset.split": "ratio",
            "dataset.ratios": [0.7, 0.2, 0.1],
            "model.params": {"hidden_size": 8},
        }
    )
    out = tmp_path / "config.yaml"
    dump_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert isinstance(again, PipelineConfig)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"training.epochz": 3}, "epochz"),  # typo in a key fails loudly
        ({"source.kind": "file"}, "source.path"),
        ({"source.kind": "s3"}, "source.kind"),
        ({"training.epochs": 0}, "training.epochs"),
        ({"training.device": "tpu"}, "training.device"),
        ({"dataset.ratios": [0.5, 0.3, 0.3]}, "summing to 1"),
        ({"dataset.ratios": [1.0, 0.0, 0.0]}, "dataset.ratios"),
        ({"evaluation.metrics": ["NDCG", "AUC"]}, "AUC"),
        ({"evaluation.gate_metric": "NDCG@7"}, "gate_metric"),
        ({"evaluation.valid_metric": "MAP@10"}, "valid_metric"),
        ({"evaluation.gate_metric": "NDCG10"}, "gate_metric"),
        ({"evaluation.min_improvement": -0.1}, "min_improvement"),
        ({"dataset.min_user_interactions": 2}, "min_user_interactions"),
    ],
)
def test_invalid_values_raise_config_error_naming_the_field(overrides: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    message = str(info.value)
    assert needle in message
    assert message.startswith("invalid configuration (defaults + command-line flags)")
    assert "\n" not in message  # one line for the CLI


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("training: [epochs: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_yaml_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(path)


def test_empty_yaml_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == load_config()


def test_unknown_yaml_key_names_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("registry:\n  pathh: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "registry.pathh" in str(info.value)
