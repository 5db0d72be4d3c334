from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from core.config import PipelineConfig
from core.modeling.dataset import RecBoleData
from core.modeling.export import export_model
from core.online.profile import profile_snapshot, write_profile
from core.records import DatasetSplits, Evaluation, ExportedModel, Snapshot, TrainedModel
from core.release.model_card import build_card, write_card


@task(name="export", cache_policy=NO_CACHE)
def export_task(
    config: PipelineConfig,
    snapshot: Snapshot,
    splits: DatasetSplits,
    trained: TrainedModel,
    evaluation: Evaluation,
    run_dir: Path,
    data: RecBoleData | None = None,
) -> ExportedModel:
    """Export the trained model; ``data``: the flow's RecBole data (None: export builds it)."""
    logger = get_run_logger()
    exported, section = export_model(config, splits, trained, run_dir, data=data)
    write_card(build_card(config, snapshot, splits, trained, evaluation, exported, section), exported.card_path)
    # The training data's profile travels with the version (register copies the export folder): drift baseline.
    write_profile(profile_snapshot(snapshot.path), exported.card_path.parent)
    if exported.exported:
        logger.info("ONNX export: %.1f KiB, parity max|diff| %.1e on %d users, top-10 identical %.0f%%, p50 %.2f ms",
                    (exported.size_bytes or 0) / 1024, exported.max_abs_diff or 0.0, exported.users_checked,
                    100 * (exported.top10_agreement or 0.0), exported.latency_ms_p50 or 0.0)
    else:
        # The reason names why and that the registry keeps the checkpoint (best.pth) instead.
        logger.warning("not exported to ONNX: %s", exported.reason)
    return exported
