"""The monitor job: encode new images with the champion, score anomalies, test drift per window, alert, log.

Plain functions with a frozen config and result; ``flows/monitor.py`` wraps them in a Prefect task. One run:

1. The champion comes from the registry (``tracking.download_model("champion")``) with its ``linewatch/`` bundle:
   the calibration latents and diffusion residuals written by the retrain (images the model did not train on) are
   the drift reference and the detector's fitting data (refitted deterministically, same seed and split as the
   retrain's gate).
2. Catalog images of the monitored period are encoded into the resumable latents table
   (``<state>/latents.parquet``; a rerun only encodes what is missing), their diffusion residuals computed once per
   image and model (``<state>/residuals.parquet``), and scored by the detector (the residual judged against the
   calibration images nearest in z, ``pipeline.detectors.ConditionalResidual``); flags go to
   ``<state>/scores.parquet`` (the retrain's selection drops flagged images).
3. Images are cut into windows (per plant day by default, in ``settings.timezone``; a window still in progress
   waits for a later run); each complete window is tested
   against the reference (lot-aware null by default), attributed to latent axes with their descriptions, and
   handed to the alert manager, whose persisted state makes reruns idempotent: a window already alerted is not
   re-sent, an active alert is not forgotten after a restart.
4. Window verdicts go to ``<state>/windows.parquet`` (the retrain drops windows under an active alert), metrics to
   an MLflow monitoring run (``drift.axis_XX.effect`` series), and a drift report picture per alerted window.
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

from pipeline.retrain import (
    BUNDLE_DIR,
    CALIBRATION_FILE,
    CHAMPION,
    GATE_FILE,
    ScoringConfig,
    calibration_scores,
    detector_calibration,
    state_dir,
)

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
        quality: also test full-resolution image-quality channels (``pipeline.properties.QUALITY_CHANNELS``:
            fine detail, pixel noise, rotation) of every window; they see blur, sensor noise and small
            misalignments that the model's low-resolution latents average away. Measured once per image and cached.
        scores: also test whether the window's per-image anomaly scores are higher than the reference's (AUC and
            the share of cells above the reference's 90th percentile; the reference's scores are cross-fitted,
            ``pipeline.retrain.calibration_scores``): a rise in the share of unusual cells, such as more cracked
            cells. Needs a bundle with residual scoring.
        fpr: per-image detector false-positive target.
        cards: render axis-card strips for the axes of alerted windows (cached per model).
        report: draw a drift report picture per alerted window.
        seed: seed of the detector split and the drift tests.
        progress: progress bars.
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
    quality: bool = True
    scores: bool = True
    fpr: float = 0.05
    cards: bool = True
    report: bool = True
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        if self.window_by not in ("day", "shift", "count"):
            raise ValueError(f"MonitorConfig.window_by must be 'day', 'shift' or 'count', got {self.window_by!r}")
        if self.window_by == "count" and not self.window_size:
            raise ValueError("MonitorConfig.window_by='count' needs window_size")
        if self.null not in ("lot", "iid"):
            raise ValueError(f"MonitorConfig.null must be 'lot' or 'iid', got {self.null!r}")
        if self.lookback_days <= 0:
            raise ValueError(f"MonitorConfig.lookback_days must be > 0, got {self.lookback_days}")


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
            then the product mix when it explains the verdict (``pipeline.axes.mix_note``).
        summary: the drift test's one-line summary.
        attribution: the attribution's text.
        alert_active: an alert is active for the line after this window.
        events: alert events this window produced (sent now), as dicts.
        report: drift report picture, when drawn.
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


def load_champion(settings: Any, *, fpr: float = 0.05, seed: int = 0) -> Champion:
    """Download the champion and rebuild its detector from the bundle's calibration latents.

    Raises:
        ValueError: no champion is registered yet, or the registered folder has no linewatch bundle.
    """
    from models.checkpoint import load_checkpoint
    from pipeline import tracking
    from pipeline.encode import z_columns

    tracking.configure(settings)
    version = tracking.get_alias_version(CHAMPION, name=settings.model_name)
    if version is None:
        raise ValueError(
            f"no '{CHAMPION}' model is registered under {settings.model_name!r}: run the nightly retrain first "
            "(linewatch nightly / the retrain flow)"
        )
    path = tracking.download_model(version, Path(settings.checkpoints_dir) / f"registry-v{version}",
                                   name=settings.model_name)
    bundle = Path(path) / BUNDLE_DIR
    if not (bundle / CALIBRATION_FILE).exists():
        raise ValueError(f"model v{version} has no {BUNDLE_DIR}/{CALIBRATION_FILE}: register it with the retrain job")
    from pipeline.detectors.conditional import residual_columns

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
    _, det = detector_calibration(z_ref, gate.get("fpr_target", fpr), seed=det_seed,
                                  residuals=residuals, k=scoring.k if scoring else 25)
    ref_scores = None if scoring is None else calibration_scores(z_ref, residuals, k=scoring.k, seed=det_seed)
    return Champion(str(version), Path(path), ckpt, str(ckpt.meta.get("model_id", "")), ref, z_ref, det, gate,
                    scoring, ref_scores)


def axis_descriptions(settings: Any, champ: Champion) -> list[Any]:
    """Describe every axis of the champion by the image property it correlates with (cached per model id)."""
    from pipeline.axes import AxisDescription, axis_correlations, describe_axes
    from pipeline.catalog import resolve_store_path
    from pipeline.images import read_images
    from pipeline.properties import measure

    cache = state_dir(settings) / "axes" / champ.model_id / "descriptions.json"
    if cache.exists():
        raw = json.loads(cache.read_text())
        return [AxisDescription(**{**d, "second_best": tuple(d["second_best"]) if d["second_best"] else None})
                for d in raw]
    paths = [resolve_store_path(settings.catalog_root, p) for p in champ.reference["store_path"]]
    images = read_images(paths, channels=1)
    props = measure(np.stack([np.asarray(im).squeeze() for im in images]))
    desc = describe_axes(axis_correlations(champ.z_ref, props))
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps([d.to_dict() for d in desc], indent=1))
    return desc


def axis_card_paths(settings: Any, champ: Champion, axes: list[int], descriptions: list[Any],
                    progress: bool = False) -> dict[int, str]:
    """Axis-card strips (PNG) for ``axes``, rendered once per model and cached under the state folder."""
    from pipeline.axes import axis_cards
    from pipeline.catalog import resolve_store_path
    from pipeline.images import load_batch, read_images
    from pipeline.properties import measure

    out_dir = state_dir(settings) / "axes" / champ.model_id
    todo = [a for a in axes if not (out_dir / f"axis_{a:02d}.png").exists()]
    if todo:
        rows = champ.reference.head(256)
        paths = [resolve_store_path(settings.catalog_root, p) for p in rows["store_path"]]
        x = load_batch(paths, champ.checkpoint.preprocess)
        props = measure(np.stack([np.asarray(im).squeeze() for im in read_images(paths, channels=1)]))
        axis_cards(champ.checkpoint.model, x, champ.z_ref[: len(rows)], props, out_dir, axes=todo, steps=10,
                   model_id=champ.model_id, progress=progress)
    return {a: str(out_dir / f"axis_{a:02d}.png") for a in axes if (out_dir / f"axis_{a:02d}.png").exists()}


# --------------------------------------------------------------------------------------------------------------
# State tables
# --------------------------------------------------------------------------------------------------------------
def _upsert(path: Path, new: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Replace rows with the same keys and write atomically."""
    if path.exists():
        old = pd.read_parquet(path)
        merged = pd.concat([old, new], ignore_index=True).drop_duplicates(keys, keep="last")
    else:
        merged = new
    tmp = path.with_name(f".{path.name}.tmp")
    merged.to_parquet(tmp, index=False)
    tmp.replace(path)
    return merged


def _family_metrics(res: Any) -> dict[str, float]:
    """Per-window MLflow metrics beyond MMD and the axes: each family's p-value and the image-level statistics.

    ``p.<family>`` for every family tested, ``scores.auc`` / ``scores.tail_share`` (share of cells above the
    reference's 90th percentile score) and ``quality.max_shift_sd`` / ``quality.<channel>.effect`` when present.
    """
    out = {f"p.{k}": float(v) for k, v in res.family_p.items()}
    if res.score_stat is not None:
        out["scores.auc"] = float(res.score_stat)
    if getattr(res, "score_tail", None) is not None:
        out["scores.tail_share"] = float(res.score_tail)
    if res.quality_stat is not None:
        out["quality.max_shift_sd"] = float(res.quality_stat)
    if res.per_channel is not None:
        for r in res.per_channel.itertuples(index=False):
            out[f"quality.{r.channel}.effect"] = float(r.effect_size)
    return out


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


def _monitor_locked(settings: Any, config: MonitorConfig, alert_manager: Any) -> MonitorResult:
    import torch

    from pipeline.axes import LATENT_FAMILIES, attribute, image_level_text, mix_note
    from pipeline.drift import DriftDetector, windows
    from pipeline.encode import encode_catalog, z_columns

    torch.set_num_threads(min(2, torch.get_num_threads()))
    champ = load_champion(settings, fpr=config.fpr, seed=config.seed)
    rows = _monitored_rows(settings, config)
    if rows.empty:
        return MonitorResult((), (), None, champ.version, champ.model_id, 0)

    # encode (resumable; folds in parts encoded in parallel by encode_chunk) + score ----------------------------
    latents = encode_catalog(champ.checkpoint, rows, latents_table_path(settings),
                             root=settings.catalog_root, progress=config.progress)
    latents = latents[latents["model_id"] == champ.model_id]
    zc = z_columns(latents)
    df = rows.merge(latents[["image_id", *zc]], on="image_id", how="inner")
    Z = df[zc].to_numpy(np.float64)
    if champ.scoring is not None:
        R = residual_table(settings, champ, df, progress=config.progress).loc[df["image_id"].astype(str)]
        Z = np.column_stack([Z, R.to_numpy(np.float64)])
    det = champ.detector.predict(Z)
    # a cell of a product the calibration snapshot does not know is not judged (pipeline.thresholds.judged)
    from pipeline.thresholds import judged

    known = judged(champ.reference["product_type"], df["product_type"]) if {"product_type"} <= \
        set(champ.reference.columns) & set(df.columns) else np.ones(len(df), dtype=bool)
    df["score"], df["is_anomaly"] = det.scores, det.is_anomaly & known
    _upsert(scores_table_path(settings), pd.DataFrame({
        "image_id": df["image_id"].astype(str), "model_version": champ.version, "model_id": champ.model_id,
        "score": df["score"].astype(float), "is_anomaly": df["is_anomaly"].astype(bool),
        "threshold": float(det.threshold),
    }), ["image_id", "model_id"])

    # drift per window -------------------------------------------------------------------------------------------
    ref_order = pd.to_datetime(champ.reference["captured_at"], utc=True).astype("int64").to_numpy() \
        if "captured_at" in champ.reference.columns else None
    # the lot null draws calibration windows with the reference's product mix, when the catalog knows the product
    ref_strata = None  # also with one product: a window of another product is then named as what explains it
    if "product_type" in champ.reference.columns:
        ref_strata = champ.reference["product_type"].fillna("unknown").astype(str).to_numpy()
    quality = q_ref = None
    if config.quality:
        quality = quality_channels(settings, pd.concat([champ.reference[["image_id", "store_path"]],
                                                        df[["image_id", "store_path"]]], ignore_index=True),
                                   progress=config.progress)
        q_ref = quality.loc[champ.reference["image_id"].astype(str).to_numpy()].reset_index(drop=True)
    drift = DriftDetector(alpha=config.alpha, null=config.null, min_window=config.min_window,
                          n_calibration=config.n_calibration, random_state=config.seed, progress=config.progress)
    use_scores = config.scores and champ.ref_scores is not None
    # the lot null's calibration windows are the reference's own line-days (pipeline.blocks): whole windows tested
    from pipeline.blocks import reference_blocks

    streams, periods = reference_blocks(champ.reference, settings.timezone, config.window_by)
    drift.fit(champ.z_ref, model_id=champ.model_id, ref_order=ref_order, ref_strata=ref_strata, ref_quality=q_ref,
              ref_scores=champ.ref_scores if use_scores else None, ref_streams=streams, ref_periods=periods)
    descriptions = axis_descriptions(settings, champ)
    desc_text = {d.axis: d.text for d in descriptions}
    manager = alert_manager if alert_manager is not None else default_alert_manager(settings)

    results: dict[tuple[str, str], tuple[Any, pd.DataFrame]] = {}
    outcomes: list[WindowOutcome] = []
    all_events: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    df["captured_local"] = _local(df["captured_at"], settings.timezone)
    for line, sub in df.groupby("line", sort=True):
        for w in windows(sub, by=config.window_by, size=config.window_size, time_col="captured_local",
                         min_size=config.min_window, skipped=skipped):
            if config.window_by != "count" and pd.Timestamp(w.end) > pd.Timestamp.now(tz="UTC"):
                # still in progress: the alert manager records a window id once, so test it when it is complete
                skipped.append({"window_id": w.window_id, "n": len(w.frame), "reason": "window still in progress"})
                continue
            frame = w.frame
            zw = frame[zc].to_numpy(np.float64)
            qw = None if quality is None else quality.loc[frame["image_id"].astype(str).to_numpy()]
            sw = frame["score"].to_numpy(np.float64) if use_scores else None
            # the lot null's guard band needs the window to be at most a third of the reference
            keep = drift.rows_to_test(len(zw))
            zw = zw[keep]
            qw = None if qw is None else qw.iloc[keep]
            sw = None if sw is None else sw[keep]
            # each product is compared with its own kind (pipeline.strata): a mix swing is context, not drift
            strata = frame["product_type"].to_numpy()[keep] if "product_type" in frame.columns else None
            res = drift.test(zw, model_id=champ.model_id, cur_quality=qw, cur_scores=sw, cur_strata=strata)
            attr = attribute(res, descriptions)  # its text names the mix when the mix explains the verdict
            top = None
            # the top significant axis (else the largest shift) when a latent family fired; image-level families
            # (quality channels, anomaly scores) are described by their own text
            if res.detected and set(res.fired) & set(LATENT_FAMILIES):
                top = int(attr.top_axis if attr.top_axis is not None else res.top_axis)
            effect = 0.0
            if top is not None:
                row = res.per_axis.loc[res.per_axis["axis"] == top].iloc[0]
                effect = float(row["effect_size"])
            cards: dict[int, str] = {}
            if res.detected and config.cards and top is not None:
                try:
                    cards = axis_card_paths(settings, champ, [a.axis for a in attr.axes[:3]], descriptions,
                                            progress=config.progress)
                except Exception:  # noqa: BLE001 - a missing picture must not stop the alert
                    logger.exception("axis cards failed for model %s", champ.model_id)
            examples = _example_images(settings, frame)
            events = manager.update(
                str(line), w.window_id, res, attr, model_version=champ.version,
                card_paths=list(cards.values()), example_images=examples,
                window_start=pd.Timestamp(w.start).isoformat(), window_end=pd.Timestamp(w.end).isoformat(),
            )
            ev_dicts = tuple(_event_dict(e) for e in (events or ()))
            all_events.extend(ev_dicts)
            active = _is_active(manager, str(line))
            outcomes.append(WindowOutcome(
                line=str(line), window_id=w.window_id,
                start=pd.Timestamp(w.start).tz_convert("UTC").to_pydatetime(),
                end=pd.Timestamp(w.end).tz_convert("UTC").to_pydatetime(),
                n_images=len(frame), n_tested=len(zw), n_anomalous=int(frame["is_anomaly"].sum()),
                detected=bool(res.detected), top_axis=top, top_share=float(res.top_share) if top is not None else 0.0,
                effect=effect,
                description=(desc_text.get(top, "") + mix_note(res, prefix="; ") if top is not None
                             else image_level_text(res)),
                summary=res.summary(), attribution=attr.text, alert_active=active, events=ev_dicts,
            ))
            results[(str(line), w.window_id)] = (res, frame)

    _upsert(windows_table_path(settings), pd.DataFrame([{
        "line": o.line, "window_id": o.window_id, "start": o.start, "end": o.end, "detected": o.detected,
        "alert_active": o.alert_active, "top_axis": -1 if o.top_axis is None else o.top_axis,
        "model_version": champ.version, "n_images": o.n_images,
    } for o in outcomes]) if outcomes else pd.DataFrame(columns=["line", "window_id"]), ["line", "window_id"])

    # reports + MLflow ------------------------------------------------------------------------------------------
    if config.report:
        outcomes = _draw_reports(settings, champ, outcomes, results)
    run_id = _log_run(settings, champ, outcomes, results, config)
    return MonitorResult(tuple(outcomes), tuple(all_events), run_id, champ.version, champ.model_id, len(df),
                         tuple(skipped))


def _monitored_rows(settings: Any, config: MonitorConfig) -> pd.DataFrame:
    """Catalog rows of the monitored period (``config.start`` or ``lookback_days`` before the newest image)."""
    from pipeline.catalog import read_catalog

    lines = list(config.lines) if config.lines else None
    start = config.start
    if start is None:
        newest = read_catalog(settings.catalog_root, lines=lines, end=config.end, columns=["captured_at"])
        if newest.empty:
            return newest
        start = (newest["captured_at"].max() - pd.Timedelta(days=config.lookback_days)).to_pydatetime()
    return read_catalog(settings.catalog_root, lines=lines, start=start, end=config.end)


def latents_table_path(settings: Any) -> Path:
    """The resumable latents table of the monitor (every model's latents, one row per image and model)."""
    return state_dir(settings) / "latents.parquet"


def encoding_plan(settings: Any, config: MonitorConfig, chunk_size: int = 1024) -> dict[str, Any]:
    """The champion's folder and the monitored images it has not encoded yet, in chunks for parallel workers.

    A flow maps :func:`encode_chunk` over ``chunks`` (e.g. on Dask workers); the monitor pass then folds the part
    files into the latents table and encodes nothing twice.

    Returns:
        ``{"checkpoint": str, "model_id": str, "chunks": [[{"image_id", "store_path"}, ...], ...],
        "scoring": dict | None, "residual_chunks": [...]}``: ``residual_chunks`` (images without diffusion
        residuals under this model, for :func:`residual_chunk`) is empty when the bundle has no scoring recipe.
    """
    from pipeline.encode import pending_images

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
    if champ.scoring is not None:
        plan["residual_chunks"] = chunked(pending_residuals(settings, champ.model_id, rows,
                                                            len(champ.scoring.t_stars)))
    return plan


def encode_chunk(settings: Any, checkpoint_dir: str, records: list[dict[str, str]]) -> str:
    """Encode one chunk of :func:`encoding_plan` into a part file next to the latents table; returns its path."""
    import torch

    from pipeline.encode import encode_part

    torch.set_num_threads(1)  # one core per chunk: the chunks are the parallelism
    return str(encode_part(checkpoint_dir, pd.DataFrame(records), latents_table_path(settings),
                           root=settings.catalog_root, workers=1))


def quality_table_path(settings: Any) -> Path:
    """Per-image image-quality channels (``image_id`` + ``pipeline.properties.QUALITY_CHANNELS``), model-free."""
    return state_dir(settings) / "quality.parquet"


def quality_channels(settings: Any, rows: pd.DataFrame, progress: bool = False) -> pd.DataFrame:
    """Image-quality channels of ``rows`` (``image_id``, ``store_path``), indexed by image id.

    Measured at full resolution once per image and kept in :func:`quality_table_path`; only images not measured
    before are read.
    """
    from tqdm.auto import tqdm

    from pipeline.catalog import resolve_store_path
    from pipeline.images import read_images
    from pipeline.properties import QUALITY_CHANNELS, measure_each

    channels = list(QUALITY_CHANNELS)
    path = quality_table_path(settings)
    have = pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=["image_id", *channels])
    if not set(channels) <= set(have.columns):  # another channel set: measure again
        have = pd.DataFrame(columns=["image_id", *channels])
    rows = rows.drop_duplicates("image_id")
    todo = rows[~rows["image_id"].astype(str).isin(set(have["image_id"].astype(str)))]
    if len(todo):
        values = []
        batch = 64
        for i in tqdm(range(0, len(todo), batch), desc="image quality", unit="batch", disable=not progress):
            part = todo.iloc[i : i + batch]
            images = read_images([resolve_store_path(settings.catalog_root, p) for p in part["store_path"]],
                                 channels=1)
            values.append(measure_each(images, channels))
        new = pd.concat(values, ignore_index=True)
        new.insert(0, "image_id", todo["image_id"].astype(str).to_numpy())
        have = _upsert(path, new, ["image_id"])
    table = have.assign(image_id=have["image_id"].astype(str)).set_index("image_id")[channels].astype(np.float64)
    return table.loc[~table.index.duplicated(keep="last")]


def residuals_table_path(settings: Any) -> Path:
    """Per-image diffusion residuals (``image_id, model_id, r_0 .. r_{m-1}``), computed once per image and model."""
    return state_dir(settings) / "residuals.parquet"


def residual_parts_dir(settings: Any) -> Path:
    """Where parallel workers drop residual part files (:func:`residual_chunk`) for the monitor pass to fold in."""
    return state_dir(settings) / "residual_parts"


def _residual_frame(settings: Any, model: Any, spec: Any, scoring: ScoringConfig, model_id: str,
                    rows: pd.DataFrame) -> pd.DataFrame:
    from pipeline.detectors.conditional import residual_columns
    from pipeline.retrain import load_images

    R = scoring.residual_detector(model).residuals(load_images(settings, rows, spec))
    new = pd.DataFrame(R, columns=residual_columns(len(scoring.t_stars)))
    new.insert(0, "model_id", model_id)
    new.insert(0, "image_id", rows["image_id"].astype(str).to_numpy())
    return new


def _fold_residual_parts(settings: Any) -> None:
    """Fold the workers' residual part files into :func:`residuals_table_path` (single writer), then remove them."""
    parts = sorted(residual_parts_dir(settings).glob("*.parquet"))
    if not parts:
        return
    _upsert(residuals_table_path(settings), pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True),
            ["image_id", "model_id"])
    for p in parts:
        p.unlink(missing_ok=True)


def pending_residuals(settings: Any, model_id: str, rows: pd.DataFrame, n_residuals: int) -> pd.DataFrame:
    """Rows (``image_id``, ``store_path``) whose residuals under ``model_id`` are neither in the table nor in a part."""
    from pipeline.detectors.conditional import residual_columns

    cols = residual_columns(n_residuals)
    done: set[str] = set()
    path = residuals_table_path(settings)
    for f in [path, *sorted(residual_parts_dir(settings).glob("*.parquet"))]:
        if f.exists():
            have = pd.read_parquet(f)
            if set(cols) <= set(have.columns):
                done |= set(have.loc[have["model_id"].astype(str) == model_id, "image_id"].astype(str))
    rows = rows.drop_duplicates("image_id")
    return rows[~rows["image_id"].astype(str).isin(done)]


def residual_table(settings: Any, champ: Champion, rows: pd.DataFrame, progress: bool = False,
                   chunk: int = 512) -> pd.DataFrame:
    """Diffusion residuals of ``rows`` (``image_id``, ``store_path``) under the champion, indexed by image id.

    Folds in the part files of parallel workers (:func:`residual_chunk`), then computes, with the bundle's recipe
    (``ScoringConfig``), the images still missing from :func:`residuals_table_path`, in chunks (a crash keeps the
    finished chunks). The forward noise is one shared field, so an image's residual does not depend on which other
    images it was computed with.
    """
    from tqdm.auto import tqdm

    from pipeline.detectors.conditional import residual_columns

    if champ.scoring is None:
        raise ValueError(f"model v{champ.version} has no residual scoring recipe in its bundle")
    _fold_residual_parts(settings)
    cols = residual_columns(len(champ.scoring.t_stars))
    todo = pending_residuals(settings, champ.model_id, rows, len(cols))
    for i in tqdm(range(0, len(todo), chunk), desc="diffusion residuals", unit="chunk", disable=not progress):
        new = _residual_frame(settings, champ.checkpoint.model, champ.checkpoint.preprocess, champ.scoring,
                              champ.model_id, todo.iloc[i : i + chunk])
        _upsert(residuals_table_path(settings), new, ["image_id", "model_id"])
    path = residuals_table_path(settings)
    have = pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=["image_id", "model_id", *cols])
    mine = have[have["model_id"].astype(str) == champ.model_id]
    table = mine.assign(image_id=mine["image_id"].astype(str)).set_index("image_id")[cols].astype(np.float64)
    return table.loc[~table.index.duplicated(keep="last")]


def residual_chunk(settings: Any, checkpoint_dir: str, scoring: dict[str, Any], records: list[dict[str, str]]) -> str:
    """Compute the residuals of one chunk of :func:`encoding_plan` into a part file; returns its path.

    The part is named by the model id and a digest of the chunk's image ids and written atomically, so a retried
    chunk rewrites the same file. The monitor pass folds the parts into the residuals table.
    """
    import torch

    from models.checkpoint import load_checkpoint
    from pipeline.encode import part_file, write_parquet_atomic

    torch.set_num_threads(1)  # one core per chunk: the chunks are the parallelism
    rows = pd.DataFrame(records)
    if rows.empty:
        raise ValueError("residual_chunk got an empty chunk")
    ckpt = load_checkpoint(checkpoint_dir)
    model_id = str(ckpt.meta.get("model_id", ""))
    sc = ScoringConfig.from_dict(scoring)
    if sc is None:
        raise ValueError("residual_chunk needs the bundle's scoring recipe")
    df = _residual_frame(settings, ckpt.model, ckpt.preprocess, sc, model_id, rows)
    return str(write_parquet_atomic(df, part_file(residual_parts_dir(settings), model_id, df["image_id"])))


def scores_table_path(settings: Any) -> Path:
    """Per-image detector scores and flags (``image_id, model_version, model_id, score, is_anomaly``)."""
    return state_dir(settings) / "scores.parquet"


def windows_table_path(settings: Any) -> Path:
    """Per-window verdicts (``line, window_id, start, end, detected, alert_active, ...``)."""
    return state_dir(settings) / "windows.parquet"


def default_alert_manager(settings: Any, policy: Any = None) -> Any:
    """The alert manager on ``<state>/alerts`` with the default policy.

    Sinks: the log, a JSON-lines file (``<state>/alerts.jsonl``) and, when ``LINEWATCH_WEBHOOK_URL`` is set, the
    webhook.
    """
    from pipeline.alerts import AlertManager, AlertPolicy, JsonlSink, LogSink, WebhookSink

    sinks: list[Any] = [LogSink(), JsonlSink(state_dir(settings) / "alerts.jsonl", name="jsonl")]
    if getattr(settings, "webhook_url", None):
        sinks.append(WebhookSink(settings.webhook_url, name="webhook"))
    return AlertManager(state_dir(settings) / "alerts", policy or AlertPolicy(), sinks)


def _is_active(manager: Any, line: str) -> bool:
    return manager.active(line) is not None


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


def _example_images(settings: Any, frame: pd.DataFrame, k: int = 4) -> list[str]:
    from pipeline.catalog import resolve_store_path

    top = frame.sort_values("score", ascending=False).head(k)
    return [str(resolve_store_path(settings.catalog_root, p)) for p in top["store_path"]]


def _draw_reports(settings: Any, champ: Champion, outcomes: list[WindowOutcome],
                  results: dict[tuple[str, str], tuple[Any, pd.DataFrame]]) -> list[WindowOutcome]:

    from pipeline.report import drift_report

    out = []
    history = [(o.window_id, results[(o.line, o.window_id)][0]) for o in outcomes]
    for o in outcomes:
        if not o.detected:
            out.append(o)
            continue
        res, frame = results[(o.line, o.window_id)]
        line_history = [h for h, o2 in zip(history, outcomes, strict=True) if o2.line == o.line]
        path = state_dir(settings) / "reports" / f"drift_{o.line}_{o.window_id.replace('/', '-')}.png"
        try:
            drift_report(res, line_history, axis=o.top_axis, description=o.description,
                         example_images=_example_images(settings, frame), out_path=path,
                         title=f"line {o.line}, window {o.window_id}, model v{champ.version}")
            out.append(replace(o, report=str(path)))
        except Exception:  # noqa: BLE001 - the picture is a convenience
            logger.exception("drift report failed for %s %s", o.line, o.window_id)
            out.append(o)
    return out


def _log_run(settings: Any, champ: Champion, outcomes: list[WindowOutcome],
             results: dict[tuple[str, str], tuple[Any, pd.DataFrame]], config: MonitorConfig) -> str | None:
    from pipeline import tracking

    if not outcomes:
        return None
    first, last = outcomes[0].window_id, outcomes[-1].window_id
    with tracking.start_monitoring_run(
        f"monitor-{first}..{last}",
        tags={"model_version": champ.version, "model_id": champ.model_id, "null": config.null,
              "window_by": config.window_by},
    ) as run_id:
        tracking.log_params_flat({"monitor": {k: (str(v) if v is not None else "none") for k, v in
                                              asdict(config).items()}, "model_version": champ.version})
        for step, o in enumerate(outcomes):
            res, _ = results[(o.line, o.window_id)]
            axes = {}
            for row in res.per_axis.itertuples(index=False):
                axes[int(row.axis)] = {"effect": float(row.effect_size), "ks": float(row.ks_stat),
                                       "p": float(row.p_value), "psi": float(row.psi)}
            tracking.log_drift_window(step, tracking.DriftWindowMetrics(
                detected=o.detected, mmd_stat=float(res.mmd_stat), mmd_p=float(res.mmd_p), axes=axes,
                extra={"n_images": float(o.n_images), "anomalous_share": o.n_anomalous / max(o.n_images, 1),
                       **_family_metrics(res)},
            ), timestamp=o.start)
            tracking.log_alert_state(active=o.alert_active, step=step, level="drift" if o.detected else "",
                                     moved_axes=[o.top_axis] if o.top_axis is not None else [],
                                     message=o.attribution if o.detected else "")
        reports = [o.report for o in outcomes if o.report]
        for r in reports:
            tracking.log_artifact(r, "reports")
        cards = state_dir(settings) / "axes" / champ.model_id
        if cards.is_dir():
            tracking.log_artifacts(cards, "axis_cards")
    return run_id
