"""A/B and shadow arms for ``recflow serve``: arm specs, sticky assignment, the experiment record.

Assignment is weighted rendezvous hashing (highest random weight): each live arm scores a
session by ``-ln(U) / weight`` with ``U`` uniform in (0, 1) taken from
``HMAC-SHA256(assignment key, salt \\0 session \\0 arm)``, and the lowest score wins. Why this
and not a bucket table: a session lands in arm *a* with probability ``w_a / sum(w)`` exactly
(the exponential race), it needs no table to store or keep in sync between ``--workers``
processes, and changing one weight moves only the sessions that must move (raising arm *a*
moves sessions *into a* only; lowering it moves sessions *out of a* only; nobody is shuffled
between untouched arms). The key is a persisted secret (same key and salt: same arm, across
restarts and workers); the salt is per experiment, so a new experiment re-draws everyone.

The ``session`` hashed is the learner id pseudonymised with the extract's key
(``core.data.privacy.pseudonym``), so logged outcomes join ``question_attempts``.

The experiment record is one JSON file, ``<log dir>/experiment.json`` (written atomically:
temp file, fsync, rename). ``recflow serve --arm ...`` starts it or resumes it (same arms:
same id and salt, so assignment is sticky across restarts); ``recflow experiment`` changes
weights or stops it (the kill switch); every serving process re-reads it on its watcher
poll, so neither needs a restart.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from core.data.privacy import pseudonym
from core.errors import ConfigError

EXPERIMENT_FILE = "experiment.json"  # <log dir>/experiment.json: the running (or last) experiment
PAST_EXPERIMENTS_DIR = "experiments"  # <log dir>/experiments/<id>.json: experiments replaced since
KEY_FILE = "assignment.key"  # <log dir>/assignment.key: the persisted assignment secret (mode 0600)
ENV_ASSIGNMENT_KEY = "RECFLOW_ASSIGNMENT_KEY"  # overrides the key file (e.g. from a secret store)
UNASSIGNED = "unassigned"  # the arm logged for a request without a session
CHAMPION_ARM = "champion"  # the arm logged when no experiment runs (or it was stopped)
MIN_KEY_BYTES = 16

_ARM_RE = re.compile(r"^(?P<entry>[A-Za-z0-9][A-Za-z0-9._-]*)(?::(?P<version>[A-Za-z0-9][A-Za-z0-9._-]*))?$")


@dataclass(frozen=True)
class ArmSpec:
    """One arm: a registry entry, pinned to ``version`` or following its champion (``None``)."""

    name: str
    entry: str
    version: str | None
    weight: float
    shadow: bool = False

    def identity(self) -> tuple[str, str, str | None, bool]:
        """What makes two arms the same arm (the weight may change within an experiment)."""
        return self.name, self.entry, self.version, self.shadow


def parse_arm(text: str, *, shadow: bool = False) -> ArmSpec:
    """``ENTRY[:VERSION]=WEIGHT`` (``--arm``) or ``ENTRY[:VERSION]`` (``--shadow``) as an ``ArmSpec``.

    Args:
        text: the flag's value.
        shadow: a shadow arm (scored, logged, never returned; no weight).

    Returns:
        The arm, named ``ENTRY`` or ``ENTRY:VERSION``.
    """
    flag = "--shadow" if shadow else "--arm"
    spec, weight = text, 0.0
    if not shadow:
        spec, sep, raw_weight = text.rpartition("=")
        if not sep:
            raise ConfigError(f"{flag} {text!r}: expected ENTRY[:VERSION]=WEIGHT, e.g. ml-100k-sasrec=0.5")
        try:
            weight = float(raw_weight)
        except ValueError:
            raise ConfigError(f"{flag} {text!r}: the weight {raw_weight!r} is not a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"{flag} {text!r}: the weight must be a finite number >= 0")
    match = _ARM_RE.match(spec.strip())
    if match is None:
        raise ConfigError(f"{flag} {text!r}: expected ENTRY[:VERSION]{'' if shadow else '=WEIGHT'} "
                          f"(letters, digits, '.', '_' and '-')")
    entry, version = match["entry"], match["version"]
    return ArmSpec(name=spec.strip(), entry=entry, version=version, weight=weight, shadow=shadow)


def check_arms(arms: Sequence[ArmSpec]) -> None:
    """Raise ``ConfigError`` unless the arm names are distinct and some live arm has a weight."""
    names = [a.name for a in arms]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"arm {', '.join(dupes)} given twice; each --arm/--shadow names a different model")
    for reserved in (UNASSIGNED, CHAMPION_ARM):
        if reserved in names:
            raise ConfigError(f"{reserved!r} is reserved for the log; rename the registry entry")
    live = [a for a in arms if not a.shadow]
    if live and sum(a.weight for a in live) <= 0:
        raise ConfigError("every --arm has weight 0: give at least one arm a positive weight")


# --------------------------------------------------------------------------- assignment


def load_or_create_key(log_dir: Path) -> bytes:
    """The assignment key: ``$RECFLOW_ASSIGNMENT_KEY``, else ``<log dir>/assignment.key`` (created once).

    Creation is race-free between ``--workers`` processes (the file is linked into place only
    if absent, so every process reads the same key) and readable by its owner only.

    Args:
        log_dir: the serving log folder.

    Returns:
        The key bytes (the UTF-8 of the hex text, like the pseudonym key).
    """
    env = os.environ.get(ENV_ASSIGNMENT_KEY, "").strip()
    if env:
        if len(env.encode()) < MIN_KEY_BYTES:
            raise ConfigError(f"{ENV_ASSIGNMENT_KEY} is too short (under {MIN_KEY_BYTES} bytes); "
                              f"use e.g. `openssl rand -hex 32`")
        return env.encode()
    path = Path(log_dir) / KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{KEY_FILE}-{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # fails if another process got there first: then its key is used
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    try:
        key = path.read_text().strip().encode()
    except OSError as exc:
        raise ConfigError(f"cannot read the assignment key {path}: {exc.strerror or exc}") from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"the assignment key in {path} is too short; delete it to make a new one "
                          f"(learners will be re-assigned)")
    return key


class Assigner:
    """Weighted rendezvous hashing of sessions over the live arms of one experiment."""

    def __init__(self, key: bytes, salt: str, weights: Mapping[str, float]) -> None:
        self._base = hmac.new(key, salt.encode() + b"\0", hashlib.sha256)
        # Arms with weight 0 can never win: left out, so a kill of one arm costs nothing.
        self._arms = [(name.encode(), name, float(w)) for name, w in weights.items() if w > 0]
        if not self._arms:
            raise ConfigError("no arm has a positive weight")

    def arm(self, session: str) -> str:
        """The arm of one (pseudonymised) session."""
        if len(self._arms) == 1:
            return self._arms[0][1]
        prefix = self._base.copy()
        prefix.update(session.encode() + b"\0")
        best, best_name = math.inf, ""
        for raw, name, weight in self._arms:
            h = prefix.copy()
            h.update(raw)
            # U in (0, 1) from 64 bits; -ln(U)/w is exponential with rate w (the race).
            u = (int.from_bytes(h.digest()[:8], "big") + 0.5) / 18446744073709551616.0
            score = -math.log(u) / weight
            if score < best:
                best, best_name = score, name
        return best_name


# --------------------------------------------------------------------------- the experiment record


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class Experiment:
    """The experiment record (``experiment.json``); see docs/serving-experiments.md."""

    id: str
    salt: str
    arms: list[ArmSpec]
    started_at: str
    stopped_at: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.stopped_at is None

    def weights(self) -> dict[str, float]:
        return {a.name: a.weight for a in self.arms if not a.shadow}

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "salt": self.salt, "arms": [asdict(a) for a in self.arms],
                "started_at": self.started_at, "stopped_at": self.stopped_at, "history": self.history}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Experiment:
        try:
            arms = [ArmSpec(name=str(a["name"]), entry=str(a["entry"]),
                            version=None if a.get("version") is None else str(a["version"]),
                            weight=float(a["weight"]), shadow=bool(a.get("shadow", False))) for a in data["arms"]]
            return cls(id=str(data["id"]), salt=str(data["salt"]), arms=arms, started_at=str(data["started_at"]),
                       stopped_at=data.get("stopped_at"), history=list(data.get("history") or []))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"the experiment record is malformed ({type(exc).__name__}: {exc})") from None


class ExperimentStore:
    """Reads and atomically rewrites ``<log dir>/experiment.json``."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.path = self.log_dir / EXPERIMENT_FILE

    def load(self) -> Experiment | None:
        """The record, or ``None`` when there is none; ``ConfigError`` if it cannot be read."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        try:
            return Experiment.from_json(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{self.path} is not valid JSON (line {exc.lineno}): fix or delete it") from None

    def save(self, experiment: Experiment) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{EXPERIMENT_FILE}-{secrets.token_hex(4)}")
        try:
            with open(tmp, "w") as fh:
                json.dump(experiment.to_json(), fh, indent=2)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def start_or_resume(self, arms: Sequence[ArmSpec]) -> tuple[Experiment, bool]:
        """The running experiment if it has these arms (weights updated), else a new one.

        Args:
            arms: the arms of this ``recflow serve`` (live and shadow).

        Returns:
            (the experiment, True when it was resumed).
        """
        check_arms(arms)
        old = self.load()
        if old is not None and old.running and [a.identity() for a in old.arms] == [a.identity() for a in arms]:
            if old.weights() != {a.name: a.weight for a in arms if not a.shadow}:
                old.arms = list(arms)
                old.history.append({"at": _now(), "action": "weights", "weights": old.weights(), "by": "serve"})
            old.history.append({"at": _now(), "action": "resumed"})
            self.save(old)
            return old, True
        if old is not None:
            self._archive(old, "replaced by a serve with other arms")
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        new = Experiment(id=f"exp-{stamp}-{secrets.token_hex(3)}", salt=secrets.token_hex(16), arms=list(arms),
                         started_at=_now())
        new.history.append({"at": new.started_at, "action": "started", "weights": new.weights()})
        self.save(new)
        return new, False

    def _archive(self, old: Experiment, why: str) -> None:
        if old.running:
            old.stopped_at = _now()
            old.history.append({"at": old.stopped_at, "action": "stopped", "why": why})
        past = self.log_dir / PAST_EXPERIMENTS_DIR
        past.mkdir(parents=True, exist_ok=True)
        (past / f"{old.id}.json").write_text(json.dumps(old.to_json(), indent=2))

    def stop_running(self, why: str) -> Experiment | None:
        """Stop the running experiment (if any) and return it: the kill switch."""
        exp = self.load()
        if exp is None or not exp.running:
            return exp
        exp.stopped_at = _now()
        exp.history.append({"at": exp.stopped_at, "action": "stopped", "why": why})
        self.save(exp)
        return exp

    def set_weights(self, weights: Mapping[str, float]) -> Experiment:
        """Change live arms' weights in the running experiment (the servers pick it up on their next poll)."""
        exp = self.load()
        if exp is None or not exp.running:
            raise ConfigError(f"no running experiment in {self.log_dir}")
        live = exp.weights()
        unknown = sorted(set(weights) - set(live))
        if unknown:
            raise ConfigError(f"no live arm {', '.join(unknown)} in {exp.id} (arms: {', '.join(live)})")
        arms = [replace(a, weight=float(weights[a.name])) if a.name in weights else a for a in exp.arms]
        check_arms(arms)
        exp.arms = arms
        exp.history.append({"at": _now(), "action": "weights", "weights": exp.weights()})
        self.save(exp)
        return exp


def parse_weight(text: str) -> tuple[str, float]:
    """``NAME=WEIGHT`` (``recflow experiment --weight``) as (arm name, weight)."""
    name, sep, raw = text.rpartition("=")
    try:
        weight = float(raw) if sep and name else math.nan
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight) or weight < 0:
        raise ConfigError(f"--weight {text!r}: expected ARM=WEIGHT with a weight >= 0, e.g. ml-100k-sasrec=0.2")
    return name, weight




# --------------------------------------------------------------------------- routing (the request path)


class ModelHolder(Protocol):
    """What serves one arm: ``current`` is read once per request; ``check_once`` hot-swaps it."""

    @property
    def current(self) -> Any: ...

    def check_once(self) -> bool: ...


@dataclass(frozen=True)
class Routing:
    """One immutable routing table; the router rebinds it (never mutates it) on a record change."""

    experiment: str | None  # None: no experiment runs (never started, or stopped)
    assigner: Assigner | None
    live: Mapping[str, ModelHolder]
    shadows: tuple[tuple[str, ModelHolder], ...]
    weights: Mapping[str, float] = field(default_factory=dict)  # the live arms' weights, as recorded


class ArmRouter:
    """Picks the arm of each request and follows the experiment record and the arms' champions.

    Args:
        champion: the ``--model`` entry's champion: requests without a session, and everything
            once the experiment is stopped (the kill switch).
        holders: one model holder per arm of the experiment (live and shadow), by arm name.
        store: the experiment record's store, or ``None`` when no experiment runs.
        experiment_id: the experiment this server serves; another id in the file stops it here.
        assignment_key: the persisted assignment secret.
        pseudonym_key: the extract's pseudonymisation key (sessions are logged and hashed pseudonymised).
    """

    def __init__(self, champion: ModelHolder, holders: Mapping[str, ModelHolder], store: ExperimentStore | None,
                 experiment_id: str | None, assignment_key: bytes, pseudonym_key: bytes) -> None:
        self.champion, self.holders, self.store = champion, dict(holders), store
        self.experiment_id = experiment_id
        self._assignment_key, self._pseudonym_key = assignment_key, pseudonym_key
        self._pseudonyms: dict[str, str] = {}  # bounded cache: a learner sends many requests
        self._seen: tuple[int, int, int] | None = None
        self.last_error: str | None = None
        self.routing = Routing(None, None, {}, ())
        self.refresh()

    def session_pseudonym(self, raw: str | int | None) -> str | None:
        """The learner id as the extract writes it (``core.data.privacy.pseudonym``)."""
        if raw is None:
            return None
        raw_id = raw if isinstance(raw, str) else str(raw)
        cached = self._pseudonyms.get(raw_id)
        if cached is None:
            if len(self._pseudonyms) >= 100_000:
                self._pseudonyms.clear()
            cached = self._pseudonyms[raw_id] = pseudonym(self._pseudonym_key, raw_id)
        return cached

    def route(self, routing: Routing, session: str | None) -> tuple[str, ModelHolder]:
        """(arm name, its model holder) for one pseudonymised session under ``routing``."""
        if session is None:
            return UNASSIGNED, self.champion
        if routing.assigner is None:
            return CHAMPION_ARM, self.champion
        name = routing.assigner.arm(session)
        return name, routing.live[name]

    def refresh(self) -> bool:
        """Re-read the record if it changed and rebind the routing. True when the routing changed."""
        if self.store is None or self.experiment_id is None:
            return False
        try:
            st = self.store.path.stat()
            seen = (st.st_ino, st.st_mtime_ns, st.st_size)
            if seen == self._seen:
                return False
            exp = self.store.load()
        except (OSError, ConfigError) as exc:  # keep the routing we have
            self.last_error = f"experiment record not re-read: {exc}"
            return False
        self._seen = seen
        if exp is None or exp.id != self.experiment_id or not exp.running:
            routing = Routing(None, None, {}, ())
        else:
            weights = exp.weights()
            live = {name: self.holders[name] for name in weights}
            assigner = Assigner(self._assignment_key, exp.salt, weights) if sum(weights.values()) > 0 else None
            shadows = tuple((a.name, self.holders[a.name]) for a in exp.arms if a.shadow)
            routing = Routing(exp.id, assigner, live, shadows, weights)
        self.last_error = None
        self.routing = routing  # the atomic swap
        return True

    def check_arms(self) -> None:
        """Hot-swap every arm that follows its entry's champion (the champion itself has its own watcher)."""
        for holder in self.holders.values():
            if holder is not self.champion:
                holder.check_once()


__all__ = ["CHAMPION_ARM", "ENV_ASSIGNMENT_KEY", "EXPERIMENT_FILE", "KEY_FILE", "UNASSIGNED", "ArmRouter", "ArmSpec",
           "Assigner", "Experiment", "ExperimentStore", "ModelHolder", "Routing", "check_arms", "load_or_create_key",
           "parse_arm", "parse_weight"]
