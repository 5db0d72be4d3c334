"""recflow's hyper-parameter defaults where RecBole's were measured to be worse.

They sit under ``model.params`` (a preset or flag still wins) and above RecBole's model
YAML. Each entry names the measurement behind it (benchmarks/README.md, "Time to quality").
"""

from __future__ import annotations

from typing import Any

# SASRec: RecBole's dropout 0.5 is too strong on small data (RecBole issue 1289 found 0.2 better
# on ML-1M). ml-100k, all positions, 1 thread: valid NDCG@10 0.0706 at 0.2 vs 0.0684 at 0.5,
# early-stopped after 24 vs 35 epochs.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "sasrec": {"hidden_dropout_prob": 0.2, "attn_dropout_prob": 0.2},
}


def model_defaults(model_name: str) -> dict[str, Any]:
    """recflow's defaults for ``model_name`` (a copy; empty when RecBole's stand)."""
    return dict(MODEL_DEFAULTS.get(model_name.lower(), {}))
