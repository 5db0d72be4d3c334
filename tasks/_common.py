"""What every task shares: which failures deserve a retry, and safe artifact keys."""

from __future__ import annotations

import re
from typing import Any

from core.errors import RecflowError


def retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures only; a bad file or config fails the same way every time."""
    try:
        state.result()
    except RecflowError:
        return False
    except Exception:
        return True
    return False


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def load_prefect_secret(block_name: str) -> str:
    """The value of a Prefect Secret block: the ``secret_loader`` core's secret readers take."""
    from prefect.blocks.system import Secret

    return str(Secret.load(block_name).get())
