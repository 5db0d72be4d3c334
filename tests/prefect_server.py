"""A real ``prefect server start`` on a loopback port and ``prefect worker start`` subprocesses,
each in its own process group, for tests that need Prefect's scheduler and workers for real."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[Any]) -> None:
    """Stop a process group we started; an idle worker ignores the first SIGTERM, so send two."""
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue


def client_env(root: Path, api: str) -> dict[str, str]:
    """The environment of every process talking to the server: its own PREFECT_HOME, no telemetry."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return env | {
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_API_URL": api,
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "GX_ANALYTICS_ENABLED": "False",
    }


def api_get(api: str, path: str) -> Any:
    response = httpx.get(f"{api}{path}", timeout=30)
    response.raise_for_status()
    return response.json()


def api_post(api: str, path: str, body: dict[str, Any]) -> Any:
    response = httpx.post(f"{api}{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


@contextmanager
def prefect_server(root: Path, startup_seconds: float = 120,
                   extra_env: dict[str, str] | None = None) -> Iterator[tuple[str, dict[str, str]]]:
    """Yield (api url, env for clients) of a server running until the block ends; ``extra_env``
    goes to the server and into the yielded env."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = client_env(root, api) | (extra_env or {})
    log = (root / "server.log").open("w")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + startup_seconds
        while True:
            assert server.poll() is None, (root / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"prefect server did not answer /api/health within {startup_seconds} s"
            time.sleep(0.5)
        yield api, env
    finally:
        stop(server)
        log.close()


def start_worker(pool: str, root: Path, env: dict[str, str], log_name: str) -> subprocess.Popen[Any]:
    """A long-running process worker polling ``pool`` every second (stop it with ``stop``)."""
    log = (root / log_name).open("w")
    try:
        return subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool],
                                cwd=root, env=env | {"PREFECT_WORKER_QUERY_SECONDS": "1"}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()  # the child holds its own descriptor
