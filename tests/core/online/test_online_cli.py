"""`recflow ab-report` refuses a missing or empty log in one line, exit 2, before Prefect starts.

The full command on a simulated log (flow, artifacts, files) is in tests/flows/test_ab_report.py.
"""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from cli import app


def test_an_empty_log_dir_exits_2_with_a_message(tmp_path: Path) -> None:
    (tmp_path / "requests").mkdir()
    result = CliRunner().invoke(app, ["ab-report", "--log-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "no request log" in result.output and "Traceback" not in result.output


def test_a_missing_log_dir_or_attempts_file_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["ab-report", "--log-dir", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no log folder" in result.output
    result = CliRunner().invoke(app, ["ab-report", "--log-dir", str(tmp_path), "--attempts", str(tmp_path / "a.csv")])
    assert result.exit_code == 2 and "--attempts: no file" in result.output


def test_a_bad_flag_value_names_the_flag(tmp_path: Path) -> None:
    from core.online.simulate import SimArm, SimSettings, simulate, write_log

    write_log(simulate(SimSettings(arms=(SimArm("a", 0.5), SimArm("b", 0.5)), learners=5), "k" * 32), tmp_path)
    (tmp_path / "events" / "e.parquet").write_bytes(b"")  # present but unreadable: still caught before Prefect
    for flags, name in ((["--window", "0"], "--window"), (["--alpha", "1.5"], "--alpha"),
                        (["--max-item-psi", "-1"], "--max-item-psi")):
        result = CliRunner().invoke(app, ["ab-report", "--log-dir", str(tmp_path), "--attempts", __file__, *flags])
        assert result.exit_code == 2 and f"error: {name}:" in result.output, result.output
    result = CliRunner().invoke(app, ["ab-report", "--log-dir", str(tmp_path), "--attempts", __file__,
                                      "--record", str(tmp_path / "nope.json")])
    assert result.exit_code == 2 and "--record: no file" in result.output
    result = CliRunner().invoke(app, ["ab-report", "--log-dir", str(tmp_path)])
    assert result.exit_code == 2 and "cannot read the event log" in result.output
