"""Faults of a simulated EL inspection line: pure image functions, a severity registry, and onset ramps.

Image faults are pure numpy functions ``(H, W) unsigned-integer image -> image of the same dtype``: the arithmetic is
done in float, rounded and clipped to the dtype's full range. Each docstring gives the physical story. Population
faults (``product_mix``, ``defect_rate``) do not touch pixels: they change *which* cells the line produces and are
applied by :mod:`pipeline.line.simulate`.

Every fault has one dimensionless **severity** knob. ``FAULTS[kind].value(severity)`` maps it linearly to the
physical parameter (``neutral + per_severity * severity``); severity 0 is the healthy line and severity 1 is a fault
that a process engineer would call clearly present. :func:`severity_at` turns a fault onset (sudden or ramped) into
the severity on a given (fractional) day.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "FAULTS",
    "FaultInfo",
    "FaultSpec",
    "IMAGE_FAULTS",
    "POPULATION_FAULTS",
    "apply_fault",
    "apply_to_capture",
    "apply_value",
    "blur",
    "gain",
    "illumination",
    "misalign",
    "noise",
    "severity_at",
    "vignetting",
]

MISALIGN_OFFSET_PX_PER_DEGREE = 3.0
"""Fixture misalignment: the shift (px, to the right) that accompanies each degree of rotation."""
SENSOR_NOISE_SIGMA_PX = 0.7
"""Gaussian sigma (px) that separates a capture's scene from its pixel noise in :func:`apply_to_capture`."""


def _check_image(img: np.ndarray) -> float:
    img = np.asarray(img)
    if img.ndim != 2:
        raise ValueError(f"expected a single-channel (H, W) image, got shape {img.shape}")
    if not np.issubdtype(img.dtype, np.unsignedinteger):
        raise ValueError(f"expected an unsigned-integer image (uint8/uint16), got dtype {img.dtype}")
    return float(np.iinfo(img.dtype).max)


def _to_dtype(x: np.ndarray, dtype: np.dtype, top: float) -> np.ndarray:
    return np.clip(np.rint(x), 0.0, top).astype(dtype)


def gain(img: np.ndarray, factor: float) -> np.ndarray:
    """Exposure / gain drift: multiply intensity by ``factor`` (clipped to the full range).

    Physical story: the EL signal is proportional to the excitation current driven through the cell and to the
    camera's exposure time and gain. An aging or mis-set power supply, a changed exposure setting, or a camera gain
    drift scales every pixel by the same factor. A factor of 0.9 lowers the mean intensity of an unsaturated image
    by 10 %.

    Args:
        img: (H, W) uint8/uint16 image.
        factor: intensity multiplier, > 0 (1 = unchanged).

    Returns:
        The scaled image, same dtype.
    """
    top = _check_image(img)
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"gain factor must be a finite number > 0, got {factor}")
    return _to_dtype(img.astype(np.float32) * np.float32(factor), img.dtype, top)


def blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Defocus blur: Gaussian blur with standard deviation ``sigma_px`` pixels (at 300 x 300 px).

    Physical story: the camera's focus drifts (thermal expansion of the mount, a knocked lens, a fixture that holds
    the cell at a different height), so fine structures such as micro-cracks and finger interruptions smear out.

    Args:
        img: (H, W) uint8/uint16 image.
        sigma_px: Gaussian sigma in pixels, >= 0 (0 = unchanged). Edges are extended (``mode="nearest"``).

    Returns:
        The blurred image, same dtype.
    """
    top = _check_image(img)
    if not (math.isfinite(sigma_px) and sigma_px >= 0):
        raise ValueError(f"blur sigma_px must be a finite number >= 0, got {sigma_px}")
    if sigma_px == 0:
        return img.copy()
    return _to_dtype(ndimage.gaussian_filter(img.astype(np.float32), sigma_px, mode="nearest"), img.dtype, top)


def noise(img: np.ndarray, sigma_frac: float, rng: np.random.Generator) -> np.ndarray:
    """Sensor noise: additive Gaussian noise with sigma ``sigma_frac`` of the full range.

    Physical story: a warming or aging sensor (dark current, read noise), a raised analogue gain to compensate for a
    weak signal, or electrical interference adds pixel-wise noise. ``sigma_frac=0.03`` on a uint8 image is a sigma
    of 7.65 grey levels (before clipping).

    Args:
        img: (H, W) uint8/uint16 image.
        sigma_frac: noise sigma as a fraction of the full range, >= 0.
        rng: random generator (the noise is deterministic for a seeded generator).

    Returns:
        The noisy image, same dtype.
    """
    top = _check_image(img)
    if not (math.isfinite(sigma_frac) and sigma_frac >= 0):
        raise ValueError(f"noise sigma_frac must be a finite number >= 0, got {sigma_frac}")
    if sigma_frac == 0:
        return img.copy()
    eps = rng.standard_normal(size=img.shape, dtype=np.float32) * np.float32(sigma_frac * top)
    return _to_dtype(img.astype(np.float32) + eps, img.dtype, top)


def misalign(img: np.ndarray, degrees: float, offset_px: float, *, offset_y_px: float = 0.0) -> np.ndarray:
    """Fixture misalignment: rotate about the image centre and shift; uncovered edges become dark background.

    Physical story: a worn or loose cell fixture (or a conveyor stop that drifts) presents the cell rotated and off
    centre to the camera; the area the cell no longer covers shows the unlit background, which is black in EL.

    Args:
        img: (H, W) uint8/uint16 image.
        degrees: rotation, counter-clockwise as displayed (rows downward), in degrees.
        offset_px: horizontal shift in pixels, positive = to the right.
        offset_y_px: vertical shift in pixels, positive = down.

    Returns:
        The moved image (bilinear interpolation), same dtype; uncovered pixels are 0.
    """
    top = _check_image(img)
    for name, v in (("degrees", degrees), ("offset_px", offset_px), ("offset_y_px", offset_y_px)):
        if not math.isfinite(v):
            raise ValueError(f"misalign {name} must be finite, got {v}")
    if degrees == 0 and offset_px == 0 and offset_y_px == 0:
        return img.copy()
    theta = math.radians(degrees)
    c, s = math.cos(theta), math.sin(theta)
    # Output (row', col') -> input (row, col): inverse of a display-CCW rotation about the centre, after the shift.
    matrix = np.array([[c, s], [-s, c]])
    centre = (np.array(img.shape, dtype=float) - 1.0) / 2.0
    shift = np.array([offset_y_px, offset_px], dtype=float)
    offset = centre - matrix @ (centre + shift)
    out = ndimage.affine_transform(
        img.astype(np.float32), matrix, offset=offset, order=1, mode="constant", cval=0.0
    )
    return _to_dtype(out, img.dtype, top)


def vignetting(img: np.ndarray, strength: float) -> np.ndarray:
    """Vignetting: radial falloff, intensity x ``1 - strength * (r / r_corner)**2``.

    Physical story: illumination and optics age (lens coatings, a dirty or decentred lens, a camera moved closer to
    the cell), so light collection falls off towards the image corners; the quadratic law is the leading term of the
    cos^4 falloff. The centre is unchanged and the corners lose ``strength`` of their intensity.

    Args:
        img: (H, W) uint8/uint16 image.
        strength: relative darkening at the corners, in [0, 1).

    Returns:
        The vignetted image, same dtype.
    """
    top = _check_image(img)
    if not (math.isfinite(strength) and 0 <= strength < 1):
        raise ValueError(f"vignetting strength must be in [0, 1), got {strength}")
    if strength == 0:
        return img.copy()
    h, w = img.shape
    yy = np.arange(h, dtype=np.float32)[:, None] - (h - 1) / 2.0
    xx = np.arange(w, dtype=np.float32)[None, :] - (w - 1) / 2.0
    r2 = (yy**2 + xx**2) / (((h - 1) / 2.0) ** 2 + ((w - 1) / 2.0) ** 2)
    return _to_dtype(img.astype(np.float32) * (1.0 - np.float32(strength) * r2), img.dtype, top)


def illumination(img: np.ndarray, strength: float) -> np.ndarray:
    """Illumination non-uniformity: the cell's edges and corners darker than its centre.

    Physical story: the EL signal follows the current injected through the contact probes and the light collected
    by the optics; a worn or mis-seated contact bar, an ageing lamp of a combined PL/EL station, or a dirty or
    decentred lens leave the border of the cell less bright than its middle. Intensity is multiplied by
    ``1 - strength * rho**2`` with ``rho = max(|x| / half_width, |y| / half_height)`` (the square "distance" from
    the centre): the centre is unchanged and the whole border, edges and corners alike, loses ``strength`` of its
    intensity (unlike :func:`vignetting`, whose radial law darkens the corners twice as much as the edge middles).

    Args:
        img: (H, W) uint8/uint16 image.
        strength: relative darkening at the border, in [0, 1).

    Returns:
        The darkened image, same dtype.
    """
    top = _check_image(img)
    if not (math.isfinite(strength) and 0 <= strength < 1):
        raise ValueError(f"illumination strength must be in [0, 1), got {strength}")
    if strength == 0:
        return img.copy()
    h, w = img.shape
    yy = np.abs(np.arange(h, dtype=np.float32) - (h - 1) / 2.0)[:, None] / ((h - 1) / 2.0)
    xx = np.abs(np.arange(w, dtype=np.float32) - (w - 1) / 2.0)[None, :] / ((w - 1) / 2.0)
    rho2 = np.maximum(yy, xx) ** 2
    return _to_dtype(img.astype(np.float32) * (1.0 - np.float32(strength) * rho2), img.dtype, top)


@dataclass(frozen=True)
class FaultInfo:
    """One fault kind: its physical parameter and the severity -> parameter mapping.

    Attributes:
        kind: registry key.
        parameter: name of the physical parameter.
        unit: its unit.
        neutral: the parameter of a healthy line (for population faults: the default baseline share; the simulator
            uses the replayed pool's own share instead).
        per_severity: change of the parameter per unit of severity.
        population: True when the fault changes which cells are produced rather than the pixels.
        signed: True when a negative severity is meaningful (e.g. a gain rise, a shift towards poly cells).
        story: one-line physical story.
    """

    kind: str
    parameter: str
    unit: str
    neutral: float
    per_severity: float
    population: bool
    signed: bool
    story: str

    def value(self, severity: float, baseline: float | None = None) -> float:
        """The physical parameter at ``severity`` (population faults: a share, clipped to [0, 1]).

        Args:
            severity: the severity knob (>= 0 unless ``signed``).
            baseline: the healthy value; defaults to ``neutral``.
        """
        _check_severity(self, severity)
        base = self.neutral if baseline is None else float(baseline)
        v = base + self.per_severity * float(severity)
        return float(min(1.0, max(0.0, v))) if self.population else float(v)


FAULTS: dict[str, FaultInfo] = {
    f.kind: f
    for f in (
        FaultInfo("gain", "factor", "x intensity", 1.0, -0.25, False, True,
                  "EL excitation current or camera exposure/gain drifts: every pixel scales by the same factor"),
        FaultInfo("blur", "sigma_px", "px at 300 px", 0.0, 1.5, False, False,
                  "camera focus drifts (thermal mount, knocked lens, cell height): fine cracks smear out"),
        FaultInfo("noise", "sigma_frac", "fraction of full range", 0.0, 0.03, False, False,
                  "sensor warms or ages, or gain is raised: additive pixel noise"),
        FaultInfo("misalign", "degrees", "deg CCW (+3 px right per deg)", 0.0, 2.0, False, True,
                  "worn fixture or drifting conveyor stop: cell rotated and off centre, dark background shows"),
        FaultInfo("vignetting", "strength", "corner darkening fraction", 0.0, 0.4, False, False,
                  "illumination and optics age: light falls off towards the corners"),
        FaultInfo("illumination", "strength", "edge darkening fraction", 0.0, 0.3, False, False,
                  "a worn contact bar, ageing lamp or dirty lens: the cell's border is darker than its centre"),
        FaultInfo("product_mix", "mono_share", "share of mono cells", 0.41, 0.4, True, True,
                  "production planning changes the mono/poly mix (more monocrystalline lots)"),
        FaultInfo("defect_rate", "defect_rate", "share of p=1 cells", 0.27, 0.3, True, True,
                  "an upstream process (soldering, stringing, lamination) degrades: more truly defective cells"),
    )
}
"""Registry of fault kinds (see ``docs/simulator.md``)."""

IMAGE_FAULTS: tuple[str, ...] = tuple(k for k, f in FAULTS.items() if not f.population)
POPULATION_FAULTS: tuple[str, ...] = tuple(k for k, f in FAULTS.items() if f.population)


def get_fault(kind: str) -> FaultInfo:
    """Look up a fault kind, with a clear error for unknown kinds."""
    try:
        return FAULTS[kind]
    except KeyError:
        raise ValueError(f"unknown fault {kind!r}: choose from {', '.join(FAULTS)}") from None


def _check_severity(info: FaultInfo, severity: float) -> None:
    if not math.isfinite(severity):
        raise ValueError(f"fault severity must be finite, got {severity}")
    if severity < 0 and not info.signed:
        raise ValueError(f"fault {info.kind!r} needs a severity >= 0, got {severity}")


def apply_fault(img: np.ndarray, kind: str, severity: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """Apply fault ``kind`` at ``severity`` to one image (population faults return the image unchanged).

    Args:
        img: (H, W) uint8/uint16 image.
        kind: a key of :data:`FAULTS`.
        severity: the severity knob; 0 returns an unchanged copy.
        rng: random generator, required by ``noise``.

    Returns:
        The faulty image, same dtype (a new array).
    """
    info = get_fault(kind)
    _check_severity(info, severity)
    if severity == 0 or info.population:
        return np.array(img, copy=True)
    return apply_value(img, kind, info.value(severity), rng)


def apply_value(img: np.ndarray, kind: str, value: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """Apply image fault ``kind`` at its physical parameter ``value`` (e.g. ``("gain", 0.9)``: a gain x0.9).

    Args:
        img: (H, W) uint8/uint16 image.
        kind: an image fault of :data:`FAULTS` (:data:`IMAGE_FAULTS`).
        value: the fault's physical parameter (:attr:`FaultInfo.parameter`, in its unit).
        rng: random generator, required by ``noise``.

    Returns:
        The faulty image, same dtype (a new array).
    """
    if get_fault(kind).population:
        raise ValueError(f"{kind!r} is a population fault: it changes which cells are made, not their pixels")
    v = float(value)
    if kind == "gain":
        if v <= 0:
            raise ValueError(f"gain factor {v} must be > 0 (severity < 4)")
        return gain(img, v)
    if kind == "blur":
        return blur(img, v)
    if kind == "noise":
        if rng is None:
            raise ValueError("the 'noise' fault needs a random generator (rng=np.random.default_rng(seed))")
        return noise(img, v, rng)
    if kind == "misalign":
        return misalign(img, v, MISALIGN_OFFSET_PX_PER_DEGREE * v)
    if kind in ("vignetting", "illumination"):
        if v >= 1:
            limit = 1.0 / FAULTS[kind].per_severity
            raise ValueError(f"{kind} strength {v} must be < 1 (severity < {limit:g})")
        return vignetting(img, v) if kind == "vignetting" else illumination(img, v)
    raise AssertionError(f"no image function for fault {kind!r}")  # pragma: no cover


def apply_to_capture(img: np.ndarray, kind: str, value: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """Apply image fault ``kind`` to a real capture as the camera would: to the scene, not to the sensor's noise.

    A capture is scene plus pixel noise, and an optical or exposure fault (gain, blur, misalignment, vignetting,
    illumination) acts on the scene before the sensor adds its noise. Applied to the capture itself, a blur would also
    smooth the noise away, which a real defocus does not. So the capture is split into a scene estimate (a Gaussian of
    :data:`SENSOR_NOISE_SIGMA_PX`) and the residual; the fault acts on the scene and the residual is added back. The
    ``noise`` fault adds to the capture as it is.

    Args:
        img: (H, W) uint8/uint16 capture.
        kind: an image fault of :data:`FAULTS` (:data:`IMAGE_FAULTS`).
        value: the fault's physical parameter (as :func:`apply_value`).
        rng: random generator, required by ``noise``.

    Returns:
        The faulty capture, same dtype (a new array).
    """
    if kind == "noise":
        return apply_value(img, kind, value, rng)
    top = _check_image(img)
    x = np.asarray(img, dtype=np.float64)
    scene = ndimage.gaussian_filter(x, SENSOR_NOISE_SIGMA_PX, mode="nearest")
    faulty = apply_value(_to_dtype(scene, img.dtype, top), kind, value, rng).astype(np.float64) + (x - scene)
    return _to_dtype(faulty, img.dtype, top)


def severity_at(
    day: float, fault_start: float, ramp_days: float, severity: float, duration_days: float | None = None
) -> float:
    """Severity of a fault on a (fractional) day of the simulation.

    Day ``d + f`` is fraction ``f`` of day index ``d`` (0 = first simulated day). Before ``fault_start`` the
    severity is 0. A sudden fault (``ramp_days == 0``) is at full ``severity`` from ``fault_start`` on; a gradual
    one grows linearly from 0 at ``fault_start`` to ``severity`` at ``fault_start + ramp_days`` and stays there.
    With ``duration_days`` the fault is repaired at ``fault_start + duration_days``: 0 from then on.

    Args:
        day: time in days since the start of the simulation.
        fault_start: onset, in days.
        ramp_days: ramp duration in days, >= 0.
        severity: final severity.
        duration_days: days the fault lasts (None: to the end of the simulation).

    Returns:
        The severity at ``day``.
    """
    if ramp_days < 0:
        raise ValueError(f"ramp_days must be >= 0, got {ramp_days}")
    if day < fault_start or (duration_days is not None and day >= fault_start + duration_days):
        return 0.0
    if ramp_days == 0:
        return float(severity)
    return float(severity) * min(1.0, (day - fault_start) / ramp_days)


@dataclass(frozen=True)
class FaultSpec:
    """A fault injected into the simulated line.

    Attributes:
        kind: a key of :data:`FAULTS`.
        start_day: onset day index (0 = first simulated day).
        severity: final severity (see :data:`FAULTS`).
        ramp_days: days of linear ramp to full severity (0 = sudden).
        lines: lines affected (None = every simulated line).
        duration_days: days the fault lasts from ``start_day`` (None: to the end of the simulation); after it the
            line is healthy again (the fault was repaired).
    """

    kind: str
    start_day: int = 0
    severity: float = 1.0
    ramp_days: float = 0.0
    lines: tuple[str, ...] | None = None
    duration_days: float | None = None

    def __post_init__(self) -> None:
        info = get_fault(self.kind)
        _check_severity(info, self.severity)
        if self.start_day < 0:
            raise ValueError(f"fault start day must be >= 0, got {self.start_day}")
        if not (math.isfinite(self.ramp_days) and self.ramp_days >= 0):
            raise ValueError(f"fault ramp days must be >= 0, got {self.ramp_days}")
        if info.kind == "gain" and info.value(self.severity) <= 0:
            raise ValueError(f"gain severity {self.severity} gives a factor <= 0: use a severity < 4")
        if info.kind in ("vignetting", "illumination") and info.value(self.severity) >= 1:
            raise ValueError(f"{info.kind} severity {self.severity} gives a strength >= 1: use a severity < "
                             f"{1.0 / info.per_severity:g}")
        if self.duration_days is not None and not (math.isfinite(self.duration_days) and self.duration_days > 0):
            raise ValueError(f"fault duration must be > 0 days (or None), got {self.duration_days}")
        if self.lines is not None and not isinstance(self.lines, tuple):
            object.__setattr__(self, "lines", tuple(self.lines))

    @property
    def end_day(self) -> float | None:
        """First day on which the fault is gone (``start_day + duration_days``), None when it lasts to the end."""
        return None if self.duration_days is None else self.start_day + self.duration_days

    def severity_at(self, day: float) -> float:
        """Severity on (fractional) day ``day``; see :func:`severity_at`."""
        return severity_at(day, self.start_day, self.ramp_days, self.severity, self.duration_days)

    def overlaps(self, other: FaultSpec) -> bool:
        """True when the two faults are active on a common line at a common time."""
        if self.lines is not None and other.lines is not None and not set(self.lines) & set(other.lines):
            return False
        end_a = math.inf if self.end_day is None else self.end_day
        end_b = math.inf if other.end_day is None else other.end_day
        return self.start_day < end_b and other.start_day < end_a
