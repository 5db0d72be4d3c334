"""Pseudonymisation of learner ids and resolution of its key."""

from __future__ import annotations

import hashlib
import hmac

import polars as pl
import pytest

from core.config import PrivacyConfig
from core.data.privacy import pseudonym, pseudonymize_ids, resolve_key
from core.errors import ConfigError

KEY = b"0123456789abcdef0123456789abcdef"
OTHER_KEY = b"fedcba9876543210fedcba9876543210"
ENV = "RECFLOW_TEST_PSEUDONYM_KEY"


@pytest.fixture
def frame() -> pl.DataFrame:
    users = ["alice", "bob", "alice", "007", "7", "bob", "ünïcode", "carol"]
    return pl.DataFrame({"user_id": users, "item_id": [f"i{n}" for n in range(len(users))], "n": range(len(users))})


def test_known_answer_and_single_id_helper(frame: pl.DataFrame) -> None:
    out = pseudonymize_ids(frame, KEY)
    expected = hmac.new(KEY, b"alice", hashlib.sha256).hexdigest()[:32]
    assert out.get_column("user_id")[0] == expected
    assert pseudonym(KEY, "alice") == expected
    assert pseudonym(KEY.decode(), "ünïcode") == out.get_column("user_id")[6]
    assert out.get_column("user_id").str.contains(r"^[0-9a-f]{32}$").all()


def test_stable_across_calls_and_rows_kept_in_order(frame: pl.DataFrame) -> None:
    first = pseudonymize_ids(frame, KEY)
    second = pseudonymize_ids(frame.sample(fraction=1.0, shuffle=True, seed=1), KEY).sort("n")
    assert first.equals(second)
    assert first.select("item_id", "n").equals(frame.select("item_id", "n"))
    assert first.columns == frame.columns


def test_different_keys_give_different_ids(frame: pl.DataFrame) -> None:
    a = set(pseudonymize_ids(frame, KEY).get_column("user_id"))
    b = set(pseudonymize_ids(frame, OTHER_KEY).get_column("user_id"))
    assert a.isdisjoint(b)


def test_no_raw_id_remains_and_distinct_ids_stay_distinct(frame: pl.DataFrame) -> None:
    out = pseudonymize_ids(frame, KEY)
    raw = set(frame.get_column("user_id"))
    assert raw.isdisjoint(set(out.get_column("user_id")))
    # "007" and "7" are different learners and stay different; the mapping is one-to-one.
    pairs = pl.DataFrame({"raw": frame.get_column("user_id"), "pseudo": out.get_column("user_id")}).unique()
    assert pairs.height == len(raw)
    assert pairs.get_column("pseudo").n_unique() == len(raw)


def test_lazy_and_eager_agree_and_keep_their_type(frame: pl.DataFrame) -> None:
    eager = pseudonymize_ids(frame, KEY)
    lazy = pseudonymize_ids(frame.lazy(), KEY)
    assert isinstance(eager, pl.DataFrame)
    assert isinstance(lazy, pl.LazyFrame)
    assert lazy.collect().equals(eager)


def test_other_column_nulls_and_numeric_ids() -> None:
    frame = pl.DataFrame({"learner": [1, None, 2, 1], "user_id": ["x", "y", "z", "w"]})
    out = pseudonymize_ids(frame, KEY, column="learner")
    assert out.get_column("user_id").to_list() == ["x", "y", "z", "w"]
    learners = out.get_column("learner").to_list()
    assert learners == [pseudonym(KEY, "1"), None, pseudonym(KEY, "2"), pseudonym(KEY, "1")]
    with pytest.raises(ConfigError, match="'missing'"):
        pseudonymize_ids(frame, KEY, column="missing")


def test_key_from_env_var_wins_over_the_secret_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, f"  {KEY.decode()}\n")
    calls: list[str] = []
    privacy = PrivacyConfig(key_env=ENV, secret_block="recflow-key")
    assert resolve_key(privacy, secret_loader=lambda name: calls.append(name) or "unused") == KEY
    assert calls == []


def test_key_from_secret_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    calls: list[str] = []

    def loader(name: str) -> str:
        calls.append(name)
        return OTHER_KEY.decode()

    assert resolve_key(PrivacyConfig(key_env=ENV, secret_block="recflow-key"), secret_loader=loader) == OTHER_KEY
    assert calls == ["recflow-key"]


def test_missing_key_names_the_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "")
    with pytest.raises(ConfigError) as info:
        resolve_key(PrivacyConfig(key_env=ENV), source="postgres")
    message = str(info.value)
    assert "learner ids must be pseudonymised for source 'postgres'" in message
    assert ENV in message and "openssl rand -hex 32" in message and "privacy.secret_block" in message


def test_secret_block_problems_are_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    privacy = PrivacyConfig(key_env=ENV, secret_block="recflow-key")
    with pytest.raises(ConfigError, match=ENV):
        resolve_key(privacy)  # no loader outside the flow

    def broken(name: str) -> str:
        raise ValueError("block document 'recflow-key' not found")

    with pytest.raises(ConfigError, match="recflow-key"):
        resolve_key(privacy, secret_loader=broken)
    with pytest.raises(ConfigError, match=ENV):
        resolve_key(privacy, secret_loader=lambda name: "")


@pytest.mark.parametrize("via", ["env", "block"])
def test_short_key_is_refused_without_leaking_it(monkeypatch: pytest.MonkeyPatch, via: str) -> None:
    weak = "hunter2-secret"  # 14 bytes
    if via == "env":
        monkeypatch.setenv(ENV, weak)
        privacy, loader = PrivacyConfig(key_env=ENV), None
    else:
        monkeypatch.delenv(ENV, raising=False)
        privacy, loader = PrivacyConfig(key_env=ENV, secret_block="recflow-key"), (lambda name: weak)
    with pytest.raises(ConfigError) as info:
        resolve_key(privacy, secret_loader=loader)
    message = str(info.value)
    assert "too short" in message
    assert weak not in message and "hunter2" not in message
    assert (ENV if via == "env" else "recflow-key") in message
