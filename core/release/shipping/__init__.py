"""Shipping registered versions to a production host (SFTP over SSH). See ``core.release.shipping.sftp``."""

from __future__ import annotations

from core.release.shipping.sftp import (
    CHAMPION,
    HISTORY_FILE,
    MANIFEST_FILE,
    RemoteStatus,
    RemoteVersion,
    RollbackResult,
    ShipResult,
    load_private_key,
    remote_status,
    rollback,
    ship_version,
)

__all__ = [
    "CHAMPION",
    "HISTORY_FILE",
    "MANIFEST_FILE",
    "RemoteStatus",
    "RemoteVersion",
    "RollbackResult",
    "ShipResult",
    "load_private_key",
    "remote_status",
    "rollback",
    "ship_version",
]
