"""Atomic file writes: write a hidden temporary file beside the target, then ``os.replace`` it into place.

A reader (or a crash) at any moment sees the old file or the new one, never a half-written one. The temporary name is
``.tmp-<random>-<name>`` in the target's folder (same file system, so the replace is atomic on POSIX; hidden, so the
drop-folder scan and the catalog readers skip it; ``linewatch catalog clean-tmp`` removes strays a crash left).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"
"""Prefix of every temporary file written here."""


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, mode: int | None = 0o644, fsync: bool = False) -> Iterator[Path]:
    """A temporary path to write; on a clean exit it replaces ``path``, on an exception it is removed.

    Args:
        path: the file to (re)place; its folder is created when missing.
        mode: permissions of the published file (``None``: leave the writer's); 0644 by default, so a team server
            running as another user can read it.
        fsync: flush the file to disk before the replace (for state that must survive a power cut).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}-{path.name}")
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike[str], data: bytes, **kw: Any) -> Path:
    """Replace ``path`` by ``data`` atomically (keywords as :func:`atomic_path`)."""
    with atomic_path(path, **kw) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str, **kw: Any) -> Path:
    """Replace ``path`` by UTF-8 ``text`` atomically (keywords as :func:`atomic_path`)."""
    return write_bytes(path, text.encode("utf-8"), **kw)


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = None, **kw: Any) -> Path:
    """Replace ``path`` by ``obj`` as JSON atomically (keywords as :func:`atomic_path`)."""
    return write_text(path, json.dumps(obj, indent=indent), **kw)


def write_parquet(path: str | os.PathLike[str], frame: Any, *, compression: str = "snappy", **kw: Any) -> Path:
    """Replace ``path`` by a pandas DataFrame or pyarrow Table as Parquet, atomically (keywords as :func:`atomic_path`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    with atomic_path(path, **kw) as tmp:
        pq.write_table(table, tmp, compression=compression)
    return Path(path)


def replace_dir(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Publish the finished folder ``tmp`` as ``path`` (a sibling), replacing any folder there.

    The old folder is first renamed to a hidden ``.old-`` sibling, so at every moment ``path`` is either the old
    folder or the new one, never a half-deleted one; the old copy is removed last.
    """
    tmp, path = Path(tmp), Path(path)
    old = path.with_name(f".old-{uuid.uuid4().hex}-{path.name}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path
