"""Tuning trials fanned out over Prefect work pools (``recflow tune --pool gpu-a --pool gpu-b``).

Each trial is its own flow run of the ``tuning-trial/<pool>`` deployment (``recflow deploy
--trial-pool <pool>`` makes one per pool). The driver (the tuning flow, locally or on a CPU pool)
runs Optuna with one thread per pool slot: a thread takes a free pool, creates the trial's flow
run there, waits for its final state and gives the pool back. The worker attaches to the trial
through the study storage by number (``run_trial``), so the outcome comes back through the
storage (the trial's user attrs), not through Prefect's result persistence.

    deployments:  tuning-trial/<pool>  ->  pool_trial (this module), one per GPU pool
    driver:       tuning_pipeline -> trial_runner(settings) -> PoolDispatcher (one thread per slot)
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from prefect import flow

import flows  # noqa: F401  (Prefect environment defaults)
from core.config import PipelineConfig
from core.errors import TrialFailedError, TuningError
from core.experiments.study import STUDY_DB, StudySettings, make_storage
from core.experiments.trial import TrialOutcome, TrialRunner
from core.records import DatasetSplits
from tasks.tune import trial_task

log = logging.getLogger("recflow.tuning")

TRIAL_FLOW = "tuning-trial"
POLL_SECONDS = 2.0  # how often a waiting driver thread reads its trial's flow run state
DOCS = "docs/tuning-pools.md"


def trial_deployment(pool: str) -> str:
    """The deployment a trial on ``pool`` runs: ``tuning-trial/<pool>``."""
    return f"{TRIAL_FLOW}/{pool}"


# --- the worker's side ------------------------------------------------------------------------------


def check_trial_host(splits: DatasetSplits, settings: StudySettings) -> None:
    """Refuse, in one sentence, a trial whose study files are not on this host: a SQLite study is
    one file on the driver's host, and the shared split is read at the driver's absolute path.

    Raises:
        TuningError: the study database or the shared split is missing here.
    """
    if not settings.storage_env and not (settings.dir / STUDY_DB).is_file():
        raise TuningError(
            f"study database {settings.dir / STUDY_DB} is not on this worker's host: a SQLite study cannot be "
            f"shared across hosts; run the study with --storage-env pointing at PostgreSQL ({DOCS})")
    if not splits.data_dir.is_dir():
        raise TuningError(
            f"study data {splits.data_dir} is not on this worker's host: trial workers read the study folder "
            f"at the driver's path; mount it there (a shared filesystem, {DOCS})")


@flow(name=TRIAL_FLOW, flow_run_name="trial-{number}")
def pool_trial(config: PipelineConfig, splits: DatasetSplits, settings: StudySettings, number: int) -> TrialOutcome:
    """One trial on a pool's worker: checks the study is reachable here, then trains it."""
    check_trial_host(splits, settings)
    return trial_task(config, splits, settings, number)


# --- the driver's side ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolInfo:
    """What the driver needs to know of a pool before dispatching to it."""

    name: str
    concurrency_limit: int | None
    has_deployment: bool
    worker_online: bool


def plan_slots(pools: list[str], found: dict[str, PoolInfo], driver_pool: str | None) -> list[str]:
    """One entry per trial that may run at once: each ``--pool`` listing is one slot (repeat a
    pool for more), capped at the pool's concurrency limit, less the slot the driver holds there.

    Args:
        pools: the ``--pool`` values, in order.
        found: what the Prefect server knows of each pool (missing: no such pool).
        driver_pool: the work pool the driver itself runs on (None: not a deployment run).

    Returns:
        The pool of each slot (the driver's thread count is its length).

    Raises:
        TuningError: a pool or its ``tuning-trial`` deployment does not exist, or the driver
            holds the only slot of a pool it would dispatch to (every trial would wait forever).
    """
    slots: list[str] = []
    for pool, listed in Counter(pools).items():
        info = found.get(pool)
        if info is None:
            raise TuningError(f"--pool {pool}: no such work pool on the Prefect server (PREFECT_API_URL); create it "
                              f"and its trial deployment with `recflow deploy --trial-pool {pool}`")
        if not info.has_deployment:
            raise TuningError(f"--pool {pool}: no deployment {trial_deployment(pool)}; create it with "
                              f"`recflow deploy --trial-pool {pool}`")
        limit = info.concurrency_limit
        if pool == driver_pool:
            if limit == 1:
                raise TuningError(
                    f"the tuning driver runs on work pool {pool!r} (concurrency 1) and would send its trials there: "
                    f"it holds that pool's only slot, so no trial could start; run the driver locally or on a "
                    f"CPU pool (`recflow deploy --driver-pool cpu`)")
            limit = None if limit is None else limit - 1
        usable = listed if limit is None else min(listed, limit)
        if usable < listed:
            log.warning("--pool %s listed %d times but its concurrency limit leaves %d slot(s)", pool, listed, usable)
        if not info.worker_online:
            log.warning("no worker is online for pool %s: its trials wait until one starts "
                        "(`prefect worker start --pool %s`)", pool, pool)
        slots += [pool] * usable
    if not slots:
        raise TuningError(f"--pool {', '.join(dict.fromkeys(pools))}: no free slot (concurrency limits) to run a trial on")
    return slots


def read_pools(pools: list[str]) -> dict[str, PoolInfo]:
    """Each named pool as the Prefect server sees it (pools it does not know are left out)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    found: dict[str, PoolInfo] = {}
    with get_client(sync_client=True) as client:
        for name in dict.fromkeys(pools):
            try:
                pool = client.read_work_pool(name)
            except ObjectNotFound:
                continue
            try:
                client.read_deployment_by_name(trial_deployment(name))
                has_deployment = True
            except ObjectNotFound:
                has_deployment = False
            status = getattr(pool.status, "value", pool.status)
            found[name] = PoolInfo(name, pool.concurrency_limit, has_deployment, str(status).upper() == "READY")
    return found


def current_work_pool() -> str | None:
    """The work pool this flow run was picked up from (None outside a deployment run)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return getattr(ctx.flow_run, "work_pool_name", None) if ctx and ctx.flow_run else None


def trial_parameters(config: PipelineConfig, splits: DatasetSplits, settings: StudySettings,
                     number: int) -> dict[str, Any]:
    """The flow run's parameters as JSON, every path absolute (the worker runs elsewhere)."""
    settings = settings.model_copy(update={"root": settings.root.resolve()})
    splits = splits.model_copy(update={"data_dir": splits.data_dir.resolve()})
    return {"config": config.model_dump(mode="json"), "splits": splits.model_dump(mode="json"),
            "settings": settings.model_dump(mode="json"), "number": number}


class PoolDispatcher:
    """A ``TrialRunner`` that runs each trial as a flow run on a free pool slot and waits for it.

    Optuna calls it from its worker threads; the driver's Prefect context (its flow run, so the
    trials are linked under it, and its settings) is lent to each call from a copy taken here.
    """

    def __init__(self, slots: list[str], settings: StudySettings, metric: str) -> None:
        self.slots = slots
        self._free: queue.Queue[str] = queue.Queue()
        for pool in slots:
            self._free.put(pool)
        self._context = contextvars.copy_context()
        self._create = threading.Lock()  # run_deployment numbers its parent task run: one at a time
        self._storage = make_storage(settings)
        self._metric = metric

    def __call__(self, config: PipelineConfig, splits: DatasetSplits, settings: StudySettings,
                 number: int) -> TrialOutcome:
        pool = self._free.get()
        try:
            return self._context.copy().run(self._run_on, pool, config, splits, settings, number)
        finally:
            self._free.put(pool)

    def _run_on(self, pool: str, config: PipelineConfig, splits: DatasetSplits, settings: StudySettings,
                number: int) -> TrialOutcome:
        from prefect.client.orchestration import get_client
        from prefect.deployments import run_deployment

        with self._create:
            run = run_deployment(trial_deployment(pool), parameters=trial_parameters(config, splits, settings, number),
                                 flow_run_name=f"trial-{number}", timeout=0)
        log.info("trial %d: flow run %s on pool %s", number, run.id, pool)
        with get_client(sync_client=True) as client:
            while not (run.state and run.state.is_final()):
                time.sleep(POLL_SECONDS)
                run = client.read_flow_run(run.id)
        state = run.state
        if not state.is_completed():
            raise TrialFailedError(f"flow run {run.name} on pool {pool} ended {state.type.value}: {state.message}")
        return self._outcome(settings, number)

    def _outcome(self, settings: StudySettings, number: int) -> TrialOutcome:
        """The trial's figures, written by the worker into the study storage."""
        study_id = self._storage.get_study_id_from_name(settings.name)
        trial = self._storage.get_trial(self._storage.get_trial_id_from_study_id_trial_number(study_id, number))
        attrs = dict(trial.user_attrs)
        value = attrs.get(f"valid_{self._metric}")
        if value is None:
            raise TrialFailedError(f"trial {number}: its flow run completed but stored no valid {self._metric}")
        return TrialOutcome(number=number, value=float(value), pruned=attrs.get("stop_reason") == "pruned",
                            attrs=attrs)


def trial_runner(settings: StudySettings, config: PipelineConfig, local: TrialRunner) -> tuple[TrialRunner, int]:
    """How the driver runs trials: ``local`` (a subflow in this process) one at a time, or, with
    ``settings.pools``, a ``PoolDispatcher`` with one thread per pool slot.

    Returns:
        (runner, n_jobs) for ``make_objective`` and ``optimize``.

    Raises:
        TuningError: a pool cannot take trials (see ``plan_slots``).
    """
    if not settings.pools:
        return local, 1
    slots = plan_slots(settings.pools, read_pools(settings.pools), current_work_pool())
    if not settings.storage_env:
        log.warning("trials on pools %s share the SQLite study %s: only workers that see this path (this host, or "
                    "the same path on a shared filesystem) can join; across hosts use --storage-env with "
                    "PostgreSQL (%s)", ", ".join(dict.fromkeys(slots)), (settings.dir / STUDY_DB).resolve(), DOCS)
    return PoolDispatcher(slots, settings, config.evaluation.valid_metric.lower()), len(slots)

