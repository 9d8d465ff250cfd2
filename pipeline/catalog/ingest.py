"""Exactly-once ingestion of a drop folder into the catalog.

``ingest(drop, root)`` walks ``DROP/<line>/<YYYY-MM-DD>/<serial>.<ext>`` (any depth works; the first folder names
the line), validates each new file, copies valid images into the content-addressed store, and publishes catalog
rows. Rejected files are quarantined with a reason code and ingestion goes on. One run, as named steps
(``_IngestRun``): **scan** (list, skip what earlier runs handled, finish removals a crashed run missed), **settle**
(wait until every file is ``settle_s`` old and take a second look; a file that changed is left for the next run),
**check** (decode fully once with the readers' decoder, store), **handle** (register, duplicate or reject), **publish**
(rows, then the removals the user asked for), **refresh** (metadata a duplicate brought), **summary**.

Exactly-once, in order of what happens to one file:

1. Fast skip: a file whose ``(path, size, mtime_ns)`` is already in the catalog, the duplicates table or the
   quarantine table was handled by an earlier run and is not read again. Paths are recorded after resolving the
   drop folder's symbolic links, so the same folder reached through a link is the same folder.
2. The bytes are hashed. Bytes already registered (by any run, or earlier in this run) become a *duplicate* row
   pointing at the registered ``image_id``; the same path with the same bytes (a ``touch``) is skipped, and so is
   a touched duplicate or reject.
3. The store object is written (temporary file + rename) *before* the catalog row is published (temporary part
   file + rename). A crash between the two leaves an unreferenced store object; the re-run finds the file
   unregistered, the store write is a no-op, and the row is published once.
4. Rows are published in batches (``IngestConfig.batch_size``); a crash loses at most the unpublished batch,
   which the next run redoes. Nothing is rewritten in place. Files are removed from the drop folder (``move``,
   ``delete_source``) only after their rows are published, only when the store (or quarantine) holds their bytes,
   and only when they did not change since they were read.

Two ingests into the same root serialise on ``<root>/.lock`` (``filelock``); the second waits up to
``lock_timeout`` seconds and then fails with a message naming the holder.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import stat
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from pipeline.catalog import tables as C
from pipeline.catalog.dropfolder import Candidate, OverlapError, Paths, quarantine_dest, resolve_paths, scan
from pipeline.catalog.mes import EARLIEST, MesCache, read_mes_export, refresh_rows, row_metadata
from pipeline.catalog.rewrite import rewrite_rows
from pipeline.catalog.store import sha256_bytes
from pipeline.catalog.validate import (
    FILE_TOO_LARGE,
    NOT_A_FILE,
    REASONS,
    SAFE_PART,
    Accepted,
    Rejection,
    Unsettled,
    check_link,
    check_name,
    inspect_file,
    printable,
    validate_bytes,
)
from pipeline.common import schemas as S

__all__ = ["REASONS", "IngestConfig", "IngestSummary", "OverlapError", "RefreshSummary", "ingest",
           "read_mes_export", "refresh_metadata", "validate_bytes"]

log = logging.getLogger(__name__)

CRASH_ENV = "LINEWATCH_TEST_CRASH_AT"
"""Test hook: set to ``before_publish`` and the ingest process ``os._exit(70)``s just before its first publish."""

REMOVALS_SUFFIX = ".removals.jsonl"
"""Intent log of a run's pending drop-folder removals (``runs/<run_id>.removals.jsonl``), deleted when done."""



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
        max_file_bytes: Largest accepted file size; bigger files are recorded, never read or copied.
        max_filename_length: Longest accepted file or folder name.
        quarantine_mode: ``"copy"`` (leave the drop folder untouched) or ``"move"`` (remove the reject from it
            after its quarantine row is published and its copy is in quarantine).
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
        settle_s: A file is taken only once it has not changed for this long: its mtime is at least this old and
            its size and mtime are the same at a second look; younger files make the run wait (at most this long)
            before that look, changed ones are left for the next run. Applies in every mode.
        mes_earliest: Earliest plausible capture time (ISO 8601 date or time, UTC).
        mes_max_future_s: How far after now a capture time may lie (camera or MES clock skew).
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
    settle_s: float = 2.0
    mes_earliest: str = EARLIEST.date().isoformat()
    mes_max_future_s: float = 86400.0

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
        if self.settle_s < 0 or self.mes_max_future_s < 0:
            raise ValueError("settle_s and mes_max_future_s must be >= 0")
        bad = [e for e in self.allowed_extensions if not e.startswith(".") or e != e.lower()]
        if bad:
            raise ValueError(f"allowed_extensions must be lower case with a leading dot, got {bad}")
        for name in (self.default_line, self.default_station):
            if not SAFE_PART.match(name):
                raise ValueError(f"default line/station {name!r} must match {SAFE_PART.pattern}")
        self.earliest()

    def earliest(self) -> dt.datetime:
        """``mes_earliest`` as an aware UTC datetime."""
        try:
            ts = dt.datetime.fromisoformat(self.mes_earliest)
        except ValueError as exc:
            raise ValueError(f"mes_earliest must be an ISO 8601 date, got {self.mes_earliest!r}") from exc
        return ts.replace(tzinfo=dt.UTC) if ts.tzinfo is None else ts.astimezone(dt.UTC)

    def mes_cache(self) -> MesCache:
        """A per-run cache of the MES exports with this config's plausibility window."""
        return MesCache(self.metadata_filename, self.earliest(), self.mes_max_future_s, self.mes_timezone)


@dataclass(frozen=True)
class IngestSummary:
    """The outcome of one ingest run.

    Attributes:
        run_id: The run's id (stored in every row it wrote).
        registered: New images registered.
        duplicates: Files whose bytes were already registered under another name or path.
        skipped_already_registered: Files an earlier run registered (same path; not read again, or same bytes).
        skipped_already_seen: Files an earlier run recorded as duplicate or quarantined (also after a ``touch``).
        quarantined: ``reason_code -> count`` of files rejected by this run.
        seconds: Wall time of the run, lock wait and publishing included.
        images_per_s: Files inspected (registered + duplicates + quarantined) per second.
        timestamp_sources: ``"mes" / "file_mtime" / "ingest_time" -> count`` among the registered images.
        left_unsettled: Files younger than ``settle_s`` or changing while looked at, left for the next run.
        kept_changed: Files the user asked to remove that changed after being read, so were kept.
        removed: Files removed from the drop folder (``move`` / ``delete_source``, crashed runs' leftovers too).
        store_repaired: Store objects whose bytes no longer matched their digest, rewritten from a good copy.
        metadata_refreshed: Registered images whose metadata a duplicate with MES data filled in.
        mes_flags: ``flag -> count`` of MES problems among the registered images (also in their row flags).
        mes_problems: Up to 50 messages naming the file and the MES problem.
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
    left_unsettled: int = 0
    kept_changed: int = 0
    removed: int = 0
    store_repaired: int = 0
    metadata_refreshed: int = 0
    mes_flags: dict[str, int] = field(default_factory=dict)
    mes_problems: list[str] = field(default_factory=list)

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
class RefreshSummary:
    """The outcome of re-reading MES metadata for registered images (``refresh_metadata``).

    Attributes:
        run_id: The refresh's id.
        checked: Registered images under the drop folder that were looked at.
        updated: Images whose line, station, capture time, product type or flags changed.
        partitions_rewritten: Catalog partitions rewritten (old and new day of moved images).
        seconds: Wall time.
        mes_flags: ``flag -> count`` of MES problems among the checked images.
        mes_problems: Up to 50 messages.
    """

    run_id: str
    checked: int
    updated: int
    partitions_rewritten: int
    seconds: float
    mes_flags: dict[str, int] = field(default_factory=dict)
    mes_problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)


@dataclass(frozen=True)
class _Removal:
    """A drop-folder file to remove once its row is published: the store (``sha``) or quarantine (``dest``) copy."""

    path: str
    size: int
    mtime_ns: int
    sha: str | None = None
    dest: str | None = None
    ext: str = ""

    def to_json(self) -> str:
        return json.dumps({"raw": os.fsencode(self.path).hex(), "size": self.size, "mtime_ns": self.mtime_ns,
                           "sha": self.sha, "dest": self.dest, "ext": self.ext})

    @classmethod
    def from_json(cls, line: str) -> _Removal:
        d = json.loads(line)
        return cls(os.fsdecode(bytes.fromhex(d["raw"])), int(d["size"]), int(d["mtime_ns"]), d["sha"], d["dest"],
                   d["ext"])


# ----------------------------------------------------------------------------------------------------------------
# what earlier runs did


def reject_signature(path: str, code: str, sha256: str | None, size: int) -> tuple[str, str, str]:
    """What makes a reject "the same one again": path, reason and bytes (the size when it was never read)."""
    return path, code, sha256 if sha256 else f"size:{size}"


class _KnownState:
    """What earlier runs did, restricted to the paths found in this drop folder scan.

    Keys are ``(path, size, mtime_ns)``; ``*_path_sha`` remember ``(path, sha256)`` so a touched file (new mtime,
    same bytes) is recognised; ``quarantine_sig`` remembers ``reject_signature`` of rejects. Registered
    digests are looked up per batch with ``index_in`` against the Arrow column, so start-up stays cheap on a
    catalog of millions of rows.
    """

    def __init__(self, root: Path, scanned_paths: list[str]) -> None:
        cols = [S.IMAGE_ID, S.SHA256, S.SOURCE_PATH, S.SOURCE_SIZE, S.SOURCE_MTIME_NS]
        cat = C.scan_catalog(root, cols)
        paths = pa.array(scanned_paths, type=pa.string())
        mine = cat.filter(pc.is_in(cat[S.SOURCE_PATH], value_set=paths)).to_pydict()
        keys = zip(mine[S.SOURCE_PATH], mine[S.SOURCE_SIZE], mine[S.SOURCE_MTIME_NS], strict=True)
        self.registered: dict[tuple[str, int, int], str] = dict(zip(keys, mine[S.SHA256], strict=True))
        self.catalog_path_sha = set(zip(mine[S.SOURCE_PATH], mine[S.SHA256], strict=True))
        self._shas = cat[S.SHA256].combine_chunks()
        self._ids = cat[S.IMAGE_ID].combine_chunks()
        self.run_sha_to_id: dict[str, str] = {}
        wanted = set(scanned_paths)
        dups = C.read_table(root, "duplicates", columns=[S.SOURCE_PATH, S.SOURCE_SIZE, S.SOURCE_MTIME_NS, S.SHA256])
        dups = dups[dups[S.SOURCE_PATH].isin(wanted)]
        self.duplicates = {(p, int(s), int(m)): h for p, s, m, h in dups.itertuples(index=False)}
        self.dup_path_sha = {(p, h) for p, _s, _m, h in dups.itertuples(index=False)}
        q = C.read_table(root, "quarantine", columns=[S.PATH, S.SOURCE_SIZE, S.SOURCE_MTIME_NS, S.SHA256,
                                                      S.REASON_CODE, S.QUARANTINED_TO])
        q = q[q[S.PATH].isin(wanted)]
        self.quarantined: dict[tuple[str, int, int], str | None] = {}
        self.quarantine_sig: dict[tuple[str, str, str], str | None] = {}  # reject_signature -> copy
        for p, size, mtime, sha, code, dest in q.itertuples(index=False):
            dest = dest if isinstance(dest, str) else None
            self.quarantined[(p, int(size), int(mtime))] = dest
            self.quarantine_sig[reject_signature(p, code, sha if isinstance(sha, str) else None, int(size))] = dest

    def lookup(self, shas: list[str]) -> dict[str, str]:
        """``sha256 -> image_id`` for the digests already registered (earlier runs or this one)."""
        out = {s: self.run_sha_to_id[s] for s in shas if s in self.run_sha_to_id}
        rest = [s for s in shas if s not in out]
        if rest and len(self._shas):
            idx = pc.index_in(pa.array(rest, type=pa.string()), value_set=self._shas)
            ids = pc.take(self._ids, idx).to_pylist()
            out.update({s: i for s, i in zip(rest, ids, strict=True) if i is not None})
        return out


# ----------------------------------------------------------------------------------------------------------------
# rows


def _catalog_row(cand: Candidate, acc: Accepted, meta: dict[str, Any], run_id: str) -> dict[str, Any]:
    flags = [*meta[S.FLAGS], *acc.flags] + (["converted_from_rgb"] if acc.converted_from_rgb else [])
    return {
        **meta,
        S.IMAGE_ID: acc.sha256[:24],
        S.SHA256: acc.sha256,
        S.SOURCE_PATH: cand.shown,
        S.SOURCE_SIZE: cand.size,
        S.SOURCE_MTIME_NS: cand.mtime_ns,
        S.WIDTH: acc.width,
        S.HEIGHT: acc.height,
        S.MODE: acc.mode,
        S.BIT_DEPTH: acc.bit_depth,
        S.CONVERTED_FROM_RGB: acc.converted_from_rgb,
        S.STORE_PATH: f"{C.STORE_DIR}/{acc.store_relpath}",
        S.INGESTED_AT: C.utcnow(),
        S.INGEST_RUN_ID: run_id,
        S.SPLIT: None,
        S.FLAGS: flags,
    }


class _IngestRun:
    """One ingest run as named steps; ``ingest`` calls them in order under the catalog lock."""

    def __init__(self, paths: Paths, config: IngestConfig, *, progress: bool, hook: Callable[[str], None]) -> None:
        self.paths, self.config, self.progress, self.hook = paths, config, progress, hook
        self.run_id = C.new_run_id()
        self.store = C.content_store(paths.root, fsync=config.fsync)
        self.mes = config.mes_cache()
        self.counts: Counter[str] = Counter()
        self.quarantined: Counter[str] = Counter()
        self.ts_sources: Counter[str] = Counter()
        self.rows: list[dict[str, Any]] = []
        self.dup_rows: list[dict[str, Any]] = []
        self.q_rows: list[dict[str, Any]] = []
        self.to_remove: list[_Removal] = []
        self.upgrades: set[str] = set()
        self.seq = 0
        self.known: _KnownState | None = None
        self.removals_log = paths.root / C.RUNS_DIR / f"{self.run_id}{REMOVALS_SUFFIX}"
        self.removals_log.parent.mkdir(parents=True, exist_ok=True)

    # -- scan ---------------------------------------------------------------------------------------------------
    def scan(self) -> list[Candidate]:
        """List the drop folder; skip what earlier runs handled, queueing the removals a crashed run missed."""
        p = self.paths
        skip_dirs = {os.path.realpath(p.root), os.path.realpath(p.qdir)}
        scanned = list(scan(p.scan_root, p.drop, skip_dirs, self.config.metadata_filename))
        self.known = known = _KnownState(p.root, [c.shown for c in scanned])
        self._finish_crashed_removals({c.path for c in scanned})
        todo = []
        for cand in scanned:
            if cand.key in known.registered:
                self.counts["skip_registered"] += 1
            elif cand.key in known.duplicates or cand.key in known.quarantined:
                self.counts["skip_seen"] += 1
            else:
                todo.append(cand)
        return todo

    def _finish_crashed_removals(self, present: set[str]) -> None:
        """Do the removals a crashed run had promised (its intent log) for files whose rows it published."""
        assert self.known is not None
        for log_path in sorted((self.paths.root / C.RUNS_DIR).glob(f"*{REMOVALS_SUFFIX}")):
            items = [_Removal.from_json(ln) for ln in log_path.read_text().splitlines() if ln.strip()]
            # outside this scan (--line) but still there: keep for later; gone: nothing left to do
            later = [it for it in items if it.path not in present and os.path.lexists(it.path)]
            for it in (it for it in items if it.path in present):
                key = (printable(it.path), it.size, it.mtime_ns)
                published = key in self.known.registered or key in self.known.duplicates
                ok = (published and it.sha is not None and self._stored(it)) or (
                    key in self.known.quarantined and it.dest is not None and os.path.lexists(it.dest))
                if ok and remove_if_unchanged(it):
                    self.counts["removed"] += 1
            if later:
                C.write_text_atomic(log_path, "".join(it.to_json() + "\n" for it in later))
            else:
                log_path.unlink()

    def _stored(self, item: _Removal) -> bool:
        """Whether the store holds ``item.sha`` intact, repairing it from the file when it does not."""
        assert item.sha is not None
        if self.store.verify(self.store.relpath(item.sha, item.ext)):
            return True
        with contextlib.suppress(OSError):
            data = Path(item.path).read_bytes()
            if sha256_bytes(data) == item.sha:
                self.counts["repaired"] += int(self.store.put(data, item.ext, sha256=item.sha).repaired)
                return True
        log.warning("not removing %s: the store has no intact copy of its bytes", printable(item.path))
        return False

    def _remove_later(self, cand: Candidate, sha: str | None = None, dest: Path | None = None) -> None:
        self.to_remove.append(_Removal(cand.path, cand.size, cand.mtime_ns, sha, str(dest) if dest else None,
                                       cand.ext))

    # -- settle -------------------------------------------------------------------------------------------------
    def settle(self, candidates: list[Candidate]) -> list[Candidate]:
        """Wait until every file is ``settle_s`` old (at most ``settle_s``), then look again; drop changed files."""
        regular = [c for c in candidates if c.is_regular]
        if not regular or self.config.settle_s <= 0:
            return candidates
        youngest = (time.time_ns() - max(c.mtime_ns for c in regular)) / 1e9
        wait = min(self.config.settle_s, self.config.settle_s - youngest)
        if wait > 0:
            time.sleep(wait)
        out = []
        for cand in candidates:
            if cand.is_regular:
                try:
                    st = os.lstat(cand.path)
                except FileNotFoundError:
                    continue  # gone: nothing to ingest, nothing lost
                if (st.st_size, st.st_mtime_ns) != (cand.size, cand.mtime_ns) or not stat.S_ISREG(st.st_mode):
                    self.counts["unsettled"] += 1
                    continue
            out.append(cand)
        return out

    # -- check --------------------------------------------------------------------------------------------------
    def check(self, cand: Candidate) -> Rejection | Accepted | Unsettled:
        """Validate one candidate (decoded fully once) and store it if valid."""
        if cand.is_link:
            return check_link(cand.path, str(self.paths.drop))
        bad = check_name(cand.rel, self.config.max_filename_length)
        if bad is not None:
            return bad
        if not cand.is_regular:
            return Rejection(NOT_A_FILE, "not a regular file (FIFO, socket or device)")
        return inspect_file(cand.path, cand.rel, self.config, self.store, expect=(cand.size, cand.mtime_ns))

    def check_all(self, candidates: list[Candidate]) -> None:
        """Check the candidates batch by batch (threads), handle and publish each batch."""
        bar = tqdm(total=len(candidates), unit="file", desc="ingest",
                   disable=not self.progress or not sys.stderr.isatty())
        threaded = self.config.workers > 1 and len(candidates) > 8
        pool = ThreadPoolExecutor(max_workers=self.config.workers) if threaded else None
        try:
            for lo in range(0, len(candidates), self.config.batch_size):
                batch = candidates[lo : lo + self.config.batch_size]
                results = list(pool.map(self.check, batch) if pool is not None else map(self.check, batch))
                bar.update(len(batch))
                self.handle(batch, results)
                self.publish()
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    # -- handle -------------------------------------------------------------------------------------------------
    def _has_mes(self, cand: Candidate) -> bool:
        folder, name = os.path.split(cand.path)
        return self.mes.lookup(folder, name.rsplit(".", 1)[0])[0] is not None

    def handle(self, batch: list[Candidate], results: list[Rejection | Accepted | Unsettled]) -> None:
        """Register, record as duplicate, or reject each result; a name with MES data registers first."""
        assert self.known is not None
        registered = self.known.lookup([r.sha256 for r in results if isinstance(r, Accepted)])
        order = sorted(range(len(batch)),
                       key=lambda i: not (isinstance(results[i], Accepted) and self._has_mes(batch[i])))
        for i in order:
            cand, res = batch[i], results[i]
            if isinstance(res, Unsettled):
                self.counts["unsettled"] += 1
            elif isinstance(res, Rejection):
                self.reject(cand, res)
            else:
                self.counts["repaired"] += int(res.repaired)
                image_id = registered.get(res.sha256) or self.known.run_sha_to_id.get(res.sha256)
                if image_id is None:
                    self.register(cand, res)
                else:
                    self.duplicate(cand, res, image_id)

    def register(self, cand: Candidate, acc: Accepted) -> None:
        """A new image: one catalog row."""
        assert self.known is not None
        meta = row_metadata(cand.path, cand.rel, cand.mtime_ns, self.mes, self.config)
        self.mes.count(meta[S.FLAGS], cand.shown)
        self.rows.append(_catalog_row(cand, acc, meta, self.run_id))
        self.ts_sources[meta[S.TIMESTAMP_SOURCE]] += 1
        self.known.run_sha_to_id[acc.sha256] = self.rows[-1][S.IMAGE_ID]
        self.known.catalog_path_sha.add((cand.shown, acc.sha256))
        self.counts["registered"] += 1
        if self.config.delete_source:
            self._remove_later(cand, sha=acc.sha256)

    def duplicate(self, cand: Candidate, acc: Accepted, image_id: str) -> None:
        """Bytes already registered: a duplicate row (or nothing, for a touched file already recorded)."""
        assert self.known is not None
        if (cand.shown, acc.sha256) in self.known.catalog_path_sha:
            self.counts["skip_registered"] += 1  # the registered file itself, touched
            return
        if (cand.shown, acc.sha256) in self.known.dup_path_sha:
            self.counts["skip_seen"] += 1  # a recorded duplicate, touched
            return
        self.known.dup_path_sha.add((cand.shown, acc.sha256))
        self.dup_rows.append({S.SOURCE_PATH: cand.shown, S.SOURCE_SIZE: cand.size, S.SOURCE_MTIME_NS: cand.mtime_ns,
                              S.SHA256: acc.sha256, S.DUPLICATE_OF: image_id, S.SEEN_AT: C.utcnow(),
                              S.INGEST_RUN_ID: self.run_id})
        self.counts["duplicates"] += 1
        if self.config.delete_source:
            self._remove_later(cand, sha=acc.sha256)
        if self._has_mes(cand):
            self.upgrades.add(image_id)

    def reject(self, cand: Candidate, rej: Rejection) -> None:
        """Quarantine: a copy (never of more than ``max_file_bytes``) and a row; a touched reject is skipped."""
        assert self.known is not None
        sig = reject_signature(cand.shown, rej.code, rej.sha256, cand.size)
        if sig in self.known.quarantine_sig:
            self.counts["skip_seen"] += 1  # the same reject, touched: recorded and copied before
            return
        dest: Path | None = None
        reason = rej.reason
        if cand.size > self.config.max_file_bytes:
            reason += "" if rej.code == FILE_TOO_LARGE else "; not copied (over max_file_bytes)"
        elif cand.is_regular or cand.is_link:
            dest = self._copy_to_quarantine(cand)
            if self.config.quarantine_mode == "move" and dest is not None:
                self._remove_later(cand, dest=dest)
        self.q_rows.append({S.PATH: cand.shown, S.SOURCE_SIZE: cand.size, S.SOURCE_MTIME_NS: cand.mtime_ns,
                            S.SHA256: rej.sha256, S.REASON_CODE: rej.code, S.REASON: reason,
                            S.QUARANTINED_TO: str(dest) if dest else None, S.AT: C.utcnow(),
                            S.INGEST_RUN_ID: self.run_id})
        self.quarantined[rej.code] += 1

    def _copy_to_quarantine(self, cand: Candidate) -> Path | None:
        dest = quarantine_dest(self.paths.qdir, self.run_id, cand.rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copy2(cand.path, dest, follow_symlinks=False)
        except OSError as exc:
            log.warning("could not copy %s to quarantine: %s", cand.shown, exc)
            return None
        return dest

    # -- publish ------------------------------------------------------------------------------------------------
    def publish(self) -> None:
        """Publish the pending rows (catalog, duplicates, quarantine), then do the removals they allow."""
        root = self.paths.root
        if self.to_remove:  # intent log first: a crash after publishing leaves the removals to the next run
            with open(self.removals_log, "a", encoding="utf-8") as fh:
                fh.write("".join(it.to_json() + "\n" for it in self.to_remove))
                fh.flush()
                os.fsync(fh.fileno())
        if self.rows or self.dup_rows or self.q_rows:
            self.seq += 1
            part = f"part-{self.run_id}-{self.seq:05d}"
            self.hook("before_publish")
            C.write_catalog_rows(root, pa.Table.from_pylist(self.rows, schema=S.CATALOG_SCHEMA), part)
            C.append_table(root, "duplicates", pa.Table.from_pylist(self.dup_rows, schema=S.DUPLICATES_SCHEMA), part)
            C.append_table(root, "quarantine", pa.Table.from_pylist(self.q_rows, schema=S.QUARANTINE_SCHEMA), part)
            self.hook("after_publish")
        for item in self.to_remove:  # only what the user asked to remove, and only once its row is published
            done = remove_if_unchanged(item)
            self.counts["removed" if done else "kept_changed" if done is False else "gone"] += 1
        self.rows, self.dup_rows, self.q_rows, self.to_remove = [], [], [], []

    def close(self) -> None:
        """Every promised removal was done: drop the intent log."""
        with contextlib.suppress(FileNotFoundError):
            self.removals_log.unlink()

    def refresh_upgrades(self) -> None:
        """Fill in the metadata of registered images from duplicates of them that have MES data."""
        if not self.upgrades:
            return
        _checked, updated = refresh_rows(self.paths.root, self.paths.drop, self.upgrades, self.config,
                                         self.config.mes_cache())
        if updated:
            rewrite_rows(self.paths.root, pa.Table.from_pylist(updated, schema=S.CATALOG_SCHEMA))
        self.counts["refreshed"] += len(updated)

    # -- summary ------------------------------------------------------------------------------------------------
    def summary(self, seconds: float, n_inspected: int) -> IngestSummary:
        """The run's summary."""
        c = self.counts
        return IngestSummary(
            run_id=self.run_id, registered=c["registered"], duplicates=c["duplicates"],
            skipped_already_registered=c["skip_registered"], skipped_already_seen=c["skip_seen"],
            quarantined=dict(sorted(self.quarantined.items())), seconds=round(seconds, 4),
            images_per_s=round(n_inspected / seconds, 2) if seconds > 0 else 0.0,
            timestamp_sources=dict(sorted(self.ts_sources.items())), left_unsettled=c["unsettled"],
            kept_changed=c["kept_changed"], removed=c["removed"], store_repaired=c["repaired"],
            metadata_refreshed=c["refreshed"], mes_flags=dict(sorted(self.mes.flag_counts.items())),
            mes_problems=list(self.mes.problems),
        )


def _default_crash_hook(point: str) -> None:
    if os.environ.get(CRASH_ENV) == point:
        os._exit(70)


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
        config: Validation bounds, settle time, quarantine behaviour, lock timeout.
        progress: Show a progress bar (only when stderr is a terminal).
        crash_hook: Test hook called with a point name (``"before_publish"``, ``"after_publish"``) around each
            batch publish; raising or ``os._exit`` there simulates a crash. Default: exit if
            ``$LINEWATCH_TEST_CRASH_AT`` names the point.

    Returns:
        The run's summary.

    Raises:
        ValueError: The drop folder or the line folder does not exist.
        OverlapError: The drop folder and the catalog root overlap (a ``ValueError``).
        catalog.CatalogLockedError: Another ingest held the lock for longer than ``config.lock_timeout``.
    """
    t_start = time.perf_counter()
    root = Path(root) if root is not None else C.default_root()
    paths = resolve_paths(drop, root, line, config)
    run = _IngestRun(paths, config, progress=progress, hook=crash_hook or _default_crash_hook)
    with C.catalog_lock(root, timeout=config.lock_timeout, purpose=f"ingest {run.run_id}"):
        candidates = run.settle(run.scan())
        run.check_all(candidates)
        run.publish()
        run.close()
        run.refresh_upgrades()
        summary = run.summary(time.perf_counter() - t_start, n_inspected=len(candidates))
        C.write_run_record(root, run.run_id, {"kind": "ingest", "drop": str(paths.drop), "line": line,
                                              "config": asdict(config), **summary.to_dict()})
    return summary


# ----------------------------------------------------------------------------------------------------------------
# re-reading metadata


def refresh_metadata(
    drop: str | os.PathLike[str],
    root: str | os.PathLike[str] | None = None,
    *,
    config: IngestConfig = IngestConfig(),
) -> RefreshSummary:
    """Re-read the MES exports of a drop folder for the images already registered from it.

    For an export that was fixed after ingestion (a byte-order mark, a wrong time zone, a missing serial): each
    image registered from ``drop`` gets its line, station, capture time, product type and MES flags recomputed
    exactly as ingest would now; rows that change are rewritten (moving to another day's partition when the
    capture date changes) under the catalog lock. Running it again changes nothing.

    Raises:
        ValueError: The drop folder does not exist.
        catalog.CatalogLockedError: Another writer held the lock longer than ``config.lock_timeout``.
    """
    t0 = time.perf_counter()
    root = Path(root) if root is not None else C.default_root()
    paths = resolve_paths(drop, root, None, config)
    mes = config.mes_cache()
    run_id = C.new_run_id("remeta-")
    with C.catalog_lock(root, timeout=config.lock_timeout, purpose=f"remeta {run_id}"):
        checked, updated = refresh_rows(root, paths.drop, None, config, mes)
        table = pa.Table.from_pylist(updated, schema=S.CATALOG_SCHEMA)
        n_parts = rewrite_rows(root, table, run_id=run_id) if updated else 0
        summary = RefreshSummary(run_id, checked, len(updated), n_parts, round(time.perf_counter() - t0, 4),
                                 dict(sorted(mes.flag_counts.items())), list(mes.problems))
        C.write_run_record(root, run_id, {"kind": "remeta", "drop": str(paths.drop), **summary.to_dict()})
    return summary


def remove_if_unchanged(item: _Removal) -> bool | None:
    """Remove a drop-folder file only if its size and mtime are still those that were read.

    Returns:
        True when removed, False when it changed (kept), None when it is already gone.
    """
    try:
        st = os.lstat(item.path)
    except FileNotFoundError:
        return None
    if (st.st_size, st.st_mtime_ns) != (item.size, item.mtime_ns) or not stat.S_ISREG(st.st_mode):
        log.warning("kept %s: it changed after being read (%d -> %d bytes)", printable(item.path), item.size,
                    st.st_size)
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(item.path)
    return True
