"""The one source of truth for recflow's Prefect deployments (``recflow deploy`` calls ``deploy``).

It creates or updates, idempotently, through Prefect's own API:

- the work pool ``gpu`` (type ``process``, concurrency limit 1: one pool per GPU host, so two
  trainings never share the GPU; a worker on that host runs the flow runs as subprocesses),
  with ``client.create_work_pool`` / ``update_work_pool``;
- ``training-pipeline/nightly``: cron schedule (default 02:00, timezone configurable), the config
  preset with ``incremental.enabled`` forced on;
- ``training-pipeline/adhoc``: no schedule; the UI renders the typed ``PipelineConfig`` as a form,
  pre-filled with the preset;
- ``tuning-trial/<pool>`` on each GPU pool named by ``--trial-pool`` (default: ``--pool``): what
  ``recflow tune --pool <pool>`` runs each trial as (``flows/tuning_dispatch.py``);
- ``tuning-pipeline/tune`` on the driver's pool (``--driver-pool``, default ``cpu``: a process pool
  without a concurrency limit, so the driver never holds a GPU slot its trials wait for), its
  ``settings.pools`` defaulting to every trial pool.

Both deployments are made by ``Flow.deploy``: from a checkout, ``flow.from_source(<checkout>,
"flows/training_pipeline.py:training_pipeline")`` (Prefect's local storage: the worker runs the
flow in that directory); where ``--project-dir`` is not a checkout (recflow installed as a
package), the flow's module path ``flows.training_pipeline.training_pipeline`` with the process
worker's ``working_dir`` set to it. Prefect derives the pull step and the parameter schema.
Relative paths in the config (``registry``, ``runs``, ``data-store``) resolve in that directory.
``CUDA_VISIBLE_DEVICES`` is a job variable, so the GPU a deployment uses is set per deployment
(and editable per run).
"""

from __future__ import annotations

import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from core.config import load_config
from core.errors import DeploymentError  # defined in core.errors; importable from here as before

ENTRYPOINT = "flows/training_pipeline.py:training_pipeline"  # from a checkout (file path)
MODULE_ENTRYPOINT = "flows.training_pipeline.training_pipeline"  # from an installed package
TUNING_ENTRYPOINT = "flows/tuning_pipeline.py:tuning_pipeline"
TRIAL_ENTRYPOINT = "flows/tuning_dispatch.py:pool_trial"
DEFAULT_POOL = "gpu"
DEFAULT_DRIVER_POOL = "cpu"
DEFAULT_CRON = "0 2 * * *"
DEFAULT_TIMEZONE = "UTC"
DEFAULT_GPU = "0"
NIGHTLY, ADHOC, TUNE = "nightly", "adhoc", "tune"
# The tune deployment's default study (every field editable in the run form).
DEFAULT_STUDY, DEFAULT_TRIALS = "study", 20


def _checkout() -> Path | None:
    """The checkout this module runs from, or None when recflow is installed as a package."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / ENTRYPOINT.split(":")[0]).is_file() else None


# Where workers on this host run the flow by default: this checkout, else the working directory.
CHECKOUT = _checkout()


@dataclass(frozen=True)
class DeploySettings:
    """What ``recflow deploy`` takes from its flags."""

    api_url: str
    pool: str = DEFAULT_POOL
    config_path: Path | None = None
    cron: str = DEFAULT_CRON
    timezone: str = DEFAULT_TIMEZONE
    gpu: str = DEFAULT_GPU
    project_dir: Path = field(default_factory=lambda: CHECKOUT or Path.cwd())
    overrides: dict[str, Any] = field(default_factory=dict)
    trial_pools: tuple[str, ...] = ()  # GPU pools that get a tuning-trial deployment; empty: (pool,)
    driver_pool: str = DEFAULT_DRIVER_POOL

    @property
    def gpu_pools(self) -> tuple[str, ...]:
        """Every concurrency-1 GPU pool: the training pool and the trial pools."""
        return tuple(dict.fromkeys((self.pool, *(self.trial_pools or (self.pool,)))))


@dataclass(frozen=True)
class DeployResult:
    api_url: str
    pool: str
    pool_created: bool
    deployments: dict[str, UUID]  # "flow/deployment" -> id
    project_dir: Path
    entrypoint: str
    trial_pools: tuple[str, ...] = ()
    driver_pool: str = DEFAULT_DRIVER_POOL


def check_settings(settings: DeploySettings) -> None:
    """Refuse a bad schedule or checkout before touching the server."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        zoneinfo.ZoneInfo(settings.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise DeploymentError(
            f"--timezone {settings.timezone!r} is not an IANA time zone (e.g. Europe/Berlin, UTC)"
        ) from None
    try:
        CronSchedule(cron=settings.cron, timezone=settings.timezone)
    except ValidationError:
        raise DeploymentError(f"--cron {settings.cron!r} is not a valid cron expression (e.g. '0 2 * * *')") from None
    if not settings.project_dir.is_absolute() and not settings.project_dir.resolve().is_dir():
        raise DeploymentError(f"--project-dir {settings.project_dir} is not a directory here; give the absolute "
                              "path of the directory on the worker host")
    if not settings.gpu.replace(",", "").isdigit():
        raise DeploymentError(f"--gpu {settings.gpu!r} must be GPU indices such as 0 or 0,1")
    if settings.driver_pool in settings.gpu_pools:
        raise DeploymentError(
            f"--driver-pool {settings.driver_pool!r} is a GPU pool (concurrency 1): the tuning driver would hold "
            "the only slot its trials need; give it a pool of its own, e.g. --driver-pool cpu")


def deployment_parameters(settings: DeploySettings) -> dict[str, dict[str, Any]]:
    """Each deployment's default ``config`` parameter, as JSON (validated here, so a bad preset
    fails at deploy time rather than at 02:00)."""
    from core.experiments.study import StudySettings

    adhoc = load_config(settings.config_path, settings.overrides)
    nightly = load_config(settings.config_path, {**settings.overrides, "incremental.enabled": True})
    study = StudySettings(name=DEFAULT_STUDY, trials=DEFAULT_TRIALS, pools=list(settings.trial_pools or (settings.pool,)))
    tune: dict[str, Any] = {"config": adhoc.model_dump(mode="json"), "settings": study.model_dump(mode="json")}
    space = _shipped_space(adhoc.model.name)
    if space is not None:  # else the run form asks for one
        tune["space"] = space
    return {
        NIGHTLY: {"config": nightly.model_dump(mode="json")},
        ADHOC: {"config": adhoc.model_dump(mode="json")},
        TUNE: tune,
    }


def _shipped_space(model: str) -> dict[str, Any] | None:
    """The shipped search space for ``model`` (configs/spaces/<model>.yaml) as JSON, if there is one."""
    from core.errors import ConfigError
    from core.experiments.space import load_space

    try:
        return load_space(model.lower()).model_dump(mode="json")
    except ConfigError:
        return None


def check_api(api_url: str, timeout: float = 5.0) -> None:
    """One clear error when no Prefect server answers at ``api_url``."""
    import httpx

    try:
        response = httpx.get(f"{api_url.rstrip('/')}/health", timeout=timeout)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise DeploymentError(
            f"cannot reach the Prefect API at {api_url} ({type(exc).__name__}); start a server "
            "(`prefect server start`) or point --api-url / PREFECT_API_URL at one"
        ) from None


def _job_env(gpu: str) -> dict[str, str]:
    """The flow run's environment: its GPU, and (Linux) the malloc tunables the CLI also uses."""
    from core.modeling.devices import MALLOC_TUNABLES

    return {"CUDA_VISIBLE_DEVICES": gpu, "GLIBC_TUNABLES": MALLOC_TUNABLES}


def _pool_template(gpu: str) -> dict[str, Any]:
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    # Pool-wide default, so even a deployment created elsewhere stays on this host's GPU.
    template["variables"]["properties"]["env"]["default"] = _job_env(gpu)
    return template


def _ensure_pool(client: Any, name: str, gpu: str | None) -> bool:
    """Create the process pool ``name`` or check the existing one. A GPU pool (``gpu`` set) has
    concurrency 1; the driver's pool (``gpu`` None) no limit and no GPU."""
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    try:
        pool = client.read_work_pool(name)
    except ObjectNotFound:
        client.create_work_pool(
            WorkPoolCreate(
                name=name,
                type="process",
                description="recflow trainings on one GPU host; concurrency 1 so runs never share the GPU"
                if gpu is not None else "recflow's tuning driver: dispatches trials to the GPU pools, trains nothing",
                base_job_template=_pool_template(gpu) if gpu is not None else _driver_template(),
                concurrency_limit=1 if gpu is not None else None,
            )
        )
        return True
    if pool.type != "process":
        raise DeploymentError(
            f"work pool {name!r} exists with type {pool.type!r}; recflow needs a 'process' pool "
            f"(pick another name with {'--pool / --trial-pool' if gpu is not None else '--driver-pool'})"
        )
    if gpu is not None:  # keep the user's template edits; only the GPU guard is enforced
        client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=1))
    return False


def _driver_template() -> dict[str, Any]:
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    template["variables"]["properties"]["env"]["default"] = _DRIVER_ENV
    return template


_DRIVER_ENV = {"CUDA_VISIBLE_DEVICES": ""}  # the driver trains nothing: never let it take a GPU


def _flow_and_job_variables(settings: DeploySettings, flow: Any, entrypoint: str,
                            env: dict[str, str]) -> tuple[Any, dict[str, Any], Any]:
    """The flow to deploy, the job variables, and the entrypoint type: from the checkout at
    ``project_dir`` (Prefect's local storage), else by module path from the installed package."""
    from prefect.types.entrypoint import EntrypointType

    project_dir = settings.project_dir.resolve()
    job_variables: dict[str, Any] = {"env": env}
    if (project_dir / entrypoint.split(":")[0]).is_file():
        return flow.from_source(source=str(project_dir), entrypoint=entrypoint), job_variables, \
            EntrypointType.FILE_PATH
    job_variables["working_dir"] = str(project_dir)
    return flow, job_variables, EntrypointType.MODULE_PATH


def deploy(settings: DeploySettings) -> DeployResult:
    """Create or update the pools and the deployments on the server at ``settings.api_url``.

    Args:
        settings: what ``recflow deploy`` took from its flags.

    Returns:
        The pools and the ids of the deployments (keyed ``flow/deployment``).

    Raises:
        DeploymentError: a bad flag, no server, or Prefect refused a pool or deployment.
    """
    check_settings(settings)
    parameters = deployment_parameters(settings)
    check_api(settings.api_url)

    from prefect.client.orchestration import get_client
    from prefect.schedules import Cron
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.training_pipeline import training_pipeline

    ids: dict[str, UUID] = {}
    with temporary_settings({PREFECT_API_URL: settings.api_url}):
        with get_client(sync_client=True) as client:
            created = {name: _ensure_pool(client, name, settings.gpu) for name in settings.gpu_pools}[settings.pool]
            _ensure_pool(client, settings.driver_pool, None)
        flow, job_variables, entrypoint_type = _flow_and_job_variables(settings, training_pipeline, ENTRYPOINT,
                                                                       _job_env(settings.gpu))
        common: dict[str, Any] = {
            "work_pool_name": settings.pool,
            "job_variables": job_variables,
            "entrypoint_type": entrypoint_type,
            "enforce_parameter_schema": True,
            "print_next_steps": False,
        }
        try:
            ids[f"{training_pipeline.name}/{NIGHTLY}"] = flow.deploy(
                NIGHTLY,
                # Re-deploying replaces the schedule (a new cron never leaves the old one behind).
                schedules=[Cron(settings.cron, timezone=settings.timezone)],
                parameters=parameters[NIGHTLY],
                description="Nightly incremental extract -> validate -> train -> evaluate -> export -> register; "
                "promotes only when the gate passes",
                tags=["recflow", "nightly"],
                **common,
            )
            ids[f"{training_pipeline.name}/{ADHOC}"] = flow.deploy(
                ADHOC,
                parameters=parameters[ADHOC],
                description="Run the pipeline on demand; every PipelineConfig field is editable in the run form",
                tags=["recflow", "adhoc"],
                **common,
            )
            ids |= _deploy_tuning(settings, parameters[TUNE])
        except ValueError as exc:  # Prefect's own refusals (pool gone, no storage) are one line
            raise DeploymentError(f"Prefect refused the deployment: {exc}") from None
    entrypoint = ENTRYPOINT if entrypoint_type.value == "file_path" else MODULE_ENTRYPOINT
    return DeployResult(settings.api_url, settings.pool, created, ids, settings.project_dir.resolve(), entrypoint,
                        trial_pools=settings.trial_pools or (settings.pool,), driver_pool=settings.driver_pool)


def _deploy_tuning(settings: DeploySettings, tune_parameters: dict[str, Any]) -> dict[str, UUID]:
    """``tuning-pipeline/tune`` on the driver's pool, ``tuning-trial/<pool>`` on each trial pool."""
    from flows.tuning_dispatch import pool_trial
    from flows.tuning_pipeline import tuning_pipeline

    ids: dict[str, UUID] = {}
    flow, job_variables, entrypoint_type = _flow_and_job_variables(settings, tuning_pipeline, TUNING_ENTRYPOINT,
                                                                   _DRIVER_ENV)
    ids[f"{tuning_pipeline.name}/{TUNE}"] = flow.deploy(
        TUNE, work_pool_name=settings.driver_pool, job_variables=job_variables, entrypoint_type=entrypoint_type,
        parameters=tune_parameters, enforce_parameter_schema=True, print_next_steps=False, tags=["recflow", "tuning"],
        description="recflow tune: the data once, then Optuna's trials, each a tuning-trial flow run on "
                    "settings.pools (empty: subflows here), then the leaderboard",
    )
    for pool in settings.trial_pools or (settings.pool,):
        flow, job_variables, entrypoint_type = _flow_and_job_variables(settings, pool_trial, TRIAL_ENTRYPOINT,
                                                                       _job_env(settings.gpu))
        # Named after its pool: the tuning driver runs `tuning-trial/<pool>` for a trial on <pool>.
        ids[f"{pool_trial.name}/{pool}"] = flow.deploy(
            pool, work_pool_name=pool, job_variables=job_variables, entrypoint_type=entrypoint_type,
            enforce_parameter_schema=True, print_next_steps=False, tags=["recflow", "tuning"],
            description=f"one tuning trial on {pool} (started by the tuning driver; attaches to its study by number)",
        )
    return ids
