"""The monitor's golden-sample check: each line's golden captures, round by round, against the cells' own baselines.

Golden cells are a line's fixed reference cells, re-imaged at the start of every shift and marked
``sample_kind=golden`` with their ``golden_cell`` id in the MES export (``docs/spc.md``). They never enter a
production window, a training set or the per-image flags; here they are compared with themselves
(:class:`pipeline.analysis.golden.GoldenCheck`):

* **Rounds** (:func:`golden_rounds`): a line's golden captures taken close together (no gap over
  ``ROUND_GAP_MIN`` minutes, no cell twice) form one round, named by the plant-local time of its first capture
  (``"2026-01-06T08:01"``); whatever the plant's shift plan, one round is one shift's check.
* **Statistics** (:func:`capture_statistics`): brightness, fine detail, noise level and rotation measured on the
  stored image at full resolution, and the capture's latent z under the champion.
* **State** (:class:`LineGolden`): one JSON file per line under the alert manager's state folder
  (``<state_dir>/golden/<line>.json``), tied to the line and the model. A state of another line, or an unreadable
  one, is replaced by new baselines, with a message. After a new champion the pixel statistics keep their baselines
  (they do not depend on the model) and only the z baselines restart. A cell seen for the first time is registered
  with an empty baseline.
* **Alerts** (:func:`camera_cause`): a round that fired becomes a cause ``camera:<statistic>`` of family ``camera``,
  handed to the alert manager with the window the round falls in (:class:`pipeline.monitoring.charts.ChartedResult`),
  so it gets the same alert, outbox and webhook as any other cause; its text says what changed, e.g.
  ``camera/optics changed: brightness -10 % on the golden cells (5 of 5)``. Captures of a round that fired never
  enter a baseline; :func:`rebaseline` restarts the baselines after a deliberate camera or optics change.
* **MLflow** (:func:`round_metrics`): per window, ``golden/rounds``, ``golden/alarm`` and each statistic's shift
  (``golden/mean_intensity`` in per cent ...), stamped with the window's start, beside the ``spc/*`` curves.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.analysis.golden import (
    GOLDEN_STATISTICS,
    GoldenCapture,
    GoldenCheck,
    GoldenConfig,
    GoldenResult,
    GoldenStateMismatch,
)
from pipeline.common.schemas import GOLDEN_CELL, golden_mask
from pipeline.monitoring.causes import Cause

log = logging.getLogger(__name__)

FAMILY = "camera"
"""The alert family (group) of golden-sample causes."""
ROUND_GAP_MIN = 60.0
"""Golden captures of a line more than this many minutes apart belong to different rounds."""

__all__ = ["FAMILY", "ROUND_GAP_MIN", "GoldenRound", "LineGolden", "MonitorGolden", "camera_cause",
           "capture_statistics", "golden_rounds", "golden_status", "rebaseline", "round_metrics", "split_golden"]


def split_golden(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(production rows, golden rows)`` of catalog rows (rows without ``sample_kind`` are production)."""
    gold = golden_mask(rows)
    return rows.loc[~gold].reset_index(drop=True), rows.loc[gold].reset_index(drop=True)


@dataclass(frozen=True)
class GoldenRound:
    """One round of a line's golden captures.

    Attributes:
        round_id: the plant-local time of its first capture (``"2026-01-06T08:01"``).
        first: the first capture's time (UTC).
        frame: its catalog rows (with ``golden_cell``), in capture order.
    """

    round_id: str
    first: pd.Timestamp
    frame: pd.DataFrame


def golden_rounds(rows: pd.DataFrame, timezone: str, gap_minutes: float = ROUND_GAP_MIN) -> list[GoldenRound]:
    """Cut one line's golden captures into rounds (see the module docstring), in time order."""
    if rows.empty:
        return []
    rows = rows.assign(_t=pd.to_datetime(rows["captured_at"], utc=True)).sort_values("_t", kind="stable")
    out: list[GoldenRound] = []
    start, seen, last = 0, set(), None
    cells = rows[GOLDEN_CELL].astype(object).where(rows[GOLDEN_CELL].notna(), None).tolist()
    times = rows["_t"].tolist()
    for i, (t, cell) in enumerate(zip(times, cells, strict=True)):
        if last is not None and ((t - last).total_seconds() > 60.0 * gap_minutes or (cell is not None and cell in seen)):
            out.append(_round(rows.iloc[start:i], timezone))
            start, seen = i, set()
        seen.add(cell)
        last = t
    out.append(_round(rows.iloc[start:], timezone))
    return out


def _round(frame: pd.DataFrame, timezone: str) -> GoldenRound:
    first = frame["_t"].iloc[0]
    return GoldenRound(first.tz_convert(timezone).strftime("%Y-%m-%dT%H:%M"), first,
                       frame.drop(columns="_t").reset_index(drop=True))


def capture_statistics(images: Sequence[np.ndarray]) -> pd.DataFrame:
    """The golden statistics (brightness, fine detail, noise level, rotation) of images, one row each."""
    from pipeline.latent.properties import measure_each

    return measure_each(list(images), [s.name for s in GOLDEN_STATISTICS])


def captures_of(frame: pd.DataFrame, stats: pd.DataFrame, z_cols: Sequence[str] = ()) -> tuple[
        list[GoldenCapture], list[str]]:
    """The round's captures (rows with a ``golden_cell`` id and their statistics) and a message per unusable row."""
    caps: list[GoldenCapture] = []
    messages: list[str] = []
    for i, row in frame.reset_index(drop=True).iterrows():
        cell = row.get(GOLDEN_CELL)
        if not isinstance(cell, str) or not cell:
            messages.append(f"golden capture {row.get('image_id')} without a golden_cell id ignored (mark the cell "
                            "in the MES export's golden_cell column)")
            continue
        values = {s.name: float(stats.iloc[i][s.name]) for s in GOLDEN_STATISTICS}
        z = [float(row[c]) for c in z_cols] if z_cols and all(pd.notna(row[c]) for c in z_cols) else None
        caps.append(GoldenCapture(cell, values, z))
    return caps, messages


def camera_cause(result: GoldenResult) -> Cause | None:
    """The alert cause of a golden round: ``camera:<statistic>`` when it fired, else None."""
    if not result.detected:
        return None
    fired = result.fired
    return Cause(f"{FAMILY}:{fired[0].family}", FAMILY, (FAMILY,), (), tuple(float(f.p) for f in fired), (),
                 result.text)


def round_metrics(results: Sequence[GoldenResult]) -> dict[str, float]:
    """The golden check's numbers for a window's metrics log (empty when no round was tested).

    ``golden_rounds`` (rounds tested), ``golden_alarm`` (1 when one fired), and per statistic the shift of the
    last tested round (``golden_mean_intensity`` in per cent, ``golden_rotation_deg`` in degrees, ...).
    """
    tested = [r for r in results if r.tested]
    if not tested:
        return {}
    out = {"golden_rounds": float(len(tested)), "golden_alarm": float(any(r.detected for r in tested))}
    out.update({f"golden_{f.family}": float(f.shift) for f in tested[-1].families if f.family != "z"})
    return out


class LineGolden:
    """The golden checks of every line under one state folder, loaded, updated and saved as the monitor goes.

    Args:
        state_dir: the alert manager's state folder (the checks live in ``golden/`` under it).
        model_id: the champion's model id (its latents form the z family).
        config: the decision settings of new checks.
    """

    def __init__(self, state_dir: str | Path, model_id: str | None, config: GoldenConfig = GoldenConfig()) -> None:
        self.dir = Path(state_dir) / "golden"
        self.model_id = model_id
        self.config = config
        self.messages: list[str] = []
        self._checks: dict[str, GoldenCheck] = {}

    def path(self, line: str) -> Path:
        """The state file of a line."""
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in line)
        return self.dir / f"{safe}.json"

    def _note(self, message: str) -> None:
        self.messages.append(message)
        log.warning("%s", message)

    def _load(self, line: str) -> GoldenCheck | None:
        """The line's saved check (carried over to this model when it was the previous champion's), or None."""
        p = self.path(line)
        if not p.exists():
            return None
        try:
            return GoldenCheck.load(p, line=line, model_id=self.model_id)
        except GoldenStateMismatch as e:
            old = _other_model(p, line)
            if old is not None:
                self._note(f"line {line}: golden baselines of model {old.model_id} carried over to model "
                           f"{self.model_id} (pixel statistics kept, z restarts)")
                return old.for_model(self.model_id)
            self._note(f"line {line}: golden state {p.name} not used ({e}); new baselines")
        except (KeyError, TypeError, ValueError, OSError) as e:
            self._note(f"line {line}: golden state {p.name} unreadable ({type(e).__name__}: {e}); new baselines")
        return None

    def check(self, line: str, cells: Sequence[str]) -> GoldenCheck:
        """The line's check with ``cells`` registered (a new one when no usable state exists)."""
        cells = list(dict.fromkeys(str(c) for c in cells))
        if line not in self._checks:
            self._checks[line] = self._load(line) or GoldenCheck(line, cells, model_id=self.model_id,
                                                                 config=self.config)
        chk = self._checks[line]
        new = chk.register(cells)
        if new and any(chk.baseline_size(c) for c in chk.cells):
            self._note(f"line {line}: new golden cell(s) {', '.join(new)} registered; each is tested once its "
                       f"baseline holds {chk.config.min_baseline} captures")
        return chk

    def update(self, line: str, round_id: str, captures: Sequence[GoldenCapture]) -> GoldenResult:
        """Test one round, add it to the baselines unless it fired, and save the line's state."""
        chk = self.check(line, [c.cell for c in captures])
        res = chk.update(round_id, captures)
        chk.save(self.path(line))
        return res


def _other_model(path: Path, line: str) -> GoldenCheck | None:
    """The saved check when it is this line's under another model (else None)."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        if d.get("line") != line:
            return None
        return GoldenCheck.load(path, line=line, model_id=d.get("model_id"))
    except (GoldenStateMismatch, KeyError, TypeError, ValueError, OSError, AttributeError):
        return None


def rebaseline(state_dir: str | Path, line: str, cells: Sequence[str] | None = None) -> str:
    """Forget a line's golden baselines (of ``cells``, default all) after a deliberate camera or optics change.

    Returns:
        What was done, in one line.

    Raises:
        ValueError: the line has no golden state, or a cell is not registered.
    """
    p = LineGolden(state_dir, None).path(line)
    if not p.exists():
        raise ValueError(f"line {line} has no golden-sample state under {Path(state_dir) / 'golden'}")
    d = json.loads(p.read_text(encoding="utf-8"))
    chk = GoldenCheck.load(p, line=line, model_id=d.get("model_id"))
    chk.rebaseline(None if not cells else list(cells))
    chk.save(p)
    which = "all golden cells" if not cells else ", ".join(cells)
    return f"line {line}: baselines of {which} restarted; the next {chk.config.min_baseline} rounds build them"


def golden_status(state_dir: str | Path, line: str) -> str:
    """One line on a line's golden-sample state: its model, rounds processed and each cell's baseline size.

    Raises:
        ValueError: the line has no golden state.
    """
    p = LineGolden(state_dir, None).path(line)
    if not p.exists():
        raise ValueError(f"line {line} has no golden-sample state under {Path(state_dir) / 'golden'}")
    d = json.loads(p.read_text(encoding="utf-8"))
    chk = GoldenCheck.load(p, line=line, model_id=d.get("model_id"))
    sizes = ", ".join(f"{c} {chk.baseline_size(c)}" for c in chk.cells)
    return (f"line {line}: model {chk.model_id}, {len(chk.processed)} rounds processed; baseline captures per cell "
            f"(tested from {chk.config.min_baseline}): {sizes}")


@dataclass
class MonitorGolden:
    """The golden rounds of one monitor pass and the checks they go through, window by window.

    A round is tested with the first tested window of its line that ends after the round's first capture, so
    that each round's verdict reaches the alert manager exactly once, with a window the manager processes.

    Attributes:
        checks: the persisted per-line checks.
        rounds: line -> rounds not yet tested in this pass (time order).
        stats: image id -> golden statistics (indexed by image id).
        z_cols: the latent columns of the golden rows (empty: no z family).
    """

    checks: LineGolden
    rounds: dict[str, list[GoldenRound]]
    stats: pd.DataFrame
    z_cols: tuple[str, ...] = ()
    results: list[GoldenResult] = field(default_factory=list)

    def window(self, line: str, end: Any) -> list[GoldenResult]:
        """Test the line's pending rounds that began before ``end``; their results (messages logged)."""
        pending = self.rounds.get(line, [])
        end_ts = pd.Timestamp(end)
        end_ts = end_ts.tz_localize("UTC") if end_ts.tzinfo is None else end_ts
        due = [r for r in pending if r.first < end_ts]
        self.rounds[line] = [r for r in pending if r.first >= end_ts]
        out = []
        for r in due:
            stats = self.stats.loc[r.frame["image_id"].astype(str).to_numpy()].reset_index(drop=True)
            caps, messages = captures_of(r.frame, stats, self.z_cols)
            res = self.checks.update(line, r.round_id, caps)
            for m in (*messages, *res.messages):
                log.warning("golden samples, line %s, round %s: %s", line, r.round_id, m)
            out.append(res)
        self.results += out
        return out
