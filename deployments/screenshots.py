"""Redo the Prefect UI screenshots in docs/screenshots/ with headless Chromium.

Needs a Prefect server whose UI knows its own API address (start it with
``PREFECT_UI_API_URL=http://HOST:PORT/api``), the deployments (``recflow deploy``) and at least one
finished ``training-pipeline`` run; deployments/README.md has the whole recipe. Then::

    .venv/bin/python -m deployments.screenshots --api-url http://127.0.0.1:4200/api

writes ``adhoc-run-form.png`` (the ad-hoc deployment's typed parameter form),
``nightly-upcoming.png`` (the nightly deployment: its schedule and next runs), and the latest
completed run's ``gate-artifact.png`` and ``metrics-artifact.png``; and, from the latest completed
``tuning-pipeline`` run (``recflow tune``), ``tuning-leaderboard.png``, ``tuning-seeds.png`` and
``tuning-plots.png`` (``--only tuning`` shoots just those). Artifacts are shot on their
own pages: the flow-run page ignores ``?tab=Artifacts`` on first load (it opens on Logs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

OUT = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
FLOW = "training-pipeline"


def _api(api_url: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    response = httpx.request(method, f"{api_url.rstrip('/')}{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def pages(api_url: str) -> dict[str, tuple[str, str]]:
    """File name -> (UI address, window size) for each screenshot."""
    ui = api_url.rstrip("/").removesuffix("/api")
    adhoc = _api(api_url, "GET", f"/deployments/name/{FLOW}/adhoc")
    nightly = _api(api_url, "GET", f"/deployments/name/{FLOW}/nightly")
    runs = _api(api_url, "POST", "/flow_runs/filter", {
        "flows": {"name": {"any_": [FLOW]}},
        "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
        "sort": "END_TIME_DESC",
        "limit": 1,
    })
    if not runs:
        raise SystemExit(f"no completed {FLOW} run on {api_url}: run a deployment first")
    artifacts = _api(api_url, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [runs[0]["id"]]}}})
    by_prefix = {a["key"].split("-", 1)[0]: a["id"] for a in artifacts if a.get("key")}
    missing = {"gate", "metrics"} - set(by_prefix)
    if missing:
        raise SystemExit(f"run {runs[0]['name']} has no {' or '.join(sorted(missing))} artifact")
    return {
        "adhoc-run-form.png": (f"{ui}/deployments/deployment/{adhoc['id']}/run", "1400,1600"),
        "nightly-upcoming.png": (f"{ui}/deployments/deployment/{nightly['id']}?tab=Upcoming", "1400,1000"),
        "gate-artifact.png": (f"{ui}/artifacts/artifact/{by_prefix['gate']}", "1400,800"),
        "metrics-artifact.png": (f"{ui}/artifacts/artifact/{by_prefix['metrics']}", "1400,1000"),
    }


TUNING_FLOW = "tuning-pipeline"
# Artifact key suffix (tasks/tune.py: tuning-<study>-<suffix>) -> screenshot file and window size.
TUNING_SHOTS = {
    "leaderboard": ("tuning-leaderboard.png", "1400,1100"),
    "seeds": ("tuning-seeds.png", "1400,700"),
    "plots": ("tuning-plots.png", "1400,2200"),
}


def tuning_pages(api_url: str) -> dict[str, tuple[str, str]]:
    """The latest completed ``recflow tune`` run's artifacts: leaderboard, seed comparison, plots."""
    ui = api_url.rstrip("/").removesuffix("/api")
    runs = _api(api_url, "POST", "/flow_runs/filter", {
        "flows": {"name": {"any_": [TUNING_FLOW]}},
        "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
        "sort": "END_TIME_DESC",
        "limit": 1,
    })
    if not runs:
        raise SystemExit(f"no completed {TUNING_FLOW} run on {api_url}: run `recflow tune` against it first")
    artifacts = _api(api_url, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [runs[0]["id"]]}}})
    out = {}
    for a in artifacts:
        suffix = (a.get("key") or "").rsplit("-", 1)[-1]
        if suffix in TUNING_SHOTS:
            name, size = TUNING_SHOTS[suffix]
            out[name] = (f"{ui}/artifacts/artifact/{a['id']}", size)
    if not out:
        raise SystemExit(f"run {runs[0]['name']} has no tuning artifact")
    return out


def shoot(url: str, path: Path, chromium: str, size: str = "1400,1000") -> None:
    subprocess.run(
        # Reduced motion + compositing before the shot: without them the UI's fade-in is caught halfway.
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--force-prefers-reduced-motion", "--run-all-compositor-stages-before-draw",
         f"--screenshot={path}", f"--window-size={size}", "--virtual-time-budget=30000", url],
        check=True, capture_output=True, timeout=120,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--api-url", default=os.environ.get("PREFECT_API_URL"), help="default: PREFECT_API_URL")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    parser.add_argument("--only", choices=["training", "tuning", "all"], default="all",
                        help="training: deployments and the training run's artifacts; tuning: the tuning run's")
    args = parser.parse_args(argv)
    if not args.api_url:
        raise SystemExit("pass --api-url http://HOST:PORT/api or set PREFECT_API_URL")
    if not args.chromium:
        raise SystemExit("chromium not found: apt-get install -y chromium, or pass --chromium PATH")
    args.out.mkdir(parents=True, exist_ok=True)
    shots = {**(pages(args.api_url) if args.only in ("training", "all") else {}),
             **(tuning_pages(args.api_url) if args.only in ("tuning", "all") else {})}
    for name, (url, size) in shots.items():
        shoot(url, args.out / name, args.chromium, size)
        print(f"{args.out / name}  <-  {url}", file=sys.stdout)


if __name__ == "__main__":
    main()
