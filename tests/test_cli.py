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
    assert set(s) >= SUMMARY_KEYS
    assert (s["status"], s["stage"], s["metrics"], s["model_version"]) == ("failed", stage, {}, None)
    assert needle in s["error"]


@pytest.fixture(scope="module")
def trained(workdir: Path) -> CliResult:
    """A CSV with its own column names, trained through the flags."""
    return run_cli(workdir, "--data", f"good/{DATA_NAME}", *COLUMN_FLAGS, "--epochs", "2")


@pytest.mark.slow  # runs `recflow run` in a subprocess: torch, RecBole, Prefect's server
def test_renamed_columns_train_and_summary_contract(trained: CliResult, workdir: Path) -> None:
    context = f"stdout:\n{trained.stdout}\nstderr:\n{trained.stderr}"
    assert trained.code == 0, context
    assert "Traceback" not in trained.stdout + trained.stderr
    s = trained.summary
    assert set(s) >= SUMMARY_KEYS
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


@pytest.mark.slow  # runs `recflow run` in a subprocess: torch, RecBole, Prefect's server
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


@pytest.mark.slow  # runs `recflow run` in a subprocess: torch, RecBole, Prefect's server
def test_missing_file(workdir: Path) -> None:
    result = run_cli(workdir, "--data", "nope/missing.csv", summary="missing.json")
    assert_user_error(result, "extract", "data file not found: nope/missing.csv")


@pytest.mark.slow  # runs `recflow run` in a subprocess: torch, RecBole, Prefect's server
def test_unknown_column_is_named(workdir: Path) -> None:
    result = run_cli(workdir, "--data", f"good/{DATA_NAME}", "--user-col", "student", "--item-col", "question_id",
                     "--time-col", "created_at", summary="column.json")
    assert_user_error(result, "extract", "--user-col 'student'")
    assert "learner" in result.error_lines[0]  # and says which columns exist


@pytest.mark.slow  # runs `recflow run` in a subprocess: torch, RecBole, Prefect's server
def test_unreadable_file(workdir: Path) -> None:
    blob = workdir / "blob.csv"
    blob.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + os.urandom(2048))
    result = run_cli(workdir, "--data", "blob.csv", summary="blob.json")
    assert_user_error(result, "extract", "neither CSV nor Parquet")


@pytest.mark.slow  # runs `recflow run` in a subprocess: torch, RecBole, Prefect's server
def test_unknown_model_fails_before_the_flow(workdir: Path) -> None:
    result = run_cli(workdir, "--data", f"good/{DATA_NAME}", *COLUMN_FLAGS, "--model", "NotAModel",
                     summary="model.json")
    assert_user_error(result, "config", "unknown model 'NotAModel'")
    assert result.code == 2
    assert "Starting temporary server" not in result.stderr  # failed fast, no Prefect


@pytest.mark.slow  # runs `recflow run` in a subprocess: torch, RecBole, Prefect's server
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


def _interpreter_starts(tmp_path: Path, env_update: dict[str, str]) -> list[dict[str, Any]]:
    """Run the installed ``recflow`` script with a sitecustomize that records every interpreter start
    (pid, argv, GLIBC_TUNABLES): an exec keeps the pid and starts a second interpreter."""
    script = Path(sys.executable).parent / "recflow"
    if not script.is_file():
        pytest.skip(f"recflow is not installed next to {sys.executable}")
    hook = tmp_path / "hook"
    hook.mkdir(parents=True)
    log = tmp_path / "starts.jsonl"
    (hook / "sitecustomize.py").write_text(
        "import json, os, sys\n"
        f"with open({str(log)!r}, 'a') as fh:\n"
        "    fh.write(json.dumps({'pid': os.getpid(), 'argv': sys.argv,"
        " 'tunables': os.environ.get('GLIBC_TUNABLES')}) + '\\n')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RECFLOW_NO_REEXEC", "GLIBC_TUNABLES")}
    env |= {"PYTHONPATH": os.pathsep.join([str(hook), str(REPO)]), **env_update}
    proc = subprocess.run([str(script), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "recflow" in proc.stdout, proc.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.skipif(sys.platform != "linux", reason="the re-exec is Linux-only (glibc)")
def test_the_cli_reexecs_itself_once_with_the_malloc_tunables(tmp_path: Path) -> None:
    from core.modeling.devices import MALLOC_TUNABLES

    first, second = _interpreter_starts(tmp_path, {})  # exactly two interpreter starts
    assert first["pid"] == second["pid"]  # execve: the same process, a fresh interpreter
    assert first["tunables"] is None
    assert second["tunables"] == MALLOC_TUNABLES
    assert second["argv"][1:] == first["argv"][1:] == ["--help"]
    assert Path(second["argv"][0]).name == "recflow"
    # The escape hatch and an environment that already has tunables: no re-exec.
    assert [s["tunables"] for s in _interpreter_starts(tmp_path / "off", {"RECFLOW_NO_REEXEC": "1"})] == [None]
    own = "glibc.malloc.arena_max=2"
    assert [s["tunables"] for s in _interpreter_starts(tmp_path / "own", {"GLIBC_TUNABLES": own})] == [own]


@pytest.mark.slow  # runs `recflow run` in a subprocess: torch, RecBole, Prefect's server
def test_question_attempt_columns_in_a_data_file_get_their_rules(workdir: Path) -> None:
    """`--data` with the ed-tech extras (is_correct, response_time_seconds, ...) is validated like the
    question_attempts table: a "maybe" and negative response times stop the run, naming only the bad values."""
    import polars as pl

    from core.data.sources.synthetic import generate_question_attempts

    frame = generate_question_attempts(30, seed=5)
    n = frame.height
    odd = pl.Series([k % 50 == 7 for k in range(n)])  # 2 % of the rows
    frame = frame.with_columns(
        pl.col("created_at").dt.to_string("%Y-%m-%dT%H:%M:%S%.f%:z"),
        pl.when(odd).then(pl.lit("maybe")).otherwise(pl.col("is_correct").cast(pl.String)).alias("is_correct"),
        pl.when(odd).then(pl.lit(-4.0)).otherwise(pl.col("response_time_seconds")).alias("response_time_seconds"),
    )
    bad = workdir / "attempts" / "attempts.csv"
    bad.parent.mkdir()
    frame.write_csv(bad)
    flags = ["--user-col", "user_id", "--item-col", "question_id", "--time-col", "created_at"]
    result = run_cli(workdir, "--data", "attempts/attempts.csv", *flags, summary="attempts.json")
    assert_user_error(result, "validate", "data validation failed")
    error = result.summary["error"]
    count = f"{int(odd.sum())} of {n} values"
    assert f"expect_column_values_to_be_in_set(is_correct): {count}" in error
    assert "e.g. [maybe]" in error
    assert f"expect_column_values_to_be_between(response_time_seconds): {count}" in error
    assert "e.g. [-4.0]" in error
    assert f"{n} of {n} values" not in error
    assert not (workdir / "registry" / "attempts-sasrec").exists()  # nothing trained, nothing registered


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
