"""The monitor's settings and what one pass returns.

:class:`MonitorConfig` (built from JSON-friendly parameters by :func:`monitor_config`) says what to monitor and how;
:class:`MonitorResult` holds one :class:`WindowOutcome` per window tested, the alert events and the MLflow run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from pipeline.analysis.blocks import MIN_BLOCKS

#: Smallest move of an image-quality channel's window median the drift test reports, in the channel's unit. Pixel
#: noise (fraction of full scale): the day medians of healthy ELPV poly cells fall in two groups (0.0042-0.0047 and
#: 0.0048-0.0056 in soak_s44), and a day mostly of the rarer group lies outside a two-week reference; 0.002 (half a
#: grey level of an 8-bit camera) is above that whole spread and a thirteenth of the 3 % noise fault's rise.
DEFAULT_QUALITY_FLOORS: tuple[tuple[str, float], ...] = (("noise_level", 0.002),)

#: The direction the drift test watches each image-quality channel in: the way camera and optics faults move it
#: (``pipeline.latent.properties``; the control chart's one-sided patterns, ``docs/spc.md``). Defocus and sensor noise
#: raise the fine-detail ratio, sensor noise raises the noise level, uneven light and vignetting lower the
#: border / centre ratio; rotation is watched both ways. Healthy ELPV lots move the first three either way.
DEFAULT_QUALITY_DIRECTIONS: tuple[tuple[str, int], ...] = (("detail_ratio", 1), ("noise_level", 1), ("illumination", -1))


@dataclass(frozen=True)
class MonitorConfig:
    """What one monitor run looks at and how it decides.

    Attributes:
        lines: production lines (None: all in the catalog).
        start: first capture time monitored (None: ``lookback_days`` before the newest image).
        end: end of the monitored period, exclusive (None: open).
        lookback_days: period monitored when ``start`` is None.
        window_by: ``"day"`` (plant days in the configured time zone), ``"shift"`` or ``"count"``.
        window_size: images per window with ``window_by="count"``.
        alpha: false-alarm rate per window of the drift test.
        null: ``"lot"`` (default: calibrated on consecutive reference images) or ``"iid"``.
        min_window: smallest window tested.
        n_calibration: bootstrap windows of the lot null.
        min_reference_blocks: fewest line-periods (a line's day or shift with at least 8 reference images) a model's
            reference must hold for the lot null to know how much healthy periods differ (``pipeline.analysis.blocks``);
            a younger reference is refused before training (no candidate) and by the gate, and the line waits for
            more days (``docs/monitoring.md``). 0 turns the check off (references without line and capture time are
            never checked).
        quality: also test full-resolution image-quality channels (``pipeline.latent.properties.QUALITY_CHANNELS``:
            fine detail, pixel noise, rotation) of every window; they see blur, sensor noise and small
            misalignments that the model's low-resolution latents average away. Measured once per image and cached.
        scores: also test whether the window's per-image anomaly scores are higher than the reference's (AUC and
            the share of cells above the reference's 90th percentile; the reference's scores are cross-fitted,
            ``pipeline.training.retrain.calibration_scores``): a rise in the share of unusual cells, such as more cracked
            cells. Needs a bundle with residual scoring.
        fpr: per-image detector false-positive target.
        cards: render axis-card strips for the axes of alerted windows (cached per model).
        report: draw a drift report picture per alerted window.
        seed: seed of the detector split and the drift tests.
        progress: progress bars.
        spc: also run each line's control chart over its windows (``pipeline.monitoring.charts``): a persistent
            small shift raises an alert with cause ``spc:<statistic>``.
        spc_arl0: the chart's in-control average run length, in windows (``docs/spc.md``: days between false
            alarms).
        spc_min_lots: fewest lots (blocks of 60 images without lot labels) in the champion's reference for a line
            chart; with fewer the monitor runs without it and says so once per line (``docs/spc.md``).
        heatmaps: for a window whose drift test fired, draw heatmap overlays of its top flagged cells
            (``pipeline.monitoring.heatmaps``: backbone patch maps judged by a patch detector fitted once per model on
            the calibration cells), cite them in the alert and show them in the drift report. A failure is one
            logged warning; the window goes on without them.
        fusion: score and flag every cell with the patch family (``pipeline.monitoring.patches``): the backbone's
            patch maps judged by the patch detector of the calibration cells, fused with the residual family at
            ``residual_weight`` and thresholded lot-aware at ``fpr``. The drift test's score family and the chart's
            ``score_tail`` read the same score. Off, or when the patch family cannot run (a missing weights
            package: one warning), the residual family alone scores and flags.
        residual_weight: the diffusion residual's weight in the per-image score against the patch family's 1.
            0 (default): the patch family alone, and the monitor computes no residuals. On cells of lots the model
            never saw, the nightly model's residual ranks defective cells barely above chance and pulls the fused
            score below the patch family's (``benchmarks/bench_flag_rate``); 1 weighs both families equally.
        quality_floors: (channel, floor) pairs: the smallest move of a quality channel's window median, in the
            channel's own unit, that the quality family reports (``DriftDetector(quality_floors=...)``); a smaller
            move is never significant however unusual against the reference. A mapping is accepted too. Default:
            pixel noise must rise or fall by 0.002 of full scale (``DEFAULT_QUALITY_FLOORS``, ``docs/monitoring.md``).
        quality_directions: (channel, direction) pairs: +1 reports only a rise of the channel's median, -1 only a
            fall, 0 or unnamed both (``DriftDetector(quality_directions=...)``). Default ``DEFAULT_QUALITY_DIRECTIONS``:
            each channel in the direction camera and optics faults move it; the control chart still sees both.
        recentre: judge every cell against its own line-day (``pipeline.analysis.thresholds.day_thresholds``): its
            flag score in robust units of the day (median, interquartile range) against the ``fpr`` order statistic
            of the calibration cells judged against their own production periods, so a day of new lots, higher or
            lower, wider or narrower, is flagged at about ``fpr``. Days of fewer than ``min_window`` cells so far
            keep the calibration threshold; a cell's flag is final once its day is complete. The day's threshold
            less the calibration one is kept in the scores table (``day_offset``, either sign).
    """

    lines: tuple[str, ...] | None = None
    start: datetime | None = None
    end: datetime | None = None
    lookback_days: float = 2.0
    window_by: str = "day"
    window_size: int | None = None
    alpha: float = 0.01
    null: str = "lot"
    min_window: int = 30
    n_calibration: int = 500
    min_reference_blocks: int = MIN_BLOCKS
    quality: bool = True
    scores: bool = True
    fpr: float = 0.05
    cards: bool = True
    report: bool = True
    seed: int = 0
    progress: bool = False
    spc: bool = True
    spc_arl0: float = 200.0
    spc_min_lots: int = 2
    heatmaps: bool = True
    fusion: bool = True
    residual_weight: float = 0.0
    recentre: bool = True
    quality_floors: tuple[tuple[str, float], ...] = DEFAULT_QUALITY_FLOORS
    quality_directions: tuple[tuple[str, int], ...] = DEFAULT_QUALITY_DIRECTIONS

    def __post_init__(self) -> None:
        from pipeline.analysis.drift.detector import quality_rules

        floors, directions = quality_rules(self.quality_floors, self.quality_directions)  # the detector's own check
        object.__setattr__(self, "quality_floors", tuple(floors.items()))
        object.__setattr__(self, "quality_directions", tuple(directions.items()))
        if self.window_by not in ("day", "shift", "count"):
            raise ValueError(f"MonitorConfig.window_by must be 'day', 'shift' or 'count', got {self.window_by!r}")
        if self.window_by == "count" and not self.window_size:
            raise ValueError("MonitorConfig.window_by='count' needs window_size")
        if self.null not in ("lot", "iid"):
            raise ValueError(f"MonitorConfig.null must be 'lot' or 'iid', got {self.null!r}")
        if self.lookback_days <= 0:
            raise ValueError(f"MonitorConfig.lookback_days must be > 0, got {self.lookback_days}")
        if self.min_reference_blocks < 0:
            raise ValueError(f"MonitorConfig.min_reference_blocks must be >= 0, got {self.min_reference_blocks}")
        if not self.residual_weight >= 0:
            raise ValueError(f"MonitorConfig.residual_weight must be >= 0, got {self.residual_weight}")


@dataclass(frozen=True)
class WindowOutcome:
    """Verdict on one window.

    Attributes:
        line: production line.
        window_id: e.g. ``"2026-01-11"``.
        start: window start (UTC).
        end: window end (UTC).
        n_images: images in the window (``n_tested`` of them were tested).
        n_tested: images given to the drift test (subsampled evenly when the window exceeds a third of the reference,
            ``DriftDetector.max_window``).
        n_anomalous: images above the detector threshold.
        detected: the drift test fired.
        top_axis: the axis that moved most (None without drift).
        top_share: its share of the total shift.
        effect: its signed effect (reference standard deviations).
        description: what the top axis means (from the axis descriptions), or the image-level families' phrase,
            then the product mix when it explains the verdict (``pipeline.analysis.axes.mix_note``).
        summary: the drift test's one-line summary.
        attribution: the attribution's text.
        alert_active: an alert is open for the line after this window.
        events: alert events this window produced (sent now), as dicts.
        report: drift report picture, when drawn (``drift_<line>_<window>_v<model version>.png``).
        model_version: the model that made this verdict.
        fired: test families that fired.
        causes: the drift's causes (``pipeline.monitoring.causes``: ``axes:z_3``, ``quality:noise_level``, ``scores``, ...).
        example_serials: MES serials of the window's most unusual images (highest anomaly scores first).
        explanation: a paragraph in plain language on the verdict (``pipeline.monitoring.report.plain_summary``), the top of
            the drift report.
        golden: the verdicts of the line's golden-sample rounds tested with this window (``"<round>: <text>"``).
        heatmaps: heatmap overlays (PNG) of the window's top flagged cells, highest score first
            (``pipeline.monitoring.heatmaps``; empty when the window did not fire or they could not be drawn).
        golden_metrics: their numbers for MLflow (``pipeline.monitoring.golden.round_metrics``).
        original: this is the window's first verdict (made by the champion of that moment); False for a later
            model's re-evaluation, which is stored beside it and never over it (:func:`record_verdicts`).
        shift_since: when the line's control chart names a cause in this window, the first window of the shift it
            found (its estimated change point); the nightly retrain keeps every window from there on out of training
            (``pipeline.training.selection.alert_windows``). Empty otherwise.
    """

    line: str
    window_id: str
    start: datetime
    end: datetime
    n_images: int
    n_tested: int
    n_anomalous: int
    detected: bool
    top_axis: int | None
    top_share: float
    effect: float
    description: str
    summary: str
    attribution: str
    alert_active: bool
    events: tuple[dict[str, Any], ...] = ()
    report: str | None = None
    model_version: str = ""
    fired: tuple[str, ...] = ()
    causes: tuple[str, ...] = ()
    example_serials: tuple[str, ...] = ()
    original: bool = True
    explanation: str = ""
    chart: dict[str, float] = field(default_factory=dict)
    golden: tuple[str, ...] = ()
    golden_metrics: dict[str, float] = field(default_factory=dict)
    heatmaps: tuple[str, ...] = ()
    shift_since: str = ""


@dataclass(frozen=True)
class MonitorResult:
    """What a monitor run did.

    Attributes:
        windows: one outcome per tested window, in time order.
        alerts: alert events produced by this run (new alerts, escalations, resolutions), as dicts.
        run_id: MLflow monitoring run id.
        model_version: champion version used.
        model_id: its checkpoint id.
        n_encoded: images encoded (all images of the period, cached or new).
        skipped: windows too small to test (``window_id``, ``n``, ``reason``).
    """

    windows: tuple[WindowOutcome, ...]
    alerts: tuple[dict[str, Any], ...]
    run_id: str | None
    model_version: str
    model_id: str
    n_encoded: int
    skipped: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return json.loads(json.dumps(asdict(self), default=str))


def monitor_config(**params: Any) -> MonitorConfig:
    """A ``MonitorConfig`` from JSON-friendly parameters (ISO 8601 strings for times; None = the default)."""
    from dataclasses import fields

    p = {k: v for k, v in params.items() if v is not None}
    unknown = set(p) - {f.name for f in fields(MonitorConfig)}
    if unknown:
        raise ValueError(f"unknown monitor parameters {sorted(unknown)}")
    for k in ("start", "end"):
        if isinstance(p.get(k), str):
            p[k] = datetime.fromisoformat(p[k])
    if "lines" in p:
        p["lines"] = tuple(p["lines"])
    return MonitorConfig(**p)
