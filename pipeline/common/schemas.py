"""Column names and versioned pyarrow schemas of the linewatch tables.

Every Parquet file linewatch writes carries ``SCHEMA_VERSION`` and the table name in its key/value metadata
(``linewatch.schema_version``, ``linewatch.table``), so a reader can refuse or migrate files written by another
version. The tables:

* **catalog**: one row per registered image, hive-partitioned by ``line`` and ``date`` (the UTC date of
  ``captured_at``). Partition columns live in the directory names, not in the files (``FILE_CATALOG_SCHEMA``).
* **duplicates**: files whose bytes were already registered under another name or path.
* **quarantine**: rejected files with a machine-readable ``reason_code`` and a human ``reason``.
* **splits**: an append-only overlay that assigns a ``split`` (e.g. "train", "calibration") to image ids.
* **latents**: per-image latent vectors ``z_0..z_{d-1}`` written by the encode stage (``latents_schema(d)``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

SCHEMA_VERSION = "1"
"""Bump when a column is added, removed or changes type; stored in every Parquet file's metadata."""

META_VERSION_KEY = b"linewatch.schema_version"
META_TABLE_KEY = b"linewatch.table"

# --- catalog columns -------------------------------------------------------------------------------------------
IMAGE_ID = "image_id"
SHA256 = "sha256"
SOURCE_PATH = "source_path"
SOURCE_SIZE = "source_size"
SOURCE_MTIME_NS = "source_mtime_ns"
LINE = "line"
STATION = "station"
CAPTURED_AT = "captured_at"
TIMESTAMP_SOURCE = "timestamp_source"
PRODUCT_TYPE = "product_type"
WIDTH = "width"
HEIGHT = "height"
MODE = "mode"
BIT_DEPTH = "bit_depth"
CONVERTED_FROM_RGB = "converted_from_rgb"
STORE_PATH = "store_path"
INGESTED_AT = "ingested_at"
INGEST_RUN_ID = "ingest_run_id"
DATE = "date"
SPLIT = "split"
FLAGS = "flags"
SAMPLE_KIND = "sample_kind"
GOLDEN_CELL = "golden_cell"

# --- duplicates / quarantine / splits columns ------------------------------------------------------------------
DUPLICATE_OF = "duplicate_of"
SEEN_AT = "seen_at"
PATH = "path"
REASON_CODE = "reason_code"
REASON = "reason"
QUARANTINED_TO = "quarantined_to"
AT = "at"
ASSIGNED_AT = "assigned_at"
MODEL_ID = "model_id"

TIMESTAMP_SOURCES = ("mes", "file_mtime", "ingest_time")
"""Allowed values of ``timestamp_source``: the MES export listed the serial, or the file's mtime was used, or (when
neither time is plausible) the time the image was ingested."""

SAMPLE_KINDS: tuple[str, ...] = ("production", "golden")
"""Values of ``sample_kind`` (catalog column and MES export field): a production cell, or a capture of one of the
line's fixed golden (reference) cells, re-imaged at the start of every shift to check the camera. A null value (a
catalog written before the column existed, a MES export without the field) means ``production``."""


def parse_sample_kind(value: Any) -> str:
    """The sample kind of one MES row: ``"production"`` or ``"golden"`` (an empty or missing value is production).

    Raises:
        ValueError: an unknown kind, with the accepted values.
    """
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "production"
    text = str(value).strip().lower()
    if text == "":
        return "production"
    if text not in SAMPLE_KINDS:
        raise ValueError(f"unknown sample_kind {str(value)[:40]!r}: choose from {', '.join(SAMPLE_KINDS)} "
                         "(empty = production)")
    return text


def golden_mask(df: pd.DataFrame) -> np.ndarray:
    """True for the rows of ``df`` that are golden-sample captures (no ``sample_kind`` column: none are)."""
    if SAMPLE_KIND not in df.columns:
        return np.zeros(len(df), dtype=bool)
    return (df[SAMPLE_KIND].astype(object).fillna("production").astype(str) == "golden").to_numpy()


PARTITION_COLUMNS = (LINE, DATE)

_TS = pa.timestamp("us", tz="UTC")

PARTITION_SCHEMA = pa.schema(
    [pa.field(LINE, pa.string(), nullable=False), pa.field(DATE, pa.string(), nullable=False)]
)
"""Hive partition keys of the catalog: ``line=<line>/date=<YYYY-MM-DD>``."""

CATALOG_SCHEMA = pa.schema(
    [
        pa.field(IMAGE_ID, pa.string(), nullable=False),
        pa.field(SHA256, pa.string(), nullable=False),
        pa.field(SOURCE_PATH, pa.string(), nullable=False),
        pa.field(SOURCE_SIZE, pa.int64(), nullable=False),
        pa.field(SOURCE_MTIME_NS, pa.int64(), nullable=False),
        pa.field(LINE, pa.string(), nullable=False),
        pa.field(STATION, pa.string(), nullable=False),
        pa.field(CAPTURED_AT, _TS, nullable=False),
        pa.field(TIMESTAMP_SOURCE, pa.string(), nullable=False),
        pa.field(PRODUCT_TYPE, pa.string(), nullable=True),
        pa.field(WIDTH, pa.int32(), nullable=False),
        pa.field(HEIGHT, pa.int32(), nullable=False),
        pa.field(MODE, pa.string(), nullable=False),
        pa.field(BIT_DEPTH, pa.int8(), nullable=False),
        pa.field(CONVERTED_FROM_RGB, pa.bool_(), nullable=False),
        pa.field(STORE_PATH, pa.string(), nullable=False),
        pa.field(INGESTED_AT, _TS, nullable=False),
        pa.field(INGEST_RUN_ID, pa.string(), nullable=False),
        pa.field(DATE, pa.string(), nullable=False),
        pa.field(SPLIT, pa.string(), nullable=True),
        pa.field(FLAGS, pa.list_(pa.string()), nullable=True),
        pa.field(SAMPLE_KIND, pa.string(), nullable=True),
        pa.field(GOLDEN_CELL, pa.string(), nullable=True),
    ]
)
"""The logical catalog row as readers see it (partition columns included). ``sample_kind`` (null = production) and
``golden_cell`` (the golden cell's id, for golden captures) are null in part files written before they existed."""

FILE_CATALOG_SCHEMA = pa.schema([f for f in CATALOG_SCHEMA if f.name not in PARTITION_COLUMNS])
"""What a catalog part file physically holds: the partition columns are encoded in its directory."""

DUPLICATES_SCHEMA = pa.schema(
    [
        pa.field(SOURCE_PATH, pa.string(), nullable=False),
        pa.field(SOURCE_SIZE, pa.int64(), nullable=False),
        pa.field(SOURCE_MTIME_NS, pa.int64(), nullable=False),
        pa.field(SHA256, pa.string(), nullable=False),
        pa.field(DUPLICATE_OF, pa.string(), nullable=False),
        pa.field(SEEN_AT, _TS, nullable=False),
        pa.field(INGEST_RUN_ID, pa.string(), nullable=False),
    ]
)
"""Same bytes seen under another name: ``duplicate_of`` is the registered ``image_id``."""

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field(PATH, pa.string(), nullable=False),
        pa.field(SOURCE_SIZE, pa.int64(), nullable=True),
        pa.field(SOURCE_MTIME_NS, pa.int64(), nullable=True),
        pa.field(SHA256, pa.string(), nullable=True),
        pa.field(REASON_CODE, pa.string(), nullable=False),
        pa.field(REASON, pa.string(), nullable=False),
        pa.field(QUARANTINED_TO, pa.string(), nullable=True),
        pa.field(AT, _TS, nullable=False),
        pa.field(INGEST_RUN_ID, pa.string(), nullable=False),
    ]
)
"""Rejected files. ``sha256`` is null when the bytes were never read (symlinks, bad names, zero-byte files)."""

SPLITS_SCHEMA = pa.schema(
    [
        pa.field(IMAGE_ID, pa.string(), nullable=False),
        pa.field(SPLIT, pa.string(), nullable=True),
        pa.field(ASSIGNED_AT, _TS, nullable=False),
    ]
)
"""Split assignments; the latest ``assigned_at`` per image wins. A null split clears an assignment."""


def latent_columns(d: int) -> list[str]:
    """Names of the ``d`` latent columns, ``["z_0", ..., "z_{d-1}"]``."""
    if d < 1:
        raise ValueError(f"latent dimension must be >= 1, got {d}")
    return [f"z_{i}" for i in range(d)]


def latent_indices(columns: Any) -> list[int]:
    """Sorted indices ``k`` of the ``z_k`` columns among ``columns`` (the one parser of latent column names)."""
    return sorted(int(c[2:]) for c in columns if isinstance(c, str) and c.startswith("z_") and c[2:].isdigit())


def z_columns(df: pd.DataFrame) -> list[str]:
    """The latent columns ``z_0..z_{d-1}`` of a table, in index order; ValueError if there are none or gaps."""
    idx = latent_indices(df.columns)
    if not idx:
        raise ValueError("table has no latent columns z_0..z_{d-1}")
    if idx != list(range(len(idx))):
        raise ValueError(f"latent columns are not contiguous z_0..z_{len(idx) - 1}: found indices {idx[:10]}...")
    return latent_columns(len(idx))


def latent_matrix(df: pd.DataFrame) -> np.ndarray:
    """The ``(N, d)`` float64 matrix of a latents table's ``z_*`` columns."""
    return df[z_columns(df)].to_numpy(dtype=np.float64)


def residual_columns(n: int) -> list[str]:
    """Column names of ``n`` residuals in a latents / reference table: ``r_0 .. r_{n-1}``."""
    return [f"r_{i}" for i in range(n)]


def as_latent_matrix(Z: Any, name: str = "Z") -> np.ndarray:
    """Validate and convert latents to a float64 matrix (N, d).

    Args:
        Z: array-like (N, d), or a DataFrame; from a DataFrame the ``z_0..z_{d-1}`` columns are taken when present
            (the latents table), otherwise all columns (which must then be numeric).
        name: how the input is called in error messages.

    Returns:
        float64 array (N, d), C-contiguous.

    Raises:
        ValueError: not 2-D, empty, non-numeric, or containing NaN/inf.
    """
    if hasattr(Z, "columns"):  # pandas DataFrame: prefer the latents-table columns
        if latent_indices(Z.columns):
            Z = Z[z_columns(Z)]
        Z = Z.to_numpy()
    try:
        arr = np.asarray(Z, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array of shape (n_samples, n_features): {exc}") from exc
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (n_samples, n_features), got shape {arr.shape}; "
            "reshape a single sample with Z.reshape(1, -1)"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise ValueError(
            f"{name} contains NaN or inf in {rows.size} row(s) (first: {rows[:5].tolist()}); "
            "drop or re-encode those images before scoring"
        )
    return np.ascontiguousarray(arr)


def latents_schema(d: int, score_columns: tuple[str, ...] | list[str] = ()) -> pa.Schema:
    """Schema of the latents table written by the encode stage.

    Args:
        d: Latent dimension; columns ``z_0..z_{d-1}`` are float32.
        score_columns: Optional extra float64 columns (anomaly scores) appended after the latents.

    Returns:
        ``image_id, model_id, z_0..z_{d-1}[, scores...]`` with the schema version in its metadata.
    """
    fields = [
        pa.field(IMAGE_ID, pa.string(), nullable=False),
        pa.field(MODEL_ID, pa.string(), nullable=False),
    ]
    fields += [pa.field(name, pa.float32(), nullable=False) for name in latent_columns(d)]
    taken = {f.name for f in fields}
    for name in score_columns:
        if name in taken:
            raise ValueError(f"score column {name!r} clashes with an existing latents column")
        taken.add(name)
        fields.append(pa.field(name, pa.float64(), nullable=True))
    return with_version(pa.schema(fields), "latents")


def with_version(schema: pa.Schema, table: str) -> pa.Schema:
    """Return ``schema`` with ``SCHEMA_VERSION`` and the table name stored in its metadata."""
    meta = dict(schema.metadata or {})
    meta[META_VERSION_KEY] = SCHEMA_VERSION.encode()
    meta[META_TABLE_KEY] = table.encode()
    return schema.with_metadata(meta)


def schema_version_of(schema: pa.Schema) -> str | None:
    """The linewatch schema version recorded in a file's schema metadata, or None if absent."""
    meta = schema.metadata or {}
    raw = meta.get(META_VERSION_KEY)
    return raw.decode() if raw is not None else None


CATALOG_SCHEMA = with_version(CATALOG_SCHEMA, "catalog")
FILE_CATALOG_SCHEMA = with_version(FILE_CATALOG_SCHEMA, "catalog")
DUPLICATES_SCHEMA = with_version(DUPLICATES_SCHEMA, "duplicates")
QUARANTINE_SCHEMA = with_version(QUARANTINE_SCHEMA, "quarantine")
SPLITS_SCHEMA = with_version(SPLITS_SCHEMA, "splits")

TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "catalog": FILE_CATALOG_SCHEMA,
    "duplicates": DUPLICATES_SCHEMA,
    "quarantine": QUARANTINE_SCHEMA,
    "splits": SPLITS_SCHEMA,
}
"""Physical schema of each table's part files, by table name."""
