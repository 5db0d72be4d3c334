"""The flow's hooks post to a real local webhook: a promotion, a failure naming the stage,
and nothing for a rejected run (default events)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from recflow_testdata import DATA_FILE, Interaction, tiny_config, write_csv
from webhook_receiver import WebhookReceiver

from core.errors import PipelineFailed
from flows.training_pipeline import training_pipeline

ENV = "RECFLOW_TEST_FLOW_WEBHOOK"


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver().start()
    yield r
    r.stop()


@pytest.fixture(autouse=True)
def webhook_env(receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, receiver.url())
    receiver.requests.clear()


def test_promotion_then_rejection(
    prefect_harness: None, tmp_path: Path, tiny_rows: list[Interaction], receiver: WebhookReceiver
) -> None:
    config = tiny_config(tmp_path, write_csv(tiny_rows, tmp_path / DATA_FILE), {"notify.webhook_env": ENV})
    first = training_pipeline(config)
    assert first.status == "promoted"
    assert len(receiver.requests) == 1
    body = receiver.requests[0].body
    assert (body["event"], body["status"], body["stage"]) == ("promotion", "promoted", "register")
    assert body["model"] == "interactions-sasrec" and body["version"] == first.model_version
    assert first.gate is not None
    assert body["gate"]["candidate"] == first.gate.candidate and body["gate"]["baseline"] == first.gate.baseline
    assert body["reasons"] == first.gate.reasons
    assert f"{first.model_version} promoted" in body["text"]

    # Same data and seed: equal metrics do not beat the champion, so the run is rejected and
    # (default events: failure, promotion) nothing is posted.
    receiver.requests.clear()
    second = training_pipeline(config)
    assert second.status == "rejected" and second.champion == first.model_version
    assert receiver.requests == []


def test_failure_names_the_stage(
    prefect_harness: None, tmp_path: Path, tiny_rows: list[Interaction], receiver: WebhookReceiver
) -> None:
    # Every row twice: far above the 1% duplicate limit, so validate stops the run.
    data = write_csv(tiny_rows + tiny_rows, tmp_path / DATA_FILE)
    config = tiny_config(tmp_path, data, {"notify.webhook_env": ENV, "notify.format": "discord"})
    with pytest.raises(PipelineFailed) as info:
        training_pipeline(config)
    assert info.value.stage == "validate"
    assert len(receiver.requests) == 1
    content = receiver.requests[0].body["content"]
    assert set(receiver.requests[0].body) == {"content"}
    assert "FAILED at validate" in content and "interactions-sasrec" in content
    assert info.value.error.split(":")[0] in content


def test_a_broken_webhook_does_not_change_the_outcome(
    prefect_harness: None, tmp_path: Path, tiny_rows: list[Interaction], receiver: WebhookReceiver
) -> None:
    receiver.status = 500
    try:
        config = tiny_config(tmp_path, write_csv(tiny_rows, tmp_path / DATA_FILE), {"notify.webhook_env": ENV})
        state = training_pipeline(config, return_state=True)
    finally:
        receiver.status = 204
    assert state.is_completed()
    assert state.result().status == "promoted"
    assert len(receiver.requests) == 1  # it was tried, refused, and the run stayed promoted
