"""export: ONNX graph, torch-vs-ONNX parity on real test users, latency, vocabularies.

The graph's signature (input/output names, dtypes, shapes) and every file name are the artifact
contract's (``core.release.artifacts``), by kind:

- ``sequential``: ``item_seq`` [B, L] + ``item_seq_len`` [B] -> ``scores`` [B, n_items];
- ``user``: ``user_id`` [B] -> ``scores`` [B, n_items];
- ``history`` (EASE, item-based ItemKNN; graphs in ``core.modeling.export_graphs``): the
  request's item ids ``history`` [B, H] times the item-item matrix -> ``scores`` [B, n_items];
- ``pairs`` (rating models over user and item ids, e.g. FM): ``user_id`` [B] + ``item_id`` [B]
  -> ``ratings`` [B] on the original rating scale.

``scores`` cover all internal item ids; column 0 is RecBole's padding id and must be masked by
the consumer (the scorer in ``core.serving`` does). Parity: the graph against the model's own
code on real test users (history graphs: against RecBole's ``full_sort_predict``, each user's
training row as the history; pairs: on real test pairs).

Not every model is exported (the step still succeeds, the card's ``export`` says why and the
registry keeps the checkpoint): other traditional models (UserKNN, SLIM, ...) score through
scipy/numpy matrices recflow has no graph for; a rating model with more features than the user
and item ids has no (user, item) input to serve.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.config import PipelineConfig
from core.errors import ExportError
from core.modeling.dataset import RecBoleData, check_data, load_recbole_data
from core.modeling.export_graphs import PairScorer, history_graph, history_reason, pairs_reason, training_histories
from core.modeling.training import load_trained
from core.records import ITEM as ITEM_FIELD
from core.records import USER as USER_FIELD
from core.records import DatasetSplits, ExportedModel, TrainedModel
from core.release.artifacts import (
    CARD_FILE,
    CHECKPOINT_FILE,
    HISTORY,
    HISTORY_INPUT,
    INPUTS,
    ITEM_INPUT,
    ITEM_VOCAB_FILE,
    MODEL_FILE,
    OUTPUTS,
    PAIRS,
    SEQUENTIAL,
    SIGNATURE_FILE,
    USER,
    USER_INPUT,
    USER_VOCAB_FILE,
    dynamic_axes,
    make_signature,
)
from core.serving.scorer import mask_scores, top_k

__all__ = ["ITEM_VOCAB_FILE", "MODEL_FILE", "SIGNATURE_FILE", "USER_VOCAB_FILE", "export_model", "is_sequential",
           "not_exportable_reason"]


class _SequentialScorer(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        inter = {self.model.ITEM_SEQ: item_seq, self.model.ITEM_SEQ_LEN: item_seq_len}
        return self.model.full_sort_predict(inter).view(item_seq.shape[0], -1)


class _UserScorer(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, user_id: torch.Tensor) -> torch.Tensor:
        return self.model.full_sort_predict({self.model.USER_ID: user_id}).view(user_id.shape[0], -1)


def is_sequential(model: torch.nn.Module) -> bool:
    return hasattr(model, "ITEM_SEQ") and hasattr(model, "ITEM_SEQ_LEN")


def export_kind(config: PipelineConfig, model: torch.nn.Module) -> str:
    """The signature kind ``model`` is exported as (``core.release.artifacts.INPUTS``)."""
    from recbole.utils import ModelType

    if config.evaluation.task == "rating":
        return PAIRS
    if getattr(model, "type", None) == ModelType.TRADITIONAL:
        return HISTORY
    return SEQUENTIAL if is_sequential(model) else USER


def not_exportable_reason(config: PipelineConfig, model: torch.nn.Module, model_name: str) -> str | None:
    """Why ``model`` is not exported to ONNX by design, or None when it should be."""
    kind = export_kind(config, model)
    reason = None
    if kind == PAIRS:
        reason = pairs_reason(model, model_name, USER_FIELD, ITEM_FIELD)
    elif kind == HISTORY:
        reason = history_reason(model, model_name)
    return None if reason is None else f"{reason}; the registry keeps its checkpoint ({CHECKPOINT_FILE})"


def _append_mask_token(mask_token: int, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
    """BERT4Rec's ``reconstruct_test_data`` without its Python loop over the batch (which a trace
    would unroll for the example's batch size): the mask token goes after each sequence's last item."""
    pad = torch.zeros_like(item_seq[:, :1])
    seq = torch.cat((item_seq, pad), dim=-1)
    seq = seq.scatter(1, item_seq_len.view(-1, 1).long(), torch.full_like(pad, mask_token))
    return seq[:, 1:]


@contextmanager
def _traceable(model: torch.nn.Module) -> Iterator[None]:
    """Swap per-row Python loops in a model's predict path for batched tensor ops while tracing.

    Parity is then checked against the model's own (unswapped) code on real test users.
    """
    if hasattr(model, "reconstruct_test_data") and hasattr(model, "mask_token"):  # BERT4Rec
        model.reconstruct_test_data = partial(_append_mask_token, int(model.mask_token))  # type: ignore[method-assign]
        try:
            yield
        finally:
            del model.reconstruct_test_data
    else:
        yield


def _test_inputs(data: RecBoleData, model: torch.nn.Module, kind: str,
                 limit: int) -> tuple[dict[str, np.ndarray], list[np.ndarray], np.ndarray | None]:
    """Real test users: the model inputs, per row the item ids RecBole's evaluator masks, and
    (history graphs) the users whose training rows the histories are.

    A history graph gets each user's row of the model's training matrix (what RecBole scores);
    a pairs graph gets the test split's (user, item) pairs (nothing is masked).
    """
    if kind == PAIRS:
        return *_test_pairs(data, model, limit), None
    inputs: dict[str, list[np.ndarray]] = {}
    history: list[np.ndarray] = []
    rows = 0
    keys = INPUTS[SEQUENTIAL] if kind == SEQUENTIAL else (USER_INPUT,)
    fields = [model.ITEM_SEQ, model.ITEM_SEQ_LEN] if kind == SEQUENTIAL else [model.USER_ID]
    for interaction, history_index, _, _ in data.test:
        n = len(interaction)
        for key, field in zip(keys, fields):
            inputs.setdefault(key, []).append(interaction[field].cpu().numpy().astype(np.int64))
        masks: list[list[int]] = [[] for _ in range(n)]
        if history_index is not None:
            r, c = history_index
            for ri, ci in zip(r.tolist(), c.tolist()):
                masks[ri].append(ci)
        history.extend(np.asarray(m, dtype=np.int64) for m in masks)
        rows += n
        if rows >= limit:
            break
    arrays = {k: np.concatenate(v)[:limit] for k, v in inputs.items()}
    if kind == HISTORY:
        users = arrays[USER_INPUT]
        return {HISTORY_INPUT: training_histories(model, users)}, history[:limit], users
    return arrays, history[:limit], None


def _test_pairs(data: RecBoleData, model: torch.nn.Module, limit: int) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    users: list[np.ndarray] = []
    items: list[np.ndarray] = []
    rows = 0
    for batch in data.test:
        interaction = batch[0] if isinstance(batch, tuple) else batch
        users.append(interaction[USER_FIELD].cpu().numpy().astype(np.int64))
        items.append(interaction[ITEM_FIELD].cpu().numpy().astype(np.int64))
        rows += len(users[-1])
        if rows >= limit:
            break
    if not users:
        raise ExportError("no test pairs to check the ONNX graph on")
    return {USER_INPUT: np.concatenate(users)[:limit], ITEM_INPUT: np.concatenate(items)[:limit]}, []


def _export_graph(wrapper: torch.nn.Module, example: dict[str, np.ndarray], path: Path, opset: int, kind: str) -> None:
    args = tuple(torch.from_numpy(v[:2]) for v in example.values())
    names = list(example)
    assert tuple(names) == INPUTS[kind], (names, kind)
    dynamic = dynamic_axes(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow in RecBole models
        # dynamo=False: the default (dynamo) exporter in torch>=2.9 needs onnxscript.
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            input_names=names,
            output_names=[OUTPUTS[kind]],
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,
        )


def export_model(
    config: PipelineConfig,
    splits: DatasetSplits,
    trained: TrainedModel,
    run_dir: Path,
    data: RecBoleData | None = None,
) -> tuple[ExportedModel, dict[str, Any]]:
    """Export to ONNX and check parity. Returns the record and the card's ``export`` section.

    ``data``: the caller's RecBole data for this run (None: built here).
    """
    out_dir = run_dir / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = load_recbole_data(config, splits, trained.checkpoint.parent)
    else:
        check_data(data, config, splits, trained.checkpoint.parent)
    model = load_trained(data, trained.checkpoint).cpu()
    _write_vocab(data, out_dir)
    card_path = out_dir / CARD_FILE
    if not config.export.enabled:
        return ExportedModel(exported=False, reason="export disabled in config", card_path=card_path), {}
    by_design = not_exportable_reason(config, model, trained.model_name)
    if by_design is not None:
        (out_dir / MODEL_FILE).unlink(missing_ok=True)  # a retried export must not leave an older graph behind
        return ExportedModel(exported=False, reason=by_design, card_path=card_path), {}
    kind = export_kind(config, model)
    inputs, history, users = _test_inputs(data, model, kind, config.export.parity_users)
    wrapper, extra = _wrapper(kind, model, data)
    onnx_path = out_dir / MODEL_FILE
    try:
        with torch.no_grad(), _traceable(model):
            wrapper(*[torch.from_numpy(v[:2]) for v in inputs.values()])
            _export_graph(wrapper, inputs, onnx_path, config.export.opset, kind)
    except Exception as exc:
        return _not_exportable(trained, onnx_path, card_path, "is not ONNX-exportable", exc)

    import onnxruntime as ort

    expected = _expected(model, wrapper, inputs, users)
    output = OUTPUTS[kind]
    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        got = session.run([output], inputs)[0]
    except Exception as exc:
        return _not_exportable(trained, onnx_path, card_path, "was traced but its ONNX graph does not run", exc)
    max_diff = float(np.max(np.abs(expected - got)))
    # A rating per pair has no top-10; every other kind scores the catalogue.
    agree = 1.0 if kind == PAIRS else _top10_agreement(expected, got, history)
    latency = _latency_ms(session, output, {k: v[:1] for k, v in inputs.items()})
    signature = make_signature(
        kind, max_seq_length=int(data.config["MAX_ITEM_LIST_LENGTH"]) if kind == SEQUENTIAL else None,
        n_items=int(data.dataset.item_num), rating_scale=data.rating_scale if kind == PAIRS else None)
    (out_dir / SIGNATURE_FILE).write_text(json.dumps(signature, indent=2))
    record = ExportedModel(
        exported=True,
        onnx_path=onnx_path,
        max_abs_diff=max_diff,
        top10_agreement=None if kind == PAIRS else agree,
        users_checked=int(got.shape[0]),
        size_bytes=onnx_path.stat().st_size,
        latency_ms_p50=latency,
        card_path=card_path,
    )
    tol = config.export.parity_tolerance
    what = "test pairs" if kind == PAIRS else "test users"
    if max_diff > tol or agree < 1.0:
        raise ExportError(
            f"ONNX parity failed on {got.shape[0]} {what}: max |{trained.model_name}-onnx| = {max_diff:.2e} "
            f"(tolerance {tol:g}), identical top-10 for {agree:.1%} of users"
        )
    parity: dict[str, Any] = {"users": record.users_checked, "max_abs_diff": max_diff, "top10_identical": agree,
                              "tolerance": tol}
    if kind == PAIRS:
        parity = {"pairs": record.users_checked, "max_abs_diff": max_diff, "tolerance": tol}
    section = {**signature, "opset": config.export.opset, "parity": parity, **extra,
               "size_bytes": record.size_bytes, "latency_ms_p50_batch1_cpu": latency}
    return record, section


def _wrapper(kind: str, model: torch.nn.Module, data: RecBoleData) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The module to trace for ``kind``, and what the card says about it beyond the signature."""
    if kind == SEQUENTIAL:
        return _SequentialScorer(model).eval(), {}
    if kind == USER:
        return _UserScorer(model).eval(), {}
    if kind == HISTORY:
        module, matrix = history_graph(model)
        return module.eval(), {"matrix": matrix}
    assert data.rating_scale is not None, "rating data must be loaded with evaluation.task=rating"
    return PairScorer(model, data.rating_scale, USER_FIELD, ITEM_FIELD).eval(), {}


def _expected(model: torch.nn.Module, wrapper: torch.nn.Module, inputs: dict[str, np.ndarray],
              users: np.ndarray | None) -> np.ndarray:
    """What the model's own code says for ``inputs``; for a history graph (``users`` given), RecBole's
    ``full_sort_predict`` for the users whose training rows the histories are."""
    with torch.no_grad():
        if users is not None:
            scores = model.full_sort_predict({model.USER_ID: torch.from_numpy(users)})
            return np.asarray(scores.view(len(users), -1).float().numpy())
        return wrapper(*[torch.from_numpy(v) for v in inputs.values()]).numpy()


def _not_exportable(
    trained: TrainedModel, onnx_path: Path, card_path: Path, what: str, exc: BaseException
) -> tuple[ExportedModel, dict[str, Any]]:
    onnx_path.unlink(missing_ok=True)
    reason = f"{trained.model_name} {what}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
    return ExportedModel(exported=False, reason=reason, card_path=card_path), {"reason": reason}


def _top10_agreement(expected: np.ndarray, got: np.ndarray, history: list[np.ndarray]) -> float:
    """Share of users whose masked top-10 is the same; exact float ties count as the same."""
    same = 0
    for row in range(expected.shape[0]):
        e = mask_scores(expected[row], history[row])
        g = mask_scores(got[row], history[row])
        te, tg = top_k(e, 10), top_k(g, 10)
        # Items swapped only because their torch scores tie are not a disagreement.
        if np.array_equal(te, tg) or np.allclose(np.sort(e[te]), np.sort(e[tg]), atol=1e-6, rtol=0):
            same += 1
    return same / max(expected.shape[0], 1)


def _latency_ms(session: Any, output: str, one: dict[str, np.ndarray], runs: int = 50) -> float:
    session.run([output], one)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run([output], one)
        times.append((time.perf_counter() - start) * 1000)
    return round(float(np.median(times)), 3)


def _write_vocab(data: RecBoleData, out_dir: Path) -> None:
    ds = data.dataset
    items = [str(t) for t in ds.field2id_token[ds.iid_field]]
    (out_dir / ITEM_VOCAB_FILE).write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
    users = [str(t) for t in ds.field2id_token[ds.uid_field]]
    (out_dir / USER_VOCAB_FILE).write_text(json.dumps(users, ensure_ascii=False), encoding="utf-8")
