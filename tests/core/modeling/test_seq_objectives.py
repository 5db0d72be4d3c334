"""All-position losses: each position scores what RecBole's own forward scores for that prefix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from recbole.data.interaction import Interaction
from recflow_testdata import tiny_config

from core.data.extract import extract
from core.modeling.dataset import build_dataset, load_recbole_data
from core.modeling.seq_objectives import (
    INPUTS,
    LENGTHS,
    TARGETS,
    AllPositionLoss,
    _every_position,
    gbce,
    mask_items,
    target_share,
)
from core.modeling.training import build_model

PARAMS = {"hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1, "embedding_size": 16}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory, tiny_csv: Path) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("obj")
    out = {}
    for name in ("SASRec", "GRU4Rec", "BERT4Rec"):
        config = tiny_config(tmp, tiny_csv, {"model.name": name, "model.params": PARAMS})
        run_dir = tmp / name
        run_dir.mkdir()
        splits = build_dataset(extract(config, run_dir), config, run_dir)
        out[name] = load_recbole_data(config, splits, run_dir / "checkpoints")
    return out


@pytest.mark.parametrize("name", ["SASRec", "GRU4Rec"])
def test_every_position_equals_recbole_forward_on_its_prefix(tiny_data: dict, name: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_data[name]).eval()
    seq = torch.tensor([[3, 7, 2, 9, 4, 0, 0, 0, 0, 0], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    lengths = torch.tensor([5, 10])
    with torch.no_grad():
        with _every_position(model):
            every = model(seq, lengths)
        assert every.shape[:2] == seq.shape
        for row in range(2):
            for n in range(1, int(lengths[row]) + 1):
                prefix = torch.zeros_like(seq[row : row + 1])
                prefix[0, :n] = seq[row, :n]  # how RecBole feeds a prefix: left-aligned, padded right
                last = model(prefix, torch.tensor([n]))
                assert torch.allclose(every[row, n - 1], last[0], atol=1e-5), (row, n)
    assert "gather_indexes" not in model.__dict__  # RecBole's own method is back


def _batch(seq: torch.Tensor, targets: torch.Tensor) -> Interaction:
    return Interaction({INPUTS: seq, TARGETS: targets, LENGTHS: (seq > 0).sum(1)})


def test_ce_is_cross_entropy_over_the_catalogue_without_padding(tiny_data: dict) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_data["SASRec"]).eval()
    seq = torch.tensor([[3, 7, 2, 9, 0, 0, 0, 0, 0, 0]])
    targets = torch.tensor([[0, 2, 9, 5, 0, 0, 0, 0, 0, 0]])  # position 0 not trained here
    loss = AllPositionLoss(model, "causal", "ce")(_batch(seq, targets))
    with torch.no_grad(), _every_position(model):
        hidden = model(seq, torch.tensor([4]))[0, 1:4]
    logits = hidden @ model.item_embedding.weight.T
    logits[:, 0] = -torch.inf
    assert loss.item() == pytest.approx(F.cross_entropy(logits, torch.tensor([2, 9, 5])).item(), rel=1e-5)


def test_gbce_with_t_zero_is_plain_bce() -> None:
    torch.manual_seed(0)
    pos, neg = torch.randn(6, 1), torch.randn(6, 4)
    hit = torch.zeros(6, 4, dtype=torch.bool)
    plain = (F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos), reduction="sum")
             + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg), reduction="sum")) / 30
    assert gbce(pos, neg, hit, n_items=100, t=0.0).item() == pytest.approx(plain.item(), rel=1e-6)
    # t > 0 weakens the positive term (beta < 1): the loss falls.
    assert gbce(pos, neg, hit, n_items=100, t=0.75).item() < plain.item()


@pytest.mark.parametrize("loss", ["sampled_softmax", "gbce"])
def test_sampled_losses_train(tiny_data: dict, loss: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_data["SASRec"])
    objective = AllPositionLoss(model, "causal", loss, negatives=8)
    seq = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]] * 4)
    batch = _batch(seq, seq + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    first = None
    for _ in range(30):
        optimizer.zero_grad()
        value = objective(batch)
        value.backward()
        optimizer.step()
        first = first if first is not None else value.item()
    assert torch.isfinite(value) and value.item() < 0.5 * first


def test_bert4rec_masks_at_least_one_item_per_window(tiny_data: dict) -> None:
    seq = torch.tensor([[3, 7, 2, 0, 0, 0, 0, 0, 0, 0], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    inputs, targets = mask_items(seq, 0.0, 41, torch.Generator().manual_seed(0))  # nothing masked at random
    assert targets.tolist()[0] == [0, 0, 2, 0, 0, 0, 0, 0, 0, 0]  # the newest item of each window
    assert inputs.tolist()[0] == [3, 7, 41, 0, 0, 0, 0, 0, 0, 0]
    assert targets.tolist()[1][-1] == 14 and int((targets > 0).sum()) == 2
    inputs, targets = mask_items(seq.repeat(200, 1), 0.2, 41, torch.Generator().manual_seed(0))
    share = float((inputs == 41).sum()) / float((seq.repeat(200, 1) > 0).sum())
    assert 0.17 < share < 0.25  # about mask_ratio, plus the forced ones
    assert torch.equal(targets > 0, inputs == 41) and not (inputs[seq.repeat(200, 1) == 0] != 0).any()
    torch.manual_seed(0)
    model = build_model(tiny_data["BERT4Rec"])
    loss = AllPositionLoss(model, "masked", "ce")(_batch(inputs[:8], targets[:8]))
    assert torch.isfinite(loss) and loss.item() > 0


def test_accumulation_weights_micro_batches_by_their_targets() -> None:
    whole = _batch(torch.ones(4, 5, dtype=torch.long), torch.tensor([[1, 1, 1, 1, 1]] * 3 + [[0, 0, 0, 0, 1]]))
    assert target_share(whole[0:2], whole) == 10 / 16 and target_share(whole[2:4], whole) == 6 / 16
    rows = Interaction({"item_id": torch.arange(4)})
    assert target_share(rows[0:2], rows) is None  # RecBole rows: weighted by rows
