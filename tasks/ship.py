"""ship: copy the promoted version to the production host over SFTP (core/release/shipping/sftp.py)."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from core.config import PipelineConfig
from core.errors import RecflowError, ShippingConnectionError
from core.records import Promotion
from core.release.shipping import ShipResult, ship_version
from tasks._common import artifact_key, load_prefect_secret


def retry_on_connection_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a dropped or refused connection; a host-key, auth or config problem fails the same way again."""
    try:
        state.result()
    except ShippingConnectionError:
        return True
    except RecflowError:
        return False
    except Exception:
        return True
    return False


@task(name="ship", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_on_connection_error,
      cache_policy=NO_CACHE)
def ship_task(config: PipelineConfig, promotion: Promotion) -> ShipResult:
    """Ship ``promotion``'s version and make it the host's champion. A retry re-verifies what is there."""
    logger = get_run_logger()
    result = ship_version(promotion.version_dir, promotion.model_name, promotion.version, config.shipping,
                          secret_loader=load_prefect_secret, logger=logger)
    create_markdown_artifact(
        key=artifact_key("ship", promotion.model_name),
        description="what the production host serves",
        markdown="\n".join([
            f"## Shipped {result.model_name} {result.version}",
            "",
            f"- host: `{result.host}` `{result.model_dir}`",
            f"- champion: {result.champion} (was {result.previous_champion or 'none'})",
            f"- {result.files} files, {result.bytes} bytes, SHA-256 verified on the host"
            f"{'' if result.uploaded else ' (already there, not re-sent)'}",
            f"- removed old versions: {', '.join(result.pruned) or 'none'}",
        ]),
    )
    return result
