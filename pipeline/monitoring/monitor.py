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

The steps live in their own modules: :mod:`pipeline.monitoring.config` (settings and results),
:mod:`pipeline.monitoring.champion` (step 1), :mod:`pipeline.monitoring.scoring` (step 2 and its parallel parts) and
:mod:`pipeline.monitoring.publish` (reports and the MLflow runs of step 4); this module runs the pass and tests the
windows, and re-exports their public names.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.handoff.state import MonitorHooks, state_dir
from pipeline.monitoring.champion import (  # noqa: F401 - re-exported: the champion as the monitor loads it
    NO_CHAMPION_YET,
    Champion,
    champion_version,
    load_bundle,
    load_champion,
)
from pipeline.monitoring.config import MonitorConfig, MonitorResult, WindowOutcome, monitor_config  # noqa: F401
from pipeline.monitoring.publish import draw_reports, example_images, log_run, report_path  # noqa: F401
from pipeline.monitoring.scoring import (  # noqa: F401 - re-exported: the per-image step and its parallel parts
    encode_chunk,
    encoding_plan,
    local_time,
    monitored_rows,
    residual_chunk,
    score_images,
)
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


def drift_detector(config: MonitorConfig) -> Any:
    """The (unfitted) ``DriftDetector`` the monitor tests windows with under ``config``."""
    from pipeline.analysis.drift import DriftDetector

    return DriftDetector(alpha=config.alpha, null=config.null, min_window=config.min_window,
                         n_calibration=config.n_calibration, quality_floors=dict(config.quality_floors),
                         quality_directions=dict(config.quality_directions), random_state=config.seed,
                         progress=config.progress)


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


def build_drift_detector(settings: Any, champ: Champion, config: MonitorConfig, images: pd.DataFrame | None = None,
                         ref_scores: Any = None) -> tuple[Any, pd.DataFrame | None]:
    """Fit the monitor's drift detector on the champion's reference.

    Args:
        settings: where the image-quality table lives.
        champ: the loaded model (:func:`load_bundle`).
        config: the monitor's settings.
        images: catalog rows (``image_id``, ``store_path``) of the windows to test, measured for the image-quality
            channels together with the reference (None: the reference only).
        ref_scores: the calibration cells' out-of-period per-image scores the score family compares windows with
            (:func:`score_images`'s third value; None: the residual family's, ``champ.ref_scores``).

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
    ref_scores = champ.ref_scores if ref_scores is None else np.asarray(ref_scores, dtype=np.float64)
    use_scores = config.scores and ref_scores is not None
    # the lot null's calibration windows are the reference's own line-days (pipeline.analysis.blocks)
    from pipeline.analysis.blocks import reference_blocks

    streams, periods = reference_blocks(ref, settings.timezone, config.window_by)
    drift.fit(champ.z_ref, model_id=champ.model_id, ref_order=ref_order, ref_strata=ref_strata, ref_quality=q_ref,
              ref_scores=ref_scores if use_scores else None, ref_streams=streams, ref_periods=periods)
    return drift, quality


def check_bundle(settings: Any, path: str | Path, config: MonitorConfig | None = None) -> list[str]:
    """What would stop the monitor from using the model folder at ``path``; ``[]`` when it can.

    Loads the bundle as the monitor does (:func:`load_bundle`), fits its drift detector (:func:`build_drift_detector`,
    with the calibration scores the monitor's score family would compare with: :func:`bundled_reference_scores`)
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
        ref_scores = bundled_reference_scores(settings, champ, config)
        drift, quality = build_drift_detector(settings, champ, config, ref_scores=ref_scores)
        n = drift.max_window or config.min_window
        keep = np.arange(min(n, len(champ.z_ref)))
        qw = None if quality is None else drift_channels(
            quality.loc[champ.reference["image_id"].astype(str).to_numpy()[keep]])
        sw = None if drift.ref_scores_ is None else np.asarray(
            champ.ref_scores if ref_scores is None else ref_scores)[keep]
        drift.test(champ.z_ref[keep], model_id=champ.model_id, cur_quality=qw, cur_scores=sw)
    except Exception as exc:  # noqa: BLE001 - any failure here is a reason not to promote
        logger.warning("the monitor could not use the model at %s: %s", path, exc)
        return [f"{type(exc).__name__}: {exc}"]
    return []


def bundled_reference_scores(settings: Any, champ: Champion, config: MonitorConfig) -> np.ndarray | None:
    """The calibration cells' flag scores of the bundle's patch family, as the monitor's score family uses them.

    None when the monitor would use the residual family's (``champ.ref_scores``): no fusion configured, no patch
    family in the bundle, or nothing to fuse it with. Reads only the bundle (no patch features are computed).
    """
    from pipeline.monitoring.patches import ChampionPatches

    if not config.fusion or (champ.ref_scores is None and config.residual_weight > 0):
        return None
    patches = ChampionPatches(settings, champ)
    if patches.bundled() is None:
        return None
    return np.asarray(patches.fused(config.fpr, residual_weight=config.residual_weight).ref_scores, dtype=np.float64)


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
    rows, golden_rows = split_golden(monitored_rows(settings, config))
    if rows.empty:
        return MonitorResult((), (), None, champ.version, champ.model_id, 0)
    df, patches, score_ref = score_images(settings, champ, rows, config)
    drift, quality = build_drift_detector(settings, champ, config, df, score_ref)
    ctx = _Pass(settings, config, champ, drift, quality, axis_descriptions(settings, champ),
                alert_manager if alert_manager is not None else default_alert_manager(settings), patches=patches)
    ctx = replace(ctx, charts=_monitor_charts(ctx, df), golden=_monitor_golden(ctx, golden_rows),
                  heatmaps=_monitor_heatmaps(ctx))

    results: dict[tuple[str, str], tuple[Any, pd.DataFrame]] = {}
    outcomes: list[WindowOutcome] = []
    skipped: list[dict[str, Any]] = []
    df["captured_local"] = local_time(df["captured_at"], settings.timezone)
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
        outcomes = draw_reports(settings, champ, outcomes, results)
    outcomes = record_verdicts(settings, champ.version, outcomes)
    run_id = log_run(settings, champ, outcomes, results, config)
    events = tuple(e for o in outcomes for e in o.events)
    return MonitorResult(tuple(outcomes), events, run_id, champ.version, champ.model_id, len(df), tuple(skipped))


def _drift_of_window(ctx: _Pass, frame: pd.DataFrame) -> tuple[Any, int]:
    """The drift test of one window (evenly subsampled to what the lot null calibrates) and the rows tested."""
    from pipeline.latent.encode import z_columns

    zw = frame[z_columns(frame)].to_numpy(np.float64)
    qw = None if ctx.quality is None else drift_channels(ctx.quality.loc[frame["image_id"].astype(str).to_numpy()])
    sw = frame["score"].to_numpy(np.float64) if ctx.use_scores else None
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
    chart_metrics, alert_res, chart_pics, shift_since = _chart_window(ctx, line, w.window_id, frame, res)
    alert_res, golden, golden_metrics = _golden_window(ctx, line, w, alert_res)
    attr, top, effect, description, mix = _describe(ctx, res, frame)
    cards: dict[int, str] = {}
    if res.detected and ctx.config.cards and top is not None:
        try:
            cards = axis_card_paths(ctx.settings, ctx.champ, [a.axis for a in attr.axes[:3]], ctx.descriptions,
                                    progress=ctx.config.progress)
        except Exception:  # noqa: BLE001 - a missing picture must not stop the alert
            logger.exception("axis cards failed for model %s", ctx.champ.model_id)
    examples, serials = example_images(ctx.settings, frame)
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
        heatmaps=tuple(heatmaps), shift_since=shift_since,
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
                             ctx.quality, ctx.drift.ref_scores_ if ctx.use_scores else None, size,
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
                  res: Any) -> tuple[dict[str, float], Any, list[str], str]:
    """The window's chart metrics, drift result for the alert manager (with the chart's cause), pictures, change point.

    The change point is the first window of the shift the chart names (``""`` when it names none). On an alarm the
    chart's picture is drawn and cited by the alert beside the axis cards.
    """
    if ctx.charts is None:
        return {}, res, [], ""
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
        return {}, res, [], ""
    except Exception:  # noqa: BLE001 - a chart that cannot take the window must not stop its test
        logger.exception("control chart of line %s failed on window %s", line, window_id)
        return {}, res, [], ""
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
    cause = chart_cause(point)
    since = str(point.change_window or window_id) if cause is not None else ""
    return point_metrics(point), ChartedResult(res, cause), pics, since


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

