"""The drop folder: where it may be, what is in it, and where its rejects go.

``resolve_paths`` resolves the drop folder's symbolic links (so a folder reached through a link is the same folder),
refuses a drop folder that overlaps the catalog root's data (``check_overlap``), and ``scan`` lists every entry to
consider without following links.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.catalog import tables as C
from pipeline.catalog.validate import EXT_CANON, SAFE_PART, printable

OWN_DIRS = (C.CATALOG_DIR, C.TABLES_DIR, C.STORE_DIR, C.QUARANTINE_DIR, C.SNAPSHOTS_DIR, C.RUNS_DIR)
"""The catalog root's own folders: a drop folder may never be (inside) one of them."""


class OverlapError(ValueError):
    """The drop folder and the catalog root (or the quarantine folder) overlap."""


@dataclass(frozen=True)
class Candidate:
    """One entry of the drop folder as first listed (size and mtime are the first look)."""

    path: str  # absolute under the resolved drop folder, as the OS gives it (may hold surrogate escapes)
    rel: tuple[str, ...]  # parts relative to the drop folder
    size: int
    mtime_ns: int
    is_link: bool
    is_regular: bool = True

    @property
    def shown(self) -> str:
        r"""The path as stored in the tables (bytes that are not UTF-8 as ``\xNN`` escapes)."""
        return printable(self.path)

    @property
    def key(self) -> tuple[str, int, int]:
        """``(path, size, mtime_ns)``: the fast-skip key of the tables."""
        return self.shown, self.size, self.mtime_ns

    @property
    def ext(self) -> str:
        """The extension as the store names it (``jpeg`` -> ``jpg``, ``tiff`` -> ``tif``)."""
        ext = self.rel[-1].rsplit(".", 1)[-1].lower() if "." in self.rel[-1] else ""
        return EXT_CANON.get(ext, ext)


@dataclass(frozen=True)
class Paths:
    """The resolved drop folder, the folder to scan (a line's), the catalog root and the quarantine folder."""

    drop: Path  # resolved
    scan_root: Path
    root: Path
    qdir: Path


# ----------------------------------------------------------------------------------------------------------------
# paths


def inside(child: str, parent: str) -> bool:
    """Whether ``child`` is ``parent`` or below it (plain path strings)."""
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_overlap(drop: str | os.PathLike[str], root: str | os.PathLike[str], qdir: str | os.PathLike[str]) -> None:
    """Refuse a drop folder that overlaps the catalog root's data or the quarantine folder (symlinks resolved).

    Allowed: the drop folder as a plain sub-folder of the root (``$LINEWATCH_HOME/drop`` with the root at
    ``$LINEWATCH_HOME``, the default layout). Refused: drop = root; the drop inside one of the root's own folders
    (``catalog``, ``tables``, ``store``, ``quarantine``, ``snapshots``, ``runs``) or the quarantine folder; the
    root or the quarantine folder inside the drop folder. Ingest would otherwise read its own files and, with
    ``--delete-source`` or ``move``, remove them.

    Raises:
        OverlapError: The message names both paths and why.
    """
    d, r, q = (os.path.realpath(p) for p in (drop, root, qdir))
    why = None
    if d == r:
        why = "they are the same folder"
    elif inside(r, d):
        why = "the catalog root is inside the drop folder"
    elif inside(q, d):
        why = f"the quarantine folder {q} is inside the drop folder"
    elif inside(d, q):
        why = f"the drop folder is inside the quarantine folder {q}"
    elif inside(d, r) and Path(d).relative_to(r).parts[0] in OWN_DIRS:
        why = f"the drop folder is inside the catalog's own folder {Path(d).relative_to(r).parts[0]!r}"
    if why:
        raise OverlapError(
            f"drop folder {d} and catalog root {r} overlap: {why}. Ingest would read its own files and could remove "
            "them; use separate folders (a plain sub-folder such as ROOT/drop is fine)"
        )


def resolve_paths(drop: str | os.PathLike[str], root: Path, line: str | None, config: Any) -> Paths:
    """Resolve and check the run's folders.

    Raises:
        ValueError: The drop folder or the line folder does not exist, or the line is not a safe name.
        OverlapError: The drop folder overlaps the catalog root's data (a ``ValueError``).
    """
    drop_path = Path(drop)
    if not drop_path.is_dir():
        raise ValueError(f"drop folder {drop_path} does not exist or is not a folder")
    drop_real = Path(os.path.realpath(drop_path))
    qdir = Path(config.quarantine_dir) if config.quarantine_dir else root / C.QUARANTINE_DIR
    check_overlap(drop_real, root, qdir)
    scan_root = drop_real
    if line is not None:
        if not SAFE_PART.match(line):
            raise ValueError(f"line {line!r} must match {SAFE_PART.pattern}")
        scan_root = drop_real / line
        if scan_root.is_symlink():
            raise ValueError(f"{scan_root} is a symbolic link; links are not followed, give the real folder")
        if not scan_root.is_dir():
            raise ValueError(f"no folder for line {line!r}: {scan_root} does not exist")
    return Paths(drop_real, scan_root, root, qdir)


def scan(scan_root: Path, drop: Path, skip_dirs: set[str], metadata_name: str) -> Iterator[Candidate]:
    """Yield every entry to consider, sorted, without following links."""
    for dirpath, dirnames, filenames in os.walk(scan_root, followlinks=False):
        dirnames.sort()
        keep = []
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if os.path.islink(full):
                st = os.lstat(full)
                rel = Path(full).relative_to(drop).parts
                yield Candidate(full, rel, st.st_size, st.st_mtime_ns, is_link=True, is_regular=False)
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
            yield Candidate(full, rel, st.st_size, st.st_mtime_ns, is_link=stat.S_ISLNK(st.st_mode),
                             is_regular=stat.S_ISREG(st.st_mode))


def quarantine_dest(qdir: Path, run_id: str, rel: tuple[str, ...]) -> Path:
    """A free path under ``<qdir>/<run_id>/`` for a reject: safe characters, parts cut to 100, extension kept."""
    safe = []
    for i, part in enumerate(rel):
        s = re.sub(r"[^A-Za-z0-9._-]", "_", printable(part)).lstrip(".-") or "_"
        stem, dot, ext = s.rpartition(".")
        if len(s) > 100:
            keep_ext = i == len(rel) - 1 and dot and stem and 0 < len(ext) <= 10
            s = f"{stem[: 99 - len(ext)]}.{ext}" if keep_ext else s[:100]
        safe.append(s)
    dest = qdir / run_id / Path(*safe)
    n = 1
    while dest.exists() or dest.is_symlink():
        dest = dest.with_name(f"{dest.stem}~{n}{dest.suffix}")
        n += 1
    return dest
