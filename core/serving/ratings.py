"""``POST /ratings``: predicted ratings for given (user, item) pairs, from a rating model (FM).

A rating model's graph (signature kind ``pairs``) maps internal (user id, item id) pairs to
the rating on the training data's scale; it does not rank a catalogue, so it has its own
route. Users and items must be ones the model was trained on: an unknown one is a 422 that
names it (a rating for a stranger would be the model's bias terms only, a guess).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from core.errors import BadRequestError
from core.serving.scorer import PADDING, OnnxScorer

MAX_PAIRS = 1000  # per request; bounds one model call
MAX_LISTED = 10  # unknown ids named in an error message


class Pair(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: StrictStr | StrictInt = Field(description="User id as in the training data.")
    item: StrictStr | StrictInt = Field(description="Item id as in the training data.")


class RatingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pairs: list[Pair] = Field(description=f"The (user, item) pairs to rate, 1 to {MAX_PAIRS}.")


class Rating(BaseModel):
    user: str
    item: str
    rating: float = Field(description="Predicted rating on the training data's scale (e.g. 1-5 stars).")


class RatingsResponse(BaseModel):
    model: str = Field(description="Registry entry served.")
    version: str = Field(description="Registry version that produced this answer.")
    ratings: list[Rating] = Field(description="One per requested pair, in request order.")


def parse_ratings(body: bytes) -> RatingsRequest:
    """The request body -> ``RatingsRequest``; ``BadRequestError`` (400 malformed JSON, 422 invalid) otherwise."""
    try:
        req = RatingsRequest.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise BadRequestError(400, "malformed JSON body") from None
        parts = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:5]]
        raise BadRequestError(422, "invalid request: " + "; ".join(parts)) from None
    if not 1 <= len(req.pairs) <= MAX_PAIRS:
        raise BadRequestError(422, f"pairs: send 1 to {MAX_PAIRS} (user, item) pairs, got {len(req.pairs)}")
    return req


def _ids(tokens: list[str], index: dict[str, int], what: str, name: str) -> np.ndarray:
    ids = [index.get(t, PADDING) for t in tokens]
    unknown = list(dict.fromkeys(t for t, i in zip(tokens, ids) if i == PADDING))
    if unknown:
        listed = ", ".join(repr(u) for u in unknown[:MAX_LISTED])
        more = f" and {len(unknown) - MAX_LISTED} more" if len(unknown) > MAX_LISTED else ""
        raise BadRequestError(422, f"unknown {what} (not in {name}): {listed}{more}; "
                                   f"{name} rates {what} it was trained on only")
    return np.asarray(ids, dtype=np.int64)


def rate(name: str, version: str, scorer: OnnxScorer, req: RatingsRequest) -> dict[str, Any]:
    """The response body for ``req``, scored by ``scorer`` (a pairs model).

    Args:
        name: the registry entry served (named in messages and the answer).
        version: the version ``scorer`` loaded.
        scorer: the served version's scorer.
        req: the parsed request.

    Returns:
        ``RatingsResponse`` as a dict. ``BadRequestError`` (422) for a model that does not rate
        pairs, or for unknown users or items (each named).
    """
    if not scorer.rates_pairs:
        raise BadRequestError(422, f"{name} {version} is not a rating model (it is a {scorer.kind} model): "
                                   "POST /recommendations instead")
    users = [p.user if isinstance(p.user, str) else str(p.user) for p in req.pairs]
    items = [p.item if isinstance(p.item, str) else str(p.item) for p in req.pairs]
    where = f"{name} {version}"
    user_ids = _ids(users, scorer.user_index, "users", where)
    item_ids = _ids(items, scorer.item_index, "items", where)
    predicted = scorer.rate_pairs(user_ids, item_ids).tolist()
    return {"model": name, "version": version,
            "ratings": [{"user": u, "item": i, "rating": r} for u, i, r in zip(users, items, predicted)]}
