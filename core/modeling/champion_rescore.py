"""Re-score the champion on tonight's test set, so a nightly gate compares like with like.

A champion's stored metrics were measured on the data it was trained on. Every nightly run
has new data (a new fingerprint), so those metrics say nothing about tonight. Instead the
champion's exported ONNX model is evaluated on *tonight's* split with the candidate's own
RecBole loaders and evaluator (same users, same targets, same masking, same metric code):

- item ids are mapped by token (the champion's item vocabulary vs tonight's);
  items the champion never saw get a score it cannot beat, so a target item new tonight is a
  miss for the champion — as it would be in production;
- sequential champions get each test user's history (unknown items dropped, the last
  ``max_seq_length`` kept); user-based champions score known users, and rank nothing for
  users new tonight;
- history champions (EASE, ItemKNN) get each test user's training items tonight (the same
  row of tonight's ``X`` the candidate scores from; unknown items dropped), so users new
  tonight are ranked too.

A rating champion (FM's pairs graph) rates tonight's held-out (user, item) pairs
(``rating_champion``; the evaluation computes RMSE/MAE from it as for the candidate). A pair
whose user or item the champion never saw gets the middle of its rating scale: in production
it could not rate it either.

A champion without an ONNX graph (a model that does not export) cannot be re-scored here;
``rescore_champion`` raises ``ChampionNotComparableError`` and the gate falls back to the baseline.

The champion's files are read through the artifact contract's verifier
(``core.release.artifacts.VersionReader``): each is read once and those very bytes, checked
against the version's checksums, are what onnxruntime and json get. A file that does not match
(or cannot be read) makes the champion not comparable (the gate says why); a version registered before checksums
existed is re-scored unverified.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from core.errors import ChampionNotComparable, ChampionNotComparableError, RegistryError
from core.modeling.dataset import RecBoleData
from core.modeling.training import make_trainer
from core.release.artifacts import (
    HISTORY_INPUT,
    ITEM_INPUT,
    ITEM_SEQ_INPUT,
    ITEM_SEQ_LEN_INPUT,
    ITEM_VOCAB_FILE,
    MODEL_FILE,
    USER_INPUT,
    USER_VOCAB_FILE,
    Signature,
    VersionReader,
)

# Below any real score: unknown items and users the champion cannot rank.
UNRANKED = -1.0e9


__all__ = ["UNRANKED", "ChampionNotComparable", "ChampionNotComparableError", "rating_champion", "rescore_champion"]


def _to_champion_ids(champ_tokens: list[str], tonight_tokens: Any) -> np.ndarray:
    """tonight's internal id -> the champion's (0: padding, or a token the champion does not know)."""
    index = {tok: i for i, tok in enumerate(champ_tokens) if i > 0}
    return np.asarray([0] + [index.get(str(t), 0) for t in list(tonight_tokens)[1:]], dtype=np.int64)


def _champion_files(champion_dir: Path) -> tuple[bytes, Signature, list[str], list[str]]:
    """(graph bytes, signature, item vocabulary, user vocabulary) read through the contract's verifier.

    Raises ``ChampionNotComparableError`` for a champion without a graph or with a file that
    does not match its checksum, cannot be read, or is malformed.
    """
    if not (champion_dir / MODEL_FILE).is_file():
        raise ChampionNotComparableError(f"champion {champion_dir.name} has no {MODEL_FILE} to re-score")
    try:
        reader = VersionReader.open(champion_dir, allow_unverified=True)
        users = reader.json(USER_VOCAB_FILE) if reader.has(USER_VOCAB_FILE) else []
        return reader.read(MODEL_FILE), reader.signature(), reader.json(ITEM_VOCAB_FILE), users
    except RegistryError as exc:
        raise ChampionNotComparableError(str(exc)) from None


def _session(model_bytes: bytes) -> Any:
    """An onnxruntime CPU session using torch's thread count."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(torch.get_num_threads(), 1)
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


class _OnnxRatingChampion(torch.nn.Module):
    """A rating champion's pairs graph as a RecBole-shaped model: ``predict`` rates tonight's
    (user, item) pairs on tonight's [0, 1] label scale (what ``evaluation`` maps back)."""

    def __init__(self, champion_dir: Path, data: RecBoleData) -> None:
        super().__init__()
        model_bytes, signature, champ_items, champ_users = _champion_files(champion_dir)
        if not signature.rates_pairs:
            raise ChampionNotComparableError(f"champion {champion_dir.name} ranks items; a rating run cannot "
                                             "compare it")
        if data.rating_scale is None:
            raise ChampionNotComparableError("this run has no rating scale to compare ratings on")
        ds = data.dataset
        self.user_to_champ = _to_champion_ids(champ_users, ds.field2id_token[ds.uid_field])
        self.item_to_champ = _to_champion_ids(champ_items, ds.field2id_token[ds.iid_field])
        champ_lo, champ_hi = (float(v) for v in signature.raw.get("rating_scale") or data.rating_scale)
        self.unknown_rating = (champ_lo + champ_hi) / 2
        self.lo, self.span = float(data.rating_scale[0]), float(data.rating_scale[1] - data.rating_scale[0])
        self.user_field, self.item_field = ds.uid_field, ds.iid_field
        self.output = signature.output
        self.rated = self.pairs = 0  # pairs the champion could rate, of all it was asked
        self.session = _session(model_bytes)

    def predict(self, interaction: Any) -> torch.Tensor:
        users = self.user_to_champ[interaction[self.user_field].cpu().numpy()]
        items = self.item_to_champ[interaction[self.item_field].cpu().numpy()]
        known = (users > 0) & (items > 0)
        rating = np.full(len(users), self.unknown_rating, dtype=np.float64)
        if known.any():
            rating[known] = self.session.run([self.output], {USER_INPUT: users[known], ITEM_INPUT: items[known]})[0]
        self.rated += int(known.sum())
        self.pairs += len(users)
        return torch.from_numpy((rating - self.lo) / self.span)


def rating_champion(data: RecBoleData, champion_dir: Path) -> _OnnxRatingChampion:
    """The rating champion in ``champion_dir`` as a model whose ``predict`` rates ``data``'s pairs.

    Raises ``ChampionNotComparableError`` when it cannot (no graph, a ranking model, a bad file).
    """
    return _OnnxRatingChampion(Path(champion_dir), data).eval()


class _OnnxChampion(torch.nn.Module):
    """A RecBole-shaped model whose ``full_sort_predict`` runs the champion's ONNX graph
    and returns scores over tonight's item ids."""

    def __init__(self, champion_dir: Path, data: RecBoleData) -> None:
        super().__init__()
        model_bytes, signature, champ_items, champ_users = _champion_files(champion_dir)
        if signature.rates_pairs:
            raise ChampionNotComparableError(f"champion {champion_dir.name} is a rating model; a ranking run "
                                             "cannot compare it")
        self.signature: dict[str, Any] = dict(signature.raw)
        self.max_seq_length = signature.max_seq_length
        self.output = signature.output
        ds = data.dataset
        self.to_champ = _to_champion_ids(champ_items, ds.field2id_token[ds.iid_field])
        if not self.to_champ.any():
            raise ChampionNotComparableError("the champion knows none of tonight's items")
        self.sequential = signature.sequential
        self.takes_history = signature.takes_history
        self.user_to_champ: np.ndarray | None = None
        self.train_rows: sp.csr_matrix | None = None
        if self.takes_history:
            # Tonight's training matrix (user x item counts): what tonight's candidate scores from.
            self.train_rows = sp.csr_matrix(data.train.dataset.inter_matrix(form="csr"))
        elif not self.sequential:
            self.user_to_champ = _to_champion_ids(champ_users, ds.field2id_token[ds.uid_field])
        cfg = data.config
        self.item_seq_field = cfg["ITEM_ID_FIELD"] + cfg["LIST_SUFFIX"]
        self.item_len_field = cfg["ITEM_LIST_LENGTH_FIELD"]
        self.user_field = cfg["USER_ID_FIELD"]
        self.device = cfg["device"]
        self.session = _session(model_bytes)
        # RecBole's trainer builds an optimizer over the model's parameters: give it one.
        self._optimizer_placeholder = torch.nn.Parameter(torch.zeros(1))

    def _sequential_feed(self, interaction: Any) -> dict[str, np.ndarray]:
        seq = interaction[self.item_seq_field].cpu().numpy()
        lengths = interaction[self.item_len_field].cpu().numpy()
        max_len = self.max_seq_length
        out = np.zeros((seq.shape[0], max_len), dtype=np.int64)
        out_len = np.ones(seq.shape[0], dtype=np.int64)
        for row in range(seq.shape[0]):
            mapped = self.to_champ[seq[row, : lengths[row]]]
            recent = mapped[mapped > 0][-max_len:]
            out[row, : len(recent)] = recent
            out_len[row] = max(len(recent), 1)
        return {ITEM_SEQ_INPUT: out, ITEM_SEQ_LEN_INPUT: out_len}

    def _history_feed(self, interaction: Any) -> dict[str, np.ndarray]:
        """Each user's training items tonight in the champion's ids (repeats kept, unknown items dropped)."""
        assert self.train_rows is not None
        rows = self.train_rows[interaction[self.user_field].cpu().numpy()]
        histories = []
        for r in range(rows.shape[0]):
            lo, hi = rows.indptr[r], rows.indptr[r + 1]
            ids = np.repeat(self.to_champ[rows.indices[lo:hi]], np.rint(rows.data[lo:hi]).astype(np.int64))
            histories.append(ids[ids > 0])
        out = np.zeros((len(histories), max((len(h) for h in histories), default=0) or 1), dtype=np.int64)
        for r, ids in enumerate(histories):
            out[r, : len(ids)] = ids
        return {HISTORY_INPUT: out}

    def full_sort_predict(self, interaction: Any) -> torch.Tensor:
        if self.sequential or self.takes_history:
            feed = self._sequential_feed(interaction) if self.sequential else self._history_feed(interaction)
            champ_scores = self.session.run([self.output], feed)[0]
            known_rows = np.ones(champ_scores.shape[0], dtype=bool)
        else:
            assert self.user_to_champ is not None
            users = self.user_to_champ[interaction[self.user_field].cpu().numpy()]
            known_rows = users > 0
            champ_scores = self.session.run([self.output], {USER_INPUT: np.where(known_rows, users, 1)})[0]
        scores = champ_scores[:, self.to_champ].astype(np.float32)
        scores[:, self.to_champ == 0] = UNRANKED
        scores[~known_rows] = UNRANKED
        return torch.from_numpy(scores).to(self.device)


def rescore_champion(data: RecBoleData, champion_dir: Path, scratch: Path) -> dict[str, float]:
    """Test metrics of the champion in ``champion_dir`` on ``data``'s test split.

    ``scratch`` is a checkpoint path the trainer may write to (nothing is trained).
    """
    model = _OnnxChampion(Path(champion_dir), data).eval()
    trainer = make_trainer(data, model, scratch)
    try:
        result = trainer.evaluate(data.test, load_best_model=False)
    finally:
        trainer.tensorboard.close()
    return {str(k): round(float(v), 6) for k, v in (result or {}).items()}
