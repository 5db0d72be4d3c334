"""Webhook notifications for run outcomes: a Discord/Slack-style JSON POST.

The flow's hooks (``flows/_hooks.py``) turn a finished flow run into an ``Outcome`` and call
``notify``. Two rules hold everywhere here:

- a notification never fails a run: every error becomes a logged warning and ``False``;
- the webhook URL is a secret (whoever holds it can post), so it is never logged, never put in
  an exception message and never stored in the config: it comes from an environment variable
  or, through an injected loader, from a Prefect Secret block.

No Prefect import: the hook passes ``secret_loader``.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from core.config import NotifyConfig, NotifyEvent
from core.errors import RecflowError
from core.records import GateDecision
from core.secrets import env_or_block

_log = logging.getLogger(__name__)
Log = logging.Logger | logging.LoggerAdapter  # type: ignore[type-arg]

# Discord rejects a message whose content exceeds 2000 characters.
DISCORD_MAX_CHARS = 2000
# Some webhook hosts (Discord behind Cloudflare) refuse Python's default user agent.
USER_AGENT = "recflow-notify/1"


@dataclass(frozen=True)
class Outcome:
    """What a finished flow run did, in the terms a notification needs."""

    event: NotifyEvent
    flow_run: str
    stage: str
    model: str | None = None
    version: str | None = None
    champion: str | None = None
    gate: GateDecision | None = None
    error: str | None = None
    run_url: str | None = None
    reasons: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return {"failure": "failed", "promotion": "promoted", "rejection": "rejected"}[self.event]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def message_text(outcome: Outcome) -> str:
    """One human-readable message: what happened, where, and the gate's figures and reasons."""
    o = outcome
    if o.event == "failure":
        head = f"recflow run {o.flow_run} FAILED at {o.stage}"
        if o.model:
            head += f" ({o.model})"
        lines = [head, f"error: {o.error or 'unknown'}"]
    else:
        verb = "promoted" if o.event == "promotion" else "rejected (champion unchanged)"
        lines = [f"recflow run {o.flow_run}: {o.model} {o.version} {verb}"]
        if o.event == "rejection" and o.champion:
            lines[0] += f", champion stays {o.champion}"
    if o.gate is not None:
        g = o.gate
        champ = f"champion {g.champion_version} {_fmt(g.champion)}" if g.champion is not None else "no comparable champion"
        # RMSE/MAE gates (rating models) compare with the mean training rating, not Pop.
        baseline = "train mean" if g.metric.split("@")[0].upper() in ("RMSE", "MAE") else "Pop"
        lines.append(f"{g.metric}: candidate {_fmt(g.candidate)} vs {champ} vs {baseline} {_fmt(g.baseline)}")
    lines += [f"- {r}" for r in o.reasons]
    if o.run_url:
        lines.append(o.run_url)
    return "\n".join(lines)


def build_payload(outcome: Outcome, fmt: str) -> dict[str, Any]:
    """The JSON body: Discord ``content``, Slack ``text``, generic both plus structured fields."""
    text = message_text(outcome)
    if fmt == "discord":
        if len(text) > DISCORD_MAX_CHARS:
            text = text[: DISCORD_MAX_CHARS - 1] + "…"
        return {"content": text}
    if fmt == "slack":
        return {"text": text}
    structured = asdict(outcome)
    structured["gate"] = outcome.gate.model_dump(mode="json") if outcome.gate is not None else None
    return {"text": text, "content": text, "status": outcome.status, **structured}


def resolve_webhook_url(
    config: NotifyConfig, secret_loader: Callable[[str], Any] | None = None, logger: Log | None = None
) -> str | None:
    """The URL from ``config.webhook_env``, else the Secret block; None when neither is set or readable."""
    log = logger or _log
    # Without a loader (outside a flow) an unset env var simply means: no webhook, no warning.
    block = config.secret_block if secret_loader is not None else None
    try:
        url, _ = env_or_block(config.webhook_env, block, secret_loader, what="the webhook URL",
                              block_field="notify.secret_block", error=RecflowError)
    except RecflowError as exc:  # a missing block must not fail the run; the message never holds the URL
        log.warning("notification skipped: %s", exc)
        return None
    return url or None


def post_json(url: str, payload: dict[str, Any], timeout: float) -> None:
    """POST ``payload`` as JSON; raises ``OSError``/``urllib.error.URLError`` on failure.

    urllib rather than httpx: httpx logs every request URL at INFO, and this URL is a secret.
    """
    if not url.startswith(("http://", "https://")):
        raise ValueError("the webhook URL must start with http:// or https://")
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", "User-Agent": USER_AGENT},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        response.read()


def notify(
    outcome: Outcome,
    config: NotifyConfig,
    *,
    secret_loader: Callable[[str], Any] | None = None,
    logger: Log | None = None,
) -> bool:
    """Send ``outcome`` if its event is configured and a URL is set. True when the webhook took it.

    Never raises: a notification is a side effect and must not change the run's outcome.
    ``logger``: where warnings go (the flow hooks pass the run's logger, so they show in the UI).
    """
    log = logger or _log
    try:
        if outcome.event not in config.events:
            return False
        url = resolve_webhook_url(config, secret_loader, log)
        if url is None:
            log.debug("no webhook configured (%s unset); %s notification not sent", config.webhook_env, outcome.event)
            return False
        post_json(url, build_payload(outcome, config.format), config.timeout_seconds)
        log.info("sent %s notification for %s", outcome.event, outcome.flow_run)
        return True
    except urllib.error.HTTPError as exc:
        # The status, never the URL (HTTPError's str() holds no URL, but its .url does).
        log.warning("%s notification not delivered: webhook answered HTTP %s", outcome.event, exc.code)
    except ValueError as exc:  # our own scheme check: its message holds no URL
        log.warning("%s notification not delivered: %s", outcome.event, exc)
    except Exception as exc:
        reason = getattr(exc, "reason", None)
        detail = type(reason).__name__ if isinstance(reason, BaseException) else type(exc).__name__
        log.warning("%s notification not delivered (%s)", outcome.event, detail)
    return False
