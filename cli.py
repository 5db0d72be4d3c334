"""The ``recflow`` command line: thin over ``core`` and ``flows``.

Contract (scripts depend on it): ``recflow run`` exits 0 when the pipeline finished
(model promoted or rejected by the gate) and non-zero when it failed; user mistakes
print one line naming what is wrong, never a traceback. ``--summary-json`` writes the
machine-readable outcome either way.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from core.release.artifacts import CARD_FILE, CHECKSUMS_FILE  # the artifact contract: light, torch-free

app = typer.Typer(add_completion=False, no_args_is_help=True, help="recflow: train, gate and ship recommenders.")

# glibc malloc thresholds (see core.modeling.devices.MALLOC_TUNABLES) must be set before the process
# starts, so the CLI re-executes itself once with them.
_MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=4294967295"


def _reexec_with_malloc_tunables() -> None:
    if sys.platform != "linux" or "GLIBC_TUNABLES" in os.environ or os.environ.get("RECFLOW_NO_REEXEC"):
        return
    env = {**os.environ, "GLIBC_TUNABLES": _MALLOC_TUNABLES}
    try:
        os.execve(sys.executable, [sys.executable, sys.argv[0], *sys.argv[1:]], env)
    except OSError:
        return  # keep running without the tuning


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


class _HideUserErrorTracebacks(logging.Filter):
    """Prefect logs every task failure with a traceback; for a user's mistake one line is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        from core.errors import RecflowError

        if record.exc_info and isinstance(record.exc_info[1], RecflowError):
            record.exc_info = None
            record.exc_text = None
        # Prefect also formats the traceback into the message text itself.
        msg = record.getMessage() if record.args else str(record.msg)
        if "Traceback (most recent call last)" in msg and any(
            name in msg for name in ("DataValidationError", "DataSourceError", "ConfigError", "ModelNotFoundError",
                                     "PipelineFailed", "ExportError", "TrainingError", "RegistryError",
                                     "ShippingError", "HostKeyError", "ShippingAuthError", "ShippingConnectionError")
        ):
            record.msg = msg.split("\n", 1)[0]
            record.args = None
        return True


def _quiet_prefect_tracebacks() -> None:
    f = _HideUserErrorTracebacks()
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(f)


# Where the data comes from and what its columns are called: shared by `run` and `tune`.
_ConfigFileOpt = Annotated[Path | None, typer.Option("--config", help="YAML file or preset name, e.g. ml-100k-ease")]
_DataOpt = Annotated[Path | None, typer.Option("--data", help="CSV or Parquet file (default: ml-100k)")]
_UserColOpt = Annotated[str | None, typer.Option("--user-col", help="user id column in --data")]
_ItemColOpt = Annotated[str | None, typer.Option("--item-col", help="item id column in --data")]
_TimeColOpt = Annotated[str | None, typer.Option("--time-col", help="timestamp column (ISO or epoch seconds)")]
_RatingColOpt = Annotated[str | None, typer.Option("--rating-col", help="optional rating column")]
_SeparatorOpt = Annotated[str | None, typer.Option("--separator", help="CSV field separator (default ',')")]
_SourceOpt = Annotated[str | None, typer.Option("--source", help="file|ml-100k|postgres|supabase|synthetic")]
_DsnOpt = Annotated[str | None, typer.Option("--dsn", help="Postgres URL WITHOUT password (else use $RECFLOW_PG_DSN)")]
_DsnEnvOpt = Annotated[str | None, typer.Option("--dsn-env", help="env var holding the Postgres URL")]
_UrlOpt = Annotated[str | None, typer.Option("--url", help="Supabase project URL")]
_SupabaseKeyEnvOpt = Annotated[str | None, typer.Option("--key-env", help="env var holding the Supabase key")]
_TableOpt = Annotated[str | None, typer.Option("--table", help="table to read (default question_attempts)")]
_SinceOpt = Annotated[str | None, typer.Option("--since", help="only rows at or after this ISO time")]
_UntilOpt = Annotated[str | None, typer.Option("--until", help="only rows before this ISO time")]
_EpochsOpt = Annotated[int | None, typer.Option("--epochs", min=1, help="epoch cap (early stopping usually ends training first)")]
_DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto|cpu|cuda|mps")]


def _source_overrides(
    *, data: Path | None, user_col: str | None, item_col: str | None, time_col: str | None, rating_col: str | None,
    separator: str | None, source: str | None, dsn_env: str | None, url: str | None, key_env: str | None,
    table: str | None, since: str | None, until: str | None,
) -> dict[str, Any]:
    """The dotted config overrides of the source and column flags (None: not given, the preset's value)."""
    overrides: dict[str, Any] = {
        "columns.user": user_col,
        "columns.item": item_col,
        "columns.time": time_col,
        "columns.rating": rating_col,
        "source.separator": separator,
        "source.kind": source,
        "source.dsn_env": dsn_env,
        "source.url": url,
        "source.key_env": key_env,
        "source.table": table,
        "source.since": since,
        "source.until": until,
    }
    if data is not None:
        overrides |= {"source.kind": source or "file", "source.path": data}
    return overrides


def _load_run_config(config: Path | None, overrides: dict[str, Any], dsn: str | None, dsn_env: str | None) -> Any:
    """The config from --config and the flags, with the checks that need no data (model name,
    rating setup); raises ``RecflowError``."""
    from core.config import load_config
    from core.modeling.dataset import check_rating_setup
    from core.modeling.recbole_adapter import canonical_model_name

    if dsn is not None:
        _use_dsn_flag(dsn, dsn_env or "RECFLOW_PG_DSN")
    cfg = load_config(config, overrides)
    cfg.model.name = canonical_model_name(cfg.model.name)
    check_rating_setup(cfg)  # evaluation.task=rating with a model that only ranks: say so before any work
    return cfg


@app.command()
def run(
    config: _ConfigFileOpt = None,
    data: _DataOpt = None,
    user_col: _UserColOpt = None,
    item_col: _ItemColOpt = None,
    time_col: _TimeColOpt = None,
    rating_col: _RatingColOpt = None,
    separator: _SeparatorOpt = None,
    source: _SourceOpt = None,
    dsn: _DsnOpt = None,
    dsn_env: _DsnEnvOpt = None,
    url: _UrlOpt = None,
    key_env: _SupabaseKeyEnvOpt = None,
    table: _TableOpt = None,
    since: _SinceOpt = None,
    until: _UntilOpt = None,
    incremental: Annotated[bool | None, typer.Option("--incremental/--no-incremental", help="append only new rows to the snapshot store")] = None,
    full_refresh: Annotated[bool, typer.Option("--full-refresh", help="re-read everything, reset the watermark")] = False,
    store_dir: Annotated[Path | None, typer.Option("--store-dir", help="snapshot store (incremental)")] = None,
    model: Annotated[str | None, typer.Option("--model", help="any RecBole model name, e.g. SASRec, BPR")] = None,
    epochs: _EpochsOpt = None,
    max_minutes: Annotated[float | None, typer.Option("--max-minutes", help="training wall-time budget (default 15)")] = None,
    objective: Annotated[str | None, typer.Option("--objective", help="sequential models: all_positions (default) or last_item (RecBole's rows)")] = None,
    loss: Annotated[str | None, typer.Option("--loss", help="all_positions: ce (default), sampled_softmax or gbce")] = None,
    batch_size: Annotated[str | None, typer.Option("--batch-size", help="train batch rows, or 'auto' (largest that fits the GPU)")] = None,
    device: _DeviceOpt = None,
    registry: Annotated[Path | None, typer.Option("--registry", help="model registry folder")] = None,
    runs_dir: Annotated[Path | None, typer.Option("--runs-dir", help="where run folders go")] = None,
    summary_json: Annotated[Path | None, typer.Option("--summary-json", help="write the outcome as JSON")] = None,
) -> None:
    """Run extract -> validate -> train -> evaluate -> export -> register once."""
    from core.errors import RecflowError

    overrides = _source_overrides(
        data=data, user_col=user_col, item_col=item_col, time_col=time_col, rating_col=rating_col,
        separator=separator, source=source, dsn_env=dsn_env, url=url, key_env=key_env, table=table,
        since=since, until=until,
    ) | {
        "model.name": model,
        "training.epochs": epochs,
        "training.max_minutes": max_minutes,
        "training.objective": objective,
        "training.loss": loss,
        "training.train_batch_size": batch_size,  # validated (int or 'auto') by the config
        "training.device": device,
        "registry.path": registry,
        "runs_dir": runs_dir,
        "incremental.enabled": True if full_refresh else incremental,
        "incremental.full_refresh": True if full_refresh else None,
        "incremental.store_dir": store_dir,
    }
    summary: dict[str, Any] = {"status": "failed", "stage": "config", "error": None, "metrics": {},
                               "model_version": None, "registry": None}
    try:
        cfg = _load_run_config(config, overrides, dsn, dsn_env)
        summary["registry"] = str(cfg.registry.path.resolve())
        summary["stage"] = "extract"
        from core.data.extract import preflight

        preflight(cfg)
    except RecflowError as exc:
        summary["error"] = str(exc)
        _write_summary(summary_json, summary)
        _fail(str(exc))
        return
    code = _run_pipeline(cfg, summary)
    _write_summary(summary_json, summary)
    raise typer.Exit(code)


def _use_dsn_flag(dsn: str, env_name: str) -> None:
    """--dsn is for password-less URLs (peer/cert auth, PGPASSFILE); secrets stay in the environment."""
    from urllib.parse import urlsplit

    from core.errors import ConfigError

    try:
        has_password = bool(urlsplit(dsn).password)
    except ValueError:
        has_password = False
    if has_password or "password=" in dsn.lower():
        raise ConfigError(
            f"--dsn must not contain a password (it would show in shell history and process lists); "
            f"export the full URL as ${env_name} instead"
        )
    os.environ[env_name] = dsn


# --summary-json keeps its documented values: the register step is reported as "deploy", its name
# before the rename (flow, logs and notifications say "register"; README "--summary-json").
SUMMARY_STAGE_NAMES = {"register": "deploy"}


def _summary_stage(stage: str) -> str:
    return SUMMARY_STAGE_NAMES.get(stage, stage)


def _run_pipeline(cfg: Any, summary: dict[str, Any]) -> int:
    from core.errors import PipelineFailed
    from flows.training_pipeline import training_pipeline

    _quiet_prefect_tracebacks()
    state = training_pipeline(cfg, return_state=True)
    if state.is_completed():
        result = state.result()
        summary.update(
            status=result.status,
            stage=_summary_stage(result.stage),
            error=None,
            metrics={k: result.metrics[k] for k in ("test", "baseline", "test_seen_masked") if k in result.metrics},
            model_version=result.model_version,
            registry=str(result.registry),
            champion=result.champion,
            run_dir=str(result.run_dir),
            shipped=result.shipped,
        )
        _print_result(result)
        return 0
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, PipelineFailed):
        summary.update(stage=_summary_stage(exc.stage), error=exc.error, run_dir=exc.run_dir)
        typer.secho(f"error: {exc.stage} failed: {exc.error}", fg=typer.colors.RED, err=True)
        if exc.run_dir:
            typer.echo(f"run folder: {exc.run_dir}", err=True)
        typer.echo("champion unchanged.", err=True)
    else:
        summary.update(stage="unknown", error=str(exc))
        typer.secho(f"error: pipeline crashed: {exc}", fg=typer.colors.RED, err=True)
    return 1


def _print_result(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    test, base = result.metrics.get("test", {}), result.metrics.get("baseline", {})
    from core.config import VALUE_METRIC_NAMES

    rating = result.gate.metric in VALUE_METRIC_NAMES  # RMSE/MAE: the rating task
    table = Table(title="test metrics (rating, original scale)" if rating else "test metrics (full ranking)")
    table.add_column("metric")
    table.add_column("candidate", justify="right")
    table.add_column("train-mean baseline" if rating else "Pop baseline", justify="right")
    masked = result.metrics.get("test_seen_masked")
    if masked:  # sequential models: also scored as EASE/BPR are, seen items never recommended
        table.add_column("candidate, seen masked", justify="right")
    for key, value in test.items():
        extra = [f"{masked.get(key, float('nan')):.4f}"] if masked else []
        table.add_row(key, f"{value:.4f}", f"{base.get(key, float('nan')):.4f}", *extra)
    console.print(table)
    gate = result.gate
    verdict = "[green]PROMOTED[/green]" if result.status == "promoted" else "[yellow]REJECTED[/yellow]"
    console.print(f"gate on {gate.metric}: {verdict}")
    # Plain echo: rich would wrap long paths and versions mid-token.
    for reason in gate.reasons:
        typer.echo(f"  - {reason}")
    typer.echo(f"registered {result.model_version} in {result.registry}; champion: {result.champion}")
    if result.shipped:
        typer.echo(f"shipped {result.shipped} to the production host (its champion now)")
    typer.echo(f"run folder: {result.run_dir}")


def _write_summary(path: Path | None, summary: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=str))


@app.command()
def tune(
    space: Annotated[str, typer.Option("--space", help="search space YAML, or a shipped one by name: sasrec, bpr")],
    study: Annotated[str, typer.Option("--study", help="study name (studies/<name>/); the same name resumes it")],
    trials: Annotated[int, typer.Option("--trials", min=1, help="total complete + pruned trials of the study, across every process")],
    config: _ConfigFileOpt = None,
    timeout: Annotated[float | None, typer.Option("--timeout", help="minutes: this process starts no trial after")] = None,
    trial_minutes: Annotated[float | None, typer.Option("--trial-minutes", help="training time cap of each trial; default: --timeout shared among the trials and seed repeats, else 10")] = None,
    pruner: Annotated[str, typer.Option("--pruner", help="median|hyperband|none: stop trials whose valid metric lags")] = "median",
    storage_env: Annotated[str | None, typer.Option("--storage-env", help="env var holding the study database URL (PostgreSQL for several hosts); default: SQLite in studies/<name>/")] = None,
    studies_dir: Annotated[Path, typer.Option("--studies-dir", help="where study folders go")] = Path("studies"),
    seeds: Annotated[int, typer.Option("--seeds", min=0, help="re-run the preset and the best configuration with K seeds; report mean +- std")] = 0,
    pool: Annotated[list[str] | None, typer.Option("--pool", help="Prefect work pool to run trials on (repeatable, one trial per pool slot); default: in this process")] = None,
    promote: Annotated[bool, typer.Option("--promote", help="send the best model through the champion gate and registry")] = False,
    register_top: Annotated[int, typer.Option("--register-top", min=0, help="register the N best trials' models as variants (for A/B tests)")] = 0,
    gpu_cost_per_hour: Annotated[float | None, typer.Option("--gpu-cost-per-hour", min=0, help="price of a GPU-hour (a core-hour on CPU): the leaderboard's cost column")] = None,
    heartbeat_seconds: Annotated[int, typer.Option("--heartbeat-seconds", help="seconds between a running trial's heartbeats in the study storage")] = 60,
    grace_seconds: Annotated[int, typer.Option("--grace-seconds", help="a trial silent this long (its worker died) is failed and its parameters queued again")] = 180,
    data: _DataOpt = None,
    user_col: _UserColOpt = None,
    item_col: _ItemColOpt = None,
    time_col: _TimeColOpt = None,
    rating_col: _RatingColOpt = None,
    separator: _SeparatorOpt = None,
    source: _SourceOpt = None,
    dsn: _DsnOpt = None,
    dsn_env: _DsnEnvOpt = None,
    url: _UrlOpt = None,
    key_env: _SupabaseKeyEnvOpt = None,
    table: _TableOpt = None,
    since: _SinceOpt = None,
    until: _UntilOpt = None,
    epochs: _EpochsOpt = None,
    device: _DeviceOpt = None,
) -> None:
    """Search hyper-parameters with Optuna: the data once, then trials (pruned early when behind) until --trials."""
    from pydantic import ValidationError

    from core.errors import RecflowError

    overrides = _source_overrides(
        data=data, user_col=user_col, item_col=item_col, time_col=time_col, rating_col=rating_col,
        separator=separator, source=source, dsn_env=dsn_env, url=url, key_env=key_env, table=table,
        since=since, until=until,
    ) | {"training.epochs": epochs, "training.device": device}
    try:
        from core.data.extract import preflight
        from core.experiments.seeds import search_settings
        from core.experiments.space import check_space, load_space
        from core.experiments.study import StudySettings, open_study, study_direction, study_fingerprint

        settings = StudySettings(name=study, root=studies_dir, trials=trials, timeout_minutes=timeout,
                                 trial_minutes=trial_minutes, pruner=pruner, storage_env=storage_env, seeds=seeds,
                                 pools=pool or [], promote=promote, register_top=register_top,
                                 gpu_cost_per_hour=gpu_cost_per_hour, heartbeat_seconds=heartbeat_seconds,
                                 grace_seconds=grace_seconds)
        search_settings(settings)  # --timeout leaves time for the --seeds repeats
        cfg = _load_run_config(config, overrides, dsn, dsn_env)
        search = load_space(space)
        check_space(search, cfg)
        preflight(cfg)
        # Storage reachable, and a resumed study searching the same thing: before any data is read.
        open_study(settings, direction=study_direction(cfg), fingerprint=study_fingerprint(cfg, search))
    except ValidationError as exc:  # StudySettings: name the flag
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "study"
        flag = {"name": "study", "root": "studies-dir", "timeout_minutes": "timeout"}.get(field, field.replace("_", "-"))
        _fail(f"--{flag}: {first['msg'].removeprefix('Value error, ')}")
        return
    except RecflowError as exc:
        _fail(str(exc))
        return
    from flows.tuning_pipeline import tuning_pipeline

    _quiet_prefect_tracebacks()
    state = tuning_pipeline(cfg, search, settings, return_state=True)
    if not state.is_completed():
        exc_ = state.result(raise_on_failure=False)
        typer.secho(f"error: {exc_}", fg=typer.colors.RED, err=True)
        typer.echo(f"study folder: {settings.dir} (re-run the same command to resume)", err=True)
        raise typer.Exit(1)
    _print_study(state.result())


def _print_study(report: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    metric = report.metric
    table = Table(title=f"study {report.study}: {report.counted} trials (complete + pruned), {report.failed} failed; "
                        f"valid/test {metric}")
    for name in ("trial", "state", "valid", "test", "epochs", "min"):
        table.add_column(name, justify="left" if name == "state" else "right", no_wrap=True)
    table.add_column("parameters", overflow="fold")
    fixed = {"trial", "state", "preset", "cost", f"valid_{metric}", f"test_{metric}", "epochs", "minutes", "device", "core_hours",
             "gpu_hours", "stop_reason", "error"}

    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for row in report.leaderboard[:20]:
        params = ", ".join(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                           for k, v in row.items() if k not in fixed)
        table.add_row(f"{row['trial']}{' preset' if row.get('preset') else ''}", row["state"].lower(), num(row[f"valid_{metric}"], ".4f"),
                      num(row[f"test_{metric}"], ".4f"), num(row["epochs"], "d"), num(row["minutes"], ".1f"), params)
    # Piped output gets rich's 80 columns otherwise, and the parameters fold into slivers.
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    if len(report.leaderboard) > 20:
        typer.echo(f"... {len(report.leaderboard) - 20} more in the CSV")
    cost = f"{report.gpu_hours:.3f} GPU-hours" if report.gpu_hours else f"{report.core_hours:.3f} core-hours"
    money = f", cost {report.cost:.2f} at the given price per hour" if report.cost is not None else ""
    typer.echo(f"{report.minutes:.1f} trial-minutes, {cost}{money}")
    if report.seeds is not None:
        from core.experiments.seeds import format_summary

        s = report.seeds
        typer.echo(f"seed repeats, test {s.metric} (seeds {', '.join(map(str, s.best.seeds))}):")
        typer.echo(f"  preset: {format_summary(s.preset)}")
        typer.echo(f"  best:   {format_summary(s.best)}")
        typer.echo(f"  {s.verdict}")
    if report.ensemble:
        typer.echo(report.ensemble)
    for version in report.registered:
        typer.echo(f"registered: {version}")
    typer.echo(f"leaderboard: {report.leaderboard_csv}")
    for png in report.plots:
        typer.echo(f"plot: {png}")
    for name, why in report.skipped_plots.items():
        typer.echo(f"plot {name}: not drawn ({why})")
    if report.best_yaml:
        typer.echo(f"best configuration (trial {report.best_trial}): {report.best_yaml}")
        typer.echo(f"  train it: recflow run --config {report.best_yaml}")
    typer.echo(f"study folder: {report.dir} (the same command resumes it; --trials is the study's total)")


@app.command()
def recommend(
    name: Annotated[str, typer.Argument(help="registry entry, e.g. ml-100k-sasrec")],
    items: Annotated[str | None, typer.Option("--items", help="the user's history, oldest first, comma-separated")] = None,
    user: Annotated[str | None, typer.Option("--user", help="user id (non-sequential models)")] = None,
    k: Annotated[int, typer.Option("-k", min=1)] = 10,
    registry: Annotated[Path, typer.Option("--registry")] = Path("registry"),
    version: Annotated[str | None, typer.Option("--version", help="default: the champion")] = None,
    include_seen: Annotated[bool, typer.Option("--include-seen", help="allow items already in the history")] = False,
) -> None:
    """Score with a registered model (the champion by default) through onnxruntime."""
    from core.errors import RecflowError
    from core.release.artifacts import MODEL_FILE, read_checksums
    from core.release.registry import Registry
    from core.serving.scorer import OnnxScorer

    try:
        reg = Registry(registry)
        chosen = version or reg.champion_version(name)
        if chosen is None:
            _fail(f"{name} has no champion in {registry} (versions: {', '.join(reg.versions(name)) or 'none'})")
        version_dir = reg.entry(name) / str(chosen)
        if (version_dir / CARD_FILE).is_file() and not (version_dir / MODEL_FILE).is_file():
            # Registered without ONNX (e.g. UserKNN, FM with extra features): the card says why.
            reason = reg.card(name, str(chosen)).get("export", {}).get("reason") or "not exported"
            _fail(f"{name} {chosen} has no ONNX model to score with: {reason}")
        # Verified like serving when the version has checksums (older ones load unverified).
        scorer = OnnxScorer(version_dir, checksums=read_checksums(version_dir, allow_unverified=True))
        history = [i.strip() for i in (items or "").split(",") if i.strip()]
        recs = scorer.recommend(history, k, user=user, exclude_seen=not include_seen)
    except (RecflowError, KeyError) as exc:
        _fail(str(exc).strip("'\""))
        return
    typer.echo(f"{name} {chosen}:")
    for rank, rec in enumerate(recs, 1):
        typer.echo(f"{rank:>3}  {rec.item:<20} {rec.score:.4f}")


@app.command()
def serve(
    model: Annotated[str | None, typer.Option("--model", help="registry entry to serve (default: the only one)")] = None,
    registry: Annotated[Path, typer.Option("--registry", help="model registry folder")] = Path("registry"),
    host: Annotated[str, typer.Option("--host", help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
    workers: Annotated[int, typer.Option("--workers", min=1, help="worker processes (about one per core)")] = 1,
    poll_seconds: Annotated[float, typer.Option("--poll-seconds", min=0.0, help="how often to look for a new champion (0: never)")] = 2.0,
    max_history: Annotated[int | None, typer.Option("--max-history", min=1, help="longest accepted history (default 10 x max_seq_length)")] = None,
    allow_unverified: Annotated[bool, typer.Option("--allow-unverified", help=f"serve versions that have no {CHECKSUMS_FILE}")] = False,
    arm: Annotated[list[str] | None, typer.Option("--arm", help="A/B arm ENTRY[:VERSION]=WEIGHT (repeatable; version: the entry's champion); needs --log-dir")] = None,
    shadow: Annotated[list[str] | None, typer.Option("--shadow", help="ENTRY[:VERSION] scored on every request and logged, never returned (repeatable); needs --log-dir")] = None,
    log_dir: Annotated[Path | None, typer.Option("--log-dir", help="outcome log, experiment record and assignment key (docs/serving-experiments.md)")] = None,
) -> None:
    """Serve the champion over HTTP: POST /recommendations, GET /healthz, docs at /docs; hot-swaps new champions."""
    import uvicorn

    from core.errors import RecflowError
    from core.serving import app as serving

    if not registry.is_dir():
        _fail(f"no registry folder {registry} (pass --registry DIR)")
    try:
        model, experiment_id = _serve_experiment(registry, model, arm or [], shadow or [], log_dir)
    except RecflowError as exc:
        _fail(str(exc))
        return
    if model is None:
        entries = serving.list_entries(registry)
        if len(entries) != 1:
            _fail(f"pass --model: {registry} holds {len(entries)} entries ({', '.join(entries) or 'none'})")
        model = entries[0]
    try:
        # Loaded (and checksum-verified) here, before any port is bound, so a bad champion is one line.
        web = serving.create_app(registry, model, poll_seconds=poll_seconds, allow_unverified=allow_unverified,
                                 max_history=max_history, log_dir=log_dir, experiment_id=experiment_id)
    except RecflowError as exc:
        _fail(str(exc))
        return
    served = web.state.watcher.current
    typer.echo(f"serving {model} {served.version} on http://{host}:{port} (docs: /docs, health: /healthz)", err=True)
    log_config = {**uvicorn.config.LOGGING_CONFIG}
    log_config["loggers"] = {**log_config["loggers"],
                             "recflow.serving": {"handlers": ["default"], "level": "INFO", "propagate": False}}
    common: dict[str, Any] = {"host": host, "port": port, "access_log": False, "log_config": log_config}
    if workers == 1:
        serving.tune_gc_for_serving()
        uvicorn.run(web, **common)
        return
    # Each worker process builds its own app from these settings (uvicorn imports the factory).
    del web
    os.environ |= {serving.ENV_REGISTRY: str(registry.resolve()), serving.ENV_MODEL: model,
                   serving.ENV_POLL: str(poll_seconds), serving.ENV_ALLOW_UNVERIFIED: "1" if allow_unverified else "0"}
    if max_history is not None:
        os.environ[serving.ENV_MAX_HISTORY] = str(max_history)
    if log_dir is not None:
        os.environ[serving.ENV_LOG_DIR] = str(log_dir.resolve())
    if experiment_id is not None:
        os.environ[serving.ENV_EXPERIMENT] = experiment_id
    uvicorn.run("core.serving.app:app_from_env", factory=True, workers=workers, **common)


def _serve_experiment(registry: Path, model: str | None, arms: list[str], shadows: list[str],
                      log_dir: Path | None) -> tuple[str | None, str | None]:
    """(the --model to serve, the experiment id) for `recflow serve`; starts or resumes the experiment record."""
    from core.serving.app import list_entries
    from core.serving.arms import ArmSpec, ExperimentStore, parse_arm

    if not (arms or shadows):
        if log_dir is not None:  # the record must not claim an experiment this server does not run
            store = ExperimentStore(log_dir)
            running = store.load()
            if running is not None and running.running:
                store.stop_running("recflow serve started without --arm/--shadow")
                typer.echo(f"experiment {running.id} stopped (this serve has no --arm/--shadow)", err=True)
        return model, None
    if log_dir is None:
        _fail("--arm and --shadow need --log-dir DIR (the experiment record and the outcome log live there)")
    specs = [parse_arm(a) for a in arms] + [parse_arm(s, shadow=True) for s in shadows]
    if model is None:
        model = specs[0].entry  # the first arm's entry: its champion answers requests without a session
    if not arms:  # shadow mode: the champion is the one live arm
        specs.insert(0, ArmSpec(name=model, entry=model, version=None, weight=1.0))
    for spec in specs:  # checked before the record is written (loading them comes next)
        if not (registry / spec.entry).is_dir():
            _fail(f"no registry entry {spec.entry!r} in {registry} (entries: {', '.join(list_entries(registry)) or 'none'})")
        if spec.version and not (registry / spec.entry / spec.version).is_dir():
            _fail(f"{spec.entry}/{spec.version} does not exist in {registry}")
    experiment, resumed = ExperimentStore(log_dir).start_or_resume(specs)
    live = ", ".join(f"{a.name}={a.weight:g}" for a in experiment.arms if not a.shadow)
    shadowed = ", ".join(a.name for a in experiment.arms if a.shadow)
    typer.echo(f"experiment {experiment.id} {'resumed' if resumed else 'started'}: {live}"
               f"{f'; shadow: {shadowed}' if shadowed else ''}; log: {log_dir}", err=True)
    return model, experiment.id


@app.command()
def experiment(
    log_dir: Annotated[Path, typer.Option("--log-dir", help="the --log-dir of the running recflow serve")],
    weight: Annotated[list[str] | None, typer.Option("--weight", help="ARM=WEIGHT: new weight of a live arm (repeatable; 0 pauses it)")] = None,
    stop: Annotated[bool, typer.Option("--stop", help="kill switch: stop the experiment, everyone gets the champion")] = False,
) -> None:
    """Show, re-weight or stop the A/B experiment of a running `recflow serve` (no restart: it re-reads the record)."""
    from core.errors import RecflowError
    from core.serving.arms import ExperimentStore, parse_weight

    store = ExperimentStore(log_dir)
    try:
        if weight and stop:
            _fail("pass --weight or --stop, not both")
        if stop:
            exp = store.stop_running("recflow experiment --stop")
        elif weight:
            exp = store.set_weights(dict(parse_weight(w) for w in weight))
        else:
            exp = store.load()
    except RecflowError as exc:
        _fail(str(exc))
        return
    if exp is None:
        _fail(f"no experiment record in {log_dir}")
        return
    state = f"stopped at {exp.stopped_at}" if exp.stopped_at else "running"
    typer.echo(f"experiment {exp.id} ({state}; started {exp.started_at})")
    for a in exp.arms:
        target = f"{a.entry}:{a.version}" if a.version else f"{a.entry} (champion)"
        typer.echo(f"  {a.name:<30} {'shadow' if a.shadow else f'weight {a.weight:g}':<14} {target}")


data_app = typer.Typer(no_args_is_help=True, help="Data utilities.")
app.add_typer(data_app, name="data")


@data_app.command("synth")
def data_synth(
    users: Annotated[int, typer.Option("--users", help="learners to generate (at least 2)")] = 300,
    out: Annotated[Path, typer.Option("--out", help="CSV or Parquet file to write (by extension)")] = Path("question_attempts.csv"),
    seed: Annotated[int, typer.Option("--seed")] = 0,
    questions: Annotated[int, typer.Option("--questions", help="questions in the bank, spread over 20 subtopics")] = 160,
    attempts_per_user: Annotated[float, typer.Option("--attempts-per-user", help="mean attempts per learner (spread 0.4x to 1.6x)")] = 37.5,
) -> None:
    """Write question_attempts-shaped data with learnable curricula, for demos, tests and benchmarks.

    Realistic size: --users 22000 --questions 8000 --attempts-per-user 39 (about 860k attempts).
    """
    from core.data.sources.synthetic import write_question_bank
    from core.errors import RecflowError

    if users < 2:
        _fail(f"--users must be at least 2, got {users}")
    if questions < 1:
        _fail(f"--questions must be at least 1, got {questions}")
    if not attempts_per_user >= 1:  # also NaN
        _fail(f"--attempts-per-user must be at least 1, got {attempts_per_user}")
    try:
        written = write_question_bank(users, out, seed=seed, questions=questions, attempts_per_user=attempts_per_user)
    except RecflowError as exc:
        _fail(str(exc))
        return
    except OSError as exc:
        _fail(f"cannot write {out}: {exc.strerror or exc}")
        return
    typer.echo(f"wrote {written.rows} question attempts by {written.learners} learners "
               f"over {written.questions} questions (bank of {written.bank_size}) to {out}")
    typer.echo(f"train on it: recflow run --config question-attempts --data {out}")


@app.command()
def deploy(
    api_url: Annotated[str | None, typer.Option("--api-url", help="Prefect API, e.g. http://gpu-host:4200/api (default: PREFECT_API_URL)")] = None,
    pool: Annotated[str, typer.Option("--pool", help="process work pool on the GPU host")] = "gpu",
    config: Annotated[Path | None, typer.Option("--config", help="YAML file or preset name both deployments default to")] = None,
    cron: Annotated[str, typer.Option("--cron", help="nightly schedule")] = "0 2 * * *",
    timezone: Annotated[str, typer.Option("--timezone", help="IANA zone of --cron, e.g. Europe/Berlin")] = "UTC",
    gpu: Annotated[str, typer.Option("--gpu", help="CUDA_VISIBLE_DEVICES for the runs, e.g. 0 or 0,1")] = "0",
    project_dir: Annotated[Path | None, typer.Option("--project-dir", help="checkout (or, with recflow installed, working directory) on the worker host (default: this checkout, else the current directory)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="config override KEY=VALUE, e.g. training.epochs=5 (repeatable)")] = None,
    trial_pool: Annotated[list[str] | None, typer.Option("--trial-pool", help="GPU pool that gets a tuning-trial deployment for `recflow tune --pool` (repeatable; default: --pool)")] = None,
    driver_pool: Annotated[str, typer.Option("--driver-pool", help="process pool of the tuning-pipeline/tune deployment (no GPU, no concurrency limit)")] = "cpu",
) -> None:
    """Create or update the `gpu` work pool and the training-pipeline/nightly and /adhoc deployments."""
    import yaml

    from core.errors import RecflowError
    from deployments.deploy import CHECKOUT, DeploySettings
    from deployments.deploy import deploy as run_deploy

    if api_url is None:
        from prefect.settings import PREFECT_API_URL

        api_url = PREFECT_API_URL.value()
    if not api_url:
        _fail("no Prefect server: pass --api-url http://HOST:4200/api or set PREFECT_API_URL")
        return
    overrides: dict[str, Any] = {}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--set {item!r} must look like KEY=VALUE, e.g. training.epochs=5")
        overrides[key.strip()] = yaml.safe_load(value)
    settings = DeploySettings(api_url=api_url, pool=pool, config_path=config, cron=cron, timezone=timezone,
                              gpu=gpu, project_dir=project_dir or CHECKOUT or Path.cwd(), overrides=overrides,
                              trial_pools=tuple(trial_pool or ()), driver_pool=driver_pool)
    try:
        result = run_deploy(settings)
    except RecflowError as exc:
        _fail(str(exc))
        return
    typer.echo(f"work pool {result.pool!r} ({'created' if result.pool_created else 'updated'}; process, concurrency 1) "
               f"at {result.api_url}")
    for name, dep_id in result.deployments.items():
        typer.echo(f"deployment {name}: {dep_id}")
    typer.echo(f"nightly: '{cron}' ({timezone}); runs {result.entrypoint} in {result.project_dir} on the worker host")
    typer.echo(f"start a worker on the GPU host: PREFECT_API_URL={result.api_url} prefect worker start --pool {result.pool}")
    typer.echo(f"tuning: trials on {', '.join(result.trial_pools)} (a worker per pool); the tune deployment's driver on "
               f"{result.driver_pool}: prefect worker start --pool {result.driver_pool}")


# --- the production host (SFTP; core/release/shipping/sftp.py) -----------------------------------------
# Target settings come from --config's `shipping:` section, each overridable by a flag. Exit 2:
# a mistake found before connecting (config, local registry, key); exit 1: the host step failed.
_ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML with a `shipping:` section")]
_HostOpt = Annotated[str | None, typer.Option("--host", help="production host (shipping.host)")]
_PortOpt = Annotated[int | None, typer.Option("--port", min=1, max=65535, help="SSH port (shipping.port)")]
_UserOpt = Annotated[str | None, typer.Option("--user", help="SSH user (shipping.username)")]
_DirOpt = Annotated[str | None, typer.Option("--remote-dir", help="absolute directory on the host")]
_KnownOpt = Annotated[Path | None, typer.Option("--known-hosts", help="known_hosts file (default ~/.ssh/known_hosts)")]
_KeyEnvOpt = Annotated[str | None, typer.Option("--key-env", help="env var holding the key file path or text")]


def _shipping_target(config: Path | None, registry: Path | None, flags: dict[str, Any]) -> tuple[Any, Any]:
    """(PipelineConfig, paramiko key) or exit 2 naming what is missing."""
    import logging as _logging

    from core.config import load_config
    from core.errors import RecflowError
    from core.release.shipping import load_private_key

    # paramiko logs transport errors with tracebacks on its own; our errors say it in one line.
    _logging.getLogger("paramiko").setLevel(_logging.CRITICAL)
    ship_log = _logging.getLogger("recflow.shipping")
    if not ship_log.handlers:
        handler = _logging.StreamHandler(sys.stderr)
        handler.setFormatter(_logging.Formatter("%(message)s"))
        ship_log.addHandler(handler)
        ship_log.setLevel(_logging.INFO)
    overrides = {f"shipping.{k}": v for k, v in flags.items()} | {"registry.path": registry}
    try:
        cfg = load_config(config, overrides)
        missing = [f"--{flag} (shipping.{field})" for flag, field in
                   (("host", "host"), ("user", "username"), ("remote-dir", "remote_dir"))
                   if not getattr(cfg.shipping, field)]
        if missing:
            _fail(f"no production host configured: set {', '.join(missing)}")
        key = load_private_key(cfg.shipping, secret_loader=_secret_loader() if cfg.shipping.key_secret_block else None)
    except RecflowError as exc:
        _fail(str(exc))
        raise  # unreachable: _fail exits
    return cfg, key


def _secret_loader() -> Any:
    from tasks._common import load_prefect_secret  # imports Prefect: only when a block is configured

    return load_prefect_secret


def _target_flags(host: str | None, port: int | None, user: str | None, remote_dir: str | None,
                  known_hosts: Path | None, key_env: str | None) -> dict[str, Any]:
    return {"host": host, "port": port, "username": user, "remote_dir": remote_dir, "known_hosts": known_hosts,
            "key_env": key_env}


@app.command()
def ship(
    name: Annotated[str, typer.Argument(help="registry entry, e.g. ml-100k-sasrec")],
    version: Annotated[str | None, typer.Option("--version", help="default: the local champion")] = None,
    registry: Annotated[Path | None, typer.Option("--registry", help="local model registry folder")] = None,
    config: _ConfigOpt = None, host: _HostOpt = None, port: _PortOpt = None, user: _UserOpt = None,
    remote_dir: _DirOpt = None, known_hosts: _KnownOpt = None, key_env: _KeyEnvOpt = None,
) -> None:
    """Ship a registered version (the local champion by default) to the production host as its champion."""
    from core.errors import RecflowError, ShippingError
    from core.release.registry import Registry
    from core.release.shipping import ship_version

    cfg, key = _shipping_target(config, registry, _target_flags(host, port, user, remote_dir, known_hosts, key_env))
    try:
        reg = Registry(cfg.registry.path)
        chosen = version or reg.champion_version(name)
    except RecflowError as exc:
        _fail(str(exc))
        return
    if chosen is None:
        _fail(f"{name} has no champion in {cfg.registry.path} (versions: {', '.join(reg.versions(name)) or 'none'}); "
              f"pass --version")
        return
    if not (reg.entry(name) / chosen).is_dir():
        _fail(f"version {chosen} of {name} is not in {cfg.registry.path} "
              f"(versions: {', '.join(reg.versions(name)) or 'none'})")
        return
    try:
        result = ship_version(reg.entry(name) / chosen, name, chosen, cfg.shipping, pkey=key)
    except ShippingError as exc:
        _fail(str(exc), 1)
        return
    sent = f"{result.bytes / 1e6:.1f} MB sent" if result.uploaded else "already there, verified"
    typer.echo(f"shipped {name} {chosen} to {result.host}:{result.model_dir} ({result.files} files, {sent}, "
               f"SHA-256 checked on the host)")
    typer.echo(f"host champion: {result.champion} (was {result.previous_champion or 'none'})")
    if result.pruned or result.stale_removed:
        typer.echo(f"removed: {', '.join(result.pruned + result.stale_removed)}")


@app.command()
def rollback(
    name: Annotated[str, typer.Argument(help="registry entry, e.g. ml-100k-sasrec")],
    to: Annotated[str | None, typer.Option("--to", help="version to serve (default: the previous champion)")] = None,
    config: _ConfigOpt = None, host: _HostOpt = None, port: _PortOpt = None, user: _UserOpt = None,
    remote_dir: _DirOpt = None, known_hosts: _KnownOpt = None, key_env: _KeyEnvOpt = None,
) -> None:
    """Point the production host's champion back at the previous (or a given) shipped version."""
    from core.errors import ShippingError
    from core.release.shipping import rollback as remote_rollback

    cfg, key = _shipping_target(config, None, _target_flags(host, port, user, remote_dir, known_hosts, key_env))
    try:
        result = remote_rollback(name, cfg.shipping, to_version=to, pkey=key)
    except ShippingError as exc:
        _fail(str(exc), 1)
        return
    if result.changed:
        typer.echo(f"{name} on {result.host}: champion {result.previous_champion or 'none'} -> {result.champion}")
    else:
        typer.echo(f"{name} on {result.host}: champion is already {result.champion}; nothing changed")


@app.command("remote-status")
def remote_status_cmd(
    name: Annotated[str, typer.Argument(help="registry entry, e.g. ml-100k-sasrec")],
    config: _ConfigOpt = None, host: _HostOpt = None, port: _PortOpt = None, user: _UserOpt = None,
    remote_dir: _DirOpt = None, known_hosts: _KnownOpt = None, key_env: _KeyEnvOpt = None,
) -> None:
    """List the versions on the production host, oldest first; '*' marks its champion."""
    from core.errors import ShippingError
    from core.release.shipping import remote_status

    cfg, key = _shipping_target(config, None, _target_flags(host, port, user, remote_dir, known_hosts, key_env))
    try:
        status = remote_status(name, cfg.shipping, pkey=key)
    except ShippingError as exc:
        _fail(str(exc), 1)
        return
    typer.echo(f"{name} on {status.host}:{status.model_dir}; champion: {status.champion or 'none'}")
    for v in status.versions:
        mark = "*" if v.version == status.champion else " "
        typer.echo(f"{mark} {v.version:<28} {v.shipped_at or '?':<34} {v.files:>3} files {v.bytes / 1e6:8.1f} MB")
    for name_ in status.incoming:
        typer.echo(f"  {name_} (unfinished upload; the next ship removes it)")


@app.command()
def models() -> None:
    """List the RecBole model names recflow can train."""
    from core.modeling.recbole_adapter import available_models

    for name in sorted(available_models().values()):
        typer.echo(name)


@app.command("ab-report")
def ab_report_cmd(
    log_dir: Annotated[Path, typer.Option("--log-dir", help="the serving log folder (requests/, events/, experiment.json)")],
    attempts: Annotated[Path | None, typer.Option("--attempts", help="question_attempts CSV/Parquet (columns user_id, question_id, created_at, is_correct)")] = None,
    window: Annotated[float, typer.Option("--window", help="hours after a request in which an attempt counts")] = 24.0,
    experiment: Annotated[str | None, typer.Option("--experiment", help="experiment id (default: the only one in the log)")] = None,
    record: Annotated[Path | None, typer.Option("--record", help="experiment record JSON (default: <log-dir>/experiment.json)")] = None,
    control: Annotated[str | None, typer.Option("--control", help="arm the others are compared with (default: the record's first)")] = None,
    registry: Annotated[Path | None, typer.Option("--registry", help="registry holding the served versions' data profiles (drift)")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="report folder (default: <log-dir>/ab-report)")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="also write the report as JSON here")] = None,
    pseudonymize: Annotated[bool | None, typer.Option("--pseudonymize/--no-pseudonymize", help="hash the attempts' learner ids with the extract's key (default: as the extract does for the source)")] = None,
    alpha: Annotated[float, typer.Option("--alpha", help="1 - confidence of the intervals")] = 0.05,
    max_unknown_share: Annotated[float, typer.Option("--max-unknown-share", help="drift: warn above this share of unknown items")] = 0.05,
    max_item_psi: Annotated[float, typer.Option("--max-item-psi", help="drift: warn above this item-popularity PSI")] = 0.2,
    max_history_psi: Annotated[float, typer.Option("--max-history-psi", help="drift: warn above this history-length PSI")] = 0.2,
    trigger_nightly: Annotated[bool, typer.Option("--trigger-nightly", help="start the nightly deployment when drift warns")] = False,
    nightly_deployment: Annotated[str, typer.Option("--nightly-deployment", help="deployment --trigger-nightly starts")] = "training-pipeline/nightly",
    config: _ConfigFileOpt = None,
    source: _SourceOpt = None,
    dsn: _DsnOpt = None,
    dsn_env: _DsnEnvOpt = None,
    url: _UrlOpt = None,
    key_env: _SupabaseKeyEnvOpt = None,
    table: _TableOpt = None,
    since: _SinceOpt = None,
    until: _UntilOpt = None,
    user_col: _UserColOpt = None,
    item_col: _ItemColOpt = None,
    time_col: _TimeColOpt = None,
) -> None:
    """A/B report from the serving log: per-arm hit rate and correctness (per-learner CIs), differences, SRM, drift."""
    from pydantic import ValidationError

    from core.config import QUESTION_ATTEMPTS_COLUMNS, NotifyConfig, load_config
    from core.errors import RecflowError
    from core.online.outcomes import read_events, read_requests
    from core.online.settings import ABReportSettings, DriftThresholds

    overrides = _source_overrides(
        data=attempts, user_col=user_col, item_col=item_col, time_col=time_col, rating_col=None, separator=None,
        source=source, dsn_env=dsn_env, url=url, key_env=key_env, table=table, since=since, until=until,
    ) | {"privacy.pseudonymize": pseudonymize}
    if config is None:  # attempts files default to question_attempts' column names
        for field in ("user", "item", "time"):
            overrides[f"columns.{field}"] = overrides[f"columns.{field}"] or QUESTION_ATTEMPTS_COLUMNS[field]
    try:
        if dsn is not None:
            _use_dsn_flag(dsn, dsn_env or "RECFLOW_PG_DSN")
        cfg = load_config(config, overrides) if (attempts or source or config) else None
        if cfg is not None and cfg.source.kind == "file" and cfg.source.path and not cfg.source.path.is_file():
            _fail(f"--attempts: no file {cfg.source.path}")
        read_requests(log_dir)  # a missing or empty log: one line, before Prefect starts
        if record is not None and not record.is_file():
            _fail(f"--record: no file {record}")
        if cfg is None and read_events(log_dir).height == 0:
            _fail(f"no outcomes: {log_dir} has no events; pass --attempts FILE (question_attempts) or source flags")
        settings = ABReportSettings(
            log_dir=log_dir, out_dir=out or log_dir / "ab-report", attempts=cfg, window_hours=window,
            experiment=experiment, record=record, registry=registry, control=control, alpha=alpha,
            drift=DriftThresholds(unknown_share=max_unknown_share, item_psi=max_item_psi, history_psi=max_history_psi),
            trigger_nightly=trigger_nightly, nightly_deployment=nightly_deployment,
            notify=cfg.notify if cfg is not None else NotifyConfig(),
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][-1])
        flag = {"window_hours": "window", "unknown_share": "max-unknown-share", "item_psi": "max-item-psi",
                "history_psi": "max-history-psi"}.get(field, field.replace("_", "-"))
        _fail(f"--{flag}: {first['msg'].removeprefix('Value error, ')}")
        return
    except RecflowError as exc:
        _fail(str(exc))
        return
    from flows.ab_report import ab_report

    _quiet_prefect_tracebacks()
    state = ab_report(settings, return_state=True)
    if not state.is_completed():
        exc_ = state.result(raise_on_failure=False)
        _fail(str(exc_), 2 if isinstance(exc_, RecflowError) else 1)
    report = state.result()
    typer.echo(Path(report.files["markdown"]).read_text())
    for kind, path in report.files.items():
        typer.echo(f"{kind}: {path}")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(report.model_dump_json(indent=2))


def main() -> None:
    _reexec_with_malloc_tunables()
    app()


if __name__ == "__main__":
    main()
