"""Print a deployment run's ``--params`` JSON: a preset plus dotted overrides, validated here.

Prefect merges run parameters one level deep, so a run's ``config`` replaces the deployed one
whole; this builds a complete one::

    prefect deployment run 'training-pipeline/adhoc' \\
        --params "$(.venv/bin/python -m deployments.params configs/question-attempts.yaml training.epochs=20)"

``tune`` builds a ``tuning-pipeline/tune`` run's parameters (config, space and study settings)
the same way; the settings flags are ``recflow tune``'s::

    prefect deployment run 'tuning-pipeline/tune' --params "$(.venv/bin/python -m deployments.params tune \
        --space sasrec --study s1 --trials 40 --pool gpu-a --pool gpu-b --storage-env RECFLOW_STUDY_DB \
        --studies-dir /shared/studies ml-100k-sasrec training.epochs=50)"

A mistake (missing file, unknown field, bad value) prints one ``error:`` line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from core.config import load_config
from core.errors import RecflowError


def _overrides(assignments: list[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecflowError(f"{item!r} must look like KEY=VALUE, e.g. training.epochs=5")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def params_json(preset: str | None, assignments: list[str]) -> str:
    """``{"config": {...}}`` for ``preset`` (None: the defaults) with ``KEY=VALUE`` overrides (YAML values)."""
    config = load_config(preset, _overrides(assignments))
    return json.dumps({"config": config.model_dump(mode="json")})


def tune_params_json(preset: str | None, assignments: list[str], space: str, study: dict[str, Any]) -> str:
    """``{"config", "space", "settings"}`` of a ``tuning-pipeline/tune`` run, each validated here.

    Args:
        preset: a config file or preset name (None: the defaults).
        assignments: ``KEY=VALUE`` config overrides.
        space: a search-space file or shipped name, checked against the config.
        study: ``StudySettings`` fields (name, trials, pools, ...); a relative ``root`` is resolved
            by the driver, in the deployment's working directory.

    Returns:
        The run's ``--params`` JSON.
    """
    from pydantic import ValidationError

    from core.experiments.space import check_space, load_space
    from core.experiments.study import StudySettings

    config = load_config(preset, _overrides(assignments))
    search = load_space(space)
    check_space(search, config)
    try:
        settings = StudySettings(**study)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "study"
        raise RecflowError(f"--{where.replace('_', '-')}: {first['msg'].removeprefix('Value error, ')}") from None
    return json.dumps({"config": config.model_dump(mode="json"), "space": search.model_dump(mode="json"),
                       "settings": settings.model_dump(mode="json")})


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse prints usage and exits 2; one line is enough
        raise RecflowError(message)


def _tune_main(args: list[str]) -> str:
    parser = _OneLineParser(prog="python -m deployments.params tune", add_help=False)
    parser.add_argument("--space", required=True)
    parser.add_argument("--study", required=True)
    parser.add_argument("--trials", required=True, type=int)
    parser.add_argument("--pool", action="append", default=[])
    parser.add_argument("--storage-env")
    parser.add_argument("--studies-dir", type=Path, default=Path("studies"))
    parser.add_argument("--trial-minutes", type=float)
    parser.add_argument("--pruner")
    parser.add_argument("rest", nargs="*")
    ns = parser.parse_args(args)
    preset = ns.rest[0] if ns.rest and "=" not in ns.rest[0] else None
    study = {"name": ns.study, "trials": ns.trials, "pools": ns.pool, "storage_env": ns.storage_env,
             "root": ns.studies_dir, "trial_minutes": ns.trial_minutes, "pruner": ns.pruner}
    return tune_params_json(preset, ns.rest[1:] if preset else ns.rest, ns.space,
                            {k: v for k, v in study.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    preset = args[0] if args and "=" not in args[0] else None
    try:
        if args and args[0] == "tune":
            print(_tune_main(args[1:]))
        else:
            print(params_json(preset, args[1:] if preset else args))
    except RecflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
