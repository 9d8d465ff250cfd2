"""Hostile-input corpus: every bad input a camera, a user or a broken disk can hand linewatch, made at test time.

Nothing here is stored in the repository: each function writes its input under a folder the caller gives (a pytest
``tmp_path``) and returns where it is. The item tests of ``test_ingest_hostile.py`` and friends use these builders
one at a time; ``benchmarks/hostile_inputs.py`` runs every ``SCENARIOS`` entry and counts how many inputs were tried,
how many linewatch survived (one clear answer, no traceback, the rest of the drop registered) and how many good
images were lost.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

DAY = "2026-11-27"
MES_HEADER = "serial,timestamp,line,station,product_type"


# ------------------------------------------------------------------------------------------------ plain images


def gray(seed: int, size: tuple[int, int] = (48, 48), dtype: type = np.uint8) -> np.ndarray:
    """A random grayscale image (8 or 16 bit)."""
    rng = np.random.default_rng(seed)
    hi = 65535 if dtype == np.uint16 else 255
    return rng.integers(0, hi, size=size, dtype=dtype)


def image_bytes(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    """Encode an array with Pillow."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    """Write bytes, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def backdate(*paths: Path, seconds: float = 3600.0) -> None:
    """Set mtimes ``seconds`` in the past (a file the camera finished writing long ago)."""
    for p in paths:
        t = os.stat(p).st_mtime_ns - int(seconds * 1e9)
        os.utime(p, ns=(t, t))


def good_drop(drop: Path, n: int = 3, line: str = "L1", day: str = DAY, start: int = 0) -> list[Path]:
    """``n`` valid, settled PNGs ``S<k>.png`` under ``drop/line/day``."""
    folder = drop / line / day
    out = [write(folder / f"S{start + i:05d}.png", image_bytes(gray(start + i))) for i in range(n)]
    backdate(*out)
    return out


# ------------------------------------------------------------------------------------------------ PNG surgery


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk with its CRC."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def raw_png(width: int, height: int, rows: bytes, *, bit_depth: int = 8, color: int = 0) -> bytes:
    """A PNG from raw filtered scan lines (filter byte + pixels per row), with valid CRCs."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def short_idat_png(width: int = 64, height: int = 64, rows_present: int = 8) -> bytes:
    """A PNG whose IDAT is a complete zlib stream holding only ``rows_present`` of ``height`` rows.

    Every chunk checksum is right and IEND is there; a decoder that stops at the end of the stream fills the rest
    with black.
    """
    rows = b"".join(b"\x00" + bytes([100 + (r % 50)] * width) for r in range(rows_present))
    return raw_png(width, height, rows)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny, well-formed PNG whose header claims a huge image (decoding it would need ~10 GB)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + png_chunk(b"IEND", b"")
    )


def png_with_trailer(seed: int = 30, trailer: bytes = b"camera-firmware-padding\x00\x00") -> bytes:
    """A complete, valid PNG followed by extra bytes after its IEND chunk."""
    return image_bytes(gray(seed)) + trailer


def int32_tiff(value: int = 70_000, size: tuple[int, int] = (40, 40)) -> bytes:
    """A 32-bit integer TIFF with values above 65535 (not 16-bit data)."""
    return image_bytes(np.full(size, value, np.int32), "TIFF")


def truncated(data: bytes, keep: int) -> bytes:
    """The first ``keep`` bytes (a partial copy)."""
    return data[:keep]


# ------------------------------------------------------------------------------------------------ files


def sparse_file(path: Path, size: int) -> Path:
    """A sparse file of ``size`` bytes (a PNG header, then holes): large on paper, nothing on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n")
        fh.truncate(size)
    return path


def non_utf8_name(folder: Path, stem: bytes = b"cell_\xff\xfe", data: bytes | None = None) -> Path:
    """A file whose name is not valid UTF-8 (bytes as a Latin-1 camera would write them)."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = os.path.join(os.fsencode(folder), stem + b".png")
    with open(raw, "wb") as fh:
        fh.write(data if data is not None else image_bytes(gray(40)))
    return Path(os.fsdecode(raw))


def long_name(folder: Path, length: int = 200, ext: str = ".png", data: bytes | None = None) -> Path:
    """A file with a very long name (quarantined as ``bad_filename``) that keeps its extension."""
    return write(folder / ("c" * (length - len(ext)) + ext), data if data is not None else image_bytes(gray(41)))


class GrowingFile:
    """A file a camera is still writing, through one open handle, a chunk at a time.

    ``start()`` writes the first ``first`` bytes and keeps the file open; ``write_slowly(seconds)`` (a thread) writes
    the rest in chunks spread over ``seconds``. If the file is removed or moved meanwhile, the writer goes on writing
    into the unlinked file, exactly as a camera would: the complete image then exists nowhere.
    """

    def __init__(self, path: Path, data: bytes, first: int) -> None:
        self.path, self.data, self.first = path, data, first
        self._fh: io.BufferedWriter | None = None

    def start(self) -> Path:
        """Create the file with its first ``first`` bytes (mtime = now), and keep it open."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "wb")  # noqa: SIM115 - held open across calls on purpose
        self._fh.write(self.data[: self.first])
        self._fh.flush()
        return self.path

    def write_slowly(self, seconds: float, chunks: int = 8) -> threading.Thread:
        """Write the rest in ``chunks`` pieces over ``seconds`` in a thread (started), then close the file."""

        def run() -> None:
            assert self._fh is not None
            rest = self.data[self.first :]
            step = -(-len(rest) // chunks)
            for i in range(0, len(rest), step):
                time.sleep(seconds / chunks)
                self._fh.write(rest[i : i + step])
                self._fh.flush()
            self._fh.close()

        t = threading.Thread(target=run)
        t.start()
        return t

    def finish(self) -> Path:
        """Write the rest at once and close the file."""
        assert self._fh is not None
        self._fh.write(self.data[self.first :])
        self._fh.close()
        return self.path


def flip_byte(path: Path, offset: int | None = None) -> int:
    """Flip one byte of a file in place (the middle by default); returns the offset."""
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    return at


# ------------------------------------------------------------------------------------------------ MES exports


def mes_export(folder: Path, rows: list[tuple[str, ...]], *, bom: bool = False, name: str = "mes_export.csv") -> Path:
    """A MES export with ``rows`` of (serial, timestamp, line, station, product_type); ``bom`` prepends U+FEFF."""
    import csv

    folder.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(MES_HEADER.split(","))
    w.writerows(rows)
    text = ("\ufeff" if bom else "") + buf.getvalue()
    path = folder / name
    path.write_bytes(text.encode("utf-8"))
    return path


EXTREME_TIMESTAMPS = {
    "year1_east": "0001-01-01T00:30:00+05:00",
    "year9999_west": "9999-12-31T23:30:00-05:00",
    "year2999": "2999-06-01T08:00:00+00:00",
    "year1900": "1900-01-01T00:00:00+00:00",
}
"""MES timestamps that overflow on conversion to UTC, or are impossible for a production line."""

HOSTILE_MES_FIELDS = {
    "newline": "mono\nALERT resolved: all clear",
    "formula": "=HYPERLINK(\"http://evil.example\",\"mono\")",
    "control": "mono\x1b[2J\x07",
    "long": "m" * 500,
}
"""MES product types that must never reach alerts, logs, webhooks or CSV as they are."""


# ------------------------------------------------------------------------------------------------ checkpoints


def corrupt_safetensors(ckpt: Path) -> Path:
    """Overwrite the middle of ``weights.safetensors`` (header intact, tensors damaged)."""
    flip_byte(ckpt / "weights.safetensors", os.path.getsize(ckpt / "weights.safetensors") - 100)
    return ckpt


def truncated_safetensors(ckpt: Path, keep: int = 64) -> Path:
    """Cut ``weights.safetensors`` to ``keep`` bytes (an interrupted copy)."""
    w = ckpt / "weights.safetensors"
    os.chmod(w, 0o644)
    w.write_bytes(w.read_bytes()[:keep])
    return ckpt


def garbage_safetensors(ckpt: Path) -> Path:
    """Replace ``weights.safetensors`` by bytes that are not safetensors at all."""
    w = ckpt / "weights.safetensors"
    os.chmod(w, 0o644)
    w.write_bytes(b"\xff" * 16 + b"not a tensor file")
    return ckpt


def wrong_type_config(ckpt: Path, key: str = "latent_dim", value: object = "eight") -> Path:
    """Set ``model.<key>`` of ``config.json`` to a value of the wrong type (``"eight"``, ``true``)."""
    import json

    p = ckpt / "config.json"
    doc = json.loads(p.read_text())
    doc["model"][key] = value
    p.write_text(json.dumps(doc))
    return ckpt


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A writable copy of a checkpoint folder."""
    import shutil

    shutil.copytree(src, dst)
    for f in dst.rglob("*"):
        if f.is_file():
            os.chmod(f, 0o644)
    return dst
