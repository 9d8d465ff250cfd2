from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.common.images import (
    IMAGE_EXTENSIONS,
    find_images,
    load_batch,
    read_image,
    read_images,
    sha256_file,
)


def _save(arr: np.ndarray, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def test_read_8bit_gray_roundtrip(tmp_path, elpv_small):
    img = elpv_small.images[0]
    out = read_image(_save(img, tmp_path / "a.png"))
    assert out.dtype == np.uint8 and out.shape == (300, 300)
    np.testing.assert_array_equal(out, img)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_read_16bit_gray_keeps_depth(tmp_path, rng, suffix):
    img = rng.integers(0, 65536, size=(37, 53), dtype=np.uint16)
    out = read_image(_save(img, tmp_path / f"a{suffix}"))
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, img)


def test_read_32bit_int_in_range_becomes_uint16(tmp_path):
    img = (np.arange(20 * 30).reshape(20, 30) * 100).astype(np.int32)
    out = read_image(_save(img, tmp_path / "a.tif"))
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, img)


def test_read_32bit_int_out_of_range_raises(tmp_path):
    img = np.full((8, 8), 70000, dtype=np.int32)
    with pytest.raises(ValueError, match="outside"):
        read_image(_save(img, tmp_path / "a.tif"))


def test_read_rgb_converted_to_luma(tmp_path, rng):
    img = rng.integers(0, 256, size=(11, 17, 3), dtype=np.uint8)
    path = _save(img, tmp_path / "rgb.png")
    gray = read_image(path)
    assert gray.shape == (11, 17) and gray.dtype == np.uint8
    expected = img.astype(float) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(gray.astype(float) - expected).max() <= 1.0
    rgb = read_image(path, channels=3)
    np.testing.assert_array_equal(rgb, img)
    assert read_image(path, channels=None).shape == (11, 17, 3)


def test_read_rgba_and_gray_to_three_channels(tmp_path, rng):
    rgba = rng.integers(0, 256, size=(9, 9, 4), dtype=np.uint8)
    assert read_image(_save(rgba, tmp_path / "rgba.png")).shape == (9, 9)
    gray = rng.integers(0, 256, size=(9, 9), dtype=np.uint8)
    three = read_image(_save(gray, tmp_path / "g.png"), channels=3)
    assert three.shape == (9, 9, 3)
    np.testing.assert_array_equal(three[..., 1], gray)


@pytest.mark.parametrize("suffix", [".jpg", ".bmp", ".tiff"])
def test_read_other_formats(tmp_path, elpv_small, suffix):
    img = elpv_small.images[1][:63, :101]  # odd size
    out = read_image(_save(img, tmp_path / f"a{suffix}"))
    assert out.shape == (63, 101) and out.dtype == np.uint8
    if suffix != ".jpg":
        np.testing.assert_array_equal(out, img)


def test_read_float_image_rejected(tmp_path):
    with pytest.raises(ValueError, match="floating-point"):
        read_image(_save(np.zeros((4, 4), np.float32), tmp_path / "f.tif"))


def test_corrupt_file_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="broken.png"):
        read_image(bad)
    truncated = _save(np.zeros((50, 50), np.uint8), tmp_path / "trunc.png")
    truncated.write_bytes(truncated.read_bytes()[:40])
    with pytest.raises(ValueError, match="trunc.png"):
        read_image(truncated)


def test_missing_file_and_bad_channels(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ValueError, match="channels"):
        read_image(tmp_path / "nope.png", channels=2)


def test_find_images_recursive_sorted_case_insensitive(tmp_path):
    img = np.zeros((4, 4), np.uint8)
    for rel in ["b/2.PNG", "a/1.jpg", "a/sub/3.TIFF", "c.bmp", "x.jpeg", "t.tif"]:
        _save(img, tmp_path / rel)
    (tmp_path / "notes.txt").write_text("x")
    _save(img, tmp_path / ".hidden" / "h.png")
    _save(img, tmp_path / ".dot.png")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["a/1.jpg", "a/sub/3.TIFF", "b/2.PNG", "c.bmp", "t.tif", "x.jpeg"]
    assert set(IMAGE_EXTENSIONS) >= {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
    assert find_images(tmp_path / "c.bmp") == [tmp_path / "c.bmp"]


def test_find_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match="no images"):
        find_images(tmp_path / "empty")
    with pytest.raises(ValueError, match="not an image"):
        find_images(tmp_path / "empty" / "readme.txt")


def test_sha256_file(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc")
    assert sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_file(p, chunk_size=1) == sha256_file(p)


def test_read_images_threaded_keeps_order(image_dir, elpv_small):
    paths = find_images(image_dir)
    arrays = read_images(paths, workers=3)
    assert len(arrays) == len(elpv_small.images)
    for a, b in zip(arrays, elpv_small.images, strict=True):
        np.testing.assert_array_equal(a, b)


def test_load_batch_fixed_range_scaling(tmp_path):
    from models import PreprocessSpec

    spec = PreprocessSpec(image_size=8, channels=1)
    p8 = _save(np.full((20, 20), 255, np.uint8), tmp_path / "white8.png")
    p16 = _save(np.full((13, 31), 65535, np.uint16), tmp_path / "white16.png")
    p0 = _save(np.zeros((16, 16, 3), np.uint8), tmp_path / "black_rgb.png")
    x = load_batch([p8, p16, p0], spec)
    assert tuple(x.shape) == (3, 1, 8, 8)
    np.testing.assert_allclose(x[0].numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(x[1].numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(x[2].numpy(), -1.0, atol=1e-5)
    # a dim 16-bit image is not stretched (no per-image normalisation)
    pdim = _save(np.full((8, 8), 16384, np.uint16), tmp_path / "dim16.png")
    np.testing.assert_allclose(load_batch([pdim], spec).numpy(), 2 * 16384 / 65535 - 1, atol=1e-4)
    with pytest.raises(ValueError, match="empty"):
        load_batch([], spec)


# ------------------------------------------------------------------------------------------------ issue 14, items 7/11


def test_short_png_stream_is_refused_not_filled_with_black(tmp_path):
    from tests.pipeline.catalog import hostile as H

    p = H.write(tmp_path / "short.png", H.short_idat_png())
    with pytest.raises(ValueError, match="short.png.*ends early"):
        read_image(p)


def test_decompression_bomb_is_a_value_error_naming_the_file(tmp_path):
    from tests.pipeline.catalog import hostile as H

    p = H.write(tmp_path / "bomb.png", H.bomb_png())
    with pytest.raises(ValueError, match="bomb.png.*pixels"):
        read_image(p)


def test_png_with_bytes_after_iend_reads_like_the_image(tmp_path):
    from tests.pipeline.catalog import hostile as H

    p = H.write(tmp_path / "trailer.png", H.png_with_trailer(seed=3))
    np.testing.assert_array_equal(read_image(p), H.gray(3))
