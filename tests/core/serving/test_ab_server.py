"""A/B arms, shadow mode and the outcome log in a real `recflow serve` process under concurrent load.

The server is started as a subprocess on a loopback port on the session's tiny SASRec,
registered under two entries (two arms). Assignment is checked request by request against
the record's salt and the persisted key, the split against the weights, stickiness across a
restart, weight changes and the kill switch through `recflow experiment`, and the log files
after a SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
from recflow_testdata import TinyRun
from serve_process import wait_until_serving

from core.data.privacy import pseudonym
from core.modeling.export import export_model
from core.release.registry import Registry
from core.serving.arms import KEY_FILE, Assigner, ExperimentStore
from core.serving.outcome_log import read_log

REPO = Path(__file__).resolve().parents[3]
A, B = "arm-a", "arm-b"
PSEUDONYM_KEY = "test-pseudonym-key-0123456789abcdef"
EVENTS_TOKEN = "test-events-token"
HISTORY = ["i10", "i11", "i12"]


@pytest.fixture(scope="module")
def registry(tiny_run: TinyRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two entries holding the tiny SASRec (champion v1 each): two arms that answer alike."""
    run_dir = tmp_path_factory.mktemp("ab-export")
    record, _ = export_model(tiny_run.config, tiny_run.splits, tiny_run.trained, run_dir)
    assert record.exported
    files = sorted(p for p in (run_dir / "export").iterdir() if p.is_file() and p.name != "model_card.json")
    reg = Registry(tmp_path_factory.mktemp("ab-registry"))
    for name in (A, B):
        reg.publish(name, "v1", files, {"export": {"exported": True}}, promote=True)
    return reg.root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, registry: Path, log_dir: Path, *args: str) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "RECFLOW_NO_REEXEC": "1", "RECFLOW_PSEUDONYM_KEY": PSEUDONYM_KEY,
               "RECFLOW_EVENTS_TOKEN": EVENTS_TOKEN}
        env.pop("RECFLOW_ASSIGNMENT_KEY", None)
        cmd = [sys.executable, "-m", "cli", "serve", "--registry", str(registry), "--port", str(self.port),
               "--log-dir", str(log_dir), "--poll-seconds", "0.2", *args]
        # Its own process group: a SIGKILL (a crash) reaches uvicorn's worker processes too.
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        wait_until_serving(self.base, self.proc)

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.base}/healthz", timeout=5).json()

    def stop(self, sig: int = signal.SIGTERM) -> str:
        if sig == signal.SIGKILL:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        out, _ = self.proc.communicate(timeout=60)
        return out


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.stop(signal.SIGKILL)


async def _load(port: int, bodies: list[dict[str, Any]], concurrency: int = 32) -> list[tuple[int, dict[str, Any]]]:
    """Closed loop over keep-alive connections; (status, JSON answer) in the order of ``bodies``."""
    out: list[tuple[int, dict[str, Any]]] = [(0, {})] * len(bodies)
    queue = list(enumerate(bodies))[::-1]

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while queue:
            i, body = queue.pop()
            data = json.dumps(body).encode()
            writer.write(b"POST /recommendations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
            head = await reader.readuntil(b"\r\n\r\n")
            start = head.lower().index(b"content-length:") + 15
            payload = await reader.readexactly(int(head[start:head.index(b"\r\n", start)]))
            out[i] = (int(head[9:12]), json.loads(payload))
        writer.close()

    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return out


def _expected_arms(log_dir: Path, sessions: list[str]) -> dict[str, str]:
    exp = ExperimentStore(log_dir).load()
    assert exp is not None
    assigner = Assigner((log_dir / KEY_FILE).read_text().strip().encode(), exp.salt, exp.weights())
    return {s: assigner.arm(pseudonym(PSEUDONYM_KEY, s)) for s in sessions}


def test_two_arms_split_by_weight_stick_across_restarts_and_are_logged(registry: Path, tmp_path: Path,
                                                                       servers: list[Server]) -> None:
    log_dir = tmp_path / "log"
    sessions = [f"learner-{i}" for i in range(10_000)]
    args = ("--arm", f"{A}=0.3", "--arm", f"{B}=0.7", "--workers", "2")
    servers.append(server := Server(registry, log_dir, *args))
    answers = asyncio.run(_load(server.port, [{"session": s, "items": HISTORY, "k": 3} for s in sessions]))
    assert [status for status, _ in answers] == [200] * len(sessions)
    got = {s: a["arm"] for s, (_, a) in zip(sessions, answers)}
    assert all(a["model"] == a["arm"] and a["items"][0]["item"] == "i13" for _, a in answers)
    assert got == _expected_arms(log_dir, sessions)  # each answer from the arm its session hashes to
    share_a = Counter(got.values())[A] / len(sessions)
    assert abs(share_a - 0.3) <= 0.02
    # No session: the --model (first arm's entry) champion answers, logged as unassigned.
    anon = httpx.post(f"{server.base}/recommendations", json={"items": HISTORY}, timeout=5).json()
    assert (anon["arm"], anon["model"]) == ("unassigned", A)
    out = server.stop()
    assert "Traceback" not in out and "experiment exp-" in out
    exp_id = ExperimentStore(log_dir).load().id  # type: ignore[union-attr]

    # A restart resumes the experiment: same salt and key, so every learner keeps their arm.
    servers.append(server := Server(registry, log_dir, *args))
    again = asyncio.run(_load(server.port, [{"session": s, "items": HISTORY} for s in sessions[:2000]]))
    assert {s: a["arm"] for s, (_, a) in zip(sessions, again)} == {s: got[s] for s in sessions[:2000]}
    assert server.health()["experiment"]["id"] == exp_id
    # A crash (SIGKILL, no shutdown flush) loses at most what was queued; what was written stays readable.
    server.stop(signal.SIGKILL)

    files = sorted((log_dir / "requests").glob("requests-*.parquet"))
    for p in files:
        pq.read_table(p)  # every visible file is complete, the crash's included
    rows = read_log(log_dir / "requests", "requests").to_pylist()
    # The first run was shut down cleanly (every answer logged); the crashed one lost at most its queue.
    assert len(sessions) + 1 <= len(rows) <= len(sessions) + 1 + 2000
    assert len({r["request_id"] for r in rows}) == len(rows)
    by_session = {pseudonym(PSEUDONYM_KEY, s): got[s] for s in sessions}  # only pseudonyms reach the disk
    assigned = [r for r in rows if r["session"] is not None]
    assert all(by_session[r["session"]] == r["arm"] == r["entry"] and r["experiment"] == exp_id for r in assigned)
    assert [r["arm"] for r in rows if r["session"] is None] == ["unassigned"]
    assert {(tuple(r["items"]), r["n_items"], r["n_unknown"], r["rec_items"][0]) for r in rows} == {
        (tuple(HISTORY), 3, 0, "i13")}
    # One writer per worker process, named in its files: the crashed run's rows are still spools.
    spools = list((log_dir / "requests").glob("requests-*.jsonl"))
    assert len({p.name.split("-")[1] for p in [*files, *spools]}) >= 2


def test_shadow_events_weight_change_and_kill_switch_without_restart(registry: Path, tmp_path: Path,
                                                                     servers: list[Server]) -> None:
    log_dir = tmp_path / "log"
    servers.append(server := Server(registry, log_dir, "--model", A, "--shadow", B))
    answers = asyncio.run(_load(server.port, [{"session": f"u{i}", "items": HISTORY} for i in range(200)], 8))
    assert {(s, a["model"], a["arm"]) for s, a in answers} == {(200, A, A)}  # only the champion's answer
    token = {"authorization": f"Bearer {EVENTS_TOKEN}"}
    event = {"session": "u1", "item": "i13", "kind": "correct", "value": 1.0}
    assert httpx.post(f"{server.base}/events", json=event, timeout=5).status_code == 401
    assert httpx.post(f"{server.base}/events", json={**event, "kind": 3}, headers=token, timeout=5).status_code == 422
    accepted = httpx.post(f"{server.base}/events", json=[event, {**event, "kind": "attempt"}], headers=token, timeout=5)
    assert accepted.status_code == 202 and accepted.json() == {"accepted": 2, "dropped": 0}
    health = server.health()
    assert health["experiment"]["shadows"] == [B] and health["outcome_log"]["requests"]["dropped"] == 0
    assert "Traceback" not in server.stop()
    rows = read_log(log_dir / "requests", "requests").to_pylist()
    live = {r["request_id"]: r for r in rows if not r["shadow"]}
    shadow = {r["request_id"]: r for r in rows if r["shadow"]}
    assert len(live) == 200 and set(shadow) == set(live)  # both logged, under one request id
    assert {(r["arm"], r["entry"]) for r in shadow.values()} == {(B, B)}
    assert all(shadow[k]["rec_items"] == live[k]["rec_items"] for k in live)  # same model under both names
    events = read_log(log_dir / "events", "events").to_pylist()
    assert sorted(e["kind"] for e in events) == ["attempt", "correct"]
    assert {e["session"] for e in events} == {pseudonym(PSEUDONYM_KEY, "u1")}

    # Weights and the kill switch through the record, picked up by the running server.
    log_dir = tmp_path / "log2"
    servers.append(server := Server(registry, log_dir, "--arm", f"{A}=0.5", "--arm", f"{B}=0.5"))
    bodies = [{"session": f"u{i}", "items": HISTORY} for i in range(400)]
    before = [a["arm"] for _, a in asyncio.run(_load(server.port, bodies, 8))]
    assert set(before) == {A, B}
    env = {**os.environ, "RECFLOW_NO_REEXEC": "1"}
    cli = [sys.executable, "-m", "cli", "experiment", "--log-dir", str(log_dir)]
    changed = subprocess.run([*cli, "--weight", f"{B}=0"], cwd=REPO, env=env, capture_output=True, text=True)
    assert changed.returncode == 0 and "weight 0" in changed.stdout, changed.stderr
    _wait(lambda: server.health()["experiment"]["weights"] == {A: 0.5, B: 0.0})
    after = [a["arm"] for _, a in asyncio.run(_load(server.port, bodies, 8))]
    assert set(after) == {A} and all(b == A for a, b in zip(after, before) if b == A)
    bad = subprocess.run([*cli, "--weight", "nope=1"], cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: no live arm nope") and "Traceback" not in bad.stderr
    stop = subprocess.run([*cli, "--stop"], cwd=REPO, env=env, capture_output=True, text=True)
    assert stop.returncode == 0 and "stopped at" in stop.stdout
    _wait(lambda: server.health()["experiment"]["id"] is None)
    killed = [a for _, a in asyncio.run(_load(server.port, bodies[:50], 8))]
    assert {(a["arm"], a["model"]) for a in killed} == {("champion", A)}
    server.stop()
    tail = [r for r in read_log(log_dir / "requests", "requests").to_pylist() if r["arm"] == "champion"]
    assert len(tail) == 50 and {r["experiment"] for r in tail} == {None}


def test_serve_flag_mistakes_are_one_line_exit_2(registry: Path, tmp_path: Path) -> None:
    env = {**os.environ, "RECFLOW_NO_REEXEC": "1", "RECFLOW_PSEUDONYM_KEY": PSEUDONYM_KEY}
    base = [sys.executable, "-m", "cli", "serve", "--registry", str(registry), "--port", "1"]
    cases = [
        ([*base, "--arm", f"{A}=0.5"], "--arm and --shadow need --log-dir"),
        ([*base, "--arm", f"{A}", "--log-dir", str(tmp_path)], "expected ENTRY[:VERSION]=WEIGHT"),
        ([*base, "--arm", f"{A}=1", "--arm", "nope=1", "--log-dir", str(tmp_path)], "no registry entry 'nope'"),
        ([*base, "--arm", f"{A}:v9=1", "--log-dir", str(tmp_path)], f"{A}/v9 does not exist"),
    ]
    for cmd, message in cases:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, (cmd, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    no_key = {k: v for k, v in env.items() if k != "RECFLOW_PSEUDONYM_KEY"}
    proc = subprocess.run([*base, "--model", A, "--log-dir", str(tmp_path)], cwd=REPO, env=no_key,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "set RECFLOW_PSEUDONYM_KEY" in proc.stderr and "Traceback" not in proc.stderr


def _wait(cond: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)
