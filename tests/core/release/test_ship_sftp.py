"""Shipping to a real OpenSSH server on 127.0.0.1 (tests/sshd_server.py) with throwaway keys.

The "remote" directory is on this machine, so the tests read what the host holds straight from
disk: files, SHA-256, the champion symlink. Faults are real: the server's session processes are
killed mid-upload, known_hosts holds no or another key, the client presents an unknown key.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from sshd_server import KEY_ENV, PASSPHRASE_ENV, SshServer, keygen, shipping_settings

from core.config import ShippingConfig, load_config
from core.errors import ConfigError, HostKeyError, ShippingAuthError, ShippingConnectionError, ShippingError
from core.release.registry import Registry
from core.release.shipping import (
    CHAMPION,
    HISTORY_FILE,
    MANIFEST_FILE,
    load_private_key,
    remote_status,
    rollback,
    ship_version,
)

pytest_plugins = ["ssh_fixtures"]

NAME = "tiny-sasrec"
REPO = Path(__file__).resolve().parents[3]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def publish(tmp_path: Path) -> Callable[..., Path]:
    """Register a version with real files in a local registry; returns its directory."""
    registry = Registry(tmp_path / "registry")
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    counter = iter(range(1000))

    def _publish(model_bytes: int = 50_000) -> Path:
        n = next(counter)
        files = []
        for name, content in [("model.onnx", os.urandom(model_bytes)), ("metrics.json", json.dumps({"ndcg@10": n}).encode()),
                              ("config.yaml", f"training:\n  epochs: {n}\n".encode())]:
            (src / name).write_bytes(content)
            files.append(src / name)
        promotion = registry.publish(NAME, f"v{n:03d}", files, {"model": "SASRec"}, promote=True)
        return promotion.version_dir

    return _publish


def _model_dir(settings: ShippingConfig) -> Path:
    return Path(str(settings.remote_dir)) / NAME


def _champion(settings: ShippingConfig) -> str | None:
    link = _model_dir(settings) / CHAMPION
    return os.readlink(link) if link.is_symlink() else None


def _ship(version_dir: Path, settings: ShippingConfig, **kwargs: object) -> object:
    return ship_version(version_dir, NAME, version_dir.name, settings, **kwargs)  # type: ignore[arg-type]


def _entries(settings: ShippingConfig) -> list[str]:
    return sorted(p.name for p in _model_dir(settings).iterdir())


# --- a good ship --------------------------------------------------------------------------------


def test_ship_uploads_verified_files_and_switches_the_champion(
    ship_settings: ShippingConfig, publish: Callable[..., Path]
) -> None:
    local = publish(model_bytes=300_000)
    result = _ship(local, ship_settings)
    remote = _model_dir(ship_settings) / local.name
    local_files = sorted(p.name for p in local.iterdir())
    assert sorted(p.name for p in remote.iterdir()) == sorted(local_files + [MANIFEST_FILE])
    for name in local_files:
        assert _sha(remote / name) == _sha(local / name), name
    manifest = json.loads((remote / MANIFEST_FILE).read_text())
    assert manifest["version"] == local.name and manifest["shipped_at"]
    assert {n: f["sha256"] for n, f in manifest["files"].items()} == {n: _sha(local / n) for n in local_files}
    # Relative target, no temp names left behind.
    assert _champion(ship_settings) == local.name
    assert _entries(ship_settings) == sorted([CHAMPION, HISTORY_FILE, local.name])
    assert result.uploaded and result.champion == local.name and result.previous_champion is None  # type: ignore[attr-defined]
    assert result.files == len(local_files)  # type: ignore[attr-defined]
    assert result.bytes == sum((local / n).stat().st_size for n in local_files)  # type: ignore[attr-defined]
    history = json.loads((_model_dir(ship_settings) / HISTORY_FILE).read_text())
    assert [(e["version"], e["action"]) for e in history] == [(local.name, "ship")]


def test_key_text_in_the_environment_works(
    ship_settings: ShippingConfig, publish: Callable[..., Path], sshd: SshServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, sshd.client_key.read_text())
    local = publish()
    _ship(local, ship_settings)
    assert _champion(ship_settings) == local.name


def test_reship_of_a_present_version_verifies_and_only_switches(
    ship_settings: ShippingConfig, publish: Callable[..., Path]
) -> None:
    v0, v1 = publish(), publish()
    _ship(v0, ship_settings)
    _ship(v1, ship_settings)
    manifest_before = (_model_dir(ship_settings) / v0.name / MANIFEST_FILE).read_bytes()
    again = _ship(v0, ship_settings)
    assert again.uploaded is False and again.previous_champion == v1.name  # type: ignore[attr-defined]
    assert _champion(ship_settings) == v0.name
    assert (_model_dir(ship_settings) / v0.name / MANIFEST_FILE).read_bytes() == manifest_before
    # Same name, different bytes on the host: refused, never overwritten.
    (_model_dir(ship_settings) / v1.name / "metrics.json").write_text('{"tampered": true}')
    with pytest.raises(ShippingError, match="already exists with different content"):
        _ship(v1, ship_settings)
    assert _champion(ship_settings) == v0.name


def test_a_file_changing_during_upload_fails_the_remote_checksum(
    ship_settings: ShippingConfig, publish: Callable[..., Path]
) -> None:
    v0, v1 = publish(), publish()
    _ship(v0, ship_settings)
    card = v1 / "model_card.json"  # uploaded last; hashed before the upload started

    def tamper(sent: int, total: int) -> None:
        if sent and not tamper.done:  # type: ignore[attr-defined]
            card.write_text(card.read_text() + " ")
            tamper.done = True  # type: ignore[attr-defined]

    tamper.done = False  # type: ignore[attr-defined]
    with pytest.raises(ShippingError, match=r"SHA-256 on the host does not match for model_card\.json"):
        _ship(v1, ship_settings, progress=tamper)
    assert _champion(ship_settings) == v0.name
    assert _entries(ship_settings) == sorted([CHAMPION, HISTORY_FILE, v0.name])  # temp dir removed


# --- host keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["", "other.example.org ssh-ed25519 {other}\n"], ids=["empty", "other-host"])
def test_unknown_host_is_refused_and_known_hosts_untouched(
    ship_settings: ShippingConfig, publish: Callable[..., Path], sshd: SshServer, tmp_path: Path, content: str
) -> None:
    other_key = keygen(tmp_path / "other_host_key")
    known = tmp_path / "known_hosts_unknown"
    known.write_text(content.format(other=other_key.with_suffix(".pub").read_text().split()[1]))
    before = known.read_bytes()
    settings = ship_settings.model_copy(update={"known_hosts": known})
    with pytest.raises(HostKeyError) as info:
        _ship(publish(), settings)
    message = str(info.value)
    assert f"127.0.0.1:{sshd.port} is not in {known}" in message
    assert "refusing to connect" in message and "SHA256:" in message
    assert known.read_bytes() == before
    assert not Path(str(settings.remote_dir)).exists()


def test_missing_known_hosts_file_is_refused(
    ship_settings: ShippingConfig, publish: Callable[..., Path], tmp_path: Path
) -> None:
    absent = tmp_path / "no" / "known_hosts"
    with pytest.raises(HostKeyError, match="does not exist"):
        _ship(publish(), ship_settings.model_copy(update={"known_hosts": absent}))
    assert not absent.exists()


def test_mismatched_host_key_is_refused(
    ship_settings: ShippingConfig, publish: Callable[..., Path], sshd: SshServer, tmp_path: Path
) -> None:
    impostor = keygen(tmp_path / "impostor_key")
    known = tmp_path / "known_hosts_mismatch"
    known.write_text(sshd.known_hosts_line(impostor.with_suffix(".pub")))
    before = known.read_bytes()
    with pytest.raises(HostKeyError, match=rf"127\.0\.0\.1:{sshd.port} does NOT match"):
        _ship(publish(), ship_settings.model_copy(update={"known_hosts": known}))
    assert known.read_bytes() == before
    assert not Path(str(ship_settings.remote_dir)).exists()


# --- authentication ----------------------------------------------------------------------------


def test_wrong_key_is_an_auth_error_without_the_key(
    ship_settings: ShippingConfig, publish: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stranger = keygen(tmp_path / "stranger")
    text = stranger.read_text()
    monkeypatch.setenv(KEY_ENV, text)
    with pytest.raises(ShippingAuthError) as info:
        _ship(publish(), ship_settings)
    message = str(info.value)
    assert "refused the SSH key" in message and "SHA256:" in message
    body = [line for line in text.splitlines() if line and "PRIVATE KEY" not in line]
    assert body and not any(line in message for line in body)
    assert "PRIVATE KEY" not in message
    assert not Path(str(ship_settings.remote_dir)).exists()


def test_key_loading_errors_name_the_source_not_the_secret(
    ship_settings: ShippingConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ShippingAuthError, match=f"set {KEY_ENV}"):
        load_private_key(ship_settings)
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "nope"))
    with pytest.raises(ShippingAuthError, match="does not exist"):
        load_private_key(ship_settings)
    garbage = "-----BEGIN OPENSSH PRIVATE KEY-----\nnot-a-key-c2VjcmV0\n-----END OPENSSH PRIVATE KEY-----\n"
    monkeypatch.setenv(KEY_ENV, garbage)
    with pytest.raises(ShippingAuthError, match="cannot be loaded") as info:
        load_private_key(ship_settings)
    assert "not-a-key" not in str(info.value)
    # An encrypted key: a clear error without the passphrase, and it loads with it.
    locked = tmp_path / "locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "s3cret-pass", "-f", str(locked)], check=True)
    monkeypatch.setenv(KEY_ENV, str(locked))
    with pytest.raises(ShippingAuthError, match=f"encrypted; put its passphrase in {PASSPHRASE_ENV}"):
        load_private_key(ship_settings)
    monkeypatch.setenv(PASSPHRASE_ENV, "s3cret-pass")
    assert load_private_key(ship_settings).get_name() == "ssh-ed25519"


def test_key_from_a_secret_block_loader(
    ship_settings: ShippingConfig, sshd: SshServer, publish: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV)
    settings = ship_settings.model_copy(update={"key_secret_block": "prod-ssh-key"})
    asked: list[str] = []

    def loader(name: str) -> str:
        asked.append(name)
        return sshd.client_key.read_text()

    local = publish()
    _ship(local, settings, secret_loader=loader)
    assert asked == ["prod-ssh-key"] and _champion(settings) == local.name

    def broken(name: str) -> str:
        raise ValueError("block 'prod-ssh-key' not found")

    with pytest.raises(ShippingAuthError, match="cannot read the SSH key from Prefect Secret block 'prod-ssh-key'"):
        load_private_key(settings, secret_loader=broken)
    with pytest.raises(ShippingAuthError, match="only inside a Prefect flow"):
        load_private_key(settings)


# --- a connection cut mid-upload -----------------------------------------------------------------


@pytest.mark.timeout(120)
def test_connection_cut_mid_upload_leaves_the_champion_and_the_next_ship_cleans_up(
    ship_settings: ShippingConfig, publish: Callable[..., Path], sshd: SshServer
) -> None:
    v0 = publish()
    _ship(v0, ship_settings)
    big = publish(model_bytes=4_000_000)
    cut: list[int] = []

    def kill_midway(sent: int, total: int) -> None:
        if not cut and sent > 1_000_000:
            cut.append(sshd.kill_sessions())

    with pytest.raises(ShippingConnectionError) as info:
        _ship(big, ship_settings, progress=kill_midway)
    assert cut and cut[0] >= 1, "the sshd session was not killed"
    assert "lost while uploading model.onnx" in str(info.value)
    assert "champion was not changed" in str(info.value)
    model_dir = _model_dir(ship_settings)
    assert _champion(ship_settings) == v0.name
    assert not (model_dir / big.name).exists()
    stale = [p for p in model_dir.iterdir() if p.name.startswith(".incoming-")]
    assert len(stale) == 1
    partial = stale[0] / "model.onnx"
    assert not partial.exists() or partial.stat().st_size < (big / "model.onnx").stat().st_size
    assert remote_status(NAME, ship_settings).incoming == [stale[0].name]

    result = _ship(big, ship_settings)
    assert result.stale_removed == [stale[0].name]  # type: ignore[attr-defined]
    assert _champion(ship_settings) == big.name
    assert _sha(model_dir / big.name / "model.onnx") == _sha(big / "model.onnx")
    assert _entries(ship_settings) == sorted([CHAMPION, HISTORY_FILE, v0.name, big.name])


def test_unreachable_host_is_a_connection_error(ship_settings: ShippingConfig, publish: Callable[..., Path]) -> None:
    from sshd_server import free_port

    with pytest.raises(ShippingConnectionError, match="cannot connect to 127.0.0.1"):
        _ship(publish(), ship_settings.model_copy(update={"port": free_port()}))


# --- retention and rollback ----------------------------------------------------------------------


def test_keep_versions_prunes_oldest_but_never_the_champion_or_the_previous_one(
    ship_settings: ShippingConfig, publish: Callable[..., Path]
) -> None:
    settings = ship_settings.model_copy(update={"keep_versions": 2})
    v = [publish() for _ in range(7)]
    for version_dir in v[:4]:
        result = _ship(version_dir, settings)
    assert result.pruned == [v[1].name]  # type: ignore[attr-defined]
    model_dir = _model_dir(settings)
    (model_dir / "notes").mkdir()  # not ours (no manifest): never pruned
    assert [x.version for x in remote_status(NAME, settings).versions] == [v[2].name, v[3].name]
    rollback(NAME, settings, to_version=v[2].name)
    # v4 becomes champion; v2 was the champion just before it, so it stays although it is oldest.
    assert _ship(v[4], settings).pruned == []  # type: ignore[attr-defined]
    assert [x.version for x in remote_status(NAME, settings).versions] == [v[2].name, v[3].name, v[4].name]
    keep_one = settings.model_copy(update={"keep_versions": 1})
    assert _ship(v[5], keep_one).pruned == [v[2].name, v[3].name]  # type: ignore[attr-defined]
    assert [x.version for x in remote_status(NAME, settings).versions] == [v[4].name, v[5].name]
    assert (model_dir / "notes").is_dir()
    assert _champion(settings) == v[5].name


def test_rollback_walks_back_through_champions(ship_settings: ShippingConfig, publish: Callable[..., Path]) -> None:
    v0, v1, v2, v3 = (publish() for _ in range(4))
    for version_dir in (v0, v1, v2):
        _ship(version_dir, ship_settings)
    back = rollback(NAME, ship_settings)
    assert (back.previous_champion, back.champion, back.changed) == (v2.name, v1.name, True)
    assert _champion(ship_settings) == v1.name
    assert rollback(NAME, ship_settings).champion == v0.name
    with pytest.raises(ShippingError, match="no earlier champion"):
        rollback(NAME, ship_settings)
    assert _champion(ship_settings) == v0.name
    assert rollback(NAME, ship_settings, to_version=v2.name).champion == v2.name
    assert rollback(NAME, ship_settings, to_version=v2.name).changed is False
    # Rolling back from v2 pops it: after shipping v3, a rollback returns to v0, not the rolled-away v2.
    assert rollback(NAME, ship_settings).champion == v0.name
    _ship(v3, ship_settings)
    assert rollback(NAME, ship_settings).champion == v0.name
    history = json.loads((_model_dir(ship_settings) / HISTORY_FILE).read_text())
    assert [e["action"] for e in history][-2:] == ["ship", "rollback"]


def test_rollback_refuses_missing_or_damaged_versions(
    ship_settings: ShippingConfig, publish: Callable[..., Path]
) -> None:
    with pytest.raises(ShippingError, match="nothing shipped for"):
        rollback(NAME, ship_settings)
    v0, v1 = publish(), publish()
    _ship(v0, ship_settings)
    _ship(v1, ship_settings)
    with pytest.raises(ShippingError, match=rf"version v999 of {NAME} is not on .* \(there: {v0.name}, {v1.name}\)"):
        rollback(NAME, ship_settings, to_version="v999")
    (_model_dir(ship_settings) / v0.name / "model.onnx").write_bytes(b"truncated")
    with pytest.raises(ShippingError, match=r"SHA-256 on the host does not match for model\.onnx"):
        rollback(NAME, ship_settings)
    assert _champion(ship_settings) == v1.name


# --- configuration ------------------------------------------------------------------------------


def test_shipping_config_errors_are_one_clear_line() -> None:
    with pytest.raises(ConfigError, match=r"shipping is enabled but shipping.host, shipping.remote_dir is not set"):
        load_config(overrides={"shipping.enabled": True, "shipping.username": "deploy"})
    with pytest.raises(ConfigError, match="shipping.remote_dir must be an absolute path"):
        load_config(overrides={"shipping.remote_dir": "models"})
    with pytest.raises(ConfigError, match="shipping.hostname"):
        load_config(overrides={"shipping.hostname": "x"})
    assert load_config().shipping.enabled is False
    assert load_config().shipping.known_hosts == Path("~/.ssh/known_hosts")


# --- the CLI ------------------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "RECFLOW_NO_REEXEC": "1", **env}, timeout=120)


def test_cli_ship_status_rollback(ship_settings: ShippingConfig, publish: Callable[..., Path], sshd: SshServer) -> None:
    v0, v1 = publish(), publish()
    registry = v0.parent.parent
    env = {KEY_ENV: str(sshd.client_key)}
    target = ["--host", "127.0.0.1", "--port", str(sshd.port), "--user", sshd.user,
              "--remote-dir", str(ship_settings.remote_dir), "--known-hosts", str(sshd.known_hosts)]
    first = _cli("ship", NAME, "--registry", str(registry), "--version", v0.name, *target, env=env)
    assert first.returncode == 0, first.stderr
    second = _cli("ship", NAME, "--registry", str(registry), *target, env=env)  # the local champion: v1
    assert second.returncode == 0, second.stderr
    assert f"host champion: {v1.name} (was {v0.name})" in second.stdout
    status = _cli("remote-status", NAME, *target, env=env)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0].endswith(f"champion: {v1.name}")
    assert lines[1].startswith(f"  {v0.name}") and lines[2].startswith(f"* {v1.name}")
    back = _cli("rollback", NAME, *target, env=env)
    assert back.returncode == 0 and f"champion {v1.name} -> {v0.name}" in back.stdout
    assert _champion(ship_settings) == v0.name

    missing = _cli("rollback", NAME, "--to", "v404", *target, env=env)
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: version v404") and "Traceback" not in missing.stderr
    unknown = sshd.dir / "empty_known_hosts"
    unknown.write_text("")
    refused = _cli("ship", NAME, "--registry", str(registry), *target, "--known-hosts", str(unknown), env=env)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert next(ln for ln in refused.stderr.splitlines() if ln.startswith("error:")).count("is not in") == 1
    no_host = _cli("ship", NAME, "--registry", str(registry), env=env)
    assert no_host.returncode == 2 and "no production host configured: set --host" in no_host.stderr
    no_key = _cli("remote-status", NAME, *target, env={KEY_ENV: ""})
    assert no_key.returncode == 2 and f"set {KEY_ENV}" in no_key.stderr
    assert _champion(ship_settings) == v0.name


def test_settings_helper_matches_the_server(sshd: SshServer, tmp_path: Path) -> None:
    # Guards the fixtures themselves: strict checking passes only because known_hosts names this server.
    settings = shipping_settings(sshd, tmp_path / "prod")
    assert settings.port == sshd.port and settings.known_hosts == sshd.known_hosts
    assert sshd.known_hosts.read_text().startswith(f"[127.0.0.1]:{sshd.port} ssh-ed25519 ")
