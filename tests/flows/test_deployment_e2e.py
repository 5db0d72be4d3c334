"""The deployments end to end, as an operator would run them from a laptop-style shell.

A real ``prefect server start`` on 127.0.0.1, ``recflow deploy`` (the real CLI) against it, the
``gpu`` process pool, ``prefect deployment run`` and a ``prefect worker start --pool gpu
--run-once`` subprocess. The nightly run trains on tiny data, is promoted, ships over SFTP to a
private sshd (tests/sshd_server.py) and is answered by the serving app over what was shipped.
An ad-hoc run with worse settings (typed parameters passed with ``--params``) is then rejected
and leaves production unchanged. The pool's concurrency limit is seen at work: the first
``--run-once`` worker takes only one of the two waiting runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from fastapi.testclient import TestClient
from prefect_server import BIN, api_get, api_post, free_port, prefect_server, stop
from recflow_testdata import DATA_FILE, TINY_YAML, Interaction, write_csv
from sshd_server import SshServer

from core.modeling.devices import MALLOC_TUNABLES
from core.release.registry import Registry
from core.serving.app import create_app

REPO = Path(__file__).resolve().parents[2]
MODEL = "interactions-sasrec"
CRON, TZ = "30 2 * * *", "Europe/Berlin"




@dataclass
class Stack:
    root: Path
    api: str
    env: dict[str, str]
    config_path: Path
    registry: Path
    remote_dir: Path
    sshd: SshServer

    def get(self, path: str) -> Any:
        return api_get(self.api, path)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return api_post(self.api, path, body)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        # From a scratch directory: nothing may depend on the caller's working directory.
        return subprocess.run(list(args), cwd=self.root, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def run_deployment(self, name: str, *extra: str) -> str:
        done = self.cli(str(BIN / "prefect"), "deployment", "run", f"training-pipeline/{name}", *extra)
        assert done.returncode == 0, done.stdout + done.stderr
        match = re.search(r"UUID:\s*([0-9a-f-]{36})", done.stdout)
        assert match, done.stdout
        return match.group(1)

    def worker_run_once(self, log_name: str) -> None:
        log = (self.root / log_name).open("w")
        proc = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "gpu", "--run-once"],
                                cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=240)
        finally:
            stop(proc)
            log.close()
        assert proc.returncode == 0, (self.root / log_name).read_text()[-4000:]

    def state(self, flow_run_id: str) -> str:
        return str(self.get(f"/flow_runs/{flow_run_id}")["state"]["type"])

    def artifacts(self, flow_run_id: str) -> dict[str, dict[str, Any]]:
        found = self.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
        return {a["key"]: a for a in found if a.get("key")}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_rows: list[Interaction]) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("deploy-e2e")
    data = write_csv(tiny_rows, root / DATA_FILE)
    remote_dir = root / "production"
    remote_dir.mkdir()
    sshd = SshServer()
    try:
        with prefect_server(root, extra_env={"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1"}) as (api, env):
            # The worker's environment carries the secrets (the SSH key path); the config names them only.
            env["RECFLOW_SSH_KEY"] = str(sshd.client_key)
            preset = yaml.safe_load(TINY_YAML) | {
                "source": {"kind": "file", "path": str(data)},
                "runs_dir": str(root / "runs"),
                "registry": {"path": str(root / "registry")},
                "incremental": {"store_dir": str(root / "data-store")},
                "tracking": {"wandb": False},
                "shipping": {"enabled": True, "host": "127.0.0.1", "port": sshd.port, "username": sshd.user,
                             "remote_dir": str(remote_dir), "known_hosts": str(sshd.known_hosts),
                             "key_env": "RECFLOW_SSH_KEY"},
            }
            preset["training"]["device"] = "cpu"
            config_path = root / "tiny-nightly.yaml"
            config_path.write_text(yaml.safe_dump(preset))
            yield Stack(root, api, env, config_path, root / "registry", remote_dir, sshd)
    finally:
        sshd.stop()


@pytest.fixture(scope="module")
def deployed(stack: Stack) -> dict[str, Any]:
    recflow = str(BIN / "recflow")
    first = stack.cli(recflow, "deploy", "--config", str(stack.config_path))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "work pool 'gpu' (created" in first.stdout
    # Idempotent: a second deploy updates in place and replaces the schedule.
    again = stack.cli(recflow, "deploy", "--config", str(stack.config_path), "--cron", CRON, "--timezone", TZ)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "work pool 'gpu' (updated" in again.stdout
    return {name: stack.get(f"/deployments/name/training-pipeline/{name}") for name in ("nightly", "adhoc")}


def test_pool_and_deployments(stack: Stack, deployed: dict[str, Any]) -> None:
    pool = stack.get("/work_pools/gpu")
    assert (pool["type"], pool["concurrency_limit"]) == ("process", 1)
    pools = stack.post("/work_pools/filter", {})
    assert [p["name"] for p in pools if p["name"] == "gpu"] == ["gpu"]

    nightly, adhoc = deployed["nightly"], deployed["adhoc"]
    for dep in (nightly, adhoc):
        assert dep["work_pool_name"] == "gpu"
        assert dep["entrypoint"] == "flows/training_pipeline.py:training_pipeline"
        assert dep["job_variables"] == {"env": {"CUDA_VISIBLE_DEVICES": "0", "GLIBC_TUNABLES": MALLOC_TUNABLES}}
        assert dep["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
        ]
        assert dep["enforce_parameter_schema"] is True
        # The typed form: the schema of PipelineConfig, every section present.
        schema = dep["parameter_openapi_schema"]
        config_ref = schema["properties"]["config"]
        assert config_ref.get("$ref", "").endswith("/PipelineConfig") or "allOf" in config_ref
        pipeline = schema["definitions"]["PipelineConfig"]["properties"]
        assert {"source", "training", "evaluation", "registry", "notify"} <= set(pipeline)
    assert nightly["parameters"]["config"]["incremental"]["enabled"] is True
    assert adhoc["parameters"]["config"]["incremental"]["enabled"] is False
    assert nightly["parameters"]["config"]["training"]["epochs"] == 2

    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == [CRON]
    assert nightly["schedules"][0]["schedule"]["timezone"] == TZ and nightly["schedules"][0]["active"]
    assert adhoc["schedules"] == []

    # The scheduler fills in the next nightly runs (what the UI lists as upcoming), all at 02:30 Berlin.
    deadline = time.monotonic() + 60
    while True:
        upcoming = stack.post("/flow_runs/filter", {
            "deployments": {"id": {"any_": [nightly["id"]]}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
        })
        if len(upcoming) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(upcoming) >= 3
    local = [datetime.fromisoformat(r["expected_start_time"]).astimezone(ZoneInfo(TZ)) for r in upcoming]
    assert {(t.hour, t.minute) for t in local} == {(2, 30)}
    assert all(r["auto_scheduled"] for r in upcoming)


def test_nightly_promotes_ships_and_serves_then_worse_adhoc_changes_nothing(
    stack: Stack, deployed: dict[str, Any]
) -> None:
    nightly_run = stack.run_deployment("nightly")
    # An ad-hoc run with a typed parameter changed (1 epoch instead of 2: a weaker model), its
    # --params built the way the README shows.
    made = stack.cli(sys.executable, "-m", "deployments.params", str(stack.config_path), "training.epochs=1")
    assert made.returncode == 0, made.stderr
    worse = json.loads(made.stdout)
    assert worse["config"]["training"]["epochs"] == 1 and worse["config"]["shipping"]["enabled"] is True
    adhoc_run = stack.run_deployment("adhoc", "--params", made.stdout.strip())
    assert stack.get(f"/flow_runs/{adhoc_run}")["parameters"]["config"]["training"]["epochs"] == 1

    # Pool concurrency 1: this worker takes the first waiting run only.
    stack.worker_run_once("worker-1.log")
    assert stack.state(nightly_run) == "COMPLETED", (stack.root / "worker-1.log").read_text()[-4000:]
    assert stack.state(adhoc_run) == "SCHEDULED"

    registry = Registry(stack.registry)
    champion = registry.champion_version(MODEL)
    assert champion is not None and registry.versions(MODEL) == [champion]

    nightly_artifacts = stack.artifacts(nightly_run)
    gate = nightly_artifacts[f"gate-{MODEL}"]
    assert gate["type"] == "markdown"
    assert "## Gate: PROMOTE" in gate["data"] and "| candidate |" in gate["data"]
    assert "| Pop baseline |" in gate["data"] and "beats Pop baseline" in gate["data"]
    metrics = nightly_artifacts[f"metrics-{MODEL}"]
    assert metrics["type"] == "table" and "ndcg@10" in metrics["data"]

    # Shipped: the host's champion is the new version, and the serving app answers from it.
    remote_model = stack.remote_dir / MODEL
    assert os.readlink(remote_model / "champion") == champion
    with TestClient(create_app(stack.remote_dir, MODEL, poll_seconds=0.2)) as client:
        answer = client.post("/recommendations", json={"items": ["i1", "i2", "i3"], "k": 5})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["version"] == champion and len(body["items"]) == 5
        assert not {"i1", "i2", "i3"} & {i["item"] for i in body["items"]}

        # The second worker runs the weaker ad-hoc run: registered, rejected, production unchanged.
        stack.worker_run_once("worker-2.log")
        assert stack.state(adhoc_run) == "COMPLETED", (stack.root / "worker-2.log").read_text()[-4000:]
        assert len(registry.versions(MODEL)) == 2
        assert registry.champion_version(MODEL) == champion
        assert os.readlink(remote_model / "champion") == champion
        assert sorted(p.name for p in remote_model.iterdir() if not p.name.startswith(".")
                      and p.is_dir() and not p.is_symlink()) == [champion]
        gate2 = stack.artifacts(adhoc_run)[f"gate-{MODEL}"]["data"]
        assert "## Gate: REJECT" in gate2 and f"({champion})" in gate2 and "does not beat champion" in gate2
        time.sleep(0.5)  # longer than the app's poll interval: it must still serve the same version
        assert client.post("/recommendations", json={"items": ["i1"], "k": 3}).json()["version"] == champion


def test_a_directory_that_is_not_a_checkout_deploys_by_module_path(stack: Stack, deployed: dict[str, Any]) -> None:
    """recflow installed as a package: the worker imports the flow by module path and runs in
    --project-dir (Prefect's ``working_dir`` job variable), no pull step. Runs last: it redeploys."""
    workdir = stack.root / "installed-workdir"
    workdir.mkdir()
    done = stack.cli(str(BIN / "recflow"), "deploy", "--config", str(stack.config_path), "--project-dir", str(workdir))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "flows.training_pipeline.training_pipeline" in done.stdout
    for name in ("nightly", "adhoc"):
        dep = stack.get(f"/deployments/name/training-pipeline/{name}")
        assert dep["id"] == deployed[name]["id"]  # updated in place
        assert dep["entrypoint"] == "flows.training_pipeline.training_pipeline"
        assert not dep["pull_steps"]  # no pull step: the worker imports the installed package
        assert dep["job_variables"] == {"env": {"CUDA_VISIBLE_DEVICES": "0", "GLIBC_TUNABLES": MALLOC_TUNABLES},
                                        "working_dir": str(workdir)}
        assert dep["parameter_openapi_schema"]["definitions"]["PipelineConfig"]
    nightly = stack.get("/deployments/name/training-pipeline/nightly")
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]  # the new cron replaced 02:30


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--api-url", "http://127.0.0.1:{port}/api"], "error: cannot reach the Prefect API at http://127.0.0.1:"),
        (["--api-url", "http://127.0.0.1:{port}/api", "--timezone", "Mars/Base"], "error: --timezone 'Mars/Base'"),
        (["--api-url", "http://127.0.0.1:{port}/api", "--cron", "61 * * * *"], "error: --cron '61 * * * *'"),
        (["--api-url", "http://127.0.0.1:{port}/api", "--set", "training.epoch=3"], "training.epoch: Extra inputs"),
    ],
)
def test_deploy_mistakes_are_one_line(args: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from cli import app

    port = free_port()  # nothing listens there
    result = CliRunner().invoke(app, ["deploy", *[a.format(port=port) for a in args]])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
