"""Image properties move in the right direction under the matching change (real ELPV cells, numpy/scipy changes)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from pipeline.latent import properties as P

IDX = [1, 300, 700, 1200, 1800, 2400]  # a few mono and poly cells spread over the set


@pytest.fixture(scope="module")
def cells() -> np.ndarray:
    from elpv_dataset.utils import load_dataset

    images, _, _ = load_dataset()
    return np.ascontiguousarray(images[IDX])


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _f(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32)


def test_gain_moves_brightness_contrast_and_dark_fraction(cells: np.ndarray) -> None:
    up, down = _u8(_f(cells) * 1.25), _u8(_f(cells) * 0.6)
    assert np.all(P.mean_intensity(up) > P.mean_intensity(cells) + 0.02)
    assert np.all(P.mean_intensity(down) < P.mean_intensity(cells) - 0.05)
    assert np.all(P.contrast(up) > P.contrast(cells))
    assert np.all(P.dark_fraction(down) > P.dark_fraction(cells))


def test_blur_lowers_sharpness(cells: np.ndarray) -> None:
    blurred = _u8(ndimage.gaussian_filter(_f(cells), sigma=(0, 1.5, 1.5)))
    assert np.all(P.sharpness(blurred) < 0.7 * P.sharpness(cells))
    # ...and a gain change is not a focus change
    np.testing.assert_allclose(P.sharpness(_u8(_f(cells) * 0.75)), P.sharpness(cells), rtol=0.1)


def test_noise_raises_noise_level(cells: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    noisy = _u8(_f(cells) + rng.normal(0.0, 6.0, cells.shape))
    base = P.noise_level(cells)
    assert np.all(P.noise_level(noisy) > base + 0.01)
    # ...and is measured on the fixed full range: sigma 6 grey levels is about 6 / 255
    assert np.allclose(P.noise_level(noisy) - base, 6 / 255, atol=0.01)


@pytest.mark.parametrize("angle", [-6.0, -3.0, 3.0, 6.0])
def test_rotation_is_measured_with_sign(cells: np.ndarray, angle: float) -> None:
    rotated = _u8(ndimage.rotate(_f(cells), angle, axes=(1, 2), reshape=False, order=1))
    delta = P.rotation_deg(rotated) - P.rotation_deg(cells)
    np.testing.assert_allclose(delta, angle, atol=1.0)


def test_rotation_of_a_synthetic_bar_grid() -> None:
    img = np.full((200, 200), 180.0, np.float32)
    for r in (50, 100, 150):
        img[r - 4 : r + 4] = 60.0
    img[:, :6] = img[:, -6:] = 20.0
    assert abs(P.rotation_deg(_u8(img))) < 0.5
    for angle in (-8.0, 4.0, 10.0):
        rot = _u8(ndimage.rotate(img, angle, reshape=False, order=1, cval=20.0))
        assert P.rotation_deg(rot) == pytest.approx(angle, abs=1.0)


def test_offset_follows_a_shift(cells: np.ndarray) -> None:
    right = _u8(ndimage.shift(_f(cells), (0, 0, 12), order=1))
    down = _u8(ndimage.shift(_f(cells), (0, 10, 0), order=1))
    dx = P.offset_x(right) - P.offset_x(cells)
    dy = P.offset_y(down) - P.offset_y(cells)
    assert np.all(dx > 6) and np.all(np.abs(P.offset_y(right) - P.offset_y(cells)) < 2)
    assert np.all(dy > 5)
    centred = np.zeros((100, 100), np.uint8)
    centred[20:80, 20:80] = 200
    moved = np.roll(centred, (6, 8), axis=(0, 1))
    assert P.offset_px(centred) < 0.6
    assert P.offset_px(moved) == pytest.approx(10.0, abs=0.6)


def test_vignetting_lowers_corner_ratio(cells: np.ndarray) -> None:
    yy, xx = np.mgrid[:300, :300]
    r2 = ((yy - 149.5) ** 2 + (xx - 149.5) ** 2) / (2 * 149.5**2)
    vig = _u8(_f(cells) * (1 - 0.4 * r2))
    assert np.all(P.vignetting(vig) < P.vignetting(cells) - 0.1)
    # a global gain does not look like vignetting
    np.testing.assert_allclose(P.vignetting(_u8(_f(cells) * 0.8)), P.vignetting(cells), atol=0.02)


def test_drawn_dark_line_counts_as_crack(cells: np.ndarray) -> None:
    cracked = cells.copy()
    rows = np.arange(40, 260)
    cols = (40 + 0.8 * rows).astype(int)
    for dc in (-1, 0, 1):
        cracked[:, rows, cols + dc] = 25
    delta = P.crack_fraction(cracked) - P.crack_fraction(cells)
    assert np.all(delta > 0.004)  # the line is ~3 px x 220 px of 90,000 px = 0.7 %


def test_wide_busbars_are_not_cracks() -> None:
    img = np.full((200, 200), 180, np.uint8)
    for r in (50, 100, 150):
        img[r - 5 : r + 5] = 60  # 10 px wide bars, like ELPV busbars
    assert P.crack_fraction(img) < 1e-3
    img[:, 30:32] = 40  # a 2 px dark line
    assert P.crack_fraction(img) > 0.005


def test_measure_frame_and_bit_depth_invariance(cells: np.ndarray) -> None:
    df = P.measure(cells)
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == list(P.PROPERTIES)
    assert len(df) == len(cells) and np.isfinite(df.to_numpy()).all()
    df16 = P.measure(cells.astype(np.uint16) * 257, batch_size=4)
    np.testing.assert_allclose(df16.to_numpy(), df.to_numpy(), rtol=1e-3, atol=1e-4)
    # no leakage across the sample axis: one image at a time gives the same rows
    np.testing.assert_allclose(P.measure(cells, batch_size=1).to_numpy(), df.to_numpy(), rtol=1e-4, atol=1e-6)
    # a single image gives floats equal to the stack's row
    assert P.mean_intensity(cells[0]) == pytest.approx(df.loc[0, "mean_intensity"])
    sub = P.measure(list(cells[:2]), properties=["sharpness", "rotation_deg"])
    assert list(sub.columns) == ["sharpness", "rotation_deg"] and len(sub) == 2


def test_registry_labels_and_fault_map() -> None:
    assert P.PROPERTIES["mean_intensity"].label == "brightness"
    for fault, props in P.FAULT_PROPERTIES.items():
        assert props and all(p in P.PROPERTIES for p in props), fault
    from pipeline.line.faults import FAULTS

    assert set(FAULTS) == set(P.FAULT_PROPERTIES)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((2, 3, 30, 30), np.uint8), "grayscale"),
        (np.zeros((30, 30), np.int32), "dtype"),
        (np.zeros((8, 8), np.uint8), "16x16"),
    ],
)
def test_bad_input_raises(bad: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        P.mean_intensity(bad)


def test_unknown_property_raises(cells: np.ndarray) -> None:
    with pytest.raises(ValueError, match="unknown properties"):
        P.measure(cells, properties=["brightness"])


def test_detail_ratio_sees_a_one_pixel_blur_and_noise(cells: np.ndarray) -> None:
    base = P.detail_ratio(cells)
    blurred = _u8(ndimage.gaussian_filter(_f(cells), sigma=(0, 1.0, 1.0)))
    assert np.all(P.detail_ratio(blurred) > 1.05 * base)  # 1 px at 300 px: invisible at the model's 32-64 px
    noisy = _u8(_f(cells) + np.random.default_rng(1).normal(0.0, 6.0, cells.shape))
    assert np.all(P.detail_ratio(noisy) > 1.5 * base)
    assert P.detail_ratio(cells[0]) == pytest.approx(base[0])  # one image gives a float
    assert "detail_ratio" in P.QUALITY_CHANNELS and set(P.QUALITY_CHANNELS) <= set(P.PROPERTIES)


def test_illumination_channel_sees_a_darker_border_and_nothing_else(cells: np.ndarray) -> None:
    from pipeline.line.faults import blur, gain, illumination, noise, vignetting

    base = P.illumination(cells)
    assert np.all((base > 0.6) & (base < 1.5))
    dark = P.illumination(np.stack([illumination(c, 0.3) for c in cells]))
    vig = P.illumination(np.stack([vignetting(c, 0.4) for c in cells]))
    assert np.all(dark < base - 0.12) and np.all(vig < base - 0.08)
    rng = np.random.default_rng(0)
    for other in (np.stack([gain(c, 0.75) for c in cells]), np.stack([blur(c, 1.5) for c in cells]),
                  np.stack([noise(c, 0.03, rng) for c in cells])):
        assert np.allclose(P.illumination(other), base, atol=0.03)
    assert "illumination" in P.QUALITY_CHANNELS and P.PROPERTIES["illumination"].label == "illumination non-uniformity"


def test_illumination_channel_ignores_busbars_and_cracks() -> None:
    img = np.full((300, 300), 150, np.uint8)
    lined = img.copy()
    lined[:, 95:105] = 30  # two vertical busbars through border and centre blocks alike
    lined[:, 195:205] = 30
    lined[40:42, 20:280] = 20  # a crack through the top border blocks
    assert P.illumination(lined) == pytest.approx(P.illumination(img), abs=0.01)


def test_channel_table_keeps_the_order_and_names_a_missing_channel():
    table = pd.DataFrame({c: [float(i)] for i, c in enumerate(reversed(P.MONITOR_CHANNELS))})
    assert list(P.channel_table(table, P.QUALITY_CHANNELS).columns) == list(P.QUALITY_CHANNELS)
    assert list(P.channel_table(table, P.CHART_CHANNELS).columns) == list(P.CHART_CHANNELS)
    with pytest.raises(ValueError, match="illumination"):
        P.channel_table(table.drop(columns="illumination"), P.CHART_CHANNELS)
