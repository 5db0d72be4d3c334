"""`recflow tune`: user mistakes are one `error:` line and exit 2; a real run prints the leaderboard."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from recflow_testdata import TINY_YAML, Interaction, write_csv
from tuning_testdata import TINY_SPACE
from typer.testing import CliRunner

from cli import app
from core.experiments.study import open_study

REPO = Path(__file__).resolve().parent.parent


def _tune(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["tune", "--study", "s", "--trials", "2", "--studies-dir", str(tmp_path / "st"),
                                      *args], env=env)
    return result.exit_code, result.output


def _assert_one_error(code: int, output: str, needle: str) -> None:
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert needle in lines[0], output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    ("space", "needle"),
    [
        ("params:\n  training.learnin_rate: {type: float, low: 0.001, high: 0.01}\n",
         "unknown config path training.learnin_rate"),
        ("params:\n  training.learning_rate: {type: float, low: 0.01, high: 0.001}\n",
         "training.learning_rate: low (0.01) must be below high (0.001)"),
        ("params:\n  model.params.hidden_size: {type: float, low: 16, high: 64}\n",
         "model.params.hidden_size: SASRec's hidden_size is an integer (default 64)"),
        ("params:\n  training.loss: {type: categorical, choices: [ce, focal]}\n", "training.loss='focal'"),
        ("params:\n  source.kind: {type: categorical, choices: [file]}\n", "source.kind cannot be searched"),
    ],
)
def test_a_bad_space_file_is_one_line(tmp_path: Path, space: str, needle: str) -> None:
    (tmp_path / "space.yaml").write_text(space)
    code, output = _tune(tmp_path, "--space", str(tmp_path / "space.yaml"))
    _assert_one_error(code, output, needle)


def test_an_unknown_space_lists_the_shipped_ones(tmp_path: Path) -> None:
    code, output = _tune(tmp_path, "--space", "nope")
    _assert_one_error(code, output, "search space not found: nope")
    assert "sasrec" in output and "bpr" in output


def test_a_space_for_another_model(tmp_path: Path) -> None:
    code, output = _tune(tmp_path, "--space", "bpr", "--config", "ml-100k-sasrec")
    _assert_one_error(code, output, "is written for BPR, but the config trains SASRec")


def test_an_unset_storage_env(tmp_path: Path) -> None:
    code, output = _tune(tmp_path, "--space", "sasrec", "--storage-env", "RECFLOW_TEST_NO_SUCH_VAR")
    _assert_one_error(code, output, "--storage-env RECFLOW_TEST_NO_SUCH_VAR: the environment variable is not set")


def test_a_bad_storage_url(tmp_path: Path) -> None:
    env = {"RECFLOW_TEST_STUDY_URL": "nosuchdb://u:hunter2@nowhere/db"}
    code, output = _tune(tmp_path, "--space", "sasrec", "--storage-env", "RECFLOW_TEST_STUDY_URL", env=env)
    _assert_one_error(code, output, "cannot open $RECFLOW_TEST_STUDY_URL")
    assert "hunter2" not in output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--pruner", "fast"], "--pruner: Input should be 'median', 'hyperband' or 'none'"),
        (["--study", "a/b"], "--study: study name 'a/b'"),
        (["--trial-minutes", "0"], "--trial-minutes: Input should be greater than 0"),
        (["--config", "ml-100k-nope"], "config file not found: ml-100k-nope"),
        (["--data", "missing.csv"], "missing.csv"),
        (["--seeds", "3", "--timeout", "5", "--trial-minutes", "2"], "--timeout 5 leaves no time to search"),
    ],
)
def test_bad_flags_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], needle: str) -> None:
    monkeypatch.chdir(tmp_path)
    code, output = _tune(tmp_path, "--space", "sasrec", *args)
    _assert_one_error(code, output, needle)


def test_a_resumed_study_with_another_space_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(TINY_SPACE)
    (tmp_path / "b.yaml").write_text("params:\n  training.learning_rate: {type: float, low: 0.001, high: 0.1}\n")
    from core.config import load_config
    from core.experiments.space import load_space
    from core.experiments.study import StudySettings, study_fingerprint

    settings = StudySettings(name="s", root=tmp_path / "st", trials=2)
    open_study(settings, direction="maximize", fingerprint=study_fingerprint(load_config(), load_space(tmp_path / "a.yaml")))
    code, output = _tune(tmp_path, "--space", str(tmp_path / "b.yaml"))
    _assert_one_error(code, output, "study 's' was started with another space")


@pytest.mark.slow  # a real `recflow tune` in a subprocess: two tiny trials through Prefect
def test_tune_runs_prints_the_leaderboard_and_resumes(tmp_path: Path, tiny_rows: list[Interaction]) -> None:
    (tmp_path / "tiny.yaml").write_text(TINY_YAML)
    (tmp_path / "space.yaml").write_text(TINY_SPACE)
    write_csv(tiny_rows, tmp_path / "answers.csv", user_col="learner", item_col="question_id", time_col="created_at")
    (tmp_path / "prefect-home").mkdir()
    env = {**os.environ, "RECFLOW_NO_REEXEC": "1", "PREFECT_HOME": str(tmp_path / "prefect-home"), "DO_NOT_TRACK": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "cli", "tune", "--config", "tiny.yaml", "--space", "space.yaml", "--study", "cli",
           "--trials", "2", "--pruner", "none", "--device", "cpu", "--data", "answers.csv",
           "--user-col", "learner", "--item-col", "question_id", "--time-col", "created_at"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)
    context = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, context
    assert "study cli: 2 trials (complete + pruned), 0 failed" in proc.stdout, context
    assert "learning_rate=" in proc.stdout and "hidden_size=" in proc.stdout, context
    assert "leaderboard: studies/cli/leaderboard.csv" in proc.stdout, context
    assert "recflow run --config studies/cli/best.yaml" in proc.stdout, context
    assert (tmp_path / "studies" / "cli" / "best.yaml").is_file()
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)
    assert again.returncode == 0 and "2 trials (complete + pruned)" in again.stdout, again.stdout + again.stderr
    from core.experiments.study import StudySettings

    assert len(open_study(StudySettings(name="cli", root=tmp_path / "studies", trials=2)).trials) == 2
