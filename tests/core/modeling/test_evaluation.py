"""evaluate: RecBole full-ranking metrics, the Pop baseline, champion comparability and the gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from recflow_testdata import TinyRun

from core.modeling.dataset import load_recbole_data
from core.modeling.evaluation import METRICS_FILE, comparable, decide, evaluate, metrics_table
from core.modeling.training import load_trained
from core.records import Evaluation

METRIC_KEYS = {f"{m}@{k}" for m in ("recall", "mrr", "ndcg", "hit", "precision") for k in (5, 10, 20)}


# --------------------------------------------------------------------------- decide()


def test_promotes_when_beating_pop_without_champion() -> None:
    gate = decide(metric="NDCG@10", candidate={"ndcg@10": 0.3}, baseline={"ndcg@10": 0.1})
    assert gate.promote is True
    assert (gate.candidate, gate.baseline, gate.champion, gate.champion_version) == (0.3, 0.1, None, None)
    assert gate.metric == "NDCG@10"
    assert gate.reasons == ["beats Pop baseline on NDCG@10: 0.3000 > 0.1000", "no comparable champion"]


@pytest.mark.parametrize("candidate", [0.1, 0.05])
def test_rejects_when_not_beating_pop(candidate: float) -> None:
    gate = decide(metric="NDCG@10", candidate={"ndcg@10": candidate}, baseline={"ndcg@10": 0.1})
    assert gate.promote is False
    assert gate.reasons[0].startswith("does not beat Pop baseline")


def test_promotes_when_beating_pop_and_champion() -> None:
    gate = decide(metric="NDCG@10", candidate={"ndcg@10": 0.3}, baseline={"ndcg@10": 0.1},
                  champion={"ndcg@10": 0.25}, champion_version="v1")
    assert gate.promote is True
    assert (gate.champion, gate.champion_version) == (0.25, "v1")
    assert gate.reasons[1] == "beats champion v1 on NDCG@10: 0.3000 > 0.2500"


@pytest.mark.parametrize("champion", [0.3, 0.35])
def test_rejects_when_not_beating_champion(champion: float) -> None:
    gate = decide(metric="NDCG@10", candidate={"ndcg@10": 0.3}, baseline={"ndcg@10": 0.1},
                  champion={"ndcg@10": champion}, champion_version="v1")
    assert gate.promote is False  # a tie keeps the champion
    assert gate.champion == champion
    assert gate.reasons[0].startswith("beats Pop")
    assert gate.reasons[1].startswith("does not beat champion v1")


def test_min_improvement_applies_to_pop_and_champion() -> None:
    kwargs: dict[str, Any] = {"metric": "NDCG@10", "baseline": {"ndcg@10": 0.20}}
    assert decide(candidate={"ndcg@10": 0.25}, min_improvement=0.04, **kwargs).promote is True
    assert decide(candidate={"ndcg@10": 0.25}, min_improvement=0.05, **kwargs).promote is False
    champ = {"champion": {"ndcg@10": 0.24}, "champion_version": "v1"}
    assert decide(candidate={"ndcg@10": 0.30}, min_improvement=0.05, **kwargs, **champ).promote is True
    gate = decide(candidate={"ndcg@10": 0.28}, min_improvement=0.05, **kwargs, **champ)
    assert gate.promote is False
    assert "0.2400 + 0.05" in gate.reasons[1]


def test_non_comparable_champion_is_ignored() -> None:
    # evaluate() passes champion=None (not comparable) but still names the champion's version
    gate = decide(metric="NDCG@10", candidate={"ndcg@10": 0.3}, baseline={"ndcg@10": 0.1},
                  champion=None, champion_version="v7")
    assert gate.promote is True
    assert gate.champion is None and gate.champion_version == "v7"
    assert "v7 was evaluated on other data" in gate.reasons[1]


def test_other_metric_and_missing_metric() -> None:
    cand, base = {"hit@5": 0.5, "ndcg@10": 0.01}, {"hit@5": 0.4, "ndcg@10": 0.5}
    assert decide(metric="Hit@5", candidate=cand, baseline=base).promote is True
    with pytest.raises(KeyError, match="MRR@10"):
        decide(metric="MRR@10", candidate=cand, baseline=base)


# --------------------------------------------------------------------------- comparable()


def _card(fingerprint: str, protocol: str, ndcg: float = 0.9) -> dict[str, Any]:
    return {"version": "v-old", "data": {"fingerprint": fingerprint, "eval_protocol": protocol},
            "metrics": {"test": {"ndcg@10": ndcg}}}


def test_comparable(tiny_run: TinyRun) -> None:
    s = tiny_run.splits
    assert comparable(_card(s.fingerprint, s.eval_protocol), s) is True
    assert comparable(_card("other", s.eval_protocol), s) is False
    assert comparable(_card(s.fingerprint, "ratio:0.8,0.1,0.1|min_user=5|min_item=1"), s) is False
    assert comparable(None, s) is False
    assert comparable({}, s) is False
    assert comparable({"version": "v1"}, s) is False


# --------------------------------------------------------------------------- evaluate()


@pytest.fixture(scope="module")
def evaluation(tiny_run: TinyRun) -> Evaluation:
    return evaluate(tiny_run.config, tiny_run.splits, tiny_run.trained, tiny_run.run_dir, None)


def test_metrics_and_file(evaluation: Evaluation, tiny_run: TinyRun) -> None:
    assert set(evaluation.test) == METRIC_KEYS
    assert set(evaluation.valid) == METRIC_KEYS
    assert set(evaluation.baseline) == METRIC_KEYS
    for result in (evaluation.test, evaluation.valid, evaluation.baseline):
        assert all(0.0 <= v <= 1.0 for v in result.values())
        assert result["hit@5"] <= result["hit@10"] <= result["hit@20"]
        # leave-one-out: one target per user, so recall == hit and precision == hit / k
        assert result["recall@10"] == result["hit@10"]
        assert result["precision@10"] == pytest.approx(result["hit@10"] / 10, abs=1e-6)
    assert evaluation.metrics_path == tiny_run.run_dir / METRICS_FILE
    saved = json.loads(evaluation.metrics_path.read_text())
    assert saved["test"] == evaluation.test
    assert saved["baseline"] == evaluation.baseline
    assert saved["gate"]["promote"] == evaluation.gate.promote


def test_candidate_beats_pop_and_is_promoted_without_champion(evaluation: Evaluation) -> None:
    assert evaluation.test["ndcg@10"] > evaluation.baseline["ndcg@10"] + 0.05
    assert evaluation.gate.promote is True
    assert evaluation.gate.candidate == evaluation.test["ndcg@10"]
    assert evaluation.gate.baseline == evaluation.baseline["ndcg@10"]
    assert evaluation.champion is None and evaluation.gate.champion is None


def test_valid_metric_matches_training(evaluation: Evaluation, tiny_run: TinyRun) -> None:
    # The best checkpoint re-evaluated on valid gives the score training picked it by.
    assert evaluation.valid["ndcg@10"] == pytest.approx(tiny_run.trained.best_valid_score, abs=1e-6)


def _hit_at_10(data: Any, model: torch.nn.Module, loader: Any) -> float:
    """Hit@10 computed by hand from full_sort_predict, to check evaluate's wiring."""
    hits, users = 0, 0
    with torch.no_grad():
        for interaction, _, _, positive_i in loader:
            scores = model.full_sort_predict(interaction).view(len(interaction), -1)
            scores[:, 0] = -np.inf  # padding
            top = torch.topk(scores, 10, dim=1).indices
            hits += int((top == positive_i.view(-1, 1)).any(dim=1).sum())
            users += len(interaction)
    return hits / users


def test_metrics_match_a_hand_computed_hit_rate(evaluation: Evaluation, tiny_run: TinyRun) -> None:
    data = load_recbole_data(tiny_run.config, tiny_run.splits, tiny_run.trained.checkpoint.parent)
    model = load_trained(data, tiny_run.trained.checkpoint)
    assert _hit_at_10(data, model, data.test) == pytest.approx(evaluation.test["hit@10"], abs=1e-6)
    assert _hit_at_10(data, model, data.valid) == pytest.approx(evaluation.valid["hit@10"], abs=1e-6)


def test_comparable_better_champion_rejects(tiny_run: TinyRun, evaluation: Evaluation, tmp_path: Path) -> None:
    s = tiny_run.splits
    card = _card(s.fingerprint, s.eval_protocol, ndcg=0.99)
    result = evaluate(tiny_run.config, s, tiny_run.trained, tmp_path, card)
    assert result.test == evaluation.test  # deterministic re-evaluation
    assert result.champion == {"ndcg@10": 0.99}
    assert result.gate.promote is False
    assert (result.gate.champion, result.gate.champion_version) == (0.99, "v-old")


def test_comparable_worse_champion_promotes(tiny_run: TinyRun, tmp_path: Path) -> None:
    s = tiny_run.splits
    result = evaluate(tiny_run.config, s, tiny_run.trained, tmp_path, _card(s.fingerprint, s.eval_protocol, 0.01))
    assert result.gate.promote is True
    assert result.gate.champion == 0.01


def test_champion_on_other_data_is_ignored(tiny_run: TinyRun, tmp_path: Path) -> None:
    s = tiny_run.splits
    result = evaluate(tiny_run.config, s, tiny_run.trained, tmp_path, _card("another-dataset", s.eval_protocol, 0.99))
    assert result.champion is None
    assert result.gate.promote is True
    assert (result.gate.champion, result.gate.champion_version) == (None, "v-old")
    assert "evaluated on other data" in result.gate.reasons[1]


def test_champion_on_other_data_is_rescored_on_this_test_set(tiny_run: TinyRun, tmp_path: Path) -> None:
    """A nightly run on new data: the champion's ONNX model is scored on tonight's split."""
    from core.modeling.export import export_model

    record, _ = export_model(tiny_run.config, tiny_run.splits, tiny_run.trained, tmp_path / "exp")
    s = tiny_run.splits
    # Stored metrics (0.99) were measured on other data: they must not be what the gate uses.
    card = _card("another-dataset", s.eval_protocol, 0.99)
    result = evaluate(tiny_run.config, s, tiny_run.trained, tmp_path, card, record.card_path.parent)
    assert result.champion is not None and result.champion["ndcg@10"] != 0.99
    # The champion is the candidate itself here: same scores, so it does not beat itself.
    assert result.champion["ndcg@10"] == pytest.approx(result.test["ndcg@10"], abs=1e-4)
    assert result.gate.promote is False
    assert "re-scored on this run's test set" in result.gate.reasons[1]
    assert any("does not beat champion v-old" in r for r in result.gate.reasons)


def test_champion_under_another_protocol_is_not_rescored(tiny_run: TinyRun, tmp_path: Path) -> None:
    s = tiny_run.splits
    card = _card("another-dataset", "ratio:0.8,0.1,0.1|min_user=5|min_item=1", 0.99)
    result = evaluate(tiny_run.config, s, tiny_run.trained, tmp_path, card, tmp_path / "no-such-version")
    assert result.champion is None and result.gate.promote is True
    assert "another protocol" in result.gate.reasons[1]


def test_metrics_table_rows(tiny_run: TinyRun, tmp_path: Path) -> None:
    s = tiny_run.splits
    result = evaluate(tiny_run.config, s, tiny_run.trained, tmp_path, _card(s.fingerprint, s.eval_protocol, 0.5))
    rows = {r["metric"]: r for r in metrics_table(result)}
    assert set(rows) == METRIC_KEYS
    assert rows["ndcg@10"] == {"metric": "ndcg@10", "candidate": result.test["ndcg@10"],
                               "pop": result.baseline["ndcg@10"], "champion": 0.5}
    assert rows["hit@5"]["champion"] is None
