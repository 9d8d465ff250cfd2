"""Tests for pipeline.line.faults: each fault moves images in its stated direction by its stated amount."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pipeline.line import faults
from pipeline.line.elpv import load_elpv, pool_indices
from pipeline.line.faults import (
    FAULTS,
    IMAGE_FAULTS,
    MISALIGN_OFFSET_PX_PER_DEGREE,
    POPULATION_FAULTS,
    FaultSpec,
    apply_fault,
    blur,
    gain,
    misalign,
    noise,
    severity_at,
    vignetting,
)


@pytest.fixture(scope="module")
def cells():
    """Twelve real ELPV cells (calibration pool, mixed types and defect levels)."""
    data = load_elpv()
    idx = pool_indices("calibration")[::45][:12]
    return [data.images[i] for i in idx]


def laplacian_var(img: np.ndarray) -> float:
    return float(ndimage.laplace(img.astype(np.float64)).var())


def blob(row: float, col: float, size: int = 300) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (200 * np.exp(-((yy - row) ** 2 + (xx - col) ** 2) / (2 * 8.0**2))).astype(np.uint8)


def centroid(img: np.ndarray) -> np.ndarray:
    return np.array(ndimage.center_of_mass(img.astype(np.float64)))


@pytest.mark.parametrize("factor", [0.9, 0.75, 1.1])
def test_gain_scales_mean_by_factor_on_real_cells(cells, factor):
    for img in cells:
        saturated = np.mean(img.astype(np.float64) * factor > 254.5)
        if saturated > 0.001:
            continue
        ratio = gain(img, factor).mean() / img.mean()
        assert ratio == pytest.approx(factor, abs=0.005)


def test_gain_clips_and_keeps_dtype():
    img = np.full((10, 10), 200, np.uint8)
    out = gain(img, 2.0)
    assert out.dtype == np.uint8 and out.max() == 255
    img16 = np.full((10, 10), 40000, np.uint16)
    assert gain(img16, 0.5).dtype == np.uint16 and gain(img16, 0.5)[0, 0] == 20000
    with pytest.raises(ValueError, match="factor"):
        gain(img, 0.0)


def test_blur_lowers_sharpness_monotonically(cells):
    for img in cells[:4]:
        s0, s1, s2 = laplacian_var(img), laplacian_var(blur(img, 0.75)), laplacian_var(blur(img, 1.5))
        assert s0 > s1 > s2
        assert s2 < 0.6 * s0
        assert abs(blur(img, 1.5).mean() - img.mean()) < 1.0  # blur keeps intensity
    assert np.array_equal(blur(cells[0], 0.0), cells[0])


def test_noise_has_stated_sigma_and_raises_high_frequency_energy(cells):
    flat = np.full((300, 300), 128, np.uint8)
    out = noise(flat, 0.03, np.random.default_rng(0))
    assert np.std(out.astype(float) - 128) == pytest.approx(0.03 * 255, rel=0.03)
    assert abs(out.mean() - 128) < 0.1
    img = cells[0]
    assert laplacian_var(noise(img, 0.03, np.random.default_rng(1))) > 1.5 * laplacian_var(img)
    a = noise(img, 0.03, np.random.default_rng(7))
    b = noise(img, 0.03, np.random.default_rng(7))
    assert np.array_equal(a, b)


def test_misalign_shift_moves_centroid_by_offset():
    img = blob(150, 150)
    c0 = centroid(img)
    moved = centroid(misalign(img, 0.0, 12.0, offset_y_px=-5.0))
    assert moved - c0 == pytest.approx([-5.0, 12.0], abs=0.2)


def test_misalign_rotates_counter_clockwise_about_centre():
    img = blob(149.5, 229.5)  # 80 px right of the centre
    rotated = centroid(misalign(img, 90.0, 0.0))
    assert rotated == pytest.approx([69.5, 149.5], abs=0.5)  # now 80 px above the centre
    small = centroid(misalign(img, 5.0, 0.0))
    angle = np.degrees(np.arctan2(-(small[0] - 149.5), small[1] - 149.5))
    assert angle == pytest.approx(5.0, abs=0.2)


def test_misalign_fills_uncovered_edges_with_dark_background():
    img = np.full((300, 300), 180, np.uint8)
    out = misalign(img, 4.0, 12.0)
    assert out[140:160, :10].max() == 0  # shifted right: the left strip is uncovered
    assert out[0, 299] == 0 or out[299, 299] == 0  # rotated corners uncovered
    assert out[150, 150] == 180


def test_vignetting_darkens_corners_relative_to_centre():
    img = np.full((300, 300), 200, np.uint8)
    out = vignetting(img, 0.4)
    assert out[150, 150] >= 199
    assert out[0, 0] == pytest.approx(200 * 0.6, abs=1)
    assert out[0, 150] > out[0, 0]  # monotone radial falloff
    with pytest.raises(ValueError, match="strength"):
        vignetting(img, 1.0)


def test_vignetting_on_real_cells(cells):
    for img in cells[:4]:
        out = vignetting(img, 0.4).astype(float) / np.maximum(img.astype(float), 1)
        centre, corner = out[130:170, 130:170], out[:30, :30]
        assert corner[img[:30, :30] > 20].mean() < centre[img[130:170, 130:170] > 20].mean() - 0.25


def test_registry_mapping_and_stories():
    assert set(FAULTS) == {"gain", "blur", "noise", "misalign", "vignetting", "illumination", "product_mix",
                           "defect_rate"}
    assert set(POPULATION_FAULTS) == {"product_mix", "defect_rate"}
    for kind, info in FAULTS.items():
        assert info.kind == kind and info.parameter and info.unit and len(info.story) > 20
        assert info.value(0.0) == pytest.approx(info.neutral)
    assert FAULTS["gain"].value(0.4) == pytest.approx(0.9)
    assert FAULTS["gain"].value(1.0) == pytest.approx(0.75)
    assert FAULTS["blur"].value(1.0) == pytest.approx(1.5)
    assert FAULTS["defect_rate"].value(1.0, baseline=0.2) == pytest.approx(0.5)
    assert FAULTS["product_mix"].value(3.0, baseline=0.5) == 1.0  # shares are clipped


def test_apply_fault_matches_image_functions(cells):
    img = cells[1]
    rng = np.random.default_rng(0)
    assert np.array_equal(apply_fault(img, "gain", 0.4, rng), gain(img, 0.9))
    assert np.array_equal(apply_fault(img, "blur", 1.0, rng), blur(img, 1.5))
    assert np.array_equal(
        apply_fault(img, "misalign", 1.0, rng), misalign(img, 2.0, 2.0 * MISALIGN_OFFSET_PX_PER_DEGREE)
    )
    assert np.array_equal(apply_fault(img, "vignetting", 1.0, rng), vignetting(img, 0.4))
    for kind in IMAGE_FAULTS:
        assert np.array_equal(apply_fault(img, kind, 0.0, rng), img)
        assert not np.array_equal(apply_fault(img, kind, 1.0, rng), img)
    for kind in POPULATION_FAULTS:
        assert np.array_equal(apply_fault(img, kind, 1.0, rng), img)


@pytest.mark.parametrize(
    ("kind", "severity", "rng", "match"),
    [
        ("smudge", 1.0, None, "unknown fault"),
        ("blur", -1.0, None, "severity >= 0"),
        ("noise", 1.0, None, "random generator"),
        ("gain", 5.0, None, "factor"),
    ],
)
def test_apply_fault_bad_arguments(cells, kind, severity, rng, match):
    with pytest.raises(ValueError, match=match):
        apply_fault(cells[0], kind, severity, rng)


def test_image_checks():
    with pytest.raises(ValueError, match="single-channel"):
        gain(np.zeros((4, 4, 3), np.uint8), 0.9)
    with pytest.raises(ValueError, match="unsigned-integer"):
        gain(np.zeros((4, 4), np.float32), 0.9)


def test_severity_ramp():
    assert severity_at(1.9, 2, 0, 0.8) == 0.0
    assert severity_at(2.0, 2, 0, 0.8) == 0.8  # sudden
    assert severity_at(7.5, 2, 0, 0.8) == 0.8
    assert severity_at(2.0, 2, 4, 0.8) == 0.0  # gradual: starts at 0 ...
    assert severity_at(3.0, 2, 4, 0.8) == pytest.approx(0.2)
    assert severity_at(4.0, 2, 4, 0.8) == pytest.approx(0.4)
    assert severity_at(6.0, 2, 4, 0.8) == pytest.approx(0.8)  # ... full after ramp_days
    assert severity_at(9.0, 2, 4, 0.8) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="ramp_days"):
        severity_at(1.0, 0, -1, 1.0)


def test_fault_spec_validation():
    spec = FaultSpec("blur", start_day=1, severity=1.0, ramp_days=2)
    assert spec.severity_at(2.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown fault"):
        FaultSpec("dust")
    with pytest.raises(ValueError, match="start day"):
        FaultSpec("blur", start_day=-1)
    with pytest.raises(ValueError, match="ramp"):
        FaultSpec("blur", ramp_days=-1)
    with pytest.raises(ValueError, match="severity"):
        FaultSpec("vignetting", severity=3.0)
    assert FaultSpec("gain", severity=-0.4).severity == -0.4  # gain rise is allowed


def test_illumination_darkens_the_whole_border_not_only_the_corners():
    from pipeline.line.faults import illumination

    img = np.full((101, 101), 200, np.uint8)
    out = illumination(img, 0.3).astype(float)
    assert out[50, 50] == 200 and out[50, 0] == pytest.approx(140, abs=1) and out[0, 0] == pytest.approx(140, abs=1)
    assert out[25, 50] == pytest.approx(200 * (1 - 0.3 * 0.25), abs=1)
    vig = vignetting(img, 0.3).astype(float)
    assert vig[50, 0] > out[50, 0] + 20  # the radial law spares the edge middles
    assert np.array_equal(apply_fault(img, "illumination", 1.0, None), out.astype(np.uint8))
    with pytest.raises(ValueError, match="severity < "):
        FaultSpec("illumination", severity=4.0)


def test_fault_duration_repairs_the_line():
    spec = FaultSpec("blur", start_day=2, severity=1.0, duration_days=3)
    assert [spec.severity_at(d) for d in (1.9, 2.0, 4.99, 5.0, 9)] == [0, 1, 1, 0, 0]
    assert spec.end_day == 5 and FaultSpec("blur", start_day=2).end_day is None
    assert spec.overlaps(FaultSpec("noise", start_day=4, lines=("L2",)))
    assert not spec.overlaps(FaultSpec("noise", start_day=5))
    assert not FaultSpec("gain", lines=("L1",)).overlaps(FaultSpec("gain", lines=("L2",)))
    with pytest.raises(ValueError, match="duration"):
        FaultSpec("blur", duration_days=0)


def test_apply_value_takes_the_physical_parameter_and_apply_fault_maps_severity_onto_it():
    img = np.full((20, 20), 200, np.uint8)
    assert faults.apply_value(img, "gain", 0.9).mean() == pytest.approx(180, abs=1)
    for kind in ("gain", "blur", "misalign", "vignetting"):
        v = faults.get_fault(kind).value(0.4)
        assert np.array_equal(faults.apply_fault(img, kind, 0.4), faults.apply_value(img, kind, v))
    with pytest.raises(ValueError, match="population fault"):
        faults.apply_value(img, "defect_rate", 0.5)
    with pytest.raises(ValueError, match="random generator"):
        faults.apply_value(img, "noise", 0.03)
    with pytest.raises(ValueError, match="must be > 0"):
        faults.apply_value(img, "gain", 0.0)


def test_apply_to_capture_faults_the_scene_and_keeps_the_pixel_noise():
    from pipeline.latent.properties import noise_level

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:120, 0:120]
    scene = 120 + 60 * np.sin(xx / 9.0) * np.cos(yy / 13.0)
    capture = np.clip(np.rint(scene + rng.normal(0, 3, scene.shape)), 0, 255).astype(np.uint8)
    before = noise_level(capture)
    assert noise_level(faults.apply_value(capture, "blur", 1.0)) < 0.5 * before  # the noise smoothed away
    blurred = faults.apply_to_capture(capture, "blur", 1.0)
    assert blurred.dtype == np.uint8 and noise_level(blurred) == pytest.approx(before, rel=0.25)
    dim = faults.apply_to_capture(capture, "gain", 0.9)
    assert dim.mean() == pytest.approx(0.9 * capture.mean(), rel=0.01)
    assert noise_level(dim) == pytest.approx(before, rel=0.25)  # read noise is added after the gain
    noisy = faults.apply_to_capture(capture, "noise", 0.03, np.random.default_rng(1))
    assert noise_level(noisy) > 2 * before
