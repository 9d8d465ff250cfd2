"""Rewriting catalog rows in place of old ones (re-read metadata), crash-safe with a redo/undo journal.

Part files are never changed: ``rewrite_rows`` publishes new parts for every affected partition and then removes the
old ones. A journal (``<root>/runs/<id>.pending.json``) written first names both sets, so whoever takes the writer
lock next (``catalog_lock`` calls ``finish_pending``) completes an interrupted rewrite, or undoes it when not every new
part was published.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline.catalog.tables import (  # noqa: F401 - finish_pending re-exported: the journal's other half
    PENDING_SUFFIX,
    RUNS_DIR,
    _atomic_write_text,
    _is_part,
    _journal_path,
    _remove_replaced,
    finish_pending,
    new_run_id,
    partition_dir,
    publish_parquet,
    scan_catalog,
)
from pipeline.common import schemas as S


def rewrite_rows(root: str | os.PathLike[str], updated: pa.Table, *, run_id: str | None = None) -> int:
    """Replace catalog rows by new versions of the same ``image_id`` (which may belong to another partition).

    The caller holds the writer lock. Every partition that holds an old row or receives a new one is rewritten as
    one new part file; a journal (``runs/<id>.pending.json``) names the new and old files before anything is
    published, the new parts are published, the old ones removed, the journal deleted. A crash anywhere is
    finished by the next lock holder (``finish_pending``); readers see the old or the new parts.

    Returns:
        The number of partitions rewritten.
    """
    root = Path(root)
    if updated.num_rows == 0:
        return 0
    updated = updated.select(S.CATALOG_SCHEMA.names).cast(S.CATALOG_SCHEMA)
    ids = pa.array(sorted(set(updated[S.IMAGE_ID].to_pylist())), type=pa.string())
    located = scan_catalog(root, [S.IMAGE_ID, S.LINE, S.DATE])
    located = located.filter(pc.is_in(located[S.IMAGE_ID], value_set=ids)).to_pydict()
    pairs = set(zip(located[S.LINE], located[S.DATE], strict=True))
    pairs |= set(zip(updated[S.LINE].to_pylist(), updated[S.DATE].to_pylist(), strict=True))
    run_id = run_id or new_run_id("rewrite-")
    plan: list[tuple[Path, pa.Table, list[str]]] = []
    for line, date in sorted(pairs):
        folder = partition_dir(root, line, date)
        old = sorted(str(folder / n) for n in os.listdir(folder) if _is_part(n)) if folder.is_dir() else []
        kept = ds.dataset(old, schema=S.FILE_CATALOG_SCHEMA, format="parquet").to_table() if old else None
        if kept is not None:
            kept = kept.filter(pc.invert(pc.is_in(kept[S.IMAGE_ID], value_set=ids)))
        mine = updated.filter(pc.and_(pc.equal(updated[S.LINE], line), pc.equal(updated[S.DATE], date)))
        mine = mine.select(S.FILE_CATALOG_SCHEMA.names).cast(S.FILE_CATALOG_SCHEMA)
        merged = mine if kept is None else pa.concat_tables([kept, mine])
        plan.append((folder / f"part-{run_id}.parquet", merged, old))
    new_files = [str(p) for p, t, _ in plan if t.num_rows]
    old_files = [f for _, _, old in plan for f in old]
    _atomic_write_text(_journal_path(root, run_id), json.dumps({"new": new_files, "old": old_files}))
    for path, table, _ in plan:
        if table.num_rows:
            publish_parquet(table.sort_by([(S.CAPTURED_AT, "ascending"), (S.IMAGE_ID, "ascending")]), path)
    _remove_replaced(old_files)
    _journal_path(root, run_id).unlink()
    return len(plan)
