"""HTTP serving of the champion: answers, 4xx reasons, checksums, hot swap, the real `recflow serve`.

Every test serves a real tiny model exported to ONNX and published to a temporary registry.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from recflow_testdata import N_ITEMS, TinyRun, tiny_config
from serve_process import wait_until_serving

from core.data.extract import extract
from core.errors import ChecksumError, ServingError
from core.modeling.dataset import build_dataset
from core.modeling.export import export_model
from core.modeling.training import train
from core.release.registry import CHECKSUMS_FILE, Registry
from core.serving.app import ChampionWatcher, create_app
from core.serving.scorer import OnnxScorer

NAME = "tiny-sasrec"
REPO = Path(__file__).resolve().parents[3]


# --------------------------------------------------------------------------- fixtures


def _publish(registry: Registry, name: str, version: str, export_dir: Path, *, promote: bool = True,
             card: dict[str, Any] | None = None) -> Path:
    files = sorted(p for p in export_dir.iterdir() if p.is_file() and p.name != "model_card.json")
    registry.publish(name, version, files, card or {"export": {"exported": True}}, promote=promote)
    return registry.entry(name) / version


@pytest.fixture(scope="module")
def seq_export(tiny_run: TinyRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny SASRec exported into this module's own folder."""
    run_dir = tmp_path_factory.mktemp("serve-export")
    record, _ = export_model(tiny_run.config, tiny_run.splits, tiny_run.trained, run_dir)
    assert record.exported
    return run_dir / "export"


@pytest.fixture(scope="module")
def user_export(tiny_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BPR (a user model) exported to ONNX."""
    tmp = tmp_path_factory.mktemp("serve-bpr")
    config = tiny_config(tmp, tiny_csv, {"model.name": "BPR", "model.params": {"embedding_size": 8},
                                         "training.epochs": 1})
    run_dir = tmp / "run"
    run_dir.mkdir()
    splits = build_dataset(extract(config, run_dir), config, run_dir)
    record, _ = export_model(config, splits, train(config, splits, run_dir), run_dir)
    assert record.exported
    return run_dir / "export"


@pytest.fixture
def registry(tmp_path: Path, seq_export: Path) -> Registry:
    reg = Registry(tmp_path / "registry")
    _publish(reg, NAME, "v1", seq_export)
    return reg


@pytest.fixture
def client(registry: Registry) -> Iterator[TestClient]:
    with TestClient(create_app(registry.root, NAME, poll_seconds=0)) as c:
        yield c


def _recommend(client: TestClient, body: Any) -> httpx.Response:
    return client.post("/recommendations", json=body)


# --------------------------------------------------------------------------- answers


def test_top_k_equals_the_scorer_and_excludes_padding_and_seen(client: TestClient, registry: Registry) -> None:
    history = ["i3", "i4", "i5", "i4"]
    resp = _recommend(client, {"items": history, "k": 10})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["model"], body["version"]) == (NAME, "v1")
    got = [(r["item"], r["score"]) for r in body["items"]]
    want = OnnxScorer(registry.entry(NAME) / "v1").recommend(history, k=10)
    assert [i for i, _ in got] == [r.item for r in want]
    assert [s for _, s in got] == pytest.approx([r.score for r in want], abs=1e-6)
    assert len(got) == 10 and not {i for i, _ in got} & set(history)
    assert "[PAD]" not in {i for i, _ in got}
    # Everything: all items but padding and the 3 distinct seen ones, once each.
    everything = _recommend(client, {"items": history, "k": N_ITEMS}).json()["items"]
    assert len(everything) == N_ITEMS - 3
    assert {r["item"] for r in everything} == {f"i{i}" for i in range(N_ITEMS)} - set(history)
    # exclude_seen false lets seen items back in (the walk makes i6 best, seen or not).
    unmasked = _recommend(client, {"items": history, "k": N_ITEMS, "exclude_seen": False}).json()["items"]
    assert len(unmasked) == N_ITEMS and "[PAD]" not in {r["item"] for r in unmasked}


def test_history_is_sequence_aware(client: TestClient) -> None:
    a = _recommend(client, {"items": ["i10", "i11", "i12"], "k": 5}).json()["items"]
    b = _recommend(client, {"items": ["i30", "i31", "i32"], "k": 5}).json()["items"]
    assert a != b
    # The walk i -> i+1: after i10..i12 the model ranks i13 first.
    assert a[0]["item"] == "i13"
    assert _recommend(client, {"items": [], "k": 3}).status_code == 200  # cold start answers


def test_unknown_items(client: TestClient) -> None:
    resp = _recommend(client, {"items": ["i3", "nope", 42, "[PAD]"], "k": 5})
    assert resp.status_code == 422
    detail = resp.json()["detail"]
    assert "unknown items" in detail and "'nope'" in detail and "'42'" in detail and "'[PAD]'" in detail
    assert "'i3'" not in detail and "ignore_unknown" in detail
    many = _recommend(client, {"items": [f"x{i}" for i in range(25)]}).json()["detail"]
    assert "and 15 more" in many
    ignored = _recommend(client, {"items": ["i3", "nope"], "k": 5, "ignore_unknown": True})
    assert ignored.status_code == 200
    assert ignored.json()["items"] == _recommend(client, {"items": ["i3"], "k": 5}).json()["items"]


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({"items": ["i1"], "k": 0}, 422, "k must be between 1 and 40, got 0"),
        ({"items": ["i1"], "k": 41}, 422, "k must be between 1 and 40, got 41"),
        ({"items": ["i1"], "k": "ten"}, 422, "k: Input should be a valid integer"),
        ({"items": ["i1"] * 101}, 422, "history too long: 101 items, at most 100"),
        ({"items": ["i1"], "user": "u3"}, 422, "sequential model: send the user's recent \"items\", not \"user\""),
        ({"items": "i1"}, 422, "items: Input should be a valid array"),
        ({"items": [["i1"]]}, 422, "items.0"),
        ({"items": ["i1"], "kk": 3}, 422, "kk: Extra inputs are not permitted"),
        ([1, 2], 422, "invalid request"),
    ],
)
def test_bad_requests_name_the_problem(client: TestClient, body: Any, status: int, reason: str) -> None:
    resp = _recommend(client, body)
    assert resp.status_code == status
    assert reason in resp.json()["detail"]
    assert "Traceback" not in resp.text


def test_exactly_max_history_is_accepted(client: TestClient) -> None:
    assert _recommend(client, {"items": ["i1"] * 100, "k": 40}).status_code == 200  # 10 x max_seq_length 10


@pytest.mark.parametrize("raw", [b'{"items": ["i1",', b"not json", b""])
def test_malformed_json_is_400_with_the_parser_reason(client: TestClient, raw: bytes) -> None:
    resp = client.post("/recommendations", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code == 400
    detail = resp.json()["detail"]
    assert detail.startswith("malformed JSON body: ")
    assert len(detail) > len("malformed JSON body: ")  # the parser's reason, e.g. "EOF while parsing"


@pytest.mark.parametrize("fast_path", [True, False])
def test_oversized_body_is_413(registry: Registry, fast_path: bool) -> None:
    huge = json.dumps({"items": ["i1"] * 300_000}).encode()  # ~2 MB
    with TestClient(create_app(registry.root, NAME, poll_seconds=0, fast_path=fast_path)) as c:
        resp = c.post("/recommendations", content=huge, headers={"content-type": "application/json"})
    assert resp.status_code == 413 and "request body over 1048576 bytes" in resp.json()["detail"]


def test_user_model(tmp_path: Path, user_export: Path) -> None:
    reg = Registry(tmp_path / "registry")
    _publish(reg, "tiny-bpr", "v1", user_export)
    scorer = OnnxScorer(reg.entry("tiny-bpr") / "v1")
    with TestClient(create_app(reg.root, "tiny-bpr", poll_seconds=0)) as c:
        resp = c.post("/recommendations", json={"user": "u3", "items": ["i1"], "k": 5})
        assert resp.status_code == 200, resp.text
        items = [r["item"] for r in resp.json()["items"]]
        assert items == [r.item for r in scorer.recommend(["i1"], 5, user="u3")] and "i1" not in items
        missing = c.post("/recommendations", json={"items": ["i1"]})
        assert missing.status_code == 422 and "user model: send \"user\"" in missing.json()["detail"]
        unknown = c.post("/recommendations", json={"user": "nobody"})
        assert unknown.status_code == 422 and "unknown user 'nobody'" in unknown.json()["detail"]
        pad = c.post("/recommendations", json={"user": "[PAD]"})
        assert pad.status_code == 422 and "unknown user" in pad.json()["detail"]


def test_a_user_model_answers_a_user_it_never_saw_with_the_popular_items(tmp_path: Path, user_export: Path) -> None:
    """With the training data's profile in the version, a new learner gets its popular items, minus seen ones."""
    export = tmp_path / "export"
    shutil.copytree(user_export, export)
    (export / "data_profile.json").write_text(json.dumps({"top_items": [["i2", 0.3], ["i1", 0.2], ["i4", 0.1]]}))
    reg = Registry(tmp_path / "registry")
    _publish(reg, "tiny-bpr", "v1", export)
    with TestClient(create_app(reg.root, "tiny-bpr", poll_seconds=0)) as c:
        new = c.post("/recommendations", json={"user": "nobody", "items": ["i1"], "k": 5}).json()
        assert new["fallback"] == "popular" and [r["item"] for r in new["items"]] == ["i2", "i4"]
        known = c.post("/recommendations", json={"user": "u3", "k": 5}).json()
        assert "fallback" not in known and len(known["items"]) == 5  # a known user: the model answers
        missing = c.post("/recommendations", json={"items": ["i1"]})
        assert missing.status_code == 422  # no user at all is still the client's mistake


def test_the_declared_route_answers_like_the_fast_path(client: TestClient, registry: Registry) -> None:
    """POST /recommendations is answered by a middleware ahead of routing; the FastAPI route
    behind it (what OpenAPI documents) must give the very same answers."""
    with TestClient(create_app(registry.root, NAME, poll_seconds=0, fast_path=False)) as plain:
        for body in ({"items": ["i3", "i4"], "k": 7}, {"items": ["nope"]}, {"items": ["i1"], "k": 0}):
            a, b = _recommend(client, body), _recommend(plain, body)
            assert (a.status_code, a.json()) == (b.status_code, b.json())
        bad = plain.post("/recommendations", content=b"{", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and bad.json()["detail"].startswith("malformed JSON body")


def test_healthz_and_openapi(client: TestClient) -> None:
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and (health["model"], health["version"]) == (NAME, "v1")
    assert health["last_swap_error"] is None and health["loaded_at"].endswith("+00:00")
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/recommendations"]["post"]
    props = op["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert set(props) == {"items", "user", "session", "k", "exclude_seen", "ignore_unknown"}
    assert {"200", "400", "422"} <= set(op["responses"])
    assert {"/healthz", "/events"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200


# --------------------------------------------------------------------------- what may be served


def test_checksum_mismatch_is_refused_at_startup(registry: Registry) -> None:
    onnx = registry.entry(NAME) / "v1" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 0x01  # one bit: still the same size
    onnx.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="checksum mismatch for v1/model.onnx"):
        create_app(registry.root, NAME, poll_seconds=0)


def test_tampered_vocabulary_is_refused(registry: Registry) -> None:
    vocab = registry.entry(NAME) / "v1" / "item_ids.json"
    items = json.loads(vocab.read_text())
    items[1], items[2] = items[2], items[1]  # a swapped vocabulary would serve wrong ids silently
    vocab.write_text(json.dumps(items))
    with pytest.raises(ChecksumError, match="checksum mismatch for v1/item_ids.json"):
        create_app(registry.root, NAME, poll_seconds=0)


def test_version_without_checksums_needs_allow_unverified(registry: Registry) -> None:
    (registry.entry(NAME) / "v1" / CHECKSUMS_FILE).unlink()
    with pytest.raises(ChecksumError, match="no checksums.json.*--allow-unverified"):
        create_app(registry.root, NAME, poll_seconds=0)
    with TestClient(create_app(registry.root, NAME, poll_seconds=0, allow_unverified=True)) as c:
        assert c.post("/recommendations", json={"items": ["i1"]}).status_code == 200


def test_a_champion_without_onnx_is_refused_with_the_cards_reason(tmp_path: Path, seq_export: Path) -> None:
    reg = Registry(tmp_path / "registry")
    src = tmp_path / "itemknn"
    src.mkdir()
    for name in ("item_ids.json", "user_ids.json"):
        shutil.copy(seq_export / name, src / name)
    reason = "ItemKNN has no neural scorer to export: its scores are a sparse item-item similarity"
    _publish(reg, "tiny-itemknn", "v1", src, card={"export": {"exported": False, "reason": reason}})
    with pytest.raises(ServingError, match=f"tiny-itemknn/v1 has no model.onnx, so it cannot be served: {reason}"):
        create_app(reg.root, "tiny-itemknn", poll_seconds=0)


def test_no_entry_and_no_champion(tmp_path: Path, seq_export: Path) -> None:
    reg = Registry(tmp_path / "registry")
    _publish(reg, NAME, "v1", seq_export, promote=False)
    with pytest.raises(ServingError, match="tiny-sasrec has no champion .*versions: v1"):
        create_app(reg.root, NAME, poll_seconds=0)
    with pytest.raises(ServingError, match="no registry entry 'other'.*entries: tiny-sasrec"):
        create_app(reg.root, "other", poll_seconds=0)


# --------------------------------------------------------------------------- hot swap


def test_hot_swap_under_load_drops_nothing(registry: Registry, seq_export: Path) -> None:
    app = create_app(registry.root, NAME, poll_seconds=0.05)
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def stream(c: TestClient) -> None:
        while not stop.is_set():
            r = c.post("/recommendations", json={"items": ["i3", "i4"], "k": 5})
            results.append((r.status_code, r.json().get("version", r.text)))

    with TestClient(app) as c:
        threads = [threading.Thread(target=stream, args=(c,)) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            _wait(lambda: len(results) >= 20)
            _publish(registry, NAME, "v2", seq_export)  # published and promoted while requests run
            _wait(lambda: any(v == "v2" for _, v in results[-4:]))
            n_after = len(results)
            _wait(lambda: len(results) >= n_after + 20)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
        health = c.get("/healthz").json()
    assert [r for r in results if r[0] != 200] == []  # zero failed requests
    versions = [v for _, v in results]
    first_v2 = versions.index("v2")
    assert set(versions[:first_v2]) == {"v1"} and first_v2 >= 20
    # Once swapped, only v2 answers (allowing the <=3 other threads' requests already in flight).
    assert set(versions[first_v2 + 4:]) == {"v2"} and len(versions) - first_v2 >= 20
    assert (health["version"], health["status"], health["last_swap_error"]) == ("v2", "ok", None)


def test_a_corrupted_new_champion_is_not_swapped_in(registry: Registry, seq_export: Path) -> None:
    app = create_app(registry.root, NAME, poll_seconds=0)
    watcher: ChampionWatcher = app.state.watcher
    _publish(registry, NAME, "v2", seq_export, promote=False)
    onnx = registry.entry(NAME) / "v2" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-10] + b"0123456789")
    registry._switch_champion(NAME, "v2")  # promoted after the bytes went bad
    with TestClient(app) as c:
        assert watcher.check_once() is False
        health = c.get("/healthz").json()
        assert health["status"] == "degraded" and health["version"] == "v1"
        assert "champion v2 not served: checksum mismatch for v2/model.onnx" in health["last_swap_error"]
        resp = c.post("/recommendations", json={"items": ["i1"]})
        assert resp.status_code == 200 and resp.json()["version"] == "v1"
        # A good v3 promoted next is swapped in and clears the error.
        _publish(registry, NAME, "v3", seq_export)
        assert watcher.check_once() is True
        health = c.get("/healthz").json()
        assert (health["status"], health["version"], health["last_swap_error"]) == ("ok", "v3", None)


def test_a_vanished_champion_pointer_keeps_the_model_and_recovers(registry: Registry) -> None:
    app = create_app(registry.root, NAME, poll_seconds=0)
    watcher: ChampionWatcher = app.state.watcher
    link = registry.entry(NAME) / "champion"
    link.unlink()
    with TestClient(app) as c:
        assert watcher.check_once() is False
        health = c.get("/healthz").json()
        assert (health["status"], health["version"]) == ("degraded", "v1")
        assert "cannot read the champion pointer" in health["last_swap_error"]
        assert c.post("/recommendations", json={"items": ["i1"]}).status_code == 200
        os.symlink("v1", link)  # back to the version being served
        assert watcher.check_once() is False
        assert c.get("/healthz").json()["status"] == "ok"


def _wait(cond: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


# --------------------------------------------------------------------------- the real process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_cmd(registry: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cli", "serve", "--registry", str(registry), *extra]


@pytest.mark.parametrize("workers", [1, 2])
def test_recflow_serve_answers_over_http(registry: Registry, workers: int) -> None:
    port = _free_port()
    env = {**os.environ, "RECFLOW_NO_REEXEC": "1"}
    cmd = _serve_cmd(registry.root, "--port", str(port), "--workers", str(workers))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_until_serving(base, proc)["version"] == "v1"
        for _ in range(20):  # with --workers 2, both processes answer the same
            resp = httpx.post(f"{base}/recommendations", json={"items": ["i10", "i11", "i12"], "k": 3}, timeout=5)
            assert resp.status_code == 200 and resp.json()["items"][0]["item"] == "i13"
        bad = httpx.post(f"{base}/recommendations", content=b"{", headers={"content-type": "application/json"})
        assert bad.status_code == 400
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    # Graceful: uvicorn finishes shutdown, then re-raises the SIGTERM it caught (exit -15).
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out
    assert f"serving {NAME} v1 on http://127.0.0.1:{port}" in out
    assert "Traceback" not in out


def test_recflow_serve_startup_errors_are_one_line_exit_2(registry: Registry, tmp_path: Path) -> None:
    env = {**os.environ, "RECFLOW_NO_REEXEC": "1"}
    onnx = registry.entry(NAME) / "v1" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    cases = [
        (_serve_cmd(registry.root, "--port", "1"), "checksum mismatch for v1/model.onnx"),
        (_serve_cmd(tmp_path / "missing", "--port", "1"), "no registry folder"),
    ]
    (tmp_path / "empty").mkdir()
    cases += [
        (_serve_cmd(tmp_path / "empty", "--port", "1"), "pass --model: "),
    ]
    Registry(tmp_path / "two").publish("a", "v1", [onnx], {}, promote=False)
    Registry(tmp_path / "two").publish("b", "v1", [onnx], {}, promote=False)
    cases.append((_serve_cmd(tmp_path / "two", "--port", "1"), "holds 2 entries (a, b)"))
    cases.append((_serve_cmd(tmp_path / "two", "--model", "a", "--port", "1"), "a has no champion"))
    for cmd, message in cases:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (cmd, proc.stderr)
        assert message in proc.stderr and proc.stderr.startswith("error: ")
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
