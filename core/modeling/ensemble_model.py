"""An ensemble of seed models of one RecBole model, shaped like a RecBole model, and its checkpoint.

``EnsembleModel`` holds K members (the same RecBole model class and configuration, trained on
the same data with different seeds) and scores every item with the mean over members of the
log-softmax of their full-sort scores. Log-softmax puts every member on one scale (a seed's
logits may be shifted or stretched against another's) and the mean of log-probabilities is a
product of experts: an item ranks high only if every member likes it.

It exposes what recflow's evaluator, exporter and champion re-scoring use of a RecBole model
(``full_sort_predict``, ``predict``, ``ITEM_SEQ``/``ITEM_SEQ_LEN`` or ``USER_ID``, ``type``,
``n_items``, ``other_parameter``/``load_other_parameter``), so ``load_trained`` returns one for
an ensemble checkpoint and evaluation, ONNX export and the gate take it unchanged.

Column 0 of every score row is RecBole's padding item: RecBole's evaluator and recflow's scorer
both mask it, so the softmax runs over the real items only and the padding column gets
``PADDING_SCORE`` (finite, so torch-vs-ONNX parity compares it like any other column).

The checkpoint (``checkpoints/best.pth`` of the ensemble's run folder) holds the members' state
dicts and which members they were (run folder name, seed, best epoch); no RecBole ``Config``.
It lives here, in ``core.modeling``, because ``load_trained`` must read it and ``core.modeling``
never imports ``core.experiments``; building an ensemble from run folders is
``core.experiments.ensemble``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from core.errors import EnsembleError

# The checkpoint's "format" value: a plain RecBole checkpoint has no such key.
ENSEMBLE_FORMAT = "recflow-ensemble/1"
# Below any log-probability a real item can get (float32-exact, so ONNX parity sees 0 difference).
PADDING_SCORE = -1.0e9
# RecBole model attributes that callers read (export, evaluation); copied from the first member.
_RECBOLE_ATTRIBUTES = (
    "type", "input_type", "n_items", "n_users", "USER_ID", "ITEM_ID", "NEG_ITEM_ID", "POS_ITEM_ID",
    "ITEM_SEQ", "ITEM_SEQ_LEN", "max_seq_length", "device", "mask_token",
)

__all__ = ["ENSEMBLE_FORMAT", "PADDING_SCORE", "EnsembleModel", "ensemble_checkpoint", "is_ensemble_checkpoint",
           "load_ensemble"]


class EnsembleModel(torch.nn.Module):
    """K members of one RecBole model class over the same items; scores = mean member log-softmax."""

    def __init__(self, members: Sequence[torch.nn.Module]) -> None:
        """Wrap ``members`` (at least one, same class, same item count) as one RecBole-shaped model.

        Args:
            members: trained RecBole models of one class, built on the same data.

        Raises:
            EnsembleError: no members, or members of different classes or item counts.
        """
        super().__init__()
        if not members:
            raise EnsembleError("an ensemble needs at least one member model")
        classes = sorted({type(m).__name__ for m in members})
        if len(classes) > 1:
            raise EnsembleError(f"ensemble members must be one RecBole model; got {', '.join(classes)}")
        counts = sorted({int(getattr(m, "n_items", -1)) for m in members})
        if len(counts) > 1:
            raise EnsembleError(f"ensemble members were built on different data: item counts {counts}")
        self.members = torch.nn.ModuleList(members)
        first = members[0]
        for name in _RECBOLE_ATTRIBUTES:
            if hasattr(first, name):
                setattr(self, name, getattr(first, name))
        self.member_class = type(first).__name__

    # BERT4Rec members: export swaps ``reconstruct_test_data`` (a per-row Python loop) for a batched
    # one while tracing, on the model it is given; passed through so every member gets the swap.
    @property
    def reconstruct_test_data(self) -> Any:
        return self.members[0].reconstruct_test_data  # AttributeError for other models: hasattr is False

    @reconstruct_test_data.setter
    def reconstruct_test_data(self, fn: Any) -> None:
        for member in self.members:
            member.reconstruct_test_data = fn

    @reconstruct_test_data.deleter
    def reconstruct_test_data(self) -> None:
        for member in self.members:
            del member.reconstruct_test_data

    def member_log_softmax(self, interaction: Any) -> torch.Tensor:
        """Each member's log-softmax over the real items, [K, B, n_items] (column 0: ``PADDING_SCORE``).

        Args:
            interaction: a RecBole ``Interaction`` (or a dict of its fields) the members score.

        Returns:
            The stacked per-member log-probabilities.
        """
        rows = []
        for member in self.members:
            scores = member.full_sort_predict(interaction).view(-1, self.n_items)
            real = torch.log_softmax(scores[:, 1:].float(), dim=-1)
            rows.append(torch.cat((torch.full_like(real[:, :1], PADDING_SCORE), real), dim=1))
        return torch.stack(rows)

    def full_sort_predict(self, interaction: Any) -> torch.Tensor:
        """Scores of every item, [B, n_items]: the mean over members of their log-softmax.

        Args:
            interaction: a RecBole ``Interaction`` (or a dict of its fields) the members score.

        Returns:
            Ensemble scores; column 0 (padding) is ``PADDING_SCORE``.
        """
        return self.member_log_softmax(interaction).mean(dim=0)

    def forward(self, interaction: Any) -> torch.Tensor:
        return self.full_sort_predict(interaction)

    def predict(self, interaction: Any) -> torch.Tensor:
        """Scores of each row's item (``ITEM_ID``), gathered from the full sort so both agree.

        Args:
            interaction: rows with the members' inputs and the candidate item of each row.

        Returns:
            One score per row, [B].
        """
        items = interaction[self.ITEM_ID].long().view(-1, 1)
        return self.full_sort_predict(interaction).gather(1, items).view(-1)

    def calculate_loss(self, interaction: Any) -> torch.Tensor:
        raise EnsembleError("an ensemble is not trained: train its members (one per seed), then build the ensemble")

    def other_parameter(self) -> dict[str, Any]:
        # The members' own non-parameter state (if any) travels in the ensemble checkpoint per member.
        return {}

    def load_other_parameter(self, para: dict[str, Any] | None) -> None:
        if para:
            raise EnsembleError("an ensemble has no parameters outside its members' checkpoints")


def ensemble_checkpoint(members: Sequence[torch.nn.Module], model: str, info: list[dict[str, Any]]) -> dict[str, Any]:
    """What ``torch.save`` writes for an ensemble: the members' state and which members they were.

    Args:
        members: the member models, in ensemble order.
        model: the RecBole model class name every member is.
        info: per member, what identifies it (run folder name, seed, best epoch, valid score).

    Returns:
        The checkpoint dict (``is_ensemble_checkpoint`` recognises it).
    """
    return {
        "format": ENSEMBLE_FORMAT,
        "model": model,
        "members": list(info),
        "states": [{"state_dict": m.state_dict(), "other_parameter": m.other_parameter()} for m in members],
    }


def is_ensemble_checkpoint(state: dict[str, Any]) -> bool:
    """Whether a loaded checkpoint dict is an ensemble's (else a plain RecBole checkpoint)."""
    return state.get("format") == ENSEMBLE_FORMAT


def load_ensemble(state: dict[str, Any], build: Callable[[], torch.nn.Module], model: str) -> EnsembleModel:
    """The ``EnsembleModel`` of an ensemble checkpoint, members built by ``build`` (in eval mode).

    Args:
        state: a loaded ensemble checkpoint.
        build: builds one fresh member on the caller's data (``core.modeling.training.build_model``).
        model: the RecBole model the caller's data is for; must be the checkpoint's.

    Returns:
        The ensemble, ready to score.

    Raises:
        EnsembleError: the checkpoint is another model's, or a member does not fit the data.
    """
    if state.get("model") != model:
        raise EnsembleError(f"this ensemble checkpoint holds {state.get('model')} members; the data is built for {model}")
    members = []
    for info, member_state in zip(state["members"], state["states"], strict=True):
        member = build()
        try:
            member.load_state_dict(member_state["state_dict"])
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())[:300]
            raise EnsembleError(f"ensemble member {info.get('name')} does not fit this data: {detail}") from None
        member.load_other_parameter(member_state.get("other_parameter"))
        members.append(member)
    return EnsembleModel(members).eval()
