"""A/B arms: flag parsing, weighted rendezvous assignment (split, stickiness, minimal movement), the key, the record."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from core.data.privacy import pseudonym
from core.errors import ConfigError
from core.serving.arms import (
    CHAMPION_ARM,
    ENV_ASSIGNMENT_KEY,
    KEY_FILE,
    UNASSIGNED,
    ArmRouter,
    ArmSpec,
    Assigner,
    ExperimentStore,
    check_arms,
    load_or_create_key,
    parse_arm,
    parse_weight,
)

KEY = b"k" * 32
SESSIONS = [f"s{i}" for i in range(100_000)]


def _split(assigner: Assigner, sessions: list[str] = SESSIONS) -> dict[str, str]:
    return {s: assigner.arm(s) for s in sessions}


def test_parse_arm_and_its_one_line_errors() -> None:
    assert parse_arm("ml-100k-sasrec=0.5") == ArmSpec("ml-100k-sasrec", "ml-100k-sasrec", None, 0.5)
    assert parse_arm("ease:v20260101-000000-ab12=2") == ArmSpec("ease:v20260101-000000-ab12", "ease",
                                                               "v20260101-000000-ab12", 2.0)
    assert parse_arm("ease", shadow=True) == ArmSpec("ease", "ease", None, 0.0, shadow=True)
    for bad, message in [("ease", "expected ENTRY[:VERSION]=WEIGHT"), ("ease=x", "is not a number"),
                         ("ease=-1", ">= 0"), ("ease=nan", ">= 0"), ("a b=1", "letters, digits")]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_arm(bad)
    with pytest.raises(ConfigError, match="given twice"):
        check_arms([parse_arm("a=1"), parse_arm("a=2")])
    with pytest.raises(ConfigError, match="weight 0"):
        check_arms([parse_arm("a=0"), parse_arm("b=0")])
    with pytest.raises(ConfigError, match="reserved"):
        check_arms([parse_arm(f"{UNASSIGNED}=1")])
    assert parse_weight("a:v1=0.25") == ("a:v1", 0.25)
    with pytest.raises(ConfigError, match="ARM=WEIGHT"):
        parse_weight("a")


def test_split_follows_the_weights_and_zero_weight_arms_get_nobody() -> None:
    got = _split(Assigner(KEY, "salt", {"a": 0.3, "b": 0.7, "c": 0.0}))
    share_a = sum(v == "a" for v in got.values()) / len(got)
    # 100k draws: one standard deviation is 0.15 points; 1 point is 7 of them.
    assert abs(share_a - 0.3) < 0.01
    assert set(got.values()) == {"a", "b"}
    three = _split(Assigner(KEY, "salt", {"a": 1, "b": 1, "c": 2}))
    shares = {arm: sum(v == arm for v in three.values()) / len(three) for arm in "abc"}
    assert shares == pytest.approx({"a": 0.25, "b": 0.25, "c": 0.5}, abs=0.01)


def test_assignment_is_sticky_for_the_same_key_and_salt_and_redrawn_for_another() -> None:
    weights = {"a": 0.5, "b": 0.5}
    first = _split(Assigner(KEY, "salt", weights), SESSIONS[:20_000])
    assert first == _split(Assigner(KEY, "salt", dict(reversed(weights.items()))), SESSIONS[:20_000])
    other_salt = _split(Assigner(KEY, "salt2", weights), SESSIONS[:20_000])
    other_key = _split(Assigner(b"q" * 32, "salt", weights), SESSIONS[:20_000])
    for other in (other_salt, other_key):
        changed = sum(first[s] != other[s] for s in first) / len(first)
        assert 0.45 < changed < 0.55  # independent draws: half move


def test_a_weight_change_moves_as_few_sessions_as_possible() -> None:
    before = _split(Assigner(KEY, "salt", {"a": 0.5, "b": 0.5}))
    after = _split(Assigner(KEY, "salt", {"a": 0.4, "b": 0.6}))
    moved = [s for s in SESSIONS if before[s] != after[s]]
    # The least possible: 10 points of sessions, all from a to b.
    assert abs(len(moved) / len(SESSIONS) - 0.1) < 0.01
    assert all(before[s] == "a" and after[s] == "b" for s in moved)
    # Three arms: raising c takes sessions from a and b into c only; nobody moves between a and b.
    three = _split(Assigner(KEY, "salt", {"a": 1, "b": 1, "c": 1}))
    raised = _split(Assigner(KEY, "salt", {"a": 1, "b": 1, "c": 2}))
    assert all(raised[s] == "c" for s in SESSIONS if three[s] != raised[s])
    # Pausing an arm (weight 0) moves only its own sessions.
    paused = _split(Assigner(KEY, "salt", {"a": 1, "b": 1, "c": 0}))
    assert all(three[s] == "c" for s in SESSIONS if three[s] != paused[s])


def test_the_key_is_created_once_private_and_shared_by_racing_processes(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_ASSIGNMENT_KEY, raising=False)
    keys: list[bytes] = []
    threads = [threading.Thread(target=lambda: keys.append(load_or_create_key(tmp_path / "log"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1 and len(keys[0]) == 64
    path = tmp_path / "log" / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == [KEY_FILE]  # no temp left behind
    assert load_or_create_key(tmp_path / "log") == keys[0]  # a restart reads the same key
    monkeypatch.setenv(ENV_ASSIGNMENT_KEY, "e" * 40)
    assert load_or_create_key(tmp_path / "log") == b"e" * 40
    monkeypatch.setenv(ENV_ASSIGNMENT_KEY, "short")
    with pytest.raises(ConfigError, match="too short"):
        load_or_create_key(tmp_path / "log")


def test_the_record_is_resumed_reweighted_replaced_and_stopped(tmp_path: Path) -> None:
    store = ExperimentStore(tmp_path)
    arms = [parse_arm("a=0.5"), parse_arm("b:v2=0.5"), parse_arm("c", shadow=True)]
    first, resumed = store.start_or_resume(arms)
    assert not resumed and first.running and first.weights() == {"a": 0.5, "b:v2": 0.5}
    on_disk = json.loads(store.path.read_text())
    assert on_disk["arms"][1] == {"name": "b:v2", "entry": "b", "version": "v2", "weight": 0.5, "shadow": False}
    assert on_disk["stopped_at"] is None and on_disk["history"][0]["action"] == "started"
    # Same arms after a restart: same id and salt (sticky); a new weight is recorded.
    again, resumed = store.start_or_resume([parse_arm("a=0.2"), parse_arm("b:v2=0.8"), parse_arm("c", shadow=True)])
    assert resumed and (again.id, again.salt) == (first.id, first.salt)
    assert [h["action"] for h in again.history] == ["started", "weights", "resumed"]
    changed = store.set_weights({"a": 0.0})
    assert changed.weights() == {"a": 0.0, "b:v2": 0.8} and changed.history[-1]["weights"] == changed.weights()
    with pytest.raises(ConfigError, match="no live arm c"):
        store.set_weights({"c": 1.0})
    with pytest.raises(ConfigError, match="weight 0"):
        store.set_weights({"b:v2": 0.0})
    # Other arms: a new experiment (new salt), the old one archived as stopped.
    new, resumed = store.start_or_resume([parse_arm("a=1")])
    assert not resumed and new.id != first.id and new.salt != first.salt
    archived = json.loads((tmp_path / "experiments" / f"{first.id}.json").read_text())
    assert archived["stopped_at"] and archived["history"][-1]["action"] == "stopped"
    stopped = store.stop_running("test")
    assert stopped is not None and not stopped.running and store.load().stopped_at == stopped.stopped_at
    with pytest.raises(ConfigError, match="no running experiment"):
        store.set_weights({"a": 1.0})
    store.path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        store.load()


class _Holder:
    """A served model stand-in: the router only reads ``current`` and calls ``check_once``."""

    def __init__(self, name: str) -> None:
        self.current: Any = name
        self.checks = 0

    def check_once(self) -> bool:
        self.checks += 1
        return False


def test_the_router_follows_the_record_without_a_restart(tmp_path: Path) -> None:
    store = ExperimentStore(tmp_path)
    exp, _ = store.start_or_resume([parse_arm("a=1"), parse_arm("b=1"), parse_arm("s", shadow=True)])
    champion, holders = _Holder("a"), {"a": None, "b": _Holder("b"), "s": _Holder("s")}
    holders["a"] = champion
    router = ArmRouter(champion, holders, store, exp.id, KEY, b"p" * 32)
    routing = router.routing
    assert routing.experiment == exp.id and [n for n, _ in routing.shadows] == ["s"]
    assert router.route(routing, None) == (UNASSIGNED, champion)
    session = router.session_pseudonym(12345)
    assert session == pseudonym(b"p" * 32, "12345")  # the extract's pseudonym of the same id
    expected = Assigner(KEY, exp.salt, {"a": 1, "b": 1})
    sessions = [router.session_pseudonym(f"learner{i}") for i in range(2000)]
    assert all(router.route(routing, s)[0] == expected.arm(s) for s in sessions)
    assert router.refresh() is False  # unchanged file: nothing re-read
    store.set_weights({"b": 0.0})
    assert router.refresh() is True and all(router.route(router.routing, s)[0] == "a" for s in sessions)
    router.check_arms()
    assert holders["b"].checks == 1 and champion.checks == 0  # the champion has its own watcher
    store.stop_running("kill switch")
    router.refresh()
    assert router.routing.experiment is None and router.routing.shadows == ()
    assert router.route(router.routing, sessions[0]) == (CHAMPION_ARM, champion)
    os.unlink(store.path)
    assert router.refresh() is False and router.last_error and router.routing.experiment is None
