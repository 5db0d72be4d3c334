"""Prefect flows: composition only; the work lives in ``tasks`` and ``core``."""

import os

# Keep Prefect off the network and patient on a loaded box, unless the user says otherwise.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
