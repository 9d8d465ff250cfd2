"""Screenshots of the MLflow UI for docs/mlflow.md, taken by headless Chromium on a linewatch store.

    make demo                                   # or any LINEWATCH_HOME with a monitoring run that alerted
    python -m benchmarks.mlflow_screenshots --home .linewatch/demo --out docs/img/mlflow

Starts ``mlflow ui`` on the store (the command ``linewatch ui`` runs), finds the newest monitoring run that alerted,
its model version and its report through the UI's own REST calls, then opens the pages a quality engineer clicks
through (always in the model-training layout) and saves one PNG per step. Needs ``apt-get install -y chromium``;
nothing is fetched from the network.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from benchmarks.cdp import Browser

ML = "workflowType=machine_learning"


@dataclass(frozen=True)
class Story:
    """The entities the guide walks through."""

    monitoring_exp: str
    run_id: str
    run_name: str
    model_name: str
    model_version: str
    champion: str | None
    report: str | None
    axis: int | None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(home: Path, port: int) -> subprocess.Popen:
    """``linewatch ui`` on ``home`` (the local SQLite store), in the background."""
    from pipeline import tracking
    from pipeline.settings import get_settings

    settings = get_settings({"LINEWATCH_HOME": str(home)})  # the home's own SQLite store, whatever the env says
    proc = subprocess.Popen(tracking.ui_command(port, settings), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return proc
        except requests.RequestException:
            time.sleep(1)
    proc.terminate()
    raise RuntimeError("mlflow ui did not start within 300 s")


def _api(base: str, endpoint: str, body: dict[str, Any] | None = None, **params: Any) -> dict[str, Any]:
    url = f"{base}/ajax-api/2.0/mlflow/{endpoint}"
    r = requests.post(url, json=body, timeout=30) if body is not None else requests.get(url, params=params, timeout=30)
    r.raise_for_status()
    return r.json()


def find_story(base: str) -> Story:
    """The newest monitoring run that alerted (else the newest), its model version and its drift report."""
    exps = {e["name"]: e["experiment_id"] for e in _api(base, "experiments/search", {"max_results": 100})["experiments"]}
    mon = exps["linewatch-monitoring"]
    runs = _api(base, "runs/search", {"experiment_ids": [mon], "order_by": ["attributes.start_time DESC"],
                                      "max_results": 50}).get("runs", [])
    if not runs:
        raise SystemExit("no monitoring run in this store: run `make demo` (or linewatch monitor) first")

    def tags(run: dict[str, Any]) -> dict[str, str]:
        return {t["key"]: t["value"] for t in run["data"].get("tags", [])}

    run = next((r for r in runs if tags(r).get("alert.level") == "drift"), runs[0])
    t = tags(run)
    rid = run["info"]["run_id"]
    reports = [f["path"] for f in _api(base, "artifacts/list", run_id=rid, path="reports").get("files", [])]
    name, version = t["linewatch.model_name"], t["linewatch.model_version"]
    try:
        champion = _api(base, "registered-models/alias", name=name, alias="champion")["model_version"]["version"]
    except requests.HTTPError:
        champion = None
    moved = t.get("alert.moved_axes", "-")
    axis = int(moved.split(",")[0].removeprefix("axis_")) if moved.startswith("axis_") else None
    return Story(mon, rid, run["info"].get("run_name", rid), name, version, champion,
                 reports[-1] if reports else None, axis)


def _close_assistant(b: Browser) -> None:
    b.js("(() => { const x = document.querySelector('button[aria-label=\"Close\"]'); if (x) x.click(); })()")
    time.sleep(0.5)


def _type_search(b: Browser, placeholder: str, text: str) -> None:
    """Type into the search box with this placeholder (React sees it as user input)."""
    b.js(f"""(() => {{ const el = document.querySelector('input[placeholder*="{placeholder}"]');
        if (!el) return false; el.focus();
        Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(el, {text!r});
        el.dispatchEvent(new Event('input', {{bubbles: true}})); return true; }})()""")
    time.sleep(2.0)


def shoot(b: Browser, base: str, s: Story, out: Path) -> list[Path]:
    """Open each page of the guide and save it."""
    run = f"{base}/#/experiments/{s.monitoring_exp}/runs/{s.run_id}"
    shots = []
    b.goto(f"{base}/#/experiments?{ML}", wait_text="linewatch-monitoring")
    _close_assistant(b)
    shots.append(b.screenshot(out / "1-experiments.png"))
    b.goto(f"{base}/#/experiments/{s.monitoring_exp}/runs?{ML}", wait_text=s.run_name)
    _close_assistant(b)
    shots.append(b.screenshot(out / "2-monitoring-runs.png"))
    b.goto(f"{run}?{ML}", wait_text="Description")
    _close_assistant(b)
    b.click(text="Show more")
    shots.append(b.screenshot(out / "3-run-overview.png"))
    b.goto(f"{run}/model-metrics?{ML}", wait_text="drift")
    _close_assistant(b)
    if b.click('button[aria-label="Configure charts"]'):  # x axis: the windows' dates, not their index
        b.click(text="Time (wall)")
        b.js("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape', bubbles: true}))")
    if s.axis is not None:
        _type_search(b, "Search", f"axis_{s.axis:02d}/")
    shots.append(b.screenshot(out / "4-run-charts.png"))
    if s.report:  # a taller window: the report ends with the axis card
        width, height = b.js("[window.innerWidth, window.innerHeight]")
        b.resize(width, int(height * 1.75))
        b.goto(f"{run}/artifacts/{s.report}?{ML}", wait_text=Path(s.report).name)
        _close_assistant(b)
        time.sleep(3)
        shots.append(b.screenshot(out / "5-drift-report.png"))
        b.resize(width, height)
    b.goto(f"{run}/artifacts/drift/windows.json?{ML}", wait_text="windows.json")
    _close_assistant(b)
    time.sleep(3)
    shots.append(b.screenshot(out / "6-window-table.png"))
    b.goto(f"{base}/#/models/{s.model_name}/versions/{s.model_version}?{ML}", wait_text="Description")
    _close_assistant(b)
    shots.append(b.screenshot(out / "7-model-version.png"))
    if s.champion and s.champion != s.model_version:  # the run's model was replaced since: today's champion
        b.goto(f"{base}/#/models/{s.model_name}/versions/{s.champion}?{ML}", wait_text="Parent")
        _close_assistant(b)
        shots.append(b.screenshot(out / "8-champion-version.png"))
    return shots


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", default=".linewatch/demo", help="LINEWATCH_HOME of the store (default .linewatch/demo)")
    p.add_argument("--url", default=None, help="use a running UI / tracking server instead of starting one")
    p.add_argument("--out", default="docs/img/mlflow", help="folder for the PNGs")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=1000)
    args = p.parse_args(argv)
    ui = None
    if args.url:
        base = args.url.rstrip("/")
    else:
        port = _free_port()
        ui = start_ui(Path(args.home).resolve(), port)
        base = f"http://127.0.0.1:{port}"
    browser = None
    try:
        story = find_story(base)
        print(f"run {story.run_name} ({story.run_id}), model {story.model_name} v{story.model_version} "
              f"(champion now v{story.champion}), axis {story.axis}, report {story.report}")
        browser = Browser(args.chromium, width=args.width, height=args.height, port=_free_port())
        for path in shoot(browser, base, story, Path(args.out)):
            print(f"  {path}")
    finally:
        if browser is not None:
            browser.close()
        if ui is not None:
            ui.terminate()
            ui.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
