"""The rating task: config validation, RMSE/MAE on the original scale, the train-mean baseline, the gate.

A tiny rating data set (the tiny interactions plus a 1-5 rating from a user bias + an item bias)
trains a small FM once for the module (a few seconds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from recflow_testdata import Interaction, tiny_config, write_rating_csv

from core.config import PipelineConfig, load_config
from core.errors import ConfigError, DataValidationError
from core.modeling.dataset import RecBoleData, check_rating_setup, eval_protocol, load_recbole_data
from core.modeling.evaluation import (
    _errors_to_metrics,
    _rating_predictions,
    decide,
    evaluate,
    mean_rating_baseline,
    metrics_table,
)
from core.modeling.training import load_trained, make_trainer
from core.records import Evaluation, TrainedModel

RATING_OVERRIDES = {
    "model.name": "FM",
    "model.params": {"embedding_size": 8},
    "columns.rating": "rating",
    "evaluation.task": "rating",
    "dataset.split": "ratio",
    "training.epochs": 3,
    "training.learning_rate": 0.01,
}


@dataclass
class RatingRun:
    config: PipelineConfig
    csv: Path
    run_dir: Path
    trained: TrainedModel
    evaluation: Evaluation


@pytest.fixture(scope="module")
def rating_run(tmp_path_factory: pytest.TempPathFactory, tiny_rows: list[Interaction]) -> RatingRun:
    from core.data.extract import extract
    from core.modeling.dataset import build_dataset
    from core.modeling.training import train

    root = tmp_path_factory.mktemp("rating")
    csv = write_rating_csv(tiny_rows, root / "ratings.csv")
    config = tiny_config(root, csv, RATING_OVERRIDES)
    run_dir = root / "run"
    run_dir.mkdir()
    snapshot = extract(config, run_dir)
    splits = build_dataset(snapshot, config, run_dir)
    trained = train(config, splits, run_dir)
    evaluation = evaluate(config, splits, trained, run_dir, None)
    return RatingRun(config, csv, run_dir, trained, evaluation)


def _data(run: RatingRun) -> RecBoleData:
    from core.records import DatasetSplits

    splits = DatasetSplits(data_dir=run.run_dir / "recbole", dataset_name="interactions", users=0, items=0,
                           interactions=0, split="ratio", fingerprint="", eval_protocol="")
    return load_recbole_data(run.config, splits, run.run_dir / "checkpoints")


# ----------------------------------------------------------------------------- config


def test_ranking_stays_the_default() -> None:
    e = load_config().evaluation
    assert e.task == "ranking"
    assert (e.metrics, e.topk, e.valid_metric, e.gate_metric) == (
        ["Recall", "MRR", "NDCG", "Hit", "Precision"], [5, 10, 20], "NDCG@10", "NDCG@10")


def test_rating_task_fills_its_metrics_and_is_detected_from_them() -> None:
    e = load_config(overrides={"evaluation.task": "rating"}).evaluation
    assert (e.metrics, e.valid_metric, e.gate_metric) == (["RMSE", "MAE"], "RMSE", "RMSE")
    detected = load_config(overrides={"evaluation.metrics": ["RMSE", "MAE"], "evaluation.valid_metric": "MAE",
                                      "evaluation.gate_metric": "RMSE"}).evaluation
    assert detected.task == "rating" and detected.valid_metric == "MAE"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"evaluation.task": "rating", "evaluation.metrics": ["RMSE", "NDCG"]},
         "evaluation.task 'rating' computes ['RMSE', 'MAE'] only; remove the ranking metric(s) ['NDCG']"),
        ({"evaluation.task": "rating", "evaluation.gate_metric": "NDCG@10"},
         "evaluation.gate_metric 'NDCG@10' must be one of the computed rating metrics (RMSE, MAE)"),
        ({"evaluation.metrics": ["NDCG", "RMSE"]},
         "evaluation.metrics ['RMSE'] are rating metrics: set evaluation.task: rating"),
        ({"evaluation.task": "ranking", "evaluation.metrics": ["RMSE"], "evaluation.gate_metric": "RMSE"},
         "evaluation.metrics ['RMSE'] are rating metrics"),
        ({"evaluation.metrics": ["RMSE", "AUC"]}, "unknown metric(s) ['AUC']"),
        ({"evaluation.task": "rating", "source.kind": "synthetic"},
         "evaluation.task 'rating' needs a rating column; the synthetic source has none"),
        ({"evaluation.task": "rating", "source.kind": "file", "source.path": "x.csv"},
         "evaluation.task 'rating' needs a rating column: name it with columns.rating (--rating-col)"),
    ],
)
def test_rating_config_mistakes_name_what_is_wrong(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert message in str(info.value)


def test_rating_preset_needs_a_rating_model_and_rating_data(tmp_path: Path) -> None:
    config = load_config("configs/ml-100k-fm.yaml", {"runs_dir": str(tmp_path)})
    check_rating_setup(config)  # FM predicts a label: fine
    ranking_model = config.model_copy(deep=True)
    ranking_model.model.name = "SASRec"
    with pytest.raises(ConfigError, match="needs a model that predicts a rating per \\(user, item\\) pair.*SASRec is a sequential model trained to rank items"):
        check_rating_setup(ranking_model)
    with pytest.raises(DataValidationError, match="needs a rating column, and this data has none"):
        check_rating_setup(config, has_rating=False)
    # Ranking configs are never held to it.
    check_rating_setup(load_config("configs/ml-100k-sasrec.yaml"), has_rating=False)


def test_rating_protocol_is_not_comparable_with_ranking() -> None:
    ranking = load_config(overrides={"dataset.split": "ratio"})
    rating = load_config(overrides={"dataset.split": "ratio", "evaluation.task": "rating"})
    assert eval_protocol(ranking) == "ratio:0.8,0.1,0.1|min_user=5|min_item=1"  # unchanged
    assert eval_protocol(rating) == "ratio:0.8,0.1,0.1|min_user=5|min_item=1|task=rating"


# ----------------------------------------------------------------------------- value metrics and gate


def test_errors_to_metrics() -> None:
    got = _errors_to_metrics(np.array([1.0, -1.0, 2.0, 0.0]))
    assert got == {"rmse": round(math.sqrt(6 / 4), 6), "mae": 1.0}
    with pytest.raises(DataValidationError, match="no held-out ratings"):
        _errors_to_metrics(np.empty(0))


def test_rating_gate_wants_lower_than_baseline_and_champion() -> None:
    kw = {"metric": "RMSE", "lower_is_better": True, "baseline_name": "train-mean baseline"}
    ok = decide(candidate={"rmse": 0.9}, baseline={"rmse": 1.1}, **kw)
    assert ok.promote is True
    assert ok.reasons == ["beats train-mean baseline on RMSE (lower is better): 0.9000 < 1.1000",
                          "no comparable champion"]
    assert decide(candidate={"rmse": 1.2}, baseline={"rmse": 1.1}, **kw).promote is False
    assert decide(candidate={"rmse": 1.1}, baseline={"rmse": 1.1}, **kw).promote is False  # a tie is no gain
    worse_than_champion = decide(candidate={"rmse": 0.9}, baseline={"rmse": 1.1}, champion={"rmse": 0.85},
                                 champion_version="v1", **kw)
    assert worse_than_champion.promote is False and worse_than_champion.champion == 0.85
    assert "does not beat champion v1 on RMSE: 0.9000 >= 0.8500" in worse_than_champion.reasons[1]
    assert decide(candidate={"rmse": 0.8}, baseline={"rmse": 1.1}, champion={"rmse": 0.85},
                  champion_version="v1", **kw).promote is True
    margin = decide(candidate={"rmse": 0.8}, baseline={"rmse": 1.1}, champion={"rmse": 0.85},
                    champion_version="v1", min_improvement=0.1, **kw)
    assert margin.promote is False  # 0.8 is not lower than 0.85 - 0.1
    # Ranking (higher is better) is unchanged by the new arguments' defaults.
    assert decide(metric="NDCG@10", candidate={"ndcg@10": 0.2}, baseline={"ndcg@10": 0.1}).reasons[0] == \
        "beats Pop baseline on NDCG@10: 0.2000 > 0.1000"


# ----------------------------------------------------------------------------- the tiny FM


def test_rating_metrics_on_the_original_scale(rating_run: RatingRun) -> None:
    ev = rating_run.evaluation
    assert ev.task == "rating"
    assert set(ev.test) == set(ev.valid) == set(ev.baseline) == {"rmse", "mae"}
    for result in (ev.test, ev.valid, ev.baseline):
        assert 0 < result["mae"] <= result["rmse"] < 4  # ratings span 1..5
    data = _data(rating_run)
    assert data.rating_scale == (1.0, 5.0)
    # The labels mapped back are the CSV's own ratings of the held-out (user, item) pairs.
    raw = pl.read_csv(rating_run.csv)
    by_pair: dict[tuple[str, str], set[int]] = {}
    for u, i, r in raw.select("user_id", "item_id", "rating").iter_rows():
        by_pair.setdefault((u, i), set()).add(r)
    users, items = [], []
    for batch in data.test:
        interaction = batch[0]
        users += [data.dataset.id2token(data.dataset.uid_field, int(x)) for x in interaction["user_id"]]
        items += [data.dataset.id2token(data.dataset.iid_field, int(x)) for x in interaction["item_id"]]
    _, true = _rating_predictions(data, None, data.test)
    assert len(true) == len(users) > 80  # ratio split: every user's last ~10%
    for u, i, t in zip(users, items, true):
        assert round(t) in by_pair[(str(u), str(i))] and abs(t - round(t)) < 1e-5


def test_rating_metrics_equal_recbole_evaluator_scaled_back(rating_run: RatingRun) -> None:
    """RecBole computes RMSE/MAE on the [0, 1] label; times the rating span they must equal ours."""
    data = _data(rating_run)
    model = load_trained(data, rating_run.trained.checkpoint)
    trainer = make_trainer(data, model, rating_run.trained.checkpoint)
    try:
        recbole_test = trainer.evaluate(data.test, load_best_model=False)
    finally:
        trainer.tensorboard.close()
    span = 5.0 - 1.0
    assert rating_run.evaluation.test["rmse"] == pytest.approx(recbole_test["rmse"] * span, abs=1e-5)
    assert rating_run.evaluation.test["mae"] == pytest.approx(recbole_test["mae"] * span, abs=1e-5)


def test_baseline_predicts_the_train_mean(rating_run: RatingRun) -> None:
    data = _data(rating_run)
    train_mean = float(np.mean(data.train.dataset.inter_feat["rating"].numpy())) * 4.0 + 1.0
    assert 1.0 < train_mean < 5.0
    _, true = _rating_predictions(data, None, data.test)
    expected_rmse = math.sqrt(float(np.mean((true - train_mean) ** 2)))
    assert mean_rating_baseline(data)["rmse"] == pytest.approx(expected_rmse, abs=1e-6)
    assert rating_run.evaluation.baseline == mean_rating_baseline(data)


def test_fm_beats_the_mean_and_the_gate_says_so(rating_run: RatingRun) -> None:
    ev = rating_run.evaluation
    # The ratings are user bias + item bias: FM's first-order terms learn them.
    assert ev.test["rmse"] < ev.baseline["rmse"] - 0.05
    assert ev.gate.metric == "RMSE" and ev.gate.promote is True
    assert ev.gate.candidate == ev.test["rmse"] and ev.gate.baseline == ev.baseline["rmse"]
    assert ev.gate.reasons[0].startswith("beats train-mean baseline on RMSE (lower is better)")
    saved = ev.metrics_path.read_text()
    assert '"task": "rating"' in saved
    rows = metrics_table(ev)
    assert [r["metric"] for r in rows] == ["rmse", "mae"] and "train_mean" in rows[0] and "pop" not in rows[0]


def test_a_worse_rating_champion_is_beaten_and_a_better_one_is_not(rating_run: RatingRun, tmp_path: Path) -> None:
    from core.records import DatasetSplits

    data = _data(rating_run)
    splits = DatasetSplits(data_dir=rating_run.run_dir / "recbole", dataset_name="interactions", users=0, items=0,
                           interactions=data.dataset.inter_num, split="ratio",
                           fingerprint="fp", eval_protocol=eval_protocol(rating_run.config))
    rmse = rating_run.evaluation.test["rmse"]

    def card(champion_rmse: float) -> dict[str, object]:
        return {"version": "v0", "data": {"fingerprint": "fp", "eval_protocol": splits.eval_protocol},
                "metrics": {"test": {"rmse": champion_rmse, "mae": 1.0}}}

    better = evaluate(rating_run.config, splits, rating_run.trained, tmp_path, card(rmse - 0.01))
    assert better.gate.promote is False and better.gate.champion == pytest.approx(rmse - 0.01)
    worse = evaluate(rating_run.config, splits, rating_run.trained, tmp_path, card(rmse + 0.01))
    assert worse.gate.promote is True and worse.gate.champion_version == "v0"
