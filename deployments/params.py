"""Print a deployment run's ``--params`` JSON: a preset plus dotted overrides, validated here.

Prefect merges run parameters one level deep, so a run's ``config`` replaces the deployed one
whole; this builds a complete one::

    prefect deployment run 'training-pipeline/adhoc' \\
        --params "$(.venv/bin/python -m deployments.params configs/question-attempts.yaml training.epochs=20)"

A mistake (missing file, unknown field, bad value) prints one ``error:`` line and exits 2.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import yaml

from core.config import load_config
from core.errors import RecflowError


def params_json(preset: str | None, assignments: list[str]) -> str:
    """``{"config": {...}}`` for ``preset`` (None: the defaults) with ``KEY=VALUE`` overrides (YAML values)."""
    overrides: dict[str, Any] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecflowError(f"{item!r} must look like KEY=VALUE, e.g. training.epochs=5")
        overrides[key.strip()] = yaml.safe_load(value)
    config = load_config(preset, overrides)
    return json.dumps({"config": config.model_dump(mode="json")})


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    preset = args[0] if args and "=" not in args[0] else None
    try:
        print(params_json(preset, args[1:] if preset else args))
    except RecflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
