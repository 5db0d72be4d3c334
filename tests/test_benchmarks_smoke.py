"""Every benchmarks/*.py still runs: at tiny sizes where the script has size flags, else its
``--help`` (and, for time_to_quality.py, its report on an empty work folder).

Not covered at a tiny size: bare_recbole.py (one SASRec epoch per side on the whole of
MovieLens-100k, minutes; it has no size flag) and rectools_peer.py (its RecTools side needs
its own virtual environment, benchmarks/.rectools-venv).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py"))


def _run(*args: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def _last_json(stdout: str) -> dict[str, Any]:
    """The machine-readable summary these scripts print as their last line."""
    line = stdout.strip().splitlines()[-1]
    return json.loads(line)  # type: ignore[no-any-return]


def test_every_benchmark_is_covered_here() -> None:
    assert SCRIPTS == ["bare_recbole.py", "data_scale.py", "rectools_peer.py", "serving.py", "time_to_quality.py",
                       "training.py", "tuning.py"], "a new benchmark: add a smoke test for it below"
    # tuning.py's end-to-end smoke run: tests/test_benchmark_tuning_smoke.py


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script: str) -> None:
    out = _run(str(BENCHMARKS / script), "--help", timeout=120).stdout
    assert out.startswith("usage:") and "--" in out


@pytest.mark.slow
def test_data_scale_at_4000_rows(tmp_path: Path) -> None:
    out = _run(str(BENCHMARKS / "data_scale.py"), "--rows", "4000", "--formats", "parquet,csv",
               "--workdir", str(tmp_path / "work")).stdout
    summary = _last_json(out)
    assert summary["rows"] == 4000 and set(summary["results"]) == {"parquet", "csv"}
    for steps in summary["results"].values():
        assert [s["step"] for s in steps] == ["extract", "validate", "build"]
        extract, validate, build = steps
        assert extract["rows"] == 4000
        assert validate["success"] is True and validate["failures"] == []
        assert 0 < build["interactions"] <= 4000


@pytest.mark.slow
def test_serving_on_a_tiny_model(tmp_path: Path) -> None:
    out_file = tmp_path / "serving.json"
    _run(str(BENCHMARKS / "serving.py"), "--requests", "40", "--concurrency", "2", "--scorer-runs", "8",
         "--out", str(out_file))
    result = json.loads(out_file.read_text())
    assert result["http"]["requests"] == 40 and result["http"]["errors"] == 0
    assert result["scorer"]["batch1"]["max_abs_diff"] < 1e-4  # onnxruntime vs torch: the same scores


@pytest.mark.slow
def test_training_on_the_ease_preset(tmp_path: Path) -> None:
    """EASE: one closed-form pass per side (the cheapest preset), bare RecBole vs recflow."""
    out_file = tmp_path / "bench.json"
    _run(str(BENCHMARKS / "training.py"), "--presets", "ease", "--epochs", "1", "--out", str(out_file))
    (result,) = json.loads(out_file.read_text())["results"]
    assert result["preset"] == "ml-100k-ease"
    for side in ("recflow", "bare"):
        assert result[side] is not None and "error" not in result[side], result[side]


@pytest.mark.slow
def test_time_to_quality_reports_from_an_empty_work_folder(tmp_path: Path) -> None:
    """Only --report-only: the full benchmark trains for hours (and may be running on this machine)."""
    work = tmp_path / "ttq"
    out = _run(str(BENCHMARKS / "time_to_quality.py"), "--report-only", "--work", str(work), timeout=300).stdout
    assert "Time to quality" in out and "bare RecBole" in out
    assert (work / "summary.json").is_file()
    assert (work / "data" / "recbole" / "interactions" / "interactions.inter").is_file()
