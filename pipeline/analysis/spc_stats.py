"""How the control chart names its statistics and reports their shifts (:mod:`pipeline.analysis.spc`).

:data:`STATISTICS` maps the per-image columns a chart watches to the label and unit an alert uses; latent axes
``z_NN`` are reported in in-control sd (:func:`stat_label`); :class:`Shift` is one statistic's estimated shift at a
chart point, and :func:`report_value` converts a shift to its reported unit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["STATISTICS", "Shift", "StatInfo", "report_value", "stat_label"]


@dataclass(frozen=True)
class StatInfo:
    """How a chart statistic is named and reported.

    Attributes:
        label: what an alert calls it.
        unit: ``"%"`` (a change relative to the in-control mean), ``"pp"`` (percentage points of a share), or an
            absolute unit ("deg", "px"); latent axes are reported in in-control sd (``"sd"``).
    """

    label: str
    unit: str


STATISTICS: dict[str, StatInfo] = {
    "mean_intensity": StatInfo("brightness", "%"),
    "contrast": StatInfo("contrast", "%"),
    "sharpness": StatInfo("sharpness", "%"),
    "noise_level": StatInfo("noise level", "%"),
    "detail_ratio": StatInfo("fine detail", "%"),
    "dark_fraction": StatInfo("dark area", "pp"),
    "rotation_deg": StatInfo("rotation", "deg"),
    "offset_x": StatInfo("horizontal offset", "px"),
    "offset_y": StatInfo("vertical offset", "px"),
    "vignetting": StatInfo("corner/centre brightness", "%"),
    "score_tail": StatInfo("share of unusual cells", "pp"),
}
"""Known chart statistics (per-image columns); ``z_NN`` latent axes are known too (:func:`stat_label`)."""

_Z = re.compile(r"^z_?(\d+)$")


def stat_label(name: str) -> StatInfo:
    """The label and unit of a statistic; latent axes ``z_7`` / ``z_07`` read ``latent z_07`` in sd."""
    if name in STATISTICS:
        return STATISTICS[name]
    m = _Z.match(name)
    if m:
        return StatInfo(f"latent z_{int(m.group(1)):02d}", "sd")
    return StatInfo(name, "sd")


@dataclass(frozen=True)
class Shift:
    """The estimated shift of one statistic at a chart point.

    Attributes:
        name: statistic (column) name.
        label: what an alert calls it.
        delta: the EWMA of the window deviations (the estimated shift, in the statistic's own unit).
        z: ``delta`` over its in-control EWMA sd.
        value: the shift as reported (per cent, percentage points, sd or the absolute unit).
        unit: the reported unit.
    """

    name: str
    label: str
    delta: float
    z: float
    value: float
    unit: str

    @property
    def text(self) -> str:
        """E.g. ``"brightness -10 %"``, ``"rotation +1.95 deg"``, ``"latent z_03 +2.1 sd"``."""
        if self.unit == "%":
            v = f"{self.value:+.0f}" if abs(self.value) >= 1 else f"{self.value:+.1f}"
            return f"{self.label} {v} %"
        if self.unit in ("pp", "sd"):
            return f"{self.label} {self.value:+.1f} {self.unit}"
        return f"{self.label} {self.value:+.2f} {self.unit}"


def report_value(name: str, delta: float, center: float, sd_window: float) -> tuple[float, str]:
    """A statistic's shift ``delta`` in its reported unit: per cent of ``center``, percentage points, window sd or as is."""
    unit = stat_label(name).unit
    if unit == "%":
        return (100.0 * delta / center if abs(center) > 1e-12 else float("nan")), unit
    if unit == "pp":
        return 100.0 * delta, unit
    if unit == "sd":
        return delta / max(sd_window, 1e-12), unit
    return delta, unit
