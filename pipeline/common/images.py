"""Image files in, numpy arrays out: discovery, decoding, hashing and batching for the model.

Camera images arrive as 8-bit or 16-bit grayscale or colour files of any size. This module turns them into integer
numpy arrays **without touching their intensity scale** (no per-image normalisation: absolute intensity is signal);
scaling to [-1, 1] from the fixed full range of the bit depth and resizing happen in ``models.to_model_input``.

Supported on disk: PNG, JPEG, TIFF and BMP (``IMAGE_EXTENSIONS``, case-insensitive).

Decoding rules (``read_image``):

* 8-bit grayscale (``L``) → ``uint8`` (H, W).
* 16-bit grayscale (``I;16``, ``I;16B``, ``I;16L``) → ``uint16`` (H, W).
* 32-bit integer (``I``), as some TIFF/PNG writers store 16-bit data → ``uint16`` when every value fits in
  [0, 65535], else a ``ValueError``.
* Colour and palette images (``RGB``, ``RGBA``, ``LA``, ``P``, ``CMYK``, ...) → 8-bit, converted to grayscale with
  PIL's ITU-R 601-2 luma transform (``Image.convert("L")``) when one channel is asked for, or to ``RGB`` for three.
* Float images (``F``) and anything PIL cannot decode → ``ValueError`` naming the file.

Every file is decoded completely once by ``decode_image`` (the same function ingest validates with, so the catalog
holds exactly what training can read): headers over ``DEFAULT_MAX_PIXELS`` are refused before decoding, chunk
checksums are verified, and a PNG whose image stream holds fewer rows than its header claims is refused instead of
being padded with black.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import warnings
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:  # pragma: no cover
    import torch

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
"""File name suffixes treated as images (compared case-insensitively)."""

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_READ_WORKERS = 4


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` has an image suffix (``IMAGE_EXTENSIONS``, any case) and is not a hidden file."""
    p = Path(path)
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def find_images(root: str | os.PathLike[str]) -> list[Path]:
    """Find image files under ``root``, recursively, in sorted order.

    Hidden files and folders (names starting with ``.``) are skipped. A single image file is accepted too and
    returned as a one-element list.

    Args:
        root: A folder (searched recursively) or one image file.

    Returns:
        Sorted list of paths (sorted by their path relative to ``root``, so the order is stable across machines).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: ``root`` holds no image files, or is a file that is not an image.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    if root.is_file():
        if not is_image_file(root):
            raise ValueError(
                f"{str(root)!r} is not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)})"
            )
        return [root]
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames if is_image_file(f))
    if not found:
        raise ValueError(
            f"no images found under {str(root)!r} (searched recursively for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _from_pil(im: Image.Image, path: Path, channels: int | None) -> np.ndarray:
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        arr = np.asarray(im)
        if mode == "I":
            if arr.size and (arr.min() < 0 or arr.max() > 65535):
                raise ValueError(
                    f"{str(path)!r}: 32-bit integer image with values outside [0, 65535] is not supported "
                    "(expected 8-bit or 16-bit data)"
                )
        arr = arr.astype(np.uint16, copy=False)
        if channels == 3:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        return np.ascontiguousarray(arr)
    if mode == "F":
        raise ValueError(f"{str(path)!r}: floating-point images are not supported (expected 8-bit or 16-bit)")
    if mode == "L":
        arr = np.asarray(im)
        return np.ascontiguousarray(np.repeat(arr[..., None], 3, axis=-1) if channels == 3 else arr)
    if channels == 1:
        return np.asarray(im.convert("L"))
    if channels == 3:
        return np.asarray(im.convert("RGB"))
    # channels None: keep colour as RGB, collapse the rest (1, LA, P without colour) to gray.
    if mode in ("1", "LA"):
        return np.asarray(im.convert("L"))
    return np.asarray(im.convert("RGB"))


DEFAULT_MAX_PIXELS = 4096 * 4096
"""Largest ``width * height`` the readers decode; bigger headers are refused before decoding (decompression bombs)."""

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


class ImageDecodeError(ValueError):
    """An image that cannot be used. ``kind`` says why: ``truncated``, ``bomb``, ``unsupported``, ``corrupt``."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class DecodedImage:
    """One fully decoded image.

    Attributes:
        array: The pixels, as ``read_image`` returns them.
        mode: Pillow's mode of the file (``L``, ``I;16``, ``RGB`` ...).
        format: ``PNG``, ``JPEG``, ``TIFF`` or ``BMP`` (Pillow's name).
        trailing_bytes: Bytes after a PNG's IEND chunk (ignored by the decoder; 0 for other formats).
    """

    array: np.ndarray
    mode: str
    format: str
    trailing_bytes: int = 0


def _png_layout(data: bytes) -> tuple[int, int, int, int]:
    """``(expected raw size, raw size found, end of IEND, has IEND)`` of a PNG's image stream.

    The expected size follows from IHDR (filter byte + packed pixels per row, Adam7 passes when interlaced); the
    found size is what the IDAT zlib stream inflates to, read no further than one byte past the expected size.
    """
    pos, ihdr, idat, iend_end = 8, b"", [], 0
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            ihdr = body
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + length
        if kind == b"IEND":
            iend_end = pos if pos <= len(data) else 0
            break
    if len(ihdr) < 13:
        return 0, 0, iend_end, int(iend_end > 0)
    width, height = int.from_bytes(ihdr[0:4], "big"), int.from_bytes(ihdr[4:8], "big")
    depth, color, interlace = ihdr[8], ihdr[9], ihdr[12]
    bits = depth * _PNG_CHANNELS.get(color, 1)
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    expected = 0
    for x0, y0, dx, dy in passes:
        w, h = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
        if w > 0 and h > 0:
            expected += h * (1 + (w * bits + 7) // 8)
    try:
        found = len(zlib.decompressobj().decompress(b"".join(idat), expected + 1))
    except zlib.error:
        found = -1
    return expected, found, iend_end, int(iend_end > 0)


def _header_size(data: bytes) -> tuple[int, int] | None:
    """Width and height straight from a PNG or BMP header (for the message when Pillow refuses to open a bomb)."""
    if data.startswith(_PNG_SIGNATURE) and len(data) >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data.startswith(b"BM") and len(data) >= 26:
        w, h = struct.unpack("<ii", data[18:26])
        return abs(w), abs(h)
    return None


def _bomb(name: str, width: int, height: int, max_pixels: int) -> ImageDecodeError:
    return ImageDecodeError(
        f"{name!r}: header claims {width}x{height} = {width * height:,} pixels > max_pixels {max_pixels:,}; "
        "not decoded (decompression bomb or not a line image)", "bomb")


def read_header(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, str, int, int]:
    """Open only the header: ``(format, mode, width, height)``, refusing more than ``max_pixels`` pixels.

    Raises:
        ImageDecodeError: ``bomb`` (too many pixels; nothing decoded) or ``corrupt`` (no readable header).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt, mode, width, height = str(im.format), im.mode, im.width, im.height
    except Image.DecompressionBombError as exc:
        size = _header_size(data)
        if size is not None:
            raise _bomb(name, size[0], size[1], max_pixels) from None
        raise ImageDecodeError(f"{name!r}: header claims too many pixels to decode ({exc})", "bomb") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise ImageDecodeError(f"{name!r}: header could not be parsed: {exc}", "corrupt") from None
    if width * height > max_pixels:
        raise _bomb(name, width, height, max_pixels)
    return fmt, mode, width, height


def _png_stream_complete(layout: tuple[int, int, int, int], name: str) -> None:
    expected, found, _end, _iend = layout
    if found < 0:
        raise ImageDecodeError(f"{name!r}: PNG image stream is not valid zlib data", "corrupt")
    if found < expected:
        raise ImageDecodeError(
            f"{name!r}: PNG image data ends early: {found:,} of {expected:,} bytes of rows present "
            "(the rest would read as black)", "truncated")


def decode_image(
    data: bytes, name: str, *, channels: int | None = 1, max_pixels: int = DEFAULT_MAX_PIXELS
) -> DecodedImage:
    """Decode image bytes completely, or refuse them: the one decoder of ingest, training and every reader.

    Checks, in order: the header opens and claims at most ``max_pixels`` pixels (else ``bomb``, nothing decoded);
    a PNG ends with its IEND chunk (else ``truncated``); the structure verifies (chunk checksums, else
    ``corrupt``); a PNG's image stream holds every row its header claims (a short stream is ``truncated``, never
    silently black); the pixels decode; the pixel format is supported (``unsupported``: float, 32-bit integers
    above 65535). Bytes after a PNG's IEND chunk are ignored and counted.

    Args:
        data: The file's bytes.
        name: The file name, for messages.
        channels: As in ``read_image``.
        max_pixels: Largest ``width * height`` decoded.

    Raises:
        ImageDecodeError: Why the bytes are not a usable image.
    """
    if not data:
        raise ImageDecodeError(f"image {name!r} is empty (0 bytes)", "truncated")
    try:
        fmt = read_header(data, name, max_pixels)[0]
        png = _png_layout(data) if data.startswith(_PNG_SIGNATURE) else None
        if png is not None and not png[3]:
            raise ImageDecodeError(f"{name!r}: PNG of {len(data)} bytes ends before its IEND chunk (partial file)",
                                   "truncated")
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            im.verify()
        if png is not None:
            _png_stream_complete(png, name)
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            im.load()
            mode = im.mode
            arr = _from_pil(im, Path(name), channels)
    except ImageDecodeError:
        raise
    except ValueError as exc:  # _from_pil: float or out-of-range 32-bit data
        raise ImageDecodeError(str(exc), "unsupported") from None
    except (OSError, SyntaxError, EOFError, struct.error) as exc:
        kind = "truncated" if isinstance(exc, EOFError) or "truncat" in str(exc).lower() else "corrupt"
        raise ImageDecodeError(f"cannot decode image {name!r}: {exc}", kind) from None
    except Exception as exc:  # noqa: BLE001 - any other decoder failure on hostile bytes is a refusal, not a crash
        raise ImageDecodeError(f"cannot decode image {name!r}: {type(exc).__name__}: {exc}", "corrupt") from None
    if arr.size == 0 or min(arr.shape[:2]) == 0:
        raise ImageDecodeError(f"image {name!r} is empty (shape {arr.shape})", "truncated")
    return DecodedImage(arr, mode, fmt, len(data) - png[2] if png is not None else 0)


def read_image(
    path: str | os.PathLike[str], *, channels: int | None = 1, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode one image file to an integer array at its native bit depth (``decode_image`` on its bytes).

    Args:
        path: Image file.
        channels: 1 → grayscale (H, W); 3 → (H, W, 3) (gray is replicated); None → as stored, gray (H, W) or
            colour (H, W, 3).
        max_pixels: Largest ``width * height`` decoded; a bigger header is refused before decoding.

    Returns:
        ``uint8`` or ``uint16`` array. Values are not rescaled.

    Raises:
        FileNotFoundError: The file does not exist.
        ImageDecodeError: (a ``ValueError``) the file cannot be decoded completely, is empty, too large or has an
            unsupported pixel format; the message names it.
    """
    if channels not in (1, 3, None):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {str(path)!r} does not exist")
    return decode_image(path.read_bytes(), str(path), channels=channels, max_pixels=max_pixels).array


def read_images(
    paths: Sequence[str | os.PathLike[str]], *, channels: int | None = 1, workers: int = _READ_WORKERS
) -> list[np.ndarray]:
    """Decode many files with a small thread pool (PIL releases the GIL while decoding). Order is preserved.

    Args:
        paths: Image files.
        channels: As in ``read_image``.
        workers: Thread count; 1 reads sequentially.

    Returns:
        One array per path.
    """
    paths = list(paths)
    if workers <= 1 or len(paths) <= 1:
        return [read_image(p, channels=channels) for p in paths]
    with ThreadPoolExecutor(max_workers=min(workers, len(paths))) as pool:
        return list(pool.map(lambda p: read_image(p, channels=channels), paths))


def sha256_file(path: str | os.PathLike[str], *, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 digest of a file's bytes (read in chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            h.update(chunk)
    return h.hexdigest()


def spec_channels(spec: Any) -> int | None:
    """Channel count a preprocessing spec asks for (``spec.channels`` / ``spec.in_channels``), or None if unknown."""
    for name in ("channels", "in_channels", "num_channels"):
        value = getattr(spec, name, None)
        if isinstance(value, int):
            return value
    return None


def load_batch(paths: Iterable[str | os.PathLike[str]], spec: Any, *, workers: int = _READ_WORKERS) -> torch.Tensor:
    """Read image files and turn them into one model-input tensor.

    Args:
        paths: Image files (at least one).
        spec: The model's ``models.PreprocessSpec`` (resolution, channels).
        workers: Reader threads.

    Returns:
        Float tensor (B, C, H, W) in [-1, 1], as ``models.to_model_input`` makes it.

    Raises:
        ValueError: No paths, or a file that cannot be decoded.
    """
    from models import to_model_input

    paths = list(paths)
    if not paths:
        raise ValueError("load_batch: empty list of image paths")
    arrays = read_images(paths, channels=spec_channels(spec) or 1, workers=workers)
    return to_model_input(arrays, spec)
