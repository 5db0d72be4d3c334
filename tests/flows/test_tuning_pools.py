"""`recflow tune --pool gpu-a --pool gpu-b`: trials fanned out over two work pools, for real.

A real ``prefect server start``, ``recflow deploy`` (the real CLI) making the two concurrency-1
process pools with their ``tuning-trial/<pool>`` deployments and the driver's ``cpu`` pool, and
one long-running ``prefect worker start`` per GPU pool (stand-ins for two GPU hosts). The driver
is ``recflow tune`` in a subprocess. Checked from the server's API and the study storage: both
pools ran trials, the study holds exactly --trials trials, no trial number ran twice. A driver
deployed on the pool it dispatches to fails with an error naming the pool, and starts no trial.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prefect_server import BIN, api_get, api_post, prefect_server, start_worker, stop
from tuning_testdata import tiny_space, tiny_study_config

from core.config import dump_config
from core.experiments.study import StudySettings, open_study

pytestmark = [pytest.mark.slow, pytest.mark.services]

POOLS = ("gpu-a", "gpu-b")
TRIALS = 4


@dataclass
class PoolStack:
    root: Path
    api: str
    env: dict[str, str]
    config_path: Path
    space_path: Path
    studies: Path

    def get(self, path: str) -> Any:
        return api_get(self.api, path)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return api_post(self.api, path, body)

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), cwd=self.root, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def trial_runs(self) -> list[dict[str, Any]]:
        return self.post("/flow_runs/filter", {"flows": {"name": {"any_": ["tuning-trial"]}}})

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_csv: Path) -> Iterator[PoolStack]:
    root = tmp_path_factory.mktemp("tune-pools")
    config_path = root / "tiny.yaml"
    dump_config(tiny_study_config(root, tiny_csv, {"training.epochs": 2}), config_path)
    tiny_space(root)  # writes root/space.yaml
    space_path = root / "space.yaml"
    with prefect_server(root) as (api, env):
        s = PoolStack(root, api, env, config_path, Path(space_path), root / "studies")
        deployed = s.cli(str(BIN / "recflow"), "deploy", "--config", str(config_path), "--pool", POOLS[0],
                         *[a for p in POOLS for a in ("--trial-pool", p)], "--driver-pool", "cpu")
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        workers = [start_worker(pool, root, env, f"worker-{pool}.log") for pool in POOLS]
        try:
            yield s
        finally:
            for worker in workers:
                stop(worker)


def test_deploy_makes_the_trial_pools_and_the_tune_deployment(stack: PoolStack) -> None:
    for pool in POOLS:
        assert (stack.get(f"/work_pools/{pool}")["concurrency_limit"]) == 1
        dep = stack.get(f"/deployments/name/tuning-trial/{pool}")
        assert dep["work_pool_name"] == pool
        assert dep["entrypoint"] == "flows/tuning_dispatch.py:pool_trial"
        assert {"config", "splits", "settings", "number"} <= set(dep["parameter_openapi_schema"]["properties"])
    cpu = stack.get("/work_pools/cpu")
    assert (cpu["type"], cpu["concurrency_limit"]) == ("process", None)
    tune = stack.get("/deployments/name/tuning-pipeline/tune")
    assert tune["work_pool_name"] == "cpu" and tune["job_variables"]["env"] == {"CUDA_VISIBLE_DEVICES": ""}
    assert tune["parameters"]["settings"]["pools"] == list(POOLS)
    assert "training.learning_rate" in tune["parameters"]["space"]["params"]  # the shipped sasrec space

    # A driver pool that is a GPU pool would deadlock the study: refused at deploy time, one line.
    refused = stack.cli(str(BIN / "recflow"), "deploy", "--config", str(stack.config_path), "--pool", POOLS[0],
                        "--driver-pool", POOLS[0])
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]
    assert f"--driver-pool '{POOLS[0]}' is a GPU pool" in refused.stderr


@pytest.fixture(scope="module")
def tuned(stack: PoolStack) -> subprocess.CompletedProcess[str]:
    done = stack.cli(str(BIN / "recflow"), "tune", "--config", str(stack.config_path), "--space",
                     str(stack.space_path), "--study", "s", "--trials", str(TRIALS), "--pruner", "none",
                     "--studies-dir", str(stack.studies), *[a for p in POOLS for a in ("--pool", p)], timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr + stack.logs()
    return done


def test_trials_run_on_both_pools_once_each_until_the_study_is_full(
    stack: PoolStack, tuned: subprocess.CompletedProcess[str]
) -> None:
    runs = stack.trial_runs()
    assert {r["work_pool_name"] for r in runs} == set(POOLS)  # both "GPU hosts" ran trials
    assert all(r["state_type"] == "COMPLETED" for r in runs)
    # Each is linked under the driver's flow run, as a local subflow would be.
    assert all(r["parent_task_run_id"] for r in runs)
    drivers = stack.post("/flow_runs/filter", {"flows": {"name": {"any_": ["tuning-pipeline"]}}})
    assert len(drivers) == 1 and drivers[0]["work_pool_name"] is None  # the driver ran here, off the pools

    settings = StudySettings(name="s", root=stack.studies, trials=TRIALS)
    trials = open_study(settings).trials
    numbers = [r["parameters"]["number"] for r in runs]
    assert len(trials) == TRIALS  # reached --trials, and no thread started one past it
    assert sorted(numbers) == sorted(t.number for t in trials) == list(range(TRIALS))  # none ran twice
    assert sorted(r["name"] for r in runs) == [f"trial-{n}" for n in range(TRIALS)]
    for trial in trials:
        assert trial.state.name == "COMPLETE"
        # The value came back through the storage, written by the worker.
        assert trial.value == trial.user_attrs["valid_ndcg@10"]
        assert Path(trial.user_attrs["run_dir"]) == (settings.trial_dir(trial.number)).resolve()
    assert "leaderboard:" in tuned.stdout


def test_a_driver_holding_the_only_slot_of_its_trial_pool_is_refused(
    stack: PoolStack, tuned: subprocess.CompletedProcess[str]
) -> None:
    """The tune deployment copied onto gpu-a itself (as an operator might by hand) and told to send
    its trials to gpu-a: it fails naming the pool instead of waiting forever for its own slot."""
    tune = stack.get("/deployments/name/tuning-pipeline/tune")
    copy = {k: tune[k] for k in ("flow_id", "entrypoint", "pull_steps", "parameter_openapi_schema", "path")}
    dep = stack.post("/deployments/", copy | {"name": "on-gpu-a", "work_pool_name": POOLS[0]})
    # The run's parameters as an operator builds them (deployments/params.py), the study's own config and space.
    made = stack.cli(str(BIN / "python"), "-m", "deployments.params", "tune", "--space", str(stack.space_path),
                     "--study", "s", "--trials", str(TRIALS + 1), "--pool", POOLS[0], "--pruner", "none",
                     "--studies-dir", str(stack.studies), str(stack.config_path))
    assert made.returncode == 0, made.stderr
    params = json.loads(made.stdout)
    assert params["settings"]["pools"] == [POOLS[0]] and params["settings"]["trials"] == TRIALS + 1
    before = len(stack.trial_runs())
    run = stack.post(f"/deployments/{dep['id']}/create_flow_run",
                     {"parameters": params})
    deadline = time.monotonic() + 300
    while (state := stack.get(f"/flow_runs/{run['id']}")["state"])["type"] not in ("COMPLETED", "FAILED", "CRASHED"):
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(1)
    assert state["type"] == "FAILED", stack.logs()
    assert f"work pool '{POOLS[0]}' (concurrency 1)" in state["message"] or _failure_names_pool(stack, run["id"])
    assert len(stack.trial_runs()) == before  # no trial was dispatched


def _failure_names_pool(stack: PoolStack, flow_run_id: str) -> bool:
    logs = stack.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}})
    return any(f"work pool '{POOLS[0]}' (concurrency 1)" in entry["message"] for entry in logs)
