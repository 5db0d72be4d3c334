"""A private OpenSSH server for tests: 127.0.0.1, a free port, throwaway keys, its own config.

``SshServer`` generates an ed25519 host key and an ed25519 client key with ``ssh-keygen`` in a
fresh temporary directory, writes an ``sshd_config`` (key authentication only, ``internal-sftp``),
runs ``/usr/sbin/sshd -D -e -f cfg`` and waits until it answers with an SSH banner. The login
user is the current user (``getpass.getuser()``). ``known_hosts`` holds
``[127.0.0.1]:PORT ssh-ed25519 ...`` so strict host-key checking passes for this server only.

    with SshServer() as sshd:
        sshd.port, sshd.client_key, sshd.known_hosts, sshd.user

``kill_sessions()`` kills every per-connection sshd process (the listener stays up): a real
connection cut, as a network failure or a host reboot would cause mid-transfer.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from core.config import ShippingConfig

KEY_ENV = "RECFLOW_SSH_KEY"
PASSPHRASE_ENV = "RECFLOW_SSH_KEY_PASSPHRASE"
SSHD = Path(os.environ.get("RECFLOW_SSHD", "/usr/sbin/sshd"))
SSH_KEYGEN = "ssh-keygen"
PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start without it (Debian creates it at boot)


class SshServerError(RuntimeError):
    pass


def missing_binaries() -> str | None:
    """A message naming what is missing, or None when sshd and ssh-keygen are installed."""
    absent = [str(SSHD)] if not SSHD.exists() else []
    if shutil.which(SSH_KEYGEN) is None:
        absent.append(SSH_KEYGEN)
    if absent:
        return (f"OpenSSH server not found ({', '.join(absent)}); run `bash .ci/setup` as root "
                "(it installs openssh-server) or `apt-get install -y openssh-server`")
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keygen(path: Path, comment: str = "recflow-test") -> Path:
    """A new passphrase-less ed25519 key pair at ``path`` / ``path.pub``."""
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True)
    return path


class SshServer:
    def __init__(self, start_timeout: float = 20.0) -> None:
        problem = missing_binaries()
        if problem:
            raise SshServerError(problem)
        self.dir = Path(tempfile.mkdtemp(prefix="recflow-sshd-"))
        try:
            self._prepare()
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)  # the throwaway keys go with it
            raise
        self._log = self.log_path.open("ab")
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            self.proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(self.config_path)],
                                         stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            self._wait_ready(start_timeout)
        except BaseException:
            self.stop()
            raise

    def _prepare(self) -> None:
        self.user = getpass.getuser()
        self.port = free_port()
        self.host_key = keygen(self.dir / "ssh_host_ed25519_key", "recflow-test-host")
        self.client_key = keygen(self.dir / "client_ed25519", "recflow-test-client")
        self.authorized_keys = self.dir / "authorized_keys"
        self.authorized_keys.write_text((self.dir / "client_ed25519.pub").read_text())
        self.known_hosts = self.dir / "known_hosts"
        self.known_hosts.write_text(self.known_hosts_line())
        self.log_path = self.dir / "sshd.log"
        self.config_path = self.dir / "sshd_config"
        if os.geteuid() == 0:
            PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        elif not PRIVSEP_DIR.is_dir():
            raise SshServerError(f"{PRIVSEP_DIR} is missing and only root can create it: run `mkdir -p {PRIVSEP_DIR}` as root")
        self._write_config()

    def known_hosts_line(self, public_key_file: Path | None = None) -> str:
        """``[127.0.0.1]:PORT <type> <base64>`` for this server (or for another key's .pub)."""
        kind, blob = (public_key_file or self.dir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {blob}\n"

    def _write_config(self) -> None:
        lines = [
            "ListenAddress 127.0.0.1",
            f"Port {self.port}",
            f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",  # the temp dir's permissions are not sshd's business here
            f"PidFile {self.dir / 'sshd.pid'}",
            "Subsystem sftp internal-sftp",
            "PermitRootLogin prohibit-password",
            "MaxStartups 50",
            "LogLevel VERBOSE",
        ]
        # OpenSSH >= 9.8 slows down clients after failed logins; tests fail logins on purpose.
        candidate = lines + ["PerSourcePenalties no"]
        self.config_path.write_text("\n".join(candidate) + "\n")
        if subprocess.run([str(SSHD), "-t", "-f", str(self.config_path)], capture_output=True).returncode != 0:
            self.config_path.write_text("\n".join(lines) + "\n")
        check = subprocess.run([str(SSHD), "-t", "-f", str(self.config_path)], capture_output=True, text=True)
        if check.returncode != 0:
            raise SshServerError(f"sshd rejected the test config: {check.stderr.strip()}")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise SshServerError(f"sshd exited with {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
                    if s.recv(64).startswith(b"SSH-2.0-"):
                        return
            except OSError:
                time.sleep(0.05)
        raise SshServerError(f"sshd did not answer on 127.0.0.1:{self.port} within {timeout:g}s: {self.log()[-2000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def session_pids(self) -> list[int]:
        """Every process below the listening sshd (one or two per open connection)."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat_fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(stat_fields[1]), []).append(int(entry.name))
        found: list[int] = []
        todo = [self.proc.pid] if self.proc is not None else []
        while todo:
            for child in children.get(todo.pop(), []):
                found.append(child)
                todo.append(child)
        return found

    def kill_sessions(self) -> int:
        """SIGKILL every connection's sshd processes; returns how many were killed."""
        killed = 0
        for pid in self.session_pids():
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        return killed

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill_sessions()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if not self._log.closed:
            self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SshServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def shipping_settings(sshd: SshServer, remote_dir: Path, **overrides: object) -> ShippingConfig:
    """Settings that reach ``sshd`` with strict host-key checking; the key comes from $RECFLOW_SSH_KEY."""
    values: dict[str, object] = {
        "enabled": True,
        "host": "127.0.0.1",
        "port": sshd.port,
        "username": sshd.user,
        "remote_dir": str(remote_dir),
        "known_hosts": sshd.known_hosts,
        "key_env": KEY_ENV,
        "passphrase_env": PASSPHRASE_ENV,
        "connect_timeout": 10.0,
    }
    return ShippingConfig(**(values | overrides))
