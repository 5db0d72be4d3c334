"""All-position training objectives for RecBole's sequential models.

The models stay RecBole's own classes (so export, serving and evaluation are unchanged);
only the training loss differs from their ``calculate_loss``:

* causal models (SASRec, GRU4Rec): RecBole's ``forward`` runs once per window with every
  position's output kept, and each position with a target is scored against the catalogue;
* BERT4Rec: the masked-item objective over whole windows (``mask_ratio`` of the positions,
  at least one per window, replaced by the mask token and predicted; drawn by the loader with
  its own generator, so a resumed or accumulated run masks exactly as an uninterrupted one).

Losses (``training.loss``):

* ``ce``: cross-entropy over the full catalogue (the default; SASRec+);
* ``sampled_softmax``: cross-entropy over the target and ``training.negatives`` items drawn
  uniformly per window (shared by its positions; a negative equal to the target is masked);
* ``gbce``: gSASRec's generalised binary cross-entropy over the same negatives, with the
  calibration ``training.gbce_t``.

``model.params.loss_type`` (RecBole's CE/BPR) applies to ``training.objective: last_item`` only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F

LossKind = Literal["ce", "sampled_softmax", "gbce"]
# RecBole model name (lower case) -> how all-position training works for it.
ALL_POSITION_MODELS: dict[str, str] = {"sasrec": "causal", "gru4rec": "causal", "bert4rec": "masked"}
INPUTS, TARGETS, LENGTHS = "window_items", "window_targets", "window_length"


def all_position_kind(model_name: str) -> str | None:
    """``causal``/``masked`` when ``model_name`` can be trained on all positions, else None."""
    return ALL_POSITION_MODELS.get(model_name.lower())


@contextlib.contextmanager
def _every_position(model: torch.nn.Module) -> Iterator[None]:
    """Make RecBole's ``gather_indexes`` (which picks the last position) keep all of them."""
    model.gather_indexes = lambda output, _index: output  # type: ignore[method-assign]
    try:
        yield
    finally:
        del model.gather_indexes


def _catalogue(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output item embeddings ([n_items, H], row 0 = padding) and the output bias, if any."""
    n_items = int(model.n_items)  # type: ignore[arg-type]
    weight = model.item_embedding.weight[:n_items]  # BERT4Rec has one more row: its mask token
    return weight, getattr(model, "output_bias", None)


class AllPositionLoss:
    """``loss(interaction)`` for one batch of windows; the trainer's ``loss_func``."""

    def __init__(self, model: torch.nn.Module, kind: str, loss: LossKind = "ce", negatives: int = 256,
                 gbce_t: float = 0.75) -> None:
        self.model, self.kind, self.loss = model, kind, loss
        self.negatives, self.gbce_t = negatives, gbce_t
        self.n_items = int(model.n_items)  # type: ignore[arg-type]

    def __call__(self, interaction: Any) -> torch.Tensor:
        items, targets = interaction[INPUTS], interaction[TARGETS]
        if self.kind == "masked":  # the loader masked the inputs (mask_items)
            hidden = self.model(items)  # type: ignore[operator]
        else:
            with _every_position(self.model):
                hidden = self.model(items, interaction[LENGTHS])  # type: ignore[operator]
        return self.score(hidden, targets)

    def score(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The batch's mean loss for ``hidden`` [B, L, H] predicting ``targets`` [B, L] (0: no target)."""
        weight, bias = _catalogue(self.model)
        keep = targets > 0
        if self.loss == "ce":
            # Item 0 is padding, never an answer: score items 1.. only (20% cheaper than masking it).
            logits = hidden[keep] @ weight[1:].T
            if bias is not None:
                logits = logits + bias[1:]
            return F.cross_entropy(logits, targets[keep] - 1)
        # Negatives drawn per window (shared by its positions): one set for the whole batch pushes
        # the same k items down at every position of a step, and BCE then stops learning.
        negatives = torch.randint(1, self.n_items, (hidden.shape[0], self.negatives), device=hidden.device)
        neg = torch.bmm(hidden, weight[negatives].transpose(1, 2))  # [B, L, k]
        if bias is not None:
            neg = neg + bias[negatives].unsqueeze(1)
        rows = keep.nonzero()[:, 0]
        hidden, targets, neg = hidden[keep], targets[keep], neg[keep]
        pos = (hidden * weight[targets]).sum(-1, keepdim=True)
        if bias is not None:
            pos = pos + bias[targets].unsqueeze(-1)
        hit = negatives[rows] == targets.unsqueeze(1)
        if self.loss == "sampled_softmax":
            logits = torch.cat([pos, neg.masked_fill(hit, float("-inf"))], dim=1)
            return F.cross_entropy(logits, torch.zeros_like(targets))
        return gbce(pos, neg, hit, n_items=self.n_items, t=self.gbce_t)


def mask_items(items: torch.Tensor, ratio: float, mask_token: int, generator: torch.Generator,
               last_only: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT4Rec's masked-item inputs: (inputs with masked items replaced by ``mask_token``, targets).

    Each item is masked with probability ``ratio``; a share ``last_only`` of the windows has
    only its newest item masked. Targets are 0 where not masked.
    """
    present = items > 0
    masked = present & (torch.rand(items.shape, generator=generator) < ratio)
    last = present.sum(1) - 1
    # Some windows predict only their newest item, as evaluation asks BERT4Rec to (mask appended
    # after the history); a window with nothing masked would train nothing.
    only_last = torch.rand(items.shape[0], generator=generator) < last_only
    masked[only_last] = False
    none = ~masked.any(1) & present.any(1)
    masked[none, last[none]] = True
    return torch.where(masked, torch.full_like(items, mask_token), items), torch.where(masked, items, 0)


def target_share(part: Any, whole: Any) -> float | None:
    """The share of ``whole``'s trained positions that lie in ``part`` (None: not a window batch).

    Losses are means over positions, so gradient accumulation weights each micro-batch by this
    share, not by its share of windows (windows hold different numbers of targets).
    """
    if TARGETS not in whole.interaction:
        return None
    total = int((whole[TARGETS] > 0).sum())
    return int((part[TARGETS] > 0).sum()) / total if total else 0.0


def gbce(pos: torch.Tensor, neg: torch.Tensor, hit: torch.Tensor, *, n_items: int, t: float) -> torch.Tensor:
    """gSASRec's gBCE (Petrov & Macdonald, RecSys 2023): BCE whose positive probability is raised to ``beta``.

    ``beta = alpha * (t * (1 - 1/alpha) + 1/alpha)`` with ``alpha`` the sampling rate
    ``k / (n_items - 2)`` (real items other than the target); ``t = 0`` is plain BCE, ``t = 1``
    fully calibrated. ``-log(sigmoid(pos) ** beta) = -beta * logsigmoid(pos)``: computed so, in
    log space, it needs none of the reference code's clamps, which stop the positive gradient
    once a score falls below -23. Negatives that are the target (``hit``) are left out.
    """
    k = neg.shape[1]
    alpha = k / max(n_items - 2, 1)
    beta = alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)
    pos_loss = -beta * F.logsigmoid(pos).sum()
    neg_loss = (F.softplus(neg) * (~hit)).sum()  # -log(1 - sigmoid(neg))
    return (pos_loss + neg_loss) / (pos.shape[0] * (1 + k))
