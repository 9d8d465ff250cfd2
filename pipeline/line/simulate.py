"""A simulated EL inspection line that replays real ELPV cells into a drop folder.

For every line and day, :func:`simulate_line` writes

* ``DROP/<line>/<YYYY-MM-DD>/<serial>.png``: 8-bit grey 300 x 300 captures, serial ``<line>-<YYYYMMDD>-<nnnnnn>``;
* ``DROP/<line>/<YYYY-MM-DD>/mes_export.csv``: the line's own metadata export, as a manufacturing execution system
  (MES) would write it: ``serial, timestamp, line, station, product_type`` (no defect labels);

and, **outside** the drop folder (the pipeline never reads it), one ground-truth Parquet file for evaluation: each
image's source ELPV cell, defect probability, type, lot, pool, and the injected fault's kind, severity and parameter.

**Golden samples** (``golden_cells=k``, default 0 = none): each line has ``k`` fixed healthy cells (its golden
cells ``G01`` ... ``Gk``), imaged again in the hand-over at the start of every shift through the camera as it is
then (active image faults apply to them; population faults do not, the cells are fixed). Their serials are
``<line>-<YYYYMMDD>-S<shift>G<nn>`` and the MES export gains two columns, ``sample_kind`` (``production`` or
``golden``) and ``golden_cell`` (the golden cell's id); without golden cells the export and every production
capture are exactly as before (golden captures draw from their own random streams).

Cells are drawn from an ELPV pool (see :mod:`pipeline.line.elpv`), in lot order by default (whole modules replayed in
file order, as a real line's cells come in lots) or shuffled. Capture times follow three 8-hour shifts with
hand-overs, breaks and random unplanned stops. Every capture carries a small sensor read noise
(``capture_noise_dn``, default sigma = 1 grey level) so repeated replays of a cell are not byte-identical files,
as on a real camera. The output is deterministic for a seed: the same arguments give the same bytes.

**Repeated cells.** ELPV holds 2,624 cells; a month of two lines draws several times that, so a long simulation
replays each cell several times, and a model retrained on the line has then seen most of the cells it is judged on
(in a 30-day, 2-line soak, 80-100 % of the cells of day 13 on). A real line never shows a model the same cell twice.
With ``mirror_repeats=True`` the k-th replay of a cell in one call is the cell turned by 180 degrees, then mirrored
left-right, then top-bottom (k = 1, 2, 3; then again from the original), as the cell would be imaged if placed the
other way round. A mirrored cell is a new cell to a patch detector: a patch bank of 1,200 cells scores their
mirrored views like cells it never saw (AUROC 0.46-0.50 between the two), and their unchanged views lower. The truth
file records the view in ``mirror`` (0 = as in ELPV; golden cells are always captured as they are).
"""

from __future__ import annotations

import datetime as dt
import math
import re
import sys
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from pipeline.common import atomic
from pipeline.line.elpv import load_elpv, pool_indices, resolve_pools, split_pools
from pipeline.line.faults import FAULTS, FaultSpec, apply_fault, noise

__all__ = [
    "DEFAULT_START",
    "GOLDEN_MES_COLUMNS",
    "MES_COLUMNS",
    "ORDERS",
    "PLANT_TZ",
    "SHIFTS",
    "FaultSpec",
    "SimulationResult",
    "capture_times",
    "default_truth_path",
    "golden_cell_indices",
    "simulate_line",
]

MES_COLUMNS: tuple[str, ...] = ("serial", "timestamp", "line", "station", "product_type")
"""Columns of the per-day MES export ``mes_export.csv``."""
GOLDEN_MES_COLUMNS: tuple[str, ...] = ("sample_kind", "golden_cell")
"""Columns the MES export gains on a line with golden cells."""
GOLDEN_MINUTES = (1.0, 12.0)
"""Golden cells are imaged this many minutes after a shift starts (inside its hand-over), one after another."""

MES_FILENAME = "mes_export.csv"
ORDERS: tuple[str, str] = ("lot", "shuffled")
DEFAULT_START = dt.date(2026, 1, 5)
"""Default first production day (a Monday); fixed so that runs are reproducible."""

PLANT_TZ = dt.timezone(dt.timedelta(hours=1), "CET")
"""Local time of the simulated plant (UTC+01:00, no daylight saving)."""

SHIFTS: tuple[tuple[str, float, float], ...] = (("night", 0.0, 8.0), ("early", 8.0, 16.0), ("late", 16.0, 24.0))
"""Shift name, start hour, end hour (local time)."""

HANDOVER_MIN = 15.0
"""Minutes without production at the start of each shift (hand-over)."""
BREAK_MIN = 30.0
"""Minutes of break in the middle of each shift."""
STOPS_PER_DAY = 1.0
"""Mean number of unplanned stops per day (Poisson)."""
STOP_MIN = (20.0, 120.0)
"""Range of an unplanned stop's duration, minutes (uniform)."""
STATIONS_PER_LINE = 2
"""EL test stations per line, ``<line>-EL1`` ... (a capture goes to either at random)."""

_LINE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class SimulationResult:
    """What :func:`simulate_line` wrote.

    Attributes:
        out: the drop folder.
        paths: every image written, in (line, day, capture time) order.
        metadata_files: the MES exports, one per line and day.
        truth_path: the ground-truth Parquet file (outside ``out``).
        n_images: number of images written.
        dates: the simulated production days.
        lines: the simulated lines.
    """

    out: Path
    paths: tuple[Path, ...]
    metadata_files: tuple[Path, ...]
    truth_path: Path
    n_images: int
    dates: tuple[dt.date, ...] = field(default=())
    lines: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary (paths as strings, not the list of images)."""
        return {
            "out": str(self.out),
            "truth_path": str(self.truth_path),
            "n_images": self.n_images,
            "metadata_files": [str(p) for p in self.metadata_files],
            "dates": [d.isoformat() for d in self.dates],
            "lines": list(self.lines),
        }


def default_truth_path(out: Path) -> Path:
    """The default ground-truth file of a drop folder: ``<out's parent>/<out's name>_truth.parquet`` (absolute)."""
    out = Path(out).resolve()
    return out.parent / f"{out.name}_truth.parquet"


def _stable_id(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _production_intervals(rng: np.random.Generator) -> list[tuple[float, float]]:
    """Production windows of one day, in seconds since local midnight (shifts minus hand-overs, breaks, stops)."""
    windows: list[tuple[float, float]] = []
    for _, h0, h1 in SHIFTS:
        s0, s1 = h0 * 3600 + HANDOVER_MIN * 60, h1 * 3600
        mid = (h0 + h1) / 2 * 3600
        windows += [(s0, mid - BREAK_MIN * 30), (mid + BREAK_MIN * 30, s1)]
    for _ in range(int(rng.poisson(STOPS_PER_DAY))):
        length = rng.uniform(*STOP_MIN) * 60
        a = rng.uniform(0, 86400 - length)
        b = a + length
        cut: list[tuple[float, float]] = []
        for w0, w1 in windows:
            if b <= w0 or a >= w1:
                cut.append((w0, w1))
                continue
            if a > w0:
                cut.append((w0, a))
            if b < w1:
                cut.append((b, w1))
        windows = cut
    return [(a, b) for a, b in windows if b - a > 1.0]


def capture_times(n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted capture times of ``n`` cells on one day, seconds since local midnight, millisecond resolution.

    Times are uniform over the day's production windows (a Poisson-like arrival stream), so gaps appear at shift
    hand-overs, breaks and random unplanned stops.

    Args:
        n: number of captures.
        rng: random generator.

    Returns:
        float array (n,) of seconds, sorted, each a multiple of 1 ms.
    """
    windows = _production_intervals(rng)
    lengths = np.array([b - a for a, b in windows])
    cum = np.concatenate([[0.0], np.cumsum(lengths)])
    u = np.sort(rng.uniform(0.0, cum[-1], size=n))
    k = np.clip(np.searchsorted(cum, u, side="right") - 1, 0, len(windows) - 1)
    starts = np.array([a for a, _ in windows])
    t = starts[k] + (u - cum[k])
    return np.floor(t * 1000.0) / 1000.0


class _Cycler:
    """Endless draws from a set of indices: a fresh seeded permutation each pass (no repeat within a pass)."""

    def __init__(self, items: np.ndarray, rng: np.random.Generator) -> None:
        self.items = np.asarray(items)
        self.rng = rng
        self.order: np.ndarray = np.empty(0, dtype=self.items.dtype)
        self.pos = 0

    def next(self) -> Any:
        if self.pos >= len(self.order):
            self.order = self.rng.permutation(self.items)
            self.pos = 0
        self.pos += 1
        return self.order[self.pos - 1]


class _CellSource:
    """Draws ELPV cells for one line, in lot order or shuffled, with optional imposed mono share / defect rate."""

    def __init__(self, idx: np.ndarray, order: str, rng: np.random.Generator) -> None:
        data = load_elpv()
        self.rng = rng
        self.order = order
        self.types = data.types
        self.defective = data.probs >= 1.0 - 1e-9
        self.lot_of = data.lot
        self._cyclers: dict[tuple[str | None, bool | None], _Cycler] = {}
        self.idx = np.asarray(idx)
        lots = np.unique(data.lot[self.idx])
        self.lot_cells = {int(lt): self.idx[data.lot[self.idx] == lt] for lt in lots}
        self.lot_type = {lt: str(self.types[c[0]]) for lt, c in self.lot_cells.items()}
        self._lot_cycler = _Cycler(lots, rng)
        self._lot_cycler_by_type = {
            t: _Cycler(np.array([lt for lt in lots if self.lot_type[int(lt)] == t]), rng)
            for t in ("mono", "poly")
            if any(v == t for v in self.lot_type.values())
        }
        self.cur_lot: int | None = None
        self.consumed = 0
        self.cursor = {True: 0, False: 0}

    def _group(self, typ: str | None, defective: bool | None) -> _Cycler:
        key = (typ, defective)
        if key not in self._cyclers:
            keep = np.ones(len(self.idx), dtype=bool)
            if typ is not None:
                keep &= self.types[self.idx] == typ
            if defective is not None:
                keep &= self.defective[self.idx] == defective
            if not keep.any():
                raise ValueError(
                    f"the replayed pool has no {typ or 'any-type'} cells with defective={defective}; "
                    "choose a larger pool (e.g. --pool all)"
                )
            self._cyclers[key] = _Cycler(self.idx[keep], self.rng)
        return self._cyclers[key]

    def _choose_type(self, mono_share: float | None) -> str | None:
        if mono_share is None:
            return None
        return "mono" if self.rng.random() < mono_share else "poly"

    def draw(self, mono_share: float | None, defect_rate: float | None) -> int:
        """One ELPV index; ``None`` shares mean the pool's natural composition."""
        if self.order == "shuffled":
            typ = self._choose_type(mono_share)
            d = None if defect_rate is None else bool(self.rng.random() < defect_rate)
            return int(self._group(typ, d).next())
        if self.cur_lot is None or self.consumed >= len(self.lot_cells[self.cur_lot]):
            typ = self._choose_type(mono_share)
            if typ is None:
                self.cur_lot = int(self._lot_cycler.next())
            elif typ in self._lot_cycler_by_type:
                self.cur_lot = int(self._lot_cycler_by_type[typ].next())
            else:
                raise ValueError(f"the replayed pool has no {typ} lots; choose a larger pool (e.g. --pool all)")
            self.consumed = 0
            self.cursor = {True: 0, False: 0}
        cells = self.lot_cells[self.cur_lot]
        self.consumed += 1
        if defect_rate is None:
            return int(cells[self.consumed - 1])
        d = bool(self.rng.random() < defect_rate)
        queue = cells[self.defective[cells] == d]
        if self.cursor[d] < len(queue):
            self.cursor[d] += 1
            return int(queue[self.cursor[d] - 1])
        # The lot has run out of cells of that class: borrow one of the same type from the pool.
        return int(self._group(self.lot_type[self.cur_lot], d).next())


PerDay = int | tuple[int, int]
"""Captures per line and day: a number, or ``(low, high)`` for a count drawn uniformly per line-day (inclusive)."""
DefectRate = float | Sequence[float] | None
"""Imposed share of p = 1 cells: one share, one share per simulated day, or None (the pool's own share)."""


def _check_per_day(per_day: Any) -> None:
    if isinstance(per_day, tuple | list) and len(per_day) == 2:
        lo, hi = per_day
        ok = all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in (lo, hi))
        if not ok or not 0 < lo <= hi:
            raise ValueError(f"per_day range must be two integers 0 < low <= high, got {tuple(per_day)!r}")
        return
    if isinstance(per_day, bool) or not isinstance(per_day, int | np.integer) or per_day <= 0:
        raise ValueError(f"per_day must be a positive integer (or a (low, high) range), got {per_day!r}")


def _check_defect_rate(defect_rate: DefectRate, days: int) -> None:
    if defect_rate is None:
        return
    rates = [defect_rate] if np.isscalar(defect_rate) else list(defect_rate)  # type: ignore[arg-type]
    if not np.isscalar(defect_rate) and len(rates) != days:
        raise ValueError(f"a per-day defect rate needs one share per day ({days}), got {len(rates)}")
    for r in rates:
        if not (isinstance(r, int | float | np.floating) and 0.0 <= float(r) <= 1.0):
            raise ValueError(f"defect rate must be a share in [0, 1], got {r}")


def _check_schedule(schedule: tuple[FaultSpec, ...], days: int, start: dt.date, lines: Sequence[str]) -> None:
    for fault in schedule:
        if not isinstance(fault, FaultSpec):
            raise ValueError(f"fault must be a FaultSpec, got {type(fault).__name__}")
        if fault.start_day >= days:
            raise ValueError(
                f"fault start day {fault.start_day} is outside the simulated days 0..{days - 1} "
                f"({start.isoformat()}..{(start + dt.timedelta(days=days - 1)).isoformat()})"
            )
        if fault.lines is not None and not set(fault.lines) <= set(lines):
            raise ValueError(f"fault lines {list(fault.lines)} are not all among the simulated lines {list(lines)}")
    for i, a in enumerate(schedule):
        for b in schedule[i + 1 :]:
            if a.kind == b.kind and FAULTS[a.kind].population and a.overlaps(b):
                raise ValueError(
                    f"two {a.kind} faults overlap on a line (days {a.start_day} and {b.start_day}): a line has one "
                    "product mix and one defect rate at a time"
                )


def _check_args(
    out: Path,
    days: int,
    per_day: PerDay,
    lines: Sequence[str],
    start: dt.date,
    defect_rate: DefectRate,
    schedule: tuple[FaultSpec, ...],
    order: str,
    truth: Path,
    capture_noise_dn: float,
) -> None:
    if isinstance(days, bool) or not isinstance(days, int | np.integer) or days <= 0:
        raise ValueError(f"days must be a positive integer, got {days!r}")
    _check_per_day(per_day)
    if not lines:
        raise ValueError("give at least one line name (e.g. lines=('L1',))")
    for name in lines:
        if not _LINE_RE.match(name):
            raise ValueError(f"bad line name {name!r}: use letters, digits and '_' (e.g. L1)")
    if len(set(lines)) != len(lines):
        raise ValueError(f"duplicate line names in {list(lines)}")
    if not isinstance(start, dt.date) or isinstance(start, dt.datetime):
        raise ValueError(f"start must be a datetime.date, got {start!r}")
    _check_defect_rate(defect_rate, days)
    _check_schedule(schedule, days, start, lines)
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}: choose from {ORDERS}")
    if not (math.isfinite(capture_noise_dn) and capture_noise_dn >= 0):
        raise ValueError(f"capture_noise_dn must be >= 0, got {capture_noise_dn}")
    out_r, truth_r = out.resolve(), truth.resolve()
    if truth_r == out_r or out_r in truth_r.parents:
        raise ValueError(
            f"the ground-truth file {truth} must be outside the drop folder {out}, so ingestion never sees it"
        )
    if out.exists() and not out.is_dir():
        raise ValueError(f"the drop folder {out} exists and is not a folder")
    for line in lines:
        for d in range(days):
            folder = out / line / (start + dt.timedelta(days=d)).isoformat()
            if folder.is_dir() and any(folder.iterdir()):
                raise ValueError(
                    f"{folder} already holds a simulation for line {line} on {(start + dt.timedelta(days=d))}; "
                    "choose another --start date or an empty --out folder"
                )


def _write_png(path: Path, img: np.ndarray) -> None:
    with atomic.atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG", compress_level=1)


@dataclass(frozen=True)
class _Run:
    """What every line-day of one :func:`simulate_line` call shares."""

    out: Path
    seed: int
    start: dt.date
    per_day: PerDay
    defect_rate: DefectRate
    schedule: tuple[FaultSpec, ...]
    base_mono: float
    base_defect: float
    capture_noise_dn: float
    tz: dt.tzinfo
    pool_of: np.ndarray
    golden_cells: int = 0
    mirror_repeats: bool = False


MIRRORS = 4
"""The distinct views of a replayed cell with ``mirror_repeats``: as captured, turned 180 degrees, mirrored left-right,
mirrored top-bottom."""


def mirrored(img: np.ndarray, view: int) -> np.ndarray:
    """``img`` in view ``view % MIRRORS`` (0: unchanged, 1: turned 180 degrees, 2: left-right, 3: top-bottom)."""
    v = int(view) % MIRRORS
    if v == 1:
        return img[::-1, ::-1]
    if v == 2:
        return img[:, ::-1]
    if v == 3:
        return img[::-1, :]
    return img


@dataclass(frozen=True)
class _Capture:
    """The state of a line at one capture: the active faults and the population it draws from."""

    active: tuple[tuple[FaultSpec, float, float], ...]  # (fault, severity, parameter value)
    mono_share: float | None
    defect_rate: float | None


def _day_count(run: _Run, line_id: int, day: dt.date) -> int:
    """Captures of one line-day: ``per_day``, or a seeded uniform draw from its ``(low, high)`` range."""
    if isinstance(run.per_day, tuple | list):
        lo, hi = run.per_day
        return int(np.random.default_rng([run.seed, line_id, day.toordinal(), 3]).integers(lo, hi + 1))
    return int(run.per_day)


def _day_defect_rate(run: _Run, d: int) -> float | None:
    """The imposed defect share on day index ``d`` (None: the pool's own composition)."""
    if run.defect_rate is None:
        return None
    return float(run.defect_rate) if np.isscalar(run.defect_rate) else float(run.defect_rate[d])  # type: ignore[index]


def _capture_state(run: _Run, faults: tuple[FaultSpec, ...], t_day: float, day_rate: float | None) -> _Capture:
    """Active faults at fractional day ``t_day`` and the cell population they imply."""
    active = []
    mono_share: float | None = None
    rate = day_rate
    for fault in faults:
        sev = fault.severity_at(t_day)
        if sev == 0:
            continue
        info = FAULTS[fault.kind]
        if info.kind == "product_mix":
            value = info.value(sev, baseline=run.base_mono)
            mono_share = value
        elif info.kind == "defect_rate":
            value = info.value(sev, baseline=run.base_defect if day_rate is None else day_rate)
            rate = value
        else:
            value = info.value(sev)
        active.append((fault, sev, value))
    return _Capture(tuple(active), mono_share, rate)


def _truth_fault_columns(run: _Run, state: _Capture, line_faults: tuple[FaultSpec, ...]) -> dict[str, Any]:
    """Ground-truth fault columns of one capture.

    With faults active: their kinds and parameters joined by ``+``, the first one's severity and value. With none
    active on a line that has scheduled faults: the line's first fault at severity 0 (its healthy parameter value),
    as with a single fault before its onset; ``"none"`` on a line without faults.
    """
    if state.active:
        first, sev, value = state.active[0]
        return {
            "fault_kind": "+".join(f.kind for f, _, _ in state.active),
            "fault_param": "+".join(FAULTS[f.kind].parameter for f, _, _ in state.active),
            "fault_severity": float(sev), "fault_value": float(value), "fault_active": True,
        }
    if not line_faults:
        return {"fault_kind": "none", "fault_param": "", "fault_severity": 0.0, "fault_value": float("nan"),
                "fault_active": False}
    info = FAULTS[line_faults[0].kind]
    baseline = {"product_mix": run.base_mono, "defect_rate": run.base_defect}.get(info.kind)
    return {"fault_kind": info.kind, "fault_param": info.parameter, "fault_severity": 0.0,
            "fault_value": info.value(0.0, baseline=baseline), "fault_active": False}


def _capture_image(run: _Run, data: Any, cell: int, state: _Capture, rng: np.random.Generator,
                   view: int = 0) -> np.ndarray:
    """The captured picture of one cell in ``view`` (:func:`mirrored`): image faults in schedule order, then read noise."""
    img = mirrored(data.images[cell], view)
    for fault, sev, _ in state.active:
        if not FAULTS[fault.kind].population:
            img = apply_fault(img, fault.kind, sev, rng)
    if run.capture_noise_dn > 0:
        img = noise(img, run.capture_noise_dn / 255.0, rng)
    return np.ascontiguousarray(img, dtype=np.uint8)


def golden_cell_indices(idx: np.ndarray, data: Any, line: str, seed: int, n: int) -> np.ndarray:
    """The ELPV indices of a line's ``n`` golden cells: healthy (p = 0) cells of the pool, fixed by seed and line."""
    if n == 0:
        return np.zeros(0, dtype=int)
    healthy = np.asarray(idx)[data.probs[np.asarray(idx)] <= 1e-9]
    if len(healthy) < n:
        raise ValueError(f"the replayed pool has {len(healthy)} healthy cells, fewer than {n} golden cells")
    rng = np.random.default_rng([seed, _stable_id(line), 4])
    return np.sort(rng.choice(healthy, size=n, replace=False))


def _golden_day(run: _Run, data: Any, line: str, d: int, golden: np.ndarray,
                faults: tuple[FaultSpec, ...]) -> tuple[list[dict[str, Any]], list[Path], list[dict[str, str]]]:
    """Image the line's golden cells at the start of each shift of day ``d``: truth rows, paths, MES rows."""
    day = run.start + dt.timedelta(days=d)
    rng = np.random.default_rng([run.seed, _stable_id(line), day.toordinal(), 5])
    folder = run.out / line / day.isoformat()
    midnight = dt.datetime.combine(day, dt.time(0, 0), tzinfo=run.tz)
    rows: list[dict[str, Any]] = []
    paths: list[Path] = []
    mes: list[dict[str, str]] = []
    for s, (_, h0, _) in enumerate(SHIFTS):
        mins = np.sort(rng.uniform(*GOLDEN_MINUTES, size=len(golden)))
        for k, cell in enumerate(golden):
            secs = float(np.floor((h0 * 3600 + mins[k] * 60) * 1000.0) / 1000.0)
            state = _capture_state(run, faults, d + secs / 86400.0, None)
            gid, serial = f"G{k + 1:02d}", f"{line}-{day:%Y%m%d}-S{s + 1}G{k + 1:02d}"
            path = folder / f"{serial}.png"
            _write_png(path, _capture_image(run, data, int(cell), state, rng))
            paths.append(path)
            stamp = (midnight + dt.timedelta(seconds=secs)).isoformat(timespec="milliseconds")
            station, ptype = f"{line}-EL1", str(data.types[cell])
            mes.append({"serial": serial, "timestamp": stamp, "line": line, "station": station, "product_type": ptype,
                        "sample_kind": "golden", "golden_cell": gid})
            rows.append({
                "serial": serial, "line": line, "station": station, "day": d, "date": day.isoformat(),
                "timestamp": stamp, "path": path.relative_to(run.out).as_posix(), "elpv_index": int(cell),
                "prob": float(data.probs[cell]), "type": ptype, "lot": int(data.lot[cell]),
                "pool": str(run.pool_of[cell]), "mirror": 0, **_truth_fault_columns(run, state, faults),
                "sample_kind": "golden", "golden_cell": gid,
            })
    return rows, paths, mes


def _write_mes(path: Path, mes: list[dict[str, str]], golden: bool) -> None:
    """Write a day's MES export (in capture-time order; with the golden columns on a line with golden cells)."""
    cols = list(MES_COLUMNS) + (list(GOLDEN_MES_COLUMNS) if golden else [])
    frame = pd.DataFrame(mes, columns=cols)
    if golden:
        frame = frame.assign(sample_kind=frame["sample_kind"].fillna("production"), golden_cell=frame["golden_cell"]
                             .fillna("")).sort_values("timestamp", kind="stable")
    with atomic.atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def _simulate_day(
    run: _Run, data: Any, source: _CellSource, line: str, d: int, bar: Any, golden: np.ndarray | None = None,
    replays: dict[int, int] | None = None,
) -> tuple[list[dict[str, Any]], list[Path], Path]:
    """Write one line-day (images, golden captures, then its MES export); its truth rows, image paths and MES file.

    ``replays`` counts the captures of each ELPV cell so far in this call (updated here); with
    ``run.mirror_repeats`` a replayed cell is captured in its next :func:`mirrored` view.
    """
    replays = {} if replays is None else replays
    line_id = _stable_id(line)
    day = run.start + dt.timedelta(days=d)
    faults = tuple(f for f in run.schedule if f.lines is None or line in f.lines)
    n = _day_count(run, line_id, day)
    rng = np.random.default_rng([run.seed, line_id, day.toordinal(), 2])
    secs = capture_times(n, rng)
    stations = rng.integers(1, STATIONS_PER_LINE + 1, size=n)
    folder = run.out / line / day.isoformat()
    folder.mkdir(parents=True, exist_ok=True)
    midnight = dt.datetime.combine(day, dt.time(0, 0), tzinfo=run.tz)
    day_rate = _day_defect_rate(run, d)
    rows: list[dict[str, Any]] = []
    paths: list[Path] = []
    mes: list[dict[str, str]] = []
    for k in range(n):
        state = _capture_state(run, faults, d + secs[k] / 86400.0, day_rate)
        cell = source.draw(state.mono_share, state.defect_rate)
        view = replays.get(cell, 0) % MIRRORS if run.mirror_repeats else 0
        replays[cell] = replays.get(cell, 0) + 1
        serial = f"{line}-{day:%Y%m%d}-{k + 1:06d}"
        path = folder / f"{serial}.png"
        _write_png(path, _capture_image(run, data, cell, state, rng, view))
        paths.append(path)
        stamp = (midnight + dt.timedelta(seconds=float(secs[k]))).isoformat(timespec="milliseconds")
        station, ptype = f"{line}-EL{int(stations[k])}", str(data.types[cell])
        mes.append({"serial": serial, "timestamp": stamp, "line": line, "station": station, "product_type": ptype})
        rows.append({
            "serial": serial, "line": line, "station": station, "day": d, "date": day.isoformat(),
            "timestamp": stamp, "path": path.relative_to(run.out).as_posix(), "elpv_index": int(cell),
            "prob": float(data.probs[cell]), "type": ptype, "lot": int(data.lot[cell]),
            "pool": str(run.pool_of[cell]), "mirror": view, **_truth_fault_columns(run, state, faults),
        })
        bar.update(1)
    if golden is not None and len(golden):
        g_rows, g_paths, g_mes = _golden_day(run, data, line, d, golden, faults)
        rows = [{**r, "sample_kind": "production", "golden_cell": None} for r in rows] + g_rows
        rows.sort(key=lambda r: r["timestamp"])
        paths = [run.out / r["path"] for r in rows]
        mes += g_mes
    meta = folder / MES_FILENAME
    _write_mes(meta, mes, golden is not None and len(golden) > 0)
    return rows, paths, meta


def _old_truth(truth_path: Path, lines: Sequence[str], dates: Sequence[dt.date]) -> pd.DataFrame | None:
    """The existing ground-truth file, refusing one that already describes these lines and dates."""
    if not truth_path.exists():
        return None
    old = pd.read_parquet(truth_path)
    planned = {f"{line}-{day:%Y%m%d}-" for line in lines for day in dates}
    clash = sorted(s for s in old["serial"] if s[: s.rfind("-") + 1] in planned)
    if clash:
        raise ValueError(
            f"the ground-truth file {truth_path} already describes a simulation of these lines and dates "
            f"(e.g. {clash[0]}); choose another --start date, --out folder or --truth file"
        )
    return old


def _write_truth(truth_path: Path, rows: list[dict[str, Any]], old: pd.DataFrame | None) -> None:
    truth_df = pd.DataFrame(rows)
    if old is not None:
        truth_df = pd.concat([old, truth_df], ignore_index=True)
    atomic.write_parquet(truth_path, truth_df)


def simulate_line(
    out: Path | str,
    *,
    days: int,
    per_day: PerDay,
    lines: Sequence[str] = ("L1",),
    start: dt.date = DEFAULT_START,
    seed: int = 0,
    defect_rate: DefectRate = None,
    fault: FaultSpec | None = None,
    faults: Sequence[FaultSpec] = (),
    pool: str | Iterable[str] = "heldout",
    order: str = "lot",
    truth: Path | str | None = None,
    capture_noise_dn: float = 1.0,
    tz: dt.tzinfo = PLANT_TZ,
    progress: bool = True,
    golden_cells: int = 0,
    mirror_repeats: bool = False,
) -> SimulationResult:
    """Replay ELPV cells as one or more production lines into a drop folder.

    Args:
        out: the drop folder (created if needed). Days already simulated there for a line raise ``ValueError``.
        days: number of production days, >= 1.
        per_day: captures per line and day, >= 1; or ``(low, high)``: a count drawn uniformly per line-day.
        lines: line names (letters, digits, '_').
        start: first production day.
        seed: random seed; the same arguments and seed give byte-identical files.
        defect_rate: imposed share of p=1 cells, one for the run or one per day (None = the pool's own share,
            ~0.18-0.27).
        fault: one injected fault (kept for the single-fault form; joins ``faults``).
        faults: a fault schedule: faults of any kinds, lines, onsets and durations (``FaultSpec.duration_days``).
            Image faults active together are applied in schedule order; two population faults of one kind may
            not overlap on a line.
        pool: ELPV pool(s) to replay: ``"heldout"`` (default: cells no model trains on), ``"calibration"``,
            ``"train"``, ``"all"``, or several names.
        order: ``"lot"`` (whole lots in file order: realistic lot-to-lot variation) or ``"shuffled"``.
        truth: ground-truth Parquet path; default :func:`default_truth_path`. Must be outside ``out``. An existing
            file is extended with the new rows.
        capture_noise_dn: sigma of the per-capture sensor read noise, in grey levels (0 = replay exact bytes).
        tz: time zone of the plant's timestamps.
        progress: show a progress bar (only on a terminal).
        golden_cells: golden cells per line, imaged at the start of every shift (0 = none; see the module
            docstring).
        mirror_repeats: capture each replay of a cell in its next mirrored view, so that a long simulation does
            not show the line the same cell twice (see the module docstring); False replays cells unchanged.

    Returns:
        What was written.
    """
    out = Path(out)
    truth_path = Path(truth) if truth is not None else default_truth_path(out)
    lines = tuple(lines)
    schedule = ((fault,) if fault is not None else ()) + tuple(faults)
    _check_args(out, days, per_day, lines, start, defect_rate, schedule, order, truth_path, capture_noise_dn)
    if isinstance(golden_cells, bool) or not isinstance(golden_cells, int | np.integer) or not 0 <= golden_cells <= 50:
        raise ValueError(f"golden_cells must be an integer in 0..50, got {golden_cells!r}")
    idx = pool_indices(resolve_pools(pool))
    data = load_elpv()
    imposed = _day_defect_rate_mean(defect_rate)
    run = _Run(out=out, seed=seed, start=start, per_day=per_day, defect_rate=defect_rate, schedule=schedule,
               base_mono=float(np.mean(data.types[idx] == "mono")),
               base_defect=float(np.mean(data.probs[idx] >= 1.0 - 1e-9)) if imposed is None else imposed,
               capture_noise_dn=capture_noise_dn, tz=tz, pool_of=split_pools()["pool"].astype(str).to_numpy(),
               golden_cells=int(golden_cells), mirror_repeats=bool(mirror_repeats))
    dates = tuple(start + dt.timedelta(days=d) for d in range(days))
    old_truth = _old_truth(truth_path, lines, dates)
    rows, paths, meta_files = _simulate_lines(run, data, idx, lines, days, order, progress)
    _write_truth(truth_path, rows, old_truth)
    return SimulationResult(out=out, paths=tuple(paths), metadata_files=tuple(meta_files), truth_path=truth_path,
                            n_images=len(paths), dates=dates, lines=lines)


def _simulate_lines(run: _Run, data: Any, idx: np.ndarray, lines: tuple[str, ...], days: int, order: str,
                    progress: bool) -> tuple[list[dict[str, Any]], list[Path], list[Path]]:
    """Every line-day, line by line (each line with its own cell source): truth rows, image paths, MES files."""
    rows: list[dict[str, Any]] = []
    paths: list[Path] = []
    meta_files: list[Path] = []
    per_day = run.per_day if isinstance(run.per_day, int | np.integer) else int(np.mean(run.per_day))
    bar = tqdm(total=days * len(lines) * per_day, desc="simulate", unit="img",
               disable=not progress or not sys.stderr.isatty())
    replays: dict[int, int] = {}
    for line in lines:
        seed = [run.seed, _stable_id(line), run.start.toordinal(), 1]
        source = _CellSource(idx, order, np.random.default_rng(seed))
        golden = golden_cell_indices(idx, data, line, run.seed, run.golden_cells)
        for d in range(days):
            r, p, m = _simulate_day(run, data, source, line, d, bar, golden, replays)
            rows += r
            paths += p
            meta_files.append(m)
    bar.close()
    return rows, paths, meta_files


def _day_defect_rate_mean(defect_rate: DefectRate) -> float | None:
    """The run's mean imposed defect share (the baseline a ``defect_rate`` fault adds to), None when not imposed."""
    if defect_rate is None:
        return None
    return float(defect_rate) if np.isscalar(defect_rate) else float(np.mean(list(defect_rate)))  # type: ignore[arg-type]
