"""The flow ships a promoted version to a real sshd on 127.0.0.1, and nothing for a rejected run."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from recflow_testdata import DATA_FILE, Interaction, tiny_config, write_csv
from sshd_server import KEY_ENV, SshServer, shipping_settings

from core.config import PipelineConfig
from core.errors import HostKeyError, PipelineFailed, ShippingAuthError, ShippingConnectionError
from core.records import PipelineResult
from core.release.registry import CHAMPION, Registry
from core.release.shipping import MANIFEST_FILE
from flows.training_pipeline import training_pipeline
from tasks.ship import retry_on_connection_error

pytest_plugins = ["ssh_fixtures"]


@dataclass
class ShipEnv:
    root: Path
    config: PipelineConfig
    registry: Registry
    remote: Path  # <remote_dir>/<model>


@pytest.fixture(scope="module")
def env(prefect_harness: None, sshd: SshServer, tmp_path_factory: pytest.TempPathFactory,
        tiny_rows: list[Interaction]) -> Iterator[ShipEnv]:
    root = tmp_path_factory.mktemp("ship-flow")
    config = tiny_config(root, write_csv(tiny_rows, root / "data" / DATA_FILE))
    config = config.model_copy(update={"shipping": shipping_settings(sshd, root / "prod")})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, str(sshd.client_key))
        yield ShipEnv(root, config, Registry(config.registry.path), root / "prod" / config.registry_name)


@pytest.fixture(scope="module")
def first(env: ShipEnv) -> PipelineResult:
    return training_pipeline(env.config)


def _tree(path: Path) -> dict[str, Any]:
    """Every entry under ``path`` with its content hash (files) or target (links) and mtime."""
    out: dict[str, Any] = {}
    for p in sorted(path.rglob("*")):
        st = p.lstat()
        rel = p.relative_to(path).as_posix()
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p), st.st_mtime_ns)
        elif p.is_file():
            out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns)
        else:
            out[rel] = ("dir", st.st_mtime_ns)
    return out


def _connections(sshd: SshServer) -> int:
    return sshd.log().count("Connection from 127.0.0.1")


def test_promoted_run_ships_the_registered_version(env: ShipEnv, first: PipelineResult) -> None:
    assert first.status == "promoted"
    assert first.shipped == first.model_version == first.champion
    local = env.registry.entry(env.config.registry_name) / str(first.model_version)
    remote = env.remote / str(first.model_version)
    assert os.readlink(env.remote / CHAMPION) == first.model_version
    names = sorted(p.name for p in local.iterdir())
    assert "model.onnx" in names and sorted(p.name for p in remote.iterdir()) == sorted(names + [MANIFEST_FILE])
    for name in names:
        assert (remote / name).read_bytes() == (local / name).read_bytes(), name


def test_rejected_run_leaves_production_untouched(env: ShipEnv, first: PipelineResult, sshd: SshServer) -> None:
    before, connections = _tree(env.remote), _connections(sshd)
    second = training_pipeline(env.config)  # same data and seed: does not beat the champion
    assert second.status == "rejected" and second.shipped is None
    assert second.champion == first.model_version
    assert _tree(env.remote) == before
    assert _connections(sshd) == connections  # not even a connection was made


def test_refused_host_key_fails_the_ship_stage_once(env: ShipEnv, first: PipelineResult, sshd: SshServer) -> None:
    # A fresh registry, so this run is promoted and reaches the ship step.
    empty = env.root / "empty_known_hosts"
    empty.write_text("")
    config = env.config.model_copy(update={
        "registry": env.config.registry.model_copy(update={"path": env.root / "registry-2"}),
        "shipping": env.config.shipping.model_copy(update={"known_hosts": empty}),
    })
    before, connections = _tree(env.remote), _connections(sshd)
    with pytest.raises(PipelineFailed) as info:
        training_pipeline(config)
    assert info.value.stage == "ship"
    assert f"127.0.0.1:{sshd.port} is not in {empty}" in info.value.error
    assert _connections(sshd) == connections + 1  # a host-key refusal is not retried
    assert _tree(env.remote) == before
    assert empty.read_text() == ""
    # The version is registered, but the local champion moves only after a successful ship.
    registry = Registry(env.root / "registry-2")
    assert len(registry.versions(config.registry_name)) == 1
    assert registry.champion_version(config.registry_name) is None


class _State:
    def __init__(self, exc: BaseException | None) -> None:
        self.exc = exc

    def result(self) -> None:
        if self.exc is not None:
            raise self.exc


@pytest.mark.parametrize(("exc", "retry"), [
    (ShippingConnectionError("connection to host lost"), True),
    (OSError("network unreachable"), True),
    (HostKeyError("host key of h:22 is not in known_hosts"), False),
    (ShippingAuthError("refused the SSH key"), False),
    (None, False),
])
def test_ship_task_retries_only_transient_failures(exc: BaseException | None, retry: bool) -> None:
    assert retry_on_connection_error(None, None, _State(exc)) is retry
