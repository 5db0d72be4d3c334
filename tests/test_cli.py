"""``recflow run`` as a real subprocess: exit codes, --summary-json, one-line errors, no tracebacks.

Each run that reaches the flow starts Prefect's ephemeral server (~10 s), so there are five
of those; the rest of the CLI's behaviour is covered in-process by the flow tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from recflow_testdata import TINY_YAML, Interaction, write_csv

from core.release.registry import CHAMPION, Registry

REPO = Path(__file__).resolve().parent.parent
DATA_NAME = "answers.csv"
REGISTRY_NAME = "answers-sasrec"
COLUMN_FLAGS = ["--user-col", "learner", "--item-col", "question_id", "--time-col", "created_at"]
SUMMARY_KEYS = {"status", "stage", "error", "metrics", "model_version", "registry"}


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str
    summary: dict[str, Any]

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, tiny_rows: list[Interaction]) -> Path:
    root = tmp_path_factory.mktemp("cli")
    (root / "tiny.yaml").write_text(TINY_YAML)
    write_csv(tiny_rows, root / "good" / DATA_NAME, user_col="learner", item_col="question_id", time_col="created_at")
    (root / "prefect-home").mkdir()
    return root


def run_cli(workdir: Path, *args: str, summary: str = "summary.json") -> CliResult:
    env = {
        **os.environ,
        "RECFLOW_NO_REEXEC": "1",
        "PREFECT_HOME": str(workdir / "prefect-home"),  # shared: the DB is migrated once
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": os.environ.get(
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"
        ),
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    summary_path = workdir / summary
    summary_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "cli", "run", "--config", "tiny.yaml", "--device", "cpu",
           "--registry", "registry", "--runs-dir", "runs", "--summary-json", summary, *args]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=400)
    assert summary_path.is_file(), f"no --summary-json written\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return CliResult(proc.returncode, proc.stdout, proc.stderr, json.loads(summary_path.read_text()))


def assert_user_error(result: CliResult, stage: str, needle: str) -> None:
    context = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.code != 0, context
    assert len(result.error_lines) == 1, context
    assert needle in result.error_lines[0], context
    assert "Traceback" not in result.stdout + result.stderr, context
    s = result.summary
    assert SUMMARY_KEYS <= set(s)
    assert (s["status"], s["stage"], s["metrics"], s["model_version"]) == ("failed", stage, {}, None)
    assert needle in s["error"]


@pytest.fixture(scope="module")
def trained(workdir: Path) -> CliResult:
    """A CSV with its own column names, trained through the flags."""
    return run_cli(workdir, "--data", f"good/{DATA_NAME}", *COLUMN_FLAGS, "--epochs", "2")


def test_renamed_columns_train_and_summary_contract(trained: CliResult, workdir: Path) -> None:
    context = f"stdout:\n{trained.stdout}\nstderr:\n{trained.stderr}"
    assert trained.code == 0, context
    assert "Traceback" not in trained.stdout + trained.stderr
    s = trained.summary
    assert SUMMARY_KEYS <= set(s)
    assert s["status"] == "promoted"  # first run, beats Pop
    assert (s["stage"], s["error"]) == ("deploy", None)  # the register step, under its documented summary name
    # A sequential model: also scored with seen items masked (as EASE/BPR are, and as serving answers).
    assert set(s["metrics"]) == {"test", "baseline", "test_seen_masked"}
    assert 0 < s["metrics"]["baseline"]["ndcg@10"] < s["metrics"]["test"]["ndcg@10"] <= 1
    assert len(s["metrics"]["test"]) == len(s["metrics"]["test_seen_masked"]) == 15
    assert s["registry"] == str((workdir / "registry").resolve())  # relative flag, absolute summary
    registry = Registry(workdir / "registry")
    assert registry.champion_version(REGISTRY_NAME) == s["model_version"]
    assert (registry.entry(REGISTRY_NAME) / s["model_version"] / "model.onnx").is_file()
    card = registry.champion_card(REGISTRY_NAME)
    assert card is not None and card["data"]["users"] == 80
    assert card["config"]["columns"] == {"user": "learner", "item": "question_id", "time": "created_at",
                                         "rating": None, "extra": []}
    assert card["config"]["model"]["params"]["hidden_size"] == 16  # from --config
    assert "PROMOTED" in trained.stdout and "seen masked" in trained.stdout
    assert card["training"]["objective"] == "all_positions" and card["training"]["stop_reason"] == "epoch cap"
    assert card["metrics"]["test_seen_masked"] == s["metrics"]["test_seen_masked"]


def test_broken_csv_stops_at_validate_and_keeps_the_champion(trained: CliResult, workdir: Path) -> None:
    champion_before = os.readlink(workdir / "registry" / REGISTRY_NAME / CHAMPION)
    assert champion_before == trained.summary["model_version"]
    broken = workdir / "broken" / DATA_NAME  # same stem: same registry entry
    broken.parent.mkdir()
    lines = ["learner,question_id,created_at"]
    lines += [f"s{u},q{k},2023-01-{10 + k}T10:00:00+01:00" for u in range(6) for k in range(8)]
    lines += [",q1,2023-01-01T00:00:00Z", "s1,q3,not-a-time"]
    broken.write_text("\n".join(lines) + "\n")
    result = run_cli(workdir, "--data", f"broken/{DATA_NAME}", *COLUMN_FLAGS, summary="broken.json")
    assert_user_error(result, "validate", "data validation failed")
    assert "user_id" in result.summary["error"] and "timestamp" in result.summary["error"]
    assert os.readlink(workdir / "registry" / REGISTRY_NAME / CHAMPION) == champion_before
    assert Registry(workdir / "registry").versions(REGISTRY_NAME) == [champion_before]


def test_missing_file(workdir: Path) -> None:
    result = run_cli(workdir, "--data", "nope/missing.csv", summary="missing.json")
    assert_user_error(result, "extract", "data file not found: nope/missing.csv")


def test_unknown_column_is_named(workdir: Path) -> None:
    result = run_cli(workdir, "--data", f"good/{DATA_NAME}", "--user-col", "student", "--item-col", "question_id",
                     "--time-col", "created_at", summary="column.json")
    assert_user_error(result, "extract", "--user-col 'student'")
    assert "learner" in result.error_lines[0]  # and says which columns exist


def test_unreadable_file(workdir: Path) -> None:
    blob = workdir / "blob.csv"
    blob.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + os.urandom(2048))
    result = run_cli(workdir, "--data", "blob.csv", summary="blob.json")
    assert_user_error(result, "extract", "neither CSV nor Parquet")


def test_unknown_model_fails_before_the_flow(workdir: Path) -> None:
    result = run_cli(workdir, "--data", f"good/{DATA_NAME}", *COLUMN_FLAGS, "--model", "NotAModel",
                     summary="model.json")
    assert_user_error(result, "config", "unknown model 'NotAModel'")
    assert result.code == 2
    assert "Starting temporary server" not in result.stderr  # failed fast, no Prefect


def test_a_bad_training_objective_is_one_config_error(workdir: Path) -> None:
    result = run_cli(workdir, "--data", f"good/{DATA_NAME}", *COLUMN_FLAGS, "--objective", "every_item",
                     "--loss", "ce", "--max-minutes", "2", summary="objective.json")
    assert_user_error(result, "config", "training.objective: Input should be 'all_positions' or 'last_item'")
    assert result.code == 2


def test_cli_reexecs_with_the_same_malloc_tunables_as_deployments() -> None:
    # cli.py keeps its own copy so that `recflow` can re-exec before importing torch.
    import cli
    from core.modeling.devices import MALLOC_TUNABLES

    assert cli._MALLOC_TUNABLES == MALLOC_TUNABLES


def test_config_takes_a_preset_name_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.config import load_config, preset_names

    monkeypatch.chdir(tmp_path)  # no configs/ here: the presets come from the package data
    assert {"ml-100k-sasrec", "ml-100k-ease", "question-attempts"} <= set(preset_names())
    for name in ("ml-100k-ease", "ml-100k-ease.yaml", "configs/ml-100k-ease.yaml"):
        assert load_config(name).model.name == "EASE", name
    (tmp_path / "ml-100k-ease.yaml").write_text("model: {name: BPR}\n")
    assert load_config("ml-100k-ease.yaml").model.name == "BPR"  # a file of that name wins


def test_an_unknown_preset_is_one_line_listing_the_presets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", "--config", "ml-100k-nope"])
    assert result.exit_code == 2, result.output
    assert "error: config file not found: ml-100k-nope" in result.output
    assert "ml-100k-ease" in result.output and "question-attempts" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
