"""Drift report pictures: what moved, since when, and what the images look like.

One PNG per alerted window with three rows:

1. per-axis bar chart of the signed effect (reference standard deviations), significant axes highlighted; next to it,
   when the window was tested on them, the image-level families: the shift of each full-resolution image-quality
   channel and the anomaly-score AUC (a drift they alone found shows there, not on the axes);
2. time series of the top axis's KS statistic over the windows, against the decision threshold (the lot-null
   quantile of the max-KS statistic, when the lot null is in force), drifted windows marked;
3. example images of the window (the highest anomaly scores);
4. when given, the moved axis's card: reference images decoded with that axis moved from -3 to +3 reference sd, so
   the picture shows what the axis means.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


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


def _card_panel(ax: Any, card: Path, axis: int) -> None:
    """The axis card (a PNG strip) as one panel."""
    import matplotlib.image

    ax.imshow(matplotlib.image.imread(card))
    ax.set_title(f"axis {axis} card: reference images decoded with this axis moved across its range", fontsize=10)
    ax.axis("off")


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
    axis_card: str | os.PathLike[str] | None = None,
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
        axis_card: the moved axis's card (``axis_XX.png``, ``pipeline.analysis.axes.axis_cards``), shown as a last
            row; skipped when missing.

    Returns:
        The written path.

    Raises:
        ValueError: ``result`` has no per-axis table.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from pipeline.common.images import read_image

    per_axis = getattr(result, "per_axis", None)
    if per_axis is None or "effect_size" not in per_axis.columns:
        raise ValueError("drift_report needs a DriftResult with a per_axis table (pipeline.analysis.drift)")
    axis = int(result.top_axis if axis is None else axis)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    examples = list(example_images)[:max_examples]
    per_channel = getattr(result, "per_channel", None)
    image_level = (per_channel is not None and len(per_channel) > 0) or getattr(result, "score_stat", None) is not None
    cols = max(2 if image_level else 1, max_examples)
    card = Path(axis_card) if axis_card is not None and Path(axis_card).is_file() else None
    fig = plt.figure(figsize=(11, 8.5 + (5.5 if card else 0.0)), constrained_layout=True)
    gs = fig.add_gridspec(3 + bool(card), cols, height_ratios=[1.1, 1.0, 1.0] + ([2.4] if card else []))

    # 1. per-axis effects (and the image-level families beside them)
    ax1 = fig.add_subplot(gs[0, : cols - 1] if image_level else gs[0, :])
    if image_level:
        _image_level_panel(fig.add_subplot(gs[0, cols - 1]), result)
    tab = per_axis.sort_values("axis")
    colors = ["tab:red" if bool(s) else "tab:gray" for s in tab["significant"]]
    ax1.bar(tab["axis"].astype(int), tab["effect_size"].astype(float), color=colors)
    ax1.axhline(0, color="black", lw=0.6)
    ax1.set_xlabel("latent axis")
    ax1.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax1.set_ylabel("effect (ref. sd)")
    ax1.set_title(f"per-axis shift (red: significant); {'drift' if result.detected else 'no drift'}, "
                  f"n={result.n_cur}, null={result.null}")

    # 2. the axis over time
    ax2 = fig.add_subplot(gs[1, :])
    ids = [wid for wid, _ in history]
    ks = []
    for _, r in history:
        row = _axis_row(r.per_axis, axis)
        ks.append(float(row["ks_stat"]) if row is not None else np.nan)
    x = np.arange(len(ids))
    ax2.plot(x, ks, marker="o", color="tab:blue", label=f"KS of axis {axis}")
    det = [bool(r.detected) for _, r in history]
    ax2.scatter(x[det], np.asarray(ks)[det], s=120, facecolors="none", edgecolors="tab:red", label="drift")
    thr = (result.thresholds or {}).get("max_ks")
    if thr is not None and np.isfinite(thr):
        ax2.axhline(float(thr), color="tab:red", ls="--", lw=1, label="lot-null threshold (max KS)")
    ax2.set_xticks(x, ids, rotation=20, fontsize=8)
    ax2.set_ylabel("KS statistic")
    ax2.set_title(description or f"axis {axis}", fontsize=10)
    ax2.legend(fontsize=8, loc="upper left")

    # 3. examples
    for i, p in enumerate(examples):
        ax = fig.add_subplot(gs[2, i])
        try:
            img = np.asarray(read_image(p, channels=1)).squeeze()
            ax.imshow(img, cmap="gray", vmin=0, vmax=255 if img.dtype == np.uint8 else None)
        except (OSError, ValueError):
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center")
        ax.set_title(Path(p).name[:28], fontsize=7)
        ax.axis("off")
    if card is not None:
        _card_panel(fig.add_subplot(gs[3, :]), card, axis)
    if title:
        fig.suptitle(title)
    fig.savefig(out_path, dpi=90, bbox_inches="tight")  # the image-level panel's title must not be cut off
    plt.close(fig)
    return out_path
