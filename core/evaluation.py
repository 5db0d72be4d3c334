"""evaluate: full-ranking metrics for the candidate, a popularity baseline and the gate.

Metrics come from RecBole's own evaluator on the same split, so they match what
RecBole reports. The candidate is compared with the champion only when the
champion's metrics were measured on the same data under the same protocol.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from core import recbole_compat as rb
from core.config import PipelineConfig
from core.dataset import RecBoleData, load_recbole_data
from core.records import DatasetSplits, Evaluation, GateDecision, TrainedModel
from core.training import load_trained, make_trainer

METRICS_FILE = "metrics.json"


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
) -> GateDecision:
    """Promote only if the candidate beats Pop and the (comparable) champion on ``metric``."""
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


def evaluate(
    config: PipelineConfig,
    splits: DatasetSplits,
    trained: TrainedModel,
    run_dir: Path,
    champion_card: dict[str, Any] | None = None,
) -> Evaluation:
    checkpoint_dir = trained.checkpoint.parent
    data = load_recbole_data(config, splits, checkpoint_dir)
    model = load_trained(data, trained.checkpoint)
    valid, test = ranking_metrics(data, model, trained.checkpoint)
    baseline = popularity_baseline(data, checkpoint_dir)
    champion_version = champion_card.get("version") if champion_card else None
    champion_metrics = champion_card.get("metrics", {}).get("test") if comparable(champion_card, splits) else None
    gate = decide(
        metric=config.evaluation.gate_metric,
        candidate=test,
        baseline=baseline,
        champion=champion_metrics,
        champion_version=champion_version,
        min_improvement=config.evaluation.min_improvement,
    )
    path = run_dir / METRICS_FILE
    result = Evaluation(
        test=test, valid=valid, baseline=baseline, champion=champion_metrics, gate=gate, metrics_path=path
    )
    path.write_text(json.dumps(result.model_dump(mode="json", exclude={"metrics_path"}), indent=2))
    return result


def metrics_table(evaluation: Evaluation) -> list[dict[str, Any]]:
    """Rows (metric, candidate, Pop, champion) for printing and for a Prefect table artifact."""
    rows = []
    for key, value in evaluation.test.items():
        champ = evaluation.champion.get(key) if evaluation.champion else None
        rows.append({"metric": key, "candidate": value, "pop": evaluation.baseline.get(key), "champion": champ})
    return rows
