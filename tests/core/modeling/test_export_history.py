"""ONNX export of EASE and ItemKNN (history graphs) and FM (pairs graph): parity with RecBole's
own scores, the card's matrix section, scoring histories of learners never seen in training,
and re-scoring a history champion on tonight's split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import scipy.sparse as sp
import torch
from history_models import ExportedRun, train_and_export
from recbole.data.interaction import Interaction
from recflow_testdata import N_ITEMS

from core.modeling.champion_rescore import rescore_champion
from core.modeling.evaluation import _champion_metrics, ranking_metrics, rating_metrics
from core.modeling.training import load_trained
from core.release.artifacts import MODEL_FILE, SIGNATURE_FILE, USER_VOCAB_FILE
from core.serving.scorer import OnnxScorer, mask_scores, top_k


@pytest.fixture(scope="module")
def ease() -> ExportedRun:
    return train_and_export("EASE")


@pytest.fixture(scope="module")
def itemknn() -> ExportedRun:
    return train_and_export("ItemKNN")


@pytest.fixture(scope="module")
def fm() -> ExportedRun:
    return train_and_export("FM")


def _model(run: ExportedRun) -> torch.nn.Module:
    return load_trained(run.data, run.trained.checkpoint).cpu()


def _dense_matrix(run: ExportedRun) -> np.ndarray:
    """The item-item matrix RecBole multiplies the user's row by (read from the checkpoint)."""
    model = _model(run)
    if run.trained.model_name == "EASE":
        return np.asarray(model.item_similarity, dtype=np.float64)
    return sp.csc_matrix(model.w).toarray().astype(np.float64)


@pytest.mark.parametrize("name", ["EASE", "ItemKNN"])
def test_history_export_record_card_and_signature(name: str) -> None:
    run = train_and_export(name)
    record, section = run.record, run.section
    assert record.exported is True and record.reason is None
    assert record.max_abs_diff is not None and record.max_abs_diff <= 1e-4
    assert record.top10_agreement == 1.0 and record.users_checked == 64
    assert section["parity"] == {"users": 64, "max_abs_diff": record.max_abs_diff, "top10_identical": 1.0,
                                 "tolerance": 1e-4}
    signature = json.loads((run.export_dir / SIGNATURE_FILE).read_text())
    assert signature == {"kind": "history", "inputs": ["history"], "output": "scores", "max_seq_length": None,
                         "n_items": N_ITEMS + 1, "padding_item": 0, "mask_history": True}
    matrix = section["matrix"]
    assert matrix["shape"] == [N_ITEMS + 1, N_ITEMS + 1]
    if name == "EASE":
        assert matrix["form"] == "dense" and matrix["k"] is None
        assert matrix["bytes"] == (N_ITEMS + 1) ** 2 * 4
        assert matrix["nnz"] == N_ITEMS * (N_ITEMS - 1)  # a dense B with a zero diagonal, padding row excluded
    else:
        w = sp.csc_matrix(_model(run).w)
        w.eliminate_zeros()
        assert matrix["form"] == "topk" and matrix["k"] == 10  # RecBole's own k neighbours per item
        assert matrix["nnz"] == w.nnz <= N_ITEMS * 10
        assert matrix["bytes"] == (N_ITEMS + 1) * 10 * (8 + 4)  # ids + weights, not (n_items + 1)^2


@pytest.mark.parametrize("name", ["EASE", "ItemKNN"])
def test_graph_equals_recbole_full_sort_predict_for_every_test_user(name: str) -> None:
    """Independent of export's own check: histories rebuilt from the train split's rows (shuffled,
    padded to another length), every test user, RecBole's ``full_sort_predict`` as the truth."""
    run = train_and_export(name)
    model = _model(run)
    train = run.data.train.dataset.inter_feat
    by_user: dict[int, list[int]] = {}
    for u, i in zip(train["user_id"].tolist(), train["item_id"].tolist()):
        by_user.setdefault(u, []).append(i)
    session = ort.InferenceSession(str(run.export_dir / MODEL_FILE), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    checked = 0
    for interaction, history_index, _, _ in run.data.test:
        users = interaction["user_id"].cpu().numpy()
        feed = np.zeros((len(users), 40), dtype=np.int64)
        for row, u in enumerate(users):
            items = rng.permutation(by_user[int(u)])  # the graph ignores order
            feed[row, : len(items)] = items
        got = session.run(["scores"], {"history": feed})[0]
        with torch.no_grad():
            expected = model.full_sort_predict({"user_id": torch.from_numpy(users)}).view(len(users), -1).numpy()
        assert got.shape == expected.shape == (len(users), N_ITEMS + 1)
        assert np.max(np.abs(got - expected)) <= 1e-4
        masks: list[list[int]] = [[] for _ in users]
        for r, c in zip(*(t.tolist() for t in history_index)):
            masks[r].append(c)
        for e, g, m in zip(expected, got, masks):
            te, tg = top_k(mask_scores(e, m), 10), top_k(mask_scores(g, m), 10)
            assert np.array_equal(te, tg) or np.allclose(np.sort(e[te]), np.sort(e[tg]), atol=1e-6)
        checked += len(users)
    assert checked == 80


@pytest.mark.parametrize("name", ["EASE", "ItemKNN"])
def test_a_new_learners_history_is_scored_by_the_matrix(name: str) -> None:
    """No training row behind it: the scores are the history's item counts times the model's matrix."""
    run = train_and_export(name)
    scorer = OnnxScorer(run.export_dir)
    assert scorer.takes_history and not scorer.sequential and not scorer.rates_pairs
    history = ["i7", "i3", "i22", "i3", "not-an-item"]  # i3 twice: counts twice, as in RecBole's X
    ids = np.asarray([scorer.item_index[i] for i in history if i in scorer.item_index])
    counts = np.bincount(ids, minlength=N_ITEMS + 1).astype(np.float64)
    expected = counts @ _dense_matrix(run)
    got = scorer.scores_for_histories([ids, ids[:1]])
    assert np.max(np.abs(got[0] - expected)) <= 1e-5
    assert np.max(np.abs(got[1] - _dense_matrix(run)[ids[0]])) <= 1e-5  # rows of another length in one call
    recs = scorer.recommend(history, k=5)
    assert len(recs) == 5 and not {r.item for r in recs} & set(history)
    want = top_k(mask_scores(expected, ids), 5)
    assert [r.item for r in recs] == [scorer.items[i] for i in want] or np.allclose(
        sorted(r.score for r in recs), sorted(expected[want]), atol=1e-5)
    with pytest.raises(KeyError, match="at least one item"):
        scorer.recommend(["not-an-item"], k=5)


def test_user_based_knn_is_not_exported_and_says_why() -> None:
    run = train_and_export("ItemKNN", {"model.params": {"k": 10, "shrink": 0.0, "knn_method": "user"}})
    assert run.record.exported is False and run.section == {}
    assert run.record.reason is not None and "knn_method 'user'" in run.record.reason
    assert "best.pth" in run.record.reason
    assert not (run.export_dir / MODEL_FILE).exists()


def test_fm_exports_a_pairs_graph_equal_to_its_rating_predictions(fm: ExportedRun) -> None:
    record, section = fm.record, fm.section
    assert record.exported is True and record.top10_agreement is None
    assert record.max_abs_diff is not None and record.max_abs_diff <= 1e-4
    assert section["kind"] == "pairs" and section["inputs"] == ["user_id", "item_id"]
    assert section["output"] == "ratings" and section["rating_scale"] == [1.0, 5.0]
    assert section["parity"]["pairs"] == record.users_checked == 64
    model = _model(fm)
    scorer = OnnxScorer(fm.export_dir)
    assert scorer.rates_pairs
    checked = 0
    for batch in fm.data.test:  # every held-out pair, through RecBole's own Interaction
        interaction = batch[0] if isinstance(batch, tuple) else batch
        with torch.no_grad():
            expected = model.predict(Interaction({k: interaction[k] for k in ("user_id", "item_id")}))
        expected = expected.double().numpy() * 4.0 + 1.0  # labels were scaled from 1-5 to [0, 1]
        got = scorer.rate_pairs(interaction["user_id"].numpy(), interaction["item_id"].numpy())
        assert got.shape == expected.shape and np.max(np.abs(got - expected)) <= 1e-4
        checked += len(got)
    assert checked > 80


def test_history_champion_is_rescored_like_the_candidate(ease: ExportedRun, tmp_path: Path) -> None:
    """The EASE graph, re-scored as a champion on the same split, gets the model's own test metrics;
    it needs no user vocabulary (a history champion ranks users new tonight too)."""
    model = _model(ease)
    _, test = ranking_metrics(ease.data, model, tmp_path / "scratch-candidate.pth")
    champion = tmp_path / "champion"
    shutil.copytree(ease.export_dir, champion)
    (champion / USER_VOCAB_FILE).write_text(json.dumps(["[PAD]"]))  # knows no user at all
    rescored = rescore_champion(ease.data, champion, tmp_path / "scratch.pth")
    assert rescored.keys() == test.keys()
    for key, value in test.items():
        assert rescored[key] == pytest.approx(value, abs=1e-6), key


def _other_data_card(run: ExportedRun) -> dict[str, object]:
    """A champion's card (the parts the gate reads) for a version trained on another night's data."""
    return {"version": "v0", "data": {"fingerprint": "another-night", "eval_protocol": run.splits.eval_protocol}}


def test_rating_champion_is_rescored_like_the_candidate(fm: ExportedRun, tmp_path: Path) -> None:
    """FM's pairs graph, re-scored as a champion trained on other data, gets the model's own test RMSE/MAE."""
    _, test = rating_metrics(fm.data, _model(fm))
    metrics, reason = _champion_metrics(_other_data_card(fm), fm.export_dir, fm.splits, fm.data,
                                        tmp_path, rating=True)
    assert metrics is not None and metrics.keys() == test.keys() == {"rmse", "mae"}
    for key, value in test.items():
        assert metrics[key] == pytest.approx(value, abs=1e-4), key
    assert reason is not None and "re-scored on this run's test set" in reason
    pairs = sum(len(b[0] if isinstance(b, tuple) else b) for b in fm.data.test)
    assert f"({pairs} of {pairs} pairs rated" in reason


def test_pairs_a_rating_champion_cannot_rate_get_the_middle_of_its_scale(fm: ExportedRun, tmp_path: Path) -> None:
    champion = tmp_path / "champion"
    shutil.copytree(fm.export_dir, champion)
    users = json.loads((champion / USER_VOCAB_FILE).read_text())
    (champion / USER_VOCAB_FILE).write_text(json.dumps(users[:1] + [f"gone-{u}" for u in users[1:]]))
    metrics, reason = _champion_metrics(_other_data_card(fm), champion, fm.splits, fm.data, tmp_path, rating=True)
    true = np.concatenate([(b[0] if isinstance(b, tuple) else b)["rating"].double().numpy() for b in fm.data.test])
    errors = 3.0 - (true * 4.0 + 1.0)  # every pair at the middle of 1-5
    assert metrics == {"rmse": round(float(np.sqrt(np.mean(errors**2))), 6),
                       "mae": round(float(np.mean(np.abs(errors))), 6)}
    assert reason is not None and "(0 of" in reason


def test_a_ranking_champion_cannot_gate_a_rating_run(fm: ExportedRun, ease: ExportedRun, tmp_path: Path) -> None:
    metrics, reason = _champion_metrics(_other_data_card(fm), ease.export_dir, fm.splits, fm.data, tmp_path,
                                        rating=True)
    assert metrics is None and reason is not None and "ranks items" in reason
