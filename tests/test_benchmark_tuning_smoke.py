"""benchmarks/tuning.py end to end at a tiny budget: both sides (recflow tune and RecBole's
HyperTuning) run at once for a few seconds of budget and one epoch per trial, each completes a
trial, and the table and the JSON come out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "tuning.py"


@pytest.mark.slow  # two SASRec trials on the whole of MovieLens-100k (one epoch each), about a minute
def test_both_sides_complete_a_trial_and_the_table_prints(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, str(SCRIPT), "--minutes", "0.1", "--epochs", "1", "--users", "100", "--concurrent",
           "--work", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    context = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, context
    lines = proc.stdout.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("side "))
    assert "trials complete" in lines[header] and "test ndcg@10 (best valid)" in lines[header], context
    table = {line.split()[0]: line.split() for line in lines[header + 1:header + 3]}
    assert set(table) == {"recflow", "hypertuning"}, context
    summary = json.loads(lines[-1])
    assert summary == json.loads((tmp_path / "work" / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["concurrent"] is True
    for name, side in summary["sides"].items():
        assert side["complete"] >= 1, (name, context)
        assert 0 < side["best_valid"] <= 1 and 0 < side["test_at_best_valid"] <= 1, (name, side)
        assert table[name][1] == str(side["complete"]) and table[name][4] == f"{side['test_at_best_valid']:.4f}"
    # Both sides searched the same knobs (window_stride has no RecBole counterpart).
    space = json.loads((tmp_path / "work" / "hypertuning" / "space.json").read_text())
    assert {s["name"] for s in space["specs"]} == {"learning_rate", "hidden_size", "n_layers", "hidden_dropout_prob",
                                                   "attn_dropout_prob"}
    assert space["recflow_only"] == ["training.window_stride"]
    trial = json.loads((tmp_path / "work" / "hypertuning" / "trials.jsonl").read_text().splitlines()[0])
    assert trial["epochs"] == 1 and set(trial["params"]) == {s["name"] for s in space["specs"]}
    assert isinstance(trial["params"]["n_layers"], int)
