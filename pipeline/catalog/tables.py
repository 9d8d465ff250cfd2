"""The Parquet catalog of registered images: layout, atomic publishing, reads, snapshots, stats.

Layout under a catalog root (``default_root()``: ``$LINEWATCH_HOME`` or ``./.linewatch``)::

    <root>/catalog/line=<L>/date=<YYYY-MM-DD>/part-<run_id>-<seq>.parquet   registered images (hive partitions)
    <root>/tables/duplicates/part-<run_id>-<seq>.parquet                    same bytes under another name
    <root>/tables/quarantine/part-<run_id>-<seq>.parquet                    rejected files and why
    <root>/tables/splits/part-<stamp>.parquet                               split assignments (append-only)
    <root>/store/<ab>/<cd>/<sha256>.<ext>                                   content-addressed image bytes
    <root>/quarantine/<run_id>/<relative path in the drop folder>           copies (or moves) of rejected files
    <root>/snapshots/<digest>.json, <digest>.parquet                        frozen image sets
    <root>/runs/<run_id>.json                                               one summary per finished ingest run
    <root>/.lock, <root>/.lock.owner                                        the writer lock and who holds it

Files are never rewritten in place: a part file is written under a hidden temporary name (``.tmp-*``) in its
final directory and published with ``os.replace``. Readers only look at ``part-*.parquet``, so a crash at any
point leaves a readable catalog; at worst a stray ``.tmp-*`` file, which ``clean_temporary`` removes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from pipeline.catalog.store import ContentStore
from pipeline.common import atomic
from pipeline.common import schemas as S

CATALOG_DIR = "catalog"
TABLES_DIR = "tables"
STORE_DIR = "store"
QUARANTINE_DIR = "quarantine"
SNAPSHOTS_DIR = "snapshots"
RUNS_DIR = "runs"
LOCK_FILE = ".lock"
LOCK_OWNER_FILE = ".lock.owner"
TMP_PREFIX = atomic.TMP_PREFIX

TimeLike = str | dt.datetime | dt.date | pd.Timestamp
T = TypeVar("T")
READ_TRIES = 6


def default_root() -> Path:
    """The catalog root: ``$LINEWATCH_HOME`` if set, else ``./.linewatch``."""
    return Path(os.environ.get("LINEWATCH_HOME", ".linewatch"))


def new_run_id(prefix: str = "") -> str:
    """A sortable, unique run id such as ``20261127T221500123456Z-3f9a1c`` (UTC, microseconds)."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{prefix}{stamp}-{uuid.uuid4().hex[:6]}"


def utcnow() -> dt.datetime:
    """The current time, timezone-aware UTC, truncated to microseconds."""
    return dt.datetime.now(dt.UTC)


# ----------------------------------------------------------------------------------------------------------------
# locking


class CatalogLockedError(RuntimeError):
    """Another writer holds the catalog lock and did not release it within the timeout."""


def lock_owner(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Who holds (or last held) the writer lock, from ``<root>/.lock.owner``; None if unknown."""
    try:
        return json.loads((Path(root) / LOCK_OWNER_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@contextlib.contextmanager
def catalog_lock(
    root: str | os.PathLike[str], *, timeout: float = 10.0, purpose: str = "write"
) -> Iterator[None]:
    """Hold the catalog's writer lock; concurrent writers serialise here.

    Args:
        root: Catalog root.
        timeout: Seconds to wait for the lock; ``-1`` waits forever, ``0`` tries once.
        purpose: Recorded in the owner side file (``ingest <run id>``, ``compact`` ...).

    Raises:
        CatalogLockedError: The lock was not acquired in time; the message names the holder's pid and purpose.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / LOCK_FILE))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        owner = lock_owner(root) or {}
        holder = (
            f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} ({owner.get('purpose', '?')}, "
            f"since {owner.get('since', '?')})"
        )
        raise CatalogLockedError(
            f"the catalog at {root} is locked by {holder}; waited {timeout:g} s. Wait for it to finish or "
            f"retry with a longer --lock-timeout. If that process is gone the lock frees itself."
        ) from None
    try:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "purpose": purpose,
            "since": utcnow().isoformat(),
        }
        _atomic_write_text(root / LOCK_OWNER_FILE, json.dumps(info))
        finish_pending(root)
        yield
    finally:
        lock.release()


# ----------------------------------------------------------------------------------------------------------------
# the journal of row rewrites (``pipeline.catalog.rewrite``), settled by every lock holder

PENDING_SUFFIX = ".pending.json"


def _journal_path(root: Path, run_id: str) -> Path:
    return root / RUNS_DIR / f"{run_id}{PENDING_SUFFIX}"


def _remove_replaced(files: Iterable[str]) -> None:
    for f in files:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f)


def finish_pending(root: str | os.PathLike[str]) -> int:
    """Complete (or undo) a ``rewrite_rows`` that a crash interrupted. Called by every lock holder.

    A journal names the new parts and the old parts they replace. When every new part was published the old ones
    are removed (redo); otherwise the new ones that exist are removed (undo), which restores the old state.

    Returns:
        How many journals were settled.
    """
    folder = Path(root) / RUNS_DIR
    n = 0
    for journal in sorted(folder.glob(f"*{PENDING_SUFFIX}")) if folder.is_dir() else []:
        try:
            doc = json.loads(journal.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # half-written journal: written before any new part, nothing to do but drop it
        else:
            if all(os.path.exists(f) for f in doc["new"]):
                _remove_replaced(doc["old"])
            else:
                _remove_replaced(doc["new"])
        journal.unlink()
        n += 1
    return n



# ----------------------------------------------------------------------------------------------------------------
# atomic publishing


def write_text_atomic(path: Path, text: str) -> None:
    """Replace a small text file atomically (temporary file in the same folder, then ``os.replace``)."""
    _atomic_write_text(path, text)


def _atomic_write_text(path: Path, text: str) -> None:
    atomic.write_text(path, text)


def publish_parquet(table: pa.Table, final: Path) -> Path:
    """Write ``table`` to ``final`` atomically (temporary file in the same directory, then ``os.replace``)."""
    return atomic.write_parquet(final, table, compression="zstd")


def _is_part(name: str) -> bool:
    return name.startswith("part-") and name.endswith(".parquet")


def partition_dir(root: str | os.PathLike[str], line: str, date: str) -> Path:
    """Directory of one catalog partition."""
    return Path(root) / CATALOG_DIR / f"line={line}" / f"date={date}"


def write_catalog_rows(root: str | os.PathLike[str], table: pa.Table, part_name: str) -> list[Path]:
    """Publish catalog rows, one part file per (line, date) partition present in ``table``.

    Args:
        root: Catalog root.
        table: Rows conforming to ``CATALOG_SCHEMA`` (partition columns included).
        part_name: File name stem shared by the parts, e.g. ``part-<run_id>-00001``.

    Returns:
        The published files. Each is atomic on its own; rows are unique per image, so a crash between two
        partitions leaves every row either published once or not at all.
    """
    if table.num_rows == 0:
        return []
    table = table.select(S.CATALOG_SCHEMA.names).cast(S.CATALOG_SCHEMA)
    table = table.sort_by([(S.LINE, "ascending"), (S.DATE, "ascending"), (S.CAPTURED_AT, "ascending")])
    # one pass: run boundaries of (line, date) in the sorted table
    key = pc.binary_join_element_wise(table[S.LINE], table[S.DATE], "\x00").to_pylist()
    out = []
    start = 0
    for i in range(1, len(key) + 1):
        if i < len(key) and key[i] == key[start]:
            continue
        part = table.slice(start, i - start)
        line, date = part[S.LINE][0].as_py(), part[S.DATE][0].as_py()
        part = part.select(S.FILE_CATALOG_SCHEMA.names).cast(S.FILE_CATALOG_SCHEMA)
        out.append(publish_parquet(part, partition_dir(root, line, date) / f"{part_name}.parquet"))
        start = i
    return out


def append_table(root: str | os.PathLike[str], name: str, table: pa.Table, part_name: str) -> Path | None:
    """Publish rows of a side table (``duplicates``, ``quarantine``, ``splits``) as one new part file."""
    if name not in S.TABLE_SCHEMAS or name == "catalog":
        raise ValueError(f"unknown side table {name!r}; expected duplicates, quarantine or splits")
    if table.num_rows == 0:
        return None
    schema = S.TABLE_SCHEMAS[name]
    table = table.select(schema.names).cast(schema)
    return publish_parquet(table, Path(root) / TABLES_DIR / name / f"{part_name}.parquet")


def read_table(root: str | os.PathLike[str], name: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read a whole side table (``duplicates``, ``quarantine``, ``splits``) as a DataFrame (empty if none)."""
    if name not in S.TABLE_SCHEMAS or name == "catalog":
        raise ValueError(f"unknown side table {name!r}; expected duplicates, quarantine or splits")
    schema = S.TABLE_SCHEMAS[name]
    folder = Path(root) / TABLES_DIR / name
    cols = list(columns) if columns is not None else schema.names

    def read() -> pd.DataFrame:
        files = sorted(str(folder / n) for n in os.listdir(folder) if _is_part(n)) if folder.is_dir() else []
        if not files:
            return schema.empty_table().select(cols).to_pandas()
        return ds.dataset(files, schema=schema, format="parquet").to_table(columns=cols).to_pandas()

    return _consistent(read)


def _consistent(read: Callable[[], T]) -> T:
    """Run ``read`` (a listing of part files and a read of them) again when a listed file vanished.

    ``compact`` and ``rewrite_rows`` publish the new parts before they remove the old ones, so a fresh listing
    always holds every row: a reader sees either the old or the new parts, never an error.
    """
    for attempt in range(READ_TRIES):
        try:
            return read()
        except FileNotFoundError:
            if attempt + 1 == READ_TRIES:
                raise
            time.sleep(0.005 * 2**attempt)
    raise AssertionError("unreachable")  # pragma: no cover


# ----------------------------------------------------------------------------------------------------------------
# reads


def _to_utc(value: TimeLike) -> pd.Timestamp:
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _partition_files(
    root: Path,
    lines: set[str] | None,
    first_date: str | None,
    last_date: str | None,
    pairs: set[tuple[str, str]] | None = None,
) -> list[str]:
    """The part files of the partitions a line set, a date range or explicit ``(line, date)`` pairs select."""
    base = root / CATALOG_DIR
    if not base.is_dir():
        return []
    files: list[str] = []
    with os.scandir(base) as it:
        line_dirs = sorted(e.name for e in it if e.is_dir() and e.name.startswith("line="))
    for ldir in line_dirs:
        if lines is not None and ldir[len("line=") :] not in lines:
            continue
        with os.scandir(base / ldir) as it:
            date_dirs = sorted(e.name for e in it if e.is_dir() and e.name.startswith("date="))
        for ddir in date_dirs:
            day = ddir[len("date=") :]
            if (first_date is not None and day < first_date) or (last_date is not None and day > last_date):
                continue
            if pairs is not None and (ldir[len("line=") :], day) not in pairs:
                continue
            folder = base / ldir / ddir
            files.extend(str(folder / n) for n in sorted(os.listdir(folder)) if _is_part(n))
    return files


def _latest_splits(root: Path) -> pd.DataFrame:
    splits = read_table(root, "splits")
    if splits.empty:
        return splits[[S.IMAGE_ID, S.SPLIT]]
    splits = splits.sort_values(S.ASSIGNED_AT, kind="stable").drop_duplicates(S.IMAGE_ID, keep="last")
    return splits[[S.IMAGE_ID, S.SPLIT]]


def read_catalog(
    root: str | os.PathLike[str] | None = None,
    *,
    lines: Iterable[str] | str | None = None,
    stations: Iterable[str] | str | None = None,
    start: TimeLike | None = None,
    end: TimeLike | None = None,
    split: Iterable[str] | str | None = None,
    image_ids: Iterable[str] | None = None,
    columns: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Read registered images, pruning partitions by line and date before touching any file.

    Args:
        root: Catalog root (default ``default_root()``).
        lines: Keep these lines only.
        stations: Keep these stations only.
        start: Inclusive lower bound on ``captured_at`` (naive times are taken as UTC).
        end: Exclusive upper bound on ``captured_at``.
        split: Keep images whose current split assignment is one of these.
        image_ids: Keep these image ids only.
        columns: Columns to return (default all of ``CATALOG_SCHEMA``).

    Returns:
        One row per image, sorted by ``captured_at`` then ``image_id``; ``captured_at`` is tz-aware UTC.
    """
    root = Path(root) if root is not None else default_root()
    as_set = lambda v: None if v is None else ({v} if isinstance(v, str) else set(v))  # noqa: E731
    lines_s, stations_s, split_s = as_set(lines), as_set(stations), as_set(split)
    ids_s = None if image_ids is None else set(image_ids)
    cols = list(columns) if columns is not None else list(S.CATALOG_SCHEMA.names)
    unknown = [c for c in cols if c not in S.CATALOG_SCHEMA.names]
    if unknown:
        raise ValueError(f"unknown catalog columns {unknown}; known: {S.CATALOG_SCHEMA.names}")
    t0 = _to_utc(start) if start is not None else None
    t1 = _to_utc(end) if end is not None else None
    if t0 is not None and t1 is not None and t1 <= t0:
        raise ValueError(f"empty time window: end {t1} is not after start {t0}")
    first_date = t0.strftime("%Y-%m-%d") if t0 is not None else None
    last_date = (t1 - pd.Timedelta(microseconds=1)).strftime("%Y-%m-%d") if t1 is not None else None

    conds = []
    if t0 is not None:
        conds.append(
            ds.field(S.CAPTURED_AT) >= pa.scalar(t0.to_pydatetime(), type=pa.timestamp("us", tz="UTC"))
        )
    if t1 is not None:
        conds.append(
            ds.field(S.CAPTURED_AT) < pa.scalar(t1.to_pydatetime(), type=pa.timestamp("us", tz="UTC"))
        )
    if stations_s is not None:
        conds.append(ds.field(S.STATION).isin(sorted(stations_s)))
    if ids_s is not None:
        conds.append(ds.field(S.IMAGE_ID).isin(sorted(ids_s)))
    return _consistent(
        lambda: _frame_from_files(root, _partition_files(root, lines_s, first_date, last_date), cols, conds, split_s)
    )


def _frame_from_files(
    root: Path, files: list[str], cols: list[str], conds: list[ds.Expression], split_s: set[str] | None
) -> pd.DataFrame:
    """Read part files with filters, drop compaction leftovers, apply the split overlay, sort."""
    if not files:
        return S.CATALOG_SCHEMA.empty_table().select(cols).to_pandas()
    need = list(dict.fromkeys([*cols, S.IMAGE_ID, S.CAPTURED_AT]))
    dataset = _dataset(root, files)
    expr = None
    for cond in conds:
        expr = cond if expr is None else (expr & cond)
    df = dataset.to_table(columns=need, filter=expr).to_pandas()
    if df[S.IMAGE_ID].duplicated().any():  # only after an interrupted compaction: both copies are identical
        df = df.drop_duplicates(S.IMAGE_ID, keep="first")
    if S.SPLIT in cols or split_s is not None:
        overlay = _latest_splits(root)
        if not overlay.empty:
            mapped = df[S.IMAGE_ID].map(overlay.set_index(S.IMAGE_ID)[S.SPLIT])
            base = df[S.SPLIT] if S.SPLIT in df else pd.Series(None, index=df.index, dtype=object)
            df[S.SPLIT] = mapped.where(df[S.IMAGE_ID].isin(overlay[S.IMAGE_ID]), base)
        elif S.SPLIT not in df:
            df[S.SPLIT] = None
        if split_s is not None:
            df = df[df[S.SPLIT].isin(split_s)]
    df = df.sort_values([S.CAPTURED_AT, S.IMAGE_ID], kind="stable")
    return df[cols].reset_index(drop=True)


def scan_catalog(
    root: str | os.PathLike[str], columns: Sequence[str], *, lines: Iterable[str] | None = None
) -> pa.Table:
    """Bulk read of some catalog columns as an Arrow table: unsorted, no split overlay, no pandas.

    For whole-catalog work (ingest start-up, stats) where ``read_catalog``'s sorting and conversion would dominate.
    Rows left twice by an interrupted compaction are not removed here; callers that care use ``image_id``.
    """
    cols = list(columns)
    unknown = [c for c in cols if c not in S.CATALOG_SCHEMA.names or c == S.SPLIT]
    if unknown:
        raise ValueError(f"scan_catalog cannot read columns {unknown}")
    lines_s = None if lines is None else set(lines)

    def read() -> pa.Table:
        files = _partition_files(Path(root), lines_s, None, None)
        if not files:
            return S.CATALOG_SCHEMA.empty_table().select(cols)
        return _dataset(Path(root), files).to_table(columns=cols)

    return _consistent(read)


def _dataset(root: Path, files: list[str]) -> ds.Dataset:
    return ds.dataset(
        files,
        schema=S.CATALOG_SCHEMA,
        format="parquet",
        partitioning=ds.partitioning(S.PARTITION_SCHEMA, flavor="hive"),
        partition_base_dir=str(root / CATALOG_DIR),
    )


def serial_of(source_path: str | os.PathLike[str] | None) -> str:
    """The MES serial of a catalogued image: the file name of its source without the extension.

    Ingestion reads ``DROP/<line>/<date>/<serial>.<ext>`` and looks the serial up in the MES export, so the serial is
    what a person on the line finds on the part; the content hash (``image_id``, ``store_path``) is not.
    """
    if source_path is None or (isinstance(source_path, float) and source_path != source_path):
        return ""
    name = os.path.basename(str(source_path).replace("\\", "/"))
    return name.rsplit(".", 1)[0] if "." in name else name


def serials_by_sha256(root: str | os.PathLike[str] | None, digests: Iterable[str]) -> dict[str, str]:
    """``sha256 -> serial`` of the given digests that are registered in the catalog (others are left out)."""
    wanted = {str(d) for d in digests if d}
    if not wanted:
        return {}
    root = Path(root) if root is not None else default_root()
    if not (root / CATALOG_DIR).exists():
        return {}
    cat = read_catalog(root, columns=[S.SHA256, S.SOURCE_PATH])
    cat = cat[cat[S.SHA256].isin(wanted)]
    return {str(r.sha256): serial_of(r.source_path) for r in cat.itertuples(index=False)}


def resolve_store_path(root: str | os.PathLike[str], store_path: str) -> Path:
    """Absolute path of an image from its catalog ``store_path`` (relative to the catalog root)."""
    return Path(root) / store_path


def content_store(root: str | os.PathLike[str], *, fsync: bool = False) -> ContentStore:
    """The content-addressed store of a catalog root."""
    return ContentStore(Path(root) / STORE_DIR, fsync=fsync)


def set_split(
    root: str | os.PathLike[str], image_ids: Iterable[str], split: str | None, *, lock_timeout: float = 10.0
) -> int:
    """Assign ``split`` to images (append-only overlay; the latest assignment wins, None clears it).

    Returns:
        The number of image ids assigned.

    Raises:
        ValueError: An id is not in the catalog.
    """
    ids = sorted(set(image_ids))
    if not ids:
        return 0
    if split is not None and (not split or not split.replace("_", "").replace("-", "").isalnum()):
        raise ValueError(f"split names must be non-empty and alphanumeric (with - or _), got {split!r}")
    present = set(read_catalog(root, image_ids=ids, columns=[S.IMAGE_ID])[S.IMAGE_ID])
    missing = [i for i in ids if i not in present]
    if missing:
        raise ValueError(f"{len(missing)} image ids are not in the catalog, e.g. {missing[:3]}")
    now = utcnow()
    table = pa.table(
        {S.IMAGE_ID: ids, S.SPLIT: [split] * len(ids), S.ASSIGNED_AT: [now] * len(ids)},
        schema=S.SPLITS_SCHEMA,
    )
    with catalog_lock(root, timeout=lock_timeout, purpose="set_split"):
        append_table(root, "splits", table, f"part-{new_run_id()}")
    return len(ids)


# ----------------------------------------------------------------------------------------------------------------
# snapshots


@dataclass(frozen=True)
class Snapshot:
    """A frozen, named set of images.

    Attributes:
        digest: sha256 over the sorted ``image_id<TAB>sha256`` lines; order-independent and stable.
        n_images: How many images it names.
        path: The snapshot's JSON descriptor.
        name: The name given when it was first taken.
    """

    digest: str
    n_images: int
    path: Path
    name: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def snapshot_digest(pairs: Iterable[tuple[str, str]]) -> str:
    """Digest of a set of ``(image_id, sha256)`` pairs: sha256 over the sorted, newline-joined pairs."""
    h = hashlib.sha256()
    for image_id, sha in sorted(set(pairs)):
        h.update(f"{image_id}\t{sha}\n".encode())
    return h.hexdigest()


def snapshot(
    data: pd.DataFrame | Mapping[str, Any],
    name: str,
    root: str | os.PathLike[str] | None = None,
) -> Snapshot:
    """Freeze "the exact set of images used for X" and return its digest.

    Args:
        data: A catalog DataFrame (needs ``image_id`` and ``sha256``) or a mapping of ``read_catalog``
            keyword arguments (``{"lines": "L1", "start": ..., "end": ...}``).
        name: What the set is for (``train-2026-11``, ``monitor-L1-2026-11-27``).
        root: Catalog root (default ``default_root()``).

    Returns:
        The snapshot. Taking the same set twice gives the same digest (the files are written once).

    Raises:
        ValueError: The set is empty, names unknown columns, or has one image id with two digests.
    """
    root = Path(root) if root is not None else default_root()
    if not name or any(c in name for c in "/\\\n\t"):
        raise ValueError(f"snapshot names must be non-empty without slashes or control characters: {name!r}")
    query: dict[str, Any] | None = None
    if isinstance(data, Mapping):
        query = {k: (str(v) if isinstance(v, dt.date | pd.Timestamp) else v) for k, v in data.items()}
        query = {k: (sorted(v) if isinstance(v, set | tuple) else v) for k, v in query.items()}
        data = read_catalog(root, **dict(data), columns=[S.IMAGE_ID, S.SHA256, S.LINE, S.DATE])
    missing = [c for c in (S.IMAGE_ID, S.SHA256) if c not in data.columns]
    if missing:
        raise ValueError(
            f"snapshot needs columns {missing}; pass a catalog DataFrame or a read_catalog query"
        )
    if data.empty:
        raise ValueError(f"snapshot {name!r} would name zero images; check the query or DataFrame")
    if data.groupby(S.IMAGE_ID)[S.SHA256].nunique().max() > 1:
        raise ValueError("an image_id appears with two different sha256 values; the input is inconsistent")
    cols = [c for c in (S.IMAGE_ID, S.SHA256, S.LINE, S.DATE) if c in data.columns]
    ids = data[cols].drop_duplicates(S.IMAGE_ID).sort_values(S.IMAGE_ID).reset_index(drop=True)
    digest = snapshot_digest(zip(ids[S.IMAGE_ID], ids[S.SHA256], strict=True))
    folder = root / SNAPSHOTS_DIR
    desc_path = folder / f"{digest}.json"
    if desc_path.exists():
        desc = json.loads(desc_path.read_text())
        if name not in desc["names"]:
            desc["names"].append(name)
            _atomic_write_text(desc_path, json.dumps(desc, indent=1))
        return Snapshot(digest, int(desc["n_images"]), desc_path, desc["name"])
    publish_parquet(pa.Table.from_pandas(ids, preserve_index=False), folder / f"{digest}.parquet")
    desc = {
        "digest": digest,
        "name": name,
        "names": [name],
        "n_images": len(ids),
        "created_at": utcnow().isoformat(),
        "schema_version": S.SCHEMA_VERSION,
        "query": query,
        "ids_file": f"{digest}.parquet",
    }
    _atomic_write_text(desc_path, json.dumps(desc, indent=1, default=str))  # written last: the publish step
    return Snapshot(digest, len(ids), desc_path, name)


def _resolve_digest(root: Path, digest: str) -> str:
    folder = root / SNAPSHOTS_DIR
    if len(digest) < 8:
        raise ValueError(f"give at least 8 hex characters of the snapshot digest, got {digest!r}")
    hits = sorted(p.stem for p in folder.glob(f"{digest}*.json")) if folder.is_dir() else []
    if not hits:
        raise ValueError(f"no snapshot {digest!r} under {folder}")
    if len(hits) > 1:
        raise ValueError(f"snapshot prefix {digest!r} is ambiguous: {hits[:5]}")
    return hits[0]


def list_snapshots(root: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """All snapshots under a root: digest, name, names, n_images, created_at."""
    root = Path(root) if root is not None else default_root()
    folder = root / SNAPSHOTS_DIR
    rows = []
    for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if p.name.startswith("."):
            continue
        d = json.loads(p.read_text())
        rows.append({k: d.get(k) for k in ("digest", "name", "names", "n_images", "created_at")})
    return pd.DataFrame(rows, columns=["digest", "name", "names", "n_images", "created_at"])


def load_snapshot(
    root: str | os.PathLike[str] | None, digest: str, columns: Sequence[str] | None = None
) -> pd.DataFrame:
    """The catalog rows of a snapshot, exactly the images it froze (sorted by image_id).

    Args:
        root: Catalog root (None: ``default_root()``).
        digest: Full digest or a unique prefix of at least 8 characters.
        columns: Catalog columns to return (default all).

    Raises:
        ValueError: Unknown digest, or the catalog no longer holds every image of the snapshot.
    """
    root = Path(root) if root is not None else default_root()
    digest = _resolve_digest(root, digest)
    ids = pq.read_table(root / SNAPSHOTS_DIR / f"{digest}.parquet").to_pandas()
    if snapshot_digest(zip(ids[S.IMAGE_ID], ids[S.SHA256], strict=True)) != digest:
        raise ValueError(f"snapshot {digest} is corrupt: its id list does not hash to its digest")
    cols = list(columns) if columns is not None else list(S.CATALOG_SCHEMA.names)
    need = list(dict.fromkeys([*cols, S.IMAGE_ID, S.SHA256]))
    id_cond = [ds.field(S.IMAGE_ID).isin(ids[S.IMAGE_ID].tolist())]
    # read only the partitions the snapshot's images live in (all of them for old id lists without line/date)
    pairs = set(zip(ids[S.LINE], ids[S.DATE], strict=True)) if S.LINE in ids and S.DATE in ids else None
    df = _consistent(
        lambda: _frame_from_files(root, _partition_files(root, None, None, None, pairs), need, id_cond, None)
    )
    moved = sorted(set(ids[S.IMAGE_ID]) - set(df[S.IMAGE_ID]))
    if moved and pairs is not None:  # re-read metadata moved them to another day or line (rewrite_rows)
        cond = [ds.field(S.IMAGE_ID).isin(moved)]
        more = _consistent(lambda: _frame_from_files(root, _partition_files(root, None, None, None), need, cond, None))
        df = pd.concat([df, more], ignore_index=True)
    merged = ids[[S.IMAGE_ID, S.SHA256]].merge(df, on=[S.IMAGE_ID, S.SHA256], how="left", indicator=True)
    lost = merged.loc[merged["_merge"] != "both", S.IMAGE_ID]
    if len(lost):
        raise ValueError(
            f"snapshot {digest[:12]}: {len(lost)} images are no longer in the catalog, e.g. {list(lost[:3])}"
        )
    return merged[cols].sort_values(S.IMAGE_ID).reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------------------
# stats and maintenance


def _dir_bytes(path: Path) -> int:
    total = 0
    if not path.exists():
        return 0
    for dirpath, _dirs, files in os.walk(path):
        for n in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, n)).st_size
    return total


@dataclass(frozen=True)
class CatalogStats:
    """What ``linewatch catalog stats`` shows.

    Attributes:
        n_images: Registered images.
        n_duplicates: Duplicate sightings recorded.
        n_quarantined: Rejected files recorded.
        per_line_day: Rows of ``{"line", "date", "images"}``, sorted.
        quarantine_by_reason: ``reason_code -> count``.
        storage_bytes: Bytes used by ``store``, ``catalog``, ``tables``, ``quarantine``, ``snapshots``.
        n_part_files: Catalog part files (many tiny ones: run ``compact``).
    """

    n_images: int
    n_duplicates: int
    n_quarantined: int
    per_line_day: list[dict[str, Any]] = field(default_factory=list)
    quarantine_by_reason: dict[str, int] = field(default_factory=dict)
    storage_bytes: dict[str, int] = field(default_factory=dict)
    n_part_files: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)


def catalog_stats(root: str | os.PathLike[str] | None = None, *, timezone: str | None = None) -> CatalogStats:
    """Counts per line and day, quarantine counts by reason, and storage used.

    Args:
        root: catalog root (default ``default_root()``).
        timezone: IANA zone of the days counted (the plant's, ``settings.timezone``, as the monitor's day windows and
            the alerts use); None = the partitions' UTC dates.
    """
    root = Path(root) if root is not None else default_root()
    cat = scan_catalog(root, [S.IMAGE_ID, S.LINE, S.DATE, S.CAPTURED_AT])
    if cat.num_rows and pc.count_distinct(cat[S.IMAGE_ID]).as_py() != cat.num_rows:
        cat = pa.Table.from_pandas(cat.to_pandas().drop_duplicates(S.IMAGE_ID), preserve_index=False)
    if timezone and cat.num_rows:
        frame = cat.to_pandas()
        frame[S.DATE] = pd.to_datetime(frame[S.CAPTURED_AT], utc=True).dt.tz_convert(timezone).dt.strftime("%Y-%m-%d")
        cat = pa.Table.from_pandas(frame[[S.IMAGE_ID, S.LINE, S.DATE]], preserve_index=False)
    per = (
        cat.group_by([S.LINE, S.DATE])
        .aggregate([([], "count_all")])
        .to_pandas()
        .rename(columns={"count_all": "images"})[[S.LINE, S.DATE, "images"]]
        .sort_values([S.LINE, S.DATE])
        if cat.num_rows
        else pd.DataFrame(columns=[S.LINE, S.DATE, "images"])
    )
    quarantine = read_table(root, "quarantine", columns=[S.REASON_CODE])
    dups = read_table(root, "duplicates", columns=[S.SHA256])
    by_reason = {str(k): int(v) for k, v in quarantine[S.REASON_CODE].value_counts().sort_index().items()}
    storage = {
        name: _dir_bytes(root / name)
        for name in (STORE_DIR, CATALOG_DIR, TABLES_DIR, QUARANTINE_DIR, SNAPSHOTS_DIR)
    }
    storage["total"] = sum(storage.values())
    return CatalogStats(
        n_images=cat.num_rows,
        n_duplicates=len(dups),
        n_quarantined=len(quarantine),
        per_line_day=[
            {k: (int(v) if k == "images" else str(v)) for k, v in r.items()} for r in per.to_dict("records")
        ],
        quarantine_by_reason=by_reason,
        storage_bytes=storage,
        n_part_files=len(_partition_files(root, None, None, None)),
    )


def compact(
    root: str | os.PathLike[str] | None = None, *, min_files: int = 2, lock_timeout: float = 10.0
) -> int:
    """Merge each partition's part files into one, so many small ingest runs don't leave many tiny files.

    The merged file is published first, then the old parts are removed. A crash in between leaves both; readers
    drop the duplicate rows (same image_id) and the next ``compact`` finishes the job.

    Returns:
        The number of partitions compacted.
    """
    root = Path(root) if root is not None else default_root()
    n = 0
    with catalog_lock(root, timeout=lock_timeout, purpose="compact"):
        by_dir: dict[str, list[str]] = {}
        for f in _partition_files(root, None, None, None):
            by_dir.setdefault(os.path.dirname(f), []).append(f)
        for folder, files in sorted(by_dir.items()):
            if len(files) < min_files:
                continue
            table = ds.dataset(files, schema=S.FILE_CATALOG_SCHEMA, format="parquet").to_table()
            df_ids = table[S.IMAGE_ID].to_pandas()
            keep = ~df_ids.duplicated().to_numpy()
            table = table.filter(pa.array(keep)).sort_by(
                [(S.CAPTURED_AT, "ascending"), (S.IMAGE_ID, "ascending")]
            )
            publish_parquet(table, Path(folder) / f"part-{new_run_id('compact-')}.parquet")
            for f in files:
                os.unlink(f)
            n += 1
    return n


def clean_temporary(
    root: str | os.PathLike[str] | None = None, *, lock_timeout: float = 10.0, min_age_s: float = 600.0
) -> int:
    """Remove ``.tmp-*`` files a crashed writer left behind, under the writer lock. Returns how many.

    Only files older than ``min_age_s`` go: a snapshot or run record (written without the lock) may be in flight.
    """
    root = Path(root) if root is not None else default_root()
    n = 0
    cutoff = time.time() - min_age_s
    with catalog_lock(root, timeout=lock_timeout, purpose="clean"):
        for sub in (CATALOG_DIR, TABLES_DIR, STORE_DIR, SNAPSHOTS_DIR, RUNS_DIR):
            for dirpath, _dirs, files in os.walk(root / sub):
                for name in files:
                    path = os.path.join(dirpath, name)
                    with contextlib.suppress(FileNotFoundError):
                        if name.startswith(TMP_PREFIX) and os.lstat(path).st_mtime <= cutoff:
                            os.unlink(path)
                            n += 1
    return n


def write_run_record(root: str | os.PathLike[str], run_id: str, record: Mapping[str, Any]) -> Path:
    """Publish the JSON record of a finished run under ``<root>/runs/<run_id>.json``."""
    path = Path(root) / RUNS_DIR / f"{run_id}.json"
    _atomic_write_text(path, json.dumps(dict(record), indent=1, default=str))
    return path
