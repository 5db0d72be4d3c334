"""An end-to-end A/B demo: synthetic attempts -> two trained arms served -> simulated learners -> ab-report.

Run it as a user would, every step through the real ``recflow`` commands (subprocesses)::

    python -m core.online.demo DIR [--learners 1500] [--seed 0] [--port 8765] [--epochs 10]

1. ``recflow data synth`` writes question_attempts for ``--learners`` learners (``DIR/attempts.csv``).
2. Each learner's last ``STEPS`` attempts are their future (``DIR/future.csv``); the rest is the
   training part (``DIR/train.csv``).
3. ``recflow run`` trains two SASRec arms on the training part into one registry (``DIR/registry``):
   ``STRONG`` (sasrec-full) with the question-attempts preset (10-epoch cap, early stopping), ``WEAK``
   (sasrec-one-epoch) stopped after one epoch at a tenth of the learning rate (the one that should lose).
4. ``recflow serve --arm WEAK=0.5 --arm STRONG=0.5 --log-dir DIR/serving-log`` (the pseudonym key is
   generated once and kept in ``DIR/pseudonym.key``).
5. Each learner asks for recommendations (``session`` = their raw id, ``items`` = their history) at
   each step of their future. What they do next depends only on whether the list holds their true
   next question (``core.online.simulate.respond``), never on the arm: taken from the list, they
   attempt it inside the outcome window; otherwise they attempt it after the window. These attempts
   (``DIR/outcomes.csv``) carry the real request times plus offsets, so they line up with the log.
6. The server is stopped (SIGTERM) and ``recflow ab-report --pseudonymize`` compares the arms; the
   demo prints the report and which arm won (``DIR/demo_result.json``).

The outcome window is a few seconds (``WINDOW_SECONDS``), not a day: the demo compresses a learner's
day into seconds so that a few rounds of requests fit in a minute. A learner's next request comes
only after their previous question's late attempt, so windows of one learner never overlap.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import polars as pl
import yaml

from core.config import QUESTION_ATTEMPTS_COLUMNS, resolve_config_path
from core.errors import RecflowError  # a failed step: its message names the step and its log
from core.online.simulate import respond

STRONG, WEAK = "sasrec-full", "sasrec-one-epoch"
STEPS = 3  # future attempts per learner held out from training (one request each)
WINDOW_SECONDS = 4.0  # the report's outcome window
LATE = 1.5  # a question not taken from the list is attempted this many windows after the request
P_HIT = 0.7  # P(a learner takes their true next question when the list holds it)
BASE_RATE = 0.05  # P(a learner also attempts another listed item)
CONCURRENCY = 16
PRESET = "question-attempts"
USER, ITEM, TIME = (QUESTION_ATTEMPTS_COLUMNS[k] for k in ("user", "item", "time"))


class Paths:
    """Everything the demo writes, under one folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.attempts, self.train, self.future = root / "attempts.csv", root / "train.csv", root / "future.csv"
        self.outcomes, self.registry, self.runs = root / "outcomes.csv", root / "registry", root / "runs"
        self.log, self.report, self.report_json = root / "serving-log", root / "ab-report", root / "ab-report.json"
        self.key, self.result, self.logs = root / "pseudonym.key", root / "demo_result.json", root / "logs"


def _env(key: str) -> dict[str, str]:
    """The subprocess environment: the pseudonym key, Prefect without telemetry, no re-exec."""
    env = {**os.environ, "RECFLOW_PSEUDONYM_KEY": key, "RECFLOW_NO_REEXEC": "1"}
    for name, value in (("DO_NOT_TRACK", "1"), ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
                        ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")):
        env.setdefault(name, value)
    return env


def recflow(paths: Paths, key: str, step: str, *args: str) -> str:
    """Run ``recflow ARGS`` to completion; its output goes to ``DIR/logs/<step>.log`` and is returned.

    Raises:
        RecflowError: the command exited non-zero (the message holds its last lines).
    """
    paths.logs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "cli", *args]
    print(f"$ recflow {' '.join(args)}", flush=True)
    done = subprocess.run(cmd, env=_env(key), capture_output=True, text=True, cwd=paths.root)
    text = done.stdout + done.stderr
    (paths.logs / f"{step}.log").write_text(text)
    if done.returncode != 0:
        tail = "\n".join(text.strip().splitlines()[-8:])
        raise RecflowError(f"{step}: recflow {args[0]} exited {done.returncode} (log: {paths.logs / f'{step}.log'}):\n{tail}")
    return done.stdout


def pseudonym_key(paths: Paths) -> str:
    """The demo's RECFLOW_PSEUDONYM_KEY: generated once, kept in ``DIR/pseudonym.key`` (mode 0600)."""
    if paths.key.is_file():
        return paths.key.read_text().strip()
    value = secrets.token_hex(32)
    fd = os.open(paths.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def split_future(attempts: Path, train: Path, future: Path, steps: int = STEPS) -> pl.DataFrame:
    """Split each learner's attempts by time: all but the last ``steps`` to ``train``, those to ``future``.

    Args:
        attempts: the question_attempts CSV.
        train: where the training part goes (CSV, same columns).
        future: where the held-out attempts go (CSV, with their 0-based ``step``).
        steps: attempts held out per learner.

    Returns:
        The future rows (user_id, question_id, step).
    """
    df = pl.read_csv(attempts, try_parse_dates=True).sort([USER, TIME])
    ranked = df.with_columns(_pos=pl.int_range(pl.len()).over(USER), _n=pl.len().over(USER))
    ranked.filter(pl.col("_pos") < pl.col("_n") - steps).drop("_pos", "_n").write_csv(train)
    ahead = (ranked.filter(pl.col("_pos") >= pl.col("_n") - steps)
             .with_columns(step=pl.col("_pos") - (pl.col("_n") - steps)).drop("_pos", "_n"))
    ahead.write_csv(future)
    return ahead.select(USER, ITEM, "step")


def write_arm_configs(paths: Paths, epochs: int | None) -> dict[str, Path]:
    """One config per arm: the question-attempts preset on the training file, one registry, named entries.

    Args:
        paths: the demo's folder.
        epochs: the strong arm's epoch cap (None: the preset's).

    Returns:
        The config file per registry entry.
    """
    preset = yaml.safe_load(resolve_config_path(PRESET).read_text())
    arms: dict[str, dict[str, Any]] = {
        STRONG: {} if epochs is None else {"epochs": epochs},
        WEAK: {"epochs": 1, "learning_rate": 1e-4},  # under-trained on purpose: the arm that should lose
    }
    out: dict[str, Path] = {}
    for name, training in arms.items():
        cfg = {**preset,
               "source": {"kind": "file", "path": str(paths.train)},
               "privacy": {**preset.get("privacy", {}), "pseudonymize": True},  # as the Postgres extract does
               "incremental": {"enabled": False},
               "registry": {"path": str(paths.registry), "model_name": name},
               "runs_dir": str(paths.runs),
               "training": {**preset.get("training", {}), **training, "device": "cpu"}}
        out[name] = paths.root / f"{name}.yaml"
        out[name].write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``recflow serve`` with both arms, as a subprocess in its own process group."""

    def __init__(self, paths: Paths, key: str, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        args = ["serve", "--registry", str(paths.registry), "--port", str(port), "--log-dir", str(paths.log),
                "--arm", f"{WEAK}=0.5", "--arm", f"{STRONG}=0.5"]
        print(f"$ recflow {' '.join(args)}", flush=True)
        paths.logs.mkdir(parents=True, exist_ok=True)
        self.log = (paths.logs / "serve.log").open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "cli", *args], env=_env(key), cwd=paths.root,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.base}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RecflowError(f"serve: recflow serve did not come up (log: {paths.logs / 'serve.log'}):\n"
                                + "\n".join((paths.logs / "serve.log").read_text().strip().splitlines()[-8:]))
            time.sleep(0.3)

    def stop(self) -> None:
        """SIGTERM and wait (uvicorn flushes the outcome log on shutdown); SIGKILL after 60 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def _ask(client: httpx.Client, base: str, learner: str, history: list[str]) -> tuple[datetime, list[str]]:
    """One request; (the time it was sent, the recommended items). The answer's ``arm`` is never read."""
    sent = datetime.now(UTC)
    try:
        r = client.post(f"{base}/recommendations",
                        json={"session": learner, "items": history, "k": 10, "ignore_unknown": True})
    except httpx.HTTPError as exc:
        raise RecflowError(f"simulate: POST /recommendations failed: {exc} (is recflow serve still up?)") from None
    if r.status_code != 200:
        raise RecflowError(f"simulate: POST /recommendations answered {r.status_code}: {r.text[:200]}")
    return sent, [x["item"] for x in r.json()["items"]]


def simulate_learners(base: str, train: Path, future: pl.DataFrame, seed: int) -> pl.DataFrame:
    """Learners ask at each step of their future and act on the answer; their attempts, raw ids.

    Args:
        base: the server's URL.
        train: the training part (histories and each learner's skill).
        future: (user_id, question_id, step): each learner's true next questions.
        seed: the learners' random seed.

    Returns:
        question_attempts rows (user_id, question_id, created_at, is_correct).
    """
    rng = np.random.default_rng(seed)
    past = pl.read_csv(train, try_parse_dates=True).sort([USER, TIME])
    grouped = past.group_by(USER, maintain_order=True).agg(pl.col(ITEM), pl.col("is_correct"))
    history = dict(zip(grouped[USER].to_list(), grouped[ITEM].to_list()))
    learners = sorted(set(future[USER].to_list()) & set(history))
    graded = dict(zip(grouped[USER].to_list(), grouped["is_correct"].to_list()))
    # Skill: the logit of each learner's smoothed share of right answers in the training part.
    share = np.array([(sum(graded[u]) + 1) / (len(graded[u]) + 2) for u in learners])
    skill = np.log(share / (1 - share))
    position = {u: i for i, u in enumerate(learners)}
    truth = {(u, s): q for u, q, s in future.iter_rows()}
    window = timedelta(seconds=WINDOW_SECONDS)
    rows: list[tuple[str, str, datetime, bool]] = []
    steps = int(future["step"].max()) + 1
    with httpx.Client(timeout=30, limits=httpx.Limits(max_connections=CONCURRENCY)) as client, \
            ThreadPoolExecutor(CONCURRENCY) as pool:
        for step in range(steps):
            asked = [u for u in learners if (u, step) in truth]
            answers = list(pool.map(lambda u: _ask(client, base, u, history[u]), asked))
            holds = np.array([[truth[(u, step)] in items] for u, (_, items) in zip(asked, answers)])
            idx = np.array([position[u] for u in asked])
            took, other, ok_truth, ok_other = respond(holds, skill[idx], rng, p_hit=P_HIT, base_rate=BASE_RATE)
            for i, (u, (sent, items)) in enumerate(zip(asked, answers)):
                q = truth[(u, step)]
                in_window = sent + window * float(rng.uniform(0.1, 0.9))
                rows.append((u, q, in_window if took[i, 0] else sent + window * LATE, bool(ok_truth[i, 0])))
                others = [x for x in items if x != q]
                if other[i, 0] and others:
                    rows.append((u, others[int(rng.integers(len(others)))], sent + window * float(rng.uniform(0.1, 0.9)),
                                 bool(ok_other[i, 0])))
                history[u] = [*history[u], q]
            # The next request of a learner comes after this one's late attempt: windows never overlap.
            wait = (max(s for s, _ in answers) + window * (LATE + 0.1) - datetime.now(UTC)).total_seconds()
            print(f"  step {step + 1}/{steps}: {len(asked)} learners asked, list held the next question for "
                  f"{holds.mean():.0%}", flush=True)
            if step + 1 < steps and wait > 0:
                time.sleep(wait)
    return pl.DataFrame(rows, schema={USER: pl.String, ITEM: pl.String, TIME: pl.Datetime("us", "UTC"),
                                      "is_correct": pl.Boolean}, orient="row").sort(TIME)


def with_question_columns(outcomes: pl.DataFrame, attempts: Path) -> pl.DataFrame:
    """The attempts with question_attempts' other columns (a question's difficulty, topic, subtopic from the
    bank; a flat response time): the file source reads ``is_correct`` only when all of them are there.

    Args:
        outcomes: (user_id, question_id, created_at, is_correct).
        attempts: the synthetic bank's attempts (each question's metadata).

    Returns:
        The outcomes with every question_attempts column.
    """
    bank = (pl.read_csv(attempts, columns=[ITEM, "difficulty_level", "topic", "subtopic"])
            .unique(ITEM, keep="first").with_columns(pl.col("difficulty_level").cast(pl.Int8)))
    return outcomes.join(bank, on=ITEM, how="left").with_columns(
        response_time_seconds=pl.lit(30.0, pl.Float32)).select(
        USER, ITEM, TIME, "is_correct", "response_time_seconds", "difficulty_level", "topic", "subtopic")


def verdict(report: dict[str, Any], strong: str = STRONG) -> dict[str, Any]:
    """Which arm won on hit rate, by how much and with which interval (from ``ab-report --json``)."""
    diff = next(d for d in report["analysis"]["differences"] if d["metric"] == "hit rate")
    winner = None
    if diff["significant"]:
        winner = diff["treatment"] if diff["value"] > 0 else diff["control"]
    return {"winner": winner, "better_by_construction": strong, "control": diff["control"],
            "treatment": diff["treatment"], "hit_rate_difference": diff["value"], "low": diff["low"],
            "high": diff["high"], "p_value": diff["p_value"],
            "arms": {a["arm"]: a["hit_rate"]["value"] for a in report["analysis"]["arms"]}}


def run_demo(root: Path, *, learners: int, seed: int, port: int | None, epochs: int | None) -> dict[str, Any]:
    """Every step of the demo in ``root`` (created; must be new or empty).

    Args:
        root: the demo's folder.
        learners: synthetic learners.
        seed: the data's and the simulated learners' seed.
        port: the server's port (None: a free one).
        epochs: the strong arm's epoch cap (None: the preset's).

    Returns:
        The verdict (also in ``DIR/demo_result.json``).
    """
    if root.exists() and any(root.iterdir()):
        raise RecflowError(f"{root} is not empty: pass a new folder (the demo trains into its own registry)")
    root.mkdir(parents=True, exist_ok=True)
    paths = Paths(root.resolve())
    key = pseudonym_key(paths)
    started = time.monotonic()
    recflow(paths, key, "synth", "data", "synth", "--users", str(learners), "--seed", str(seed),
            "--out", str(paths.attempts))
    future = split_future(paths.attempts, paths.train, paths.future)
    for name, config in write_arm_configs(paths, epochs).items():
        recflow(paths, key, f"run-{name}", "run", "--config", str(config))
    print(f"  trained both arms in {paths.registry} ({time.monotonic() - started:.0f} s so far)", flush=True)
    server = Server(paths, key, port or _free_port())
    try:
        outcomes = simulate_learners(server.base, paths.train, future, seed)
    finally:
        server.stop()
    with_question_columns(outcomes, paths.attempts).write_csv(paths.outcomes)
    print(recflow(paths, key, "ab-report", "ab-report", "--log-dir", str(paths.log), "--attempts", str(paths.outcomes),
                  "--pseudonymize", "--window", f"{WINDOW_SECONDS / 3600:.10f}", "--out", str(paths.report),
                  "--json", str(paths.report_json), "--registry", str(paths.registry)))
    result = verdict(json.loads(paths.report_json.read_text()))
    result["seconds"] = round(time.monotonic() - started)
    paths.result.write_text(json.dumps(result, indent=2))
    return result


def _pp(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:+.1f} pp"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.online.demo", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="a new folder for everything the demo writes")
    parser.add_argument("--learners", type=int, default=1500, help="synthetic learners (default 1500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=None, help="the server's port (default: a free one)")
    parser.add_argument("--epochs", type=int, default=None, help="the strong arm's epoch cap (default: the preset's)")
    args = parser.parse_args(argv)
    if args.learners < 20:
        parser.error(f"--learners must be at least 20, got {args.learners}")
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    try:
        r = run_demo(args.dir, learners=args.learners, seed=args.seed, port=args.port, epochs=args.epochs)
    except RecflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    interval = f"[{_pp(r['low'])}, {_pp(r['high'])}]"
    rates = ", ".join(f"{arm} {100 * v:.1f}%" for arm, v in r["arms"].items() if v is not None)
    if r["winner"] is None:
        print(f"no clear winner: hit rate {r['treatment']} - {r['control']} = {_pp(r['hit_rate_difference'])} "
              f"{interval} ({rates})")
    else:
        loser = r["control"] if r["winner"] == r["treatment"] else r["treatment"]
        print(f"winner: {r['winner']} (hit rate {rates}; {r['treatment']} - {r['control']} = "
              f"{_pp(r['hit_rate_difference'])}, 95% interval {interval}) over {loser}; demo took {r['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
