"""Measurable image properties of electroluminescence cell images.

Every property is a pure function of a stack of grayscale images, computed on the **fixed** full range of the bit
depth (uint8 / 255, uint16 / 65535, floats are taken as already in [0, 1]); nothing is normalised per image, because
absolute intensity is signal on a production line. Functions accept one image ``(H, W)`` or a stack ``(N, H, W)`` and
return a float (one image) or a float array ``(N,)`` (stack).

The properties are what the axis cards correlate latent axes with (``pipeline.analysis.axes``), so each one is named after the
line fault it reacts to (:data:`FAULT_PROPERTIES`):

==========================  =============================================  =================
property                    what                                           fault
==========================  =============================================  =================
``mean_intensity``          mean grey level                                gain
``contrast``                standard deviation of the grey levels          gain
``sharpness``               Laplacian variance / mean^2 (light pre-blur)   blur
``noise_level``             sigma of a structure-free filter (Immerkaer)   noise
``detail_ratio``            finest-octave / next-octave detail             blur, noise
``dark_fraction``           share of pixels below 0.2 of full scale        defect_rate, gain
``crack_fraction``          share of thin dark line-like pixels            defect_rate
``rotation_deg``            orientation of the busbar / edge structure     misalign
``offset_x``, ``offset_y``  centroid of the bright cell area vs centre     misalign
``offset_px``               length of that centroid offset                 misalign
``vignetting``              corner / centre intensity ratio                vignetting
``illumination``            border / centre brightness (robust blocks)     illumination, vignetting
==========================  =============================================  =================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage

__all__ = [
    "DARK_THRESHOLD",
    "CHART_CHANNELS",
    "MONITOR_CHANNELS",
    "QUALITY_CHANNELS",
    "FAULT_PROPERTIES",
    "PROPERTIES",
    "Property",
    "channel_table",
    "contrast",
    "crack_fraction",
    "dark_fraction",
    "detail_ratio",
    "illumination",
    "mean_intensity",
    "measure",
    "measure_each",
    "noise_level",
    "offset_px",
    "offset_x",
    "offset_y",
    "rotation_deg",
    "sharpness",
    "to_unit_float",
    "vignetting",
]

#: Grey level (fraction of full scale) below which a pixel counts as dark.
DARK_THRESHOLD = 0.2
#: Minimum black-top-hat depth (fraction of full scale) of a crack-like pixel.
CRACK_DEPTH = 0.06
#: Side of the square structuring element of the black top-hat; thinner dark lines are "crack-like"
#: (ELPV busbars are ~10 px wide at 300 px and are not).
CRACK_SIZE = 7


def to_unit_float(images: np.ndarray) -> np.ndarray:
    """Scale images to float32 in [0, 1] from the fixed full range of their dtype.

    Args:
        images: ``(H, W)`` or ``(N, H, W)`` array, uint8, uint16, or float already in [0, 1].

    Returns:
        float32 array of shape ``(N, H, W)`` (a single image becomes ``N = 1``).

    Raises:
        ValueError: for a wrong number of dimensions, an unsupported dtype, or images smaller than 16x16.
    """
    arr = np.asarray(images)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(
            f"expected a grayscale image (H, W) or a stack (N, H, W), got shape {arr.shape}; "
            "convert RGB to grayscale first (pipeline.common.images does this on read)"
        )
    if arr.shape[1] < 16 or arr.shape[2] < 16:
        raise ValueError(f"images must be at least 16x16 pixels, got {arr.shape[1:]}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / np.float32(65535.0)
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float32, copy=False)
    raise ValueError(f"unsupported image dtype {arr.dtype}; use uint8, uint16 or float in [0, 1]")


def _prepare(images: np.ndarray) -> tuple[np.ndarray, bool]:
    arr = np.asarray(images)
    return to_unit_float(arr), arr.ndim == 2


def _out(values: np.ndarray, single: bool) -> float | np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return float(values[0]) if single else values


# 2-D stencils per image by array slicing on the valid region (ndimage.laplace / sobel on an (N, H, W) stack would
# also difference or smooth across the sample axis; slicing is also several times faster than ndimage.correlate).


def _binomial(x: np.ndarray, passes: int = 1) -> np.ndarray:
    """Blur each image with the 3-tap binomial [1, 2, 1] / 4 along rows and columns, ``passes`` times.

    One pass is a Gaussian of sigma 1/sqrt(2) px, two passes sigma 1 px (variances add). Valid region: the output
    loses ``passes`` pixels on each side.
    """
    for _ in range(passes):
        x = 0.25 * (x[:, :-2] + x[:, 2:]) + 0.5 * x[:, 1:-1]
        x = 0.25 * (x[:, :, :-2] + x[:, :, 2:]) + 0.5 * x[:, :, 1:-1]
    return x


def _laplacian(x: np.ndarray) -> np.ndarray:
    """5-point Laplacian of each image of an (N, H, W) stack, valid region (N, H-2, W-2)."""
    c = x[:, 1:-1, 1:-1]
    return x[:, :-2, 1:-1] + x[:, 2:, 1:-1] + x[:, 1:-1, :-2] + x[:, 1:-1, 2:] - 4.0 * c


def _sobel(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sobel derivatives (d/drow, d/dcol) of each image of an (N, H, W) stack, valid region (N, H-2, W-2)."""
    dr = x[:, 2:] - x[:, :-2]  # (N, H-2, W): central difference along rows
    sr = x[:, :-2] + 2.0 * x[:, 1:-1] + x[:, 2:]  # smoothing along rows
    gy = dr[:, :, :-2] + 2.0 * dr[:, :, 1:-1] + dr[:, :, 2:]
    gx = sr[:, :, 2:] - sr[:, :, :-2]
    return gy, gx


# ---------------------------------------------------------------------------------------------- intensity


def mean_intensity(images: np.ndarray) -> float | np.ndarray:
    """Mean grey level as a fraction of full scale (brightness; reacts to gain)."""
    x, single = _prepare(images)
    return _out(x.mean(axis=(1, 2)), single)


def contrast(images: np.ndarray) -> float | np.ndarray:
    """Standard deviation of the grey levels, fraction of full scale (reacts to gain and to defects)."""
    x, single = _prepare(images)
    return _out(x.std(axis=(1, 2)), single)


def dark_fraction(images: np.ndarray, threshold: float = DARK_THRESHOLD) -> float | np.ndarray:
    """Share of pixels darker than ``threshold`` (fraction of full scale; dark, inactive cell area)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold is a fraction of full scale in (0, 1), got {threshold}")
    x, single = _prepare(images)
    return _out((x < threshold).mean(axis=(1, 2)), single)


def vignetting(images: np.ndarray) -> float | np.ndarray:
    """Corner / centre intensity ratio; lens vignetting darkens the corners and lowers it.

    Corner patches are inset by 8 % of the side to skip the dark border and the chamfered corners of mono cells;
    the centre patch is the middle third.
    """
    x, single = _prepare(images)
    _, h, w = x.shape
    i0, i1 = int(round(0.08 * h)), int(round(0.25 * h))
    j0, j1 = int(round(0.08 * w)), int(round(0.25 * w))
    corners = [
        x[:, i0:i1, j0:j1],
        x[:, i0:i1, w - j1 : w - j0],
        x[:, h - i1 : h - i0, j0:j1],
        x[:, h - i1 : h - i0, w - j1 : w - j0],
    ]
    corner = np.mean([c.mean(axis=(1, 2)) for c in corners], axis=0)
    centre = x[:, h // 3 : 2 * h // 3, w // 3 : 2 * w // 3].mean(axis=(1, 2))
    return _out(corner / np.maximum(centre, 1e-6), single)


#: Grid of the illumination channel: the cell (inside a 5 % margin) is cut into ILLUMINATION_GRID^2 blocks.
ILLUMINATION_GRID = 8
#: Percentile of a block's pixels that stands for its brightness (robust to busbars, fingers and cracks).
ILLUMINATION_PERCENTILE = 75.0


def _illumination_masks(g: int) -> tuple[np.ndarray, np.ndarray]:
    """Border blocks (outer ring of the grid without its 4 corner blocks) and centre blocks (middle 2 x 2)."""
    ring = np.zeros((g, g), dtype=bool)
    ring[0, :] = ring[-1, :] = ring[:, 0] = ring[:, -1] = True
    ring[[0, 0, -1, -1], [0, -1, 0, -1]] = False
    centre = np.zeros((g, g), dtype=bool)
    c0 = (g - 2) // 2
    centre[c0 : c0 + 2, c0 : c0 + 2] = True
    return ring, centre


def illumination(images: np.ndarray) -> float | np.ndarray:
    """Border / centre brightness ratio of the cell; illumination non-uniformity (darker edges) lowers it.

    The cell inside a 5 % margin (the dark cell edge) is cut into an 8 x 8 grid of blocks; each block's brightness is
    the 75th percentile of its pixels, which ignores the dark busbars, fingers and cracks that cross it (they cover
    well under a quarter of a block) and is barely moved by pixel noise. The value is the median brightness of the
    border blocks (the outer ring without its four corner blocks, so the chamfered corners of mono cells do not
    count) over the median of the four centre blocks. A ratio: gain, blur and sensor noise leave it unchanged
    (measured on ELPV: under 0.05 sd), while a border 30 % darker than the centre moves it by -2.8 sd on mono and
    -1.9 sd on poly cells, and radial vignetting of 0.4 at the corners by -2.4 / -1.6 sd.
    """
    x, single = _prepare(images)
    n, h, w = x.shape
    g = ILLUMINATION_GRID
    m = int(round(0.05 * min(h, w)))
    bh, bw = (h - 2 * m) // g, (w - 2 * m) // g
    if bh < 2 or bw < 2:
        raise ValueError(f"images of {h} x {w} px are too small for the illumination channel's {g} x {g} grid")
    blocks = x[:, m : m + bh * g, m : m + bw * g].reshape(n, g, bh, g, bw).transpose(0, 1, 3, 2, 4)
    level = np.percentile(blocks.reshape(n, g, g, bh * bw), ILLUMINATION_PERCENTILE, axis=3)
    ring, centre = _illumination_masks(g)
    border = np.median(level[:, ring], axis=1)
    middle = np.median(level[:, centre], axis=1)
    return _out(border / np.maximum(middle, 1e-3), single)


# ---------------------------------------------------------------------------------------------- texture


def sharpness(images: np.ndarray) -> float | np.ndarray:
    """Variance of the Laplacian relative to the squared mean intensity, after a light pre-blur; blur lowers it.

    ``var(Laplacian(blur(x))) / mean(x)**2 * 1e3``. Dividing by the squared mean makes it gain-invariant (a
    Laplacian scales with the intensity), so a gain change does not read as a focus change; the pre-blur (binomial,
    sigma 0.7 px) keeps pixel noise from dominating.
    """
    x, single = _prepare(images)
    var = _laplacian(_binomial(x, 1)).var(axis=(1, 2))
    mean = np.maximum(x.mean(axis=(1, 2)), 1e-3)
    return _out(var / (mean * mean) * 1e3, single)


def noise_level(images: np.ndarray) -> float | np.ndarray:
    """Pixel-noise sigma, fraction of full scale (Immerkaer 1996, "Fast noise variance estimation").

    The image is filtered with the 3x3 kernel [[1, -2, 1], [-2, 4, -2], [1, -2, 1]] (the outer product of two second
    differences), which cancels constant, linear and most edge structure (its gain on white noise is 6); sigma = sqrt(pi / 2) * mean |response| / 6. The mean (not a median) keeps the estimate continuous on
    8-bit images whose clean response is mostly 0 or 1 grey level; edges, busbars and cracks add a small, stable
    floor that the noise fault rises far above.
    """
    x, single = _prepare(images)
    return _out(np.sqrt(np.pi / 2.0) * _immerkaer_mean_abs(x) / 6.0, single)


def _immerkaer_mean_abs(x: np.ndarray) -> np.ndarray:
    """Mean |response| of the Immerkaer 3x3 filter per image of an (N, H, W) stack, valid region only."""
    d2 = x[:, :-2] - 2.0 * x[:, 1:-1] + x[:, 2:]
    resp = d2[:, :, :-2] - 2.0 * d2[:, :, 1:-1] + d2[:, :, 2:]  # (N, H-2, W-2)
    return np.abs(resp).mean(axis=(1, 2))


def detail_ratio(images: np.ndarray) -> float | np.ndarray:
    """Finest-scale detail relative to the next octave: Immerkaer response at full resolution / at half resolution.

    On continuous images both responses scale with gain and the ratio does not; on 8-bit images the quantisation
    noise of the finest octave does not scale, so gain x0.9 moves it by +0.5 reference sd. Lot-to-lot it varies
    little (sd of lot means 0.8 reference sd on ELPV). Defocus changes the balance of the two octaves: a 1 px blur
    moves it by +2.7 reference sd on 300 px ELPV cells (the pre-blurred ``sharpness``: -0.5 sd); sensor noise
    raises it much more.
    """
    x, single = _prepare(images)
    x = x.astype(np.float64)
    h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    half = x[:, :h, :w].reshape(len(x), h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    return _out(_immerkaer_mean_abs(x) / np.maximum(_immerkaer_mean_abs(half), 1e-9), single)


def crack_fraction(
    images: np.ndarray, depth: float = CRACK_DEPTH, size: int = CRACK_SIZE
) -> float | np.ndarray:
    """Share of thin, dark, line-like pixels (micro-cracks and finger interruptions).

    Black top-hat (grey closing minus image) with a ``size`` x ``size`` square after a sigma-1 Gaussian: pixels in
    a dark structure narrower than ``size`` whose depth exceeds ``depth`` (fraction of full scale) count. Busbars
    are wider than ``size`` and do not count; the Gaussian keeps single-pixel noise out.
    """
    if size < 3:
        raise ValueError(f"size must be >= 3 pixels, got {size}")
    x, single = _prepare(images)
    sm = ndimage.gaussian_filter(x, sigma=(0, 1.0, 1.0))
    tophat = ndimage.grey_closing(sm, size=(1, size, size)) - sm
    return _out((tophat[:, 2:-2, 2:-2] > depth).mean(axis=(1, 2)), single)


# ---------------------------------------------------------------------------------------------- geometry


def rotation_deg(images: np.ndarray) -> float | np.ndarray:
    """Rotation of the cell's busbar / edge grid away from the image axes, in degrees, in (-45, 45].

    The gradient orientations of the strongest edges (busbars and cell borders are all horizontal or vertical on an
    aligned cell) are averaged in the *quadrupled*-angle representation, so horizontal and vertical edges agree and
    the mean angle is the grid rotation modulo 90 degrees. Sign convention: ``scipy.ndimage.rotate(img, a)`` with a
    small positive ``a`` gives a positive value.
    """
    x, single = _prepare(images)
    # 2x2 mean-pool first (4x less work; the busbar grid is far coarser than 2 px), then a light blur.
    n, h, w = x.shape
    pooled = x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    sm = ndimage.gaussian_filter(pooled, sigma=(0, 0.75, 0.75))
    gy, gx = _sobel(sm)
    gy, gx = gy[:, 1:-1, 1:-1], gx[:, 1:-1, 1:-1]
    # With g = gx + i*gy: g**2 = a + i*b and g**4 = |g|**4 * exp(4i*theta). Summing g**4 averages the quadrupled
    # angle with weight |g|**4, which lets the strong busbar and border edges dominate the crystal texture without
    # a hard (tie-sensitive) edge threshold, and needs no trigonometry.
    a = (gx * gx - gy * gy).astype(np.float64)
    b = (2.0 * gx * gy).astype(np.float64)
    c = (a * a - b * b).sum(axis=(1, 2))
    s = (2.0 * a * b).sum(axis=(1, 2))
    # Row index grows downwards, so a counter-clockwise rotation of the picture turns gradients clockwise: negate.
    angle = -np.degrees(np.arctan2(s, c)) / 4.0
    return _out(angle, single)


def _bright_centroid(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid (row, col) offsets from the image centre of the bright cell area, in pixels."""
    n, h, w = x.shape
    # Half the 90th percentile separates the lit cell from the dark background, whatever the gain.
    thr = 0.5 * np.quantile(x.reshape(n, -1)[:, ::7], 0.9, axis=1)[:, None, None]
    mask = (x > thr).astype(np.float32)
    total = np.maximum(mask.sum(axis=(1, 2)), 1.0)
    rows = np.arange(h, dtype=np.float32) - (h - 1) / 2.0
    cols = np.arange(w, dtype=np.float32) - (w - 1) / 2.0
    dy = (mask.sum(axis=2) * rows).sum(axis=1) / total
    dx = (mask.sum(axis=1) * cols).sum(axis=1) / total
    return dy, dx


def offset_x(images: np.ndarray) -> float | np.ndarray:
    """Horizontal offset of the bright cell area's centroid from the image centre, pixels (+ = right)."""
    x, single = _prepare(images)
    return _out(_bright_centroid(x)[1], single)


def offset_y(images: np.ndarray) -> float | np.ndarray:
    """Vertical offset of the bright cell area's centroid from the image centre, pixels (+ = down)."""
    x, single = _prepare(images)
    return _out(_bright_centroid(x)[0], single)


def offset_px(images: np.ndarray) -> float | np.ndarray:
    """Distance of the bright cell area's centroid from the image centre, pixels."""
    x, single = _prepare(images)
    dy, dx = _bright_centroid(x)
    return _out(np.hypot(dy, dx), single)


# ---------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Property:
    """A registered image property.

    Attributes:
        name: column name in :func:`measure` output.
        fn: ``fn(images (N, H, W)) -> (N,)`` (a single ``(H, W)`` image gives a float).
        label: human label used in axis descriptions ("brightness").
        unit: unit of the value.
    """

    name: str
    fn: Callable[[np.ndarray], float | np.ndarray]
    label: str
    unit: str


PROPERTIES: dict[str, Property] = {
    p.name: p
    for p in (
        Property("mean_intensity", mean_intensity, "brightness", "fraction of full scale"),
        Property("contrast", contrast, "contrast", "fraction of full scale (std)"),
        Property("sharpness", sharpness, "sharpness", "Laplacian variance / mean intensity^2 x 1e3"),
        Property("noise_level", noise_level, "noise level", "fraction of full scale (sigma)"),
        Property("detail_ratio", detail_ratio, "fine-detail ratio", "full / half resolution detail"),
        Property("dark_fraction", dark_fraction, "dark-area fraction", "fraction of pixels"),
        Property("crack_fraction", crack_fraction, "crack-like dark lines", "fraction of pixels"),
        Property("rotation_deg", rotation_deg, "rotation", "degrees"),
        Property("offset_x", offset_x, "horizontal offset", "pixels"),
        Property("offset_y", offset_y, "vertical offset", "pixels"),
        Property("offset_px", offset_px, "offset", "pixels"),
        Property("vignetting", vignetting, "corner darkening (vignetting)", "corner / centre ratio"),
        Property("illumination", illumination, "illumination non-uniformity",
                 "border / centre brightness ratio (75th percentiles of 8 x 8 blocks)"),
    )
}

#: Which properties a simulated line fault moves (used to check that an axis card names the fault's property).
FAULT_PROPERTIES: dict[str, tuple[str, ...]] = {
    "gain": ("mean_intensity", "contrast", "dark_fraction"),
    "blur": ("sharpness", "detail_ratio"),
    "noise": ("noise_level", "detail_ratio"),
    "misalign": ("rotation_deg", "offset_x", "offset_y", "offset_px"),
    "vignetting": ("vignetting", "illumination"),
    "illumination": ("illumination", "vignetting"),
    "defect_rate": ("crack_fraction", "dark_fraction", "contrast"),
    # mono vs poly: poly texture raises contrast, mono's chamfered corners lower the corner/centre ratio.
    "product_mix": ("contrast", "dark_fraction", "vignetting", "crack_fraction"),
}
"""Keys are the fault kinds of :data:`pipeline.line.faults.FAULTS`."""


def channel_table(table: pd.DataFrame, channels: Sequence[str]) -> pd.DataFrame:
    """The columns ``channels`` of an image-property table, in that order (the drift test's and the chart's view).

    Raises:
        ValueError: a channel the table does not hold (named, with the table's columns).
    """
    missing = [c for c in channels if c not in table.columns]
    if missing:
        raise ValueError(f"the image-property table has no {missing} (columns: {list(table.columns)}); measure "
                         "them with pipeline.latent.properties.measure_each")
    return table[list(channels)]


def measure_each(images: Sequence[np.ndarray], properties: Sequence[str] | None = None) -> pd.DataFrame:
    """:func:`measure` image by image, for images that may differ in size (e.g. as read from a folder).

    Each image is squeezed to (H, W) first (a trailing channel axis of 1 from ``read_images`` goes away).
    """
    names = list(PROPERTIES) if properties is None else list(properties)
    if not len(images):
        return pd.DataFrame(columns=names, dtype=np.float64)
    return pd.concat([measure(np.asarray(im).squeeze()[None], names) for im in images], ignore_index=True)


QUALITY_CHANNELS: tuple[str, ...] = ("detail_ratio", "noise_level", "rotation_deg", "illumination")
"""Full-resolution image-quality channels the drift monitor tests next to the latents. Blur and sensor noise are
averaged away when an image is shrunk to the model's 32-64 px, a 2 degree rotation is a fraction of a pixel there,
and a darker border is mixed with the cell's own brightness in the latents; measured on 300 px ELPV cells (reference
sd units, lot-to-lot sd of lot means in brackets): blur 1 px moves ``detail_ratio`` +2.7 (0.8), noise 3 % moves
``noise_level`` +41 (1.0), misalignment 2 deg moves ``rotation_deg`` +8.4 (0.4), a border 30 % darker moves
``illumination`` -2.8 on mono and -1.9 on poly cells (0.35 / 0.46), where gain, blur and noise move it by under
0.05."""


CHART_CHANNELS: tuple[str, ...] = ("mean_intensity", "contrast", "sharpness", "noise_level", "detail_ratio",
                                   "dark_fraction", "rotation_deg", "offset_x", "offset_y", "vignetting",
                                   "illumination")
"""Image properties whose window means the control chart follows (``pipeline.monitoring.charts``): a persistent
shift of any of them (a camera gain x0.9 moves ``mean_intensity`` by less than lot-to-lot variation does) builds up
over windows."""
MONITOR_CHANNELS: tuple[str, ...] = tuple(dict.fromkeys(QUALITY_CHANNELS + CHART_CHANNELS))
"""Every image property the monitor measures once per image (the drift test's and the chart's)."""


def measure(
    images: np.ndarray | Sequence[np.ndarray],
    properties: Sequence[str] | None = None,
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> pd.DataFrame:
    """Measure image properties on a stack of images.

    Args:
        images: ``(N, H, W)`` array or a sequence of ``(H, W)`` arrays of one shape (uint8, uint16 or float in [0, 1]).
        properties: names from :data:`PROPERTIES` (default: all, in registry order).
        batch_size: images per vectorised chunk (bounds memory: ~15 float32 copies of a chunk).
        progress: show a tqdm bar (also off when stderr is not a TTY).

    Returns:
        DataFrame with one row per image (index 0..N-1) and one float column per property.

    Raises:
        ValueError: for an unknown property name or a bad image stack.
    """
    names = list(PROPERTIES) if properties is None else list(properties)
    unknown = [n for n in names if n not in PROPERTIES]
    if unknown:
        raise ValueError(f"unknown properties {unknown}; known: {sorted(PROPERTIES)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(images, np.ndarray):
        stack = images if images.ndim == 3 else to_unit_float(images)
    else:
        stack = (
            np.stack([np.asarray(im) for im in images]) if len(images) else np.zeros((0, 16, 16), np.uint8)
        )
    if stack.ndim != 3:
        raise ValueError(f"expected an (N, H, W) stack, got shape {stack.shape}")
    n = len(stack)
    cols: dict[str, list[np.ndarray]] = {name: [] for name in names}
    starts = range(0, n, batch_size)
    if progress:
        import sys

        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="properties", unit="batch", disable=not sys.stderr.isatty())
    for s in starts:
        chunk = to_unit_float(
            stack[s : s + batch_size]
        )  # convert once, every property reuses the float stack
        for name in names:
            cols[name].append(np.asarray(PROPERTIES[name].fn(chunk), dtype=np.float64).reshape(-1))
    data = {name: (np.concatenate(v) if v else np.zeros(0)) for name, v in cols.items()}
    return pd.DataFrame(data, columns=names)
