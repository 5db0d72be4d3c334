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
from typing import Annotated, Any, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="recflow: train, gate and ship recommenders.")

# glibc's default malloc thresholds make torch's CPU training return and re-fault memory
# every step; raising them cut a SASRec epoch ~20% here. They must be set before the
# process starts, so the CLI re-executes itself once with them.
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
                                     "PipelineFailed", "ExportError", "TrainingError", "RegistryError")
        ):
            record.msg = msg.split("\n", 1)[0]
            record.args = None
        return True


def _quiet_prefect_tracebacks() -> None:
    f = _HideUserErrorTracebacks()
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(f)


@app.command()
def run(
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML preset, e.g. configs/ml-100k-sasrec.yaml")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="CSV or Parquet file (default: ml-100k)")] = None,
    user_col: Annotated[Optional[str], typer.Option("--user-col", help="user id column in --data")] = None,
    item_col: Annotated[Optional[str], typer.Option("--item-col", help="item id column in --data")] = None,
    time_col: Annotated[Optional[str], typer.Option("--time-col", help="timestamp column (ISO or epoch seconds)")] = None,
    rating_col: Annotated[Optional[str], typer.Option("--rating-col", help="optional rating column")] = None,
    separator: Annotated[Optional[str], typer.Option("--separator", help="CSV field separator (default ',')")] = None,
    source: Annotated[Optional[str], typer.Option("--source", help="file|ml-100k|postgres|supabase|synthetic")] = None,
    dsn: Annotated[Optional[str], typer.Option("--dsn", help="Postgres URL WITHOUT password (else use $RECFLOW_PG_DSN)")] = None,
    dsn_env: Annotated[Optional[str], typer.Option("--dsn-env", help="env var holding the Postgres URL")] = None,
    url: Annotated[Optional[str], typer.Option("--url", help="Supabase project URL")] = None,
    key_env: Annotated[Optional[str], typer.Option("--key-env", help="env var holding the Supabase key")] = None,
    table: Annotated[Optional[str], typer.Option("--table", help="table to read (default question_attempts)")] = None,
    since: Annotated[Optional[str], typer.Option("--since", help="only rows at or after this ISO time")] = None,
    until: Annotated[Optional[str], typer.Option("--until", help="only rows before this ISO time")] = None,
    incremental: Annotated[Optional[bool], typer.Option("--incremental/--no-incremental", help="append only new rows to the snapshot store")] = None,
    full_refresh: Annotated[bool, typer.Option("--full-refresh", help="re-read everything, reset the watermark")] = False,
    store_dir: Annotated[Optional[Path], typer.Option("--store-dir", help="snapshot store (incremental)")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="any RecBole model name, e.g. SASRec, BPR")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1)] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto|cpu|cuda|mps")] = None,
    registry: Annotated[Optional[Path], typer.Option("--registry", help="model registry folder")] = None,
    runs_dir: Annotated[Optional[Path], typer.Option("--runs-dir", help="where run folders go")] = None,
    summary_json: Annotated[Optional[Path], typer.Option("--summary-json", help="write the outcome as JSON")] = None,
) -> None:
    """Run extract -> validate -> train -> evaluate -> export -> deploy once."""
    from core.errors import RecflowError

    overrides: dict[str, Any] = {
        "columns.user": user_col,
        "columns.item": item_col,
        "columns.time": time_col,
        "columns.rating": rating_col,
        "source.separator": separator,
        "model.name": model,
        "training.epochs": epochs,
        "training.device": device,
        "registry.path": registry,
        "runs_dir": runs_dir,
        "source.kind": source,
        "source.dsn_env": dsn_env,
        "source.url": url,
        "source.key_env": key_env,
        "source.table": table,
        "source.since": since,
        "source.until": until,
        "incremental.enabled": True if full_refresh else incremental,
        "incremental.full_refresh": True if full_refresh else None,
        "incremental.store_dir": store_dir,
    }
    if data is not None:
        overrides |= {"source.kind": source or "file", "source.path": data}
    summary: dict[str, Any] = {"status": "failed", "stage": "config", "error": None, "metrics": {},
                               "model_version": None, "registry": None}
    try:
        from core.config import load_config
        from core.recbole_compat import canonical_model_name

        if dsn is not None:
            _use_dsn_flag(dsn, dsn_env or "RECFLOW_PG_DSN")
        cfg = load_config(config, overrides)
        cfg.model.name = canonical_model_name(cfg.model.name)
        summary["registry"] = str(cfg.registry.path.resolve())
        summary["stage"] = "extract"
        from core.extract import preflight

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


def _run_pipeline(cfg: Any, summary: dict[str, Any]) -> int:
    from core.errors import PipelineFailed
    from flows.training_pipeline import training_pipeline

    _quiet_prefect_tracebacks()
    state = training_pipeline(cfg, return_state=True)
    if state.is_completed():
        result = state.result()
        summary.update(
            status=result.status,
            stage=result.stage,
            error=None,
            metrics={"test": result.metrics.get("test", {}), "baseline": result.metrics.get("baseline", {})},
            model_version=result.model_version,
            registry=str(result.registry),
            champion=result.champion,
            run_dir=str(result.run_dir),
        )
        _print_result(result)
        return 0
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, PipelineFailed):
        summary.update(stage=exc.stage, error=exc.error, run_dir=exc.run_dir)
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
    table = Table(title="test metrics (full ranking)")
    table.add_column("metric")
    table.add_column("candidate", justify="right")
    table.add_column("Pop baseline", justify="right")
    for key, value in test.items():
        table.add_row(key, f"{value:.4f}", f"{base.get(key, float('nan')):.4f}")
    console.print(table)
    gate = result.gate
    verdict = "[green]PROMOTED[/green]" if result.status == "promoted" else "[yellow]REJECTED[/yellow]"
    console.print(f"gate on {gate.metric}: {verdict}")
    # Plain echo: rich would wrap long paths and versions mid-token.
    for reason in gate.reasons:
        typer.echo(f"  - {reason}")
    typer.echo(f"registered {result.model_version} in {result.registry}; champion: {result.champion}")
    typer.echo(f"run folder: {result.run_dir}")


def _write_summary(path: Optional[Path], summary: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=str))


@app.command()
def recommend(
    name: Annotated[str, typer.Argument(help="registry entry, e.g. ml-100k-sasrec")],
    items: Annotated[Optional[str], typer.Option("--items", help="the user's history, oldest first, comma-separated")] = None,
    user: Annotated[Optional[str], typer.Option("--user", help="user id (non-sequential models)")] = None,
    k: Annotated[int, typer.Option("-k", min=1)] = 10,
    registry: Annotated[Path, typer.Option("--registry")] = Path("registry"),
    version: Annotated[Optional[str], typer.Option("--version", help="default: the champion")] = None,
    include_seen: Annotated[bool, typer.Option("--include-seen", help="allow items already in the history")] = False,
) -> None:
    """Score with a registered model (the champion by default) through onnxruntime."""
    from core.errors import RecflowError
    from core.registry import Registry
    from core.serving.scorer import OnnxScorer

    try:
        reg = Registry(registry)
        chosen = version or reg.champion_version(name)
        if chosen is None:
            _fail(f"{name} has no champion in {registry} (versions: {', '.join(reg.versions(name)) or 'none'})")
        scorer = OnnxScorer(reg.entry(name) / str(chosen))
        history = [i.strip() for i in (items or "").split(",") if i.strip()]
        recs = scorer.recommend(history, k, user=user, exclude_seen=not include_seen)
    except (RecflowError, KeyError) as exc:
        _fail(str(exc).strip("'\""))
        return
    typer.echo(f"{name} {chosen}:")
    for rank, rec in enumerate(recs, 1):
        typer.echo(f"{rank:>3}  {rec.item:<20} {rec.score:.4f}")


data_app = typer.Typer(no_args_is_help=True, help="Data utilities.")
app.add_typer(data_app, name="data")


@data_app.command("synth")
def data_synth(
    users: Annotated[int, typer.Option("--users", min=2, help="learners to generate")] = 300,
    out: Annotated[Path, typer.Option("--out", help="CSV or Parquet file to write")] = Path("question_attempts.csv"),
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Write question_attempts-shaped data with learnable curricula, for demos and tests."""
    from core.sources.synthetic import write_synthetic

    rows = write_synthetic(users, out, seed=seed)
    typer.echo(f"wrote {rows} question attempts by {users} learners to {out}")
    typer.echo(f"train on it: recflow run --config configs/question-attempts.yaml --data {out}")


@app.command()
def models() -> None:
    """List the RecBole model names recflow can train."""
    from core.recbole_compat import available_models

    for name in sorted(available_models().values()):
        typer.echo(name)


def main() -> None:
    _reexec_with_malloc_tunables()
    app()


if __name__ == "__main__":
    main()
