"""An ensemble of seed models: K runs of one configuration, combined into one model version.

``build_ensemble`` takes the run folders of K models trained with the same configuration and
different seeds (``recflow tune --seeds K``), checks they can be combined (same RecBole model,
same architecture, same data and split), evaluates every member and the ensemble on valid and
test with RecBole's evaluator, and writes the ensemble's run folder: ``checkpoints/best.pth``
(the members' weights, ``core.modeling.ensemble_model``) and ``config.yaml``. Its
``TrainedModel`` then goes through ``evaluate`` -> ``export_model`` -> register like any other
trained model: ``load_trained`` returns an ``EnsembleModel`` for that checkpoint, the ONNX graph
holds every member and averages their log-softmax scores.

The ensemble is worth shipping only if it beats its best member on valid
(``EnsembleResult.beats_best_member``); the caller decides.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, Field

from core.config import PipelineConfig, dump_config
from core.errors import EnsembleError
from core.modeling import recbole_adapter as rb
from core.modeling.dataset import RecBoleData, check_data, load_recbole_data
from core.modeling.ensemble_model import EnsembleModel, ensemble_checkpoint, is_ensemble_checkpoint
from core.modeling.evaluation import ranking_metrics
from core.modeling.tracking import read_epoch_log
from core.modeling.trainer_mixin import atomic_save
from core.modeling.training import build_model
from core.records import DatasetSplits, TrainedModel
from core.release.artifacts import CHECKPOINT_FILE, CONFIG_FILE

log = logging.getLogger("recflow.ensemble")

CHECKPOINTS_DIR = "checkpoints"  # <run dir>/checkpoints/, as training writes it
SUMMARY_FILE = "ensemble.json"  # the EnsembleResult, in the ensemble's run folder (not a registered file)
# RecBole config keys that decide which data and split a model was trained and scored on.
DATA_KEYS = ("data_path", "dataset", "eval_args", "load_col", "user_inter_num_interval", "item_inter_num_interval",
             "MAX_ITEM_LIST_LENGTH", "LABEL_FIELD")

__all__ = ["EnsembleModel", "EnsembleResult", "MemberResult", "build_ensemble"]


class MemberResult(BaseModel):
    """One seed model of the ensemble and its figures."""

    name: str = Field(description="the member's run folder name")
    seed: int
    best_epoch: int
    valid: dict[str, float]
    test: dict[str, float]


class EnsembleResult(BaseModel):
    """What ``build_ensemble`` measured and wrote."""

    model: str = Field(description="the RecBole model every member is")
    valid_metric: str
    members: list[MemberResult]
    valid: dict[str, float] = Field(description="the ensemble's valid metrics")
    test: dict[str, float] = Field(description="the ensemble's test metrics")
    best_member: str = Field(description="the member with the best valid metric")
    beats_best_member: bool = Field(description="the ensemble's valid metric is better than the best member's")
    trained: TrainedModel = Field(description="the ensemble as a trained model: evaluate, export, register it")
    summary_path: Path


def build_ensemble(
    config: PipelineConfig,
    splits: DatasetSplits,
    member_run_dirs: list[Path],
    out_dir: Path,
    *,
    data: RecBoleData | None = None,
) -> EnsembleResult:
    """Combine the seed models in ``member_run_dirs`` into one ensemble written to ``out_dir``.

    Args:
        config: the configuration every member was trained with (their seeds aside).
        splits: the split every member was trained on.
        member_run_dirs: run folders holding ``checkpoints/best.pth`` (trial or seed runs).
        out_dir: the ensemble's run folder (``checkpoints/best.pth``, ``config.yaml``, ``ensemble.json``).
        data: RecBole data built for ``config``/``splits`` with ``out_dir/checkpoints``; None builds it.
            Pass it on to ``evaluate``/``export_model`` for the ensemble's ``TrainedModel``.

    Returns:
        Every member's and the ensemble's valid/test metrics, whether it beats its best member on
        valid, and its ``TrainedModel``.

    Raises:
        EnsembleError: no members, a member without a checkpoint, members of another model, data,
            split or architecture than ``config``, or a rating task (nothing to average over items).
    """
    start = time.perf_counter()
    if config.evaluation.task == "rating":
        raise EnsembleError("ensembles average ranking scores over items; evaluation.task 'rating' has none")
    model_name = rb.canonical_model_name(config.model.name)
    states = _member_states(member_run_dirs, model_name)
    checkpoint_dir = out_dir / CHECKPOINTS_DIR
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = load_recbole_data(config, splits, checkpoint_dir)
    else:
        check_data(data, config, splits, checkpoint_dir)
    _check_model_kind(data)
    for name, state in states.items():
        _check_same_setup(name, state["config"], data.config, model_name)
    members = [_load_member(data, name, state) for name, state in states.items()]
    checkpoint = checkpoint_dir / CHECKPOINT_FILE
    metric = config.evaluation.valid_metric.lower()
    results = []
    for (name, state), member in zip(states.items(), members, strict=True):
        valid, test = ranking_metrics(data, member, checkpoint)
        results.append(MemberResult(name=name, seed=int(state["config"]["seed"]), best_epoch=int(state["epoch"]),
                                    valid=valid, test=test))
    ensemble = EnsembleModel(members).eval()
    valid, test = ranking_metrics(data, ensemble, checkpoint)
    bigger = bool(data.config["valid_metric_bigger"])
    best = (max if bigger else min)(results, key=lambda r: r.valid[metric])
    beats = valid[metric] > best.valid[metric] if bigger else valid[metric] < best.valid[metric]
    info = [{"name": r.name, "seed": r.seed, "best_epoch": r.best_epoch, "valid_score": r.valid[metric]}
            for r in results]
    atomic_save(ensemble_checkpoint(members, model_name, info), checkpoint)
    dump_config(config, out_dir / CONFIG_FILE)
    seeds = ", ".join(str(r.seed) for r in results)
    trained = TrainedModel(
        model_name=f"{model_name} ensemble of {len(results)} seeds ({seeds})",
        checkpoint=checkpoint,
        best_epoch=-1,  # no epoch of its own: each member's is in `members`
        best_valid_score=valid[metric],
        valid_metric=config.evaluation.valid_metric,
        epochs=[],
        device=str(data.config["device"]),
        train_batch_size=int(data.config["train_batch_size"]),
        parameters=sum(p.numel() for p in ensemble.parameters()),
        seconds=round(sum(_training_seconds(d) for d in member_run_dirs), 3),
    )
    summary = out_dir / SUMMARY_FILE
    result = EnsembleResult(model=model_name, valid_metric=config.evaluation.valid_metric, members=results,
                            valid=valid, test=test, best_member=best.name, beats_best_member=beats, trained=trained,
                            summary_path=summary)
    summary.write_text(json.dumps(result.model_dump(mode="json", exclude={"summary_path"}), indent=2))
    log.info("ensemble of %d %s seeds: valid %s %.4f vs best member %s %.4f (%s), %.1f s", len(results), model_name,
             metric, valid[metric], best.name, best.valid[metric], "beats it" if beats else "does not beat it",
             time.perf_counter() - start)
    return result


def _member_states(member_run_dirs: list[Path], model_name: str) -> dict[str, dict[str, Any]]:
    """Each member's best checkpoint, by run folder name; refuses what cannot be a member."""
    if not member_run_dirs:
        raise EnsembleError("an ensemble needs at least one member run folder")
    states: dict[str, dict[str, Any]] = {}
    seen: set[Path] = set()
    for run_dir in member_run_dirs:
        path = Path(run_dir) / CHECKPOINTS_DIR / CHECKPOINT_FILE
        if not path.is_file():
            raise EnsembleError(f"ensemble member {run_dir}: no {CHECKPOINTS_DIR}/{CHECKPOINT_FILE} (train it first)")
        if path.resolve() in seen:
            raise EnsembleError(f"ensemble member {run_dir} is listed twice")
        seen.add(path.resolve())
        name = Path(run_dir).name
        if name in states:
            raise EnsembleError(f"two ensemble members have the run folder name {name!r}: give each its own")
        state = rb.load_checkpoint(path, "cpu")
        if is_ensemble_checkpoint(state):
            raise EnsembleError(f"ensemble member {name} is itself an ensemble: list its members instead")
        states[name] = state
    models = {name: str(s["config"]["model"]) for name, s in states.items()}
    others = {name: m for name, m in models.items() if m != model_name}
    if others:
        found = ", ".join(f"{name}: {m}" for name, m in others.items())
        raise EnsembleError(f"ensemble members must all be {model_name} models (the config's); found {found}")
    return states


def _check_model_kind(data: RecBoleData) -> None:
    from recbole.utils import ModelType

    kind = data.config["MODEL_TYPE"]
    if kind not in (ModelType.SEQUENTIAL, ModelType.GENERAL):
        raise EnsembleError(f"{data.config['model']} is a {getattr(kind, 'name', kind)} model: ensembles take "
                            "sequential or general (user-based) models")


def _check_same_setup(name: str, member: Any, ours: Any, model_name: str) -> None:
    """Refuse a member trained on other data or split, or with another architecture, than ``ours``."""
    path = rb.RECBOLE_DIR / "properties" / "model" / f"{model_name}.yaml"
    architecture = tuple((yaml.safe_load(path.read_text()) or {}).keys())
    for key in DATA_KEYS + architecture:
        theirs, mine = member[key], ours[key]
        same = Path(theirs).resolve() == Path(mine).resolve() if key == "data_path" and theirs and mine else theirs == mine
        if not same:
            what = "data or split" if key in DATA_KEYS else "architecture"
            raise EnsembleError(f"ensemble member {name} has another {what} than the ensemble's config: "
                                f"{key} = {theirs!r}, expected {mine!r}")


def _load_member(data: RecBoleData, name: str, state: dict[str, Any]) -> torch.nn.Module:
    model = build_model(data)
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as exc:  # another item count or shape: other data under the same path
        detail = " ".join(str(exc).split())[:300]
        raise EnsembleError(f"ensemble member {name} does not fit this data: {detail}") from None
    model.load_other_parameter(state.get("other_parameter"))
    return model.eval()


def _training_seconds(run_dir: Path) -> float:
    """Seconds the member trained (its training log; 0 when it has none)."""
    return float(sum(line.get("train_seconds") or 0.0 for line in read_epoch_log(Path(run_dir))))
