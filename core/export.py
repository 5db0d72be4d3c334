"""export: ONNX graph, torch-vs-ONNX parity on real test users, latency, vocabularies.

Inputs: ``item_seq`` [B, L] int64 + ``item_seq_len`` [B] int64 for sequential models,
``user_id`` [B] int64 otherwise. Output: ``scores`` [B, n_items] over all internal item
ids; column 0 is RecBole's padding id and must be masked by the consumer (the scorer
in ``core.serving`` does).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.config import PipelineConfig
from core.dataset import RecBoleData, load_recbole_data
from core.errors import ExportError
from core.records import DatasetSplits, ExportedModel, TrainedModel
from core.serving.scorer import mask_scores, top_k
from core.training import load_trained

MODEL_FILE = "model.onnx"
ITEM_VOCAB_FILE = "item_ids.json"
USER_VOCAB_FILE = "user_ids.json"
SIGNATURE_FILE = "signature.json"


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


def _test_inputs(data: RecBoleData, model: torch.nn.Module, limit: int) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """Real test users: the model inputs and, per row, the item ids RecBole's evaluator masks."""
    inputs: dict[str, list[np.ndarray]] = {}
    history: list[np.ndarray] = []
    rows = 0
    for interaction, history_index, _, _ in data.test:
        n = len(interaction)
        keys = ["item_seq", "item_seq_len"] if is_sequential(model) else ["user_id"]
        fields = [model.ITEM_SEQ, model.ITEM_SEQ_LEN] if is_sequential(model) else [model.USER_ID]
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
    return arrays, history[:limit]


def _export_graph(wrapper: torch.nn.Module, example: dict[str, np.ndarray], path: Path, opset: int) -> None:
    args = tuple(torch.from_numpy(v[:2]) for v in example.values())
    names = list(example)
    dynamic = {n: {0: "batch"} for n in names} | {"scores": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow in RecBole models
        # dynamo=False: the default (dynamo) exporter in torch>=2.9 needs onnxscript.
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            input_names=names,
            output_names=["scores"],
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,
        )


def export_model(
    config: PipelineConfig,
    splits: DatasetSplits,
    trained: TrainedModel,
    run_dir: Path,
) -> tuple[ExportedModel, dict[str, Any]]:
    """Export to ONNX and check parity. Returns the record and the card's ``export`` section."""
    out_dir = run_dir / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_recbole_data(config, splits, trained.checkpoint.parent)
    model = load_trained(data, trained.checkpoint).cpu()
    _write_vocab(data, out_dir)
    card_path = out_dir / "model_card.json"
    if not config.export.enabled:
        return ExportedModel(exported=False, reason="export disabled in config", card_path=card_path), {}
    sequential = is_sequential(model)
    wrapper = (_SequentialScorer(model) if sequential else _UserScorer(model)).eval()
    inputs, history = _test_inputs(data, model, config.export.parity_users)
    onnx_path = out_dir / MODEL_FILE
    try:
        with torch.no_grad():
            wrapper(*[torch.from_numpy(v[:2]) for v in inputs.values()])
            _export_graph(wrapper, inputs, onnx_path, config.export.opset)
    except Exception as exc:  # noqa: BLE001 - any exporter failure means "not exportable"
        onnx_path.unlink(missing_ok=True)
        reason = f"{trained.model_name} is not ONNX-exportable: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return ExportedModel(exported=False, reason=reason, card_path=card_path), {"reason": reason}

    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = wrapper(*[torch.from_numpy(v) for v in inputs.values()]).numpy()
    got = session.run(["scores"], inputs)[0]
    max_diff = float(np.max(np.abs(expected - got)))
    agree = _top10_agreement(expected, got, history)
    latency = _latency_ms(session, {k: v[:1] for k, v in inputs.items()})
    signature = {
        "kind": "sequential" if sequential else "user",
        "inputs": list(inputs),
        "output": "scores",
        "max_seq_length": int(data.config["MAX_ITEM_LIST_LENGTH"]) if sequential else None,
        "n_items": int(got.shape[1]),
        "padding_item": 0,
        "mask_history": not sequential,  # as RecBole's evaluator does
    }
    (out_dir / SIGNATURE_FILE).write_text(json.dumps(signature, indent=2))
    record = ExportedModel(
        exported=True,
        onnx_path=onnx_path,
        max_abs_diff=max_diff,
        top10_agreement=agree,
        users_checked=int(got.shape[0]),
        size_bytes=onnx_path.stat().st_size,
        latency_ms_p50=latency,
        card_path=card_path,
    )
    tol = config.export.parity_tolerance
    if max_diff > tol or agree < 1.0:
        raise ExportError(
            f"ONNX parity failed on {got.shape[0]} test users: max |torch-onnx| = {max_diff:.2e} "
            f"(tolerance {tol:g}), identical top-10 for {agree:.1%} of users"
        )
    section = {**signature, "opset": config.export.opset, "parity": {
        "users": record.users_checked, "max_abs_diff": max_diff, "top10_identical": agree, "tolerance": tol},
        "size_bytes": record.size_bytes, "latency_ms_p50_batch1_cpu": latency}
    return record, section


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


def _latency_ms(session: Any, one: dict[str, np.ndarray], runs: int = 50) -> float:
    session.run(["scores"], one)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(["scores"], one)
        times.append((time.perf_counter() - start) * 1000)
    return round(float(np.median(times)), 3)


def _write_vocab(data: RecBoleData, out_dir: Path) -> None:
    ds = data.dataset
    items = [str(t) for t in ds.field2id_token[ds.iid_field]]
    (out_dir / ITEM_VOCAB_FILE).write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
    users = [str(t) for t in ds.field2id_token[ds.uid_field]]
    (out_dir / USER_VOCAB_FILE).write_text(json.dumps(users, ensure_ascii=False), encoding="utf-8")
