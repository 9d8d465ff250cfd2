import numpy as np
import pytest
import torch

from models import InfoDiffusionConfig, PreprocessSpec, check_model_input, get_preset, to_model_input
from models.preprocess import LUMA_WEIGHTS

SPEC = PreprocessSpec(image_size=16, channels=1, resample="area")


def test_uint8_and_uint16_use_fixed_full_range():
    a8 = np.full((32, 32), 255, np.uint8)
    a16 = np.full((32, 32), 65535 // 2 + 1, np.uint16)
    out = to_model_input([a8, a16], SPEC)
    assert out.shape == (2, 1, 16, 16) and out.dtype == torch.float32
    assert torch.allclose(out[0], torch.ones(1, 16, 16))
    assert torch.allclose(out[1], torch.zeros(1, 16, 16), atol=1e-4)
    # no per-image normalisation: a dark image stays dark
    dark = to_model_input(np.full((32, 32), 10, np.uint8), SPEC)
    assert dark.max().item() == pytest.approx(10 / 255 * 2 - 1, abs=1e-5)


def test_batch_array_and_mixed_sizes(elpv_cells_uint8):
    out = to_model_input(elpv_cells_uint8[:4], SPEC)
    assert out.shape == (4, 1, 16, 16) and out.min() >= -1 and out.max() <= 1
    mixed = to_model_input([elpv_cells_uint8[0], elpv_cells_uint8[1][:150, :150]], SPEC)
    assert mixed.shape == (2, 1, 16, 16)
    # area resampling of an exact 2x box equals the block means
    img = np.arange(64, dtype=np.uint8).reshape(8, 8)
    small = to_model_input(img, PreprocessSpec(image_size=4))
    expect = img.reshape(4, 2, 4, 2).mean(axis=(1, 3)) / 255 * 2 - 1
    assert np.allclose(small[0, 0].numpy(), expect, atol=1e-5)


@pytest.mark.parametrize("resample", ["bilinear", "bicubic", "area"])
def test_resample_modes_stay_in_range(resample, elpv_cells_uint8):
    out = to_model_input(elpv_cells_uint8[:2], PreprocessSpec(image_size=32, resample=resample))
    assert out.shape == (2, 1, 32, 32) and out.min() >= -1 and out.max() <= 1


def test_rgb_to_gray_uses_luma_weights():
    rgb = np.zeros((1, 8, 8, 3), np.uint8)
    rgb[..., 1] = 255
    out = to_model_input(rgb, PreprocessSpec(image_size=8))
    assert out.shape == (1, 1, 8, 8)
    assert out.mean().item() == pytest.approx(LUMA_WEIGHTS[1] * 2 - 1, abs=1e-5)
    gray3 = to_model_input(np.zeros((8, 8), np.uint8), PreprocessSpec(image_size=8, channels=3))
    assert gray3.shape == (1, 3, 8, 8)


def test_float_input_range():
    f = np.random.default_rng(0).random((8, 8)).astype(np.float32)
    assert to_model_input(f, PreprocessSpec(image_size=8)).shape == (1, 1, 8, 8)
    assert to_model_input(f * 2 - 1, PreprocessSpec(image_size=8), float_range=(-1, 1)).min() >= -1
    with pytest.raises(ValueError, match="float_range"):
        to_model_input(f * 255, PreprocessSpec(image_size=8))


@pytest.mark.parametrize(
    ("images", "match"),
    [
        ([], "empty"),
        (np.zeros((0, 8, 8), np.uint8), "empty"),
        ([np.full((8, 8), np.nan, np.float32)], "NaN"),
        ([np.zeros((8, 8, 4), np.uint8)], "alpha"),
        ([np.zeros((8, 8, 2), np.uint8)], "channels"),
        ([np.zeros((8, 8), np.int32)], "dtype"),
        ([np.zeros((2, 8, 8, 1, 1), np.uint8)], "shape"),
        ("not an image", "numpy"),
    ],
)
def test_bad_images_raise_clear_errors(images, match):
    with pytest.raises(ValueError, match=match):
        to_model_input(images, SPEC)


def test_check_model_input():
    cfg = get_preset("tiny").model
    ok = torch.zeros(2, 1, 16, 16)
    assert check_model_input(ok, cfg) is ok
    bad = {
        "empty": torch.zeros(0, 1, 16, 16),
        "NaN": torch.full((1, 1, 16, 16), float("nan")),
        r"\(C, H, W\)": torch.zeros(1, 3, 16, 16),
        "need": torch.zeros(1, 1, 32, 32),
        "float": torch.zeros(1, 1, 16, 16, dtype=torch.uint8),
        r"\[-1, 1\]": torch.full((1, 1, 16, 16), 255.0),
        "B, C, H, W": torch.zeros(1, 16, 16),
    }
    for match, x in bad.items():
        with pytest.raises(ValueError, match=match):
            check_model_input(x, cfg)
    with pytest.raises(ValueError, match="Tensor"):
        check_model_input(np.zeros((1, 1, 16, 16)), cfg)
    assert InfoDiffusionConfig().in_channels == 1
