"""core/release/notify.py against a real local HTTP receiver: payload formats, event filter, and that a
broken, slow or missing webhook never raises and never leaks the URL into the log."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import pytest
from webhook_receiver import WebhookReceiver

from core.config import NotifyConfig, load_config
from core.errors import ConfigError
from core.records import GateDecision
from core.release.notify import DISCORD_MAX_CHARS, Outcome, build_payload, message_text, notify

ENV = "RECFLOW_TEST_WEBHOOK_URL"
SECRET = "T0KEN-s3cret"

GATE = GateDecision(
    promote=True,
    metric="NDCG@10",
    candidate=0.5790,
    baseline=0.0619,
    champion=0.4100,
    champion_version="v20260101-000000-aaaa",
    reasons=["beats Pop baseline on NDCG@10: 0.5790 > 0.0619", "beats champion v20260101-000000-aaaa on NDCG@10"],
)
PROMOTED = Outcome(
    event="promotion", flow_run="mauve-mayfly", stage="deploy", model="interactions-sasrec",
    version="v20260102-000000-bbbb", champion="v20260102-000000-bbbb", gate=GATE, reasons=GATE.reasons,
)
FAILED = Outcome(event="failure", flow_run="gainful-peccary", stage="validate", model="interactions-sasrec",
                 error="data validation failed: 2 checks")


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver().start()
    yield r
    r.stop()


def _config(**kw: object) -> NotifyConfig:
    return NotifyConfig(webhook_env=ENV, **kw)  # type: ignore[arg-type]


def test_message_names_run_version_gate_figures_and_reasons() -> None:
    text = message_text(PROMOTED)
    assert "mauve-mayfly" in text and "v20260102-000000-bbbb promoted" in text
    assert "candidate 0.5790" in text and "champion v20260101-000000-aaaa 0.4100" in text and "Pop 0.0619" in text
    assert all(r in text for r in GATE.reasons)
    failed = message_text(FAILED)
    assert "FAILED at validate" in failed and "data validation failed: 2 checks" in failed


def test_rating_gate_names_the_train_mean_baseline() -> None:
    gate = GATE.model_copy(update={"metric": "RMSE", "candidate": 0.98, "baseline": 1.24, "champion": None})
    text = message_text(PROMOTED.__class__(**{**PROMOTED.__dict__, "gate": gate}))
    assert "vs train mean 1.2400" in text and "Pop" not in text.splitlines()[1]


def test_payload_formats() -> None:
    assert set(build_payload(PROMOTED, "discord")) == {"content"}
    assert set(build_payload(PROMOTED, "slack")) == {"text"}
    generic = build_payload(PROMOTED, "generic")
    assert generic["text"] == generic["content"] == message_text(PROMOTED)
    assert (generic["event"], generic["status"], generic["stage"]) == ("promotion", "promoted", "deploy")
    assert generic["version"] == "v20260102-000000-bbbb"
    assert generic["gate"]["champion"] == 0.41 and generic["gate"]["baseline"] == 0.0619
    assert generic["reasons"] == GATE.reasons


def test_discord_content_is_cut_to_its_limit() -> None:
    long = Outcome(event="failure", flow_run="r", stage="train", error="x" * 5000)
    content = build_payload(long, "discord")["content"]
    assert len(content) == DISCORD_MAX_CHARS and content.endswith("…")


def test_posts_json_to_the_webhook(receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, receiver.url())
    assert notify(PROMOTED, _config(format="slack")) is True
    assert len(receiver.requests) == 1
    got = receiver.requests[0]
    assert got.path == f"/hooks/{SECRET}"
    assert got.headers["Content-Type"] == "application/json"
    assert got.body == {"text": message_text(PROMOTED)}


def test_only_configured_events_are_sent(receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, receiver.url())
    rejected = Outcome(event="rejection", flow_run="r", stage="deploy", model="m", version="v2", champion="v1")
    assert notify(rejected, _config()) is False  # default events: failure, promotion
    assert receiver.requests == []
    assert notify(rejected, _config(events=["rejection"])) is True
    assert receiver.requests[0].body["event"] == "rejection"
    assert "champion stays v1" in receiver.requests[0].body["text"]


def test_no_url_configured_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert notify(FAILED, _config()) is False


def test_secret_block_is_used_when_the_env_var_is_unset(
    receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    asked: list[str] = []

    def loader(name: str) -> str:
        asked.append(name)
        return receiver.url()

    assert notify(FAILED, _config(secret_block="recflow-webhook"), secret_loader=loader) is True
    assert asked == ["recflow-webhook"] and len(receiver.requests) == 1


def test_unreadable_secret_block_is_a_warning(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(ENV, raising=False)

    def loader(name: str) -> str:
        raise ValueError(f"no block named {name}")

    with caplog.at_level(logging.WARNING, logger="core.release.notify"):
        assert notify(FAILED, _config(secret_block="missing"), secret_loader=loader) is False
    assert "cannot read the webhook URL from Prefect Secret block 'missing'" in caplog.text


def test_webhook_error_is_a_warning_without_the_url(
    receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.status = 500
    monkeypatch.setenv(ENV, receiver.url())
    with caplog.at_level(logging.DEBUG):
        assert notify(FAILED, _config()) is False
    assert "webhook answered HTTP 500" in caplog.text
    assert SECRET not in caplog.text and str(receiver.url()) not in caplog.text


def test_slow_webhook_times_out_quickly(
    receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.delay = 3.0
    monkeypatch.setenv(ENV, receiver.url())
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="core.release.notify"):
        assert notify(FAILED, _config(timeout_seconds=0.3)) is False
    assert time.monotonic() - start < 2.0
    assert "not delivered" in caplog.text and SECRET not in caplog.text


def test_refused_connection_and_bad_scheme_do_not_raise(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(ENV, f"http://127.0.0.1:{port}/hooks/{SECRET}")
    with caplog.at_level(logging.WARNING, logger="core.release.notify"):
        assert notify(FAILED, _config()) is False
        monkeypatch.setenv(ENV, f"ftp://example.invalid/{SECRET}")
        assert notify(FAILED, _config()) is False
    assert "must start with http:// or https://" in caplog.text
    assert SECRET not in caplog.text


def test_notify_section_in_yaml(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "c.yaml"  # type: ignore[operator]
    path.write_text("notify:\n  events: [failure, rejection]\n  format: discord\n")
    cfg = load_config(path)
    assert cfg.notify.events == ["failure", "rejection"] and cfg.notify.format == "discord"
    path.write_text("notify:\n  events: [success]\n")
    with pytest.raises(ConfigError, match="notify.events"):
        load_config(path)
