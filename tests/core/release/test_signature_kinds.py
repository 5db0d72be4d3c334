"""The signature kinds added for EASE/ItemKNN (history) and FM (pairs), and old kinds unchanged."""

from __future__ import annotations

import json

import pytest

from core.errors import RegistryError
from core.release import artifacts
from core.release.artifacts import make_signature, parse_signature


def test_history_signature_has_a_dynamic_history_axis() -> None:
    sig = make_signature(artifacts.HISTORY, max_seq_length=50, n_items=41)
    assert sig == {"kind": "history", "inputs": ["history"], "output": "scores", "max_seq_length": None,
                   "n_items": 41, "padding_item": 0, "mask_history": True}
    assert artifacts.dynamic_axes(artifacts.HISTORY) == {"history": {0: "batch", 1: "history_length"},
                                                         "scores": {0: "batch"}}
    parsed = parse_signature(json.dumps(sig))
    assert parsed.takes_history and not parsed.sequential and not parsed.rates_pairs
    assert parsed.inputs == ("history",) and parsed.max_seq_length == 0


def test_pairs_signature_carries_its_rating_scale() -> None:
    sig = make_signature(artifacts.PAIRS, max_seq_length=None, n_items=41, rating_scale=(1.0, 5.0))
    assert sig["inputs"] == ["user_id", "item_id"] and sig["output"] == "ratings"
    assert sig["rating_scale"] == [1.0, 5.0] and sig["mask_history"] is False
    assert artifacts.dynamic_axes(artifacts.PAIRS) == {"user_id": {0: "batch"}, "item_id": {0: "batch"},
                                                       "ratings": {0: "batch"}}
    parsed = parse_signature(json.dumps(sig))
    assert parsed.rates_pairs and parsed.output == "ratings"
    # an output name left out defaults to the kind's own
    assert parse_signature(b'{"kind": "pairs"}').output == "ratings"
    with pytest.raises(ValueError, match="rating scale"):
        make_signature(artifacts.PAIRS, max_seq_length=None, n_items=41)


def test_every_input_and_output_has_a_declared_shape() -> None:
    for kind, names in artifacts.INPUTS.items():
        assert all(artifacts.INPUT_SHAPES[n][0] == artifacts.BATCH_AXIS for n in names), kind
        assert artifacts.OUTPUT_SHAPES[artifacts.OUTPUTS[kind]][0] == artifacts.BATCH_AXIS


def test_old_kinds_parse_as_before() -> None:
    old = parse_signature(b'{"kind": "user", "max_seq_length": null}')
    assert old.output == "scores" and not old.takes_history and not old.rates_pairs
    seq = parse_signature(b'{"kind": "sequential", "max_seq_length": 10}')
    assert seq.sequential and seq.max_seq_length == 10 and not seq.takes_history
    with pytest.raises(RegistryError, match="not a valid signature"):
        parse_signature(b'{"kind": "matrix"}')
