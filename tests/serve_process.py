"""Waiting for a ``recflow serve`` subprocess to answer (the service tests share it)."""

from __future__ import annotations

import subprocess
import time
from typing import Any

import httpx


def wait_until_serving(base: str, proc: subprocess.Popen[str], timeout: float = 120.0) -> dict[str, Any]:
    """``GET /healthz`` of the server at ``base`` once it answers; AssertionError with its output if it exits or times out.

    Args:
        base: ``http://127.0.0.1:<port>``.
        proc: the server process (stdout piped as text, stderr merged into it).
        timeout: seconds to wait.

    Returns:
        The health answer.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(f"{base}/healthz", timeout=2).json()
        except httpx.TransportError as exc:
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read() if proc.stdout else ""
                raise AssertionError(f"server did not come up: {out}") from exc
            time.sleep(0.2)
