"""deploy: a local versioned registry with an atomically switched ``champion`` pointer.

Layout::

    <registry>/<model-name>/<version>/   the files of ``core.release.artifacts`` (graph, card, checksums, ...)
    <registry>/<model-name>/champion     symlink -> <version>   (only ever replaced by rename)

A version directory is assembled under a hidden temp name and renamed into place, so a
reader never sees a half-written version; the champion symlink is replaced with
``os.replace``, so it always points at a complete version, old or new.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.errors import RegistryError
from core.records import Promotion
from core.release.artifacts import (
    CARD_FILE,
    CHAMPION_LINK,
    CHECKSUMS_FILE,
    compute_checksums,
    read_checksums,
    sha256_file,
    verify_files,
    write_checksums,
)

CHAMPION = CHAMPION_LINK
# Kept importable from here for existing callers; the contract lives in core.release.artifacts.
checksums = compute_checksums
verify_checksums = verify_files
__all__ = ["CARD_FILE", "CHAMPION", "CHECKSUMS_FILE", "Registry", "checksums", "read_checksums", "sha256_file",
           "verify_checksums"]


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
        return datetime.now(UTC).strftime("v%Y%m%d-%H%M%S-") + secrets.token_hex(2)

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
            card = {**card, "version": version, "registered_at": datetime.now(UTC).isoformat()}
            (staging / CARD_FILE).write_text(json.dumps(card, indent=2, default=str))
            # Written last, inside staging: a version is never visible without its checksums.
            write_checksums(staging)
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
