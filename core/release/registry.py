"""deploy: a local versioned registry with an atomically switched ``champion`` pointer.

Layout::

    <registry>/<model-name>/<version>/   model.onnx, model_card.json, metrics.json, config.yaml, ...
    <registry>/<model-name>/champion     symlink -> <version>   (only ever replaced by rename)

A version directory is assembled under a hidden temp name and renamed into place, so a
reader never sees a half-written version; the champion symlink is replaced with
``os.replace``, so it always points at a complete version, old or new.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from core.errors import ChecksumError, RegistryError
from core.records import Promotion

CHAMPION = "champion"
CARD_FILE = "model_card.json"
CHECKSUMS_FILE = "checksums.json"


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def entry(self, name: str) -> Path:
        return self.root / name

    def versions(self, name: str) -> list[str]:
        entry = self.entry(name)
        if not entry.is_dir():
            return []
        return sorted(p.name for p in entry.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))

    def champion_version(self, name: str) -> str | None:
        link = self.entry(name) / CHAMPION
        if not link.is_symlink():
            if link.exists():
                raise RegistryError(f"{link} exists but is not a symlink; fix the registry by hand")
            return None
        target = os.readlink(link)
        if not (self.entry(name) / target).is_dir():
            raise RegistryError(f"champion of {name} points at missing version {target!r}")
        return Path(target).name

    def card(self, name: str, version: str) -> dict[str, Any]:
        path = self.entry(name) / version / CARD_FILE
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RegistryError(f"cannot read model card {path}: {exc}") from None

    def champion_card(self, name: str) -> dict[str, Any] | None:
        version = self.champion_version(name)
        return self.card(name, version) if version else None

    @staticmethod
    def new_version() -> str:
        return datetime.now(timezone.utc).strftime("v%Y%m%d-%H%M%S-") + secrets.token_hex(2)

    def publish(
        self,
        name: str,
        version: str,
        files: list[Path],
        card: dict[str, Any],
        promote: bool,
    ) -> Promotion:
        """Store ``files`` + the card as ``version``; switch the champion only if ``promote``."""
        entry = self.entry(name)
        entry.mkdir(parents=True, exist_ok=True)
        final = entry / version
        if final.exists():
            raise RegistryError(f"version {version} of {name} already exists")
        staging = entry / f".staging-{version}"
        staging.mkdir()
        try:
            for f in files:
                shutil.copy2(f, staging / f.name)
            card = {**card, "version": version, "registered_at": datetime.now(timezone.utc).isoformat()}
            (staging / CARD_FILE).write_text(json.dumps(card, indent=2, default=str))
            # Written last, inside staging: a version is never visible without its checksums.
            (staging / CHECKSUMS_FILE).write_text(json.dumps(checksums(staging), indent=2, sort_keys=True))
            _fsync_dir(staging)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if promote:
            self._switch_champion(name, version)
        return self._promotion(name, version, promote)

    def promote(self, name: str, version: str) -> Promotion:
        """Make an already registered ``version`` the champion (after it was shipped)."""
        if not (self.entry(name) / version).is_dir():
            raise RegistryError(f"cannot promote {name}/{version}: no such version in {self.root}")
        self._switch_champion(name, version)
        return self._promotion(name, version, True)

    def _promotion(self, name: str, version: str, promoted: bool) -> Promotion:
        return Promotion(
            registry=self.root.resolve(),
            model_name=name,
            version=version,
            version_dir=(self.entry(name) / version).resolve(),
            promoted=promoted,
            champion=self.champion_version(name),
        )

    def _switch_champion(self, name: str, version: str) -> None:
        entry = self.entry(name)
        tmp = entry / f".champion-{secrets.token_hex(4)}"
        os.symlink(version, tmp)  # relative target: the registry can be moved or copied whole
        os.replace(tmp, entry / CHAMPION)
        _fsync_dir(entry)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksums(version_dir: Path) -> dict[str, str]:
    """{file name: sha256} of every regular file in ``version_dir`` except the checksums file."""
    return {p.name: sha256_file(p) for p in sorted(Path(version_dir).iterdir())
            if p.is_file() and p.name != CHECKSUMS_FILE}


def read_checksums(version_dir: Path, *, allow_unverified: bool = False) -> dict[str, str] | None:
    """The version's ``checksums.json``; ``None`` only when it has none and ``allow_unverified``.

    A version registered before checksums existed has no ``checksums.json``; it is refused
    unless ``allow_unverified`` (the caller then loads bytes nobody vouched for).
    """
    version_dir = Path(version_dir)
    path = version_dir / CHECKSUMS_FILE
    if not path.is_file():
        if allow_unverified:
            return None
        raise ChecksumError(f"{version_dir.name} has no {CHECKSUMS_FILE} (registered before checksums were "
                            f"written?); re-register it, or pass --allow-unverified to serve it anyway")
    try:
        sums = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ChecksumError(f"cannot read {version_dir.name}/{CHECKSUMS_FILE}: {exc}") from None
    if not isinstance(sums, dict):
        raise ChecksumError(f"{version_dir.name}/{CHECKSUMS_FILE} is not a {{file name: sha256}} object")
    return sums


def verify_checksums(version_dir: Path, names: list[str], *, allow_unverified: bool = False) -> None:
    """Raise ``ChecksumError`` unless each present file in ``names`` matches ``checksums.json``."""
    version_dir = Path(version_dir)
    expected = read_checksums(version_dir, allow_unverified=allow_unverified)
    if expected is None:
        return
    for name in names:
        file = version_dir / name
        if not file.is_file():
            continue  # absent optional files (e.g. user_ids.json) are the caller's concern
        if name not in expected:
            raise ChecksumError(f"{version_dir.name}/{name} is not listed in {CHECKSUMS_FILE}")
        if sha256_file(file) != expected[name]:
            raise ChecksumError(f"checksum mismatch for {version_dir.name}/{name}: the file changed after it "
                                f"was registered; refusing to load it")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
