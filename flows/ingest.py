"""Ingest flow: the drop folder -> the Parquet catalog (exactly once), every 10 minutes or on demand."""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from flows import job_task_options


@task(name="ingest-drop-folder", timeout_seconds=1800, **job_task_options())
def ingest_task(drop: str | None = None, line: str | None = None) -> dict[str, Any]:
    """Register every new valid image of the drop folder (retried when the catalog lock is busy).

    Args:
        drop: Drop folder (default ``settings.drop_dir``).
        line: Only this line's sub-folder.

    Returns:
        The run summary (``IngestSummary.to_dict()``).
    """
    from pipeline.catalog.ingest import IngestConfig, ingest
    from pipeline.settings import ensure_dirs, get_settings

    settings = ensure_dirs(get_settings())
    summary = ingest(drop or settings.drop_dir, settings.catalog_root, line=line, progress=False,
                     config=IngestConfig(mes_timezone=settings.timezone))
    out = summary.to_dict()
    print(
        f"ingest: {out['registered']} registered, {out['duplicates']} duplicates, {out['n_quarantined']} quarantined "
        f"({out['seconds']:.1f} s)"
    )
    return out


@flow(name="linewatch-ingest", log_prints=True, timeout_seconds=3600)
def ingest_flow(drop: str | None = None, line: str | None = None) -> dict[str, Any]:
    """Ingest the drop folder into the catalog.

    Args:
        drop: Drop folder (default ``$LINEWATCH_DROP`` / ``$LINEWATCH_HOME/drop``).
        line: Only this line.

    Returns:
        The ingest summary as a dict.
    """
    return ingest_task(drop, line)
