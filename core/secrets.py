"""Secrets from an environment variable, else a Prefect Secret block (read through a loader).

``core`` never imports Prefect: the task that needs a block passes ``secret_loader`` (see
``tasks/_common.load_prefect_secret``). Messages name where a secret was looked for, never its value.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from core.errors import RecflowError

SecretLoader = Callable[[str], Any]


def secret_text(loaded: Any) -> str:
    """A Secret block's value as text (str, bytes or pydantic ``SecretStr``)."""
    if loaded is None:
        return ""
    if hasattr(loaded, "get_secret_value"):
        loaded = loaded.get_secret_value()
    if isinstance(loaded, bytes):
        return loaded.decode("utf-8")
    return str(loaded)


def env_or_block(
    env: str,
    block: str | None,
    secret_loader: SecretLoader | None,
    *,
    what: str,
    block_field: str,
    error: type[RecflowError],
) -> tuple[str, str]:
    """(the stripped value, where it came from); the value is "" when neither source holds one.

    ``what`` names the secret in messages ("the SSH key"); ``block_field`` is the config field
    naming the block ("shipping.key_secret_block"). A block that cannot be read raises ``error``.
    """
    value = os.environ.get(env, "").strip()
    if value or not block:
        return value, f"environment variable {env}"
    origin = f"Prefect Secret block {block!r}"
    if secret_loader is None:
        raise error(
            f"{block_field} is {block!r} but Prefect Secret blocks are read only inside a Prefect flow; "
            f"set {env} instead"
        )
    try:
        loaded = secret_loader(block)
    except Exception as exc:
        raise error(
            f"cannot read {what} from {origin} ({type(exc).__name__}); check that the block exists, or set {env}"
        ) from None
    return secret_text(loaded).strip(), origin
