"""Search spaces: the shipped ones load, mistakes are one clear error naming the key, samples are valid configs."""

from __future__ import annotations

import tomllib
from pathlib import Path

import optuna
import pytest

from core.config import load_config
from core.errors import ConfigError
from core.experiments.space import apply_overrides, check_space, load_space, sample, space_names

ROOT = Path(__file__).resolve().parents[3]


def _space(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(body)
    return path


@pytest.mark.parametrize(("preset", "space"), [("ml-100k-sasrec", "sasrec"), ("ml-100k-bpr", "bpr")])
def test_shipped_spaces_load_and_fit_their_presets(preset: str, space: str) -> None:
    loaded = load_space(space)
    check_space(loaded, load_config(preset))
    assert loaded.model and loaded.model.lower() == load_config(preset).model.name.lower()


def test_sasrec_space_is_what_the_docs_say() -> None:
    params = load_space("sasrec").params
    lr = params["training.learning_rate"]
    assert (lr.type, lr.low, lr.high, lr.log) == ("float", 3e-4, 3e-3, True)
    assert params["model.params.hidden_size"].choices == [32, 64, 128]
    n_layers = params["model.params.n_layers"]
    assert (n_layers.type, n_layers.low, n_layers.high) == ("int", 1, 3)
    for key in ("hidden_dropout_prob", "attn_dropout_prob"):
        p = params[f"model.params.{key}"]
        assert (p.type, p.low, p.high) == ("float", 0.1, 0.5)
    assert params["training.window_stride"].type == "categorical"


def test_a_space_by_name_path_or_file_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # names resolve from the package, from any directory
    by_name = load_space("sasrec")
    assert load_space("sasrec.yaml") == by_name == load_space("configs/spaces/sasrec.yaml")
    assert load_space(ROOT / "configs" / "spaces" / "sasrec.yaml") == by_name
    assert {"sasrec", "bpr"} <= set(space_names())


def test_an_unknown_space_lists_the_shipped_ones() -> None:
    with pytest.raises(ConfigError, match=r"search space not found: nope .*bpr, sasrec"):
        load_space("nope")


def test_spaces_ship_as_package_data() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "spaces/*.yaml" in data["tool"]["setuptools"]["package-data"]["configs"]
    assert any(dep.startswith("optuna") for dep in data["project"]["dependencies"])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("params:\n  training.learnin_rate: {type: float, low: 0.001, high: 0.01}\n",
         r"unknown config path training\.learnin_rate \(training has no key 'learnin_rate'"),
        ("params:\n  trainig.epochs: {type: int, low: 1, high: 3}\n",
         r"trainig\.epochs cannot be searched"),
        ("params:\n  source.path: {type: categorical, choices: [a.csv, b.csv]}\n",
         r"source\.path cannot be searched: trials share the study's data"),
        ("params:\n  training: {type: int, low: 1, high: 3}\n", r"cannot be searched"),
        ("params:\n  model.params: {type: categorical, choices: [1]}\n", r"model\.params is a section; name one of its keys"),
        ("params:\n  training.max_minutes: {type: float, low: 1, high: 3}\n", r"set by the study.*--trial-minutes"),
        ("params:\n  training.learning_rate: {type: float, low: 0.01, high: 0.001}\n",
         r"training\.learning_rate: low \(0\.01\) must be below high \(0\.001\)"),
        ("params:\n  training.learning_rate: {type: float, low: 0, high: 0.1, log: true}\n",
         r"training\.learning_rate: log needs low > 0"),
        ("params:\n  training.learning_rate: {type: uniform, low: 0.001, high: 0.1}\n",
         r"training\.learning_rate: type must be float, int or categorical"),
        ("params:\n  training.learning_rate: {low: 0.001, high: 0.1}\n", r"training\.learning_rate: needs a type"),
        ("params:\n  training.loss: {type: categorical, choices: []}\n", r"training\.loss\.choices"),
        ("params:\n  training.learning_rate: {type: float, low: 0.001, hi: 0.1}\n", r"training\.learning_rate\.hi"),
        ("params: {}\n", r"params: .*at least 1"),
        ("- a\n- b\n", r"must hold a mapping"),
        ("params: [\n", r"not valid YAML"),
    ],
)
def test_a_bad_space_is_one_error_naming_the_key(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_space(_space(tmp_path, body))
    assert "\n" not in str(info.value).strip() or "YAML" in str(info.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        # A value the config refuses, found before any trial runs.
        ("params:\n  training.loss: {type: categorical, choices: [ce, focal]}\n",
         r"training\.loss='focal'.*training\.loss: Input should be"),
        ("params:\n  training.negatives: {type: float, low: 1, high: 5}\n", r"training\.negatives"),
        ("params:\n  training.learning_rate: {type: float, low: -1, high: 0.1}\n", r"training\.learning_rate"),
        # A RecBole key the model does not have.
        ("params:\n  model.params.hiden_size: {type: categorical, choices: [32, 64]}\n",
         r"model\.params\.hiden_size: SASRec has no hyper-parameter 'hiden_size' \(its keys: .*hidden_size"),
        ("model: BPR\nparams:\n  training.learning_rate: {type: float, low: 0.001, high: 0.01}\n",
         r"is written for BPR, but the config trains SASRec"),
    ],
)
def test_a_space_is_checked_against_the_config(tmp_path: Path, body: str, message: str) -> None:
    space = load_space(_space(tmp_path, body))
    with pytest.raises(ConfigError, match=message):
        check_space(space, load_config("ml-100k-sasrec"))


def test_samples_are_overrides_load_config_accepts() -> None:
    space = load_space("sasrec")
    base = load_config("ml-100k-sasrec")
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    for _ in range(6):
        trial = study.ask()
        overrides = sample(trial, space)
        assert set(overrides) == set(space.params) == set(trial.params)
        assert 3e-4 <= overrides["training.learning_rate"] <= 3e-3
        assert overrides["model.params.hidden_size"] in (32, 64, 128)
        assert overrides["model.params.n_layers"] in (1, 2, 3)
        config = load_config("ml-100k-sasrec", overrides)  # the CLI's own path for dotted overrides
        assert config.training.learning_rate == overrides["training.learning_rate"]
        assert config.model.params["hidden_size"] == overrides["model.params.hidden_size"]
        assert config.training.window_stride == overrides["training.window_stride"]
        assert apply_overrides(base, overrides) == config
        study.tell(trial, 0.1)


def test_apply_overrides_keeps_a_sampled_none(tmp_path: Path) -> None:
    # A categorical None is a value ("no budget"), where load_config's flags treat None as "not given".
    base = load_config(overrides={"training.max_minutes": 5})
    assert apply_overrides(base, {"training.max_minutes": None}).training.max_minutes is None
    with pytest.raises(ConfigError, match=r"training\.epochs"):
        apply_overrides(base, {"training.epochs": 0})
