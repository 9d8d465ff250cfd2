"""Drift report pictures: what moved, since when, and what the images look like.

One PNG per drifted window and model version. On top, a paragraph in plain language (:func:`plain_summary`: what
the window is, which test fired and what that means, the most unusual cells by MES serial, what the alert manager
did); then three rows:

1. the test families (−log10 p against each family's level; the ones that fired in red, so the test that fired is
   always visible, also when only the multivariate MMD fired and no single axis is significant); the per-axis bar
   chart of the signed effect (reference standard deviations), significant axes highlighted; next to it, when the
   window was tested on them, the image-level families: the shift of each full-resolution image-quality channel and
   the anomaly-score AUC (a drift they alone found shows there, not on the axes);
2. time series of the top axis's KS statistic over the windows, against the decision threshold (the lot-null
   quantile of the max-KS statistic, when the lot null is in force), drifted windows marked;
3. example images of the window (the highest anomaly scores), titled with their MES serials;
4. when given, the moved axis's card: reference images decoded with that axis moved from -3 to +3 reference sd, so
   the picture shows what the axis means.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.common.figures import write_png


def _axis_row(per_axis: Any, axis: int) -> Any:
    rows = per_axis[per_axis["axis"] == axis]
    return rows.iloc[0] if len(rows) else None


def _image_level_panel(ax: Any, result: Any) -> None:
    """Bars of the image-quality channel shifts (ref. sd) and the anomaly-score AUC of one drift result."""
    labels, values, colors = [], [], []
    per_channel = getattr(result, "per_channel", None)
    if per_channel is not None:
        for _, r in per_channel.iterrows():
            labels.append(str(r["channel"]).replace("_", " "))
            values.append(float(r["effect_size"]))
            colors.append("tab:red" if bool(r["significant"]) else "tab:gray")
    fired = tuple(getattr(result, "fired", ()) or ())
    score_stat, score_p = getattr(result, "score_stat", None), getattr(result, "score_p", None)
    if score_stat is not None:
        labels.append("anomaly scores\n(AUC - 0.5) x 10")
        values.append((float(score_stat) - 0.5) * 10.0)
        colors.append("tab:red" if "scores" in fired else "tab:gray")
    tail, expected = getattr(result, "score_tail", None), getattr(result, "score_tail_expected", None)
    if tail is not None and expected is not None:
        labels.append(f"cells above ref. {100 * (1 - expected):.0f}th pct.\n(share / expected - 1)")
        values.append(float(tail) / float(expected) - 1.0)
        colors.append("tab:red" if "scores" in fired else "tab:gray")
    y = np.arange(len(labels))
    ax.barh(y, values, color=colors)
    ax.axvline(0, color="black", lw=0.6)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel("shift (ref. sd)")
    title = "image level (red: fired)"
    if score_stat is not None and score_p is not None:
        title += f"\nscores AUC {float(score_stat):.2f}, p = {float(score_p):.2g}"
        if tail is not None:
            title += f"\n{float(tail):.0%} of cells in ref. top {float(expected):.0%}"
    ax.set_title(title, fontsize=9)


def _families_panel(ax: Any, result: Any) -> None:
    """Bars of −log10 p of every test family tested, the family level as a dashed line, fired families in red."""
    family_p = dict(getattr(result, "family_p", {}) or {})
    fired = set(getattr(result, "fired", ()) or ())
    names = list(family_p)
    vals = [-np.log10(max(float(family_p[k]), 1e-300)) for k in names]
    ax.barh(np.arange(len(names)), vals, color=["tab:red" if k in fired else "tab:gray" for k in names])
    level = (getattr(result, "thresholds", None) or {}).get("family_alpha", getattr(result, "family_alpha", None))
    if level:
        ax.axvline(-np.log10(float(level)), color="black", ls="--", lw=0.8, label="level")
    ax.set_yticks(np.arange(len(names)), [_FAMILY_LABELS.get(k, k) for k in names], fontsize=8)
    ax.set_xlabel("−log10 p")
    ax.set_title("tests (red: fired)", fontsize=9)


_FAMILY_LABELS = {"axes": "per-axis KS", "mmd": "MMD (all axes)", "scores": "anomaly scores", "quality": "image quality"}


def plain_summary(
    *, line: str, window_id: str, model_version: str, n_images: int, n_tested: int, n_anomalous: int,
    detected: bool, causes: Sequence[Any] = (), mix: str = "", serials: Sequence[str] = (),
    events: Sequence[dict[str, Any]] = (),
) -> str:
    """One paragraph in plain language on a window's verdict (the top of its drift report).

    Args:
        line: production line.
        window_id: the window (a plant day, a shift, ...).
        model_version: the model that made the verdict.
        n_images: images in the window; ``n_tested`` of them were tested for drift.
        n_tested: images tested.
        n_anomalous: images above the per-image detector's threshold.
        detected: the drift test fired.
        causes: :class:`pipeline.monitoring.causes.Cause` objects of the window (their ``key`` and ``summary``).
        mix: the product-mix phrase, when the mix explains the verdict (``pipeline.analysis.axes.mix_note``).
        serials: MES serials of the most unusual cells, most unusual first.
        events: the alert events of the window (``kind``, ``reason``, ``alert.cause``).
    """
    tested = f"{n_images} cells" + (f" ({n_tested} tested for drift)" if n_tested < n_images else "")
    head = f"Line {line}, {window_id}, model v{model_version}: {tested}. "
    if detected and causes:
        what = causes_phrase(causes)
        head += f"These images differ from the reference more than normal production does. {what[0].upper()}{what[1:]}."
    elif detected:
        head += "These images differ from the reference more than normal production does."
    else:
        head += "No drift: the images look like the reference."
    if mix:
        head += f" Context: {mix.lstrip('; ')} (a change of product mix alone is normal production)."
    flagged = f" {n_anomalous} cell{'s' if n_anomalous != 1 else ''} flagged as unusual"
    if serials:
        flagged += f"; the most unusual: {', '.join(serials)}"
    head += flagged + "."
    for e in events:
        cause = (e.get("alert") or {}).get("cause", "")
        head += f" Alert {e.get('kind', '')}" + (f" ({cause})" if cause else "") + "."
    if detected and not events:
        head += " No new alert (the alert policy waits for drift on consecutive windows, or an alert is already open)."
    return head


_CAUSE_WORDS = {"latent": "the model's picture of the cells moved", "quality": "image quality changed",
                "scores": "more unusual cells than normal (defect rate up)", "drift": "drift"}


def causes_phrase(causes: Sequence[Any]) -> str:
    """The causes in words, one clause per family (``"image quality changed: noise level moved by +2.1 σ, ..."``)."""
    by_family: dict[str, list[str]] = {}
    for c in causes:
        by_family.setdefault(c.family, []).append(c.summary.removeprefix("image quality: "))
    return "; ".join(f"{_CAUSE_WORDS.get(f, f)}: {', '.join(parts)}" for f, parts in by_family.items())


def drift_report(
    result: Any,
    history: Sequence[tuple[str, Any]],
    *,
    axis: int | None,
    description: str = "",
    example_images: Sequence[str | os.PathLike[str]] = (),
    out_path: str | os.PathLike[str],
    title: str = "",
    max_examples: int = 4,
    example_labels: Sequence[str] = (),
    summary: str = "",
    axis_card: str | os.PathLike[str] | None = None,
    heatmaps: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """Draw the drift report of one window.

    Args:
        result: the window's ``pipeline.analysis.drift.DriftResult``.
        history: ``(window_id, DriftResult)`` of the windows to show in the time series, in time order (the
            window itself included).
        axis: the axis to follow over time (default: ``result.top_axis``).
        description: what the axis means (printed in the title of the time series).
        example_images: image files of the window to show.
        out_path: PNG to write (parent folders are created).
        title: figure title.
        max_examples: at most this many example images.
        example_labels: what to call each example (its MES serial); default the file name.
        summary: a paragraph printed above the panels (:func:`plain_summary`).
        axis_card: the moved axis's card (``axis_XX.png``, ``pipeline.analysis.axes.axis_cards``), shown as a last
            row; skipped when missing.
        heatmaps: heatmap overlays of the window's top flagged cells (``pipeline.monitoring.heatmaps``), shown as a
            row below the examples (at most ``max_examples``; missing files skipped).

    Returns:
        The written path.

    Raises:
        ValueError: ``result`` has no per-axis table.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    image_level = _check_result(result)
    axis = int(result.top_axis if axis is None else axis)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    cols = max(4, max_examples)
    card = Path(axis_card) if axis_card is not None and Path(axis_card).is_file() else None
    heat = [Path(h) for h in heatmaps if Path(h).is_file()][:max_examples]
    heat_rows = (len(heat) + 1) // 2  # two overlays a row: each is a cell beside its map, too wide for a column
    fig, gs = _figure(plt, cols, bool(summary), heat_rows, card is not None)
    if summary:
        _text_panel(fig.add_subplot(gs[0, :]), summary)
    # 1. the test families, the per-axis effects (and the image-level families beside them)
    _families_panel(fig.add_subplot(gs[1, 0]), result)
    _axes_panel(fig.add_subplot(gs[1, 1 : cols - 1] if image_level else gs[1, 1:]), result)
    if image_level:
        _image_level_panel(fig.add_subplot(gs[1, cols - 1]), result)
    # 2. the axis over time; 3. examples
    _history_panel(fig.add_subplot(gs[2, :]), result, history, axis, description)
    labels = [*example_labels, *[""] * max_examples]
    for i, path in enumerate(list(example_images)[:max_examples]):
        _example_panel(fig.add_subplot(gs[3, i]), path, labels[i])
    half = cols // 2
    for i, path in enumerate(heat):
        _heatmap_panel(fig.add_subplot(gs[4 + i // 2, (i % 2) * half: (i % 2 + 1) * half]), path)
    if card is not None:
        _card_panel(fig.add_subplot(gs[4 + heat_rows, :]), card, axis)
    fig.suptitle(title)
    write_png(fig, out_path, dpi=90)  # cropped tight: the image-level panel's title must not be cut off
    plt.close(fig)
    return Path(out_path)


def _figure(plt: Any, cols: int, summary: bool, heat_rows: int, card: bool) -> tuple[Any, Any]:
    """The report's figure and grid: summary, tests, history, examples, then the heatmap rows and the card if any."""
    fig = plt.figure(figsize=(12, (9.5 if summary else 8.5) + (5.5 if card else 0.0) + 3.0 * heat_rows),
                     constrained_layout=True)
    gs = fig.add_gridspec(4 + heat_rows + card, cols, height_ratios=[
        0.45 if summary else 0.01, 1.1, 1.0, 1.0, *([1.3] * heat_rows), *([2.4] if card else [])])
    return fig, gs


def _heatmap_panel(ax: Any, path: Path) -> None:
    """One heatmap overlay (its PNG: the cell and its anomaly map) as a panel."""
    import matplotlib.image

    ax.imshow(matplotlib.image.imread(path))
    ax.set_title(f"where it is unusual: {path.stem}", fontsize=8)
    ax.axis("off")


def _card_panel(ax: Any, card: Path, axis: int) -> None:
    """The axis card (a PNG strip) as one panel."""
    import matplotlib.image

    ax.imshow(matplotlib.image.imread(card))
    ax.set_title(f"axis {axis} card: reference images decoded with this axis moved across its range", fontsize=10)
    ax.axis("off")


def _check_result(result: Any) -> bool:
    """Raise unless ``result`` has a per-axis table; return whether it carries image-level families."""
    per_axis = getattr(result, "per_axis", None)
    if per_axis is None or "effect_size" not in per_axis.columns:
        raise ValueError("drift_report needs a DriftResult with a per_axis table (pipeline.analysis.drift)")
    per_channel = getattr(result, "per_channel", None)
    return (per_channel is not None and len(per_channel) > 0) or getattr(result, "score_stat", None) is not None


def _text_panel(ax: Any, text: str) -> None:
    """A paragraph across the top of the figure."""
    ax.axis("off")
    ax.text(0, 1, textwrap.fill(text, 170), va="top", ha="left", fontsize=8.5, wrap=True)


def _axes_panel(ax: Any, result: Any) -> None:
    """Bars of every latent axis's signed effect, significant ones red; says so when no single axis is significant."""
    import matplotlib.ticker

    tab = result.per_axis.sort_values("axis")
    ax.bar(tab["axis"].astype(int), tab["effect_size"].astype(float),
           color=["tab:red" if bool(s) else "tab:gray" for s in tab["significant"]])
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("latent axis")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("effect (ref. sd)")
    note = ""
    if result.detected and not bool(tab["significant"].astype(bool).any()):
        fired = [_FAMILY_LABELS.get(f, f) for f in (getattr(result, "fired", ()) or ())]
        note = f"\nno single axis significant; fired: {', '.join(fired) or 'see tests'}"
    ax.set_title(f"per-axis shift (red: significant); {'drift' if result.detected else 'no drift'}, "
                 f"n={result.n_cur}, null={result.null}{note}", fontsize=9)


def _history_panel(ax: Any, result: Any, history: Sequence[tuple[str, Any]], axis: int, description: str) -> None:
    """The KS statistic of ``axis`` over the windows of ``history``, drifted windows circled, the lot-null threshold."""
    ids = [wid for wid, _ in history]
    ks = []
    for _, r in history:
        row = _axis_row(r.per_axis, axis)
        ks.append(float(row["ks_stat"]) if row is not None else np.nan)
    x = np.arange(len(ids))
    ax.plot(x, ks, marker="o", color="tab:blue", label=f"KS of axis {axis}")
    det = [bool(r.detected) for _, r in history]
    ax.scatter(x[det], np.asarray(ks)[det], s=120, facecolors="none", edgecolors="tab:red", label="drift")
    thr = (result.thresholds or {}).get("max_ks")
    if thr is not None and np.isfinite(thr):
        ax.axhline(float(thr), color="tab:red", ls="--", lw=1, label="lot-null threshold (max KS)")
    ax.set_xticks(x, ids, rotation=20, fontsize=8)
    ax.set_ylabel("KS statistic")
    ax.set_title(description or f"axis {axis}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")


def _example_panel(ax: Any, path: str | os.PathLike[str], label: str) -> None:
    """One example image, titled with its label (the MES serial) or else its file name."""
    from pipeline.common.images import read_image

    try:
        img = np.asarray(read_image(path, channels=1)).squeeze()
        ax.imshow(img, cmap="gray", vmin=0, vmax=255 if img.dtype == np.uint8 else None)
    except (OSError, ValueError):
        ax.text(0.5, 0.5, "unreadable", ha="center", va="center")
    ax.set_title(label or Path(path).name[:28], fontsize=8)
    ax.axis("off")
