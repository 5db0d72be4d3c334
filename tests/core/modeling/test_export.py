"""export + serving: ONNX graph, torch-vs-ONNX parity, the scorer and its masking."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from recflow_testdata import N_ITEMS, TinyRun, tiny_config

from core.data.extract import extract
from core.errors import RegistryError
from core.modeling.dataset import build_dataset, load_recbole_data
from core.modeling.export import ITEM_VOCAB_FILE, MODEL_FILE, SIGNATURE_FILE, USER_VOCAB_FILE, export_model
from core.modeling.training import load_trained, train
from core.records import ExportedModel
from core.serving.scorer import OnnxScorer, mask_scores, top_k

PAD = "[PAD]"


@pytest.fixture(scope="module")
def exported(tiny_run: TinyRun) -> tuple[ExportedModel, dict[str, Any]]:
    return export_model(tiny_run.config, tiny_run.splits, tiny_run.trained, tiny_run.run_dir)


@pytest.fixture(scope="module")
def scorer(exported: tuple[ExportedModel, dict[str, Any]]) -> OnnxScorer:
    return OnnxScorer(exported[0].card_path.parent)


@pytest.fixture(scope="module")
def torch_model(tiny_run: TinyRun) -> torch.nn.Module:
    data = load_recbole_data(tiny_run.config, tiny_run.splits, tiny_run.trained.checkpoint.parent)
    return load_trained(data, tiny_run.trained.checkpoint).cpu()


# --------------------------------------------------------------------------- export_model


def test_export_record_and_parity(exported: tuple[ExportedModel, dict[str, Any]], tiny_run: TinyRun) -> None:
    record, section = exported
    out = tiny_run.run_dir / "export"
    assert record.exported is True and record.reason is None
    assert record.onnx_path == out / MODEL_FILE and record.onnx_path.is_file()
    assert record.card_path == out / "model_card.json"
    assert record.max_abs_diff is not None and record.max_abs_diff <= 1e-4
    assert record.top10_agreement == 1.0
    assert record.users_checked == 64  # parity_users, of 80 test users
    assert record.size_bytes == record.onnx_path.stat().st_size
    assert record.latency_ms_p50 is not None and record.latency_ms_p50 > 0
    assert section["parity"] == {"users": 64, "max_abs_diff": record.max_abs_diff, "top10_identical": 1.0,
                                 "tolerance": 1e-4}
    assert section["opset"] == 17


def test_signature_and_vocabularies(exported: tuple[ExportedModel, dict[str, Any]], tiny_run: TinyRun) -> None:
    out = tiny_run.run_dir / "export"
    signature = json.loads((out / SIGNATURE_FILE).read_text())
    assert signature == {
        "kind": "sequential",
        "inputs": ["item_seq", "item_seq_len"],
        "output": "scores",
        "max_seq_length": 10,
        "n_items": N_ITEMS + 1,
        "padding_item": 0,
        "mask_history": False,
    }
    items = json.loads((out / ITEM_VOCAB_FILE).read_text())
    users = json.loads((out / USER_VOCAB_FILE).read_text())
    assert items[0] == PAD and users[0] == PAD
    assert sorted(items[1:]) == sorted(f"i{i}" for i in range(N_ITEMS))
    assert len(users) == 81
    assert exported[1]["n_items"] == N_ITEMS + 1


def test_graph_matches_the_contracts_schema(exported: tuple[ExportedModel, dict[str, Any]], tiny_run: TinyRun) -> None:
    """The exported graph's inputs and output have the names, dtypes and axes core.release.artifacts declares."""
    from core.release import artifacts

    session = ort.InferenceSession(str(tiny_run.run_dir / "export" / MODEL_FILE), providers=["CPUExecutionProvider"])
    dtype = {"int64": "tensor(int64)", "float32": "tensor(float)"}
    inputs = session.get_inputs()
    assert [i.name for i in inputs] == list(artifacts.INPUTS[artifacts.SEQUENTIAL])
    for i in inputs:
        assert i.type == dtype[artifacts.INPUT_DTYPE]
        assert len(i.shape) == len(artifacts.INPUT_SHAPES[i.name]) and i.shape[0] == artifacts.BATCH_AXIS
    (out,) = session.get_outputs()
    assert out.name == artifacts.SCORES_OUTPUT and out.type == dtype[artifacts.OUTPUT_DTYPE]
    assert out.shape[0] == artifacts.BATCH_AXIS and len(out.shape) == len(artifacts.OUTPUT_SHAPE)


def test_onnx_matches_torch_on_real_test_users(exported: tuple[ExportedModel, dict[str, Any]],
                                               tiny_run: TinyRun, torch_model: torch.nn.Module) -> None:
    """Independent parity check: our own onnxruntime session vs the checkpoint in torch."""
    data = load_recbole_data(tiny_run.config, tiny_run.splits, tiny_run.trained.checkpoint.parent)
    session = ort.InferenceSession(str(exported[0].onnx_path), providers=["CPUExecutionProvider"])
    checked = 0
    for interaction, _, _, _ in data.test:
        seq = interaction[torch_model.ITEM_SEQ].cpu()
        length = interaction[torch_model.ITEM_SEQ_LEN].cpu()
        with torch.no_grad():
            expected = torch_model.full_sort_predict({torch_model.ITEM_SEQ: seq, torch_model.ITEM_SEQ_LEN: length})
        expected = expected.view(len(seq), -1).numpy()
        got = session.run(["scores"], {"item_seq": seq.numpy().astype(np.int64),
                                       "item_seq_len": length.numpy().astype(np.int64)})[0]
        assert got.shape == expected.shape == (len(seq), N_ITEMS + 1)
        assert np.max(np.abs(got - expected)) <= 1e-4
        for e, g in zip(expected, got):
            assert np.array_equal(top_k(mask_scores(e), 10), top_k(mask_scores(g), 10))
        checked += len(seq)
    assert checked == 80  # every test user, batch sizes other than the export example's


def test_export_disabled(tiny_run: TinyRun, tmp_path: Path) -> None:
    config = tiny_run.config.model_copy(update={"export": tiny_run.config.export.model_copy(update={"enabled": False})})
    record, section = export_model(config, tiny_run.splits, tiny_run.trained, tmp_path)
    assert (record.exported, record.reason, section) == (False, "export disabled in config", {})
    assert not (tmp_path / "export" / MODEL_FILE).exists()
    assert (tmp_path / "export" / ITEM_VOCAB_FILE).is_file()  # vocabularies still written


# --------------------------------------------------------------------------- OnnxScorer


def test_scorer_recommends_known_unseen_items(scorer: OnnxScorer) -> None:
    history = ["i3", "i4", "i5"]
    recs = scorer.recommend(history, k=10)
    assert len(recs) == 10
    items = [r.item for r in recs]
    assert len(set(items)) == 10
    assert set(items) <= {f"i{i}" for i in range(N_ITEMS)}  # known items, never padding
    assert not set(items) & set(history)  # seen items masked by default
    scores = [r.score for r in recs]
    assert scores == sorted(scores, reverse=True)


def test_scorer_scores_equal_the_torch_model(scorer: OnnxScorer, torch_model: torch.nn.Module) -> None:
    history = ["i10", "i11", "i12", "i13"]
    ids = [scorer.item_index[i] for i in history]
    seq = torch.zeros((1, 10), dtype=torch.int64)
    seq[0, : len(ids)] = torch.tensor(ids)
    with torch.no_grad():
        expected = torch_model.full_sort_predict(
            {torch_model.ITEM_SEQ: seq, torch_model.ITEM_SEQ_LEN: torch.tensor([len(ids)])}
        ).view(-1).numpy()
    recs = scorer.recommend(history, k=5, exclude_seen=False)
    want = top_k(mask_scores(expected), 5)
    assert [r.item for r in recs] == [scorer.items[i] for i in want]
    assert [r.score for r in recs] == pytest.approx(expected[want].tolist(), abs=1e-4)


def test_scorer_learned_the_walk(scorer: OnnxScorer) -> None:
    # Every user walks i -> i+1; after 2 epochs the next item should rank in the top 10.
    hits = sum(
        f"i{(s + 5) % N_ITEMS}" in [r.item for r in scorer.recommend([f"i{(s + j) % N_ITEMS}" for j in range(5)])]
        for s in range(N_ITEMS)
    )
    assert hits >= N_ITEMS // 2


def test_scorer_history_handling(scorer: OnnxScorer) -> None:
    long = [f"i{i}" for i in range(25)]
    # Only the last max_seq_length items feed the model; the rest are still excluded.
    tail_only = scorer.recommend(long[-10:], k=N_ITEMS, exclude_seen=False)
    full = scorer.recommend(long, k=N_ITEMS, exclude_seen=False)
    assert [r.item for r in full] == [r.item for r in tail_only]
    # Unknown items are ignored.
    assert scorer.recommend(["nope", "i3", "zzz"], k=10) == scorer.recommend(["i3"], k=10)
    # k beyond the catalogue: every item except padding and the seen ones, once.
    everything = scorer.recommend(["i1", "i2", "i2"], k=1000)
    assert len(everything) == N_ITEMS - 2
    assert PAD not in {r.item for r in everything}
    unmasked = scorer.recommend(["i1", "i2"], k=1000, exclude_seen=False)
    assert len(unmasked) == N_ITEMS
    # An empty history still answers (cold start from the padding position).
    assert len(scorer.recommend([], k=3)) == 3


def test_scorer_needs_a_model(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="no model.onnx"):
        OnnxScorer(tmp_path)


def test_general_model_export_and_scorer(tiny_csv: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, tiny_csv, {"model.name": "BPR", "model.params": {"embedding_size": 8},
                                              "training.epochs": 1})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    splits = build_dataset(extract(config, run_dir), config, run_dir)
    trained = train(config, splits, run_dir)
    record, section = export_model(config, splits, trained, run_dir)
    assert record.exported is True
    assert record.max_abs_diff is not None and record.max_abs_diff <= 1e-4
    assert record.top10_agreement == 1.0
    assert (section["kind"], section["inputs"], section["mask_history"]) == ("user", ["user_id"], True)
    s = OnnxScorer(run_dir / "export")
    recs = s.recommend(["i1"], k=5, user="u3")
    assert len(recs) == 5 and "i1" not in {r.item for r in recs}
    with pytest.raises(KeyError, match="unknown user"):
        s.recommend([], user="nobody")


# --------------------------------------------------------------------------- helpers


def test_mask_scores() -> None:
    scores = np.array([[5.0, 1.0, 2.0, 3.0]], dtype=np.float32)
    masked = mask_scores(scores, [3])
    assert masked.tolist() == [[-np.inf, 1.0, 2.0, -np.inf]]
    assert scores.tolist() == [[5.0, 1.0, 2.0, 3.0]]  # input untouched
    assert mask_scores(np.array([1.0, 2.0]), []).tolist() == [-np.inf, 2.0]
    assert mask_scores(np.array([1.0, 2.0]), None).tolist() == [-np.inf, 2.0]


def test_top_k() -> None:
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.7])
    assert top_k(scores, 3).tolist() == [1, 3, 4]  # ties: lower index first
    assert top_k(scores, 1).tolist() == [1]
    assert top_k(scores, 99).tolist() == [1, 3, 4, 2, 0]
    assert top_k(mask_scores(scores, [1]), 2).tolist() == [3, 4]
