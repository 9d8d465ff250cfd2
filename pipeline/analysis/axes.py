"""Which latent axis moved, and what it means: attribution, axis descriptions and cards, alignment across models.

* :func:`attribute` turns a drift test result (:class:`pipeline.analysis.drift.DriftResult`, duck-typed) into an
  :class:`Attribution`: the significant axes ranked by |effect| (shift of the mean in reference standard
  deviations), the share of the total |effect| carried by the top axis, and one line of text such as
  ``"axis 3 (brightness, r = 0.94) moved by -1.8 σ; 71% of the drift"``.
* :func:`axis_correlations` / :func:`describe_axes` correlate every latent axis with the measurable image properties
  of :mod:`pipeline.latent.properties` on the reference set and name each axis after its best property
  (``"axis 3: brightness (r = 0.94)"``).
* :func:`axis_cards` renders, for each axis, a traversal strip (a few reference images decoded with that axis set to
  its reference quantiles) as ``axis_XX.png`` + ``axis_XX.json``, and an overview ``axes.json``.
* :func:`align_axes` / :func:`apply_alignment` keep axis numbers comparable across retrained models: the latents of
  one fixed probe set under both models are matched by the Hungarian algorithm on |correlation| (a permutation and a
  sign per axis), and the quality of the match is reported.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
from scipy import optimize, stats

from pipeline.common import atomic
from pipeline.common.schemas import as_latent_matrix
from pipeline.latent.properties import PROPERTIES
from pipeline.latent.quality import corr_matrix

if TYPE_CHECKING:
    import torch

__all__ = [
    "Alignment",
    "AttributedAxis",
    "Attribution",
    "AxisCard",
    "AxisDescription",
    "DriftLike",
    "LATENT_FAMILIES",
    "align_axes",
    "apply_alignment",
    "attribute",
    "axis_cards",
    "axis_correlations",
    "describe_axes",
    "image_level_text",
    "mix_note",
    "mix_text",
    "quality_text",
    "scores_text",
]

#: Below this |r| no property is said to explain an axis.
MIN_ABS_R = 0.3
#: Axis-card files are readable by the group and others (a team server may run as another user).
CARD_FILE_MODE = 0o644
#: A window's product mix is mentioned when some product's share differs from the reference's by at least this much.
MIX_CHANGE = 0.15


@runtime_checkable
class DriftLike(Protocol):
    """What :func:`attribute` and :mod:`pipeline.monitoring.alerts` read from a drift result (see ``pipeline.analysis.drift``)."""

    detected: bool
    per_axis: pd.DataFrame


# ------------------------------------------------------------------------------------------------ descriptions


@dataclass(frozen=True)
class AxisDescription:
    """What one latent axis correlates with on the reference set.

    Attributes:
        axis: latent axis index.
        property: best-correlated property name (None when no property reaches ``min_abs_r``).
        label: its human label ("brightness"), None with ``property``.
        r: signed correlation of the best property (reported even when below the threshold).
        best: name of the best property regardless of the threshold (None when nothing could be computed).
        second_best: ``(property, r)`` of the runner-up, or None.
        method: "spearman" or "pearson".
        text: one line, e.g. ``"axis 3: brightness (r = 0.94)"``.
    """

    axis: int
    property: str | None
    label: str | None
    r: float
    best: str | None
    second_best: tuple[str, float] | None
    method: str
    text: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        d = asdict(self)
        d["r"] = _json_float(self.r)
        d["second_best"] = (
            None if self.second_best is None else [self.second_best[0], _json_float(self.second_best[1])]
        )
        return d


def _json_float(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else float(v)


def _label(prop: str) -> str:
    return PROPERTIES[prop].label if prop in PROPERTIES else prop


def axis_correlations(
    Z_ref: Any, props_df: pd.DataFrame, properties: Sequence[str] | None = None
) -> pd.DataFrame:
    """Pearson and Spearman correlation of every latent axis with every measured property.

    Args:
        Z_ref: reference latents (N, d) (array, or a latents DataFrame with ``z_0..`` columns).
        props_df: the properties of the same N images in the same order (:func:`pipeline.latent.properties.measure`).
        properties: which columns of ``props_df`` to use (default: every numeric column).

    Returns:
        Long DataFrame, one row per (axis, property): ``axis, property, label, pearson, spearman, n``. A constant
        axis or property gets correlation 0.

    Raises:
        ValueError: when the row counts differ, a property is missing, or fewer than 3 images are given.
    """
    Z = as_latent_matrix(Z_ref, "Z_ref")
    if not isinstance(props_df, pd.DataFrame):
        raise ValueError("props_df must be a DataFrame of image properties (pipeline.latent.properties.measure)")
    if len(props_df) != len(Z):
        raise ValueError(
            f"Z_ref has {len(Z)} rows but props_df has {len(props_df)}; measure the properties of the same "
            "reference images, in the same order"
        )
    if len(Z) < 3:
        raise ValueError(f"need at least 3 reference images to correlate, got {len(Z)}")
    if properties is None:
        names = [c for c in props_df.columns if pd.api.types.is_numeric_dtype(props_df[c])]
    else:
        names = list(properties)
        missing = [p for p in names if p not in props_df.columns]
        if missing:
            raise ValueError(f"properties {missing} not in props_df columns {list(props_df.columns)}")
    if not names:
        raise ValueError("props_df has no numeric property columns")
    P = props_df[names].to_numpy(dtype=np.float64)
    if not np.isfinite(P).all():
        raise ValueError("props_df contains NaN or infinite values")
    pear = corr_matrix(Z, P)
    spear = corr_matrix(stats.rankdata(Z, axis=0), stats.rankdata(P, axis=0))
    d = Z.shape[1]
    return pd.DataFrame(
        {
            "axis": np.repeat(np.arange(d), len(names)),
            "property": names * d,
            "label": [_label(p) for p in names] * d,
            "pearson": pear.reshape(-1),
            "spearman": spear.reshape(-1),
            "n": len(Z),
        }
    )


def describe_axes(
    correlations: pd.DataFrame,
    *,
    min_abs_r: float = MIN_ABS_R,
    method: str = "spearman",
    axes: Sequence[int] | None = None,
) -> list[AxisDescription]:
    """Name each axis after the property it correlates with most.

    Args:
        correlations: output of :func:`axis_correlations`.
        min_abs_r: |r| needed to name a property.
        method: "spearman" (default; monotone relations) or "pearson".
        axes: which axes (default: all in ``correlations``).

    Returns:
        One :class:`AxisDescription` per axis, e.g. ``"axis 3: brightness (r = 0.94)"``, or
        ``"axis 3: no single measured property (best: sharpness r = 0.21)"``.
    """
    if method not in ("spearman", "pearson"):
        raise ValueError(f"method must be 'spearman' or 'pearson', got {method!r}")
    if not 0.0 <= min_abs_r <= 1.0:
        raise ValueError(f"min_abs_r must be in [0, 1], got {min_abs_r}")
    need = {"axis", "property", method}
    if not need <= set(correlations.columns):
        raise ValueError(f"correlations needs columns {sorted(need)} (use axis_correlations)")
    wanted = sorted(correlations["axis"].unique()) if axes is None else [int(a) for a in axes]
    out = []
    for a in wanted:
        rows = correlations[correlations["axis"] == a]
        if rows.empty:
            raise ValueError(f"axis {a} not in correlations (axes {sorted(correlations['axis'].unique())})")
        order = rows[method].abs().sort_values(ascending=False, kind="stable").index
        best = rows.loc[order[0]]
        r = float(best[method])
        second = None
        if len(order) > 1:
            s = rows.loc[order[1]]
            second = (str(s["property"]), float(s[method]))
        name = str(best["property"])
        if abs(r) >= min_abs_r and r != 0.0:
            text = f"axis {a}: {_label(name)} (r = {r:.2f})"
            if second is not None and abs(second[1]) >= min_abs_r:
                text += f"; also {_label(second[0])} (r = {second[1]:.2f})"
            out.append(AxisDescription(int(a), name, _label(name), r, name, second, method, text))
        else:
            text = f"axis {a}: no single measured property (best: {_label(name)} r = {r:.2f})"
            out.append(AxisDescription(int(a), None, None, r, name, second, method, text))
    return out


# ------------------------------------------------------------------------------------------------ attribution


@dataclass(frozen=True)
class AttributedAxis:
    """One significant axis of a drifted window.

    Attributes:
        axis: latent axis.
        effect: signed shift of the mean in reference standard deviations.
        p_value: raw per-axis p-value.
        p_adjusted: multiplicity-corrected p-value.
        ks_stat: KS statistic.
        psi: population stability index (NaN when absent).
        description: the axis description line, or None without cards.
        label: the property label of the description ("brightness"), or None.
        r: correlation of that property, or None.
    """

    axis: int
    effect: float
    p_value: float
    p_adjusted: float
    ks_stat: float
    psi: float
    description: str | None = None
    label: str | None = None
    r: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {k: (_json_float(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Attribution:
    """Which axes moved in one window.

    Attributes:
        detected: the drift result's verdict.
        axes: significant axes, ranked by |effect| (largest first).
        top_axis: the first of ``axes`` (None when no axis is significant).
        top_share: |effect| of ``top_axis`` over the sum of |effect| of all axes (0 when none is significant).
        fired: test families that fired (from the drift result, when it says).
        text: one line for people.
    """

    detected: bool
    axes: tuple[AttributedAxis, ...]
    top_axis: int | None
    top_share: float
    fired: tuple[str, ...]
    text: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {
            "detected": self.detected,
            "axes": [a.to_dict() for a in self.axes],
            "top_axis": self.top_axis,
            "top_share": _json_float(self.top_share),
            "fired": list(self.fired),
            "text": self.text,
        }


def _descriptions_from(cards: Any) -> dict[int, AxisDescription | str]:
    """Normalise cards / descriptions / a mapping into ``{axis: AxisDescription or text}``."""
    if cards is None:
        return {}
    if isinstance(cards, Mapping):
        return {int(k): v for k, v in cards.items()}
    out: dict[int, AxisDescription | str] = {}
    for c in cards:
        if isinstance(c, AxisCard):
            out[c.axis] = c.description
        elif isinstance(c, AxisDescription):
            out[c.axis] = c
        elif isinstance(c, Mapping) and "axis" in c:  # an axis_XX.json / axes.json entry
            out[int(c["axis"])] = str(c.get("text", c.get("description", "")))
        else:
            raise ValueError(
                f"cards must be AxisCard / AxisDescription objects or a mapping, got {type(c).__name__}"
            )
    return out


def _fmt_effect(e: float) -> str:
    return f"{e:+.1f} σ".replace("-", "\u2212")


def attribute(drift_result: Any, cards: Any = None, *, max_axes: int | None = None) -> Attribution:
    """Attribute a window's drift to latent axes.

    Args:
        drift_result: a :class:`pipeline.analysis.drift.DriftResult` (anything with ``detected`` and a ``per_axis`` DataFrame
            with ``axis, effect_size, p_value, p_adjusted, ks_stat, significant`` and optionally ``psi``; a bare
            per-axis DataFrame is accepted too, then ``detected`` = any axis significant).
        cards: axis cards (:func:`axis_cards`), :class:`AxisDescription` objects, or ``{axis: text}``.
        max_axes: keep at most this many significant axes (default: all).

    Returns:
        :class:`Attribution`; ``text`` reads e.g.
        ``"axis 3 (brightness, r = 0.94) moved by −1.8 σ; 71% of the drift; also axis 5 (+0.6 σ)"``.
    """
    table, detected, fired = _attribution_input(drift_result)
    if max_axes is not None and max_axes < 1:
        raise ValueError(f"max_axes must be >= 1, got {max_axes}")
    desc = _descriptions_from(cards)
    eff = table["effect_size"].to_numpy(dtype=np.float64)
    total = float(np.nansum(np.abs(eff)))
    sig = table[table["significant"].astype(bool)].copy()
    sig["_abs"] = sig["effect_size"].abs()
    sig = sig.sort_values("_abs", ascending=False, kind="stable")
    if max_axes is not None:
        sig = sig.head(max_axes)
    if detected is None:
        detected = not sig.empty
    axes = _attributed_axes(sig, desc)
    if not axes:
        text = _no_axis_text(drift_result, table, eff, detected, fired)
        return Attribution(detected, (), None, 0.0, fired, text)
    top = axes[0]
    share = abs(top.effect) / total if total > 0 else 0.0
    text = _axes_text(axes, share) + image_level_text(drift_result, prefix="; ")
    return Attribution(detected, tuple(axes), top.axis, share, fired, text)


def _attribution_input(drift_result: Any) -> tuple[pd.DataFrame, bool | None, tuple[str, ...]]:
    """(per-axis table, detected or None for a bare table, fired families) of what :func:`attribute` was given."""
    if isinstance(drift_result, pd.DataFrame):
        table, detected, fired = drift_result, None, ()
    else:
        table = getattr(drift_result, "per_axis", None)
        if not isinstance(table, pd.DataFrame):
            raise ValueError("drift_result needs a per_axis DataFrame (pipeline.analysis.drift.DriftResult)")
        detected = bool(drift_result.detected)
        fired = tuple(getattr(drift_result, "fired", ()) or ())
    need = {"axis", "effect_size", "significant"}
    if not need <= set(table.columns):
        raise ValueError(f"per-axis table needs columns {sorted(need)}, got {list(table.columns)}")
    return table, detected, fired


def _attributed_axes(sig: pd.DataFrame, desc: dict[int, Any]) -> list[AttributedAxis]:
    """One :class:`AttributedAxis` per row of the significant-axes table, in its order, with its description."""

    def col(row: pd.Series, name: str) -> float:
        return float(row[name]) if name in row.index and row[name] is not None else float("nan")

    axes = []
    for _, row in sig.iterrows():
        a = int(row["axis"])
        d = desc.get(a)
        text = d.text if isinstance(d, AxisDescription) else d
        label = d.label if isinstance(d, AxisDescription) else None
        r = d.r if isinstance(d, AxisDescription) and d.property is not None else None
        axes.append(
            AttributedAxis(
                axis=a,
                effect=float(row["effect_size"]),
                p_value=col(row, "p_value"),
                p_adjusted=col(row, "p_adjusted"),
                ks_stat=col(row, "ks_stat"),
                psi=col(row, "psi"),
                description=text,
                label=label,
                r=r,
            )
        )
    return axes


def _no_axis_text(drift_result: Any, table: pd.DataFrame, eff: np.ndarray, detected: bool,
                  fired: tuple[str, ...]) -> str:
    """The attribution text when no single axis is significant: the verdict and the largest shift."""
    head = "drift detected" if detected else "no drift"
    if detected and fired:
        head += f" ({', '.join(fired)})"
    tail = ""
    if len(table) and np.isfinite(eff).any():
        i = int(np.nanargmax(np.abs(eff)))
        tail = f"; largest shift: axis {int(table['axis'].iloc[i])} ({_fmt_effect(float(eff[i]))})"
    return f"{head}; no single axis is significant{tail}" + image_level_text(drift_result, prefix="; ")


def _axes_text(axes: list[AttributedAxis], share: float) -> str:
    """``"axis 3 (brightness, r = 0.94) moved by −1.8 σ; 71% of the drift; also axis 5 (+0.6 σ)"``."""
    top = axes[0]
    if top.label is not None and top.r is not None:
        what = f"axis {top.axis} ({top.label}, r = {top.r:.2f})"
    else:
        what = f"axis {top.axis}"
    text = f"{what} moved by {_fmt_effect(top.effect)}; {share:.0%} of the drift"
    if len(axes) > 1:
        text += "; also " + ", ".join(f"axis {a.axis} ({_fmt_effect(a.effect)})" for a in axes[1:4])
        if len(axes) > 4:
            text += f" and {len(axes) - 4} more"
    return text


def quality_text(drift_result: Any, prefix: str = "") -> str:
    """One phrase for the significant image-quality channels of a drift result whose quality family fired.

    Reads e.g. ``"image quality: fine-detail ratio moved by +2.7 σ"``; ``""`` when the family did not fire (or for a
    bare per-axis table).
    """
    table = getattr(drift_result, "per_channel", None)
    if not isinstance(table, pd.DataFrame) or "quality" not in tuple(getattr(drift_result, "fired", ()) or ()):
        return ""
    sig = table[table["significant"].astype(bool)]
    if sig.empty:
        return ""
    parts = [f"{_label(str(r['channel']))} moved by {_fmt_effect(float(r['effect_size']))}" for _, r in sig.iterrows()]
    return f"{prefix}image quality: " + ", ".join(parts)


def scores_text(drift_result: Any, prefix: str = "") -> str:
    """One phrase for a drift result whose anomaly-score family fired; ``""`` otherwise.

    Reads e.g. ``"anomaly scores up: 23% of the window's cells above the reference's 90th percentile (10%
    expected); a window cell outscores a reference cell 64% of the time (p = 0.003)"`` (the first part when the
    result carries the tail share).
    """
    if "scores" not in tuple(getattr(drift_result, "fired", ()) or ()):
        return ""
    auc, p = getattr(drift_result, "score_stat", None), getattr(drift_result, "score_p", None)
    if auc is None or p is None:
        return ""
    tail, expected = getattr(drift_result, "score_tail", None), getattr(drift_result, "score_tail_expected", None)
    share = ""
    if tail is not None and expected is not None:
        share = (f"{tail:.0%} of the window's cells above the reference's {1 - expected:.0%} percentile "
                 f"({expected:.0%} expected); ").replace("% percentile", "th percentile")
    return (f"{prefix}anomaly scores up: {share}a window cell outscores a reference cell {auc:.0%} of the time "
            f"(p = {p:.2g})")


def mix_note(drift_result: Any, prefix: str = "") -> str:
    """The product-mix phrase of a window whose mix explains its verdict (``pipeline.analysis.strata.MixSignal``).

    Said when some of the window's cells were of a product the reference does not know (they were not tested); empty
    for a window without a mix signal or whose cells were each compared with their own product: a swing of the
    product mix is normal production and is not mentioned then.
    """
    mix = getattr(drift_result, "mix", None)
    if mix is None or not mix.explains:
        return ""
    return prefix + mix.note()


def image_level_text(drift_result: Any, prefix: str = "") -> str:
    """Phrases of the image-level families (image quality, anomaly scores) and the explaining product mix."""
    parts = [t for t in (quality_text(drift_result), scores_text(drift_result), mix_note(drift_result)) if t]
    return prefix + "; ".join(parts) if parts else ""


def mix_text(ref_products: Any, window_products: Any, min_change: float = MIX_CHANGE, prefix: str = "") -> str:
    """One phrase on the window's product mix when it differs from the reference's, else ``""``.

    Reads e.g. ``"product mix changed: mono 90% (reference 40%), poly 10% (reference 60%)"``. Descriptive context for a
    drifted window, not a test: a product-mix change moves several latent axes at once, and the axes alone then read
    as "no single measured property"; the catalog's product type says it directly. Mentioned when some product's share
    moved by ``min_change`` (absolute) or more; products are listed by share in the window.

    Args:
        ref_products: product label of every reference image (missing labels count as ``"unknown"``).
        window_products: product label of every window image.
        min_change: smallest absolute change of a share that is mentioned.
        prefix: prepended to a non-empty phrase (e.g. ``"; "``).

    Labels are passed through ``pipeline.catalog.mes.safe_label`` (no control characters or newlines, no leading formula
    character, at most 64 characters): this text reaches alert logs, webhooks and reports.
    """
    from pipeline.catalog.mes import safe_label

    ref = pd.Series(ref_products, dtype=object).fillna("unknown").map(safe_label)
    win = pd.Series(window_products, dtype=object).fillna("unknown").map(safe_label)
    if ref.empty or win.empty:
        return ""
    r, w = ref.value_counts(normalize=True), win.value_counts(normalize=True)
    labels = sorted(set(r.index) | set(w.index), key=lambda k: (-w.get(k, 0.0), k))
    if max(abs(w.get(k, 0.0) - r.get(k, 0.0)) for k in labels) < min_change - 1e-9:  # float-safe at the bound
        return ""
    parts = [f"{k} {w.get(k, 0.0):.0%} (reference {r.get(k, 0.0):.0%})" for k in labels]
    return f"{prefix}product mix changed: " + ", ".join(parts)


LATENT_FAMILIES = ("axes", "mmd")
"""Drift-test families that speak about latent axes (the others are image-level: quality, scores)."""


# ------------------------------------------------------------------------------------------------ axis cards


@dataclass(frozen=True)
class AxisCard:
    """One axis card: the traversal strip and what the axis correlates with.

    Attributes:
        axis: latent axis.
        description: the axis description.
        quantiles: reference quantile levels of the strip's columns.
        values: the axis values at those quantiles (absolute replacement of z_axis).
        png_path: the strip image.
        json_path: the card's JSON.
        strip: decoded images (n_images, V, C, H, W) in [-1, 1].
    """

    axis: int
    description: AxisDescription
    quantiles: tuple[float, ...]
    values: tuple[float, ...]
    png_path: Path
    json_path: Path
    strip: np.ndarray = field(repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (without the pixels)."""
        return {
            "axis": self.axis,
            "description": self.description.text,
            "property": self.description.property,
            "r": _json_float(self.description.r),
            "quantiles": list(self.quantiles),
            "values": list(self.values),
            "png": str(self.png_path),
            "json": str(self.json_path),
        }


def _atomic_write_text(path: Path, text: str) -> None:
    atomic.write_text(path, text, mode=CARD_FILE_MODE)  # cards are read by the team's servers


def _save_strip_png(
    path: Path,
    strip: np.ndarray,
    col_titles: Sequence[str],
    title: str,
    row_labels: Sequence[str],
) -> None:
    """Render an (R, V, C, H, W) strip in [-1, 1] as a labelled grid (rows = images, columns = axis values)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_rows, n_cols = strip.shape[:2]
    fig = Figure(figsize=(1.4 * n_cols + 0.6, 1.4 * n_rows + 0.9), dpi=100)
    FigureCanvasAgg(fig)
    axs = fig.subplots(n_rows, n_cols, squeeze=False)
    for i in range(n_rows):
        for j in range(n_cols):
            img = strip[i, j]
            ax = axs[i][j]
            if img.shape[0] == 1:
                ax.imshow(img[0], cmap="gray", vmin=-1.0, vmax=1.0, interpolation="nearest")
            else:
                ax.imshow(
                    np.clip((np.moveaxis(img[:3], 0, -1) + 1.0) / 2.0, 0.0, 1.0), interpolation="nearest"
                )
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col_titles[j], fontsize=7)
            if j == 0:
                ax.set_ylabel(row_labels[i], fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    with atomic.atomic_path(path, mode=CARD_FILE_MODE) as tmp:
        fig.savefig(tmp, format="png")


def _column_values(
    Z: np.ndarray, axes: Sequence[int], quantiles: tuple[float, ...], span_sd: float | None, sd_floor: float = 0.0
) -> tuple[dict[int, tuple[float, ...]], dict[int, tuple[float, ...]], dict[int, list[str]]]:
    """Each axis's column values, their reference quantile levels and the column titles of its strip.

    With ``span_sd`` the columns are ``mean + k * max(sd, sd_floor)`` for ``len(quantiles)`` values of k evenly
    spaced in ``[-span_sd, +span_sd]``, titled with z and its distance from the mean in reference sd; otherwise the
    reference quantiles.
    """
    values, levels, titles = {}, {}, {}
    for a in axes:
        col = Z[:, a]
        if span_sd is None:
            values[a] = tuple(float(v) for v in np.quantile(col, quantiles))
            levels[a] = quantiles
            titles[a] = [f"q{lv:.2f}\nz={v:+.2f}" for lv, v in zip(levels[a], values[a], strict=True)]
            continue
        mean, sd = float(col.mean()), float(col.std())
        unit = max(sd, sd_floor)
        values[a] = tuple(mean + k * unit for k in np.linspace(-span_sd, span_sd, len(quantiles)))
        levels[a] = tuple(float((col <= v).mean()) for v in values[a])
        titles[a] = [f"z={v:+.2f}\n{(v - mean) / sd if sd > 0 else 0.0:+.1f} ref. sd" for v in values[a]]
    return values, levels, titles


@dataclass(frozen=True)
class _CardJob:
    """What the cards of one :func:`axis_cards` call share: the checked arguments and each axis's columns."""

    Z: np.ndarray
    quantiles: tuple[float, ...]
    axes: list[int]
    idx: list[int]
    span_sd: float | None
    sd_floor: float
    steps: int
    batch_size: int
    model_id: str | None
    out: Path
    corr: pd.DataFrame
    descs: dict[int, AxisDescription]
    values: dict[int, tuple[float, ...]]
    levels: dict[int, tuple[float, ...]]
    titles: dict[int, list[str]]


def axis_cards(
    model: Any, ref_images: torch.Tensor, Z_ref: Any, props_df: pd.DataFrame, out_dir: str | os.PathLike[str], *,
    axes: Sequence[int] | None = None, n_images: int = 3, image_indices: Sequence[int] | None = None,
    quantiles: Sequence[float] = (0.02, 0.16, 0.5, 0.84, 0.98), span_sd: float | None = None,
    sd_floor: float = 0.0, steps: int = 20, batch_size: int = 32, model_id: str | None = None,
    min_abs_r: float = MIN_ABS_R, progress: bool = True,
) -> list[AxisCard]:
    """Write an axis card (traversal strip PNG + JSON) for each latent axis, and an ``axes.json`` overview.

    Each of a few reference images is DDIM-inverted once (x_T with its own z), then decoded with z_axis set to the
    axis's reference quantiles (absolute replacement), all other coordinates of its z kept.

    Args:
        model: an ``InfoDiffusion`` (``encode``, ``ddim_invert``, ``ddim_sample``).
        ref_images: (N_img, C, H, W) float tensor in [-1, 1] at the model's size (``models.to_model_input``).
        Z_ref: reference latents (N, d) under the same model (for the quantiles and correlations).
        props_df: image properties of the N reference images, same order as ``Z_ref``.
        out_dir: where ``axis_XX.png``, ``axis_XX.json`` and ``axes.json`` go.
        axes: which axes (default: all).
        n_images: rows of each strip (ignored when ``image_indices`` is given).
        image_indices: which rows of ``ref_images`` to show (default: the first ``n_images``).
        quantiles: reference quantile levels, the strip's columns.
        span_sd: instead of quantiles, as many columns evenly spaced from ``mean - span_sd * sd`` to
            ``mean + span_sd * sd`` of the axis on the reference (e.g. 3.0: -3, -1.5, 0, +1.5, +3 sd), a range wide
            enough to see what the axis does; the JSON's ``quantiles`` are then those values' reference levels.
        sd_floor: with ``span_sd``, the unit of the span is at least this: ``1.0`` spans at least +-3 in the units of
            the model's N(0, I) prior, for a model whose latents are narrower than its prior (the columns then lie
            beyond the reference, and their titles say by how many reference sd).
        steps: DDIM steps for inversion and decoding.
        batch_size: images per decoder call.
        model_id: recorded in the JSON (default: ``model.model_id`` when it exists).
        min_abs_r: |r| needed to name a property in the description.
        progress: tqdm bar over axes (also off when stderr is not a TTY).

    Returns:
        One :class:`AxisCard` per axis.

    Raises:
        ValueError: bad quantiles, axes, indices or shapes.
    """
    Z = as_latent_matrix(Z_ref, "Z_ref")
    q, axes_list, idx = _check_card_args(model, ref_images, Z, axes, n_images, image_indices, quantiles, span_sd,
                                         steps, batch_size)
    corr = axis_correlations(Z, props_df)
    descs = {x.axis: x for x in describe_axes(corr, min_abs_r=min_abs_r, axes=axes_list)}
    values, levels, titles = _column_values(Z, axes_list, q, span_sd, sd_floor)
    job = _CardJob(Z, q, axes_list, idx, span_sd, sd_floor, steps, batch_size,
                   model_id if model_id is not None else getattr(model, "model_id", None), Path(out_dir), corr,
                   descs, values, levels, titles)
    job.out.mkdir(parents=True, exist_ok=True)
    cards = _traverse_axes(model, ref_images, job, progress)
    _write_overview(job, cards)
    return cards


def _check_card_args(
    model: Any, ref_images: torch.Tensor, Z: np.ndarray, axes: Sequence[int] | None, n_images: int,
    image_indices: Sequence[int] | None, quantiles: Sequence[float], span_sd: float | None, steps: int,
    batch_size: int,
) -> tuple[tuple[float, ...], list[int], list[int]]:
    """(quantile levels, axes, image rows) of an :func:`axis_cards` call, its arguments checked."""
    import torch

    d = Z.shape[1]
    q = tuple(float(v) for v in quantiles)
    if not q or any(not 0.0 <= v <= 1.0 for v in q):
        raise ValueError(f"quantiles must be a non-empty list of levels in [0, 1], got {quantiles}")
    if span_sd is not None and not span_sd > 0:
        raise ValueError(f"span_sd must be > 0, got {span_sd}")
    axes_list = list(range(d)) if axes is None else [int(a) for a in axes]
    bad = [a for a in axes_list if not 0 <= a < d]
    if bad or not axes_list:
        raise ValueError(f"axes {bad or axes_list} out of range [0, {d})")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    if not isinstance(ref_images, torch.Tensor) or ref_images.ndim != 4:
        raise ValueError("ref_images must be a (N, C, H, W) float tensor in [-1, 1] (models.to_model_input)")
    idx = (
        list(range(min(n_images, len(ref_images))))
        if image_indices is None
        else [int(i) for i in image_indices]
    )
    if not idx or any(not 0 <= i < len(ref_images) for i in idx):
        raise ValueError(f"image indices {idx} out of range [0, {len(ref_images)}) (or n_images < 1)")
    latent_dim = getattr(getattr(model, "cfg", None), "latent_dim", d)
    if latent_dim != d:
        raise ValueError(
            f"Z_ref has {d} axes but the model's latent_dim is {latent_dim}; use latents of this model"
        )
    return q, axes_list, idx


def _traverse_axes(model: Any, ref_images: torch.Tensor, job: _CardJob, progress: bool) -> list[AxisCard]:
    """Inverts the reference rows once, then decodes and writes each axis's strip (model left in its mode)."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device if hasattr(model, "parameters") else torch.device("cpu")
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    cards: list[AxisCard] = []
    try:
        with torch.no_grad():
            x0 = ref_images[job.idx].to(device=device, dtype=torch.float32)
            z0 = model.encode(x0)
            x_T = model.ddim_invert(x0, z0, job.steps)
            it = tqdm(
                job.axes, desc="axis cards", unit="axis", disable=not (progress and sys.stderr.isatty())
            )
            for a in it:
                strip = _decode_strip(model, x0, z0, x_T, a, job, device)
                cards.append(_write_card(job, a, strip))
    finally:
        if was_training and hasattr(model, "train"):
            model.train(True)
    return cards


def _decode_strip(model: Any, x0: torch.Tensor, z0: torch.Tensor, x_T: torch.Tensor, a: int, job: _CardJob,
                  device: torch.device) -> np.ndarray:
    """(rows, values, C, H, W): each inverted row decoded with z_a set to each of the axis's column values."""
    import torch

    n_r, n_v, batch_size = len(job.idx), len(job.quantiles), job.batch_size
    zs = z0.repeat_interleave(n_v, dim=0).clone()  # (n_r * n_v, d): image-major, value-minor
    zs[:, a] = torch.tensor(job.values[a], dtype=zs.dtype, device=device).repeat(n_r)
    xs = x_T.repeat_interleave(n_v, dim=0)
    decoded = [
        model.ddim_sample(xs[s : s + batch_size], zs[s : s + batch_size], job.steps, eta=0.0)
        for s in range(0, len(zs), batch_size)
    ]
    return torch.cat(decoded).float().cpu().numpy().reshape(n_r, n_v, *x0.shape[1:])


def _write_card(job: _CardJob, a: int, strip: np.ndarray) -> AxisCard:
    """Writes ``axis_XX.png`` and ``axis_XX.json`` of axis ``a`` and returns its card."""
    desc = job.descs[a]
    png = job.out / f"axis_{a:02d}.png"
    jpath = job.out / f"axis_{a:02d}.json"
    _save_strip_png(png, strip, job.titles[a], desc.text, [f"ref #{i}" for i in job.idx])
    rows = job.corr[job.corr["axis"] == a]
    card_json = {
        "axis": a,
        "description": desc.text,
        "property": desc.property,
        "label": desc.label,
        "r": _json_float(desc.r),
        "second_best": desc.to_dict()["second_best"],
        "method": desc.method,
        "correlations": {
            str(r.property): {
                "pearson": _json_float(r.pearson),
                "spearman": _json_float(r.spearman),
            }
            for r in rows.itertuples()
        },
        "quantiles": list(job.levels[a]),
        "span_sd": job.span_sd,
        "sd_floor": job.sd_floor,
        "reference_sd": float(job.Z[:, a].std()),
        "values": list(job.values[a]),
        "image_indices": job.idx,
        "steps": job.steps,
        "n_ref": len(job.Z),
        "model_id": job.model_id,
        "png": png.name,
    }
    _atomic_write_text(jpath, json.dumps(card_json, indent=2))
    return AxisCard(a, desc, job.levels[a], job.values[a], png, jpath, strip)


def _write_overview(job: _CardJob, cards: list[AxisCard]) -> None:
    """Writes ``axes.json``: the call's settings and one entry per card."""
    overview = {
        "model_id": job.model_id,
        "n_ref": len(job.Z),
        "quantiles": list(job.quantiles),
        "span_sd": job.span_sd,
        "sd_floor": job.sd_floor,
        "steps": job.steps,
        "image_indices": job.idx,
        "axes": [
            {
                "axis": c.axis,
                "description": c.description.text,
                "text": c.description.text,
                "property": c.description.property,
                "r": _json_float(c.description.r),
                "png": c.png_path.name,
                "json": c.json_path.name,
            }
            for c in cards
        ],
    }
    _atomic_write_text(job.out / "axes.json", json.dumps(overview, indent=2))


# ------------------------------------------------------------------------------------------------ alignment


@dataclass(frozen=True)
class Alignment:
    """How a new model's axes map onto the previous model's numbering.

    Attributes:
        permutation: for each previous axis k, the matched new axis (-1 when unmatched; only when the new model has
            fewer axes).
        signs: +1 / -1 per previous axis (new axis multiplied by it matches the previous one; 1 when unmatched).
        correlations: |correlation| of each matched pair, per previous axis (NaN when unmatched).
        mean_abs_corr: mean of ``correlations`` over matched pairs.
        min_abs_corr: the weakest matched pair.
        n_weak: matched pairs with |r| below ``weak``.
        weak: the threshold used for ``n_weak``.
        unmatched: ``{"prev": [...], "new": [...]}`` axes without a partner (when dimensions differ).
        n_probe: number of probe images.
    """

    permutation: tuple[int, ...]
    signs: tuple[int, ...]
    correlations: tuple[float, ...]
    mean_abs_corr: float
    min_abs_corr: float
    n_weak: int
    weak: float
    unmatched: dict[str, list[int]]
    n_probe: int

    @property
    def text(self) -> str:
        """One line on the quality of the match."""
        n = sum(p >= 0 for p in self.permutation)
        s = (
            f"{n} axes matched on {self.n_probe} probe images: mean |r| = {self.mean_abs_corr:.2f}, "
            f"min |r| = {self.min_abs_corr:.2f}, {self.n_weak} with |r| < {self.weak:g}"
        )
        if self.unmatched["prev"] or self.unmatched["new"]:
            s += f"; unmatched previous {self.unmatched['prev']}, new {self.unmatched['new']}"
        return s

    def new_to_prev(self) -> dict[int, int]:
        """``{new axis: previous axis}`` for matched pairs."""
        return {p: k for k, p in enumerate(self.permutation) if p >= 0}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (with ``text``)."""
        d = asdict(self)
        d["correlations"] = [_json_float(c) for c in self.correlations]
        d["mean_abs_corr"] = _json_float(self.mean_abs_corr)
        d["min_abs_corr"] = _json_float(self.min_abs_corr)
        d["text"] = self.text
        return d


def align_axes(Z_prev: Any, Z_new: Any, *, weak: float = 0.5) -> Alignment:
    """Match a new model's latent axes to the previous model's on the same probe images.

    The Pearson correlation of every previous axis with every new axis is computed over the probe images, and the
    Hungarian algorithm (``scipy.optimize.linear_sum_assignment``) picks the permutation maximising the total
    |correlation|; each pair's sign is the sign of its correlation.

    Args:
        Z_prev: latents of the probe images under the previous model (N, d_prev).
        Z_new: latents of the same probe images, same order, under the new model (N, d_new).
        weak: |r| below which a matched pair is counted as weak.

    Returns:
        :class:`Alignment` (see :func:`apply_alignment`).

    Raises:
        ValueError: when the probe sets differ in size or have fewer than 3 images.
    """
    A = as_latent_matrix(Z_prev, "Z_prev")
    B = as_latent_matrix(Z_new, "Z_new")
    if len(A) != len(B):
        raise ValueError(
            f"Z_prev has {len(A)} rows and Z_new {len(B)}: encode the same fixed probe images with both models"
        )
    if len(A) < 3:
        raise ValueError(f"need at least 3 probe images, got {len(A)}")
    C = corr_matrix(A, B)  # (d_prev, d_new)
    rows, cols = optimize.linear_sum_assignment(-np.abs(C))
    d_prev, d_new = C.shape
    perm = np.full(d_prev, -1, dtype=int)
    signs = np.ones(d_prev, dtype=int)
    corr = np.full(d_prev, np.nan)
    for r, c in zip(rows, cols, strict=True):
        perm[r] = c
        signs[r] = 1 if C[r, c] >= 0 else -1
        corr[r] = abs(C[r, c])
    matched = corr[perm >= 0]
    return Alignment(
        permutation=tuple(int(p) for p in perm),
        signs=tuple(int(s) for s in signs),
        correlations=tuple(float(c) for c in corr),
        mean_abs_corr=float(matched.mean()) if matched.size else float("nan"),
        min_abs_corr=float(matched.min()) if matched.size else float("nan"),
        n_weak=int((matched < weak).sum()),
        weak=float(weak),
        unmatched={
            "prev": [int(k) for k in np.flatnonzero(perm < 0)],
            "new": sorted(set(range(d_new)) - {int(c) for c in cols}),
        },
        n_probe=len(A),
    )


def apply_alignment(Z_new: Any, alignment: Alignment, *, keep_unmatched: bool = True) -> np.ndarray:
    """Re-number (and re-sign) a new model's latents in the previous model's axis order.

    Args:
        Z_new: latents under the new model (N, d_new).
        alignment: from :func:`align_axes`.
        keep_unmatched: append the new axes without a partner (in increasing order) after the ``d_prev`` columns.

    Returns:
        (N, d_prev [+ unmatched]) array: column k is ``signs[k] * Z_new[:, permutation[k]]`` (NaN for a previous
        axis without partner).
    """
    B = as_latent_matrix(Z_new, "Z_new")
    d_new = len(alignment.permutation) - len(alignment.unmatched["prev"]) + len(alignment.unmatched["new"])
    if B.shape[1] != d_new:
        raise ValueError(f"Z_new has {B.shape[1]} axes but the alignment was computed for {d_new}")
    out = np.full((len(B), len(alignment.permutation)), np.nan)
    for k, (p, s) in enumerate(zip(alignment.permutation, alignment.signs, strict=True)):
        if p >= 0:
            out[:, k] = s * B[:, p]
    if keep_unmatched and alignment.unmatched["new"]:
        out = np.concatenate([out, B[:, alignment.unmatched["new"]]], axis=1)
    return out
