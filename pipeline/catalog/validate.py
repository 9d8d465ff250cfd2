"""What ingestion accepts: reason codes, name and link checks, and the one full decode of each file.

``validate_bytes`` decodes with ``pipeline.common.images.decode_image``, the decoder training and every reader use, so the
catalog holds exactly the images they can read. ``inspect_file`` reads a file once (``O_NOFOLLOW``), refuses it
when it changed since it was listed, and puts valid bytes in the content-addressed store.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from pipeline.catalog.store import ContentStore, sha256_bytes
from pipeline.common import images

ZERO_BYTE = "zero_byte"
NOT_AN_IMAGE = "not_an_image"
CORRUPT = "corrupt"
TRUNCATED = "truncated"
DECOMPRESSION_BOMB = "decompression_bomb"
UNSUPPORTED_MODE = "unsupported_mode"
BAD_EXTENSION = "bad_extension"
EXTENSION_MISMATCH = "extension_mismatch"
TOO_SMALL = "too_small"
TOO_LARGE = "too_large"
FILE_TOO_LARGE = "file_too_large"
SYMLINK = "symlink"
PATH_ESCAPE = "path_escape"
BAD_FILENAME = "bad_filename"
NOT_A_FILE = "not_a_file"
UNREADABLE = "unreadable"

REASONS: dict[str, str] = {
    ZERO_BYTE: "the file is empty",
    NOT_AN_IMAGE: "the bytes are not PNG, JPEG, TIFF or BMP (e.g. text named .png)",
    CORRUPT: "the decoder rejected the data (bad checksum, broken stream)",
    TRUNCATED: "the file or its image stream ends early (partial copy or write)",
    DECOMPRESSION_BOMB: "the header claims more than max_pixels pixels; rejected before decoding",
    UNSUPPORTED_MODE: "pixel mode other than 8/16-bit grayscale or RGB(A) (palette, CMYK, float, 32-bit...)",
    BAD_EXTENSION: "the extension is not one of the allowed image extensions",
    EXTENSION_MISMATCH: "the extension does not match the content (e.g. JPEG bytes named .png)",
    TOO_SMALL: "width or height below min_width / min_height",
    TOO_LARGE: "width or height above max_width / max_height",
    FILE_TOO_LARGE: "the file is larger than max_file_bytes (recorded, not copied)",
    SYMLINK: "a symbolic link (links are never followed)",
    PATH_ESCAPE: "a symbolic link resolving outside the drop folder",
    BAD_FILENAME: "a path part that is not UTF-8, has characters outside [A-Za-z0-9._-], a leading dot or dash, "
    "or is too long",
    NOT_A_FILE: "not a regular file (FIFO, socket, device)",
    UNREADABLE: "the file could not be opened or read (permissions, vanished)",
}
"""Every reason code a quarantined file can carry, with what it means."""

SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
EXT_CANON = {"jpeg": "jpg", "tiff": "tif"}
_FORMAT_EXTS = {"PNG": {"png"}, "JPEG": {"jpg", "jpeg"}, "TIFF": {"tif", "tiff"}, "BMP": {"bmp"}}
MODE_DEPTH = {"L": 8, "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 16, "RGB": 8, "RGBA": 8}
_KIND_CODE = {"truncated": TRUNCATED, "bomb": DECOMPRESSION_BOMB, "unsupported": UNSUPPORTED_MODE,
              "corrupt": CORRUPT}


def printable(path: str) -> str:
    r"""A path as text that can always be stored: bytes that are not UTF-8 appear as ``\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class Rejection:
    """Why one file was refused."""

    code: str
    reason: str
    sha256: str | None = None


@dataclass(frozen=True)
class Accepted:
    """A valid image, already written to the store."""

    sha256: str
    ext: str
    width: int
    height: int
    mode: str
    bit_depth: int
    converted_from_rgb: bool
    store_relpath: str
    flags: tuple[str, ...] = ()
    repaired: bool = False


@dataclass(frozen=True)
class Unsettled:
    """A file that changed while being looked at: left for the next run."""

    reason: str


class Validated(NamedTuple):
    """What ``validate_bytes`` found in a valid image."""

    width: int
    height: int
    mode: str
    bit_depth: int
    flags: tuple[str, ...] = ()


def check_name(rel: tuple[str, ...], max_length: int) -> Rejection | None:
    """A ``bad_filename`` rejection for the first unsafe part of ``rel``, else None."""
    for part in rel:
        shown = printable(part)
        if shown != part or any("\udc80" <= c <= "\udcff" for c in part):
            return Rejection(BAD_FILENAME, f"name part {shown!r} is not valid UTF-8 (bytes shown as \\xNN)")
        if len(part) > max_length:
            return Rejection(BAD_FILENAME, f"name part {part[:40]!r}... is {len(part)} characters long "
                                           f"(limit {max_length})")
        if not SAFE_PART.match(part):
            why = "starts with a dot or dash" if part[:1] in (".", "-") else "has characters outside [A-Za-z0-9._-]"
            return Rejection(BAD_FILENAME, f"name part {part!r} {why}")
    return None


def check_link(path: str, drop_real: str) -> Rejection:
    """``symlink`` (stays inside the drop folder) or ``path_escape`` (resolves outside); links are never followed."""
    try:
        target = printable(os.readlink(path))
    except OSError:
        target = "?"
    resolved = os.path.realpath(path)
    inside = resolved == drop_real or resolved.startswith(drop_real.rstrip(os.sep) + os.sep)
    kind = "folder link" if os.path.isdir(path) else "link"
    if not inside:
        return Rejection(PATH_ESCAPE, f"symbolic {kind} to {target!r} resolves outside the drop folder "
                                      f"({printable(resolved)})")
    return Rejection(SYMLINK, f"symbolic {kind} to {target!r}; links are not followed, drop the real file instead")


def _sniff(head: bytes) -> str | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if head.startswith(b"BM"):
        return "BMP"
    return None


def _from_decode_error(exc: images.ImageDecodeError, fmt: str) -> Rejection:
    code = _KIND_CODE.get(exc.kind, CORRUPT)
    if code == TRUNCATED:
        return Rejection(code, f"{fmt} data ends early: {exc}")
    if code == CORRUPT:
        return Rejection(code, f"{fmt} decoder error: {exc}")
    return Rejection(code, str(exc))


def _check_header(fmt: str, mode: str, width: int, height: int, config: Any) -> Rejection | None:
    if width < config.min_width or height < config.min_height:
        return Rejection(TOO_SMALL, f"{width}x{height} is below the minimum {config.min_width}x{config.min_height}")
    if width > config.max_width or height > config.max_height:
        return Rejection(TOO_LARGE, f"{width}x{height} is above the maximum {config.max_width}x{config.max_height}")
    if mode not in MODE_DEPTH:
        return Rejection(UNSUPPORTED_MODE, f"pixel mode {mode!r} is not supported; expected 8/16-bit grayscale "
                                           "(L, I;16) or RGB/RGBA (converted)")
    return None


def validate_bytes(data: bytes, ext: str, config: Any, name: str = "image") -> Rejection | Validated:
    """Check that ``data`` is a complete, decodable, supported image, decoding it fully once.

    Args:
        data: The file's bytes.
        ext: Its extension, lower case without dot.
        config: Bounds (``IngestConfig``: min/max width and height, max_pixels).
        name: The file name, for messages.

    Returns:
        A ``Rejection``, or the image's size, mode, bit depth and flags (``trailing_bytes``: bytes after a PNG's
        IEND chunk, which the decoder ignores; the stored file keeps them).
    """
    if not data:
        return Rejection(ZERO_BYTE, "the file is empty (0 bytes)")
    fmt = _sniff(data[:16])
    if fmt is None:
        return Rejection(NOT_AN_IMAGE, f"content is not PNG/JPEG/TIFF/BMP (starts with {data[:12]!r})")
    if ext not in _FORMAT_EXTS[fmt]:
        return Rejection(EXTENSION_MISMATCH, f"named .{ext} but the content is {fmt}")
    try:
        _fmt, mode, width, height = images.read_header(data, name, config.max_pixels)
        bad = _check_header(fmt, mode, width, height, config)
        if bad is not None:
            return bad
        decoded = images.decode_image(data, name, channels=None, max_pixels=config.max_pixels)
    except images.ImageDecodeError as exc:
        return _from_decode_error(exc, fmt)
    flags = ("trailing_bytes",) if decoded.trailing_bytes else ()
    return Validated(width, height, mode, MODE_DEPTH[mode], flags)


def _read_settled(path: str, expect: tuple[int, int] | None, max_bytes: int) -> bytes | Rejection | Unsettled:
    """Read a file with ``O_NOFOLLOW``, refusing it when its size or mtime differ from ``expect``."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        if os.path.islink(path):
            return Rejection(SYMLINK, "became a symbolic link while ingesting; links are not followed")
        return Rejection(UNREADABLE, f"cannot open: {exc.strerror or exc}")
    try:
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if expect is not None and (st.st_size, st.st_mtime_ns) != expect:
                return Unsettled(f"changed since it was listed ({expect[0]} -> {st.st_size} bytes)")
            if st.st_size == 0:
                return Rejection(ZERO_BYTE, "the file is empty (0 bytes)")
            if st.st_size > max_bytes:
                return Rejection(FILE_TOO_LARGE, f"{st.st_size:,} bytes > max_file_bytes {max_bytes:,}; "
                                                 "recorded, not copied")
            data = fh.read(st.st_size + 1)
    except OSError as exc:
        return Rejection(UNREADABLE, f"read failed: {exc.strerror or exc}")
    if len(data) != st.st_size:
        return Unsettled(f"grew or shrank while being read ({st.st_size} -> {len(data)} bytes)")
    return data


def inspect_file(
    path: str, rel: tuple[str, ...], config: Any, store: ContentStore, expect: tuple[int, int] | None = None
) -> Rejection | Accepted | Unsettled:
    """Validate one regular file and, if valid, put its bytes in the store.

    Args:
        path: The file.
        rel: Its path parts relative to the drop folder (the last one is the name).
        config: ``IngestConfig``.
        store: Where valid bytes go (an existing object with a wrong digest is repaired).
        expect: ``(size, mtime_ns)`` from the listing; a file that differs is ``Unsettled``.
    """
    ext = rel[-1].rsplit(".", 1)[-1].lower() if "." in rel[-1] else ""
    if f".{ext}" not in config.allowed_extensions:
        allowed = ", ".join(config.allowed_extensions)
        return Rejection(BAD_EXTENSION, f"extension {('.' + ext) if ext else '(none)'!r} is not one of {allowed}")
    data = _read_settled(path, expect, config.max_file_bytes)
    if not isinstance(data, bytes):
        return data
    sha = sha256_bytes(data)
    checked = validate_bytes(data, ext, config, name=rel[-1])
    if isinstance(checked, Rejection):
        return replace(checked, sha256=sha)
    obj = store.put(data, EXT_CANON.get(ext, ext), sha256=sha)
    return Accepted(sha, ext, checked.width, checked.height, checked.mode, checked.bit_depth,
                    checked.mode in ("RGB", "RGBA"), obj.relpath, checked.flags, obj.repaired)
