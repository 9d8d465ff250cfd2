"""A simulated EL inspection line that replays real ELPV cells into a drop folder.

For every line and day, :func:`simulate_line` writes

* ``DROP/<line>/<YYYY-MM-DD>/<serial>.png``: 8-bit grey 300 x 300 captures, serial ``<line>-<YYYYMMDD>-<nnnnnn>``;
* ``DROP/<line>/<YYYY-MM-DD>/mes_export.csv``: the line's own metadata export, as a manufacturing execution system
  (MES) would write it: ``serial, timestamp, line, station, product_type`` (no defect labels);

and, **outside** the drop folder (the pipeline never reads it), one ground-truth Parquet file for evaluation: each
image's source ELPV cell, defect probability, type, lot, pool, and the injected fault's kind, severity and parameter.

Cells are drawn from an ELPV pool (see :mod:`pipeline.line.elpv`), in lot order by default (whole modules replayed in
file order, as a real line's cells come in lots) or shuffled. Capture times follow three 8-hour shifts with
hand-overs, breaks and random unplanned stops. Every capture carries a small sensor read noise
(``capture_noise_dn``, default sigma = 1 grey level) so repeated replays of a cell are not byte-identical files,
as on a real camera. The output is deterministic for a seed: the same arguments give the same bytes.
"""

from __future__ import annotations

import datetime as dt
import math
import os
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

from pipeline.line.elpv import load_elpv, pool_indices, resolve_pools, split_pools
from pipeline.line.faults import FAULTS, FaultSpec, apply_fault, noise

__all__ = [
    "DEFAULT_START",
    "MES_COLUMNS",
    "ORDERS",
    "PLANT_TZ",
    "SHIFTS",
    "FaultSpec",
    "SimulationResult",
    "capture_times",
    "default_truth_path",
    "simulate_line",
]

MES_COLUMNS: tuple[str, ...] = ("serial", "timestamp", "line", "station", "product_type")
"""Columns of the per-day MES export ``mes_export.csv``."""

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


def _check_args(
    out: Path,
    days: int,
    per_day: int,
    lines: Sequence[str],
    start: dt.date,
    defect_rate: float | None,
    fault: FaultSpec | None,
    order: str,
    truth: Path,
    capture_noise_dn: float,
) -> None:
    if isinstance(days, bool) or not isinstance(days, int | np.integer) or days <= 0:
        raise ValueError(f"days must be a positive integer, got {days!r}")
    if isinstance(per_day, bool) or not isinstance(per_day, int | np.integer) or per_day <= 0:
        raise ValueError(f"per_day must be a positive integer, got {per_day!r}")
    if not lines:
        raise ValueError("give at least one line name (e.g. lines=('L1',))")
    for name in lines:
        if not _LINE_RE.match(name):
            raise ValueError(f"bad line name {name!r}: use letters, digits and '_' (e.g. L1)")
    if len(set(lines)) != len(lines):
        raise ValueError(f"duplicate line names in {list(lines)}")
    if not isinstance(start, dt.date) or isinstance(start, dt.datetime):
        raise ValueError(f"start must be a datetime.date, got {start!r}")
    if defect_rate is not None and not (0.0 <= defect_rate <= 1.0):
        raise ValueError(f"defect rate must be a share in [0, 1], got {defect_rate}")
    if fault is not None:
        if not isinstance(fault, FaultSpec):
            raise ValueError(f"fault must be a FaultSpec, got {type(fault).__name__}")
        if fault.start_day >= days:
            raise ValueError(
                f"fault start day {fault.start_day} is outside the simulated days 0..{days - 1} "
                f"({start.isoformat()}..{(start + dt.timedelta(days=days - 1)).isoformat()})"
            )
        if fault.lines is not None and not set(fault.lines) <= set(lines):
            raise ValueError(f"fault lines {list(fault.lines)} are not all among the simulated lines {list(lines)}")
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
    tmp = path.with_name(f".{path.name}.part")
    Image.fromarray(img).save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, path)


def simulate_line(
    out: Path | str,
    *,
    days: int,
    per_day: int,
    lines: Sequence[str] = ("L1",),
    start: dt.date = DEFAULT_START,
    seed: int = 0,
    defect_rate: float | None = None,
    fault: FaultSpec | None = None,
    pool: str | Iterable[str] = "heldout",
    order: str = "lot",
    truth: Path | str | None = None,
    capture_noise_dn: float = 1.0,
    tz: dt.tzinfo = PLANT_TZ,
    progress: bool = True,
) -> SimulationResult:
    """Replay ELPV cells as one or more production lines into a drop folder.

    Args:
        out: the drop folder (created if needed). Days already simulated there for a line raise ``ValueError``.
        days: number of production days, >= 1.
        per_day: captures per line and day, >= 1.
        lines: line names (letters, digits, '_').
        start: first production day.
        seed: random seed; the same arguments and seed give byte-identical files.
        defect_rate: imposed share of p=1 cells (None = the pool's own share, ~0.18-0.27).
        fault: the injected fault, or None for a healthy line.
        pool: ELPV pool(s) to replay: ``"heldout"`` (default: cells no model trains on), ``"calibration"``,
            ``"train"``, ``"all"``, or several names.
        order: ``"lot"`` (whole lots in file order: realistic lot-to-lot variation) or ``"shuffled"``.
        truth: ground-truth Parquet path; default :func:`default_truth_path`. Must be outside ``out``. An existing
            file is extended with the new rows.
        capture_noise_dn: sigma of the per-capture sensor read noise, in grey levels (0 = replay exact bytes).
        tz: time zone of the plant's timestamps.
        progress: show a progress bar (only on a terminal).

    Returns:
        What was written.
    """
    out = Path(out)
    truth_path = Path(truth) if truth is not None else default_truth_path(out)
    lines = tuple(lines)
    _check_args(out, days, per_day, lines, start, defect_rate, fault, order, truth_path, capture_noise_dn)
    pools = resolve_pools(pool)
    idx = pool_indices(pools)
    data = load_elpv()
    pool_of = split_pools()["pool"].astype(str).to_numpy()
    base_mono = float(np.mean(data.types[idx] == "mono"))
    base_defect = float(np.mean(data.probs[idx] >= 1.0 - 1e-9)) if defect_rate is None else float(defect_rate)
    info = FAULTS[fault.kind] if fault is not None else None
    dates = tuple(start + dt.timedelta(days=d) for d in range(days))
    old_truth = None
    if truth_path.exists():
        old_truth = pd.read_parquet(truth_path)
        planned = {f"{line}-{day:%Y%m%d}-" for line in lines for day in dates}
        clash = sorted(s for s in old_truth["serial"] if s[: s.rfind("-") + 1] in planned)
        if clash:
            raise ValueError(
                f"the ground-truth file {truth_path} already describes a simulation of these lines and dates "
                f"(e.g. {clash[0]}); choose another --start date, --out folder or --truth file"
            )

    rows: list[dict[str, Any]] = []
    paths: list[Path] = []
    meta_files: list[Path] = []
    bar = tqdm(
        total=days * per_day * len(lines),
        desc="simulate",
        unit="img",
        disable=not progress or not sys.stderr.isatty(),
    )
    for line in lines:
        line_id = _stable_id(line)
        source = _CellSource(idx, order, np.random.default_rng([seed, line_id, start.toordinal(), 1]))
        faulty_line = fault is not None and (fault.lines is None or line in fault.lines)
        for d, day in enumerate(dates):
            rng = np.random.default_rng([seed, line_id, day.toordinal(), 2])
            secs = capture_times(per_day, rng)
            stations = rng.integers(1, STATIONS_PER_LINE + 1, size=per_day)
            folder = out / line / day.isoformat()
            folder.mkdir(parents=True, exist_ok=True)
            midnight = dt.datetime.combine(day, dt.time(0, 0), tzinfo=tz)
            mes: list[dict[str, str]] = []
            for k in range(per_day):
                t_day = d + secs[k] / 86400.0
                sev = fault.severity_at(t_day) if (faulty_line and fault is not None) else 0.0
                mono_share: float | None = None
                rate: float | None = None if defect_rate is None else base_defect
                value = float("nan")
                if info is not None and faulty_line:
                    if info.kind == "product_mix":
                        value = info.value(sev, baseline=base_mono)
                        mono_share = value if sev != 0 else None
                    elif info.kind == "defect_rate":
                        value = info.value(sev, baseline=base_defect)
                        rate = value if (sev != 0 or defect_rate is not None) else None
                    else:
                        value = info.value(sev)
                cell = source.draw(mono_share, rate)
                img = data.images[cell]
                if faulty_line and fault is not None and sev != 0 and not info.population:  # type: ignore[union-attr]
                    img = apply_fault(img, fault.kind, sev, rng)
                if capture_noise_dn > 0:
                    img = noise(img, capture_noise_dn / 255.0, rng)
                serial = f"{line}-{day:%Y%m%d}-{k + 1:06d}"
                path = folder / f"{serial}.png"
                _write_png(path, np.ascontiguousarray(img, dtype=np.uint8))
                paths.append(path)
                stamp = (midnight + dt.timedelta(seconds=float(secs[k]))).isoformat(timespec="milliseconds")
                station = f"{line}-EL{int(stations[k])}"
                ptype = str(data.types[cell])
                mes.append(
                    {"serial": serial, "timestamp": stamp, "line": line, "station": station, "product_type": ptype}
                )
                rows.append(
                    {
                        "serial": serial,
                        "line": line,
                        "station": station,
                        "day": d,
                        "date": day.isoformat(),
                        "timestamp": stamp,
                        "path": path.relative_to(out).as_posix(),
                        "elpv_index": int(cell),
                        "prob": float(data.probs[cell]),
                        "type": ptype,
                        "lot": int(data.lot[cell]),
                        "pool": str(pool_of[cell]),
                        "fault_kind": fault.kind if faulty_line and fault is not None else "none",
                        "fault_param": info.parameter if faulty_line and info is not None else "",
                        "fault_severity": float(sev),
                        "fault_value": value,
                        "fault_active": bool(sev != 0),
                    }
                )
                bar.update(1)
            meta = folder / MES_FILENAME
            tmp = meta.with_name(f".{meta.name}.part")
            pd.DataFrame(mes, columns=list(MES_COLUMNS)).to_csv(tmp, index=False)
            os.replace(tmp, meta)
            meta_files.append(meta)
    bar.close()

    truth_df = pd.DataFrame(rows)
    if old_truth is not None:
        truth_df = pd.concat([old_truth, truth_df], ignore_index=True)
    truth_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_truth = truth_path.with_name(f".{truth_path.name}.part")
    truth_df.to_parquet(tmp_truth, index=False)
    os.replace(tmp_truth, truth_path)
    return SimulationResult(
        out=out,
        paths=tuple(paths),
        metadata_files=tuple(meta_files),
        truth_path=truth_path,
        n_images=len(paths),
        dates=dates,
        lines=lines,
    )
