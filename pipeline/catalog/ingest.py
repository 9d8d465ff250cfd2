"""Exactly-once ingestion of a drop folder into the catalog.

``ingest(drop, root)`` walks ``DROP/<line>/<YYYY-MM-DD>/<serial>.<ext>`` (any depth works; the first folder names
the line), validates each new file, copies valid images into the content-addressed store, and publishes catalog
rows. Rejected files are quarantined with a reason code and ingestion goes on.

Exactly-once, in order of what happens to one file:

1. Fast skip: a file whose ``(path, size, mtime_ns)`` is already in the catalog, the duplicates table or the
   quarantine table was handled by an earlier run and is not read again.
2. The bytes are hashed. Bytes already registered (by any run, or earlier in this run) become a *duplicate* row
   pointing at the registered ``image_id``; the same path with the same bytes (a ``touch``) is skipped.
3. The store object is written (temporary file + rename) *before* the catalog row is published (temporary part
   file + rename). A crash between the two leaves an unreferenced store object; the re-run finds the file
   unregistered, the store write is a no-op, and the row is published once.
4. Rows are published in batches (``IngestConfig.batch_size``); a crash loses at most the unpublished batch,
   which the next run redoes. Nothing is rewritten in place.

Two ingests into the same root serialise on ``<root>/.lock`` (``filelock``); the second waits up to
``lock_timeout`` seconds and then fails with a message naming the holder.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import logging
import os
import re
import shutil
import stat
import struct
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from pipeline.catalog import tables as C
from pipeline.catalog.store import ContentStore, sha256_bytes
from pipeline.common import schemas as S

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# reasons

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
    TRUNCATED: "the file ends early (partial copy or write)",
    DECOMPRESSION_BOMB: "the header claims more than max_pixels pixels; rejected before decoding",
    UNSUPPORTED_MODE: "pixel mode other than 8/16-bit grayscale or RGB(A) (palette, CMYK, float, 1-bit...)",
    BAD_EXTENSION: "the extension is not one of the allowed image extensions",
    EXTENSION_MISMATCH: "the extension does not match the content (e.g. JPEG bytes named .png)",
    TOO_SMALL: "width or height below min_width / min_height",
    TOO_LARGE: "width or height above max_width / max_height",
    FILE_TOO_LARGE: "the file is larger than max_file_bytes",
    SYMLINK: "a symbolic link (links are never followed)",
    PATH_ESCAPE: "a symbolic link resolving outside the drop folder",
    BAD_FILENAME: "a path part with characters outside [A-Za-z0-9._-], a leading dot or dash, or too long",
    NOT_A_FILE: "not a regular file (FIFO, socket, device)",
    UNREADABLE: "the file could not be opened or read (permissions, vanished)",
}
"""Every reason code a quarantined file can carry, with what it means."""

_SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_EXT_CANON = {"jpeg": "jpg", "tiff": "tif"}
_FORMAT_EXTS = {"PNG": {"png"}, "JPEG": {"jpg", "jpeg"}, "TIFF": {"tif", "tiff"}, "BMP": {"bmp"}}
_MODE_DEPTH = {"L": 8, "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 16, "RGB": 8, "RGBA": 8}
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"

CRASH_ENV = "LINEWATCH_TEST_CRASH_AT"
"""Test hook: set to ``before_publish`` and the ingest process ``os._exit(70)``s just before its first publish."""


def _header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """Width and height straight from a PNG or BMP header (used when Pillow refuses to open a bomb)."""
    if fmt == "PNG" and len(data) >= 24 and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    if fmt == "BMP" and len(data) >= 26:
        w, h = struct.unpack("<ii", data[18:26])
        return abs(w), abs(h)
    return None


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


# ----------------------------------------------------------------------------------------------------------------
# config and results


@dataclass(frozen=True)
class IngestConfig:
    """What ingestion accepts and how it treats rejects.

    Attributes:
        allowed_extensions: Lower-case extensions (with dot) accepted as images.
        min_width: Smallest accepted width in pixels (also ``min_height``).
        min_height: Smallest accepted height.
        max_width: Largest accepted width.
        max_height: Largest accepted height.
        max_pixels: Largest ``width * height``; bigger headers are rejected as decompression bombs before decoding.
        max_file_bytes: Largest accepted file size.
        max_filename_length: Longest accepted file or folder name.
        quarantine_mode: ``"copy"`` (leave the drop folder untouched) or ``"move"`` (remove the reject from it
            after its quarantine row is published).
        quarantine_dir: Where rejects go (default ``<root>/quarantine``); files land in ``<dir>/<run_id>/``.
        delete_source: Remove registered and duplicate files from the drop folder after publishing them.
        lock_timeout: Seconds to wait for a concurrent ingest before failing.
        metadata_filename: Name of the per-folder MES export (``serial,timestamp,line,station,product_type``).
        mes_timezone: IANA zone of MES timestamps written without an offset (the plant's clock; the commands pass
            ``settings.timezone``); such rows are flagged ``naive_mes_timestamp``.
        default_line: Line used when neither the MES export nor a folder names one.
        default_station: Station used when the MES export does not name one.
        batch_size: Files per publish; a crash loses at most one batch of work.
        workers: Threads validating and hashing in parallel (decoders and hashing release the GIL).
        fsync: fsync store objects before publishing (power-loss safety; slower).
    """

    allowed_extensions: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
    min_width: int = 32
    min_height: int = 32
    max_width: int = 4096
    max_height: int = 4096
    max_pixels: int = 4096 * 4096
    max_file_bytes: int = 256 * 2**20
    max_filename_length: int = 128
    quarantine_mode: str = "copy"
    quarantine_dir: str | None = None
    delete_source: bool = False
    lock_timeout: float = 10.0
    metadata_filename: str = "mes_export.csv"
    mes_timezone: str = "UTC"
    default_line: str = "unknown"
    default_station: str = "unknown"
    batch_size: int = 2000
    workers: int = 2
    fsync: bool = False

    def __post_init__(self) -> None:
        if self.quarantine_mode not in ("copy", "move"):
            raise ValueError(f"quarantine_mode must be 'copy' or 'move', got {self.quarantine_mode!r}")
        if not (0 < self.min_width <= self.max_width and 0 < self.min_height <= self.max_height):
            raise ValueError(
                f"need 0 < min <= max for width ({self.min_width}..{self.max_width}) and "
                f"height ({self.min_height}..{self.max_height})"
            )
        if self.max_pixels < 1 or self.max_file_bytes < 1 or self.batch_size < 1 or self.workers < 1:
            raise ValueError("max_pixels, max_file_bytes, batch_size and workers must be >= 1")
        bad = [e for e in self.allowed_extensions if not e.startswith(".") or e != e.lower()]
        if bad:
            raise ValueError(f"allowed_extensions must be lower case with a leading dot, got {bad}")
        for name in (self.default_line, self.default_station):
            if not _SAFE_PART.match(name):
                raise ValueError(f"default line/station {name!r} must match {_SAFE_PART.pattern}")


@dataclass(frozen=True)
class IngestSummary:
    """The outcome of one ingest run.

    Attributes:
        run_id: The run's id (stored in every row it wrote).
        registered: New images registered.
        duplicates: Files whose bytes were already registered under another name or path.
        skipped_already_registered: Files an earlier run registered (same path; not read again, or same bytes).
        skipped_already_seen: Files an earlier run recorded as duplicate or quarantined.
        quarantined: ``reason_code -> count`` of files rejected by this run.
        seconds: Wall time of the run, lock wait and publishing included.
        images_per_s: Files inspected (registered + duplicates + quarantined) per second.
        timestamp_sources: ``"mes" / "file_mtime" -> count`` among the registered images.
    """

    run_id: str
    registered: int
    duplicates: int
    skipped_already_registered: int
    skipped_already_seen: int
    quarantined: dict[str, int]
    seconds: float
    images_per_s: float
    timestamp_sources: dict[str, int] = field(default_factory=dict)

    @property
    def n_quarantined(self) -> int:
        """Total rejected files."""
        return sum(self.quarantined.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        d = asdict(self)
        d["n_quarantined"] = self.n_quarantined
        return d


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


@dataclass(frozen=True)
class _Candidate:
    path: str  # absolute, as listed (not resolved)
    rel: tuple[str, ...]  # parts relative to the drop folder
    size: int
    mtime_ns: int
    is_link: bool
    is_regular: bool = True


# ----------------------------------------------------------------------------------------------------------------
# validation


def _check_name(rel: tuple[str, ...], config: IngestConfig) -> Rejection | None:
    for part in rel:
        if len(part) > config.max_filename_length:
            return Rejection(
                BAD_FILENAME,
                f"name part {part[:40]!r}... is {len(part)} characters long "
                f"(limit {config.max_filename_length})",
            )
        if not _SAFE_PART.match(part):
            why = (
                "starts with a dot or dash"
                if part[:1] in (".", "-")
                else "has characters outside [A-Za-z0-9._-]"
            )
            return Rejection(BAD_FILENAME, f"name part {part!r} {why}")
    return None


def _check_link(cand: _Candidate, drop_real: str) -> Rejection:
    try:
        target = os.readlink(cand.path)
    except OSError:
        target = "?"
    resolved = os.path.realpath(cand.path)
    inside = resolved == drop_real or resolved.startswith(drop_real.rstrip(os.sep) + os.sep)
    kind = "folder link" if os.path.isdir(cand.path) else "link"
    if not inside:
        return Rejection(
            PATH_ESCAPE, f"symbolic {kind} to {target!r} resolves outside the drop folder ({resolved})"
        )
    return Rejection(
        SYMLINK, f"symbolic {kind} to {target!r}; links are not followed, drop the real file instead"
    )


def validate_bytes(data: bytes, ext: str, config: IngestConfig) -> Rejection | tuple[int, int, str, int]:
    """Check that ``data`` is a complete, decodable, supported image.

    Args:
        data: The file's bytes.
        ext: Its extension, lower case without dot.
        config: Bounds and allowed formats.

    Returns:
        A ``Rejection``, or ``(width, height, mode, bit_depth)`` of a valid image.
    """
    if not data:
        return Rejection(ZERO_BYTE, "the file is empty (0 bytes)")
    fmt = _sniff(data[:16])
    if fmt is None:
        head = data[:12]
        return Rejection(NOT_AN_IMAGE, f"content is not PNG/JPEG/TIFF/BMP (starts with {head!r})")
    if ext not in _FORMAT_EXTS[fmt]:
        return Rejection(EXTENSION_MISMATCH, f"named .{ext} but the content is {fmt}")
    if fmt == "PNG" and not data.endswith(_PNG_IEND):
        return Rejection(
            TRUNCATED, f"PNG of {len(data)} bytes does not end with the IEND chunk (partial file)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt]) as im:
                width, height, mode = im.width, im.height, im.mode
                if width * height > config.max_pixels:
                    return Rejection(
                        DECOMPRESSION_BOMB,
                        f"header claims {width}x{height} = {width * height:,} "
                        f"pixels > max_pixels {config.max_pixels:,}; not decoded",
                    )
                if width < config.min_width or height < config.min_height:
                    return Rejection(
                        TOO_SMALL,
                        f"{width}x{height} is below the minimum {config.min_width}x{config.min_height}",
                    )
                if width > config.max_width or height > config.max_height:
                    return Rejection(
                        TOO_LARGE,
                        f"{width}x{height} is above the maximum {config.max_width}x{config.max_height}",
                    )
                if mode not in _MODE_DEPTH:
                    return Rejection(
                        UNSUPPORTED_MODE,
                        f"pixel mode {mode!r} is not supported; expected 8/16-bit "
                        "grayscale (L, I;16) or RGB/RGBA (converted)",
                    )
                im.verify()
            with Image.open(io.BytesIO(data), formats=[fmt]) as im:
                im.load()
    except Image.DecompressionBombError as exc:
        size = _header_size(data, fmt)
        if size is not None:
            w, h = size
            return Rejection(
                DECOMPRESSION_BOMB,
                f"header claims {w}x{h} = {w * h:,} pixels > max_pixels {config.max_pixels:,}; not decoded",
            )
        return Rejection(DECOMPRESSION_BOMB, f"Pillow refused to open it: {exc}")
    except UnidentifiedImageError as exc:
        return Rejection(CORRUPT, f"{fmt} header could not be parsed: {exc}")
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        msg = str(exc)
        if "truncat" in msg.lower() or isinstance(exc, EOFError):
            return Rejection(TRUNCATED, f"{fmt} data ends early: {msg}")
        return Rejection(CORRUPT, f"{fmt} decoder error: {type(exc).__name__}: {msg}")
    except Exception as exc:  # any other decoder failure on hostile bytes is a reject, not a crash
        return Rejection(CORRUPT, f"{fmt} decoder failed unexpectedly: {type(exc).__name__}: {exc}")
    return width, height, mode, _MODE_DEPTH[mode]


def inspect_file(
    path: str, rel: tuple[str, ...], config: IngestConfig, store: ContentStore
) -> Rejection | Accepted:
    """Validate one regular file and, if valid, put its bytes in the store.

    The file is opened with ``O_NOFOLLOW`` so a file swapped for a link after listing is refused too.
    """
    ext = rel[-1].rsplit(".", 1)[-1].lower() if "." in rel[-1] else ""
    if f".{ext}" not in config.allowed_extensions:
        allowed = ", ".join(config.allowed_extensions)
        return Rejection(
            BAD_EXTENSION, f"extension {('.' + ext) if ext else '(none)'!r} is not one of {allowed}"
        )
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        if os.path.islink(path):
            return Rejection(SYMLINK, "became a symbolic link while ingesting; links are not followed")
        return Rejection(UNREADABLE, f"cannot open: {exc.strerror or exc}")
    try:
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if st.st_size == 0:
                return Rejection(ZERO_BYTE, "the file is empty (0 bytes)")
            if st.st_size > config.max_file_bytes:
                return Rejection(
                    FILE_TOO_LARGE, f"{st.st_size:,} bytes > max_file_bytes {config.max_file_bytes:,}"
                )
            data = fh.read()
    except OSError as exc:
        return Rejection(UNREADABLE, f"read failed: {exc.strerror or exc}")
    sha = sha256_bytes(data)
    checked = validate_bytes(data, ext, config)
    if isinstance(checked, Rejection):
        return replace(checked, sha256=sha)
    width, height, mode, depth = checked
    obj = store.put(data, _EXT_CANON.get(ext, ext), sha256=sha)
    return Accepted(sha, ext, width, height, mode, depth, mode in ("RGB", "RGBA"), obj.relpath)


# ----------------------------------------------------------------------------------------------------------------
# drop folder scanning and metadata


def _scan(scan_root: Path, drop: Path, skip_dirs: set[str], metadata_name: str) -> Iterator[_Candidate]:
    """Yield every entry to consider, sorted, without following links."""
    for dirpath, dirnames, filenames in os.walk(scan_root, followlinks=False):
        dirnames.sort()
        keep = []
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if os.path.islink(full):
                st = os.lstat(full)
                rel = Path(full).relative_to(drop).parts
                yield _Candidate(full, rel, st.st_size, st.st_mtime_ns, is_link=True, is_regular=False)
            elif d.startswith(".") or os.path.realpath(full) in skip_dirs:
                continue  # hidden folders (ours, editors', OS metadata) and the catalog root if nested
            else:
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            if name == metadata_name:
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            rel = Path(full).relative_to(drop).parts
            yield _Candidate(
                full,
                rel,
                st.st_size,
                st.st_mtime_ns,
                is_link=stat.S_ISLNK(st.st_mode),
                is_regular=stat.S_ISREG(st.st_mode),
            )


@dataclass(frozen=True)
class _MesRow:
    captured_at: dt.datetime | None
    line: str | None
    station: str | None
    product_type: str | None
    flags: tuple[str, ...]


def read_mes_export(path: str | os.PathLike[str], timezone: str = "UTC") -> dict[str, _MesRow]:
    """Parse a MES export (``serial, timestamp, line, station, product_type``) into ``serial -> row``.

    Timestamps are ISO 8601; naive ones are taken in ``timezone`` (the plant's clock) and flagged. Rows without a serial are skipped; an
    unparsable timestamp keeps the row's line/station and flags it (the file time is used instead).
    """
    out: dict[str, _MesRow] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "serial" not in reader.fieldnames:
            raise ValueError(f"{path}: MES export needs a 'serial' column, has {reader.fieldnames}")
        for row in reader:
            serial = (row.get("serial") or "").strip()
            if not serial or serial in out:
                continue
            flags: list[str] = []
            ts: dt.datetime | None = None
            raw = (row.get("timestamp") or "").strip()
            if raw:
                try:
                    ts = dt.datetime.fromisoformat(raw)
                    if ts.tzinfo is None:
                        ts = ts.replace(tzinfo=ZoneInfo(timezone))
                        flags.append("naive_mes_timestamp")
                    ts = ts.astimezone(dt.UTC)
                except ValueError:
                    flags.append("bad_mes_timestamp")
            clean = {k: ((row.get(k) or "").strip() or None) for k in ("line", "station", "product_type")}
            out[serial] = _MesRow(ts, clean["line"], clean["station"], clean["product_type"], tuple(flags))
    return out


class _MesCache:
    def __init__(self, name: str, timezone: str = "UTC") -> None:
        self.name = name
        self.timezone = timezone
        self._cache: dict[str, dict[str, _MesRow]] = {}

    def lookup(self, folder: str, serial: str) -> _MesRow | None:
        if folder not in self._cache:
            path = os.path.join(folder, self.name)
            table: dict[str, _MesRow] = {}
            if os.path.isfile(path) and not os.path.islink(path):
                try:
                    table = read_mes_export(path, self.timezone)
                except (OSError, ValueError, csv.Error, UnicodeDecodeError) as exc:
                    log.warning("ignoring unreadable MES export %s: %s", path, exc)
            self._cache[folder] = table
        return self._cache[folder].get(serial)


# ----------------------------------------------------------------------------------------------------------------
# the run


def _default_crash_hook(point: str) -> None:
    if os.environ.get(CRASH_ENV) == point:
        os._exit(70)


class _KnownState:
    """What earlier runs did, restricted to what this run needs.

    ``registered_keys`` / ``seen_keys`` / ``path_sha`` only hold entries for paths found in this drop folder scan
    (a vectorised ``is_in`` filter), and registered digests are looked up per batch with ``index_in`` against the
    Arrow column, so start-up stays cheap on a catalog of millions of rows.
    """

    def __init__(self, root: Path, scanned_paths: list[str]) -> None:
        cols = [S.IMAGE_ID, S.SHA256, S.SOURCE_PATH, S.SOURCE_SIZE, S.SOURCE_MTIME_NS]
        cat = C.scan_catalog(root, cols)
        paths = pa.array(scanned_paths, type=pa.string())
        mine = cat.filter(pc.is_in(cat[S.SOURCE_PATH], value_set=paths)).to_pydict()
        self.registered_keys = set(
            zip(mine[S.SOURCE_PATH], mine[S.SOURCE_SIZE], mine[S.SOURCE_MTIME_NS], strict=True)
        )
        self.path_sha = set(zip(mine[S.SOURCE_PATH], mine[S.SHA256], strict=True))
        self._shas = cat[S.SHA256].combine_chunks()
        self._ids = cat[S.IMAGE_ID].combine_chunks()
        self.run_sha_to_id: dict[str, str] = {}
        self.seen_keys: set[tuple[str, int, int]] = set()
        for table, path_col in (("duplicates", S.SOURCE_PATH), ("quarantine", S.PATH)):
            df = C.read_table(root, table, columns=[path_col, S.SOURCE_SIZE, S.SOURCE_MTIME_NS]).dropna()
            df = df[df[path_col].isin(set(scanned_paths))]
            self.seen_keys.update(
                zip(
                    df[path_col],
                    df[S.SOURCE_SIZE].astype(int),
                    df[S.SOURCE_MTIME_NS].astype(int),
                    strict=True,
                )
            )

    def lookup(self, shas: list[str]) -> dict[str, str]:
        """``sha256 -> image_id`` for the digests already registered (earlier runs or this one)."""
        out = {s: self.run_sha_to_id[s] for s in shas if s in self.run_sha_to_id}
        rest = [s for s in shas if s not in out]
        if rest and len(self._shas):
            idx = pc.index_in(pa.array(rest, type=pa.string()), value_set=self._shas)
            ids = pc.take(self._ids, idx).to_pylist()
            out.update({s: i for s, i in zip(rest, ids, strict=True) if i is not None})
        return out


def _quarantine_dest(qdir: Path, run_id: str, rel: tuple[str, ...]) -> Path:
    safe = [re.sub(r"[^A-Za-z0-9._-]", "_", p).lstrip(".-")[:100] or "_" for p in rel]
    dest = qdir / run_id / Path(*safe)
    n = 1
    while dest.exists() or dest.is_symlink():
        dest = dest.with_name(f"{dest.stem}~{n}{dest.suffix}")
        n += 1
    return dest


def ingest(
    drop: str | os.PathLike[str],
    root: str | os.PathLike[str] | None = None,
    *,
    line: str | None = None,
    config: IngestConfig = IngestConfig(),
    progress: bool = True,
    crash_hook: Callable[[str], None] | None = None,
) -> IngestSummary:
    """Register every new valid image of a drop folder, exactly once.

    Args:
        drop: The drop folder (``DROP/<line>/<YYYY-MM-DD>/<serial>.png`` + ``mes_export.csv`` per folder).
        root: Catalog root (default ``catalog.default_root()``).
        line: Only ingest ``DROP/<line>``.
        config: Validation bounds, quarantine behaviour, lock timeout.
        progress: Show a progress bar (only when stderr is a terminal).
        crash_hook: Test hook called with a point name (``"before_publish"``, ``"after_publish"``) around each
            batch publish; raising or ``os._exit`` there simulates a crash. Default: exit if
            ``$LINEWATCH_TEST_CRASH_AT`` names the point.

    Returns:
        The run's summary.

    Raises:
        ValueError: The drop folder or the line folder does not exist.
        catalog.CatalogLockedError: Another ingest held the lock for longer than ``config.lock_timeout``.
    """
    t_start = time.perf_counter()
    root = Path(root) if root is not None else C.default_root()
    drop_path = Path(drop)
    if not drop_path.is_dir():
        raise ValueError(f"drop folder {drop_path} does not exist or is not a folder")
    drop_abs = Path(os.path.abspath(drop_path))
    drop_real = os.path.realpath(drop_abs)
    scan_root = drop_abs
    if line is not None:
        if not _SAFE_PART.match(line):
            raise ValueError(f"line {line!r} must match {_SAFE_PART.pattern}")
        scan_root = drop_abs / line
        if scan_root.is_symlink():
            raise ValueError(f"{scan_root} is a symbolic link; links are not followed, give the real folder")
        if not scan_root.is_dir():
            raise ValueError(f"no folder for line {line!r}: {scan_root} does not exist")
    hook = crash_hook or _default_crash_hook
    run_id = C.new_run_id()
    qdir = Path(config.quarantine_dir) if config.quarantine_dir else root / C.QUARANTINE_DIR
    store = C.content_store(root, fsync=config.fsync)
    skip_dirs = {os.path.realpath(root), os.path.realpath(qdir)}

    with C.catalog_lock(root, timeout=config.lock_timeout, purpose=f"ingest {run_id}"):
        scanned = list(_scan(scan_root, drop_abs, skip_dirs, config.metadata_filename))
        known = _KnownState(root, [c.path for c in scanned])
        candidates: list[_Candidate] = []
        n_skip_registered = n_skip_seen = 0
        for cand in scanned:
            key = (cand.path, cand.size, cand.mtime_ns)
            if key in known.registered_keys:
                n_skip_registered += 1
            elif key in known.seen_keys:
                n_skip_seen += 1
            else:
                candidates.append(cand)

        mes = _MesCache(config.metadata_filename, config.mes_timezone)
        counts: Counter[str] = Counter()
        quarantined: Counter[str] = Counter()
        ts_sources: Counter[str] = Counter()
        seq = 0
        rows: list[dict[str, Any]] = []
        dup_rows: list[dict[str, Any]] = []
        q_rows: list[dict[str, Any]] = []
        to_remove: list[str] = []

        def publish() -> None:
            nonlocal seq, rows, dup_rows, q_rows, to_remove
            if not (rows or dup_rows or q_rows):
                return
            seq += 1
            part = f"part-{run_id}-{seq:05d}"
            hook("before_publish")
            C.write_catalog_rows(root, pa.Table.from_pylist(rows, schema=S.CATALOG_SCHEMA), part)
            C.append_table(
                root, "duplicates", pa.Table.from_pylist(dup_rows, schema=S.DUPLICATES_SCHEMA), part
            )
            C.append_table(root, "quarantine", pa.Table.from_pylist(q_rows, schema=S.QUARANTINE_SCHEMA), part)
            hook("after_publish")
            for path in to_remove:  # only what the user asked to remove, and only once its row is published
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            rows, dup_rows, q_rows, to_remove = [], [], [], []

        def reject(cand: _Candidate, rej: Rejection) -> None:
            dest: Path | None = None
            if cand.is_regular or cand.is_link:
                dest = _quarantine_dest(qdir, run_id, cand.rel)
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    shutil.copy2(cand.path, dest, follow_symlinks=False)
                except OSError as exc:
                    log.warning("could not copy %s to quarantine: %s", cand.path, exc)
                    dest = None
                if config.quarantine_mode == "move" and dest is not None:
                    to_remove.append(cand.path)
            q_rows.append(
                {
                    S.PATH: cand.path,
                    S.SOURCE_SIZE: cand.size,
                    S.SOURCE_MTIME_NS: cand.mtime_ns,
                    S.SHA256: rej.sha256,
                    S.REASON_CODE: rej.code,
                    S.REASON: rej.reason,
                    S.QUARANTINED_TO: str(dest) if dest else None,
                    S.AT: C.utcnow(),
                    S.INGEST_RUN_ID: run_id,
                }
            )
            quarantined[rej.code] += 1

        def check(cand: _Candidate) -> Rejection | Accepted:
            if cand.is_link:
                return _check_link(cand, drop_real)
            bad = _check_name(cand.rel, config)
            if bad is not None:
                return bad
            if not cand.is_regular:
                return Rejection(NOT_A_FILE, "not a regular file (FIFO, socket or device)")
            try:
                return inspect_file(cand.path, cand.rel, config, store)
            finally:
                bar.update(1)

        bar = tqdm(
            total=len(candidates), unit="file", desc="ingest", disable=not progress or not sys.stderr.isatty()
        )
        pool = (
            ThreadPoolExecutor(max_workers=config.workers)
            if config.workers > 1 and len(candidates) > 8
            else None
        )
        try:
            chunk = max(config.batch_size, 1)
            for lo in range(0, len(candidates), chunk):
                batch = candidates[lo : lo + chunk]
                results = list(pool.map(check, batch) if pool is not None else map(check, batch))
                registered = known.lookup([r.sha256 for r in results if isinstance(r, Accepted)])
                for cand, res in zip(batch, results, strict=True):
                    if isinstance(res, Rejection):
                        reject(cand, res)
                        continue
                    if res.sha256 not in registered and res.sha256 in known.run_sha_to_id:
                        registered[res.sha256] = known.run_sha_to_id[
                            res.sha256
                        ]  # same bytes twice in a batch
                    if res.sha256 in registered:
                        if (cand.path, res.sha256) in known.path_sha:
                            n_skip_registered += 1  # same file touched: already registered
                            continue
                        dup_rows.append(
                            {
                                S.SOURCE_PATH: cand.path,
                                S.SOURCE_SIZE: cand.size,
                                S.SOURCE_MTIME_NS: cand.mtime_ns,
                                S.SHA256: res.sha256,
                                S.DUPLICATE_OF: registered[res.sha256],
                                S.SEEN_AT: C.utcnow(),
                                S.INGEST_RUN_ID: run_id,
                            }
                        )
                        counts["duplicates"] += 1
                        if config.delete_source:
                            to_remove.append(cand.path)
                        continue
                    rows.append(_catalog_row(cand, res, mes, config, run_id))
                    ts_sources[rows[-1][S.TIMESTAMP_SOURCE]] += 1
                    known.run_sha_to_id[res.sha256] = rows[-1][S.IMAGE_ID]
                    known.path_sha.add((cand.path, res.sha256))
                    counts["registered"] += 1
                    if config.delete_source:
                        to_remove.append(cand.path)
                publish()
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

        seconds = time.perf_counter() - t_start
        n_inspected = len(candidates)
        summary = IngestSummary(
            run_id=run_id,
            registered=counts["registered"],
            duplicates=counts["duplicates"],
            skipped_already_registered=n_skip_registered,
            skipped_already_seen=n_skip_seen,
            quarantined=dict(sorted(quarantined.items())),
            seconds=round(seconds, 4),
            images_per_s=round(n_inspected / seconds, 2) if seconds > 0 else 0.0,
            timestamp_sources=dict(sorted(ts_sources.items())),
        )
        C.write_run_record(
            root,
            run_id,
            {
                "kind": "ingest",
                "drop": str(drop_abs),
                "line": line,
                "config": asdict(config),
                **summary.to_dict(),
            },
        )
    return summary


def _catalog_row(cand: _Candidate, acc: Accepted, mes: _MesCache, config: IngestConfig, run_id: str) -> dict:
    folder, name = os.path.split(cand.path)
    serial = name.rsplit(".", 1)[0]
    info = mes.lookup(folder, serial)
    flags: list[str] = []
    folder_line = cand.rel[0] if len(cand.rel) >= 2 else None
    line = folder_line or config.default_line
    station = config.default_station
    product_type = None
    captured: dt.datetime | None = None
    if info is not None:
        flags.extend(info.flags)
        if info.line and _SAFE_PART.match(info.line):
            if folder_line and info.line != folder_line:
                flags.append("line_mismatch")
            line = info.line
        elif info.line:
            flags.append("bad_mes_line")
        if info.station and _SAFE_PART.match(info.station):
            station = info.station
        elif info.station:
            flags.append("bad_mes_station")
        product_type = info.product_type
        captured = info.captured_at
    source = "mes"
    if captured is None:
        captured = dt.datetime.fromtimestamp(cand.mtime_ns / 1e9, dt.UTC)
        source = "file_mtime"
    if acc.converted_from_rgb:
        flags.append("converted_from_rgb")
    return {
        S.IMAGE_ID: acc.sha256[:24],
        S.SHA256: acc.sha256,
        S.SOURCE_PATH: cand.path,
        S.SOURCE_SIZE: cand.size,
        S.SOURCE_MTIME_NS: cand.mtime_ns,
        S.LINE: line,
        S.STATION: station,
        S.CAPTURED_AT: captured,
        S.TIMESTAMP_SOURCE: source,
        S.PRODUCT_TYPE: product_type,
        S.WIDTH: acc.width,
        S.HEIGHT: acc.height,
        S.MODE: acc.mode,
        S.BIT_DEPTH: acc.bit_depth,
        S.CONVERTED_FROM_RGB: acc.converted_from_rgb,
        S.STORE_PATH: f"{C.STORE_DIR}/{acc.store_relpath}",
        S.INGESTED_AT: C.utcnow(),
        S.INGEST_RUN_ID: run_id,
        S.DATE: captured.astimezone(dt.UTC).strftime("%Y-%m-%d"),
        S.SPLIT: None,
        S.FLAGS: flags,
    }
