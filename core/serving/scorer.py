"""Score a registry model version with onnxruntime and turn scores into recommendations.

The signature's kind says what the graph wants: a sequence (sequential models), a known user
(user models), the request's item history (history models: EASE, ItemKNN; any user), or
(user, item) pairs (pairs models: FM, which rate pairs and recommend nothing).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import RegistryError, ServingError
from core.release.artifacts import (
    DATA_PROFILE_FILE,
    HISTORY_INPUT,
    ITEM_INPUT,
    ITEM_SEQ_INPUT,
    ITEM_SEQ_LEN_INPUT,
    ITEM_VOCAB_FILE,
    MODEL_FILE,
    PADDING_ITEM,
    SCORER_FILES,
    SIGNATURE_FILE,
    USER_INPUT,
    USER_VOCAB_FILE,
    VersionReader,
)

__all__ = ["ITEM_VOCAB_FILE", "MODEL_FILE", "PADDING", "SCORER_FILES", "SIGNATURE_FILE", "USER_VOCAB_FILE",
           "OnnxScorer", "Recommendation", "mask_scores", "onnx_providers", "top_k"]
PADDING = PADDING_ITEM  # RecBole's padding id: never a real item or user


def mask_scores(scores: np.ndarray, exclude: np.ndarray | list[int] | None = None) -> np.ndarray:
    """Copy of ``scores`` with the padding column 0 and ``exclude`` ids set to -inf."""
    out = np.array(scores, dtype=np.float64, copy=True)
    out[..., 0] = -np.inf
    if exclude is not None and len(exclude):
        out[..., np.asarray(exclude, dtype=np.int64)] = -np.inf
    return out


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, best first (stable for ties)."""
    k = min(k, scores.shape[-1])
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.lexsort((part, -scores[part]))]


def onnx_providers() -> list[str]:
    """CUDA when this onnxruntime build can use it, CPU always as the fallback."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]


@dataclass
class Recommendation:
    item: str
    score: float


class OnnxScorer:
    """Loads the ONNX graph, its signature and vocabularies from one model directory.

    ``checksums`` ({file name: sha256}, from ``core.release.artifacts.read_checksums``): when
    given, each file is read once through the contract's verifier and those very bytes are
    loaded, so a file swapped between a check and the load cannot slip through. ``intra_op_threads``: onnxruntime's per-call
    thread pool; a server running one process per core wants 1 (no oversubscription).
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        checksums: Mapping[str, str] | None = None,
        intra_op_threads: int | None = None,
        providers: list[str] | None = None,
    ) -> None:
        import onnxruntime as ort

        self.model_dir = Path(model_dir)
        self._reader = VersionReader(self.model_dir, checksums)
        if not self._reader.has(MODEL_FILE):
            raise RegistryError(f"{self.model_dir} holds no {MODEL_FILE} (was the model exportable?)")
        model_bytes = self._reader.read(MODEL_FILE)
        signature = self._reader.signature()
        self.signature: dict[str, Any] = dict(signature.raw)
        self.items: list[str] = self._reader.json(ITEM_VOCAB_FILE)
        self.item_index = {tok: i for i, tok in enumerate(self.items)}
        # The training data's most popular items (data_profile.json, when the version has one): the
        # answer for a learner with no item the model knows, instead of a model call on nothing.
        profile = self._reader.json(DATA_PROFILE_FILE) if self._reader.has(DATA_PROFILE_FILE) else {}
        self.popular: list[tuple[int, float]] = [
            (self.item_index[tok], float(share)) for tok, share in profile.get("top_items", [])
            if self.item_index.get(tok, PADDING) != PADDING]
        users: list[str] = self._reader.json(USER_VOCAB_FILE) if self._reader.has(USER_VOCAB_FILE) else []
        self.user_index = {tok: i for i, tok in enumerate(users)}
        self.kind = signature.kind
        self.sequential = signature.sequential
        self.takes_history = signature.takes_history  # scores the request's items, whoever the user is
        self.rates_pairs = signature.rates_pairs  # (user, item) -> rating; no top-k
        self.max_seq_length = signature.max_seq_length
        options = ort.SessionOptions()
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
            options.inter_op_num_threads = 1
        self.providers = providers or onnx_providers()
        self.session = ort.InferenceSession(model_bytes, sess_options=options, providers=self.providers)
        del model_bytes
        self._output = [signature.output]
        # Reused input buffer for batch-1 sequential calls (the hot path of the server).
        self._one_len = np.zeros(1, dtype=np.int64)

    @property
    def n_items(self) -> int:
        """Real items in the catalogue (the padding id excluded)."""
        return len(self.items) - 1

    # ----------------------------------------------------------------- scoring by internal id

    def scores_for_sequence(self, known: np.ndarray) -> np.ndarray:
        """Scores over all internal item ids for one history of internal ids (oldest first)."""
        length = self.max_seq_length
        recent = known[-length:]
        seq = np.zeros((1, length), dtype=np.int64)
        seq[0, : len(recent)] = recent
        self._one_len[0] = max(len(recent), 1)
        return self.session.run(self._output, {ITEM_SEQ_INPUT: seq, ITEM_SEQ_LEN_INPUT: self._one_len})[0][0]

    def scores_for_sequences(self, histories: list[np.ndarray]) -> np.ndarray:
        """[B, n_items + 1] scores for B histories of internal ids in one model call."""
        length = self.max_seq_length
        seq = np.zeros((len(histories), length), dtype=np.int64)
        lens = np.ones(len(histories), dtype=np.int64)
        for row, known in enumerate(histories):
            recent = known[-length:]
            seq[row, : len(recent)] = recent
            lens[row] = max(len(recent), 1)
        return self.session.run(self._output, {ITEM_SEQ_INPUT: seq, ITEM_SEQ_LEN_INPUT: lens})[0]

    def scores_for_histories(self, histories: list[np.ndarray]) -> np.ndarray:
        """[B, n_items + 1] scores for B item histories (internal ids; order ignored, repeats count)."""
        width = max((len(h) for h in histories), default=0) or 1
        feed = np.zeros((len(histories), width), dtype=np.int64)  # 0: the padding id, scores nothing
        for row, known in enumerate(histories):
            feed[row, : len(known)] = known
        return self.session.run(self._output, {HISTORY_INPUT: feed})[0]

    def rate_pairs(self, user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """[B] predicted ratings (original scale) for B (internal user id, internal item id) pairs."""
        feed = {USER_INPUT: np.asarray(user_ids, dtype=np.int64), ITEM_INPUT: np.asarray(item_ids, dtype=np.int64)}
        return self.session.run(self._output, feed)[0]

    def scores_for_users(self, user_ids: list[int]) -> np.ndarray:
        return self.session.run(self._output, {USER_INPUT: np.asarray(user_ids, dtype=np.int64)})[0]

    def scores_for_user(self, user_id: int) -> np.ndarray:
        return self.session.run(self._output, {USER_INPUT: np.asarray([user_id], dtype=np.int64)})[0][0]

    def run_batch(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """Raw model call: ``feed`` as in the signature's inputs, [B, n_items + 1] scores out."""
        return self.session.run(self._output, feed)[0]

    def popular_items(self, k: int, exclude: np.ndarray | None) -> list[tuple[str, float]]:
        """(item, share of training rows) for the k most popular items not in ``exclude``."""
        skip = set(exclude.tolist()) if exclude is not None else set()
        items = self.items
        return [(items[i], share) for i, share in self.popular if i not in skip][:k]

    def top_items(self, scores: np.ndarray, k: int, exclude: np.ndarray | None, *,
                  inplace: bool = False) -> list[tuple[str, float]]:
        """(item, score) for the k best, padding and ``exclude`` masked out.

        ``inplace``: mask ``scores`` itself (the caller owns the row, e.g. a fresh batch
        output); saves the float64 copy ``mask_scores`` makes, on the server's hot path.
        """
        if inplace:
            masked = scores
            masked[PADDING] = -np.inf
            if exclude is not None and len(exclude):
                masked[exclude] = -np.inf
        else:
            masked = mask_scores(scores, exclude)
        best = top_k(masked, k)
        values = masked[best].tolist()
        items = self.items
        return [(items[i], v) for i, v in zip(best.tolist(), values) if math.isfinite(v)]

    # ----------------------------------------------------------------- raw ids (CLI)

    def _scores(self, history: list[str], user: str | None) -> tuple[np.ndarray, np.ndarray]:
        known = np.asarray([self.item_index[i] for i in history if self.item_index.get(i, PADDING) != PADDING],
                           dtype=np.int64)
        if self.sequential:
            return self.scores_for_sequence(known), known
        if self.takes_history:
            if not len(known):
                raise KeyError("this model scores the items in the history: give at least one item it knows")
            return self.scores_for_histories([known])[0], known
        if self.rates_pairs:
            raise ServingError(f"{self.model_dir.name} is a rating model: it rates (user, item) pairs "
                               "(POST /ratings on `recflow serve`), it does not recommend")
        if user is None or self.user_index.get(user, PADDING) == PADDING:
            raise KeyError(f"unknown user {user!r}: this model scores known users only")
        return self.scores_for_user(self.user_index[user]), known

    def recommend(
        self, history: list[str], k: int = 10, *, user: str | None = None, exclude_seen: bool = True
    ) -> list[Recommendation]:
        scores, known = self._scores(history, user)
        return [Recommendation(i, s) for i, s in self.top_items(scores, k, known if exclude_seen else None)]
