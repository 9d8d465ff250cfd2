"""The monitor job: encode new images with the champion, score anomalies, test drift per window, alert, log.

Plain functions with a frozen config and result; ``flows/monitor.py`` wraps them in a Prefect task. One run:

1. The champion comes from the registry (``tracking.download_model("champion")``) with its ``linewatch/`` bundle:
   the calibration latents and diffusion residuals written by the retrain (images the model did not train on) are
   the drift reference and the detector's fitting data (refitted deterministically, same seed and split as the
   retrain's gate).
2. Catalog images of the monitored period are encoded into the resumable latents table
   (``<state>/latents.parquet``; a rerun only encodes what is missing), their diffusion residuals computed once per
   image and model (``<state>/residuals.parquet``), and scored by the detector (the residual judged against the
   calibration images nearest in z, ``pipeline.analysis.detectors.ConditionalResidual``), fused by default with the
   patch family (``pipeline.monitoring.patches``: the frozen backbone's patch maps against the calibration cells',
   thresholded lot-aware on out-of-period scores); flags go to ``<state>/scores.parquet`` with the scorer that set
   them (the retrain's selection drops flagged images).
3. Images are cut into windows (per plant day by default, in ``settings.timezone``; a window still in progress
   waits for a later run); each complete window is tested against the reference (lot-aware null by default),
   attributed to latent axes with their descriptions, named by its causes (``pipeline.monitoring.causes``) and handed to the
   alert manager (one alert per cause), whose persisted state makes reruns idempotent: a window already processed is
   not re-alerted (also when a later model tests it again), an open alert is not forgotten after a restart.
4. Window verdicts are appended to ``<state>/windows.parquet`` (``pipeline.monitoring.verdicts``: the first verdict of a
   window is its ``original``; a later model's re-evaluation is stored beside it, never over it; the retrain drops
   windows any verdict called drifted); metrics go to one MLflow monitoring run per line
   (``pipeline.tracking.monitoring``: ``axis_03/effect`` series, the per-window table, the alert as the run
   description, links to the model version and the monitored images); each drifted window gets a drift report
   picture per model version (``drift_<line>_<window>_v<version>.png``), headed by a plain-language paragraph,
   naming the most unusual cells by their MES serial and showing the moved axis's card and the heatmap overlays of
   the window's top flagged cells (``pipeline.monitoring.heatmaps``; also cited by the alert and logged to MLflow).
5. Golden-sample captures (``sample_kind`` golden: a line's fixed reference cells re-imaged every shift) never enter
   a window, a score or a flag; each round of them is compared with the cells' own earlier captures
   (``pipeline.monitoring.golden``) with the first window that ends after it, and a round that fired adds the cause
   ``camera:<statistic>`` ("camera/optics changed: brightness -10 % on the golden cells (5 of 5)") to that window's
   alert. A line without golden captures is monitored exactly as before.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.analysis.blocks import MIN_BLOCKS
from pipeline.handoff.bundle import (
    BUNDLE_DIR,
    CALIBRATION_FILE,
    GATE_FILE,
    ScoringConfig,
    calibration_scores,
    detector_calibration,
    reference_groups,
)
from pipeline.handoff.state import CHAMPION, MonitorHooks, state_dir
from pipeline.monitoring.tables import (  # noqa: F401 - re-exported: the monitor's tables
    _upsert,
    axis_card_paths,
    axis_descriptions,
    latents_table_path,
    pending_residuals,
    quality_channels,
    quality_table_path,
    residual_frame,
    residual_parts_dir,
    residual_table,
    residuals_table_path,
    scores_table_path,
)
from pipeline.monitoring.verdicts import record_verdicts, window_verdicts, windows_table_path  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)


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
        fusion: score and flag every cell with the fused per-image score (``pipeline.monitoring.patches``): the
            backbone's patch maps judged by the patch detector of the calibration cells, fused with the residual
            family and thresholded lot-aware at ``fpr``. The drift test's score family and the chart's
            ``score_tail`` stay on the residual family (measured with it). Off, or when the patch family cannot
            run (a missing weights package: one warning), the residual family alone scores and flags.
        recentre: judge every cell against its own line-day too (``pipeline.analysis.thresholds.day_offsets``): a
            day whose lower quartile of flag scores lies above the calibration cells' is moved down by that distance
            before the threshold, so a day of new lots is flagged at about ``fpr`` rather than two or three times
            it. Days of fewer than ``min_window`` cells so far are not moved; a cell's flag is final once its day is
            complete. The offset is kept in the scores table (``day_offset``).
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
    recentre: bool = True

    def __post_init__(self) -> None:
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


# --------------------------------------------------------------------------------------------------------------
# The champion and its reference
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Champion:
    """A loaded champion: checkpoint, bundle reference latents and the fitted detector."""

    version: str
    path: Path
    checkpoint: Any
    model_id: str
    reference: pd.DataFrame
    z_ref: np.ndarray
    detector: Any
    gate: dict[str, Any]
    scoring: ScoringConfig | None = None
    """The residual recipe of the bundle; None for a bundle from before residual scoring (Mahalanobis on z)."""
    ref_scores: np.ndarray | None = None
    """Out-of-sample anomaly scores of the reference images (cross-fitted), for the drift test's score family."""


NO_CHAMPION_YET = "no champion yet: the line is monitored from its first promoted model on"
"""Why a monitor pass on a line without a champion (a new line, before its first nightly promotion) is skipped."""


def champion_version(settings: Any) -> str | None:
    """The registered champion's version, or None while the line has none (before its first model)."""
    from pipeline import tracking

    tracking.configure(settings)
    version = tracking.get_alias_version(CHAMPION, name=settings.model_name)
    return None if version is None else str(version)


def load_champion(settings: Any, *, fpr: float = 0.05, seed: int = 0) -> Champion:
    """Download the champion and rebuild its detector from the bundle's calibration latents.

    Raises:
        ValueError: no champion is registered yet, or the registered folder has no linewatch bundle.
    """
    from pipeline import tracking

    version = champion_version(settings)
    if version is None:
        raise ValueError(
            f"no '{CHAMPION}' model is registered under {settings.model_name!r}: run the nightly retrain first "
            "(linewatch nightly / the retrain flow)"
        )
    path = tracking.download_model(version, Path(settings.checkpoints_dir) / f"registry-v{version}",
                                   name=settings.model_name)
    return load_bundle(path, str(version), fpr=fpr, seed=seed)


def load_bundle(path: str | Path, version: str, *, fpr: float = 0.05, seed: int = 0) -> Champion:
    """Load a model folder (checkpoint + ``linewatch/`` bundle) the way the monitor uses it.

    The detector is refitted from the bundle's calibration latents and residuals (same seed and split as the
    retrain's gate) and the reference's anomaly scores are cross-fitted. The retrain's gate calls this on a candidate
    before it may become champion, so a bundle the monitor cannot load is never promoted.

    Raises:
        ValueError: the folder has no linewatch bundle, or its reference is too small for the detector.
    """
    from models.checkpoint import load_checkpoint
    from pipeline.analysis.detectors.conditional import residual_columns
    from pipeline.latent.encode import z_columns

    bundle = Path(path) / BUNDLE_DIR
    if not (bundle / CALIBRATION_FILE).exists():
        raise ValueError(f"model v{version} has no {BUNDLE_DIR}/{CALIBRATION_FILE}: register it with the retrain job")
    ckpt = load_checkpoint(path)
    ref = pd.read_parquet(bundle / CALIBRATION_FILE)
    z_ref = ref[z_columns(ref)].to_numpy(np.float64)
    gate = json.loads((bundle / GATE_FILE).read_text()) if (bundle / GATE_FILE).exists() else {}
    scoring = ScoringConfig.from_dict(gate.get("scoring"))
    residuals = None
    if scoring is not None:
        residuals = ref[residual_columns(len(scoring.t_stars))].to_numpy(np.float64)
    else:
        logger.warning("model v%s has no residual scoring in its bundle: scoring images with Mahalanobis on z "
                       "(retrain to get the residual detector)", version)
    det_seed = int(gate.get("detector_seed", seed))
    groups = reference_groups(ref)  # threshold on scores of periods the detector did not fit (handoff.bundle)
    _, det = detector_calibration(z_ref, gate.get("fpr_target", fpr), seed=det_seed,
                                  residuals=residuals, k=scoring.k if scoring else 25, groups=groups)
    ref_scores = None if scoring is None else calibration_scores(z_ref, residuals, k=scoring.k, seed=det_seed,
                                                                 groups=groups)
    return Champion(str(version), Path(path), ckpt, str(ckpt.meta.get("model_id", "")), ref, z_ref, det, gate,
                    scoring, ref_scores)


def drift_detector(config: MonitorConfig) -> Any:
    """The (unfitted) ``DriftDetector`` the monitor tests windows with under ``config``."""
    from pipeline.analysis.drift import DriftDetector

    return DriftDetector(alpha=config.alpha, null=config.null, min_window=config.min_window,
                         n_calibration=config.n_calibration, random_state=config.seed, progress=config.progress)


def reference_floor(config: MonitorConfig | None = None) -> int:
    """Fewest calibration (reference) images a model needs for the monitor to test windows under ``config``.

    Taken from the drift detector itself (:meth:`pipeline.analysis.drift.DriftDetector.min_reference`), so the retrain's
    selection floor and gate can never disagree with what :func:`monitor` checks.
    """
    return int(drift_detector(config or MonitorConfig()).min_reference())


def reference_problem(settings: Any, reference: pd.DataFrame, config: MonitorConfig | None = None) -> str | None:
    """Why the lot null under ``config`` could not be calibrated on ``reference`` (calibration rows); None if it can.

    A reference of fewer line-periods than ``config.min_reference_blocks`` cannot tell a new day from the normal
    difference between days (:func:`pipeline.analysis.blocks.blocks_shortfall`).
    """
    from pipeline.analysis.blocks import blocks_shortfall, reference_blocks

    config = config or MonitorConfig()
    if config.null != "lot":
        return None
    streams, periods = reference_blocks(reference, settings.timezone, config.window_by)
    return blocks_shortfall(streams, periods, config.min_reference_blocks)


def drift_channels(quality: pd.DataFrame) -> pd.DataFrame:
    """The columns of an image-property table the drift test compares (``QUALITY_CHANNELS``)."""
    from pipeline.latent.properties import QUALITY_CHANNELS, channel_table

    return channel_table(quality, QUALITY_CHANNELS)


def build_drift_detector(settings: Any, champ: Champion, config: MonitorConfig,
                         images: pd.DataFrame | None = None) -> tuple[Any, pd.DataFrame | None]:
    """Fit the monitor's drift detector on the champion's reference.

    Args:
        settings: where the image-quality table lives.
        champ: the loaded model (:func:`load_bundle`).
        config: the monitor's settings.
        images: catalog rows (``image_id``, ``store_path``) of the windows to test, measured for the image-quality
            channels together with the reference (None: the reference only).

    Returns:
        (the fitted detector, the image-property table indexed by image id (every ``MONITOR_CHANNELS`` column),
        or None without the quality family).
    """
    ref = champ.reference
    ref_order = pd.to_datetime(ref["captured_at"], utc=True).astype("int64").to_numpy() \
        if "captured_at" in ref.columns else None
    # the lot null draws calibration windows with the reference's product mix, when the catalog knows the product
    ref_strata = None  # also with one product: a window of another product is then named as what explains it
    if "product_type" in ref.columns:
        ref_strata = ref["product_type"].fillna("unknown").astype(str).to_numpy()
    quality = q_ref = None
    if config.quality:
        todo = ref[["image_id", "store_path"]] if images is None else pd.concat(
            [ref[["image_id", "store_path"]], images[["image_id", "store_path"]]], ignore_index=True)
        quality = quality_channels(settings, todo, progress=config.progress)
        q_ref = drift_channels(quality.loc[ref["image_id"].astype(str).to_numpy()]).reset_index(drop=True)
    drift = drift_detector(config)
    use_scores = config.scores and champ.ref_scores is not None
    # the lot null's calibration windows are the reference's own line-days (pipeline.analysis.blocks)
    from pipeline.analysis.blocks import reference_blocks

    streams, periods = reference_blocks(ref, settings.timezone, config.window_by)
    drift.fit(champ.z_ref, model_id=champ.model_id, ref_order=ref_order, ref_strata=ref_strata, ref_quality=q_ref,
              ref_scores=champ.ref_scores if use_scores else None, ref_streams=streams, ref_periods=periods)
    return drift, quality


def check_bundle(settings: Any, path: str | Path, config: MonitorConfig | None = None) -> list[str]:
    """What would stop the monitor from using the model folder at ``path``; ``[]`` when it can.

    Loads the bundle as the monitor does (:func:`load_bundle`), fits its drift detector (:func:`build_drift_detector`)
    and tests the largest window the monitor would test (reference rows stand in for a window). Every failure is
    caught and returned as one line, so the retrain's gate can refuse the candidate instead of promoting it.
    """
    config = config or MonitorConfig()
    try:
        champ = load_bundle(path, "candidate", fpr=config.fpr, seed=config.seed)
        floor = reference_floor(config)
        if len(champ.reference) < floor:
            return [f"reference has {len(champ.reference)} images; the monitor needs at least {floor} "
                    f"(2 x min_window = {config.min_window})"]
        young = reference_problem(settings, champ.reference, config)
        if young:
            return [young]
        drift, quality = build_drift_detector(settings, champ, config)
        n = drift.max_window or config.min_window
        keep = np.arange(min(n, len(champ.z_ref)))
        qw = None if quality is None else drift_channels(
            quality.loc[champ.reference["image_id"].astype(str).to_numpy()[keep]])
        sw = None if drift.ref_scores_ is None else champ.ref_scores[keep]
        drift.test(champ.z_ref[keep], model_id=champ.model_id, cur_quality=qw, cur_scores=sw)
    except Exception as exc:  # noqa: BLE001 - any failure here is a reason not to promote
        logger.warning("the monitor could not use the model at %s: %s", path, exc)
        return [f"{type(exc).__name__}: {exc}"]
    return []


def retrain_hooks(settings: Any, config: MonitorConfig | None = None) -> MonitorHooks:
    """The monitor's side of the retrain (``pipeline.training.retrain.MonitorHooks``) for the settings ``config``.

    The gate asks :func:`check_bundle` whether this monitor can use a candidate, the selection's floor is
    :func:`reference_floor`, the selection's calibration snapshot is checked by :func:`reference_problem`, and ops
    alerts go through :func:`default_alert_manager`'s outbox and sinks.
    """
    config = config or MonitorConfig()
    return MonitorHooks(check_bundle=lambda path: check_bundle(settings, path, config),
                        reference_floor=reference_floor(config),
                        reference_problem=lambda reference: reference_problem(settings, reference, config),
                        notify_ops=default_alert_manager(settings).notify_ops)


# --------------------------------------------------------------------------------------------------------------
# State tables
# --------------------------------------------------------------------------------------------------------------
def _local(ts: pd.Series, tz: str) -> pd.Series:
    return pd.to_datetime(ts, utc=True).dt.tz_convert(tz)


# --------------------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------------------
def monitor(settings: Any, config: MonitorConfig = MonitorConfig(), *, alert_manager: Any = None) -> MonitorResult:
    """Run one monitor pass (see the module docstring).

    Args:
        settings: ``pipeline.settings.get_settings()``.
        config: what to monitor and how.
        alert_manager: an ``AlertManager`` (default: one on ``settings.state_dir`` with the default policy and the
            outbox / webhook sinks).

    Returns:
        The windows tested, the alert events produced and the MLflow run id.

    Raises:
        ValueError: no champion is registered.
        pipeline.tracking.TrackingUnavailable: MLflow cannot be reached.
    """
    from filelock import FileLock

    with FileLock(str(state_dir(settings) / "monitor.lock"), timeout=3600):
        return _monitor_locked(settings, config, alert_manager)


@dataclass
class _Pass:
    """What every window of one monitor pass is tested with."""

    settings: Any
    config: MonitorConfig
    champ: Champion
    drift: Any
    quality: pd.DataFrame | None
    descriptions: list[Any]
    manager: Any
    charts: Any = None
    golden: Any = None
    heatmaps: Any = None
    patches: Any = None

    @property
    def use_scores(self) -> bool:
        return self.drift.ref_scores_ is not None


def _monitor_locked(settings: Any, config: MonitorConfig, alert_manager: Any) -> MonitorResult:
    import torch

    from pipeline.analysis.drift import windows
    from pipeline.monitoring.golden import split_golden

    torch.set_num_threads(min(2, torch.get_num_threads()))
    champ = load_champion(settings, fpr=config.fpr, seed=config.seed)
    rows, golden_rows = split_golden(_monitored_rows(settings, config))
    if rows.empty:
        return MonitorResult((), (), None, champ.version, champ.model_id, 0)
    df, patches = _score_images(settings, champ, rows, config)
    drift, quality = build_drift_detector(settings, champ, config, df)
    ctx = _Pass(settings, config, champ, drift, quality, axis_descriptions(settings, champ),
                alert_manager if alert_manager is not None else default_alert_manager(settings), patches=patches)
    ctx = replace(ctx, charts=_monitor_charts(ctx, df), golden=_monitor_golden(ctx, golden_rows),
                  heatmaps=_monitor_heatmaps(ctx))

    results: dict[tuple[str, str], tuple[Any, pd.DataFrame]] = {}
    outcomes: list[WindowOutcome] = []
    skipped: list[dict[str, Any]] = []
    df["captured_local"] = _local(df["captured_at"], settings.timezone)
    for line, sub in df.groupby("line", sort=True):
        for w in windows(sub, by=config.window_by, size=config.window_size, time_col="captured_local",
                         min_size=config.min_window, skipped=skipped):
            if config.window_by != "count" and pd.Timestamp(w.end) > pd.Timestamp.now(tz="UTC"):
                # still in progress: the alert manager records a window id once, so test it when it is complete
                skipped.append({"window_id": w.window_id, "n": len(w.frame), "reason": "window still in progress"})
                continue
            outcome, res = _test_window(ctx, str(line), w)
            outcomes.append(outcome)
            results[(outcome.line, outcome.window_id)] = (res, w.frame)

    if config.report:
        outcomes = _draw_reports(settings, champ, outcomes, results)
    outcomes = record_verdicts(settings, champ.version, outcomes)
    run_id = _log_run(settings, champ, outcomes, results, config)
    events = tuple(e for o in outcomes for e in o.events)
    return MonitorResult(tuple(outcomes), events, run_id, champ.version, champ.model_id, len(df), tuple(skipped))


def _score_images(settings: Any, champ: Champion, rows: pd.DataFrame,
                  config: MonitorConfig) -> tuple[pd.DataFrame, Any]:
    """Encode (resumable), compute residuals, score and flag every monitored image; the flags go to the scores table.

    Returns:
        The catalog rows with their ``z_*`` columns, ``score`` and ``is_anomaly`` (the flag's score: fused, or the
        residual family's) and ``residual_score`` (the residual family's, on the scale of ``champ.ref_scores``: what
        the drift test's score family and the chart's ``score_tail`` compare); the pass's patch family
        (``ChampionPatches``, also when the fused score is off: the heatmaps use it).
    """
    from pipeline.analysis.thresholds import judged
    from pipeline.latent.encode import encode_catalog, z_columns
    from pipeline.monitoring.patches import ChampionPatches

    latents = encode_catalog(champ.checkpoint, rows, latents_table_path(settings),
                             root=settings.catalog_root, progress=config.progress)
    latents = latents[latents["model_id"] == champ.model_id]
    zc = z_columns(latents)
    df = rows.merge(latents[["image_id", *zc]], on="image_id", how="inner")
    Z = df[zc].to_numpy(np.float64)
    if champ.scoring is not None:
        R = residual_table(settings, champ, df, progress=config.progress).loc[df["image_id"].astype(str)]
        Z = np.column_stack([Z, R.to_numpy(np.float64)])
    patches = ChampionPatches(settings, champ)
    det, scorer, ref_scores = champ.detector.predict(Z), "residual", champ.ref_scores
    df["residual_score"] = det.scores
    if config.fusion and champ.ref_scores is not None:
        fused = _fused_scores(patches, df, det.scores, config)
        if fused is not None:
            det, scorer, ref_scores = fused, "fused", patches.fused(config.fpr).ref_scores
    # a cell of a product the calibration snapshot does not know is not judged (pipeline.analysis.thresholds.judged)
    known = judged(champ.reference["product_type"], df["product_type"]) if {"product_type"} <= \
        set(champ.reference.columns) & set(df.columns) else np.ones(len(df), dtype=bool)
    offset = _day_offsets(settings, df, det.scores, ref_scores, config)
    df["score"], df["day_offset"] = det.scores, offset
    df["is_anomaly"] = det.is_anomaly & (np.asarray(det.scores) - offset > det.threshold) & known
    _upsert(scores_table_path(settings), pd.DataFrame({
        "image_id": df["image_id"].astype(str), "model_version": champ.version, "model_id": champ.model_id,
        "score": df["score"].astype(float), "is_anomaly": df["is_anomaly"].astype(bool),
        "threshold": float(det.threshold), "scorer": scorer, "day_offset": df["day_offset"].astype(float),
    }), ["image_id", "model_id"])
    return df, patches


def _day_offsets(settings: Any, df: pd.DataFrame, scores: Any, ref_scores: Any, config: MonitorConfig) -> np.ndarray:
    """Each cell's line-day offset of its flag score (``pipeline.analysis.thresholds.day_offsets``); 0 when off."""
    from pipeline.analysis.thresholds import day_offsets

    if not config.recentre or ref_scores is None or df.empty:
        return np.zeros(len(df))
    day = _local(df["captured_at"], settings.timezone).dt.strftime("%Y-%m-%d")
    line = df["line"].astype(str) if "line" in df.columns else pd.Series("", index=df.index)
    return day_offsets(scores, (line + "|" + day).to_numpy(), ref_scores, min_cells=config.min_window)


def _fused_scores(patches: Any, df: pd.DataFrame, residual_scores: np.ndarray, config: MonitorConfig) -> Any:
    """The fused scores and flags (``DetectionResult``) of the cells; None (one warning) on failure."""
    try:
        return patches.predict(df, residual_scores, config.fpr)
    except Exception as exc:  # noqa: BLE001 - the residual family alone still scores every cell
        logger.warning("per-image scores from the residual family alone: the patch family failed (%s: %s)",
                       type(exc).__name__, exc)
        return None


def _drift_of_window(ctx: _Pass, frame: pd.DataFrame) -> tuple[Any, int]:
    """The drift test of one window (evenly subsampled to what the lot null calibrates) and the rows tested."""
    from pipeline.latent.encode import z_columns

    zw = frame[z_columns(frame)].to_numpy(np.float64)
    qw = None if ctx.quality is None else drift_channels(ctx.quality.loc[frame["image_id"].astype(str).to_numpy()])
    sw = frame["residual_score"].to_numpy(np.float64) if ctx.use_scores else None
    keep = ctx.drift.rows_to_test(len(zw))  # the lot null's guard band: at most a third of the reference
    # each product is compared with its own kind (pipeline.analysis.strata): a mix swing is context, not drift
    strata = frame["product_type"].to_numpy()[keep] if "product_type" in frame.columns else None
    res = ctx.drift.test(zw[keep], model_id=ctx.champ.model_id, cur_quality=None if qw is None else qw.iloc[keep],
                         cur_scores=None if sw is None else sw[keep], cur_strata=strata)
    return res, len(keep)


def _describe(ctx: _Pass, res: Any, frame: pd.DataFrame) -> tuple[Any, int | None, float, str, str]:
    """Attribution, top axis, its effect, the window's description, and the product mix when it explains the verdict."""
    from pipeline.analysis.axes import LATENT_FAMILIES, attribute, image_level_text, mix_note

    attr = attribute(res, ctx.descriptions)  # its text names the mix when the mix explains the verdict
    mix = mix_note(res, prefix="; ")
    top = None
    # the top significant axis (else the largest shift) when a latent family fired; image-level families
    # (quality channels, anomaly scores) are described by their own text
    if res.detected and set(res.fired) & set(LATENT_FAMILIES):
        top = int(attr.top_axis if attr.top_axis is not None else res.top_axis)
    effect = 0.0
    if top is not None:
        effect = float(res.per_axis.loc[res.per_axis["axis"] == top].iloc[0]["effect_size"])
    desc_text = {d.axis: d.text for d in ctx.descriptions}
    description = desc_text.get(top, "") + mix if top is not None else image_level_text(res)
    return attr, top, effect, description, mix


def _test_window(ctx: _Pass, line: str, w: Any) -> tuple[WindowOutcome, Any]:
    """Test one window, describe it, hand it to the alert manager; the outcome and the drift result."""
    from pipeline.monitoring.causes import window_causes
    from pipeline.monitoring.report import plain_summary

    frame = w.frame
    res, n_tested = _drift_of_window(ctx, frame)
    chart_metrics, alert_res, chart_pics = _chart_window(ctx, line, w.window_id, frame, res)
    alert_res, golden, golden_metrics = _golden_window(ctx, line, w, alert_res)
    attr, top, effect, description, mix = _describe(ctx, res, frame)
    cards: dict[int, str] = {}
    if res.detected and ctx.config.cards and top is not None:
        try:
            cards = axis_card_paths(ctx.settings, ctx.champ, [a.axis for a in attr.axes[:3]], ctx.descriptions,
                                    progress=ctx.config.progress)
        except Exception:  # noqa: BLE001 - a missing picture must not stop the alert
            logger.exception("axis cards failed for model %s", ctx.champ.model_id)
    examples, serials = _example_images(ctx.settings, frame)
    heatmaps = ctx.heatmaps.window(line, w.window_id, frame) if ctx.heatmaps and alert_res.detected else []
    events = ctx.manager.update(
        line, w.window_id, alert_res, attr, model_version=ctx.champ.version,
        card_paths=[*cards.values(), *chart_pics], heatmaps=heatmaps,
        example_images=examples, example_serials=serials,
        window_start=pd.Timestamp(w.start).isoformat(), window_end=pd.Timestamp(w.end).isoformat(),
    )
    if ctx.charts is not None:
        ctx.charts.charts.after_events(line, events or ())
    ev_dicts = tuple(_event_dict(e) for e in (events or ()))
    causes = window_causes(alert_res, attr)
    explanation = plain_summary(
        line=line, window_id=w.window_id, model_version=ctx.champ.version, n_images=len(frame), n_tested=n_tested,
        n_anomalous=int(frame["is_anomaly"].sum()), detected=bool(res.detected), causes=causes,
        mix=mix,
        serials=serials if res.detected else [], events=ev_dicts)
    outcome = WindowOutcome(
        line=line, window_id=w.window_id,
        start=pd.Timestamp(w.start).tz_convert("UTC").to_pydatetime(),
        end=pd.Timestamp(w.end).tz_convert("UTC").to_pydatetime(),
        n_images=len(frame), n_tested=n_tested, n_anomalous=int(frame["is_anomaly"].sum()),
        detected=bool(res.detected), top_axis=top, top_share=float(res.top_share) if top is not None else 0.0,
        effect=effect, description=description, summary=res.summary(), attribution=attr.text,
        alert_active=bool(ctx.manager.open_alerts(line)), events=ev_dicts, model_version=ctx.champ.version,
        fired=tuple(res.fired), causes=tuple(c.key for c in causes), example_serials=tuple(serials),
        explanation=explanation, chart=chart_metrics, golden=golden, golden_metrics=golden_metrics,
        heatmaps=tuple(heatmaps),
    )
    return outcome, res


def _monitor_heatmaps(ctx: _Pass) -> Any:
    """The pass's heatmap step (``pipeline.monitoring.heatmaps.WindowHeatmaps``), or None when off."""
    if not ctx.config.heatmaps:
        return None
    from pipeline.monitoring.heatmaps import WindowHeatmaps

    return WindowHeatmaps(ctx.settings, ctx.champ, patches=ctx.patches)


def _monitor_charts(ctx: _Pass, df: pd.DataFrame) -> Any:
    """The pass's control charts (``pipeline.monitoring.charts``), or None when off or when they cannot be built."""
    if not ctx.config.spc or ctx.champ.z_ref is None:
        return None
    from pipeline.monitoring.charts import MonitorCharts, window_size_of

    ref = ctx.champ.reference
    try:
        size = window_size_of(ref, ctx.config.window_by, ctx.config.window_size, ctx.settings.timezone)
        return MonitorCharts(ctx.manager.state_dir, ctx.champ.model_id, ref, np.asarray(ctx.champ.z_ref),
                             ctx.quality, ctx.champ.ref_scores if ctx.use_scores else None, size,
                             arl0=ctx.config.spc_arl0, min_lots=ctx.config.spc_min_lots,
                             signatures=lambda: _chart_signatures(ctx))
    except Exception:  # noqa: BLE001 - the per-window test goes on without the chart
        logger.exception("control charts not available for model %s", ctx.champ.model_id)
        return None


def _chart_signatures(ctx: _Pass) -> dict[str, pd.Series]:
    """The camera-fault patterns of the champion: each fault applied to an even sample of its reference images."""
    from pipeline.catalog.tables import resolve_store_path
    from pipeline.common.images import read_images
    from pipeline.monitoring.charts import SIGNATURE_IMAGES, fault_signatures, model_statistics

    ref = ctx.champ.reference
    pick = np.unique(np.linspace(0, len(ref) - 1, min(SIGNATURE_IMAGES, len(ref))).round().astype(int))
    paths = [resolve_store_path(ctx.settings.catalog_root, p) for p in ref["store_path"].iloc[pick]]
    images = [np.asarray(im).squeeze() for im in read_images(paths, channels=1)]
    return fault_signatures(images, lambda ims: model_statistics(ctx.champ.checkpoint, ims), seed=ctx.config.seed)


def _chart_window(ctx: _Pass, line: str, window_id: str, frame: pd.DataFrame,
                  res: Any) -> tuple[dict[str, float], Any, list[str]]:
    """The window's chart metrics, the drift result for the alert manager (with the chart's cause), the picture.

    On an alarm the chart's picture is drawn and cited by the alert beside the axis cards.
    """
    if ctx.charts is None:
        return {}, res, []
    from pipeline.monitoring.charts import (
        ChartedResult,
        ChartNotReady,
        chart_cause,
        draw_chart,
        point_metrics,
    )

    try:
        point = ctx.charts.window(line, window_id, frame)
    except ChartNotReady as e:
        if line not in ctx.charts.not_ready_said:
            ctx.charts.not_ready_said.add(line)
            logger.warning("%s", e)
        return {}, res, []
    except Exception:  # noqa: BLE001 - a chart that cannot take the window must not stop its test
        logger.exception("control chart of line %s failed on window %s", line, window_id)
        return {}, res, []
    for m in point.messages:
        logger.warning("control chart of line %s, window %s: %s", line, window_id, m)
    pics: list[str] = []
    if point.alarm:
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in f"{line}_{window_id}")
        try:
            pics.append(str(draw_chart(ctx.charts.charts.chart(line), ctx.charts.charts.dir / f"chart_{safe}.png",
                                       title=f"line {line}: {point.text}"[:120])))
        except Exception:  # noqa: BLE001 - a missing picture must not stop the alert
            logger.exception("control chart picture failed for line %s", line)
    return point_metrics(point), ChartedResult(res, chart_cause(point)), pics


def _monitor_golden(ctx: _Pass, rows: pd.DataFrame) -> Any:
    """The pass's golden rounds and checks (``pipeline.monitoring.golden``); None without golden captures.

    A failure here (an unreadable image store, a broken encoder) is logged and the windows are tested without it.
    """
    if rows.empty:
        return None
    from pipeline.monitoring.golden import LineGolden, MonitorGolden, golden_rounds

    try:
        stats = _golden_statistics(ctx.settings, rows)
        rows, z_cols = _golden_latents(ctx, rows)
        rounds = {str(line): golden_rounds(sub, ctx.settings.timezone) for line, sub in rows.groupby("line")}
        return MonitorGolden(LineGolden(ctx.manager.state_dir, ctx.champ.model_id), rounds, stats, z_cols)
    except Exception:  # noqa: BLE001 - the production windows are tested without the golden check
        logger.exception("golden-sample check not available for model %s", ctx.champ.model_id)
        return None


def _golden_statistics(settings: Any, rows: pd.DataFrame) -> pd.DataFrame:
    """The golden statistics of each golden capture, indexed by image id (NaN for an image that cannot be read)."""
    from pipeline.analysis.golden import GOLDEN_STATISTICS
    from pipeline.catalog.tables import resolve_store_path
    from pipeline.common.images import read_image
    from pipeline.monitoring.golden import capture_statistics

    names = [s.name for s in GOLDEN_STATISTICS]
    out = []
    for image_id, p in zip(rows["image_id"].astype(str), rows["store_path"], strict=True):
        try:
            out.append(capture_statistics([read_image(resolve_store_path(settings.catalog_root, p))]).iloc[0])
        except Exception as e:  # noqa: BLE001 - one unreadable capture is left out of its round's test
            logger.warning("golden capture %s not measured (%s: %s)", image_id, type(e).__name__, e)
            out.append(pd.Series(np.nan, index=names))
    return pd.DataFrame(out, columns=names).set_axis(rows["image_id"].astype(str).to_numpy(), axis=0)


def _golden_latents(ctx: _Pass, rows: pd.DataFrame) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """The golden rows with their latents under the champion (``z_*``), and the latent columns."""
    from pipeline.latent.encode import encode_catalog, z_columns

    latents = encode_catalog(ctx.champ.checkpoint, rows, latents_table_path(ctx.settings),
                             root=ctx.settings.catalog_root, progress=False)
    latents = latents[latents["model_id"] == ctx.champ.model_id]
    zc = z_columns(latents)
    return rows.merge(latents[["image_id", *zc]], on="image_id", how="left"), tuple(zc)


def _golden_window(ctx: _Pass, line: str, w: Any, res: Any) -> tuple[Any, tuple[str, ...], dict[str, float]]:
    """The golden rounds due with this window: the result for the alert manager, each round's verdict, the metrics.

    When a round fired, the camera's cause is added to the result (the first round that fired names it).
    """
    if ctx.golden is None:
        return res, (), {}
    from pipeline.monitoring.charts import ChartedResult
    from pipeline.monitoring.golden import camera_cause, round_metrics

    try:
        results = ctx.golden.window(line, w.end)
    except Exception:  # noqa: BLE001 - the window's own test goes on without its golden rounds
        logger.exception("golden-sample check of line %s failed with window %s", line, w.window_id)
        return res, (), {}
    fired = [r for r in results if r.detected]
    if fired:
        res = ChartedResult(res, camera_cause(fired[0]))
    return res, tuple(f"{r.shift_id}: {r.text}" for r in results), round_metrics(results)


def _monitored_rows(settings: Any, config: MonitorConfig) -> pd.DataFrame:
    """Catalog rows of the monitored period, whole plant days unless ``config.start`` is given.

    Without ``start`` the period begins at the plant midnight of the day ``lookback_days`` before the newest image,
    so each day's cells are scored and judged together (``MonitorConfig.recentre``).
    """
    from pipeline.catalog.tables import read_catalog

    lines = list(config.lines) if config.lines else None
    start = config.start
    if start is None:
        newest = read_catalog(settings.catalog_root, lines=lines, end=config.end, columns=["captured_at"])
        if newest.empty:
            return newest
        back = pd.Timestamp(newest["captured_at"].max()) - pd.Timedelta(days=config.lookback_days)
        back = back.tz_localize("UTC") if back.tzinfo is None else back
        start = back.tz_convert(settings.timezone).normalize().to_pydatetime()
    return read_catalog(settings.catalog_root, lines=lines, start=start, end=config.end)


def encoding_plan(settings: Any, config: MonitorConfig, chunk_size: int = 1024) -> dict[str, Any]:
    """The champion's folder and the monitored images it has not encoded yet, in chunks for parallel workers.

    A flow maps :func:`encode_chunk` over ``chunks`` (e.g. on Dask workers); the monitor pass then folds the part
    files into the latents table and encodes nothing twice.

    Returns:
        ``{"checkpoint": str, "model_id": str, "chunks": [[{"image_id", "store_path"}, ...], ...],
        "scoring": dict | None, "residual_chunks": [...]}``: ``residual_chunks`` (images without diffusion
        residuals under this model, for :func:`residual_chunk`) is empty when the bundle has no scoring recipe.
    """
    from pipeline.latent.encode import pending_images

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    champ = load_champion(settings, fpr=config.fpr, seed=config.seed)
    rows = _monitored_rows(settings, config)
    plan: dict[str, Any] = {"checkpoint": str(champ.path), "model_id": champ.model_id, "chunks": [],
                            "scoring": asdict(champ.scoring) if champ.scoring else None, "residual_chunks": []}
    if rows.empty:
        return plan

    def chunked(todo: pd.DataFrame) -> list[list[dict[str, str]]]:
        records = todo[["image_id", "store_path"]].astype(str).to_dict("records")
        return [records[i : i + chunk_size] for i in range(0, len(records), chunk_size)]

    plan["chunks"] = chunked(pending_images(champ.checkpoint, rows[["image_id", "store_path"]],
                                            latents_table_path(settings)))
    if champ.scoring is not None:  # golden captures are never scored
        from pipeline.monitoring.golden import split_golden

        plan["residual_chunks"] = chunked(pending_residuals(settings, champ.model_id, split_golden(rows)[0],
                                                            len(champ.scoring.t_stars)))
    return plan


def encode_chunk(settings: Any, checkpoint_dir: str, records: list[dict[str, str]]) -> str:
    """Encode one chunk of :func:`encoding_plan` into a part file next to the latents table; returns its path."""
    import torch

    from pipeline.latent.encode import encode_part

    torch.set_num_threads(1)  # one core per chunk: the chunks are the parallelism
    return str(encode_part(checkpoint_dir, pd.DataFrame(records), latents_table_path(settings),
                           root=settings.catalog_root, workers=1))


def residual_chunk(settings: Any, checkpoint_dir: str, scoring: dict[str, Any], records: list[dict[str, str]]) -> str:
    """Compute the residuals of one chunk of :func:`encoding_plan` into a part file; returns its path.

    The part is named by the model id and a digest of the chunk's image ids and written atomically, so a retried
    chunk rewrites the same file. The monitor pass folds the parts into the residuals table.
    """
    import torch

    from models.checkpoint import load_checkpoint
    from pipeline.latent.encode import part_file, write_parquet_atomic

    torch.set_num_threads(1)  # one core per chunk: the chunks are the parallelism
    rows = pd.DataFrame(records)
    if rows.empty:
        raise ValueError("residual_chunk got an empty chunk")
    ckpt = load_checkpoint(checkpoint_dir)
    model_id = str(ckpt.meta.get("model_id", ""))
    sc = ScoringConfig.from_dict(scoring)
    if sc is None:
        raise ValueError("residual_chunk needs the bundle's scoring recipe")
    df = residual_frame(settings, ckpt.model, ckpt.preprocess, sc, model_id, rows)
    return str(write_parquet_atomic(df, part_file(residual_parts_dir(settings), model_id, df["image_id"])))


def default_alert_manager(settings: Any, policy: Any = None) -> Any:
    """The alert manager on ``<state>/alerts`` with the default policy.

    Sinks: the log, a JSON-lines file (``<state>/alerts.jsonl``) and, when ``LINEWATCH_WEBHOOK_URL`` is set, the
    webhook.
    """
    from pipeline.monitoring.alerts import AlertManager, AlertPolicy, JsonlSink, LogSink, WebhookSink

    sinks: list[Any] = [LogSink(), JsonlSink(state_dir(settings) / "alerts.jsonl", name="jsonl")]
    if getattr(settings, "webhook_url", None):
        sinks.append(WebhookSink(settings.webhook_url, name="webhook"))
    return AlertManager(state_dir(settings) / "alerts", policy or AlertPolicy(), sinks)


def _event_dict(event: Any) -> dict[str, Any]:
    if isinstance(event, dict):
        return event
    for name in ("to_dict", "model_dump"):
        fn = getattr(event, name, None)
        if callable(fn):
            return fn()
    try:
        return asdict(event)
    except TypeError:
        return {"event": str(event)}


def _example_images(settings: Any, frame: pd.DataFrame, k: int = 4) -> tuple[list[str], list[str]]:
    """The ``k`` images of a window with the highest anomaly scores: (stored file paths, MES serials)."""
    from pipeline.catalog.tables import resolve_store_path, serial_of

    top = frame.sort_values("score", ascending=False).head(k)
    paths = [str(resolve_store_path(settings.catalog_root, p)) for p in top["store_path"]]
    serials = [serial_of(p) for p in top["source_path"]] if "source_path" in top.columns else []
    return paths, serials


def report_path(settings: Any, line: str, window_id: str, model_version: str) -> Path:
    """Where the drift report of a window made by a model version goes (one file per verdict, never replaced)."""
    safe = window_id.replace("/", "-")
    return state_dir(settings) / "reports" / f"drift_{line}_{safe}_v{model_version}.png"


def _card_path(settings: Any, champ: Champion, axis: int | None) -> Path | None:
    """The cached card of ``axis`` under the champion (rendered with the alert), or None."""
    return None if axis is None else state_dir(settings) / "axes" / champ.model_id / f"axis_{axis:02d}.png"


def _draw_reports(settings: Any, champ: Champion, outcomes: list[WindowOutcome],
                  results: dict[tuple[str, str], tuple[Any, pd.DataFrame]]) -> list[WindowOutcome]:
    """Draw the report of every drifted window; a report already drawn by this model version is kept as it is."""
    from pipeline.monitoring.report import drift_report

    out = []
    history = [(o.window_id, results[(o.line, o.window_id)][0]) for o in outcomes]
    for o in outcomes:
        if not o.detected:
            out.append(o)
            continue
        path = report_path(settings, o.line, o.window_id, champ.version)
        if path.exists():
            out.append(replace(o, report=str(path)))
            continue
        res, frame = results[(o.line, o.window_id)]
        line_history = [h for h, o2 in zip(history, outcomes, strict=True) if o2.line == o.line]
        examples, serials = _example_images(settings, frame)
        try:
            drift_report(res, line_history, axis=o.top_axis, description=o.description,
                         example_images=examples, example_labels=serials, out_path=path,
                         title=f"line {o.line}, window {o.window_id}, model v{champ.version}",
                         summary=o.explanation, axis_card=_card_path(settings, champ, o.top_axis),
                         heatmaps=o.heatmaps)
            out.append(replace(o, report=str(path)))
        except Exception:  # noqa: BLE001 - the picture is a convenience
            logger.exception("drift report failed for %s %s", o.line, o.window_id)
            out.append(o)
    return out


def _axis_labels(settings: Any, champ: Champion) -> dict[int, str]:
    """What each axis of the champion means (``{3: "brightness (r = 0.94)"}``), from the cached descriptions."""
    try:
        return {d.axis: d.text.split(": ", 1)[-1] for d in axis_descriptions(settings, champ)}
    except Exception:  # noqa: BLE001 - labels are a convenience of the logged table
        logger.exception("axis descriptions unavailable for model %s", champ.model_id)
        return {}


def _log_run(settings: Any, champ: Champion, outcomes: list[WindowOutcome],
             results: dict[tuple[str, str], tuple[Any, pd.DataFrame]], config: MonitorConfig) -> str | None:
    """One MLflow monitoring run per line (``pipeline.tracking.monitoring``); returns the first line's run id."""
    if not outcomes:
        return None
    labels = _axis_labels(settings, champ)
    runs = [_log_line_run(settings, champ, [o for o in outcomes if o.line == line], results, config, labels)
            for line in dict.fromkeys(o.line for o in outcomes)]
    return runs[0]


def _log_line_run(settings: Any, champ: Champion, outcomes: list[WindowOutcome],
                  results: dict[tuple[str, str], tuple[Any, pd.DataFrame]], config: MonitorConfig,
                  labels: dict[int, str]) -> str:
    from pipeline import tracking

    line, first, last = outcomes[0].line, outcomes[0].window_id, outcomes[-1].window_id
    span = first if first == last else f"{first}..{last}"
    with tracking.start_monitoring_run(
        f"monitor {line} {span}",
        tags={"line": line, "model_version": champ.version, "model_id": champ.model_id, "null": config.null,
              "window_by": config.window_by},
    ) as run_id:
        tracking.log_params_flat({"monitor": {k: (str(v) if v is not None else "none") for k, v in
                                              asdict(config).items()}, "model_version": champ.version})
        tracking.link_model_version(settings.model_name, champ.version)
        tracking.log_monitored_images(pd.concat([results[(o.line, o.window_id)][1] for o in outcomes]),
                                      name=f"{line} {span}")
        windows = [tracking.drift_window(
            results[(o.line, o.window_id)][0], line=o.line, window_id=o.window_id, start=o.start,
            alert_active=o.alert_active, top_axis=o.top_axis, top_effect=o.effect if o.top_axis is not None else None,
            labels=labels, n_images=o.n_images, n_anomalous=o.n_anomalous, summary=o.attribution if o.detected else "",
        ) for o in outcomes]
        tracking.log_monitoring_windows(windows, model_name=settings.model_name, model_version=champ.version,
                                        reports={o.window_id: o.report for o in outcomes if o.report})
        tracking.log_chart_windows([(o.chart, o.start) for o in outcomes])
        tracking.log_chart_windows([(o.golden_metrics, o.start) for o in outcomes], prefix="golden")
        cards = state_dir(settings) / "axes" / champ.model_id
        if cards.is_dir():
            tracking.log_artifacts(cards, "axis_cards")
        for folder in dict.fromkeys(Path(o.heatmaps[0]).parent for o in outcomes if o.heatmaps):
            tracking.log_artifacts(folder, f"heatmaps/{folder.name}")
    return run_id
