"""Which latent axes moved in a drifted window, and the texts that say so.

:func:`attribute` turns a drift test result (:class:`pipeline.analysis.drift.DriftResult`, duck-typed: :class:`DriftLike`)
into an :class:`Attribution`: the significant axes ranked by |effect| (shift of the mean in reference standard
deviations), the share of the total |effect| carried by the top axis, and one line of text such as
``"axis 3 (brightness, r = 0.94) moved by -1.8 σ; 71% of the drift"``. :func:`quality_text`, :func:`scores_text`,
:func:`mix_note` and :func:`image_level_text` phrase the image-level families; :func:`mix_text` phrases a product-mix
change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from pipeline.analysis.axes.cards import AxisCard
from pipeline.analysis.axes.describe import AxisDescription, _json_float, _label

__all__ = [
    "LATENT_FAMILIES",
    "MIX_CHANGE",
    "AttributedAxis",
    "Attribution",
    "DriftLike",
    "attribute",
    "image_level_text",
    "mix_note",
    "mix_text",
    "quality_text",
    "scores_text",
]

#: A window's product mix is mentioned when some product's share differs from the reference's by at least this much.
MIX_CHANGE = 0.15


@runtime_checkable
class DriftLike(Protocol):
    """What :func:`attribute` and :mod:`pipeline.monitoring.alerts` read from a drift result (see ``pipeline.analysis.drift``)."""

    detected: bool
    per_axis: pd.DataFrame



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
    parts = [channel_phrase(str(r["channel"]), float(r["effect_size"])) for _, r in sig.iterrows()]
    return f"{prefix}image quality: " + ", ".join(parts)


def channel_phrase(channel: str, effect: float) -> str:
    """``"noise level moved by +1.5 σ"``: one image-quality channel's shift in reference sd."""
    return f"{_label(channel)} moved by {_fmt_effect(effect)}"


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
