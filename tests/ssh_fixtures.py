"""Session fixtures for tests that ship to a real OpenSSH server (tests/sshd_server.py).

Load them in a test module with ``pytest_plugins = ["ssh_fixtures"]``. A missing OpenSSH server
fails these tests (it does not skip them): ``.ci/setup`` installs it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sshd_server import KEY_ENV, PASSPHRASE_ENV, SshServer, SshServerError, missing_binaries, shipping_settings

from core.config import ShippingConfig


@pytest.fixture(scope="session")
def sshd() -> Iterator[SshServer]:
    problem = missing_binaries()
    if problem:
        pytest.fail(problem, pytrace=False)
    try:
        server = SshServer()
    except SshServerError as exc:
        pytest.fail(f"could not start the test sshd: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def ship_settings(sshd: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ShippingConfig:
    """Shipping to ``<tmp>/prod`` on the test sshd, with the client key FILE named by $RECFLOW_SSH_KEY."""
    monkeypatch.setenv(KEY_ENV, str(sshd.client_key))
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    return shipping_settings(sshd, tmp_path / "prod")
