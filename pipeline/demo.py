"""The main job on embedded defaults: ``linewatch demo`` (``make demo``).

In one go, with no server or account: simulate 8 days of a production line from real ELPV cells, with 5 golden
cells re-imaged at the start of every shift and a camera gain x0.9 from day 7; ingest the drop folder; nightly
retrain (days 1-5) -> model v1 champion; monitor days 6-8 (no alert on day 6; on day 7 or 8 an alert that names
its cause: "camera/optics changed" from the golden cells, or the moved latent axis and its description); a second
retrain warm-started from v1 -> v2 with lineage and axis alignment; a summary and the command that opens the MLflow
UI.

The steps go through a *runner*: :class:`LocalRunner` calls the ``pipeline`` jobs directly; ``linewatch demo``
(``flows/cli.py``) passes a runner that runs the same steps as Prefect flows (ephemeral local API). The demo's
assertions are honest: :class:`DemoResult` lists every check with its outcome, and the command exits non-zero when
one fails.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipeline.analysis.blocks import MIN_BLOCKS

DEMO_HOME = Path(".linewatch") / "demo"
DEMO_TIMEZONE = "Europe/Berlin"  # the simulated plant's clock (CET in January)
DEMO_LINE = "L1"
MIN_TRAIN_DAYS = MIN_BLOCKS
"""Fewest days of the first training window: one line's days the monitor's reference needs (``docs/monitoring.md``)."""


@dataclass(frozen=True)
class DemoConfig:
    """Knobs of the demo (defaults: the cpu preset within ~15 minutes on 2 cores).

    Attributes:
        home: ``LINEWATCH_HOME`` of the demo; wiped and recreated at the start of each run.
        preset: model preset.
        days: simulated production days.
        per_day: captures per day.
        fault_day: first faulty day (1-based).
        gain_severity: severity of the gain fault (factor = 1 - 0.25 x severity; 0.4 -> x0.9).
        golden_cells: golden cells re-imaged at the start of every shift (``docs/spc.md``); 0 for none.
        order: cell order of the simulation. ``"shuffled"`` (default) keeps the mono/poly mix steady from day to
            day; with ``"lot"`` whole ELPV lots are replayed in file order, two a day, and the mono share swings
            between 0 and 100 % per day: a genuine product-mix drift that the monitor rightly flags, which would
            blur the demo's point (the camera fault).
        train_days: days of the first training window (days 1..train_days), at least ``MIN_TRAIN_DAYS``.
        steps_first: optimiser steps of the first (from scratch) training.
        steps_second: optimiser steps of the warm-started second training.
        batch_size: training batch size (None: the preset's).
        min_window: smallest window the drift test accepts.
        holdout_share: calibration share of each retrain's window.
        gate: ``GateConfig`` overrides.
        seed: seed of the simulation and the trainings.
        progress: progress bars.
    """

    home: Path = DEMO_HOME
    preset: str = "cpu"
    days: int = 8
    per_day: int = 64
    fault_day: int = 7
    gain_severity: float = 0.4
    golden_cells: int = 5
    order: str = "shuffled"
    train_days: int = 5
    steps_first: int = 400
    steps_second: int = 150
    batch_size: int | None = None
    min_window: int = 20
    holdout_share: float = 0.35
    gate: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.days < 3:
            raise ValueError(f"the demo needs >= 3 days, got {self.days}")
        if not 2 <= self.fault_day <= self.days:
            raise ValueError(f"fault_day must be in [2, days={self.days}], got {self.fault_day}")
        if not MIN_TRAIN_DAYS <= self.train_days < self.fault_day - 1:
            raise ValueError(
                f"train_days must hold the {MIN_TRAIN_DAYS} line-days the monitor's reference needs and leave a healthy "
                f"monitored day before the fault: {MIN_TRAIN_DAYS} <= train_days < fault_day - 1 = "
                f"{self.fault_day - 1}, got {self.train_days}"
            )


class Runner(Protocol):
    """How the demo runs its steps (directly, or as Prefect flows)."""

    def ingest(self) -> dict[str, Any]:  # noqa: D102
        ...

    def retrain(self, **params: Any) -> dict[str, Any]:  # noqa: D102
        ...

    def monitor(self, **params: Any) -> dict[str, Any]:  # noqa: D102
        ...


class LocalRunner:
    """Runs the demo's steps as plain function calls (no Prefect)."""

    def __init__(self, progress: bool = False) -> None:
        self.progress = progress

    def ingest(self) -> dict[str, Any]:
        """Ingest the drop folder."""
        from pipeline.catalog.ingest import IngestConfig, ingest
        from pipeline.settings import ensure_dirs, get_settings

        s = ensure_dirs(get_settings())
        return ingest(s.drop_dir, s.catalog_root, progress=self.progress,
                      config=IngestConfig(mes_timezone=s.timezone)).to_dict()

    def retrain(self, **params: Any) -> dict[str, Any]:
        """Run a retrain."""
        from pipeline.monitoring.monitor import monitor_config, retrain_hooks
        from pipeline.settings import ensure_dirs, get_settings
        from pipeline.training.retrain import retrain, retrain_config

        settings, config = ensure_dirs(get_settings()), retrain_config(**params)
        hooks = retrain_hooks(settings, monitor_config(**(config.monitor or {})))
        return retrain(settings, config, progress=self.progress, hooks=hooks).to_dict()

    def monitor(self, **params: Any) -> dict[str, Any]:
        """Run a monitor pass."""
        from pipeline.monitoring.monitor import monitor, monitor_config
        from pipeline.settings import ensure_dirs, get_settings

        return monitor(ensure_dirs(get_settings()), monitor_config(**params)).to_dict()


@dataclass(frozen=True)
class DemoResult:
    """What the demo did and whether each promise held.

    Attributes:
        checks: check name -> (ok, detail).
        v1: first retrain result (dict).
        v2: second retrain result (dict).
        monitor: monitor result (dict).
        seconds: step name -> wall seconds.
        ui_command: the command that opens the MLflow UI on the demo's store.
        home: the demo's ``LINEWATCH_HOME``.
    """

    checks: dict[str, tuple[bool, str]]
    v1: dict[str, Any]
    v2: dict[str, Any]
    monitor: dict[str, Any]
    seconds: dict[str, float]
    ui_command: str
    home: Path

    @property
    def ok(self) -> bool:
        """Every check passed."""
        return all(ok for ok, _ in self.checks.values())


def _day(config: DemoConfig, k: int) -> dt.date:
    """Date of 1-based simulated day ``k``."""
    from pipeline.line.simulate import DEFAULT_START

    return DEFAULT_START + dt.timedelta(days=k - 1)


def _midnight(day: dt.date, tz: str) -> str:
    from zoneinfo import ZoneInfo

    return dt.datetime.combine(day, dt.time(0), tzinfo=ZoneInfo(tz)).isoformat()


def prepare_environment(config: DemoConfig) -> Path:
    """Wipe and recreate the demo home and point ``LINEWATCH_*`` / MLflow at it (SQLite under the home).

    Returns:
        The absolute demo home.
    """
    home = Path(config.home).resolve()
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    os.environ["LINEWATCH_HOME"] = str(home)
    os.environ["LINEWATCH_TIMEZONE"] = DEMO_TIMEZONE
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    os.environ.pop("MLFLOW_REGISTRY_URI", None)
    for key in ("LINEWATCH_CATALOG", "LINEWATCH_DROP", "LINEWATCH_STATE", "LINEWATCH_CHECKPOINTS"):
        os.environ.pop(key, None)
    return home


def run_demo(
    config: DemoConfig = DemoConfig(),
    runner: Runner | None = None,
    *,
    out: Callable[[str], None] = print,
    fresh: bool = True,
) -> DemoResult:
    """Run the demo end to end (see the module docstring).

    Args:
        config: demo knobs.
        runner: how steps run (default :class:`LocalRunner`).
        out: where progress lines go.
        fresh: wipe ``config.home`` first (the CLI always does; tests may prepare it themselves).

    Returns:
        The checks and the step results.
    """
    from pipeline.settings import ensure_dirs, get_settings

    t_all = time.perf_counter()
    seconds: dict[str, float] = {}
    if fresh:
        home = prepare_environment(config)
        out(f"[demo] fresh demo home {home} (wiped and recreated on every run)")
    settings = ensure_dirs(get_settings())
    runner = runner or LocalRunner(progress=config.progress)
    tz = settings.timezone
    _simulate(config, settings, out, seconds)
    _ingest(runner, out, seconds)
    common = {"preset": config.preset, "batch_size": config.batch_size, "holdout_share": config.holdout_share,
              "gate": config.gate, "seed": config.seed,
              "monitor": {"min_window": config.min_window}}  # the gate checks the monitor below can use the model
    v1 = _retrain_first(config, runner, tz, common, out, seconds)
    if not v1["promoted"]:  # nothing to monitor with: stop here, honestly
        return _finish(settings, {"v1 is champion": (False, v1["gate"]["reason"])}, v1, {},
                       {"windows": []}, seconds, t_all, out, heading=False)
    mon = _monitor_days(config, runner, tz, out, seconds)
    v2 = _retrain_second(config, runner, common, out, seconds)
    return _finish(settings, demo_checks(config, v1, mon, v2), v1, v2, mon, seconds, t_all, out,
                   heading=True)


def _simulate(config: DemoConfig, settings: Any, out: Callable[[str], None], seconds: dict[str, float]) -> None:
    """Step 1: simulate the line's days into the drop folder, the camera-gain fault from ``fault_day``."""
    from pipeline.line.faults import FaultSpec
    from pipeline.line.simulate import simulate_line

    t = time.perf_counter()
    out(f"[demo] 1/6 simulating {config.days} days x {config.per_day} cells of line {DEMO_LINE} from ELPV; "
        f"camera gain x{1 - 0.25 * config.gain_severity:.2f} from day {config.fault_day}")
    sim = simulate_line(
        settings.drop_dir, days=config.days, per_day=config.per_day, lines=(DEMO_LINE,), seed=config.seed,
        fault=FaultSpec("gain", start_day=config.fault_day - 1, severity=config.gain_severity),
        order=config.order, truth=settings.home / "truth.parquet", progress=config.progress,
        golden_cells=config.golden_cells,
    )
    seconds["simulate"] = time.perf_counter() - t
    out(f"[demo]     {sim.n_images} images in {settings.drop_dir} ({seconds['simulate']:.0f} s)")


def _ingest(runner: Runner, out: Callable[[str], None], seconds: dict[str, float]) -> None:
    """Step 2: ingest the drop folder into the catalog."""
    t = time.perf_counter()
    out("[demo] 2/6 ingesting the drop folder into the catalog")
    ing = runner.ingest()
    seconds["ingest"] = time.perf_counter() - t
    out(f"[demo]     {ing['registered']} registered, {ing.get('n_quarantined', 0)} quarantined "
        f"({seconds['ingest']:.0f} s)")


def _retrain_first(config: DemoConfig, runner: Runner, tz: str, common: dict[str, Any],
                   out: Callable[[str], None], seconds: dict[str, float]) -> dict[str, Any]:
    """Step 3: the first nightly retrain, from scratch on the training days (model v1)."""
    t = time.perf_counter()
    end_first = _midnight(_day(config, config.train_days + 1), tz)
    out(f"[demo] 3/6 nightly retrain from scratch on days 1-{config.train_days} ({config.preset} preset, "
        f"{config.steps_first} steps)")
    v1 = runner.retrain(steps=config.steps_first, window_days=config.train_days, end=end_first, from_scratch=True,
                        **common)
    seconds["retrain v1"] = time.perf_counter() - t
    out(f"[demo]     model v{v1['version']} -> {v1['alias']} ({v1['gate']['reason']}); "
        f"{v1['n_train']} train / {v1['n_calibration']} calibration images ({seconds['retrain v1']:.0f} s)")
    return v1


def _monitor_days(config: DemoConfig, runner: Runner, tz: str, out: Callable[[str], None],
                  seconds: dict[str, float]) -> dict[str, Any]:
    """Step 4: monitor the days after the training days with the champion, one line per day window."""
    t = time.perf_counter()
    first_mon = config.train_days + 1
    out(f"[demo] 4/6 monitoring days {first_mon}-{config.days} with the champion")
    mon = runner.monitor(start=_midnight(_day(config, first_mon), tz),
                         end=_midnight(_day(config, config.days + 1), tz), window_by="day",
                         min_window=config.min_window)
    seconds["monitor"] = time.perf_counter() - t
    for w in mon["windows"]:
        if not w["detected"]:
            verdict = "no drift"
        elif w["top_axis"] is None:  # only the image-quality family fired: the description names the channel
            verdict = f"drift: {w['description']}"
        else:
            verdict = f"drift: axis {w['top_axis']} moved {w['effect']:+.2f} sd ({w['description']})"
        kinds = [e.get("kind") for e in w.get("events", ())]
        if kinds:
            verdict += f"; alert {', '.join(kinds)}"
        out(f"[demo]     {w['window_id']}: {w['n_images']} images, {w['n_anomalous']} flagged, {verdict}")
    return mon


def _retrain_second(config: DemoConfig, runner: Runner, common: dict[str, Any], out: Callable[[str], None],
                    seconds: dict[str, float]) -> dict[str, Any]:
    """Step 5: the second nightly retrain, warm-started from the champion (model v2)."""
    t = time.perf_counter()
    out(f"[demo] 5/6 second nightly retrain, warm start from the champion ({config.steps_second} steps; windows "
        "under an active alert and flagged images are excluded)")
    v2 = runner.retrain(steps=config.steps_second, window_days=config.days, end=None, from_scratch=False, **common)
    seconds["retrain v2"] = time.perf_counter() - t
    out(f"[demo]     model v{v2['version']} (parent v{v2['parent_version']}) -> {v2['alias']} "
        f"({v2['gate']['reason']}); excluded {v2['excluded']} ({seconds['retrain v2']:.0f} s)")
    return v2


def _finish(settings: Any, checks: dict[str, tuple[bool, str]], v1: dict[str, Any],
            v2: dict[str, Any], mon: dict[str, Any], seconds: dict[str, float], t_all: float,
            out: Callable[[str], None], *, heading: bool) -> DemoResult:
    """Step 6: the result with its checks and the MLflow UI command, its summary printed."""
    from pipeline import tracking

    tracking.configure(settings)
    ui = tracking.ui_command_text(settings=settings)
    seconds["total"] = time.perf_counter() - t_all
    result = DemoResult(checks, v1, v2, mon, seconds, ui, settings.home)
    if heading:
        out("[demo] 6/6 summary")
    out(summary_text(result))
    return result


def _day_id(config: DemoConfig, k: int) -> str:
    return _day(config, k).isoformat()


def demo_checks(config: DemoConfig, v1: dict[str, Any], mon: dict[str, Any],
                v2: dict[str, Any]) -> dict[str, tuple[bool, str]]:
    """The demo's promises, each with its outcome and a detail line."""
    checks: dict[str, tuple[bool, str]] = {}
    checks["v1 is champion"] = (bool(v1["promoted"]), f"v{v1['version']}: {v1['gate']['reason']}")
    by_day = {w["window_id"]: w for w in mon["windows"]}
    healthy = _day_id(config, config.fault_day - 1)
    w = by_day.get(healthy)
    if w is None:
        checks[f"no alert on day {config.fault_day - 1}"] = (False, "window missing")
    else:  # an alert = the alert manager opened one (a lone drifted window is below the policy's hysteresis)
        quiet = not w["alert_active"] and not w.get("events")
        checks[f"no alert on day {config.fault_day - 1}"] = (
            quiet, ("window drifted, no alert: " if w["detected"] else "") + w["summary"])
    faulty = [by_day.get(_day_id(config, k)) for k in (config.fault_day, config.fault_day + 1) if k <= config.days]
    checks[f"alert on day {config.fault_day} or {config.fault_day + 1} naming its cause"] = _fault_check(
        [x for x in faulty if x is not None])
    checks["v2 warm-started from v1"] = (
        str(v2.get("parent_version")) == str(v1["version"]),
        f"v{v2['version']} parent v{v2.get('parent_version')}",
    )
    checks["axis alignment v1 -> v2 reported"] = (
        v2.get("alignment") is not None, f"mean |r| = {v2.get('alignment')}")
    return checks


def _fault_check(faulty: list[dict[str, Any]]) -> tuple[bool, str]:
    """An alert opened on a faulty day naming its cause: camera/optics (golden cells) or the moved latent axis."""
    camera = [(x, e["alert"]) for x in faulty for e in x.get("events", ())
              if e.get("kind") == "opened" and (e.get("alert") or {}).get("family") == "camera"]
    if camera:
        return True, f"{camera[0][0]['window_id']}: {camera[0][1]['summary']}"
    drifted = [x for x in faulty if x["detected"] and x["top_axis"] is not None]
    opened = [x for x in drifted if any(e.get("kind") == "opened" for e in x.get("events", ()))
              or x.get("alert_active")]
    named = [x for x in opened if x["description"]]
    if named:
        return True, f"{named[0]['window_id']}: axis {named[0]['top_axis']}, {named[0]['description']}"
    if drifted:
        return False, f"drift on {', '.join(x['window_id'] for x in drifted)} but no alert opened (policy hysteresis)"
    return False, "no drift detected on the faulty days"


def _ui_link() -> str:
    from pipeline.tracking.ui import ui_url

    return ui_url()


def summary_text(result: DemoResult) -> str:
    """The printed summary: checks, model lineage, timings, and how to look at it in MLflow."""
    lines = ["", "  check                                              result", "  " + "-" * 70]
    for name, (ok, detail) in result.checks.items():
        lines.append(f"  {name:<50} {'PASS' if ok else 'FAIL'}  {detail[:110]}")
    v1, v2 = result.v1, result.v2
    lines += ["", "  model  alias       parent  train  calib  gate", "  " + "-" * 70]
    for v in (v1, v2) if v2 else (v1,):
        lines.append(f"  v{v['version']:<5} {v['alias']:<11} {('v' + str(v['parent_version'])) if v['parent_version'] else '-':<7} "
                     f"{v['n_train']:<6} {v['n_calibration']:<6} {v['gate']['reason'][:80]}")
    if v2 and v2.get("alignment") is not None:
        lines.append(f"  axis alignment v{v1['version']} -> v{v2['version']}: mean |r| = {v2['alignment']:.2f}")
    alerts = [w for w in result.monitor["windows"] if w["detected"]]
    for w in alerts:
        if w.get("report"):
            lines.append(f"  drift report {w['window_id']}: {w['report']}")
    lines += ["", "  time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items()), "",
              f"  state: {result.home}",
              "  open the MLflow UI on the local SQLite store with:",
              f"    LINEWATCH_HOME={result.home} linewatch ui",
              f"  or: {result.ui_command}",
              f"  then open {_ui_link()} (docs/mlflow.md: where to click)",
              "", "  demo " + ("PASSED" if result.ok else "FAILED: see the checks above")]
    return "\n".join(lines)
