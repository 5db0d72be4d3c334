"""The torch modules export traces for models that are not scored from a user id or a sequence.

- history graphs (EASE, ItemKNN): RecBole scores a user as ``X[u] @ W``, the user's training
  row times an item-item matrix. The graph takes the request's item ids instead of ``X[u]``
  (input ``history`` [B, H], padded with 0) and holds only ``W``, so any history is scored,
  a learner unseen in training too; nothing of the training histories is in the graph.
  EASE's ``W`` (its ``item_similarity``, zero diagonal) is dense by nature and kept dense;
  ItemKNN's ``w`` keeps RecBole's own top-k neighbours per scored item, stored as
  [n_items, k] neighbour ids and weights (gather + sum), so it grows with n_items x k, not n_items².
- pairs graphs (FM over user and item ids): ``user_id`` [B], ``item_id`` [B] -> the rating
  [B] on the original scale (RecBole's prediction in [0, 1] mapped back with the training
  data's (min, max), as ``core.modeling.evaluation`` reports RMSE).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

__all__ = ["PairScorer", "history_graph", "history_reason", "pairs_reason", "training_histories"]


def _counts(history: torch.Tensor, n_items: int) -> torch.Tensor:
    """[B, H] item ids -> [B, n_items] counts: RecBole's ``X`` counts a repeated interaction
    (its sparse matrix sums duplicates), so a repeated item in a history counts twice too."""
    x = torch.zeros(history.shape[0], n_items, dtype=torch.float32)
    return x.scatter_add(1, history, torch.ones_like(history, dtype=torch.float32))


class _DenseHistoryScorer(torch.nn.Module):
    """scores = counts(history) @ W; row 0 of W (the padding id) is zero."""

    def __init__(self, weight: np.ndarray) -> None:
        super().__init__()
        w = np.array(weight, dtype=np.float32, copy=True)
        w[0, :] = 0.0
        self.register_buffer("weight", torch.from_numpy(w))

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        return _counts(history, self.weight.shape[0]) @ self.weight


class _TopKHistoryScorer(torch.nn.Module):
    """scores[:, j] = sum_k x[:, neighbours[j, k]] * weights[j, k], i.e. ``x @ w`` with ``w`` pruned
    to RecBole's k neighbours of each scored item j (padded with id 0, weight 0)."""

    def __init__(self, neighbours: np.ndarray, weights: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("neighbours", torch.from_numpy(neighbours.astype(np.int64)))
        self.register_buffer("weights", torch.from_numpy(weights.astype(np.float32)))

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        x = _counts(history, self.neighbours.shape[0])
        return (x[:, self.neighbours] * self.weights).sum(-1)


def history_reason(model: torch.nn.Module, model_name: str) -> str | None:
    """Why this traditional model has no history graph, or None when it has one (EASE, item-based ItemKNN)."""
    name = type(model).__name__
    if name == "EASE" and hasattr(model, "item_similarity"):
        return None
    if name == "ItemKNN" and hasattr(model, "w"):
        if getattr(model, "method", "item") == "item":
            return None
        return (f"{model_name} is ItemKNN with knn_method {model.method!r}: a user-user model scores known users "
                "from their training rows, there is no item-item matrix to score a request's history with")
    return (f"{model_name} is a RecBole traditional model recflow has no ONNX graph for (EASE and item-based "
            "ItemKNN have one): it scores through scipy/numpy matrices outside torch")


def history_graph(model: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The graph module for an EASE or item-based ItemKNN model, and the card's ``matrix`` section.

    Returns:
        (module, section): section says the form (dense / topk), shape, non-zeros, k and bytes.
    """
    if type(model).__name__ == "EASE":
        weight = np.asarray(model.item_similarity, dtype=np.float32)
        module: torch.nn.Module = _DenseHistoryScorer(weight)
        nnz = int(np.count_nonzero(weight[1:]))
        return module, {"form": "dense", "shape": list(weight.shape), "nnz": nnz, "k": None,
                        "bytes": int(weight.nbytes)}
    w = sp.csc_matrix(model.w, dtype=np.float32)  # column j: the neighbours of scored item j
    w.eliminate_zeros()
    n = w.shape[1]
    per_item = np.diff(w.indptr)
    k = max(int(per_item.max()) if n else 0, 1)
    neighbours = np.zeros((n, k), dtype=np.int64)
    weights = np.zeros((n, k), dtype=np.float32)
    for j in range(n):
        lo, hi = w.indptr[j], w.indptr[j + 1]
        neighbours[j, : hi - lo] = w.indices[lo:hi]
        weights[j, : hi - lo] = w.data[lo:hi]
    weights[neighbours == 0] = 0.0  # the padding id is never a neighbour
    module = _TopKHistoryScorer(neighbours, weights)
    return module, {"form": "topk", "shape": [n, n], "nnz": int(w.nnz), "k": k,
                    "bytes": int(neighbours.nbytes + weights.nbytes)}


def training_histories(model: torch.nn.Module, users: np.ndarray) -> np.ndarray:
    """[N, H] item ids (0-padded) of each user's row of the model's own training matrix ``X``:
    the history that makes the graph's scores RecBole's ``full_sort_predict`` for that user."""
    rows = sp.csr_matrix(model.interaction_matrix)[np.asarray(users, dtype=np.int64)]
    per_row = [np.repeat(rows.indices[rows.indptr[r]: rows.indptr[r + 1]],
                         np.rint(rows.data[rows.indptr[r]: rows.indptr[r + 1]]).astype(np.int64))
               for r in range(len(users))]  # a count of 2 (the item twice in training) -> the id twice
    out = np.zeros((len(users), max((len(h) for h in per_row), default=0) or 1), dtype=np.int64)
    for r, ids in enumerate(per_row):
        out[r, : len(ids)] = ids
    return out


def pairs_reason(model: torch.nn.Module, model_name: str, user_field: str, item_field: str) -> str | None:
    """Why this rating model has no pairs graph, or None when its only features are the user and item ids."""
    tokens = list(getattr(model, "token_field_names", None) or [])
    others = [f for attr in ("float_field_names", "token_seq_field_names", "float_seq_field_names")
              for f in (getattr(model, attr, None) or [])]
    if sorted(tokens) == sorted([user_field, item_field]) and not others and not getattr(model, "double_tower", False):
        return None
    fields = ", ".join(tokens + others) or "none"
    return (f"{model_name} is a rating model over the fields [{fields}]; recflow exports rating models whose "
            f"only features are {user_field} and {item_field}, so there is no ONNX scorer to serve")


class PairScorer(torch.nn.Module):
    """(user_id, item_id) -> the model's predicted rating, mapped back to the (lo, hi) scale."""

    def __init__(self, model: torch.nn.Module, rating_scale: tuple[float, float], user_field: str,
                 item_field: str) -> None:
        super().__init__()
        self.model = model
        self.user_field, self.item_field = user_field, item_field
        self.lo = float(rating_scale[0])
        self.span = float(rating_scale[1]) - float(rating_scale[0])

    def forward(self, user_id: torch.Tensor, item_id: torch.Tensor) -> torch.Tensor:
        predicted = self.model.predict({self.user_field: user_id, self.item_field: item_id})
        return predicted.view(-1) * self.span + self.lo
