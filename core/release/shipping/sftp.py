"""Ship a registered version to a production host over SFTP, and roll the host's champion back.

Interface (all take a ``ShippingConfig``; none imports Prefect)::

    ship_version(version_dir, model_name, version, settings, *, pkey=None, secret_loader=None,
                 progress=None, logger=None) -> ShipResult
    rollback(model_name, settings, *, to_version=None, pkey=None, secret_loader=None, logger=None)
        -> RollbackResult
    remote_status(model_name, settings, *, pkey=None, secret_loader=None) -> RemoteStatus
    load_private_key(settings, *, secret_loader=None) -> paramiko.PKey

``pkey`` defaults to ``load_private_key(settings, secret_loader=...)``: the env var
``settings.key_env`` (a key file path or the key text), else the Prefect Secret block
``settings.key_secret_block`` read through ``secret_loader(name)`` (the Prefect task passes one).

Remote layout (the same shape as the local registry)::

    <remote_dir>/<model>/<version>/          the files + ship_manifest.json (sha256 per file, shipped_at)
    <remote_dir>/<model>/champion            symlink -> <version>, only ever replaced by rename(2)
    <remote_dir>/<model>/champion_history.json   every champion switch (ship / rollback)
    <remote_dir>/<model>/.incoming-<version>-<hex>/   an upload in progress (or cut off)

Guarantees: the host key must already be in ``known_hosts`` (unknown or changed keys are
refused with ``HostKeyError``; nothing is ever added); authentication is by key only. Files go
to a hidden ``.incoming-*`` directory, their SHA-256 is computed ON THE HOST (``sha256sum`` over
the same SSH connection) and compared with the local files, and only then is the directory
renamed to ``<version>`` and the champion symlink swapped (symlink under a temp name, then
``posix-rename@openssh.com``, i.e. rename(2)). So a cut connection or a corrupted upload leaves
the served champion exactly as it was; the next ship removes the stale ``.incoming-*``.
Ships of one model to one host must not run concurrently (the next ship cleans the other's
``.incoming-*`` directory).

Errors are ``core.errors.ShippingError`` subclasses: ``HostKeyError`` and ``ShippingAuthError``
are permanent; ``ShippingConnectionError`` is transient (the Prefect task retries only that).
No message or log line holds key material; key fingerprints (public) may appear.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import secrets
import shlex
import socket
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paramiko
from pydantic import BaseModel, Field

from core.config import ShippingConfig
from core.errors import ChecksumError, HostKeyError, ShippingAuthError, ShippingConnectionError, ShippingError
from core.release.artifacts import (
    CHAMPION_LINK,
    CHECKSUMS_FILE,
    SHIP_MANIFEST_FILE,
    read_checksums,
    sha256_file,
    verify_digest,
)
from core.secrets import SecretLoader, env_or_block

CHAMPION = CHAMPION_LINK
MANIFEST_FILE = SHIP_MANIFEST_FILE
HISTORY_FILE = "champion_history.json"
INCOMING_PREFIX = ".incoming-"
HISTORY_LIMIT = 200
# sha256sum of a large model on a slow disk can take a while; a dead connection fails sooner.
EXEC_TIMEOUT_S = 600.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")

Progress = Callable[[int, int], None]
Log = logging.Logger | logging.LoggerAdapter  # type: ignore[type-arg]

_log = logging.getLogger("recflow.shipping")


class RemoteVersion(BaseModel):
    version: str
    shipped_at: str | None = Field(default=None, description=f"from the version's {SHIP_MANIFEST_FILE}")
    files: int = 0
    bytes: int = 0


class ShipResult(BaseModel):
    host: str = Field(description="user@host:port")
    model_dir: str = Field(description="<remote_dir>/<model> on the host")
    model_name: str
    version: str
    champion: str = Field(description="the host's champion after shipping (= version)")
    previous_champion: str | None = None
    uploaded: bool = Field(description="False when the version was already on the host (verified, not re-sent)")
    files: int
    bytes: int
    seconds: float
    pruned: list[str] = Field(default_factory=list, description="old versions removed (keep_versions)")
    stale_removed: list[str] = Field(default_factory=list, description="leftovers of cut uploads removed")


class RollbackResult(BaseModel):
    host: str
    model_name: str
    champion: str = Field(description="the host's champion after the rollback")
    previous_champion: str | None
    changed: bool


class RemoteStatus(BaseModel):
    host: str
    model_dir: str
    model_name: str
    champion: str | None
    versions: list[RemoteVersion] = Field(description="oldest shipped first")
    incoming: list[str] = Field(default_factory=list, description="unfinished uploads (removed by the next ship)")


# ---------------------------------------------------------------------------------------------
# Key


def load_private_key(settings: ShippingConfig, *, secret_loader: SecretLoader | None = None) -> paramiko.PKey:
    """The private key from ``$key_env`` (file path or key text), else the Prefect Secret block.

    Errors name where the key was looked for, never its content.
    """
    env = settings.key_env
    value, origin = env_or_block(env, settings.key_secret_block, secret_loader, what="the SSH key",
                                 block_field="shipping.key_secret_block", error=ShippingAuthError)
    if not value:
        raise ShippingAuthError(
            f"no SSH private key for shipping: set {env} to a key file path (or the key text), "
            f"or shipping.key_secret_block to a Prefect Secret block"
        )
    passphrase = os.environ.get(settings.passphrase_env) or None
    try:
        if "PRIVATE KEY-----" in value:
            return _key_from_text(value, passphrase)
        path = Path(value).expanduser()
        if not path.is_file():
            raise ShippingAuthError(f"the SSH key file named by {origin} does not exist: {path}")
        try:
            # from_path hands the passphrase to cryptography, which wants bytes.
            return paramiko.PKey.from_path(path, passphrase.encode("utf-8") if passphrase else None)
        except TypeError:
            # cryptography's way of saying "encrypted, no passphrase" (or "not encrypted, passphrase given").
            if passphrase is None:
                raise paramiko.PasswordRequiredException() from None
            return paramiko.PKey.from_path(path, None)
    except ShippingAuthError:
        raise
    except paramiko.PasswordRequiredException:
        raise ShippingAuthError(
            f"the SSH key from {origin} is encrypted; put its passphrase in {settings.passphrase_env}"
        ) from None
    except (paramiko.SSHException, ValueError, TypeError, OSError) as exc:
        # The exception text of a parser can quote input; name only its type.
        raise ShippingAuthError(
            f"the SSH key from {origin} cannot be loaded ({type(exc).__name__}): expected an OpenSSH or PEM "
            f"ed25519/ecdsa/rsa private key (wrong passphrase in {settings.passphrase_env}?)"
        ) from None


def _key_from_text(text: str, passphrase: str | None) -> paramiko.PKey:
    last: Exception | None = None
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key(io.StringIO(text), password=passphrase)
        except paramiko.PasswordRequiredException:
            raise
        except (paramiko.SSHException, ValueError, TypeError) as exc:
            last = exc
    raise paramiko.SSHException(f"not a supported private key ({type(last).__name__})")


def _fingerprint(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.fingerprint}"


# ---------------------------------------------------------------------------------------------
# Connection


def _where(settings: ShippingConfig) -> str:
    return f"{settings.username}@{settings.host}:{settings.port}"


def _require_target(settings: ShippingConfig) -> tuple[str, str, str]:
    missing = [f"shipping.{n}" for n in ("host", "username", "remote_dir") if not getattr(settings, n)]
    if missing:
        raise ShippingError(f"cannot ship: {', '.join(missing)} is not set (config file or flags)")
    return str(settings.host), str(settings.username), str(settings.remote_dir)


def _check_name(kind: str, value: str) -> None:
    if not _NAME.match(value) or value == CHAMPION:
        raise ShippingError(
            f"invalid {kind} {value!r}: use letters, digits, '.', '_' or '-', not starting with '.' "
            f"(and not {CHAMPION!r})"
        )


class _RefuseUnknownHost(paramiko.RejectPolicy):
    """RejectPolicy with a message that says what to check and which file to fix."""

    def __init__(self, known_hosts: Path, host: str, port: int) -> None:
        self.known_hosts = known_hosts
        self.host = host
        self.port = port

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise HostKeyError(
            f"host key of {self.host}:{self.port} is not in {self.known_hosts} "
            f"(it offered {_fingerprint(key)}); refusing to connect. Check that fingerprint with the host's "
            f"administrator, then add the key to {self.known_hosts} (e.g. ssh-keyscan -p {self.port} HOST)"
        )


def _connect(settings: ShippingConfig, pkey: paramiko.PKey) -> paramiko.SSHClient:
    host, username, _ = _require_target(settings)
    known_hosts = settings.known_hosts.expanduser()
    if not known_hosts.is_file():
        raise HostKeyError(
            f"known_hosts file {known_hosts} does not exist; refusing to connect to {host}:{settings.port} "
            f"without a known host key (set shipping.known_hosts)"
        )
    client = paramiko.SSHClient()
    try:
        client.load_host_keys(str(known_hosts))
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise HostKeyError(f"cannot read known_hosts file {known_hosts}: {exc}") from None
    client.set_missing_host_key_policy(_RefuseUnknownHost(known_hosts, host, settings.port))
    timeout = settings.connect_timeout
    try:
        client.connect(
            host,
            port=settings.port,
            username=username,
            pkey=pkey,
            look_for_keys=False,  # only the configured key, never ~/.ssh/id_* or an agent
            allow_agent=False,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
        )
    except HostKeyError:
        client.close()
        raise
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise HostKeyError(
            f"host key of {host}:{settings.port} does NOT match {known_hosts}: it offered "
            f"{_fingerprint(exc.key)}, known_hosts has {_fingerprint(exc.expected_key)}. The host was "
            f"reinstalled or someone is intercepting the connection; refusing to connect (check with the "
            f"host's administrator before changing {known_hosts})"
        ) from None
    except paramiko.AuthenticationException:
        client.close()
        raise ShippingAuthError(
            f"{username}@{host}:{settings.port} refused the SSH key ({_fingerprint(pkey)}); add its public key "
            f"to ~{username}/.ssh/authorized_keys on the host, or set the right key"
        ) from None
    except TimeoutError:
        client.close()
        raise ShippingConnectionError(
            f"timed out connecting to {host}:{settings.port} after {timeout:g}s (shipping.connect_timeout)"
        ) from None
    except (paramiko.SSHException, EOFError, OSError) as exc:
        client.close()
        raise ShippingConnectionError(f"cannot connect to {host}:{settings.port}: {exc or type(exc).__name__}") from None
    return client


@dataclass
class _Remote:
    """One SSH connection: SFTP for files, exec for sha256sum. ``phase`` names what was going on."""

    client: paramiko.SSHClient
    sftp: paramiko.SFTPClient
    where: str
    phase: str = "connecting"
    champion_touched: bool = False

    def alive(self) -> bool:
        transport = self.client.get_transport()
        return transport is not None and transport.is_active()

    def lstat(self, path: str) -> paramiko.SFTPAttributes | None:
        try:
            return self.sftp.lstat(path)
        except FileNotFoundError:
            return None

    def is_dir(self, path: str) -> bool:
        attrs = self.lstat(path)
        return attrs is not None and stat.S_ISDIR(attrs.st_mode or 0)

    def mkdir_p(self, path: str) -> None:
        parts = [p for p in path.split("/") if p]
        current = "/"
        for part in parts:
            current = posixpath.join(current, part)
            attrs = self.lstat(current)
            if attrs is None:
                self.sftp.mkdir(current)
            elif not stat.S_ISDIR(attrs.st_mode or 0) and not self._links_to_dir(current, attrs):
                raise ShippingError(f"{self.where}: {current} exists and is not a directory")

    def _links_to_dir(self, path: str, attrs: paramiko.SFTPAttributes) -> bool:
        # A symlinked remote_dir (e.g. /srv -> /data/srv) is fine.
        if not stat.S_ISLNK(attrs.st_mode or 0):
            return False
        try:
            return stat.S_ISDIR(self.sftp.stat(path).st_mode or 0)
        except FileNotFoundError:
            return False

    def champion(self, model_dir: str) -> str | None:
        path = posixpath.join(model_dir, CHAMPION)
        attrs = self.lstat(path)
        if attrs is None:
            return None
        if not stat.S_ISLNK(attrs.st_mode or 0):
            raise ShippingError(f"{self.where}: {path} exists but is not a symlink; fix it by hand")
        return posixpath.basename(self.sftp.readlink(path).rstrip("/"))

    def read_json(self, path: str) -> Any | None:
        try:
            with self.sftp.open(path, "rb") as fh:
                return json.loads(fh.read().decode("utf-8"))
        except FileNotFoundError:
            return None
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None  # a damaged manifest/history is treated as absent, never trusted

    def write_atomic(self, path: str, data: bytes) -> None:
        tmp = f"{posixpath.dirname(path)}/.{posixpath.basename(path)}-{secrets.token_hex(4)}.tmp"
        with self.sftp.open(tmp, "wb") as fh:
            fh.write(data)
        self.sftp.posix_rename(tmp, path)

    def sha256(self, directory: str, names: list[str]) -> dict[str, str]:
        """{name: sha256} computed by ``sha256sum`` on the host; missing files are absent."""
        cmd = f"cd -- {shlex.quote(directory)} && sha256sum -b -- {' '.join(shlex.quote(n) for n in names)}"
        stdin, stdout, stderr = self.client.exec_command(cmd, timeout=EXEC_TIMEOUT_S)
        stdin.close()
        out = stdout.read().decode("utf-8", errors="replace")
        err = stderr.read().decode("utf-8", errors="replace")
        rc = stdout.channel.recv_exit_status()
        if rc == -1:
            raise EOFError("the connection closed before sha256sum finished")
        if rc == 127:
            raise ShippingError(f"{self.where}: the host has no sha256sum (install coreutils); cannot verify uploads")
        if rc not in (0, 1):
            raise ShippingError(f"{self.where}: sha256sum failed (exit {rc}): {err.strip()[:300]}")
        found: dict[str, str] = {}
        for line in out.splitlines():
            m = _SHA_LINE.match(line.strip())
            if m:
                found[m.group(2)] = m.group(1)
        return found

    def rmtree(self, path: str) -> None:
        for attrs in self.sftp.listdir_attr(path):
            child = posixpath.join(path, attrs.filename)
            if stat.S_ISDIR(attrs.st_mode or 0):  # readdir attrs are lstat's: symlinks are not followed
                self.rmtree(child)
            else:
                self.sftp.remove(child)
        self.sftp.rmdir(path)

    def switch_champion(self, model_dir: str, version: str) -> None:
        self.phase = f"switching the champion to {version}"
        tmp = posixpath.join(model_dir, f".champion-{secrets.token_hex(4)}")
        # paramiko's symlink(source, dest) matches OpenSSH's argument order: the link is ``tmp``.
        self.sftp.symlink(version, tmp)  # relative target: the tree can be moved whole
        self.champion_touched = True
        self.sftp.posix_rename(tmp, posixpath.join(model_dir, CHAMPION))
        now = self.champion(model_dir)
        if now != version:
            raise ShippingError(f"{self.where}: champion points at {now!r} after the switch, expected {version!r}")


@contextlib.contextmanager
def _session(settings: ShippingConfig, pkey: paramiko.PKey) -> Iterator[_Remote]:
    client = _connect(settings, pkey)
    remote: _Remote | None = None
    try:
        remote = _Remote(client, client.open_sftp(), _where(settings))
        remote.phase = "starting"
        yield remote
    except ShippingError:
        raise
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise _classify(exc, remote, client, settings) from None
    finally:
        client.close()


def _classify(
    exc: BaseException, remote: _Remote | None, client: paramiko.SSHClient, settings: ShippingConfig
) -> ShippingError:
    where = _where(settings)
    phase = remote.phase if remote else "opening SFTP"
    untouched = "" if remote and remote.champion_touched else "; the host's champion was not changed"
    transport = client.get_transport()
    detail = str(exc) or type(exc).__name__
    if transport is None or not transport.is_active() or isinstance(exc, (EOFError, socket.timeout, TimeoutError)):
        return ShippingConnectionError(f"connection to {where} lost while {phase} ({detail}){untouched}")
    if isinstance(exc, OSError) and exc.strerror:
        detail = exc.strerror
    return ShippingError(f"{where}: failed while {phase}: {detail}{untouched}")


# ---------------------------------------------------------------------------------------------
# Remote bookkeeping


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _remote_versions(remote: _Remote, model_dir: str) -> tuple[list[RemoteVersion], list[str]]:
    """Shipped versions (directories holding a ship manifest), oldest first, and ``.incoming-*`` names."""
    versions: list[RemoteVersion] = []
    incoming: list[str] = []
    for attrs in remote.sftp.listdir_attr(model_dir):
        name = attrs.filename
        if not stat.S_ISDIR(attrs.st_mode or 0):
            continue
        if name.startswith(INCOMING_PREFIX):
            incoming.append(name)
            continue
        if name.startswith("."):
            continue
        manifest = remote.read_json(posixpath.join(model_dir, name, MANIFEST_FILE))
        if not isinstance(manifest, dict):
            continue  # not ours (no manifest): never listed, never pruned
        files = manifest.get("files") or {}
        versions.append(RemoteVersion(
            version=name,
            shipped_at=manifest.get("shipped_at"),
            files=len(files),
            bytes=sum(int(f.get("bytes", 0)) for f in files.values() if isinstance(f, dict)),
        ))
    versions.sort(key=lambda v: (v.shipped_at or "", v.version))
    return versions, sorted(incoming)


def _history(remote: _Remote, model_dir: str) -> list[dict[str, Any]]:
    loaded = remote.read_json(posixpath.join(model_dir, HISTORY_FILE))
    return [e for e in loaded if isinstance(e, dict) and isinstance(e.get("version"), str)] if isinstance(loaded, list) else []


def _append_history(remote: _Remote, model_dir: str, entry: dict[str, Any]) -> None:
    history = (_history(remote, model_dir) + [entry])[-HISTORY_LIMIT:]
    remote.write_atomic(posixpath.join(model_dir, HISTORY_FILE), json.dumps(history, indent=1).encode("utf-8"))


def _champion_stack(history: list[dict[str, Any]]) -> list[str]:
    """Champions in the order they were put in place, with rolled-back ones popped off.

    A ship pushes its version; a rollback to a version on the stack pops back to it (so a second
    rollback goes further back, never to the version just rolled away from).
    """
    stack: list[str] = []
    for entry in history:
        version = entry["version"]
        if entry.get("action") == "rollback" and version in stack:
            del stack[len(stack) - stack[::-1].index(version):]
        elif not stack or stack[-1] != version:
            stack.append(version)
    return stack


def _verify_remote(remote: _Remote, directory: str, expected: dict[str, str]) -> None:
    got = remote.sha256(directory, sorted(expected))
    bad = []
    for name in expected:
        try:  # the contract's one verifier, fed the digest the host computed
            verify_digest(directory, name, got.get(name, ""), expected)
        except ChecksumError:
            bad.append(name)
    if bad:
        missing = [n for n in bad if n not in got]
        raise ShippingError(
            f"{remote.where}: SHA-256 on the host does not match for {', '.join(sorted(bad))}"
            f"{' (missing: ' + ', '.join(missing) + ')' if missing else ''} in {directory}"
        )


# ---------------------------------------------------------------------------------------------
# Public operations


def _local_files(version_dir: Path) -> list[tuple[str, Path, int, str]]:
    """(relative posix name, path, size, sha256) of every file to ship, sorted."""
    out: list[tuple[str, Path, int, str]] = []
    for path in sorted(version_dir.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(version_dir).as_posix()
        if rel == MANIFEST_FILE:
            continue  # a manifest from an earlier ship is rewritten, never copied
        if any(c in rel for c in "\n\\"):
            raise ShippingError(f"cannot ship {path}: file names must not contain a newline or backslash")
        out.append((rel, path, path.stat().st_size, sha256_file(path)))
    if not out:
        raise ShippingError(f"{version_dir} holds no files to ship")
    # The registry vouched for these bytes: ship nothing that changed since (the verifier decides).
    try:
        vouched = read_checksums(version_dir, allow_unverified=True)  # none: registered before checksums
    except ChecksumError as exc:
        raise ShippingError(f"cannot read {version_dir / CHECKSUMS_FILE}: {exc}") from None
    if vouched is not None:
        changed = []
        for rel, _, _, digest in out:
            if rel == CHECKSUMS_FILE or rel not in vouched:
                continue  # checksums.json itself; files added later are verified on the host like the rest
            try:
                verify_digest(version_dir.name, rel, digest, vouched)
            except ChecksumError:
                changed.append(rel)
        if changed:
            raise ShippingError(
                f"{version_dir.name}: {', '.join(changed)} changed since registration ({CHECKSUMS_FILE}); not shipping it"
            )
    return out


def ship_version(
    version_dir: Path,
    model_name: str,
    version: str,
    settings: ShippingConfig,
    *,
    pkey: paramiko.PKey | None = None,
    secret_loader: SecretLoader | None = None,
    progress: Progress | None = None,
    logger: Log | None = None,
) -> ShipResult:
    """Upload ``version_dir`` as ``<remote_dir>/<model_name>/<version>`` and make it the host's champion.

    ``progress(bytes_sent, bytes_total)`` is called as the upload advances. Re-shipping a version
    already on the host verifies its hashes there and only switches the champion.
    """
    log = logger or _log
    started = time.monotonic()
    _check_name("model name", model_name)
    _check_name("version", version)
    _, _, remote_root = _require_target(settings)
    version_dir = Path(version_dir)
    if not version_dir.is_dir():
        raise ShippingError(f"version directory {version_dir} does not exist")
    local = _local_files(version_dir)
    total = sum(size for _, _, size, _ in local)
    expected = {rel: digest for rel, _, _, digest in local}
    key = pkey or load_private_key(settings, secret_loader=secret_loader)
    model_dir = posixpath.join(remote_root, model_name)
    where = _where(settings)
    log.info("shipping %s/%s (%d files, %.1f MB) to %s:%s", model_name, version, len(local), total / 1e6, where, model_dir)

    with _session(settings, key) as remote:
        remote.phase = f"preparing {model_dir}"
        remote.mkdir_p(model_dir)
        previous = remote.champion(model_dir)
        _, stale = _remote_versions(remote, model_dir)
        target = posixpath.join(model_dir, version)
        uploaded = not remote.is_dir(target)
        if not uploaded:
            # Already shipped (e.g. a retried flow run): trust it only if the host's bytes match ours.
            remote.phase = f"verifying the existing {version} on the host"
            try:
                _verify_remote(remote, target, expected)
            except ShippingError as exc:
                raise ShippingError(
                    f"{where}: {target} already exists with different content; refusing to overwrite a shipped "
                    f"version ({exc})"
                ) from None
            log.info("%s is already on the host with matching SHA-256; switching the champion only", version)
        else:
            incoming = posixpath.join(model_dir, f"{INCOMING_PREFIX}{version}-{secrets.token_hex(4)}")
            remote.sftp.mkdir(incoming)
            try:
                _upload(remote, local, incoming, total, progress)
                manifest = {"model": model_name, "version": version, "shipped_at": _now(),
                            "files": {rel: {"sha256": digest, "bytes": size} for rel, _, size, digest in local}}
                manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")
                remote.phase = "writing the ship manifest"
                with remote.sftp.open(posixpath.join(incoming, MANIFEST_FILE), "wb") as fh:
                    fh.write(manifest_bytes)
                remote.phase = "verifying SHA-256 on the host"
                _verify_remote(remote, incoming, {**expected, MANIFEST_FILE: hashlib.sha256(manifest_bytes).hexdigest()})
                remote.phase = f"renaming the upload to {version}"
                remote.sftp.posix_rename(incoming, target)
            except BaseException:
                if remote.alive():  # a dead connection leaves it for the next ship to remove
                    with contextlib.suppress(OSError, paramiko.SSHException, EOFError):
                        remote.rmtree(incoming)
                raise
            log.info("uploaded %d bytes in %d files; SHA-256 verified on the host", total, len(local))
        if previous != version:
            remote.switch_champion(model_dir, version)
            _append_history(remote, model_dir, {"version": version, "previous": previous, "action": "ship", "at": _now()})
        log.info("champion on %s is now %s (was %s)", where, version, previous or "none")
        remote.phase = "pruning old versions"
        pruned = _prune(remote, model_dir, settings.keep_versions, version, previous)
        stale_removed = []
        for name in stale:
            with contextlib.suppress(FileNotFoundError):
                remote.rmtree(posixpath.join(model_dir, name))
                stale_removed.append(name)
        _remove_temp_links(remote, model_dir)
        if pruned or stale_removed:
            log.info("removed old versions %s and unfinished uploads %s", pruned, stale_removed)
    return ShipResult(
        host=where, model_dir=model_dir, model_name=model_name, version=version, champion=version,
        previous_champion=previous, uploaded=uploaded, files=len(local), bytes=total,
        seconds=round(time.monotonic() - started, 3), pruned=pruned, stale_removed=stale_removed,
    )


def _upload(remote: _Remote, local: list[tuple[str, Path, int, str]], incoming: str, total: int,
            progress: Progress | None) -> None:
    done = 0
    made: set[str] = {incoming}
    for rel, path, size, _ in local:
        remote.phase = f"uploading {rel} ({done} of {total} bytes sent)"
        parent = posixpath.dirname(posixpath.join(incoming, rel))
        if parent not in made:
            remote.mkdir_p(parent)
            made.add(parent)
        base = done

        def on_bytes(sent: int, _size: int, base: int = base) -> None:
            if progress is not None:
                progress(base + sent, total)

        remote.sftp.put(str(path), posixpath.join(incoming, rel), callback=on_bytes, confirm=True)
        done += size
    if progress is not None and not local:
        progress(0, 0)


def _prune(remote: _Remote, model_dir: str, keep: int, champion: str, previous: str | None) -> list[str]:
    """Remove all but the ``keep`` newest shipped versions; never the champion or the previous champion."""
    versions, _ = _remote_versions(remote, model_dir)
    stack = _champion_stack(_history(remote, model_dir))
    # The previous champion is what `rollback` would return to: keep it whatever its age.
    protected = {champion, previous} | ({stack[-2]} if len(stack) >= 2 and stack[-1] == champion else set())
    newest = {v.version for v in versions[-keep:]}
    pruned = []
    for v in versions:
        if v.version in newest or v.version in protected:
            continue
        remote.rmtree(posixpath.join(model_dir, v.version))
        pruned.append(v.version)
    return pruned


def _remove_temp_links(remote: _Remote, model_dir: str) -> None:
    # Temp champion links / history files left by a connection cut between create and rename.
    for attrs in remote.sftp.listdir_attr(model_dir):
        name = attrs.filename
        if name.startswith(".champion-") or (name.startswith(f".{HISTORY_FILE}-") and name.endswith(".tmp")):
            with contextlib.suppress(FileNotFoundError):
                remote.sftp.remove(posixpath.join(model_dir, name))


def rollback(
    model_name: str,
    settings: ShippingConfig,
    *,
    to_version: str | None = None,
    pkey: paramiko.PKey | None = None,
    secret_loader: SecretLoader | None = None,
    logger: Log | None = None,
) -> RollbackResult:
    """Point the host's champion at ``to_version``, or at the champion before the current one.

    The target's files are re-verified on the host against its manifest before the switch.
    """
    log = logger or _log
    _check_name("model name", model_name)
    if to_version is not None:
        _check_name("version", to_version)
    _, _, remote_root = _require_target(settings)
    key = pkey or load_private_key(settings, secret_loader=secret_loader)
    model_dir = posixpath.join(remote_root, model_name)
    where = _where(settings)
    with _session(settings, key) as remote:
        remote.phase = f"reading {model_dir}"
        if not remote.is_dir(model_dir):
            raise ShippingError(f"{where}: nothing shipped for {model_name} ({model_dir} does not exist)")
        current = remote.champion(model_dir)
        versions, _ = _remote_versions(remote, model_dir)
        names = [v.version for v in versions]
        if to_version is not None:
            if to_version not in names:
                raise ShippingError(
                    f"version {to_version} of {model_name} is not on {where} (there: {', '.join(names) or 'none'})"
                )
            target = to_version
        else:
            target = _previous_champion(remote, model_dir, current, versions, where)
        if target == current:
            log.info("champion of %s on %s is already %s; nothing to do", model_name, where, target)
            return RollbackResult(host=where, model_name=model_name, champion=target, previous_champion=current,
                                  changed=False)
        remote.phase = f"verifying {target} on the host"
        manifest = remote.read_json(posixpath.join(model_dir, target, MANIFEST_FILE)) or {}
        expected = {rel: str(f.get("sha256")) for rel, f in (manifest.get("files") or {}).items() if isinstance(f, dict)}
        if not expected:
            raise ShippingError(f"{where}: {target} has an empty or unreadable {MANIFEST_FILE}; not serving it")
        _verify_remote(remote, posixpath.join(model_dir, target), expected)
        remote.switch_champion(model_dir, target)
        _append_history(remote, model_dir, {"version": target, "previous": current, "action": "rollback", "at": _now()})
        _remove_temp_links(remote, model_dir)
    log.info("rolled %s on %s back: champion %s -> %s", model_name, where, current or "none", target)
    return RollbackResult(host=where, model_name=model_name, champion=target, previous_champion=current, changed=True)


def _previous_champion(
    remote: _Remote, model_dir: str, current: str | None, versions: list[RemoteVersion], where: str
) -> str:
    if current is None:
        raise ShippingError(f"{where}: {model_dir} has no champion to roll back from; use --to VERSION")
    present = {v.version for v in versions}
    stack = _champion_stack(_history(remote, model_dir))
    if stack and stack[-1] == current:
        for version in reversed(stack[:-1]):
            if version in present and version != current:
                return version
    else:
        # No usable history (older host layout, edited by hand): the version shipped just before.
        order = [v.version for v in versions]
        if current in order:
            earlier = order[: order.index(current)]
            if earlier:
                return earlier[-1]
    raise ShippingError(
        f"{where}: no earlier champion of {posixpath.basename(model_dir)} is left on the host "
        f"(champion {current}; versions: {', '.join(sorted(present)) or 'none'}); use --to VERSION"
    )


def remote_status(
    model_name: str,
    settings: ShippingConfig,
    *,
    pkey: paramiko.PKey | None = None,
    secret_loader: SecretLoader | None = None,
) -> RemoteStatus:
    """The versions shipped to the host (oldest first), its champion and any unfinished uploads."""
    _check_name("model name", model_name)
    _, _, remote_root = _require_target(settings)
    key = pkey or load_private_key(settings, secret_loader=secret_loader)
    model_dir = posixpath.join(remote_root, model_name)
    with _session(settings, key) as remote:
        remote.phase = f"reading {model_dir}"
        if not remote.is_dir(model_dir):
            return RemoteStatus(host=_where(settings), model_dir=model_dir, model_name=model_name, champion=None,
                                versions=[])
        versions, incoming = _remote_versions(remote, model_dir)
        return RemoteStatus(host=_where(settings), model_dir=model_dir, model_name=model_name,
                            champion=remote.champion(model_dir), versions=versions, incoming=incoming)
