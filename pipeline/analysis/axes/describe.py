"""What each latent axis correlates with: axis descriptions from measured image properties.

:func:`axis_correlations` correlates every latent axis with the measurable image properties of
:mod:`pipeline.latent.properties` on the reference set; :func:`describe_axes` names each axis after its best property
(``"axis 3: brightness (r = 0.94)"``) as an :class:`AxisDescription`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from pipeline.common.schemas import as_latent_matrix
from pipeline.latent.properties import PROPERTIES
from pipeline.latent.quality import corr_matrix

__all__ = ["MIN_ABS_R", "AxisDescription", "axis_correlations", "describe_axes"]

#: Below this |r| no property is said to explain an axis.
MIN_ABS_R = 0.3


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

