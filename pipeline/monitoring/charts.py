"""The monitor's control chart: a per-line EWMA chart over the window stream, beside the per-window drift test.

The per-window test compares one window with the reference; a small persistent shift (a camera gain x0.9) moves a
window by less than lot-to-lot variation does, so it needs the evidence of many windows (:mod:`pipeline.analysis.spc`).
This module runs that chart inside the monitor:

* **Statistics** per image (:func:`image_statistics`): every latent axis ``z_*``, the image properties of
  ``pipeline.latent.properties.CHART_CHANNELS`` (brightness, contrast, detail, noise, rotation, ...), and ``score_tail`` (1 when the anomaly score is above the
  reference's 90th percentile). The chart takes each window's means.
* **Phase I** (:func:`fit_chart`): the champion's reference images, in production order, with their product types
  and lots (or blocks of consecutive images), limits calibrated to ``arl0`` windows. Beside its MEWMA the chart
  watches the patterns of the common camera faults (:data:`CAMERA_PATTERNS`), measured on a line's first fit by
  applying each fault to a sample of the reference images (:func:`fault_signatures`).
* **State** (:class:`LineCharts`): one JSON file per line under the alert manager's state folder
  (``<state_dir>/charts/<line>.json``), tied to the line and the model; a state of another line or model, or an
  unreadable one, is replaced by a new fit, with a message.
* **Alerts**: an alarm becomes a cause ``spc:<statistic>`` of family ``spc`` (:func:`chart_cause`), handed to the
  alert manager with the window's drift result (:class:`ChartedResult`), so it gets the same hysteresis, one alert
  per cause, outbox and webhook. The chart restarts after every alarm and follows the shift it found
  (``SpcChart.follow_shift``): a window where that shift goes on (``ChartPoint.ongoing``) keeps the alert open, and
  the first windows back at the centre resolve it. When the alert manager resolves the ``spc`` alert the chart
  restarts too (:meth:`LineCharts.after_events`).
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.analysis.spc import (
    ChartNotReady,
    ChartPoint,
    ChartStateMismatch,
    SpcChart,
    SpcConfig,
    phase1_problem,
)
from pipeline.common.figures import write_png
from pipeline.monitoring.causes import Cause

log = logging.getLogger(__name__)

FAMILY = "spc"
"""The alert family (group) of control-chart causes."""
TAIL_QUANTILE = 0.9
"""A cell counts in ``score_tail`` when its anomaly score is above this quantile of the reference's scores."""

__all__ = ["CAMERA_PATTERNS", "FAMILY", "ONE_SIDED_PATTERNS", "ChartNotReady", "ChartSettings", "ChartedResult",
           "LineCharts", "MonitorCharts", "chart_cause", "draw_chart", "fault_signatures", "fit_chart",
           "model_statistics", "image_statistics", "point_metrics", "window_size_of"]

CAMERA_PATTERNS: dict[str, tuple[str, float]] = {
    "camera gain x0.9": ("gain", 0.9),
    "defocus blur 1 px": ("blur", 1.0),
    "sensor noise 3 %": ("noise", 0.03),
    "fixture misalignment 2 deg": ("misalign", 2.0),
    "vignetting 0.2": ("vignetting", 0.2),
}
"""The camera faults whose patterns the chart watches beside its MEWMA: pattern name -> (fault kind, physical
parameter) of :func:`pipeline.line.faults.apply_to_capture`."""
ONE_SIDED_PATTERNS: frozenset[str] = frozenset({"defocus blur 1 px", "sensor noise 3 %", "vignetting 0.2"})
"""Patterns whose fault moves one way only: optics lose focus, sensors gain noise, light falls off towards the corners
with age. Their charts alarm only in that direction (a sharper, quieter or more even picture is no such fault; the
MEWMA still watches every direction). A gain can drop or rise and a cell can turn either way, so those two stay
two-sided."""
SIGNATURE_IMAGES = 120
"""Reference images a fault pattern is measured on (evenly spread over the reference)."""


@dataclass(frozen=True)
class ChartSettings:
    """How the monitor's charts are fitted.

    Attributes:
        arl0: in-control average run length in windows (one false alarm every ``arl0`` windows on average; with
            one window a day, 200 windows is about seven months).
        window: cells per bootstrap window of the Phase I (near the monitor's typical window size).
        n_windows: bootstrap windows the limit is calibrated on (at least; raised with ``arl0`` so that the MEWMA's
            share of the false alarms is calibrated on enough windows).
        n_segments: bootstrap segments (each with its own re-estimated centre).
        block: bootstrap block length (images) when the reference has no lot labels.
        min_lots: fewest lots (or blocks) of the reference for a chart (``SpcConfig.min_lots``).
        seed: bootstrap seed.
    """

    arl0: float = 200.0
    window: int = 100
    n_windows: int = 8_000
    n_segments: int = 20
    block: int = 60
    min_lots: int = SpcConfig.min_lots
    seed: int = 0

    def spc_config(self) -> SpcConfig:
        """The chart configuration."""
        needed = 6.0 * self.arl0 * SpcConfig.arl0_margin / (1.0 - SpcConfig.pattern_share)  # calibrate_limit wants 5x
        return SpcConfig(arl0=self.arl0, window=self.window, n_windows=max(self.n_windows, int(math.ceil(needed))),
                         n_segments=self.n_segments, block=self.block, min_lots=self.min_lots, seed=self.seed)


def image_statistics(z: np.ndarray, z_names: Sequence[str], quality: pd.DataFrame | None = None,
                     scores: np.ndarray | None = None, tail_threshold: float | None = None) -> pd.DataFrame:
    """Per-image chart statistics: latent axes, image-quality channels and the anomaly-score tail indicator.

    Args:
        z: (n, d) latents.
        z_names: their column names (``z_0`` ...).
        quality: the images' quality channels (n rows, same order), or None.
        scores: the images' anomaly scores, or None.
        tail_threshold: the reference's score quantile ``TAIL_QUANTILE`` (needed with ``scores``).

    Returns:
        One row per image, one column per statistic.
    """
    out = pd.DataFrame(np.asarray(z, float), columns=list(z_names))
    if quality is not None:
        q = quality.reset_index(drop=True).select_dtypes("number")
        out = pd.concat([q, out], axis=1)
    if scores is not None and tail_threshold is not None:
        out["score_tail"] = (np.asarray(scores, float) > tail_threshold).astype(float)
    return out


def fault_signatures(images: Sequence[np.ndarray], statistics_of: Callable[[list[np.ndarray]], pd.DataFrame],
                     patterns: Mapping[str, tuple[str, float]] = CAMERA_PATTERNS, seed: int = 0) -> dict[str, pd.Series]:
    """Each camera fault's pattern: the mean change of every chart statistic when the fault is applied to images.

    The faults act on each capture's scene and keep its pixel noise (:func:`pipeline.line.faults.apply_to_capture`),
    as a camera fault on the line does.

    Args:
        images: in-control images (uint8/uint16, gray), e.g. a sample of the reference.
        statistics_of: per-image chart statistics of a list of images (a DataFrame, one column per statistic).
        patterns: pattern name -> (fault kind, physical parameter).
        seed: seed of the faults that draw noise (each pattern draws its own stream, keyed by its name).

    Returns:
        Pattern name -> mean change per statistic (a Series indexed like ``statistics_of``'s columns).
    """
    from pipeline.line.faults import apply_to_capture

    images = list(images)
    if not images:
        raise ValueError("fault_signatures needs at least one in-control image")
    base = statistics_of(images)
    out = {}
    for name, (kind, value) in patterns.items():
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])  # each pattern its own stable draws
        faulty = statistics_of([apply_to_capture(img, kind, value, rng) for img in images])
        change = faulty[base.columns].to_numpy(float) - base.to_numpy(float)
        out[name] = pd.Series(change.mean(axis=0), index=base.columns)
    return out


def model_statistics(checkpoint: Any, images: Sequence[np.ndarray]) -> pd.DataFrame:
    """Per-image chart statistics of images under a model: its latents and the ``CHART_CHANNELS`` properties.

    ``score_tail`` is not among them (it needs the model's diffusion residuals, too slow for a fault pattern's
    hundreds of images); a pattern leaves it unchanged.
    """
    from pipeline.latent.encode import encode_images
    from pipeline.latent.properties import CHART_CHANNELS, measure_each

    z = encode_images(checkpoint.model, checkpoint.preprocess, images)
    return image_statistics(z, [f"z_{k}" for k in range(z.shape[1])], measure_each(images, CHART_CHANNELS))


def fit_chart(line: str, model_id: str | None, stats: pd.DataFrame, *, strata: Any = None, lots: Any = None,
              settings: ChartSettings = ChartSettings(), signatures: Mapping[str, pd.Series] | None = None) -> SpcChart:
    """Fit a line's chart on its in-control history (Phase I: the reference images, in production order).

    Args:
        line: the line.
        model_id: the model whose latents are among the statistics.
        stats: per-image statistics (:func:`image_statistics`).
        strata: product type per image (each compared with its own in-control mean), or None.
        lots: lot per image, or None (bootstrap blocks of consecutive images).
        settings: fitting settings.
        signatures: fault patterns (:func:`fault_signatures`) watched beside the MEWMA; a statistic a pattern
            does not give (e.g. ``score_tail``) counts as unchanged; those of :data:`ONE_SIDED_PATTERNS` in their
            own direction only. None: the MEWMA alone.

    Returns:
        The fitted chart.
    """
    sig = None if not signatures else {k: v.reindex(stats.columns).fillna(0.0).to_numpy(float)
                                       for k, v in signatures.items()}
    return SpcChart(line, model_id, settings.spc_config()).fit(stats, strata=strata, lots=lots, signatures=sig,
                                                               one_sided=ONE_SIDED_PATTERNS)


def chart_cause(point: ChartPoint) -> Cause | None:
    """The alert cause of a chart point: ``spc:<top statistic>`` on an alarm or while its shift goes on, else None."""
    if not (point.alarm or point.ongoing):
        return None
    top = point.top
    name = top.name if top is not None else "chart"
    effects = tuple(float(s.z) for s in point.shifts[:3])
    return Cause(f"{FAMILY}:{name}", FAMILY, (FAMILY,), (), (), effects, point.text)


class ChartedResult:
    """A window's drift result with a cause added (what the alert manager is given): the chart's, or the camera's.

    It reads as the drift result in every respect, except that ``detected`` is also true on an added cause and
    ``extra_causes`` carries the added causes (:func:`pipeline.monitoring.causes.window_causes` appends them).
    Wrapping a ``ChartedResult`` again keeps the inner one's added causes first (chart, then golden samples).
    """

    def __init__(self, result: Any, cause: Cause | None) -> None:
        self._result = result
        inner = tuple(getattr(result, "extra_causes", ()) or ()) if isinstance(result, ChartedResult) else ()
        self.extra_causes: tuple[Cause, ...] = inner + (() if cause is None else (cause,))

    @property
    def detected(self) -> bool:
        """The drift test's verdict, or the chart's alarm."""
        return bool(getattr(self._result, "detected", False)) or bool(self.extra_causes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._result, name)


class LineCharts:
    """The charts of every line under one state folder, loaded, fitted, updated and saved as the monitor goes.

    Args:
        state_dir: the alert manager's state folder (the charts live in ``charts/`` under it).
        model_id: the champion's model id.
        phase1: ``line -> (stats, strata, lots)`` of the in-control history, fitted on when a line has no usable
            state; a callable of the line returning that triple works too.
        settings: fitting settings.
        signatures: fault patterns for new fits (:func:`fault_signatures`), or a callable returning them (called
            once, on the first fit); None, or a callable that fails (with a message): the MEWMA alone.
    """

    def __init__(self, state_dir: str | Path, model_id: str | None, phase1: Any,
                 settings: ChartSettings = ChartSettings(), signatures: Any = None) -> None:
        self.dir = Path(state_dir) / "charts"
        self.model_id = model_id
        self.phase1 = phase1
        self.settings = settings
        self._signatures = signatures
        self.messages: list[str] = []
        self._charts: dict[str, SpcChart] = {}
        self._not_ready: dict[str, str] = {}

    def path(self, line: str) -> Path:
        """The state file of a line."""
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in line)
        return self.dir / f"{safe}.json"

    def chart(self, line: str) -> SpcChart:
        """The line's chart: its saved state, or a new Phase I fit when there is none usable (with a message).

        Raises:
            ChartNotReady: the Phase I is too small for a chart (:func:`pipeline.analysis.spc.phase1_problem`);
                decided once per instance, before the fault patterns are measured.
        """
        if line in self._charts:
            return self._charts[line]
        if line in self._not_ready:
            raise ChartNotReady(self._not_ready[line])
        p = self.path(line)
        chart = None
        if p.exists():
            try:
                chart = SpcChart.load(p, line=line, model_id=self.model_id)
            except (ChartStateMismatch, KeyError, TypeError, ValueError) as e:
                self.messages.append(f"line {line}: control-chart state {p.name} not used ({e}); fitted anew")
                log.warning("%s", self.messages[-1])
        if chart is None:
            src = self.phase1(line) if callable(self.phase1) else self.phase1[line]
            stats, strata, lots = src
            problem = phase1_problem(int(np.isfinite(stats.to_numpy(float)).all(axis=1).sum()), lots,
                                     self.settings.spc_config())
            if problem:
                self._not_ready[line] = f"no control chart for line {line}: {problem}"
                raise ChartNotReady(self._not_ready[line])
            chart = fit_chart(line, self.model_id, stats, strata=strata, lots=lots, settings=self.settings,
                              signatures=self.signatures())
        self._charts[line] = chart
        return chart

    def signatures(self) -> Mapping[str, pd.Series] | None:
        """The fault patterns new fits watch (measured once per instance); None when there are none."""
        if callable(self._signatures):
            try:
                self._signatures = self._signatures()
            except Exception as e:  # noqa: BLE001 - the MEWMA still watches every direction
                self._signatures = None
                self.messages.append(f"camera-fault patterns not measured ({type(e).__name__}: {e}); "
                                     "the chart runs its MEWMA alone")
                log.warning("%s", self.messages[-1])
        return self._signatures or None

    def update(self, line: str, window_id: str, stats: pd.DataFrame, strata: Any = None) -> ChartPoint:
        """Add one window to the line's chart and save the state; the chart point."""
        chart = self.chart(line)
        point = chart.update(window_id, stats[list(chart.names)], strata=strata)
        chart.save(self.path(line))
        return point

    def after_events(self, line: str, events: Sequence[Any]) -> bool:
        """Restart the line's chart when the alert manager resolved its ``spc`` alert; whether it did."""
        resolved = any(getattr(e, "kind", "") == "resolved" and getattr(getattr(e, "alert", None), "family", "")
                       == FAMILY for e in events)
        if resolved and line in self._charts:
            self._charts[line].reset()
            self._charts[line].save(self.path(line))
        return resolved


def point_metrics(point: ChartPoint) -> dict[str, float]:
    """The chart's numbers of one window for a metrics log: statistic, limit, alarm (0/1), MEWMA part."""
    return {"spc_value": float(point.value), "spc_limit": float(point.limit), "spc_alarm": float(point.alarm),
            "spc_t2": float(point.t2)}


def window_size_of(reference: pd.DataFrame, window_by: str, window_size: int | None, timezone: str) -> int:
    """Cells per chart window: the monitor's count windows, else the reference's median images per day or shift."""
    if window_by == "count" and window_size:
        return int(window_size)
    if "captured_at" not in reference.columns or reference.empty:
        return 100
    t = pd.to_datetime(reference["captured_at"], utc=True).dt.tz_convert(timezone)
    period = t.dt.floor("D") if window_by == "day" else t.dt.floor("8h")
    size = int(period.value_counts().median())
    return max(10, min(size, len(reference) // 4))


class MonitorCharts:
    """The charts of one monitor pass: the champion's reference is every line's Phase I.

    Args:
        state_dir: the alert manager's state folder.
        model_id: the champion's model id.
        reference: the champion's reference rows (``product_type``, ``lot`` and ``captured_at`` when known).
        z_ref: the reference latents (rows as ``reference``).
        quality: image-quality channels indexed by image id (reference and monitored images), or None.
        ref_scores: the reference's anomaly scores, or None (no ``score_tail``).
        window: cells per chart window (:func:`window_size_of`).
        arl0: the charts' in-control average run length, in windows.
        min_lots: fewest lots (or blocks) of the reference for a line's chart.
        signatures: camera-fault patterns for new fits, or a callable giving them (see :class:`LineCharts`).
    """

    def __init__(self, state_dir: str | Path, model_id: str | None, reference: pd.DataFrame, z_ref: np.ndarray,
                 quality: pd.DataFrame | None, ref_scores: np.ndarray | None, window: int,
                 arl0: float = ChartSettings.arl0, min_lots: int = ChartSettings.min_lots,
                 signatures: Any = None) -> None:
        self.z_names = [f"z_{k}" for k in range(np.asarray(z_ref).shape[1])]
        order = np.argsort(pd.to_datetime(reference["captured_at"], utc=True).to_numpy(), kind="stable") \
            if "captured_at" in reference.columns else np.arange(len(reference))  # production order
        reference, z_ref = reference.iloc[order].reset_index(drop=True), np.asarray(z_ref)[order]
        ref_scores = None if ref_scores is None else np.asarray(ref_scores)[order]
        self.quality = quality
        self.threshold = None if ref_scores is None else float(np.quantile(ref_scores, TAIL_QUANTILE))
        q_ref = None if quality is None else self._channels(quality.loc[reference["image_id"].astype(str).to_numpy()])
        stats = image_statistics(z_ref, self.z_names, q_ref, ref_scores, self.threshold)
        strata = reference["product_type"].fillna("unknown").astype(str).to_numpy() \
            if "product_type" in reference.columns else None
        lots = reference["lot"].astype(str).to_numpy() if "lot" in reference.columns else None
        self.not_ready_said: set[str] = set()  # lines whose ChartNotReady the monitor has logged in this pass
        self.charts = LineCharts(state_dir, model_id, lambda line: (stats, strata, lots),
                                 ChartSettings(arl0=arl0, window=window, min_lots=min_lots), signatures)

    @staticmethod
    def _channels(quality: pd.DataFrame) -> pd.DataFrame:
        """The chart's image properties (``CHART_CHANNELS``) of an image-property table."""
        from pipeline.latent.properties import CHART_CHANNELS, channel_table

        return channel_table(quality, CHART_CHANNELS)

    def window(self, line: str, window_id: str, frame: pd.DataFrame) -> ChartPoint:
        """The chart point of one monitored window.

        Its rows carry ``z_*``, ``image_id`` and ``score``: the per-image flag score on the scale of the reference
        scores the chart was fitted with (``pipeline.monitoring.scoring.score_images``).
        """
        q = None if self.quality is None else self._channels(self.quality.loc[frame["image_id"].astype(str).to_numpy()])
        col = "score" if "score" in frame.columns else None
        scores = frame[col].to_numpy(float) if col is not None else None
        stats = image_statistics(frame[self.z_names].to_numpy(float), self.z_names, q, scores, self.threshold)
        strata = frame["product_type"].fillna("unknown").astype(str).to_numpy() \
            if "product_type" in frame.columns else None
        return self.charts.update(line, window_id, stats, strata)


def draw_chart(chart: SpcChart, out_path: str | Path, *, title: str = "") -> Path:
    """Draw a line's control chart: the chart statistic per window against its limit, alarms and the change point.

    The x axis shows the windows' dates when their ids are dates (day or shift windows), else their ids. The
    statistic is the MEWMA and the fault-pattern charts, each over its own limit, so the limit sits near 1.

    Args:
        chart: the fitted chart with its recent history.
        out_path: PNG to write.
        title: the picture's title (e.g. the alert's statistic).

    Returns:
        The written file.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    points = [h["point"] for h in chart.history if "point" in h]
    ids = [str(p["window_id"]) for p in points]
    dates = pd.to_datetime(pd.Series(ids), errors="coerce", utc=True)
    x = list(dates) if len(ids) and dates.notna().all() else list(range(len(ids)))
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.plot(x, [p["value"] for p in points], marker="o", ms=3, lw=1.2, label="chart statistic (EWMA)")
    ax.plot(x, [p["limit"] for p in points], color="crimson", ls="--", lw=1, label=f"limit (ARL0 {chart.config.arl0:g})")
    alarms = [i for i, p in enumerate(points) if p["alarm"]]
    ax.scatter([x[i] for i in alarms], [points[i]["value"] for i in alarms], color="crimson", zorder=3, label="alarm")
    changes = {p["change_window"] for p in points if p["alarm"] and p.get("change_window")}
    for cw in changes & set(ids):
        ax.axvline(x[ids.index(cw)], color="darkorange", lw=1.5, label=f"change point ({cw})")
    if x and not isinstance(x[0], int):
        fig.autofmt_xdate()
    else:
        ax.set_xticks(range(len(ids)), ids, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("statistic / limit")
    ax.set_title(title or f"control chart, line {chart.line}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    out = write_png(fig, out_path, dpi=90)
    plt.close(fig)
    return out
