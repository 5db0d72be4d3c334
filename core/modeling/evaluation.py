"""evaluate: metrics for the candidate, a baseline and the gate.

Ranking (``evaluation.task: ranking``, the default): full-ranking metrics from RecBole's own
evaluator on the same split, so they match what RecBole reports; the baseline is Pop.

Rating (``evaluation.task: rating``): RMSE and MAE of the predicted rating for every held-out
(user, item) pair, on the original rating scale; the baseline predicts the mean training
rating; lower wins.

The candidate is compared with the champion on the same test set: the champion's stored
metrics when it was measured on the same data and protocol, else the champion's ONNX model
re-scored on this run's split (``core.modeling.champion_rescore``; rating champions too).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.config import PipelineConfig
from core.errors import DataValidationError
from core.modeling import recbole_adapter as rb
from core.modeling.champion_rescore import ChampionNotComparable, rating_champion, rescore_champion
from core.modeling.dataset import RecBoleData, check_data, load_recbole_data
from core.modeling.trainer_mixin import make_trainer
from core.modeling.training import load_trained
from core.records import RATING, DatasetSplits, Evaluation, GateDecision, TrainedModel
from core.release.artifacts import METRICS_FILE

BASELINE_NAMES = {"ranking": "Pop baseline", "rating": "train-mean baseline"}


def _as_floats(result: dict[str, Any] | None) -> dict[str, float]:
    return {str(k): round(float(v), 6) for k, v in (result or {}).items()}


def ranking_metrics(data: RecBoleData, model: torch.nn.Module, checkpoint: Path) -> tuple[dict[str, float], dict[str, float]]:
    """(valid, test) metrics of ``model`` with RecBole's full-ranking evaluator."""
    trainer = make_trainer(data, model, checkpoint)
    try:
        valid = trainer.evaluate(data.valid, load_best_model=False)
        test = trainer.evaluate(data.test, load_best_model=False)
    finally:
        trainer.tensorboard.close()
    return _as_floats(valid), _as_floats(test)


def seen_items(data: RecBoleData, *, with_valid: bool) -> Any:
    """A (users x items) scipy CSR matrix of what each user interacted with before the held-out item.

    Train items (every train row's first history item and target), plus the valid item when
    scoring the test split.
    """
    import scipy.sparse as sp

    ds = data.dataset
    parts = []
    train = data.train.dataset.inter_feat
    uid, iid = ds.uid_field, ds.iid_field
    parts.append((train[uid].numpy(), train[iid].numpy()))
    list_field = getattr(ds, "item_id_list_field", None)
    if list_field is not None and list_field in train.interaction:
        parts.append((train[uid].numpy(), train[list_field][:, 0].numpy()))
    if with_valid:
        valid = data.valid.dataset.inter_feat
        parts.append((valid[uid].numpy(), valid[iid].numpy()))
    users = np.concatenate([u for u, _ in parts])
    items = np.concatenate([i for _, i in parts])
    matrix = sp.csr_matrix((np.ones(users.size, dtype=np.float32), (users, items)), shape=(ds.user_num, ds.item_num))
    matrix.sum_duplicates()
    return matrix


def seen_masked_metrics(data: RecBoleData, model: torch.nn.Module, checkpoint: Path) -> tuple[dict[str, float], dict[str, float]]:
    """(valid, test) metrics of a sequential model with already-seen items never recommended.

    RecBole masks a user's history only for general models (EASE, BPR); sequential models are
    scored over the whole catalogue. Masking them too puts both on one footing, and it is how
    ``recflow serve`` answers by default (``exclude_seen``).
    """
    original = model.full_sort_predict  # type: ignore[attr-defined]
    uid = data.dataset.uid_field
    results = []
    for eval_data, with_valid in ((data.valid, False), (data.test, True)):
        seen = seen_items(data, with_valid=with_valid)

        def masked(interaction: Any, _seen: Any = seen) -> torch.Tensor:
            scores = original(interaction)
            rows, cols = _seen[interaction[uid].cpu().numpy()].nonzero()
            scores = scores.view(len(interaction), -1)
            scores[torch.as_tensor(rows, device=scores.device), torch.as_tensor(cols, device=scores.device)] = -torch.inf
            return scores

        model.full_sort_predict = masked  # type: ignore[method-assign]
        trainer = make_trainer(data, model, checkpoint)
        try:
            results.append(_as_floats(trainer.evaluate(eval_data, load_best_model=False)))
        finally:
            trainer.tensorboard.close()
            del model.full_sort_predict
    return results[0], results[1]


def popularity_baseline(data: RecBoleData, checkpoint_dir: Path) -> dict[str, float]:
    """Test metrics of RecBole's Pop model on the candidate's own loaders.

    Same loaders means the same split and the same masking as the candidate (RecBole
    masks seen items for general models but not for sequential ones).
    """
    model_cls = rb.resolve_model("Pop")
    model = model_cls(data.config, data.train.dataset).to(data.config["device"])
    # Exact counts of training targets. RecBole's Pop.calculate_loss adds 1 per item per
    # *batch* (duplicate-index assignment), so its counts depend on the shuffle.
    train_items = data.train.dataset.inter_feat[data.dataset.iid_field]
    counts = torch.bincount(train_items.long(), minlength=data.dataset.item_num).to(torch.float)
    model.item_cnt = counts.view(-1, 1).to(data.config["device"])
    model.max_cnt = counts.max().to(data.config["device"])
    _, test = ranking_metrics(data, model, checkpoint_dir / "pop.pth")
    return test


def _errors_to_metrics(errors: np.ndarray) -> dict[str, float]:
    if errors.size == 0:
        raise DataValidationError("evaluation.task 'rating': no held-out ratings to evaluate on")
    return {"rmse": round(math.sqrt(float(np.mean(errors**2))), 6), "mae": round(float(np.mean(np.abs(errors))), 6)}


def _rating_predictions(data: RecBoleData, model: torch.nn.Module | None, loader: Any) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, true) ratings on the original scale for every pair in ``loader``.

    ``model`` None predicts nothing (an empty array); the labels are still returned.
    """
    assert data.rating_scale is not None, "rating data must be loaded with evaluation.task=rating"
    lo, hi = data.rating_scale
    predicted: list[np.ndarray] = []
    true: list[np.ndarray] = []
    device = data.config["device"]
    with torch.no_grad():
        for batch in loader:
            interaction = batch[0] if isinstance(batch, tuple) else batch
            true.append(interaction[RATING].double().cpu().numpy())
            if model is not None:
                predicted.append(model.predict(interaction.to(device)).double().cpu().numpy().reshape(-1))
    # The label was scaled to [0, 1] with (lo, hi) (core.modeling.dataset._scale_ratings): map both back.
    span = hi - lo
    pred = np.concatenate(predicted) * span + lo if predicted else np.empty(0)
    return pred, np.concatenate(true) * span + lo if true else np.empty(0)


def rating_metrics(data: RecBoleData, model: torch.nn.Module) -> tuple[dict[str, float], dict[str, float]]:
    """(valid, test) RMSE/MAE of ``model``'s predicted ratings on the original scale."""
    model.eval()
    out = []
    for loader in (data.valid, data.test):
        pred, true = _rating_predictions(data, model, loader)
        out.append(_errors_to_metrics(pred - true))
    return out[0], out[1]


def mean_rating_baseline(data: RecBoleData) -> dict[str, float]:
    """Test RMSE/MAE of predicting the mean training rating for every pair."""
    assert data.rating_scale is not None, "rating data must be loaded with evaluation.task=rating"
    lo, hi = data.rating_scale
    train_labels = data.train.dataset.inter_feat[RATING].double().cpu().numpy()
    mean = float(np.mean(train_labels)) * (hi - lo) + lo
    _, true = _rating_predictions(data, None, data.test)
    return _errors_to_metrics(mean - true)


def comparable(card: dict[str, Any] | None, splits: DatasetSplits) -> bool:
    """A champion's metrics count only if measured on the same data and protocol."""
    if not card:
        return False
    data = card.get("data", {})
    return data.get("fingerprint") == splits.fingerprint and data.get("eval_protocol") == splits.eval_protocol


def decide(
    *,
    metric: str,
    candidate: dict[str, float],
    baseline: dict[str, float],
    champion: dict[str, float] | None = None,
    champion_version: str | None = None,
    min_improvement: float = 0.0,
    lower_is_better: bool = False,
    baseline_name: str = "Pop baseline",
) -> GateDecision:
    """Promote only if the candidate beats the baseline and the (comparable) champion on ``metric``.

    ``lower_is_better`` (RMSE, MAE): beating means being lower by more than ``min_improvement``.
    """
    if lower_is_better:
        return _decide_lower(metric=metric, candidate=candidate, baseline=baseline, champion=champion,
                             champion_version=champion_version, min_improvement=min_improvement,
                             baseline_name=baseline_name)
    key = metric.lower()
    cand = candidate.get(key)
    base = baseline.get(key)
    if cand is None or base is None:
        raise KeyError(f"gate metric {metric} missing from evaluation results")
    reasons: list[str] = []
    promote = True
    if cand > base + min_improvement:
        reasons.append(f"beats Pop baseline on {metric}: {cand:.4f} > {base:.4f}")
    else:
        promote = False
        reasons.append(f"does not beat Pop baseline on {metric}: {cand:.4f} <= {base:.4f} + {min_improvement:g}")
    champ = champion.get(key) if champion else None
    if champ is None:
        reasons.append("no comparable champion" if champion_version is None else
                       f"champion {champion_version} was evaluated on other data; compared with Pop only")
    elif cand > champ + min_improvement:
        reasons.append(f"beats champion {champion_version} on {metric}: {cand:.4f} > {champ:.4f}")
    else:
        promote = False
        reasons.append(
            f"does not beat champion {champion_version} on {metric}: {cand:.4f} <= {champ:.4f} + {min_improvement:g}"
        )
    return GateDecision(
        promote=promote,
        metric=metric,
        candidate=cand,
        baseline=base,
        champion=champ,
        champion_version=champion_version,
        reasons=reasons,
    )


def _decide_lower(
    *,
    metric: str,
    candidate: dict[str, float],
    baseline: dict[str, float],
    champion: dict[str, float] | None,
    champion_version: str | None,
    min_improvement: float,
    baseline_name: str,
) -> GateDecision:
    key = metric.lower()
    cand, base = candidate.get(key), baseline.get(key)
    if cand is None or base is None:
        raise KeyError(f"gate metric {metric} missing from evaluation results")
    reasons: list[str] = []
    promote = True
    if cand < base - min_improvement:
        reasons.append(f"beats {baseline_name} on {metric} (lower is better): {cand:.4f} < {base:.4f}")
    else:
        promote = False
        reasons.append(
            f"does not beat {baseline_name} on {metric} (lower is better): {cand:.4f} >= {base:.4f} - {min_improvement:g}"
        )
    champ = champion.get(key) if champion else None
    if champ is None:
        reasons.append("no comparable champion" if champion_version is None else
                       f"champion {champion_version} was evaluated on other data; compared with the baseline only")
    elif cand < champ - min_improvement:
        reasons.append(f"beats champion {champion_version} on {metric}: {cand:.4f} < {champ:.4f}")
    else:
        promote = False
        reasons.append(
            f"does not beat champion {champion_version} on {metric}: {cand:.4f} >= {champ:.4f} - {min_improvement:g}"
        )
    return GateDecision(promote=promote, metric=metric, candidate=cand, baseline=base, champion=champ,
                        champion_version=champion_version, reasons=reasons)


def evaluate(
    config: PipelineConfig,
    splits: DatasetSplits,
    trained: TrainedModel,
    run_dir: Path,
    champion_card: dict[str, Any] | None = None,
    champion_dir: Path | None = None,
    *,
    data: RecBoleData | None = None,
) -> Evaluation:
    """Evaluate the candidate and decide the gate.

    ``data``: the run's RecBole data (the handle training used); None builds it here.

    The champion's stored test metrics are used when it was measured on the same data and
    protocol. Otherwise (a nightly run on new data) a ranking champion in ``champion_dir`` is
    re-scored on this run's test split (``core.modeling.champion_rescore``), so the gate still compares
    like with like; only a champion that cannot be re-scored leaves the baseline as the bar.
    """
    checkpoint_dir = trained.checkpoint.parent
    if data is None:
        data = load_recbole_data(config, splits, checkpoint_dir)
    else:
        check_data(data, config, splits, checkpoint_dir)
    model = load_trained(data, trained.checkpoint)
    rating = config.evaluation.task == "rating"
    test_seen_masked = None
    if rating:
        valid, test = rating_metrics(data, model)
        baseline = mean_rating_baseline(data)
    else:
        valid, test = ranking_metrics(data, model, trained.checkpoint)
        baseline = popularity_baseline(data, checkpoint_dir)
        if _is_sequential(data):
            _, test_seen_masked = seen_masked_metrics(data, model, trained.checkpoint)
    champion_version = champion_card.get("version") if champion_card else None
    champion_metrics, note = _champion_metrics(champion_card, champion_dir, splits, data, checkpoint_dir, rating)
    gate = decide(
        metric=config.evaluation.gate_metric,
        candidate=test,
        baseline=baseline,
        champion=champion_metrics,
        champion_version=champion_version,
        min_improvement=config.evaluation.min_improvement,
        lower_is_better=rating,
        baseline_name=BASELINE_NAMES[config.evaluation.task],
    )
    if note:
        gate.reasons.insert(1, note)
    path = run_dir / METRICS_FILE
    result = Evaluation(
        test=test, valid=valid, baseline=baseline, champion=champion_metrics, gate=gate, metrics_path=path,
        task=config.evaluation.task, test_seen_masked=test_seen_masked,
    )
    path.write_text(json.dumps(result.model_dump(mode="json", exclude={"metrics_path"}), indent=2))
    return result


def _is_sequential(data: RecBoleData) -> bool:
    from recbole.utils import ModelType

    return data.config["MODEL_TYPE"] == ModelType.SEQUENTIAL


def _champion_metrics(
    card: dict[str, Any] | None,
    champion_dir: Path | None,
    splits: DatasetSplits,
    data: RecBoleData,
    checkpoint_dir: Path,
    rating: bool,
) -> tuple[dict[str, float] | None, str | None]:
    """(champion test metrics to gate against or None, a reason line when they were not stored ones)."""
    if not card:
        return None, None
    if comparable(card, splits):
        return card.get("metrics", {}).get("test"), None
    version = card.get("version")
    if champion_dir is None:
        return None, None
    if card.get("data", {}).get("eval_protocol") != splits.eval_protocol:
        return None, f"champion {version} was evaluated under another protocol; it cannot be re-scored"
    try:
        if rating:
            champion = rating_champion(data, champion_dir)
            pred, true = _rating_predictions(data, champion, data.test)
            metrics = _errors_to_metrics(pred - true)
            rated = f" ({champion.rated} of {champion.pairs} pairs rated; the rest at mid-scale)"
        else:
            metrics, rated = rescore_champion(data, champion_dir, checkpoint_dir / "champion.pth"), ""
    except ChampionNotComparable as exc:
        return None, f"champion {version} cannot be re-scored on this data: {exc}"
    return metrics, f"champion {version} was trained on other data: re-scored on this run's test set{rated}"


def metrics_table(evaluation: Evaluation) -> list[dict[str, Any]]:
    """Rows (metric, candidate, baseline, champion) for printing and for a Prefect table artifact.

    The baseline column is ``pop`` for ranking, ``train_mean`` for rating.
    """
    column = "pop" if evaluation.task == "ranking" else "train_mean"
    rows = []
    for key, value in evaluation.test.items():
        champ = evaluation.champion.get(key) if evaluation.champion else None
        rows.append({"metric": key, "candidate": value, column: evaluation.baseline.get(key), "champion": champ})
    return rows
