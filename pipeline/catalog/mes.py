"""The MES export of a drop folder: parsing, field validation, plausible capture times.

Each image folder may hold ``mes_export.csv`` (``serial,timestamp,line,station,product_type``, optionally
``sample_kind,golden_cell``; UTF-8 with or without a byte-order mark). Every field is validated against a documented pattern (``FIELD_PATTERNS``) before it reaches the
catalog: a value that does not match is dropped and the row carries a flag, so nothing a MES writes (newlines,
spreadsheet formulas, terminal escapes, megabyte strings) can reach alerts, logs, webhooks or CSV files unchecked.
Capture times outside ``[earliest, now + max_future]`` are flagged ``implausible_mes_timestamp`` and the file time is
used instead; a time that cannot even be converted to UTC (year 1 with a positive offset) is the same case, never an
``OverflowError``.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pandas as pd

from pipeline.catalog import tables as C
from pipeline.common import schemas as S

FIELD_PATTERNS: dict[str, re.Pattern[str]] = {
    "line": re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"),
    "station": re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"),
    "product_type": re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+/-]{0,63}$"),
    "golden_cell": re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"),
}
"""What a MES field must look like to be kept: an ASCII letter or digit first (so never ``=``, ``+``, ``-`` or ``@``,
which spreadsheets run as formulas), then letters, digits and ``._-`` (product types also space, ``+`` and ``/``),
at most 64 characters, no control characters."""

EARLIEST = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
"""Default earliest plausible capture time."""

MES_FLAGS = frozenset(
    {
        "naive_mes_timestamp",
        "bad_mes_timestamp",
        "implausible_mes_timestamp",
        "implausible_file_time",
        "line_mismatch",
        "bad_mes_line",
        "bad_mes_station",
        "bad_mes_product_type",
        "bad_mes_sample_kind",
        "bad_mes_golden_cell",
        "mes_export_unreadable",
        "mes_from_duplicate",
    }
)
"""Row flags that come from the metadata (recomputed when the metadata is re-read)."""

MAX_PROBLEMS = 50
"""How many MES problem messages a run keeps (the flag counts are complete)."""


@dataclass(frozen=True)
class MesRow:
    """One serial's metadata, validated.

    Attributes:
        captured_at: Capture time (UTC), or None when missing, unparsable or implausible.
        line: Line id, or None.
        station: Station id, or None.
        product_type: Product type, or None.
        flags: Why a field was dropped or doubted (``bad_mes_timestamp``, ``bad_mes_product_type`` ...).
        sample_kind: ``"production"`` or ``"golden"`` (:data:`pipeline.common.schemas.SAMPLE_KINDS`; empty, missing
            or unknown: production, an unknown value flagged ``bad_mes_sample_kind``).
        golden_cell: The golden cell's id on a golden row, or None (a golden row without a valid id is flagged
            ``bad_mes_golden_cell``: it cannot be paired with the cell's other captures).
    """

    captured_at: dt.datetime | None
    line: str | None
    station: str | None
    product_type: str | None
    flags: tuple[str, ...]
    sample_kind: str = "production"
    golden_cell: str | None = None


def plausible(ts: dt.datetime, *, earliest: dt.datetime = EARLIEST, max_future_s: float = 86400.0,
              now: dt.datetime | None = None) -> bool:
    """Whether a UTC time lies in ``[earliest, now + max_future_s]``."""
    now = now or dt.datetime.now(dt.UTC)
    return earliest <= ts <= now + dt.timedelta(seconds=max_future_s)


def parse_time(raw: str, *, earliest: dt.datetime = EARLIEST, max_future_s: float = 86400.0,
               now: dt.datetime | None = None, timezone: str = "UTC") -> tuple[dt.datetime | None, list[str]]:
    """Parse an ISO 8601 capture time to UTC; ``(None, [flag])`` when it is unusable.

    Naive times are taken in ``timezone`` (the plant's clock) and flagged ``naive_mes_timestamp``.
    """
    if not raw:
        return None, []
    flags: list[str] = []
    try:
        ts = dt.datetime.fromisoformat(raw)
    except ValueError:
        return None, ["bad_mes_timestamp"]
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=ZoneInfo(timezone))
        flags.append("naive_mes_timestamp")
    try:
        ts = ts.astimezone(dt.UTC)
    except (OverflowError, ValueError):  # year 1 with a positive offset, year 9999 with a negative one
        return None, [*flags, "implausible_mes_timestamp"]
    if not plausible(ts, earliest=earliest, max_future_s=max_future_s, now=now):
        return None, [*flags, "implausible_mes_timestamp"]
    return ts, flags


def clean_field(name: str, raw: str | None) -> tuple[str | None, str | None]:
    """``(value, None)`` when ``raw`` matches ``FIELD_PATTERNS[name]``, ``(None, "bad_mes_<name>")`` when not."""
    value = (raw or "").strip()
    if not value:
        return None, None
    if FIELD_PATTERNS[name].match(value):
        return value, None
    return None, f"bad_mes_{name}"


def safe_label(text: object, limit: int = 64) -> str:
    """A label that is safe to put in alert text, logs and CSV cells.

    Control characters become ``?``, a leading ``= + - @`` (spreadsheet formula) gets a ``'`` in front, and the
    text is cut at ``limit`` characters.
    """
    s = "".join(c if c.isprintable() else "?" for c in str(text))[:limit]
    return "'" + s if s[:1] in ("=", "+", "-", "@") else s


def read_mes_export(path: str | os.PathLike[str], *, earliest: dt.datetime = EARLIEST,
                    max_future_s: float = 86400.0, timezone: str = "UTC") -> dict[str, MesRow]:
    """Parse a MES export (``serial, timestamp, line, station, product_type``) into ``serial -> row``.

    Timestamps without an offset are taken in ``timezone`` (the plant's clock) and flagged.
    Read as ``utf-8-sig`` (a byte-order mark is allowed). Rows without a serial are skipped; the first row of a
    serial wins. Field problems never raise: the field is dropped and the row flagged.

    Raises:
        ValueError: No ``serial`` column, or the file is not UTF-8 text.
        OSError: The file cannot be read.
    """
    out: dict[str, MesRow] = {}
    now = dt.datetime.now(dt.UTC)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "serial" not in reader.fieldnames:
            raise ValueError(f"{path}: MES export needs a 'serial' column, has {reader.fieldnames}")
        for row in reader:
            serial = (row.get("serial") or "").strip()
            if not serial or serial in out:
                continue
            ts, flags = parse_time((row.get("timestamp") or "").strip(), earliest=earliest,
                                   max_future_s=max_future_s, now=now, timezone=timezone)
            values: dict[str, str | None] = {}
            for name in ("line", "station", "product_type"):
                values[name], flag = clean_field(name, row.get(name))
                if flag:
                    flags.append(flag)
            kind, cell = sample_fields(row, flags)
            out[serial] = MesRow(ts, values["line"], values["station"], values["product_type"], tuple(flags),
                                 kind, cell)
    return out


def sample_fields(row: dict[str, Any], flags: list[str]) -> tuple[str, str | None]:
    """The validated ``sample_kind`` and ``golden_cell`` of one MES row; a problem appends its flag to ``flags``.

    An unknown kind is taken as production (``bad_mes_sample_kind``); a golden row needs a ``golden_cell`` id that
    matches its pattern (else ``bad_mes_golden_cell``: the capture stays golden, never trains a model, but cannot
    be paired); a production row's ``golden_cell`` is ignored.
    """
    try:
        kind = S.parse_sample_kind(row.get(S.SAMPLE_KIND))
    except ValueError:
        flags.append("bad_mes_sample_kind")
        return "production", None
    if kind != "golden":
        return kind, None
    cell, flag = clean_field("golden_cell", row.get(S.GOLDEN_CELL))
    if cell is None:
        flags.append(flag or "bad_mes_golden_cell")
    return kind, cell


@dataclass
class MesCache:
    """Per-folder MES exports, read once each, with every problem recorded for the run summary.

    Attributes:
        name: File name of the export in each folder.
        earliest: Earliest plausible capture time.
        max_future_s: How far after now a capture time may lie.
        timezone: IANA zone of timestamps written without an offset.
        problems: Human-readable problems (first ``MAX_PROBLEMS``).
        flag_counts: ``flag -> count`` over the rows looked up.
    """

    name: str
    earliest: dt.datetime = EARLIEST
    max_future_s: float = 86400.0
    timezone: str = "UTC"
    problems: list[str] = field(default_factory=list)
    flag_counts: Counter[str] = field(default_factory=Counter)
    _tables: dict[str, dict[str, MesRow] | None] = field(default_factory=dict)

    def note(self, message: str) -> None:
        """Record one problem message."""
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)

    def _table(self, folder: str) -> dict[str, MesRow] | None:
        if folder not in self._tables:
            path = os.path.join(folder, self.name)
            table: dict[str, MesRow] | None = {}
            if os.path.isfile(path) and not os.path.islink(path):
                try:
                    table = read_mes_export(path, earliest=self.earliest, max_future_s=self.max_future_s,
                                            timezone=self.timezone)
                except (OSError, ValueError, csv.Error) as exc:  # UnicodeDecodeError is a ValueError
                    self.note(f"{_printable(path)}: unreadable MES export, file times used: {exc}")
                    table = None
            self._tables[folder] = table
        return self._tables[folder]

    def lookup(self, folder: str, serial: str) -> tuple[MesRow | None, list[str]]:
        """The row of ``serial`` in ``folder``'s export (or None) and the flags that export gives the image."""
        table = self._table(folder)
        if table is None:
            return None, ["mes_export_unreadable"]
        row = table.get(serial)
        return row, list(row.flags) if row is not None else []

    def count(self, flags: list[str], where: str) -> None:
        """Count the MES flags of one registered image and describe them."""
        mine = [f for f in flags if f in MES_FLAGS and f not in ("mes_from_duplicate", "line_mismatch")]
        self.flag_counts.update(mine)
        if mine:
            self.note(f"{where}: {', '.join(_explain(f) for f in mine)}")


_EXPLAIN = {
    "naive_mes_timestamp": "MES timestamp without a UTC offset (taken as UTC)",
    "bad_mes_timestamp": "MES timestamp is not ISO 8601 (file time used)",
    "implausible_mes_timestamp": "MES timestamp outside the plausible range (file time used)",
    "implausible_file_time": "file time outside the plausible range too (ingest time used)",
    "bad_mes_line": "MES line does not match the line pattern (folder line used)",
    "bad_mes_station": "MES station does not match the station pattern (station unknown)",
    "bad_mes_product_type": "MES product_type does not match the product_type pattern (dropped)",
    "bad_mes_sample_kind": "MES sample_kind is neither 'production' nor 'golden' (taken as production)",
    "bad_mes_golden_cell": "MES golden row without a valid golden_cell id (kept out of training, cannot be paired)",
    "mes_export_unreadable": "the folder's MES export could not be read (file time used)",
}


def _explain(flag: str) -> str:
    return _EXPLAIN.get(flag, flag)


def _printable(path: str) -> str:
    return os.fsencode(path).decode("utf-8", "backslashreplace")


# ------------------------------------------------------------------------------------------------ catalog metadata


def row_metadata(
    path: str, rel: tuple[str, ...], mtime_ns: int, mes: MesCache, config: Any, alternates: Iterable[str] = ()
) -> dict[str, Any]:
    """Line, station, capture time, its source, product type, date, sample kind, golden cell and MES flags of one image.

    The MES export of the image's folder is asked first, then those of ``alternates`` (other names of the same
    bytes; flagged ``mes_from_duplicate``). Without a plausible MES time the file time is used, and without a
    plausible file time the ingest time (``implausible_file_time``).
    """
    folder, name = os.path.split(path)
    info, flags = mes.lookup(folder, name.rsplit(".", 1)[0])
    if info is None:
        for alt in alternates:
            a_folder, a_name = os.path.split(alt)
            a_info, a_flags = mes.lookup(a_folder, a_name.rsplit(".", 1)[0])
            if a_info is not None:
                info, flags = a_info, [*a_flags, "mes_from_duplicate"]
                break
    folder_line = rel[0] if len(rel) >= 2 else None
    line, station, product, captured = folder_line or config.default_line, config.default_station, None, None
    kind, cell = ("production", None) if info is None else (info.sample_kind, info.golden_cell)
    if info is not None:
        if info.line:
            if folder_line and info.line != folder_line:
                flags.append("line_mismatch")
            line = info.line
        station = info.station or station
        product, captured = info.product_type, info.captured_at
    source = "mes"
    if captured is None:
        captured, source = _file_time(mtime_ns, config), "file_mtime"
        if captured is None:
            captured, source = dt.datetime.now(dt.UTC), "ingest_time"
            flags.append("implausible_file_time")
    return {S.LINE: line, S.STATION: station, S.CAPTURED_AT: captured, S.TIMESTAMP_SOURCE: source,
            S.PRODUCT_TYPE: product, S.DATE: captured.astimezone(dt.UTC).strftime("%Y-%m-%d"), S.FLAGS: flags,
            S.SAMPLE_KIND: kind, S.GOLDEN_CELL: cell}


def _file_time(mtime_ns: int, config: Any) -> dt.datetime | None:
    try:
        ts = dt.datetime.fromtimestamp(mtime_ns / 1e9, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return ts if plausible(ts, earliest=config.earliest(), max_future_s=config.mes_max_future_s) else None


def _under(path: str, folder: Path) -> bool:
    return path.startswith(str(folder).rstrip(os.sep) + os.sep)


_NO_SPLIT = [c for c in S.CATALOG_SCHEMA.names if c != S.SPLIT]


def _changed(row: pd.Series, meta: dict[str, Any]) -> bool:
    for col in (S.LINE, S.STATION, S.TIMESTAMP_SOURCE, S.DATE):
        if row[col] != meta[col]:
            return True
    for col in (S.PRODUCT_TYPE, S.GOLDEN_CELL):
        if (row[col] if isinstance(row[col], str) else None) != meta[col]:
            return True
    if (row[S.SAMPLE_KIND] if isinstance(row[S.SAMPLE_KIND], str) else "production") != meta[S.SAMPLE_KIND]:
        return True
    return pd.Timestamp(row[S.CAPTURED_AT]) != pd.Timestamp(meta[S.CAPTURED_AT]) or list(row[S.FLAGS]) != meta[S.FLAGS]


def refresh_rows(
    root: Path, drop: Path, image_ids: Iterable[str] | None, config: Any, mes: MesCache
) -> tuple[int, list[dict[str, Any]]]:
    """Recompute the metadata of registered images under ``drop``; ``(checked, updated rows)``.

    The MES exports are read again (the registered name first, then every duplicate name of the same bytes).
    Flags that do not come from the metadata (``converted_from_rgb``, ``trailing_bytes``) are kept.
    """
    ids = None if image_ids is None else sorted(set(image_ids))
    if ids is None:
        paths = C.scan_catalog(root, [S.IMAGE_ID, S.SOURCE_PATH]).to_pandas()
        ids = sorted(paths.loc[paths[S.SOURCE_PATH].map(lambda p: _under(p, drop)), S.IMAGE_ID])
    if not ids:
        return 0, []
    rows = C.read_catalog(root, image_ids=ids, columns=_NO_SPLIT)
    rows = rows[rows[S.SOURCE_PATH].map(lambda p: _under(p, drop))]
    dups = C.read_table(root, "duplicates", columns=[S.SOURCE_PATH, S.DUPLICATE_OF])
    alternates = dups[dups[S.DUPLICATE_OF].isin(ids)].groupby(S.DUPLICATE_OF)[S.SOURCE_PATH].apply(list).to_dict()
    updated = []
    for _, row in rows.iterrows():
        rel = Path(row[S.SOURCE_PATH]).relative_to(drop).parts
        meta = row_metadata(row[S.SOURCE_PATH], rel, int(row[S.SOURCE_MTIME_NS]), mes, config,
                            alternates.get(row[S.IMAGE_ID], []))
        if meta[S.TIMESTAMP_SOURCE] == row[S.TIMESTAMP_SOURCE] == "ingest_time":
            meta[S.CAPTURED_AT], meta[S.DATE] = row[S.CAPTURED_AT].to_pydatetime(), row[S.DATE]
        meta[S.FLAGS] = meta[S.FLAGS] + [f for f in row[S.FLAGS] if f not in MES_FLAGS]
        mes.count(meta[S.FLAGS], _printable(row[S.SOURCE_PATH]))
        if _changed(row, meta):
            new = {**row.to_dict(), **meta, S.SPLIT: None}
            new[S.INGESTED_AT] = row[S.INGESTED_AT].to_pydatetime()
            updated.append(new)
    return len(rows), updated
