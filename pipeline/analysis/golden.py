"""Golden samples: a fixed set of reference cells re-imaged at the start of every shift, each compared with itself.

A production window mixes modules (lots), and module-to-module brightness varies more than a camera gain drop of
10 % moves it (``benchmarks/results/fault_vs_lots.md``). A golden cell is the same physical cell every time, so the
difference between its capture today and its own earlier captures holds no lot variation at all: only the camera,
the optics, the illumination and the fixture (plus the small jitter of re-imaging: placement, excitation current,
sensor noise). A change seen on the golden cells therefore says *camera/optics changed*, not *product changed*.

**Test.** For every golden cell captured in a shift and every statistic, the paired difference between the capture
and the mean of that cell's baseline captures (on a log scale for brightness, fine detail and noise level, so the
shift reads in per cent; in degrees for rotation; in latent units per axis for z). The re-imaging jitter is each
cell's own standard deviation over its baseline captures, and the mean difference over the ``k`` cells of the shift
is judged with a Welch t-test with conservative degrees of freedom (``paired_welch``).

Each family (brightness, fine detail, noise level, rotation, and z with Bonferroni over its axes) is tested at
``alpha / n_families``, so one shift raises a false alarm with probability at most ``alpha`` (1 in 500 shifts by
default). A cell joins the test once its baseline holds ``min_baseline`` captures; captures of a shift that raised
an alarm never enter a baseline, and :meth:`GoldenCheck.rebaseline` restarts the baselines after a deliberate
change (a new camera, a re-focused lens).

**Bad input never stops the rest.** A golden cell missing from a shift, a capture of an unregistered cell, a
statistic that could not be measured: each gives a one-line message in the result and the other cells are tested.
A state file written for another line or model is refused with a clear message (:class:`GoldenStateMismatch`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from pipeline.common import atomic
from pipeline.common.schemas import SAMPLE_KINDS, parse_sample_kind

__all__ = [
    "GOLDEN_STATISTICS",
    "SAMPLE_KINDS",
    "FamilyShift",
    "GoldenCapture",
    "GoldenCheck",
    "GoldenConfig",
    "GoldenResult",
    "GoldenStat",
    "GoldenStateMismatch",
    "paired_welch",
    "parse_sample_kind",
]

STATE_KIND = "linewatch-golden-state"
STATE_VERSION = 1


@dataclass(frozen=True)
class GoldenStat:
    """A per-capture statistic compared on the golden cells.

    Attributes:
        name: column name (a :data:`pipeline.latent.properties.PROPERTIES` key).
        label: what the alert calls it.
        log_scale: compare on a log scale and report the change in per cent (else in ``unit``).
        unit: the unit of an absolute change.
        resolution: smallest meaningful re-imaging sd (on the compared scale); floors the pooled sd so that
            bit-identical replays do not divide by zero.
    """

    name: str
    label: str
    log_scale: bool
    unit: str
    resolution: float


GOLDEN_STATISTICS: tuple[GoldenStat, ...] = (
    GoldenStat("mean_intensity", "brightness", True, "%", 1e-4),
    GoldenStat("detail_ratio", "fine detail", True, "%", 1e-4),
    GoldenStat("noise_level", "noise level", True, "%", 1e-3),
    GoldenStat("rotation_deg", "rotation", False, "deg", 1e-3),
)
"""The scalar statistics of the golden check, in the order they are reported; z is a family of its own."""

Z_RESOLUTION = 1e-4


@dataclass(frozen=True)
class GoldenConfig:
    """How the golden check decides.

    Attributes:
        alpha: false-alarm probability per shift, over all families (0.002: one false alarm in 500 shifts).
        min_baseline: captures of a cell before it is tested (its baseline).
        max_baseline: captures kept per cell: the first in-control ones (a slow drift stays visible against them).
        min_cells: golden cells needed in a shift for a test.
    """

    alpha: float = 0.002
    min_baseline: int = 3
    max_baseline: int = 20
    min_cells: int = 2

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"GoldenConfig.alpha must be in (0, 1), got {self.alpha}")
        if self.min_baseline < 2:
            raise ValueError(f"GoldenConfig.min_baseline must be >= 2 (a re-imaging sd needs two captures), "
                             f"got {self.min_baseline}")
        if self.max_baseline < self.min_baseline:
            raise ValueError(f"GoldenConfig.max_baseline ({self.max_baseline}) must be >= min_baseline "
                             f"({self.min_baseline})")
        if self.min_cells < 1:
            raise ValueError(f"GoldenConfig.min_cells must be >= 1, got {self.min_cells}")


@dataclass(frozen=True)
class GoldenCapture:
    """One capture of a golden cell.

    Attributes:
        cell: the golden cell's id (e.g. its serial).
        stats: statistic name -> value (at least the names of :data:`GOLDEN_STATISTICS`; NaN = not measured).
        z: the capture's latent vector under the current model, or None.
    """

    cell: str
    stats: Mapping[str, float]
    z: Sequence[float] | None = None


@dataclass(frozen=True)
class FamilyShift:
    """The paired shift of one family on the golden cells of a shift.

    Attributes:
        family: statistic name, or ``"z"``.
        label: what the alert calls it ("brightness", "latent z_07").
        shift: the mean change (per cent for log-scale statistics, else in ``unit``; z: in re-imaging sd).
        unit: ``"%"``, ``"deg"`` or ``"sd"``.
        t: the t statistic (for z: of the axis that moved most).
        p: the family's p-value (z: Bonferroni over axes).
        cells: cells that entered the test.
        fired: p at or below the family's level.
    """

    family: str
    label: str
    shift: float
    unit: str
    t: float
    p: float
    cells: int
    fired: bool

    @property
    def text(self) -> str:
        """E.g. ``"brightness -10 %"`` or ``"rotation +2.0 deg"``."""
        if self.unit == "%":
            return f"{self.label} {self.shift:+.0f} %" if abs(self.shift) >= 1 else f"{self.label} {self.shift:+.1f} %"
        if self.unit == "sd":  # in units of the cell's own re-imaging jitter, which is small: say so
            return f"{self.label} {self.shift:+.1f} sd of re-imaging jitter"
        return f"{self.label} {self.shift:+.2f} {self.unit}"


@dataclass(frozen=True)
class GoldenResult:
    """The verdict of one shift's golden captures.

    Attributes:
        line: production line.
        shift_id: the shift (e.g. ``"2026-01-06 early"``).
        tested: cells compared with their baselines.
        building: cells whose baseline is still short (captured, not tested).
        missing: registered cells without a capture in this shift.
        families: one entry per family tested.
        detected: some family fired.
        family_alpha: the level of each family.
        messages: one line per problem met (missing cell, unknown cell, unmeasured statistic, ...).
    """

    line: str
    shift_id: str
    tested: tuple[str, ...]
    building: tuple[str, ...]
    missing: tuple[str, ...]
    families: tuple[FamilyShift, ...]
    detected: bool
    family_alpha: float
    messages: tuple[str, ...] = field(default=())

    @property
    def fired(self) -> tuple[FamilyShift, ...]:
        """The families that fired, most significant first."""
        return tuple(sorted((f for f in self.families if f.fired), key=lambda f: f.p))

    @property
    def text(self) -> str:
        """The alert sentence, e.g. ``"camera/optics changed: brightness -10 % on the golden cells (5 of 5)"``."""
        n_reg = len(self.tested) + len(self.building) + len(self.missing)
        where = f"on the golden cells ({len(self.tested)} of {n_reg})"
        if self.detected:
            physical = [f.text for f in self.fired if f.family != "z"]
            latent = [f.label for f in self.fired if f.family == "z"]
            if physical:  # a latent axis moves with the image: named, its jitter-scaled size left out
                return "camera/optics changed: " + ", ".join(physical + [f"{a} moved" for a in latent]) + f" {where}"
            return "camera/optics changed: " + ", ".join(f.text for f in self.fired) + f" {where}"
        if not self.tested:
            return f"golden cells: no test this shift ({'; '.join(self.messages) or 'no baseline yet'})"
        return f"golden cells: no camera/optics change {where}"


class GoldenStateMismatch(ValueError):
    """A golden state file belongs to another line or model."""


@dataclass
class _Baseline:
    """The baseline captures of one cell: statistic rows (n, n_stats) and z rows (n, d) or None."""

    values: list[list[float]] = field(default_factory=list)
    z: list[list[float]] = field(default_factory=list)


def paired_welch(baselines: Sequence[np.ndarray], current: np.ndarray,
                 resolution: float) -> tuple[float, float, float, float]:
    """Mean paired difference of current captures from their cells' baseline means, with a Welch t-test.

    Cell ``i`` has ``n_i >= 2`` baseline values with sample variance ``s_i**2`` (floored at ``resolution**2``);
    under no change ``current_i - mean_i`` has variance ``v_i = s_i**2 * (1 + 1 / n_i)``, so the mean difference
    over the ``k`` cells divided by ``sqrt(sum(v_i)) / k`` is compared with a t distribution. Its degrees of
    freedom are the smaller of the Welch-Satterthwaite value ``sum(v_i)**2 / sum(v_i**2 / (n_i - 1))`` and the
    smallest baseline's ``n_i - 1`` (Hsu's conservative choice): with a handful of captures per cell the
    Satterthwaite value overstates the information in the spreads, and the far tail the Bonferroni levels reach
    is then too light (false alarms several times ``alpha`` on real re-imaging jitter, whose tails are heavier
    than normal; under normal jitter the test is conservative). Each cell keeps its own
    re-imaging spread: cells differ in it (a cell with strong busbars holds its rotation better), and pooling
    them makes the test's far tail, which the Bonferroni levels reach, too light.

    Args:
        baselines: per cell, its baseline values (n_i,), on the compared scale.
        current: per cell, the current value.
        resolution: floor of each cell's sd.

    Returns:
        ``(mean difference, t, two-sided p, root mean re-imaging variance)``.
    """
    n = np.array([len(b) for b in baselines], float)
    if (n < 2).any():
        raise ValueError("every cell needs at least two baseline captures")
    var = np.maximum(np.array([np.var(b, ddof=1) for b in baselines]), resolution**2)
    v = var * (1.0 + 1.0 / n)
    d = float(np.mean(np.asarray(current, float) - np.array([b.mean() for b in baselines])))
    t = d / (math.sqrt(v.sum()) / len(n))
    df = min(v.sum() ** 2 / np.sum(v**2 / (n - 1.0)), float(n.min() - 1.0))
    return d, float(t), float(2.0 * stats.t.sf(abs(t), df)), float(math.sqrt(var.mean()))


def _scaled(values: np.ndarray, log_scale: bool) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(np.asarray(values, float)) if log_scale else np.asarray(values, float)


class GoldenCheck:
    """The golden-sample check of one line (see the module docstring).

    Args:
        line: the production line.
        cells: ids of the registered golden cells.
        model_id: the model whose latents the z family compares (None: no z family).
        config: the decision settings.
    """

    def __init__(self, line: str, cells: Sequence[str], *, model_id: str | None = None,
                 config: GoldenConfig = GoldenConfig()) -> None:
        if not isinstance(line, str) or not line:
            raise ValueError("line must be a non-empty string")
        cells = [str(c) for c in cells]
        if not cells or len(set(cells)) != len(cells):
            raise ValueError(f"give one or more distinct golden cell ids, got {cells}")
        self.line = line
        self.model_id = model_id
        self.config = config
        self._base: dict[str, _Baseline] = {c: _Baseline() for c in cells}
        self.processed: list[str] = []

    @property
    def cells(self) -> tuple[str, ...]:
        """The registered golden cells."""
        return tuple(self._base)

    def baseline_size(self, cell: str) -> int:
        """Captures in a cell's baseline."""
        return len(self._base[cell].values)

    # ---- test ----------------------------------------------------------------------------------------------
    def _sort(self, shift_id: str, captures: Sequence[GoldenCapture]) -> tuple[dict[str, GoldenCapture], list[str]]:
        """Captures by registered cell, and a message for each capture that cannot be used."""
        by_cell: dict[str, GoldenCapture] = {}
        messages: list[str] = []
        for cap in captures:
            cell = str(cap.cell)
            if cell not in self._base:
                messages.append(f"golden capture of unregistered cell {cell!r} in shift {shift_id} ignored "
                                f"(registered: {', '.join(self._base)})")
            elif cell in by_cell:
                messages.append(f"golden cell {cell!r} captured twice in shift {shift_id}: the first capture is used")
            else:
                by_cell[cell] = cap
        missing = [c for c in self._base if c not in by_cell]
        if missing:
            messages.append(f"golden cell(s) {', '.join(missing)} missing from shift {shift_id}: "
                            f"{len(by_cell)} of {len(self._base)} captured")
        return by_cell, messages

    def _stat_family(self, stat: GoldenStat, j: int, ready: list[str], by_cell: Mapping[str, GoldenCapture],
                     alpha_f: float, messages: list[str]) -> FamilyShift | None:
        base = {c: _scaled(np.array([row[j] for row in self._base[c].values]), stat.log_scale) for c in ready}
        cur = {c: float(_scaled(np.array([by_cell[c].stats.get(stat.name, np.nan)]), stat.log_scale)[0])
               for c in ready}
        bad = [c for c, v in cur.items() if not math.isfinite(v)]
        if bad:
            messages.append(f"{stat.label} not measured on golden cell(s) {', '.join(bad)}: left out of that test")
        use = [c for c in ready if c not in bad and np.isfinite(base[c]).sum() >= 2]
        if len(use) < self.config.min_cells:
            return None
        d, t, p, _ = paired_welch([base[c][np.isfinite(base[c])] for c in use], np.array([cur[c] for c in use]),
                                  stat.resolution)
        shift = 100.0 * math.expm1(d) if stat.log_scale else d
        return FamilyShift(stat.name, stat.label, shift, stat.unit, t, p, len(use), p <= alpha_f)

    def _z_family(self, ready: list[str], by_cell: Mapping[str, GoldenCapture], alpha_f: float) -> FamilyShift | None:
        use = [c for c in ready if by_cell[c].z is not None and len(self._base[c].z) >= 2]
        if len(use) < self.config.min_cells:
            return None
        zb = [np.asarray(self._base[c].z, float) for c in use]
        cur = np.array([np.asarray(by_cell[c].z, float) for c in use])
        axes = [paired_welch([b[:, a] for b in zb], cur[:, a], Z_RESOLUTION) for a in range(cur.shape[1])]
        a = int(np.argmin([x[2] for x in axes]))
        d, t, p, sd = axes[a]
        p_fam = min(1.0, p * cur.shape[1])
        return FamilyShift("z", f"latent z_{a:02d}", d / sd, "sd", t, p_fam, len(use), p_fam <= alpha_f)

    def test(self, shift_id: str, captures: Sequence[GoldenCapture]) -> GoldenResult:
        """Compare one shift's golden captures with the cells' baselines (the state is not changed).

        Args:
            shift_id: the shift (e.g. ``"2026-01-06 early"``).
            captures: the shift's golden captures.

        Returns:
            The verdict, with a message for each capture that could not be used.
        """
        shift_id = str(shift_id)
        by_cell, messages = self._sort(shift_id, captures)
        ready = [c for c in by_cell if self.baseline_size(c) >= self.config.min_baseline]
        building = tuple(c for c in by_cell if c not in ready)
        missing = tuple(c for c in self._base if c not in by_cell)
        n_fam = len(GOLDEN_STATISTICS) + (1 if self.model_id is not None else 0)
        alpha_f = self.config.alpha / n_fam
        if len(ready) < self.config.min_cells:
            messages.append(f"{len(ready)} golden cell(s) with a baseline of {self.config.min_baseline} captures "
                            f"in shift {shift_id}; {self.config.min_cells} needed: no test")
            return GoldenResult(self.line, shift_id, (), building, missing, (), False, alpha_f, tuple(messages))
        fams = [self._stat_family(s, j, ready, by_cell, alpha_f, messages) for j, s in enumerate(GOLDEN_STATISTICS)]
        if self.model_id is not None:
            fams.append(self._z_family(ready, by_cell, alpha_f))
        families = tuple(f for f in fams if f is not None)
        detected = any(f.fired for f in families)
        return GoldenResult(self.line, shift_id, tuple(ready), building, missing, families, detected, alpha_f,
                            tuple(messages))

    # ---- state ---------------------------------------------------------------------------------------------
    def update(self, shift_id: str, captures: Sequence[GoldenCapture]) -> GoldenResult:
        """Test one shift, then add its captures to the baselines that are not full, unless the shift raised an alarm.

        A shift id already processed is not tested again: the result says so and the state does not change.
        """
        shift_id = str(shift_id)
        if shift_id in self.processed:
            msg = f"golden shift {shift_id} already processed: nothing to do"
            return GoldenResult(self.line, shift_id, (), (), (), (), False, 0.0, (msg,))
        res = self.test(shift_id, captures)
        if not res.detected:
            by_cell, _ = self._sort(shift_id, captures)
            for cell, cap in by_cell.items():
                self._add(cell, cap)
        self.processed.append(shift_id)
        del self.processed[: max(0, len(self.processed) - 1000)]
        return res

    def _add(self, cell: str, cap: GoldenCapture) -> None:
        """Add one capture to the cell's statistic and z baselines, each while it is not full."""
        b = self._base[cell]
        if len(b.values) < self.config.max_baseline:
            b.values.append([float(cap.stats.get(s.name, np.nan)) for s in GOLDEN_STATISTICS])
        if self.model_id is not None and cap.z is not None and len(b.z) < self.config.max_baseline:
            b.z.append([float(v) for v in cap.z])

    def register(self, cells: Sequence[str]) -> tuple[str, ...]:
        """Register more golden cells (each starts with an empty baseline); returns the cells that were new."""
        new = tuple(dict.fromkeys(str(c) for c in cells if str(c) not in self._base))
        for c in new:
            self._base[c] = _Baseline()
        return new

    def for_model(self, model_id: str | None) -> GoldenCheck:
        """The same line's check for another model: the model-free statistics keep their baselines, z restarts.

        Brightness, fine detail, noise level and rotation are measured on the pixels, so a new model changes
        nothing about them; only the latent z baselines belong to the model that encoded them.
        """
        out = GoldenCheck(self.line, list(self._base), model_id=model_id, config=self.config)
        for c, b in self._base.items():
            out._base[c] = _Baseline([list(r) for r in b.values], [] if model_id != self.model_id else
                                     [list(r) for r in b.z])
        out.processed = list(self.processed)
        return out

    def rebaseline(self, cells: Sequence[str] | None = None) -> None:
        """Forget the baselines (of ``cells``, default all) after a deliberate change of camera, optics or cells."""
        for c in self._base if cells is None else cells:
            if c not in self._base:
                raise ValueError(f"unknown golden cell {c!r}: registered {', '.join(self._base)}")
            self._base[c] = _Baseline()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready state."""
        return {
            "kind": STATE_KIND, "version": STATE_VERSION, "line": self.line, "model_id": self.model_id,
            "config": {k: getattr(self.config, k) for k in ("alpha", "min_baseline", "max_baseline", "min_cells")},
            "cells": {c: {"values": b.values, "z": b.z} for c, b in self._base.items()},
            "statistics": [s.name for s in GOLDEN_STATISTICS], "processed": self.processed,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, line: str, model_id: str | None) -> GoldenCheck:
        """Rebuild a check from :meth:`to_dict`, refusing a state of another line or model."""
        if d.get("kind") != STATE_KIND:
            raise GoldenStateMismatch(f"not a golden-sample state (kind {d.get('kind')!r})")
        if d.get("line") != line or d.get("model_id") != model_id:
            raise GoldenStateMismatch(
                f"golden state of line {d.get('line')!r} and model {d.get('model_id')!r} cannot serve line {line!r} "
                f"and model {model_id!r}: start new baselines for this line and model")
        if list(d.get("statistics", [])) != [s.name for s in GOLDEN_STATISTICS]:
            raise GoldenStateMismatch(f"golden state with statistics {d.get('statistics')} instead of "
                                      f"{[s.name for s in GOLDEN_STATISTICS]}: start new baselines")
        out = cls(line, list(d["cells"]), model_id=model_id, config=GoldenConfig(**d["config"]))
        for c, b in d["cells"].items():
            out._base[c] = _Baseline([list(map(float, r)) for r in b["values"]], [list(map(float, r)) for r in b["z"]])
        out.processed = [str(s) for s in d.get("processed", [])]
        return out

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the state as JSON, atomically (NaN is written as null)."""
        atomic.write_json(path, _nan_to_none(self.to_dict()), indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, line: str, model_id: str | None) -> GoldenCheck:
        """Read a state written by :meth:`save` (see :meth:`from_dict`)."""
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise GoldenStateMismatch(f"golden state {path} is not valid JSON ({e.msg}): start new baselines") from None
        return cls.from_dict(_none_to_nan(d), line=line, model_id=model_id)


def _nan_to_none(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_nan_to_none(v) for v in o]
    return o


def _none_to_nan(d: dict[str, Any]) -> dict[str, Any]:
    for b in d.get("cells", {}).values():
        b["values"] = [[np.nan if v is None else v for v in r] for r in b["values"]]
    return d
