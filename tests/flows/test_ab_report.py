"""`recflow ab-report` end to end on a simulated serving log: the flow, its files, artifacts and webhook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.settings import PREFECT_API_URL
from webhook_receiver import WebhookReceiver

from core.config import load_config
from core.data.privacy import pseudonymize_ids
from core.online.report import LEARNERS_FILE, REPORT_JSON, REPORT_MD, REPORT_PNG
from core.online.settings import ABReportSettings
from core.online.simulate import write_demo
from flows.ab_report import ab_report

KEY = "a-test-pseudonym-key-32-bytes-ok"


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[WebhookReceiver]:
    r = WebhookReceiver().start()
    monkeypatch.setenv("RECFLOW_WEBHOOK_URL", r.url())
    monkeypatch.setenv("RECFLOW_PSEUDONYM_KEY", KEY)
    yield r
    r.stop()


def _logged(root: Path, *, drifted: bool = False) -> tuple[Path, Path, Path]:
    """The README's demo folder: a simulated log, its attempts (raw ids) and a registry with profiles."""
    write_demo(root, KEY, learners=1_500, drifted=drifted)
    return root / "logs", root / "attempts.csv", root / "registry"


def test_ab_report_on_a_simulated_log(prefect_harness: None, tmp_path: Path, receiver: WebhookReceiver) -> None:
    logs, attempts, registry = _logged(tmp_path)
    summary = tmp_path / "summary.json"
    # The installed command in its own process, as a user runs it, against the test Prefect server.
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "RECFLOW_NO_REEXEC": "1"}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "recflow"), "ab-report", "--log-dir", str(logs), "--attempts",
         str(attempts), "--pseudonymize", "--registry", str(registry), "--json", str(summary)],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
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
    assert "| treatment |" in (out / REPORT_MD).read_text() and "hit rate" in result.stdout
    # The webhook got one message naming the difference; no raw learner id went anywhere.
    assert len(receiver.requests) == 1 and "hit rate: treatment" in receiver.requests[0].body["text"]
    raw_ids = {line.split(",")[0] for line in attempts.read_text().splitlines()[1:50]}
    written = (out / REPORT_JSON).read_text() + (out / REPORT_MD).read_text() + json.dumps(receiver.requests[0].body)
    assert not any(raw in written for raw in raw_ids)


def test_ab_report_warns_on_drifted_traffic(prefect_harness: None, tmp_path: Path, receiver: WebhookReceiver) -> None:
    # The flow itself: the CLI's path above, minus the flags.
    logs, attempts, registry = _logged(tmp_path, drifted=True)
    attempts_cfg = load_config(None, {"source.kind": "file", "source.path": attempts, "privacy.pseudonymize": True,
                                      "columns.user": "user_id", "columns.item": "question_id",
                                      "columns.time": "created_at"})
    # A real deployment on the test server (no work pool: its run waits, scheduled, for a worker).
    with get_client(sync_client=True) as client:
        deployment_id = client.create_deployment(flow_id=client.create_flow_from_name("training-pipeline"),
                                                 name="nightly-drift-test")
    settings = ABReportSettings(log_dir=logs, out_dir=tmp_path / "out", attempts=attempts_cfg, registry=registry,
                                trigger_nightly=True, nightly_deployment="training-pipeline/nightly-drift-test")
    report = ab_report(settings)
    assert (tmp_path / "out" / REPORT_PNG).is_file()
    assert any("item-popularity PSI" in w for w in report.drift_warnings)
    assert any("unknown-item share" in w for w in report.drift_warnings)
    assert "drift:" in receiver.requests[0].body["text"]
    assert report.nightly_triggered.startswith("training-pipeline/nightly-drift-test started as flow run")
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    assert len(runs) == 1 and "drift" in runs[0].tags
    # A trigger that cannot start is said in the report; the report itself still comes out.
    missing = ab_report(settings.model_copy(update={"nightly_deployment": "training-pipeline/none-such",
                                                    "out_dir": tmp_path / "out2"}))
    assert missing.nightly_triggered.startswith("training-pipeline/none-such not started")
    assert (tmp_path / "out2" / REPORT_JSON).is_file()


def test_no_drift_warning_no_trigger(prefect_harness: None, tmp_path: Path, receiver: WebhookReceiver) -> None:

    logs, attempts, registry = _logged(tmp_path)
    # Outcomes from POST /events only: the attempts as the server logs them (pseudonymised sessions).
    events = pseudonymize_ids(pl.read_csv(attempts, try_parse_dates=True), KEY.encode(), column="user_id").select(
        event_id=pl.int_range(pl.len()).cast(pl.String), ts=pl.col("created_at").dt.convert_time_zone("UTC"),
        session="user_id", item="question_id", kind=pl.lit("correct"), value=pl.col("is_correct").cast(pl.Float64))
    events.write_parquet(logs / "events" / "events-w0-20260105T000000Z-0000.parquet")
    report = ab_report(ABReportSettings(log_dir=logs, out_dir=tmp_path / "out", registry=registry, trigger_nightly=True,
                                        nightly_deployment="training-pipeline/none-such"))
    assert report.drift_warnings == [] and report.nightly_triggered is None
    assert report.outcome_rows == {"attempts": 0, "events": events.height}
    assert any(d.metric == "hit rate" and d.significant for d in report.analysis.differences)
