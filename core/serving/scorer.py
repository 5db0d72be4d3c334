"""Score a registry model version with onnxruntime and turn scores into recommendations."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import RegistryError


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


@dataclass
class Recommendation:
    item: str
    score: float


class OnnxScorer:
    """Loads ``model.onnx``, its signature and vocabularies from one model directory."""

    def __init__(self, model_dir: Path) -> None:
        import onnxruntime as ort

        self.model_dir = Path(model_dir)
        onnx_path = self.model_dir / "model.onnx"
        if not onnx_path.is_file():
            raise RegistryError(f"{self.model_dir} holds no model.onnx (was the model exportable?)")
        self.signature = json.loads((self.model_dir / "signature.json").read_text())
        self.items: list[str] = json.loads((self.model_dir / "item_ids.json").read_text(encoding="utf-8"))
        self.item_index = {tok: i for i, tok in enumerate(self.items)}
        users_file = self.model_dir / "user_ids.json"
        self.user_index = {tok: i for i, tok in enumerate(json.loads(users_file.read_text(encoding="utf-8")))} if users_file.exists() else {}
        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def _scores(self, history: list[str], user: str | None) -> tuple[np.ndarray, np.ndarray]:
        known = np.asarray([self.item_index[i] for i in history if i in self.item_index], dtype=np.int64)
        if self.signature["kind"] == "sequential":
            length = int(self.signature["max_seq_length"])
            recent = known[-length:]
            seq = np.zeros((1, length), dtype=np.int64)
            seq[0, : len(recent)] = recent
            feed = {"item_seq": seq, "item_seq_len": np.asarray([max(len(recent), 1)], dtype=np.int64)}
        else:
            if user is None or user not in self.user_index:
                raise KeyError(f"unknown user {user!r}: this model scores known users only")
            feed = {"user_id": np.asarray([self.user_index[user]], dtype=np.int64)}
        return self.session.run(["scores"], feed)[0][0], known

    def recommend(
        self, history: list[str], k: int = 10, *, user: str | None = None, exclude_seen: bool = True
    ) -> list[Recommendation]:
        scores, known = self._scores(history, user)
        masked = mask_scores(scores, known if exclude_seen else None)
        return [Recommendation(self.items[i], float(scores[i])) for i in top_k(masked, k) if np.isfinite(masked[i])]
