"""`recflow ab-report` end to end on a simulated serving log: the flow, its files, artifacts and webhook."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner
from webhook_receiver import WebhookReceiver

from cli import app
from core.online.profile import build_profile, write_profile
from core.online.report import LEARNERS_FILE, REPORT_JSON, REPORT_MD, REPORT_PNG
from core.online.simulate import SimArm, SimSettings, simulate, write_log
from core.release.artifacts import write_checksums

KEY = "a-test-pseudonym-key-32-bytes-ok"


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[WebhookReceiver]:
    r = WebhookReceiver().start()
    monkeypatch.setenv("RECFLOW_WEBHOOK_URL", r.url())
    monkeypatch.setenv("RECFLOW_PSEUDONYM_KEY", KEY)
    yield r
    r.stop()


def _logged(root: Path, **shift: object) -> tuple[Path, Path, Path]:
    """A simulated log dir, its attempts file (raw ids) and a registry with both arms' versions profiled."""
    arms = (SimArm("control", 0.3, version="v1"), SimArm("treatment", 0.5, version="v2"))
    sim = simulate(SimSettings(arms=arms, learners=1_500, shadow=True, **shift), KEY)  # type: ignore[arg-type]
    write_log(sim, root / "logs")
    sim.attempts.write_csv(root / "attempts.csv")
    base = simulate(SimSettings(arms=arms, learners=1_500), KEY)  # what the versions were trained on
    for arm in arms:
        version_dir = root / "registry" / arm.entry / str(arm.version)
        write_profile(build_profile(base.training), version_dir)
        write_checksums(version_dir)
    return root / "logs", root / "attempts.csv", root / "registry"


def test_ab_report_on_a_simulated_log(prefect_harness: None, tmp_path: Path, receiver: WebhookReceiver) -> None:
    logs, attempts, registry = _logged(tmp_path)
    summary = tmp_path / "summary.json"
    result = CliRunner().invoke(app, ["ab-report", "--log-dir", str(logs), "--attempts", str(attempts),
                                      "--pseudonymize", "--registry", str(registry), "--json", str(summary)])
    assert result.exit_code == 0, result.output
    out = logs / "ab-report"
    for name in (REPORT_JSON, REPORT_MD, REPORT_PNG, LEARNERS_FILE):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / REPORT_PNG).read_bytes()[:4] == b"\x89PNG"
    report = json.loads(summary.read_text())
    assert report["experiment"] == "sim-exp" and report["shadow_rows"] == report["served_rows"]
    hit = next(d for d in report["analysis"]["differences"] if d["metric"] == "hit rate")
    assert hit["treatment"] == "treatment" and hit["significant"] and hit["low"] > 0
    assert report["analysis"]["srm"]["flagged"] is False
    assert [d["warnings"] for d in report["drift"]] == [[], []]
    assert "| treatment |" in (out / REPORT_MD).read_text() and "hit rate" in result.output
    # The webhook got one message naming the difference; no raw learner id went anywhere.
    assert len(receiver.requests) == 1 and "hit rate: treatment" in receiver.requests[0].body["text"]
    raw_ids = {line.split(",")[0] for line in attempts.read_text().splitlines()[1:50]}
    written = (out / REPORT_JSON).read_text() + (out / REPORT_MD).read_text() + json.dumps(receiver.requests[0].body)
    assert not any(raw in written for raw in raw_ids)


def test_ab_report_warns_on_drifted_traffic(prefect_harness: None, tmp_path: Path, receiver: WebhookReceiver) -> None:
    # The flow itself (the CLI's path above, minus the flags): CliRunner cannot host two Prefect runs.
    from core.config import load_config
    from core.online.settings import ABReportSettings
    from flows.ab_report import ab_report

    logs, attempts, registry = _logged(tmp_path, shift_popularity=True, unknown_rate=0.2)
    attempts_cfg = load_config(None, {"source.kind": "file", "source.path": attempts, "privacy.pseudonymize": True,
                                      "columns.user": "user_id", "columns.item": "question_id",
                                      "columns.time": "created_at"})
    report = ab_report(ABReportSettings(log_dir=logs, out_dir=tmp_path / "out", attempts=attempts_cfg,
                                        registry=registry))
    assert (tmp_path / "out" / REPORT_PNG).is_file()
    assert any("item-popularity PSI" in w for w in report.drift_warnings)
    assert any("unknown-item share" in w for w in report.drift_warnings)
    assert "drift:" in receiver.requests[0].body["text"]
