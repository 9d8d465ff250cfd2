"""The closed loop on a running line: a simulated 30-day soak driven through the real commands, day after day.

Two lines of real ELPV cells (100-200 cells per line-day, about 5 % defective cells, lot order so the mono/poly mix
swings from day to day as on a real line) are simulated up front with a schedule of faults (camera gain, blur,
sensor noise, illumination non-uniformity, a defect surge, and a product-mix change that is normal production) into
a staging folder. A month draws each of ELPV's cells 3-4 times; each replay shows the cell in its next mirrored view
(``SoakConfig.mirror_repeats``), so a model is not judged on the very images it trained on. Then, for every
simulated day, that day's folders are released into the drop folder and the documented commands run in schedule
order with the default settings:

1. ``linewatch ingest <drop>``: the line's new images;
2. ``linewatch monitor``: the 15-minute monitor, which tests the finished day with the current champion;
3. ``linewatch nightly``: ingest, retrain (the promotion gate), monitor with the (new) champion.

Every command runs in a subprocess (``--driver cli``, the default: what a plant's scheduler runs, with the local
SQLite MLflow and the local Prefect of ``make demo``) or in-process through the same entry points without Prefect
(``--driver local``, for the fast version in ``make test``). Nothing is done by hand between days. Each command's
exit status, wall time and JSON answer are appended to ``<home>/soak_log.jsonl`` as the soak goes, so an interrupted
soak resumes with ``--resume``. At the end :mod:`benchmarks.soak_eval` scores what the loop said against the ground
truth and writes ``benchmarks/results/<name>.md`` and ``.json``.

Run: ``.venv/bin/python -m benchmarks.soak`` (about two hours on 2 cores; ``make bench`` runs it), ``--days 6
--lines L1 --per-day 60 --fast`` for a quick look, ``--code-dir /path/to/other/checkout`` to run the commands with
another checkout's code (the simulation and the scoring stay this tree's), ``--golden-cells 5`` for a line that
re-images five golden cells every shift (the production captures stay the same; a camera fault is then also rightly
named by a "camera/optics changed" alert), ``--schedule compact`` for every fault of the schedule in 15 days,
``--report-only`` to rescore a finished home.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import OUT, ROOT, log
from pipeline.line.faults import FaultSpec

SOAK_HOME = OUT / "soak"

#: The 30-day schedule (0-based day indices; each fault lasts ``duration_days``; healthy days between faults).
DEFAULT_SCHEDULE: tuple[FaultSpec, ...] = (
    FaultSpec("gain", start_day=5, severity=1.0, duration_days=3, lines=("L1",)),          # x0.75
    FaultSpec("blur", start_day=8, severity=1.0, duration_days=3, lines=("L2",)),          # sigma 1.5 px
    FaultSpec("illumination", start_day=11, severity=1.0, duration_days=3, lines=("L1",)),  # border 30 % darker
    FaultSpec("noise", start_day=14, severity=1.0, duration_days=2, lines=("L2",)),        # sigma 3 % of range
    FaultSpec("product_mix", start_day=17, severity=1.0, duration_days=4, lines=("L1",)),  # +40 % mono: normal
    FaultSpec("defect_rate", start_day=21, severity=0.5, duration_days=3, lines=("L2",)),  # 5 % -> 20 % p = 1
)

#: Every fault of the default schedule in 14 days (``--schedule compact``): 2-day faults, the two lines interleaved,
#: at least one healthy day between two faults of a line, three healthy days before the first fault.
COMPACT_SCHEDULE: tuple[FaultSpec, ...] = (
    FaultSpec("gain", start_day=3, severity=1.0, duration_days=2, lines=("L1",)),
    FaultSpec("blur", start_day=4, severity=1.0, duration_days=2, lines=("L2",)),
    FaultSpec("illumination", start_day=7, severity=1.0, duration_days=2, lines=("L1",)),
    FaultSpec("defect_rate", start_day=8, severity=0.5, duration_days=2, lines=("L2",)),
    FaultSpec("product_mix", start_day=10, severity=1.0, duration_days=3, lines=("L1",)),
    FaultSpec("noise", start_day=11, severity=1.0, duration_days=2, lines=("L2",)),
)

#: The schedules ``--schedule`` names.
SCHEDULES: dict[str, tuple[FaultSpec, ...]] = {"default": DEFAULT_SCHEDULE, "compact": COMPACT_SCHEDULE}

#: Days each schedule runs when ``--days`` is not given: its last fault's end plus two days to resolve the alert.
SCHEDULE_DAYS: dict[str, int] = {"default": 30, "compact": 15}


@dataclass(frozen=True)
class SoakConfig:
    """One soak.

    Attributes:
        name: results file stem (``benchmarks/results/<name>.md``) and home folder name.
        home: ``LINEWATCH_HOME`` of the soak (wiped at the start unless resuming).
        days: simulated production days.
        lines: production lines.
        per_day: captures per line-day, or a ``(low, high)`` range drawn per line-day.
        defect_share: mean share of defective (p = 1) cells of a healthy day.
        defect_jitter: each day's share is drawn uniformly in ``defect_share +- defect_jitter``.
        pool: ELPV pool replayed (``"all"``: no model is pre-trained on ELPV here; the line trains its own).
        order: ``"lot"`` (whole modules in file order: daily product-mix swings and lot-to-lot variation).
        mirror_repeats: show each replay of an ELPV cell in its next mirrored view (``pipeline.line.simulate``): a
            month of two lines draws each of ELPV's cells 3-4 times, and a real line never shows a model a cell it
            trained on.
        faults: the fault schedule.
        first_monitored_day: first day that must have a verdict (the first nightly runs after day 0).
        timezone: the plant's ``LINEWATCH_TIMEZONE`` (the simulated MES writes CET, UTC+01:00).
        driver: ``"cli"`` (subprocess commands) or ``"local"`` (in-process, no Prefect).
        code_dir: run the commands with this checkout's code (None: this tree).
        retrain: retrain parameters other than the defaults (``--preset``/``--steps``/``--window-days`` on the
            command line; the local driver takes any ``pipeline.training.retrain.RetrainConfig`` field).
        monitor: monitor parameters other than the defaults (``pipeline.monitoring.config.MonitorConfig`` fields).
        fpr: the per-image false-flag rate the monitor is configured with (what the flags are scored against).
        seed: simulation seed.
        golden_cells: golden cells per line, re-imaged at the start of every shift (``pipeline.line.simulate``;
            0 = a line without golden samples). Production captures are the same with or without them.
        threads: torch / OpenMP threads of every command (``OMP_NUM_THREADS``). One by default: on a shared,
            oversubscribed machine two threads made a training step 20x slower than one (0.47 s vs 11.4 s per tiny
            step at a load average of 17 on 2 cores); on two free cores use 2.
    """

    name: str = "soak"
    home: Path = SOAK_HOME / "soak"
    days: int = 30
    lines: tuple[str, ...] = ("L1", "L2")
    per_day: int | tuple[int, int] = (100, 200)
    defect_share: float = 0.05
    defect_jitter: float = 0.015
    pool: str = "all"
    order: str = "lot"
    mirror_repeats: bool = True
    faults: tuple[FaultSpec, ...] = DEFAULT_SCHEDULE
    first_monitored_day: int = 1
    timezone: str = "Europe/Berlin"
    driver: str = "cli"
    code_dir: Path | None = None
    retrain: dict[str, Any] = field(default_factory=dict)
    monitor: dict[str, Any] = field(default_factory=dict)
    fpr: float = 0.05
    seed: int = 0
    golden_cells: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.driver not in ("cli", "local"):
            raise ValueError(f"driver must be 'cli' or 'local', got {self.driver!r}")
        if not 0 < self.first_monitored_day < self.days:
            raise ValueError(f"first_monitored_day must be in 1..{self.days - 1}, got {self.first_monitored_day}")
        if not 0 <= self.golden_cells <= 50:
            raise ValueError(f"golden_cells must be in 0..50, got {self.golden_cells}")
        for f in self.faults:
            if f.start_day >= self.days or not set(f.lines or self.lines) <= set(self.lines):
                raise ValueError(f"fault {f} is outside the soak's days or lines")

    def date(self, day: int) -> dt.date:
        """Calendar date of day index ``day``."""
        from pipeline.line.simulate import DEFAULT_START

        return DEFAULT_START + dt.timedelta(days=day)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        d = dataclasses.asdict(self)
        d["home"], d["code_dir"] = str(self.home), None if self.code_dir is None else str(self.code_dir)
        d["faults"] = [dataclasses.asdict(f) for f in self.faults]
        return json.loads(json.dumps(d, default=str))


def config_from_dict(d: dict[str, Any]) -> SoakConfig:
    """The soak a :meth:`SoakConfig.to_dict` (``<home>/soak_config.json``) describes."""
    d = dict(d)
    d["home"], d["code_dir"] = Path(d["home"]), None if d.get("code_dir") is None else Path(d["code_dir"])
    d["faults"] = tuple(FaultSpec(**{**f, "lines": tuple(f["lines"]) if f.get("lines") else f.get("lines")})
                        for f in d["faults"])
    d["lines"] = tuple(d["lines"])
    d.setdefault("mirror_repeats", False)  # soaks saved before the option replayed cells unchanged
    if isinstance(d.get("per_day"), list):
        d["per_day"] = tuple(d["per_day"])
    return SoakConfig(**d)


def saved_config(home: Path) -> SoakConfig | None:
    """The settings a soak in ``home`` was run with (None when it has none yet)."""
    path = Path(home) / "soak_config.json"
    return config_from_dict(json.loads(path.read_text())) if path.is_file() else None


def fast_config(home: Path, name: str = "soak_fast") -> SoakConfig:
    """Eight days of one line on the tiny preset with one strong fault: the loop's wiring in a few minutes.

    The first model comes with day 3's nightly: before that the reference holds fewer than the four line-days the lot
    null needs (``MonitorConfig.min_reference_blocks``), so the first monitored day is day 3. The fault (camera gain,
    days 5-6) falls on the product the first model knows (the lot order makes the first seven days mono cells): a
    fault on a product no model has seen yet cannot be told from that product's normal look without golden samples
    (``docs/monitoring.md``).
    """
    gate = {"recon_images": 4, "recon_steps": 4, "eval_repeats": 1, "fpr_tolerance": 0.3, "axis_std_floor": 0.005}
    return SoakConfig(
        name=name, home=home, days=8, lines=("L1",), per_day=25, defect_jitter=0.0, first_monitored_day=3,
        faults=(FaultSpec("gain", start_day=5, severity=1.6, duration_days=2, lines=("L1",)),),
        driver="local",
        retrain={"preset": "tiny", "steps": 60, "batch_size": 16, "holdout_share": 0.5, "min_train_images": 8,
                 "gate": gate, "scoring": {"seeds": [0]}, "monitor": {"min_window": 15}},
        monitor={"min_window": 15, "cards": False, "report": False},
    )


def first_days(config: SoakConfig, days: int) -> SoakConfig:
    """The soak ``config`` cut to its first ``days`` days (faults starting later dropped): how a soak stopped early
    is scored on the days it ran (``--report-only --days N``)."""
    if not config.first_monitored_day < days <= config.days:
        raise ValueError(f"days must be in {config.first_monitored_day + 1}..{config.days}, got {days}")
    return dataclasses.replace(config, days=days, faults=tuple(f for f in config.faults if f.start_day < days))


# --------------------------------------------------------------------------------------------------------------
# The line: simulated up front, released day by day
# --------------------------------------------------------------------------------------------------------------
def day_defect_shares(config: SoakConfig) -> list[float]:
    """The healthy defect share of each day (seeded, uniform in ``defect_share +- defect_jitter``)."""
    import numpy as np

    rng = np.random.default_rng([config.seed, 7])
    lo, hi = config.defect_share - config.defect_jitter, config.defect_share + config.defect_jitter
    return [float(x) for x in rng.uniform(max(0.0, lo), min(1.0, hi), size=config.days).round(4)]


def stage_line(config: SoakConfig) -> Path:
    """Simulate every day of every line into ``<home>/staging`` (ground truth in ``<home>/truth.parquet``)."""
    from pipeline.line.simulate import DEFAULT_START, simulate_line

    staging = config.home / "staging"
    if (config.home / "truth.parquet").exists():
        return staging
    simulate_line(staging, days=config.days, per_day=config.per_day, lines=config.lines, start=DEFAULT_START,
                  seed=config.seed, defect_rate=day_defect_shares(config), faults=config.faults, pool=config.pool,
                  order=config.order, truth=config.home / "truth.parquet", progress=False,
                  mirror_repeats=config.mirror_repeats, golden_cells=config.golden_cells)
    return staging


def release_day(config: SoakConfig, drop: Path, day: int) -> int:
    """Move day ``day``'s folders of every line from the staging folder into the drop folder; returns images."""
    n = 0
    for line in config.lines:
        src = config.home / "staging" / line / config.date(day).isoformat()
        dst = drop / line / config.date(day).isoformat()
        if src.is_dir():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), str(dst))
        n += len(list(dst.glob("*.png"))) if dst.is_dir() else 0
    return n


# --------------------------------------------------------------------------------------------------------------
# Drivers: how the commands run
# --------------------------------------------------------------------------------------------------------------
def environment(config: SoakConfig) -> dict[str, str]:
    """The installation's environment: everything under the soak's home, local SQLite MLflow, local Prefect."""
    home = config.home.resolve()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LINEWATCH_", "MLFLOW_", "PREFECT_")) and k != "PYTHONPATH"}
    env.update({"LINEWATCH_HOME": str(home), "LINEWATCH_TIMEZONE": config.timezone,
                "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}", "PREFECT_HOME": str(home / "prefect"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
                "OMP_NUM_THREADS": str(config.threads), "MKL_NUM_THREADS": str(config.threads),
                "PYTHONPATH": str((config.code_dir or ROOT).resolve())})
    return env


def parse_json_answer(stdout: str) -> Any:
    """The JSON document a command printed (the last one that parses from a line starting with ``{``)."""
    lines = stdout.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:
                return json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
    return None


#: What the ``linewatch`` console script runs (``pipeline.cli:main``), with the process's arguments.
_ENTRY = "import sys; from pipeline.cli import main; sys.argv[0] = 'linewatch'; sys.exit(main(sys.argv[1:]))"


class CliDriver:
    """Runs ``linewatch <command>`` in a subprocess per step, as a scheduler would."""

    def __init__(self, config: SoakConfig) -> None:
        self.config = config
        self.env = environment(config)

    def _run(self, args: list[str], timeout: float = 3600.0) -> dict[str, Any]:
        import resource

        t0 = time.perf_counter()
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            proc = subprocess.run([sys.executable, "-c", _ENTRY, *args], env=self.env, cwd=self.config.home,
                                  capture_output=True, text=True, timeout=timeout)
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, out, err = 124, str(exc.stdout or ""), f"timed out after {timeout:.0f} s"
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        return {"rc": rc, "seconds": round(time.perf_counter() - t0, 2), "cpu_s": round(cpu, 2),
                "result": parse_json_answer(out), "stderr_tail": err[-1500:], "stderr_lines": err.count("\n")}

    def ingest(self) -> dict[str, Any]:
        """``linewatch ingest <drop> --json``."""
        return self._run(["ingest", str(self.config.home / "drop"), "--json"])

    def monitor(self) -> dict[str, Any]:
        """``linewatch monitor --json`` (default settings unless the soak overrides some)."""
        flags = {"lookback_days": "--lookback-days", "window_by": "--window-by"}
        args = ["monitor"] + [x for k, v in self.config.monitor.items() if k in flags for x in (flags[k], str(v))]
        args += ["--no-quality"] if self.config.monitor.get("quality") is False else []
        args += ["--no-scores"] if self.config.monitor.get("scores") is False else []
        return self._run(args + ["--json"])

    def nightly(self) -> dict[str, Any]:
        """``linewatch nightly --json`` (ingest, retrain, monitor)."""
        flags = {"preset": "--preset", "steps": "--steps", "window_days": "--window-days"}
        return self._run(["nightly"] + [x for k, v in self.config.retrain.items() if k in flags
                                        for x in (flags[k], str(v))] + ["--json"], timeout=7200.0)


class LocalDriver:
    """Runs the same jobs in-process (``pipeline.catalog.ingest``, ``pipeline.monitoring.monitor``, ``pipeline.training.retrain``), no Prefect."""

    def __init__(self, config: SoakConfig) -> None:
        self.config = config
        os.environ.update({k: v for k, v in environment(config).items() if k != "PYTHONPATH"})
        import torch

        from pipeline import tracking

        torch.set_num_threads(config.threads)
        tracking.reset()

    @staticmethod
    def _timed(fn: Any) -> dict[str, Any]:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            result, rc, err = fn(), 0, ""
        except Exception as exc:  # noqa: BLE001 - the soak records a failed step and goes on, as a scheduler does
            result, rc, err = None, 1, f"{type(exc).__name__}: {exc}"
        return {"rc": rc, "seconds": round(time.perf_counter() - t0, 2),
                "cpu_s": round(time.process_time() - c0, 2), "result": result, "stderr_tail": err, "stderr_lines": 0}

    def _settings(self) -> Any:
        from pipeline.settings import ensure_dirs, get_settings

        return ensure_dirs(get_settings())

    def ingest(self) -> dict[str, Any]:
        """``pipeline.catalog.ingest.ingest`` of the drop folder."""
        from pipeline.catalog.ingest import ingest

        return self._timed(lambda: ingest(self._settings().drop_dir, self._settings().catalog_root,
                                          progress=False).to_dict())

    def _monitor(self) -> dict[str, Any]:
        from pipeline.monitoring.monitor import monitor, monitor_config

        return monitor(self._settings(), monitor_config(**self.config.monitor)).to_dict()

    def monitor(self) -> dict[str, Any]:
        """``pipeline.monitoring.monitor.monitor`` with the soak's monitor parameters; skipped with the CLI's exit 4
        while the line has no champion (``flows.monitor.skip_reason``)."""
        from flows.cli import EXIT_NOTHING_YET
        from flows.monitor import skip_reason

        skipped = skip_reason()
        if skipped:
            return {**self._timed(lambda: {"skipped": skipped, "windows": []}), "rc": EXIT_NOTHING_YET}
        return self._timed(self._monitor)

    def nightly(self) -> dict[str, Any]:
        """Ingest, retrain, monitor (the nightly flow's steps, ``flows/nightly.py``).

        As there, a retrain with too few healthy images (no candidate) leaves the champion and the monitor step still
        runs (skipped while the line has no champion yet); the record's exit code is then the CLI's
        ``EXIT_NO_CANDIDATE``. Any other failing step stops the run.
        """
        from flows.cli import EXIT_NO_CANDIDATE
        from flows.nightly import monitor_skip_reason
        from pipeline.catalog.ingest import ingest
        from pipeline.monitoring.monitor import monitor_config, retrain_hooks
        from pipeline.training.retrain import InsufficientData, retrain, retrain_config

        def run() -> dict[str, Any]:
            s = self._settings()
            out: dict[str, Any] = {"ingest": ingest(s.drop_dir, s.catalog_root, progress=False).to_dict()}
            cfg = retrain_config(**self.config.retrain)
            hooks = retrain_hooks(s, monitor_config(**(cfg.monitor or {})))  # as flows/retrain.py wires them
            try:
                out["retrain"] = retrain(s, cfg, hooks=hooks).to_dict()
            except InsufficientData as exc:
                out["retrain"] = {"status": "no_candidate", "promoted": False, "reason": str(exc)}
            skipped = monitor_skip_reason(bool(out["retrain"].get("promoted")))
            if skipped:
                out["monitor_skipped"] = skipped
            else:
                out["monitor"] = self._monitor()
            return out

        rec = self._timed(run)
        if rec["result"] is not None and rec["result"]["retrain"].get("status") == "no_candidate":
            rec.update(rc=EXIT_NO_CANDIDATE, stderr_tail=f"InsufficientData: {rec['result']['retrain']['reason']}")
        return rec


def make_driver(config: SoakConfig) -> CliDriver | LocalDriver:
    """The driver the config names."""
    return CliDriver(config) if config.driver == "cli" else LocalDriver(config)


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------
def log_path(config: SoakConfig) -> Path:
    """Append-only record of every command the soak ran (one JSON object per line)."""
    return config.home / "soak_log.jsonl"


def read_log(config: SoakConfig) -> list[dict[str, Any]]:
    """The soak's command records."""
    path = log_path(config)
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def prepare_home(config: SoakConfig, resume: bool) -> int:
    """Wipe (or keep, when resuming) the home; returns the first day still to run."""
    done = {r["day"] for r in read_log(config) if r["command"] == "nightly"} if resume else set()
    if not resume and config.home.exists():
        shutil.rmtree(config.home)
    config.home.mkdir(parents=True, exist_ok=True)
    (config.home / "soak_config.json").write_text(json.dumps(config.to_dict(), indent=1))
    return max(done) + 1 if done else 0


def run_day(config: SoakConfig, driver: Any, day: int) -> list[dict[str, Any]]:
    """Release one day of production and run its commands in schedule order; returns their records."""
    n = release_day(config, config.home / "drop", day)
    records = []
    for command in ("ingest", "monitor", "nightly"):
        rec = {"day": day, "date": config.date(day).isoformat(), "command": command, "images_released": n,
               **getattr(driver, command)(), "finished_at": dt.datetime.now(dt.UTC).isoformat()}
        records.append(rec)
        with open(log_path(config), "a") as fh:
            fh.write(json.dumps(rec, default=str) + "\n")
        log(f"{config.name} day {day} ({rec['date']}): {command} exit {rec['rc']} in {rec['seconds']:.0f} s")
    return records


def run_soak(config: SoakConfig, *, resume: bool = False, days: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Simulate the line, then run every day's commands; returns all command records (from the log)."""
    first = prepare_home(config, resume)
    stage_line(config)
    driver = make_driver(config)
    for day in days if days is not None else range(first, config.days):
        run_day(config, driver, day)
    return read_log(config)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------
def config_from_args(args: argparse.Namespace) -> SoakConfig:
    """The soak the command line asks for."""
    home = Path(args.home) if args.home else SOAK_HOME / args.name
    if args.fast:
        cfg = fast_config(home, args.name)
    else:
        cfg = SoakConfig(name=args.name, home=home)
    over: dict[str, Any] = {"driver": args.driver or cfg.driver}
    if args.schedule:
        over["faults"] = SCHEDULES[args.schedule]
    days = args.days or (SCHEDULE_DAYS[args.schedule] if args.schedule else None)
    if days:
        over["days"] = days
        over["faults"] = tuple(f for f in over.get("faults", cfg.faults) if f.start_day < days)
    if args.lines:
        over["lines"] = tuple(args.lines.split(","))
        over["faults"] = tuple(f for f in over.get("faults", cfg.faults) if set(f.lines or ()) <= set(over["lines"]))
    if args.per_day:
        lo, _, hi = args.per_day.partition("-")
        over["per_day"] = (int(lo), int(hi)) if hi else int(lo)
    if args.code_dir:
        over["code_dir"] = Path(args.code_dir)
    if args.threads:
        over["threads"] = args.threads
    if args.replay_unchanged:
        over["mirror_repeats"] = False
    if args.golden_cells is not None:
        over["golden_cells"] = args.golden_cells
    if args.preset or args.steps:
        over["retrain"] = {**cfg.retrain, **({"preset": args.preset} if args.preset else {}),
                           **({"steps": args.steps} if args.steps else {})}
    return dataclasses.replace(cfg, **over)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="soak", help="results file stem and home folder name (default soak)")
    ap.add_argument("--home", default=None, help="LINEWATCH_HOME of the soak (default benchmarks/out/soak/NAME)")
    ap.add_argument("--days", type=int, default=None,
                    help="simulated days (default 30, 15 with --schedule compact; faults after it dropped); with "
                         "--report-only, score only the first DAYS days of a soak stopped early")
    ap.add_argument("--schedule", choices=sorted(SCHEDULES), default=None,
                    help="fault schedule: default (30 days) or compact (every fault in 14 days)")
    ap.add_argument("--lines", default=None, help="lines, comma-separated (default L1,L2)")
    ap.add_argument("--per-day", default=None, help="cells per line-day: K or LOW-HIGH (default 100-200)")
    ap.add_argument("--driver", choices=("cli", "local"), default=None, help="subprocess commands (default) or in-process")
    ap.add_argument("--code-dir", default=None, help="run the commands with another checkout's code")
    ap.add_argument("--preset", default=None, help="model preset of the nightly (default: the command's default)")
    ap.add_argument("--steps", type=int, default=None, help="training steps of the nightly (default: the command's)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per command (default 1)")
    ap.add_argument("--replay-unchanged", action="store_true",
                    help="replay ELPV cells as they are (default: each replay in its next mirrored view)")
    ap.add_argument("--golden-cells", type=int, default=None,
                    help="golden cells per line, re-imaged every shift (default 0: a line without golden samples)")
    ap.add_argument("--fast", action="store_true", help="the fast version: tiny preset, one line, one fault")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted soak in its home")
    ap.add_argument("--report-only", action="store_true", help="only score a finished soak's home")
    ap.add_argument("--harness-log", default=None,
                    help="the harness's progress lines of the scored soak (its stderr), for commands that printed no "
                         "JSON answer (soaks before --json was passed)")
    args = ap.parse_args(argv)
    from benchmarks.soak_eval import evaluate, write_results

    config = config_from_args(args)
    saved = saved_config(config.home) if (args.report_only or args.resume) else None
    if saved is not None and saved != config:
        log(f"[soak] {config.home}: using the settings the soak was run with (soak_config.json), not the command line's")
        config = saved
    if args.report_only and args.days and saved is not None and args.days < saved.days:
        config = first_days(saved, args.days)
        log(f"[soak] scoring the first {args.days} of the soak's {saved.days} days")
    t0 = time.perf_counter()
    if not args.report_only:
        run_soak(config, resume=args.resume)
    summary = evaluate(config, Path(args.harness_log).read_text() if args.harness_log else None)
    summary["soak_wall_s"] = round(time.perf_counter() - t0, 1) if not args.report_only else None
    argv_ = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
    summary["command"] = ".venv/bin/python -m benchmarks.soak " + " ".join(argv_)

    md = write_results(config, summary)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
