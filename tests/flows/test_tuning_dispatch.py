"""The driver's decisions before it dispatches trials to pools (no server: what the server said
about each pool is given), the worker's refusal of a study it cannot reach, and the JSON a
trial's flow run is created with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.errors import TuningError
from core.experiments.study import STUDY_DB, StudySettings
from core.records import DatasetSplits
from flows.tuning_dispatch import PoolInfo, check_trial_host, plan_slots, trial_parameters


def _pools(*infos: PoolInfo) -> dict[str, PoolInfo]:
    return {i.name: i for i in infos}


GPU_A = PoolInfo("gpu-a", 1, has_deployment=True, worker_online=True)
GPU_B = PoolInfo("gpu-b", 1, has_deployment=True, worker_online=True)


def test_one_slot_per_listed_pool() -> None:
    assert plan_slots(["gpu-a", "gpu-b"], _pools(GPU_A, GPU_B), driver_pool=None) == ["gpu-a", "gpu-b"]


def test_a_pool_listed_twice_gets_two_slots_only_within_its_concurrency_limit() -> None:
    wide = PoolInfo("wide", None, has_deployment=True, worker_online=True)
    assert plan_slots(["wide", "wide", "gpu-a", "gpu-a"], _pools(wide, GPU_A), None) == ["wide", "wide", "gpu-a"]


def test_the_driver_on_the_only_slot_of_its_trial_pool_is_refused_naming_the_pool() -> None:
    with pytest.raises(TuningError, match=r"work pool 'gpu-b' \(concurrency 1\).*no trial could start"):
        plan_slots(["gpu-a", "gpu-b"], _pools(GPU_A, GPU_B), driver_pool="gpu-b")


def test_the_driver_on_a_wider_trial_pool_leaves_it_one_slot_less() -> None:
    three = PoolInfo("three", 3, has_deployment=True, worker_online=True)
    assert plan_slots(["three"] * 3, _pools(three), driver_pool="three") == ["three", "three"]
    # The driver on another pool takes nothing from the trial pools.
    assert plan_slots(["three"] * 3, _pools(three), driver_pool="cpu") == ["three"] * 3


@pytest.mark.parametrize(
    ("found", "needle"),
    [
        ({}, "--pool gpu-a: no such work pool"),
        ({"gpu-a": PoolInfo("gpu-a", 1, has_deployment=False, worker_online=True)},
         "--pool gpu-a: no deployment tuning-trial/gpu-a; create it with `recflow deploy --trial-pool gpu-a`"),
        ({"gpu-a": PoolInfo("gpu-a", 0, has_deployment=True, worker_online=True)}, "no free slot"),
    ],
)
def test_a_pool_that_cannot_take_trials_is_one_error(found: dict[str, PoolInfo], needle: str) -> None:
    with pytest.raises(TuningError) as err:
        plan_slots(["gpu-a"], found, None)
    assert needle in str(err.value)


def test_a_pool_without_a_worker_is_only_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    idle = PoolInfo("gpu-a", 1, has_deployment=True, worker_online=False)
    assert plan_slots(["gpu-a"], _pools(idle), None) == ["gpu-a"]
    assert "no worker is online for pool gpu-a" in caplog.text


def _splits(data_dir: Path) -> DatasetSplits:
    return DatasetSplits(data_dir=data_dir, dataset_name="interactions", users=1, items=1, interactions=1,
                         split="LS", fingerprint="f", eval_protocol="p")


def test_a_worker_without_the_sqlite_study_says_it_needs_postgres(tmp_path: Path) -> None:
    settings = StudySettings(name="s", root=tmp_path / "elsewhere", trials=2)
    with pytest.raises(TuningError, match="a SQLite study cannot be shared across hosts.*--storage-env"):
        check_trial_host(_splits(tmp_path), settings)
    assert not settings.dir.exists()  # the check created no empty database on the worker


def test_a_worker_without_the_study_data_says_it_needs_the_shared_folder(tmp_path: Path) -> None:
    settings = StudySettings(name="s", root=tmp_path, trials=2)
    settings.dir.mkdir(parents=True)
    (settings.dir / STUDY_DB).write_bytes(b"")
    with pytest.raises(TuningError, match="study data .*missing.* is not on this worker's host.*shared filesystem"):
        check_trial_host(_splits(tmp_path / "missing"), settings)
    # With PostgreSQL the database is not a local file; the data still must be.
    check_trial_host(_splits(tmp_path), StudySettings(name="s", root=tmp_path / "x", trials=2, storage_env="PG_URL"))


def test_trial_parameters_are_plain_json_with_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from recflow_testdata import tiny_config

    monkeypatch.chdir(tmp_path)
    settings = StudySettings(name="s", root=Path("studies"), trials=2, pools=["gpu-a"])
    params = trial_parameters(tiny_config(tmp_path, None), _splits(Path("studies/s/data")), settings, 7)
    again = json.loads(json.dumps(params))  # what run_deployment sends
    assert again == params and again["number"] == 7
    assert again["settings"]["root"] == str(tmp_path / "studies")
    assert again["splits"]["data_dir"] == str(tmp_path / "studies/s/data")
    assert StudySettings.model_validate(again["settings"]).trial_dir(7) == tmp_path / "studies/s/trials/0007"


def test_tune_run_params_are_built_and_checked(capsys: pytest.CaptureFixture[str]) -> None:
    from deployments.params import main

    assert main(["tune", "--space", "sasrec", "--study", "s1", "--trials", "8", "--pool", "gpu-a", "--pool", "gpu-b",
                 "ml-100k-sasrec", "training.epochs=3"]) == 0
    params = json.loads(capsys.readouterr().out)
    assert params["settings"]["pools"] == ["gpu-a", "gpu-b"] and params["settings"]["trials"] == 8
    assert params["config"]["training"]["epochs"] == 3 and "training.learning_rate" in params["space"]["params"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--space", "sasrec", "--study", "a/b", "--trials", "2"], "error: --name: study name 'a/b'"),
        (["--space", "sasrec", "--study", "s", "--trials", "0"], "error: --trials: Input should be greater than"),
        (["--space", "nope", "--study", "s", "--trials", "2"], "error: search space not found: nope"),
        (["--study", "s", "--trials", "2"], "error: the following arguments are required: --space"),
    ],
)
def test_tune_run_params_mistakes_are_one_line(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    from deployments.params import main

    assert main(["tune", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(needle) and len(err.strip().splitlines()) == 1, err


def test_parallel_slots_run_a_queued_trial_once_and_stop_at_the_trial_count(tmp_path: Path) -> None:
    """One thread per pool slot on a SQLite study: the queued preset is popped by one thread only,
    and no thread starts a trial past --trials."""
    import threading
    import time

    from core.experiments.study import open_study, optimize

    settings = StudySettings(name="s", root=tmp_path, trials=4, pruner="none")
    study = open_study(settings, direction="maximize")
    study.enqueue_trial({"x": 0.5})
    ran: list[tuple[int, float]] = []
    lock = threading.Lock()

    def objective(trial: object) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)  # type: ignore[attr-defined]
        time.sleep(0.2)  # keep every slot busy at once, as trials on pools are
        with lock:
            ran.append((trial.number, x))  # type: ignore[attr-defined]
        return x

    assert optimize(study, objective, settings, n_jobs=4) == 4
    assert sorted(n for n, _ in ran) == [0, 1, 2, 3]
    assert [x for _, x in ran].count(0.5) == 1 and len(study.trials) == 4
