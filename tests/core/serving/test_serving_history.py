"""`recflow serve` for EASE and ItemKNN champions (the request's items are the history, any
learner) and for an FM champion (POST /ratings over (user, item) pairs)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from history_models import ExportedRun, train_and_export
from serve_process import wait_until_serving

from core.release.registry import Registry
from core.serving.app import create_app
from core.serving.scorer import OnnxScorer

REPO = Path(__file__).resolve().parents[3]


def _publish(registry: Registry, name: str, run: ExportedRun) -> Path:
    files = sorted(p for p in run.export_dir.iterdir() if p.is_file() and p.name != "model_card.json")
    registry.publish(name, "v1", files, {"export": {"exported": True}}, promote=True)
    return registry.entry(name) / "v1"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    reg = Registry(tmp_path_factory.mktemp("history-registry"))
    for name in ("EASE", "ItemKNN", "FM"):
        run = train_and_export(name)
        assert run.record.exported, run.record.reason
        _publish(reg, name.lower(), run)
    return reg


@pytest.fixture
def client(registry: Registry, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    with TestClient(create_app(registry.root, request.param, poll_seconds=0)) as c:
        yield c


@pytest.mark.parametrize("client", ["ease", "itemknn"], indirect=True)
def test_history_champion_recommends_for_any_learner(client: TestClient, registry: Registry) -> None:
    name = client.app.state.watcher.name  # type: ignore[attr-defined]
    scorer = OnnxScorer(registry.entry(name) / "v1")
    history = ["i3", "i4", "i5", "i4"]
    resp = client.post("/recommendations", json={"items": history, "k": 10})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["model"], body["version"]) == (name, "v1")
    want = scorer.recommend(history, k=10)
    assert [r["item"] for r in body["items"]] == [r.item for r in want]
    assert [r["score"] for r in body["items"]] == pytest.approx([r.score for r in want], abs=1e-6)
    assert not {r["item"] for r in body["items"]} & set(history) and len(body["items"]) == 10
    # A user id (known or a learner the model never saw) changes nothing: the items are the input.
    for user in ("u1", "someone-new"):
        same = client.post("/recommendations", json={"items": history, "k": 10, "user": user}).json()
        assert same["items"] == body["items"]
    # Batched: concurrent-sized requests of different history lengths give the single answers.
    ids = [np.asarray([scorer.item_index[i] for i in h]) for h in (history, ["i9"])]
    batch = scorer.scores_for_histories(ids)
    assert np.allclose(batch[0], scorer.scores_for_histories([ids[0]])[0], atol=1e-6)


@pytest.mark.parametrize("client", ["ease", "itemknn"], indirect=True)
def test_history_champion_4xx_reasons(client: TestClient) -> None:
    unknown = client.post("/recommendations", json={"items": ["i3", "zzz"], "k": 5})
    assert unknown.status_code == 422 and "'zzz'" in unknown.json()["detail"]
    dropped = client.post("/recommendations", json={"items": ["i3", "zzz"], "k": 5, "ignore_unknown": True})
    assert dropped.status_code == 200
    nothing = client.post("/recommendations", json={"items": ["zzz"], "k": 5, "ignore_unknown": True})
    assert nothing.status_code == 422 and "at least one item" in nothing.json()["detail"]
    empty = client.post("/recommendations", json={"items": [], "k": 5})
    assert empty.status_code == 422 and "at least one item" in empty.json()["detail"]
    ratings = client.post("/ratings", json={"pairs": [{"user": "u1", "item": "i1"}]})
    assert ratings.status_code == 422 and "not a rating model" in ratings.json()["detail"]


@pytest.mark.parametrize("client", ["fm"], indirect=True)
def test_fm_champion_rates_pairs(client: TestClient, registry: Registry) -> None:
    scorer = OnnxScorer(registry.entry("fm") / "v1")
    pairs = [{"user": "u1", "item": "i1"}, {"user": "u7", "item": "i30"}, {"user": "u1", "item": "i2"}]
    resp = client.post("/ratings", json={"pairs": pairs})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["model"], body["version"]) == ("fm", "v1")
    assert [(r["user"], r["item"]) for r in body["ratings"]] == [(p["user"], p["item"]) for p in pairs]
    want = scorer.rate_pairs(np.asarray([scorer.user_index[p["user"]] for p in pairs]),
                             np.asarray([scorer.item_index[p["item"]] for p in pairs]))
    assert [r["rating"] for r in body["ratings"]] == pytest.approx(want.tolist(), abs=1e-6)
    assert len({r["rating"] for r in body["ratings"]}) == 3  # a real prediction per pair, not one constant


@pytest.mark.parametrize("client", ["fm"], indirect=True)
def test_fm_champion_4xx_reasons(client: TestClient) -> None:
    cases = [
        ({"pairs": [{"user": "nobody", "item": "i1"}]}, "unknown users", "'nobody'"),
        ({"pairs": [{"user": "u1", "item": "i999"}, {"user": "u2", "item": "i999"}]}, "unknown items", "'i999'"),
        ({"pairs": []}, "1 to 1000", ""),
        ({"pairs": [{"user": "u1"}]}, "pairs.0.item", ""),
        ({"pairs": [{"user": "u1", "item": "i1"}], "k": 3}, "k: Extra inputs", ""),
    ]
    for body, reason, named in cases:
        resp = client.post("/ratings", json=body)
        assert resp.status_code == 422, (body, resp.text)
        assert reason in resp.json()["detail"] and named in resp.json()["detail"]
    bad = client.post("/ratings", content=b"{", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "malformed JSON" in bad.json()["detail"]
    recs = client.post("/recommendations", json={"items": ["i1"], "user": "u1"})
    assert recs.status_code == 422 and "POST /ratings" in recs.json()["detail"]


# --------------------------------------------------------------------------- the real commands


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_recflow_run_ml100k_ease_then_recflow_serve(tmp_path: Path) -> None:
    """The issue's done-when: `recflow run --config ml-100k-ease` registers an ONNX champion with
    parity <= 1e-4 against RecBole, and `recflow serve` answers for a history (about 2 minutes)."""
    env = {**os.environ, "RECFLOW_NO_REEXEC": "1", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    registry = tmp_path / "registry"
    run = subprocess.run([sys.executable, "-m", "cli", "run", "--config", "ml-100k-ease", "--registry", str(registry),
                          "--runs-dir", str(tmp_path / "runs"), "--summary-json", str(tmp_path / "summary.json")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "promoted"
    card = Registry(registry).card("ml-100k-ease", Registry(registry).champion_version("ml-100k-ease") or "")
    export = card["export"]
    assert export["kind"] == "history" and export["parity"]["max_abs_diff"] <= 1e-4
    assert export["parity"]["top10_identical"] == 1.0 and export["matrix"]["shape"] == [1683, 1683]
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--registry", str(registry), "--port", str(port)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_serving(base, proc)
        resp = httpx.post(f"{base}/recommendations", json={"items": ["50", "181", "258"], "k": 10}, timeout=10)
        assert resp.status_code == 200, resp.text
        items = [r["item"] for r in resp.json()["items"]]
        assert len(items) == 10 and not {"50", "181", "258"} & set(items)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert "Traceback" not in out


def test_a_learner_with_no_known_item_gets_the_popular_items_of_the_training_data(
        registry: Registry, tmp_path: Path) -> None:
    """A version with a data profile answers an empty or all-unknown history with its popular items."""
    run = train_and_export("EASE")
    profile = tmp_path / "data_profile.json"
    profile.write_text(json.dumps({"top_items": [["i5", 0.2], ["i7", 0.1], ["gone", 0.05], ["i3", 0.04]]}))
    files = sorted(p for p in run.export_dir.iterdir() if p.is_file() and p.name != "model_card.json")
    registry.publish("ease-pop", "v1", [*files, profile], {"export": {"exported": True}}, promote=True)
    with TestClient(create_app(registry.root, "ease-pop", poll_seconds=0)) as client:
        for body in ({"items": [], "k": 3}, {"items": ["zzz"], "ignore_unknown": True}):
            resp = client.post("/recommendations", json=body)
            assert resp.status_code == 200, resp.text
            answer = resp.json()
            assert answer["fallback"] == "popular"  # an item the model does not know is skipped
            assert [(r["item"], r["score"]) for r in answer["items"]] == [("i5", 0.2), ("i7", 0.1), ("i3", 0.04)]
        known = client.post("/recommendations", json={"items": ["i3"], "k": 3}).json()
        assert known.get("fallback") is None and len(known["items"]) == 3  # the model answers as before
