"""HTTP serving of a registry entry's champion: FastAPI over the onnxruntime scorer.

- ``POST /recommendations``: top-k items for a history (sequential models) or a user
  (user models), padding and already-seen items excluded; 4xx with a reason otherwise.
- ``GET /healthz``: what is served, since when, and whether the last hot swap failed.
- ``POST /events`` and A/B or shadow arms with ``--log-dir`` (``_Experimenting``; arms in
  ``core.serving.arms``, the Parquet log in ``core.serving.outcome_log``; docs/serving-experiments.md).
- ``POST /ratings``: predicted ratings for (user, item) pairs, rating models only (FM;
  ``core.serving.ratings``).
- ``/docs``: OpenAPI UI.

Hot swap: a daemon thread reads the ``champion`` symlink every ``poll_seconds``; when it
points somewhere new, the new version is loaded and checksum-verified completely *off*
the request path, then one attribute (``ChampionWatcher.current``) is rebound. Python
rebinds a reference atomically, and each request reads it exactly once, so a request in
flight finishes on the model it started with and nothing is dropped. A version that fails
to load is not swapped in: the old one keeps serving and ``/healthz`` reports the error.

The request path is kept lean because it is measured (benchmarks/serving.py): a pure-ASGI
fast path answers POST /recommendations ahead of FastAPI's routing, the body is validated
by pydantic-core straight from the JSON bytes, the model runs on a scorer thread that
batches concurrent requests, and the response is serialised with orjson.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import json
import logging
import os
import queue
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt, StrictStr, TypeAdapter, ValidationError

from core.errors import BadRequestError, RecflowError, ServingError
from core.release.artifacts import CARD_FILE, MODEL_FILE, read_checksums
from core.release.registry import CHAMPION, Registry
from core.serving.arms import ArmRouter, ExperimentStore, ModelHolder, load_or_create_key
from core.serving.outcome_log import (
    ITEMS_CAP,
    ParquetLog,
    event_line,
    event_log,
    now_us,
    record_id,
    request_line,
    request_log,
)
from core.serving.ratings import RatingsRequest, RatingsResponse, parse_ratings, rate
from core.serving.scorer import PADDING, OnnxScorer


def _dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)  # ~5x faster response encoding than json


log = logging.getLogger("recflow.serving")

K_CAP = 1000  # upper bound on k whatever the catalogue size: a response stays small
HISTORY_PER_SEQ = 10  # default max history = 10 x the model's max_seq_length
USER_MODEL_MAX_HISTORY = 1000  # user models use the history only to exclude seen items
MAX_LISTED_UNKNOWN = 10  # unknown ids named in an error message
MAX_BATCH = 32  # requests scored in one model call at most (bounds a batch's latency)
MAX_BODY_BYTES = 1 << 20  # far above any valid request; bounds what one client makes us buffer


# --------------------------------------------------------------------------- API schema


class RecommendationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[StrictStr | StrictInt] = Field(
        default_factory=list,
        description="The user's recent item ids, oldest first. Sequential models score this history; "
        "for every model these items are excluded from the answer when exclude_seen is true.",
    )
    user: StrictStr | StrictInt | None = Field(
        None, description="User id, for non-sequential (user) models only; must be a user the model was trained on."
    )
    session: StrictStr | StrictInt | None = Field(
        None, description="The learner's id, for A/B arms and the outcome log (pseudonymised by the server, never "
        "stored raw). Without it the champion answers (arm 'unassigned')."
    )
    k: StrictInt = Field(10, description="How many items to return: 1 to min(catalogue size, 1000).")
    exclude_seen: bool = Field(True, description="Leave out items already in `items`.")
    ignore_unknown: bool = Field(
        False, description="Drop item ids the model does not know instead of answering 422 (e.g. items newer "
        "than the model)."
    )


class RecommendedItem(BaseModel):
    item: str = Field(description="Item id as in the training data.")
    score: float = Field(description="Model score (higher is better; comparable within one response only).")


class RecommendationResponse(BaseModel):
    model: str = Field(description="Registry entry served.")
    version: str = Field(description="Registry version that produced this answer.")
    items: list[RecommendedItem] = Field(description="Best first; never padding, never seen items when excluded.")
    arm: str | None = Field(None, description="The A/B arm that answered (served with --arm/--shadow/--log-dir only).")
    request_id: str | None = Field(None, description="The outcome log's id of this answer (with --log-dir only).")
    fallback: str | None = Field(None, description="'popular' when the request held no item the model knows: the "
                                 "training data's most popular items, scored by their share of interactions.")


class Health(BaseModel):
    status: str = Field(description="'ok', or 'degraded' when the last hot swap failed (the old model still serves).")
    model: str
    version: str
    loaded_at: str = Field(description="When the served version was loaded (UTC, ISO 8601).")
    last_swap_error: str | None = Field(description="Why the newest champion is not served, if it is not.")
    experiment: dict[str, Any] | None = Field(None, description="With --log-dir: the experiment served (id, live "
                                              "weights, shadows; null id when none runs).")
    outcome_log: dict[str, Any] | None = Field(None, description="With --log-dir: rows written, queued and dropped "
                                               "(queue full or write failed), per log.")


class ErrorDetail(BaseModel):
    detail: str = Field(description="What is wrong with the request.")


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class LoadedModel:
    """One immutable served version; requests hold on to it for their whole duration."""

    name: str
    version: str
    scorer: OnnxScorer
    loaded_at: str
    max_history: int
    k_max: int


def load_version(
    registry: Registry,
    name: str,
    version: str,
    *,
    allow_unverified: bool = False,
    max_history: int | None = None,
    intra_op_threads: int | None = 1,
) -> LoadedModel:
    """Load and verify one version completely, or raise a ``RecflowError`` saying why not."""
    version_dir = registry.entry(name) / version
    if not version_dir.is_dir():
        raise ServingError(f"{name}/{version} does not exist in {registry.root}")
    if not (version_dir / MODEL_FILE).is_file():
        raise ServingError(f"{name}/{version} has no {MODEL_FILE}, so it cannot be served: {_not_exported_reason(version_dir)}")
    checksums = read_checksums(version_dir, allow_unverified=allow_unverified)
    if checksums is None:
        log.warning("serving %s/%s without checksum verification (--allow-unverified)", name, version)
    try:
        scorer = OnnxScorer(version_dir, checksums=checksums, intra_op_threads=intra_op_threads)
    except RecflowError:
        raise
    except Exception as exc:
        raise ServingError(f"cannot load {name}/{version}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
    if max_history is None:
        max_history = HISTORY_PER_SEQ * scorer.max_seq_length if scorer.sequential else USER_MODEL_MAX_HISTORY
    return LoadedModel(
        name=name,
        version=version,
        scorer=scorer,
        loaded_at=datetime.now(UTC).isoformat(timespec="seconds"),
        max_history=max_history,
        k_max=max(1, min(scorer.n_items, K_CAP)),
    )


def _not_exported_reason(version_dir: Path) -> str:
    """The model card's reason for having no ONNX graph (e.g. ItemKNN, EASE)."""
    try:
        card = json.loads((version_dir / CARD_FILE).read_text())
    except (OSError, ValueError):
        return "no model card explains why"
    reason = (card.get("export") or {}).get("reason")
    return str(reason) if reason else "the model card gives no reason; only ONNX-exported models can be served"


class ChampionWatcher:
    """Holds the served model and swaps in a new champion when the symlink moves."""

    def __init__(
        self,
        registry_root: Path,
        model_name: str,
        *,
        poll_seconds: float = 2.0,
        allow_unverified: bool = False,
        max_history: int | None = None,
        intra_op_threads: int | None = 1,
    ) -> None:
        self.registry = Registry(Path(registry_root))
        self.name = model_name
        self.poll_seconds = poll_seconds
        self._load_kwargs: dict[str, Any] = {"allow_unverified": allow_unverified, "max_history": max_history,
                                             "intra_op_threads": intra_op_threads}
        if not self.registry.entry(model_name).is_dir():
            raise ServingError(f"no registry entry {model_name!r} in {self.registry.root} "
                               f"(entries: {', '.join(list_entries(self.registry.root)) or 'none'})")
        version = self.registry.champion_version(model_name)
        if version is None:
            raise ServingError(f"{model_name} has no champion in {self.registry.root} "
                               f"(versions: {', '.join(self.registry.versions(model_name)) or 'none'})")
        # The one reference requests read; rebound (never mutated) by a swap.
        self.current: LoadedModel = load_version(self.registry, model_name, version, **self._load_kwargs)
        self.last_swap_error: str | None = None
        self._failed_target: str | None = None  # not retried until the champion moves again
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_once(self) -> bool:
        """Swap to the champion if it moved and loads cleanly. True when a swap happened."""
        try:
            target = os.readlink(self.registry.entry(self.name) / CHAMPION)
        except OSError as exc:
            self._fail(None, f"cannot read the champion pointer: {exc.strerror or exc}")
            return False
        version = Path(target).name
        if version == self.current.version:
            self._failed_target, self.last_swap_error = None, None  # back to (or still) what we serve
            return False
        if version == self._failed_target:
            return False
        try:
            new = load_version(self.registry, self.name, version, **self._load_kwargs)
        except (RecflowError, OSError) as exc:
            self._fail(version, f"champion {version} not served: {exc}")
            return False
        old, self.current = self.current, new  # the atomic swap
        self._failed_target, self.last_swap_error = None, None
        log.info("hot-swapped %s: %s -> %s", self.name, old.version, new.version)
        return True

    def _fail(self, version: str | None, message: str) -> None:
        if message != self.last_swap_error:
            log.error("%s; still serving %s", message, self.current.version)
        self._failed_target, self.last_swap_error = version, message

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.check_once()
            except Exception:
                log.exception("champion watcher failed; still serving %s", self.current.version)

    def start(self) -> None:
        if self._thread is None and self.poll_seconds > 0:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="recflow-champion-watcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


def list_entries(registry_root: Path) -> list[str]:
    root = Path(registry_root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


# --------------------------------------------------------------------------- the request path


def _too_large() -> tuple[int, bytes]:
    return 413, _dumps({"detail": f"request body over {MAX_BODY_BYTES} bytes; send only the recent history"})


def _parse(body: bytes) -> RecommendationRequest:
    try:
        return RecommendationRequest.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if any(e["type"] == "json_invalid" for e in errors):
            reason = next(e for e in errors if e["type"] == "json_invalid").get("ctx", {}).get("error", "")
            raise BadRequestError(400, f"malformed JSON body: {reason}".rstrip(": ")) from None
        parts = []
        for e in errors[:5]:
            where = ".".join(str(p) for p in e["loc"]) or "body"
            parts.append(f"{where}: {e['msg']}")
        raise BadRequestError(422, "invalid request: " + "; ".join(parts)) from None


@dataclass(frozen=True)
class _Job:
    """A validated request: what to score, with which model, and what to leave out."""

    model: LoadedModel
    key: int  # internal user id (user models); unused for sequential ones
    history: np.ndarray  # internal item ids, oldest first
    k: int
    exclude: np.ndarray | None
    popular: bool = False  # no item the model knows: the training data's most popular items answer


def _validate(model: LoadedModel, req: RecommendationRequest) -> _Job:
    scorer = model.scorer
    if scorer.rates_pairs:
        raise BadRequestError(422, f"{model.name} is a rating model: POST /ratings with (user, item) pairs")
    if not 1 <= req.k <= model.k_max:
        raise BadRequestError(422, f"k must be between 1 and {model.k_max}, got {req.k}")
    if len(req.items) > model.max_history:
        raise BadRequestError(422, f"history too long: {len(req.items)} items, at most {model.max_history} accepted "
                               f"(only the last {scorer.max_seq_length or 'few'} are scored; send the most recent)")
    index = scorer.item_index
    ids: list[int] = []
    unknown: list[str] = []
    for raw in req.items:
        token = raw if isinstance(raw, str) else str(raw)
        i = index.get(token, PADDING)
        if i == PADDING:
            unknown.append(token)
        else:
            ids.append(i)
    if unknown and not req.ignore_unknown:
        listed = ", ".join(repr(u) for u in unknown[:MAX_LISTED_UNKNOWN])
        more = f" and {len(unknown) - MAX_LISTED_UNKNOWN} more" if len(unknown) > MAX_LISTED_UNKNOWN else ""
        raise BadRequestError(422, f"unknown items (not in {model.name} {model.version}): {listed}{more}; "
                               f"send \"ignore_unknown\": true to drop them")
    known = np.asarray(ids, dtype=np.int64)
    uid = PADDING
    if scorer.sequential or scorer.takes_history:
        if scorer.sequential and req.user is not None:
            raise BadRequestError(422, f"{model.name} is a sequential model: send the user's recent \"items\", not \"user\"")
        if not len(known) and scorer.popular:  # a learner new to the model: nothing to score from
            return _Job(model, uid, known, req.k, known if req.exclude_seen else None, popular=True)
        if not len(known) and scorer.takes_history:  # EASE, ItemKNN: the items are the input, any user
            raise BadRequestError(422, f"{model.name} scores the request's history: send at least one item it "
                                   f"knows in \"items\" (this version has no popular items to fall back on)")
    else:
        if req.user is None:
            raise BadRequestError(422, f"{model.name} is a user model: send \"user\" (a user id it was trained on); "
                                   f"\"items\" only lists items to exclude")
        user = req.user if isinstance(req.user, str) else str(req.user)
        uid = scorer.user_index.get(user, PADDING)
        if uid == PADDING and scorer.popular:  # a learner who came after the model: nothing to score from
            return _Job(model, uid, known, req.k, known if req.exclude_seen else None, popular=True)
        if uid == PADDING:
            raise BadRequestError(422, f"unknown user {user!r}: {model.name} scores users it was trained on only "
                                   f"(this version has no popular items to fall back on)")
    return _Job(model, uid, known, req.k, known if req.exclude_seen else None)


def _payload(job: _Job, scores: np.ndarray) -> dict[str, Any]:
    top = job.model.scorer.top_items(scores, job.k, job.exclude, inplace=True)  # the row is this job's own
    return {"model": job.model.name, "version": job.model.version,
            "items": [{"item": i, "score": s} for i, s in top]}


def _popular_payload(job: _Job) -> dict[str, Any]:
    top = job.model.scorer.popular_items(job.k, job.exclude)
    return {"model": job.model.name, "version": job.model.version,
            "items": [{"item": i, "score": s} for i, s in top], "fallback": "popular"}


class _Batcher:
    """One inference thread per process; requests that arrive while it is busy are scored together.

    Why: onnxruntime releases the GIL, so the event loop parses and answers other requests
    while the model runs (two cores' worth of work in one process), and a batch of B costs
    less than B calls (~25% less per sequence for ml-100k SASRec on CPU). Server CPU per
    request went from 0.66 ms (inline in the loop) to 0.54 ms (benchmarks/README.md). When
    idle, a request is scored alone at once. Jobs carry their own model, so a batch never
    mixes two versions across a hot swap.
    """

    def __init__(self, max_batch: int = MAX_BATCH) -> None:
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[_Job, asyncio.Future[dict[str, Any]]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    async def score(self, job: _Job) -> dict[str, Any]:
        if job.popular:  # no model call: answered here, for every route and arm alike
            return _popular_payload(job)
        if self._thread is None:
            self.start()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._queue.put((job, future))
        return await future

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="recflow-scorer", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        with self._lock:
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join(timeout=10)
                self._thread = None

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            self._score(batch)

    def _score(self, batch: list[tuple[_Job, asyncio.Future[dict[str, Any]]]]) -> None:
        by_model: dict[int, list[tuple[_Job, asyncio.Future[dict[str, Any]]]]] = {}
        for item in batch:
            by_model.setdefault(id(item[0].model), []).append(item)
        done: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, bool]]] = {}
        for group in by_model.values():
            scorer = group[0][0].model.scorer
            try:
                if scorer.sequential:
                    scores = scorer.scores_for_sequences([job.history for job, _ in group])
                elif scorer.takes_history:
                    scores = scorer.scores_for_histories([job.history for job, _ in group])
                else:
                    scores = scorer.scores_for_users([job.key for job, _ in group])
                results = [(_payload(job, scores[row]), True) for row, (job, _) in enumerate(group)]
            except Exception as exc:
                results = [(exc, False)] * len(group)
            for (_, future), (value, ok) in zip(group, results):
                done.setdefault(future.get_loop(), []).append((future, value, ok))
        for loop, items in done.items():  # one wake-up per event loop, not one per request
            with contextlib.suppress(RuntimeError):  # that loop has closed (server shutting down)
                loop.call_soon_threadsafe(_resolve, items)


def _resolve(items: list[tuple[asyncio.Future[Any], Any, bool]]) -> None:
    for future, value, ok in items:
        if not future.done():  # the client may have gone away
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)


class _FastPath:
    """Pure ASGI middleware answering ``POST <path>`` before FastAPI's routing and request handling.

    Measured on the 2-core box: FastAPI's route machinery (exception/exit-stack middleware,
    routing, dependency solving, Request object) costs ~85 us of a ~500 us request (an ASGI
    call answering 422: 126 us through FastAPI, 43 us here). This path skips it with the
    same answers. Everything else (docs, healthz, 404/405) goes on
    to FastAPI, and the route stays declared there so OpenAPI describes it.
    """

    def __init__(self, app: Any, path: str, answer: Any) -> None:
        self.app, self.path, self.answer = app, path, answer

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                status, body = _too_large()
                break
            chunks.append(chunk)
            if not message.get("more_body", False):
                status, body = await self.answer(b"".join(chunks))
                break
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------- arms, shadows and the outcome log

ENV_EVENTS_TOKEN = "RECFLOW_EVENTS_TOKEN"  # POST /events needs "Authorization: Bearer <this value>"
MAX_EVENTS = 1000  # events in one POST /events body


class _PinnedVersion:
    """An arm pinned to one version (``ENTRY:VERSION``): loaded once, never swapped."""

    def __init__(self, model: LoadedModel) -> None:
        self.current = model

    def check_once(self) -> bool:
        return False


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session: StrictStr | StrictInt = Field(description="The learner's id (pseudonymised by the server).")
    item: StrictStr | StrictInt = Field(description="The item (question) the outcome is about.")
    kind: StrictStr = Field(description='"attempt", "correct", or another outcome name.')
    value: float | None = Field(None, description="e.g. 1.0 for correct, a score, a duration.")
    ts: AwareDatetime | None = Field(None, description="When it happened (default: when received).")


_EVENTS_BODY: TypeAdapter[EventIn | list[EventIn]] = TypeAdapter(EventIn | list[EventIn])


def _for_model(model: LoadedModel, req: RecommendationRequest, *, shadow: bool) -> RecommendationRequest:
    """The request as one arm's model needs it, so that one request shape works for every arm.

    A sequential arm ignores ``user`` (a user-model arm needs it); a shadow also drops the
    items it does not know and caps k, since its failure must never cost the live answer.
    """
    update: dict[str, Any] = {}
    if req.user is not None and model.scorer.sequential:
        update["user"] = None
    if shadow:
        update["ignore_unknown"] = True
        update["k"] = max(1, min(req.k, model.k_max))
    return req.model_copy(update=update) if update else req


class _Experimenting:
    """The request path with an outcome log, and A/B or shadow arms when an experiment runs.

    Routing is read once per request (``ArmRouter.routing``, rebound when the experiment record
    changes), like the champion; the live arm's answer is returned and logged; each shadow is
    queued on the same scorer thread without being awaited, and logged when its answer comes.
    """

    def __init__(self, router: ArmRouter, batcher: _Batcher, requests: ParquetLog, events: ParquetLog,
                 poll_seconds: float, events_token: str | None) -> None:
        self.router, self.batcher, self.requests, self.events = router, batcher, requests, events
        self.poll_seconds, self.events_token = poll_seconds, events_token
        self.shadow_errors = 0
        self._pending: set[asyncio.Future[Any]] = set()  # shadow tasks: referenced until done
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    async def answer(self, body: bytes) -> tuple[int, bytes]:
        if len(body) > MAX_BODY_BYTES:
            return _too_large()
        try:
            req = _parse(body)
        except BadRequestError as exc:
            return exc.status, _dumps({"detail": exc.detail})
        router = self.router
        routing = router.routing  # read once: a weight change or kill during this request does not affect it
        session = router.session_pseudonym(req.session)
        arm, holder = router.route(routing, session)
        model: LoadedModel = holder.current
        try:
            job = _validate(model, _for_model(model, req, shadow=False))
        except BadRequestError as exc:
            return exc.status, _dumps({"detail": exc.detail})
        payload = await self.batcher.score(job)
        request_id = record_id()
        payload["arm"], payload["request_id"] = arm, request_id
        n = len(req.items)
        items = req.items if n <= ITEMS_CAP else None
        self.requests.submit(request_line(request_id, now_us(), routing.experiment, arm, False, model.name,
                                          model.version, session, items, n, n - len(job.history), payload["items"]))
        for name, shadow in routing.shadows:
            self._shadow(name, shadow.current, req, (request_id, routing.experiment, session, items, n))
        return 200, _dumps(payload)

    def _shadow(self, name: str, model: LoadedModel, req: RecommendationRequest,
                row: tuple[str, str | None, str | None, list[Any] | None, int]) -> None:
        try:
            job = _validate(model, _for_model(model, req, shadow=True))
        except BadRequestError:
            self.shadow_errors += 1
            return
        task = asyncio.ensure_future(self.batcher.score(job))
        self._pending.add(task)
        request_id, experiment, session, items, n = row

        def logged(done: asyncio.Future[Any]) -> None:
            self._pending.discard(done)
            if done.cancelled() or done.exception() is not None:
                self.shadow_errors += 1
                return
            self.requests.submit(request_line(request_id, now_us(), experiment, name, True, model.name,
                                              model.version, session, items, n, n - len(job.history),
                                              done.result()["items"]))

        task.add_done_callback(logged)

    def record_events(self, body: bytes, authorization: str | None) -> tuple[int, bytes]:
        """``POST /events``: outcomes straight into ``<log dir>/events/``."""
        if not self.events_token:
            return 503, _dumps({"detail": f"events are not accepted: set {ENV_EVENTS_TOKEN} for recflow serve"})
        expected = f"Bearer {self.events_token}".encode()
        if authorization is None or not hmac.compare_digest(authorization.encode(), expected):
            return 401, _dumps({"detail": "send the events token as 'Authorization: Bearer <token>'"})
        if len(body) > MAX_BODY_BYTES:
            return _too_large()
        try:
            parsed = _EVENTS_BODY.validate_json(body)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            return 422, _dumps({"detail": f"invalid event: {where}: {first['msg']}"})
        events = parsed if isinstance(parsed, list) else [parsed]
        if len(events) > MAX_EVENTS:
            return 413, _dumps({"detail": f"at most {MAX_EVENTS} events per request, got {len(events)}"})
        received = now_us()
        accepted = 0
        for e in events:
            ts = received if e.ts is None else int(e.ts.timestamp() * 1_000_000)
            item = e.item if isinstance(e.item, str) else str(e.item)
            accepted += self.events.submit(event_line(record_id(), ts, self.router.session_pseudonym(e.session),
                                                      item, e.kind, e.value))
        return 202, _dumps({"accepted": accepted, "dropped": len(events) - accepted})

    def health(self) -> dict[str, Any]:
        routing = self.router.routing
        swap_errors = {name: err for name, h in self.router.holders.items()
                       if (err := getattr(h, "last_swap_error", None))}  # an arm that still serves its old version
        return {"experiment": {"id": routing.experiment, "weights": dict(routing.weights),
                               "shadows": [name for name, _ in routing.shadows],
                               "last_error": self.router.last_error, "arm_swap_errors": swap_errors},
                "outcome_log": {"requests": self.requests.stats(), "events": self.events.stats(),
                                "shadow_errors": self.shadow_errors}}

    def start(self) -> None:
        self.requests.start()
        self.events.start()
        if self._thread is None and self.poll_seconds > 0:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="recflow-arms-watcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.requests.close()
        self.events.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.router.refresh()
                self.router.check_arms()
            except Exception:
                log.exception("arms watcher failed; routing unchanged")


def _experimenting(watcher: ChampionWatcher, batcher: _Batcher, log_dir: Path, experiment_id: str | None,
                   poll_seconds: float) -> _Experimenting:
    """Load every arm of the experiment (before any port is bound) and open the logs."""
    from core.config import PrivacyConfig
    from core.data.privacy import resolve_key

    pseudonym_key = resolve_key(PrivacyConfig(), source="the serving log")
    store = ExperimentStore(log_dir)
    holders: dict[str, ModelHolder] = {}
    if experiment_id is not None:
        exp = store.load()
        if exp is None or exp.id != experiment_id:
            raise ServingError(f"experiment {experiment_id} is not the one in {store.path}")
        for arm in exp.arms:
            if arm.version is None and arm.entry == watcher.name:
                holders[arm.name] = watcher
            elif arm.version is None:
                holders[arm.name] = ChampionWatcher(watcher.registry.root, arm.entry, poll_seconds=0,
                                                    **watcher._load_kwargs)
            else:
                holders[arm.name] = _PinnedVersion(load_version(watcher.registry, arm.entry, arm.version,
                                                                **watcher._load_kwargs))
    router = ArmRouter(watcher, holders, store if experiment_id else None, experiment_id,
                       load_or_create_key(log_dir), pseudonym_key)
    # Requests: one line per answer, converted to Parquet by a child process (off this process's
    # CPU and GIL); events are few, so their writer thread converts them itself.
    requests = request_log(log_dir, converter="process", flush_seconds=0.25, rotate_seconds=60.0)
    return _Experimenting(router, batcher, requests, event_log(log_dir), poll_seconds,
                          os.environ.get(ENV_EVENTS_TOKEN, "").strip() or None)


# --------------------------------------------------------------------------- the app


def create_app(
    registry_root: Path,
    model_name: str,
    *,
    poll_seconds: float = 2.0,
    allow_unverified: bool = False,
    max_history: int | None = None,
    intra_op_threads: int | None = 1,
    fast_path: bool = True,
    log_dir: Path | None = None,
    experiment_id: str | None = None,
) -> FastAPI:
    """The serving app for ``model_name``'s champion. Raises a ``RecflowError`` if it cannot be served.

    The champion is loaded (and verified) here, so a bad registry fails before any port is
    bound; the hot-swap thread runs while the app is being served (its lifespan).
    ``fast_path``: answer POST /recommendations ahead of FastAPI's routing (same answers,
    ~85 us less per request); off, the declared FastAPI route answers it.
    ``log_dir``: log every answer (and ``POST /events``) under it, and serve the arms of
    ``experiment_id`` (its record in ``log_dir``; see ``core.serving.arms``).
    """
    watcher = ChampionWatcher(registry_root, model_name, poll_seconds=poll_seconds,
                              allow_unverified=allow_unverified, max_history=max_history,
                              intra_op_threads=intra_op_threads)

    batcher = _Batcher()
    experimenting = (None if log_dir is None else
                     _experimenting(watcher, batcher, Path(log_dir), experiment_id, poll_seconds))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        watcher.start()
        batcher.start()
        if experimenting is not None:
            experimenting.start()
        try:
            yield
        finally:
            watcher.stop()
            batcher.stop()
            if experimenting is not None:
                experimenting.stop()  # after the batcher: what was answered is written

    app = FastAPI(
        title="recflow serving",
        summary=f"Top-k recommendations from the champion of {model_name}",
        version="1",
        lifespan=lifespan,
    )
    app.state.watcher = watcher
    app.state.experimenting = experimenting

    @app.post(
        "/recommendations",
        summary="Top-k items for a history (sequential models) or a user (user models)",
        response_model=RecommendationResponse,
        responses={400: {"model": ErrorDetail, "description": "Malformed JSON"},
                   422: {"model": ErrorDetail, "description": "Unknown items or user, k out of range, "
                         "history too long, wrong field for the model kind"}},
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": RecommendationRequest.model_json_schema()}}}},
    )
    async def recommendations(request: Request) -> Response:
        # Normally answered by _FastPath below before routing; this is the same code, for
        # the OpenAPI description and for an app mounted without the middleware.
        status, body = await answer(await request.body())
        return Response(body, status_code=status, media_type="application/json")

    async def answer(body: bytes) -> tuple[int, bytes]:
        if experimenting is not None:
            return await experimenting.answer(body)
        if len(body) > MAX_BODY_BYTES:
            return _too_large()
        model = watcher.current  # read once: a swap during this request does not affect it
        try:
            job = _validate(model, _parse(body))
        except BadRequestError as exc:
            return exc.status, _dumps({"detail": exc.detail})
        return 200, _dumps(await batcher.score(job))

    if fast_path:
        app.add_middleware(_FastPath, path="/recommendations", answer=answer)

    @app.post("/ratings", summary="Predicted ratings for (user, item) pairs (rating models such as FM)",
              response_model=RatingsResponse,
              responses={400: {"model": ErrorDetail, "description": "Malformed JSON"},
                         422: {"model": ErrorDetail, "description": "Unknown users or items, too many pairs, "
                               "not a rating model"}},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": RatingsRequest.model_json_schema()}}}})
    async def ratings(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            status, out = _too_large()
            return Response(out, status_code=status, media_type="application/json")
        model = watcher.current  # read once, as /recommendations does
        try:
            req = parse_ratings(body)
            answer = await asyncio.to_thread(rate, model.name, model.version, model.scorer, req)
        except BadRequestError as exc:
            return Response(_dumps({"detail": exc.detail}), status_code=exc.status, media_type="application/json")
        return Response(_dumps(answer), media_type="application/json")

    @app.get("/healthz", response_model=Health, summary="What is served, and whether the last hot swap failed")
    async def healthz() -> Response:
        model, err = watcher.current, watcher.last_swap_error
        health = {"status": "degraded" if err else "ok", "model": model.name, "version": model.version,
                  "loaded_at": model.loaded_at, "last_swap_error": err}
        if experimenting is not None:
            health |= experimenting.health()
        return Response(_dumps(health), media_type="application/json")

    @app.post("/events", summary="Record learners' outcomes (attempts, correct answers) in the outcome log",
              status_code=202, responses={401: {"model": ErrorDetail}, 422: {"model": ErrorDetail},
                                          503: {"model": ErrorDetail, "description": "No --log-dir or no token set"}},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": EventIn.model_json_schema()}}}})
    async def events(request: Request) -> Response:
        if experimenting is None:
            status, body = 503, _dumps({"detail": "events are not recorded: start recflow serve with --log-dir"})
        else:
            status, body = experimenting.record_events(await request.body(), request.headers.get("authorization"))
        return Response(body, status_code=status, media_type="application/json")

    return app


def tune_gc_for_serving() -> None:
    """For a dedicated server process (not called by ``create_app``: tests share their process).

    Profiling under load showed ~15% of the event loop in the cyclic GC, re-scanning the
    long-lived objects of torch-free but heavy imports (FastAPI, pydantic, onnxruntime) and
    the vocabularies. Freezing what exists after startup takes them out of every scan, and a
    larger young generation collects less often; request garbage is acyclic and freed by
    reference counting anyway.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


# Settings for ``app_from_env`` (uvicorn --workers N imports the app in each worker process).
ENV_REGISTRY = "RECFLOW_SERVE_REGISTRY"
ENV_MODEL = "RECFLOW_SERVE_MODEL"
ENV_POLL = "RECFLOW_SERVE_POLL_SECONDS"
ENV_ALLOW_UNVERIFIED = "RECFLOW_SERVE_ALLOW_UNVERIFIED"
ENV_MAX_HISTORY = "RECFLOW_SERVE_MAX_HISTORY"
ENV_LOG_DIR = "RECFLOW_SERVE_LOG_DIR"
ENV_EXPERIMENT = "RECFLOW_SERVE_EXPERIMENT"


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn core.serving.app:app_from_env --factory`` (one call per worker)."""
    max_history = os.environ.get(ENV_MAX_HISTORY)
    app = create_app(
        Path(os.environ[ENV_REGISTRY]),
        os.environ[ENV_MODEL],
        poll_seconds=float(os.environ.get(ENV_POLL, "2.0")),
        allow_unverified=os.environ.get(ENV_ALLOW_UNVERIFIED) == "1",
        max_history=int(max_history) if max_history else None,
        log_dir=Path(os.environ[ENV_LOG_DIR]) if os.environ.get(ENV_LOG_DIR) else None,
        experiment_id=os.environ.get(ENV_EXPERIMENT) or None,
    )
    tune_gc_for_serving()
    return app
