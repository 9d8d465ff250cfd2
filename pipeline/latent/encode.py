"""The encode stage: images → semantic latents z with a trained InfoDiffusion checkpoint.

Three entry points, from the lowest level up:

* :func:`encode_images`: numpy images in memory → ``(N, d)`` float32 latents.
* :func:`encode_paths`: image files → a DataFrame ``path, sha256, model_id, z_0..z_{d-1}`` (the ``linewatch encode``
  table).
* :func:`encode_catalog`: catalog rows → the **latents table** ``image_id, model_id, z_0..z_{d-1}``
  (``pipeline.common.schemas.latents_schema``), resumable: rows whose ``(image_id, model_id)`` is already in the output file
  are skipped, and new rows are flushed to disk every ``flush_every`` images with a temp file + ``os.replace``, so a
  crash never leaves a half-written table and a rerun continues where the last one stopped.

Image decoding runs in a small thread pool one batch ahead of the model, so file I/O overlaps with compute.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.common import atomic
from pipeline.common.images import read_image, sha256_file, spec_channels
from pipeline.common.schemas import (
    IMAGE_ID,
    MODEL_ID,
    SHA256,
    latent_columns,
    latents_schema,
    with_version,
    z_columns,
)

PATH = "path"
DEFAULT_BATCH_SIZE = 256
_READ_WORKERS = 4


# --- helpers ---------------------------------------------------------------------------------------------------
def resolve_checkpoint(checkpoint: Any) -> Any:
    """Return a loaded ``models.Checkpoint``; a path (str / PathLike) is loaded with ``models.load_checkpoint``."""
    if isinstance(checkpoint, str | os.PathLike):
        from models import load_checkpoint

        path = Path(checkpoint)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
        return load_checkpoint(path)
    for attr in ("model", "preprocess", "meta"):
        if not hasattr(checkpoint, attr):
            raise ValueError(f"expected a models.Checkpoint or a checkpoint folder, got {type(checkpoint).__name__}")
    return checkpoint


def model_id_of(checkpoint: Any) -> str:
    """The stable model id of a loaded checkpoint (``meta["model_id"]``)."""
    model_id = (checkpoint.meta or {}).get("model_id")
    if not model_id:
        raise ValueError("checkpoint has no meta['model_id']; re-save it with models.save_checkpoint")
    return str(model_id)


def _tqdm(total: int, desc: str, progress: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not progress or not sys.stderr.isatty())


def _model_device(model: Any) -> Any:
    import torch

    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


# --- in-memory encoding ----------------------------------------------------------------------------------------
def encode_images(
    model: Any, spec: Any, arrays: Sequence[np.ndarray], *, batch_size: int = DEFAULT_BATCH_SIZE
) -> np.ndarray:
    """Encode images held in memory.

    Args:
        model: An ``InfoDiffusion`` model (put in eval mode here).
        spec: Its ``PreprocessSpec`` (size, channels).
        arrays: uint8 / uint16 images, gray (H, W) or RGB (H, W, 3), any size.
        batch_size: Images per forward pass.

    Returns:
        float32 array (N, d), the deterministic code z = Enc(x0) of each image.

    Raises:
        ValueError: No images, a bad image (via ``to_model_input``), or a non-finite latent.
    """
    import torch

    from models import to_model_input

    arrays = list(arrays)
    if not arrays:
        raise ValueError("encode_images: no images to encode (empty batch)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    device = _model_device(model)
    if getattr(model, "uses_features", False):
        return _encode_from_features(model, arrays, device)
    out = []
    with torch.inference_mode():
        for start in range(0, len(arrays), batch_size):
            x = to_model_input(arrays[start : start + batch_size], spec).to(device)
            out.append(_checked_z(model.encode(x), start))
    return np.concatenate(out, axis=0)


def _encode_from_features(model: Any, arrays: Sequence[np.ndarray], device: Any, offset: int = 0) -> np.ndarray:
    """Latents of raw images for a ``"pretrained"`` encoder: the frozen backbone's pooled features, then the head."""
    import torch

    from pipeline.latent.features import image_features

    with torch.inference_mode():
        return _checked_z(model.encode(None, features=image_features(model.cfg, arrays).to(device)), offset)


def stored_latents(model: Any, catalog_root: str | os.PathLike[str], rows: pd.DataFrame, *,
                   path_col: str = "store_path", offset: int = 0) -> np.ndarray | None:
    """Codes (N, d) of catalog rows read from their stored backbone features, for a ``"pretrained"`` encoder.

    Missing features are computed and stored first (``pipeline.latent.features.pooled_features``), so each image is
    featurised once and other consumers (the retrain, the patch detector) read the same features. None for an encoder
    that reads the model-size image (the caller encodes the images themselves). ``offset``: the first row's number in
    an error message.
    """
    import torch

    from pipeline.latent.features import pooled_features

    if not getattr(model, "uses_features", False):
        return None
    feats = pooled_features(model.cfg, catalog_root, rows, path_col=path_col)
    model.eval()
    with torch.inference_mode():
        return _checked_z(model.encode(None, features=feats.to(_model_device(model))), offset)


def _checked_z(z: Any, offset: int) -> np.ndarray:
    z_np = z.detach().float().cpu().numpy().astype(np.float32, copy=False)
    bad = ~np.isfinite(z_np).all(axis=1)
    if bad.any():
        raise ValueError(f"encoder produced non-finite latents for image(s) {(np.flatnonzero(bad) + offset).tolist()}")
    return z_np


def _read_one(path: Path, channels: int) -> tuple[np.ndarray, str]:
    return read_image(path, channels=channels), sha256_file(path)


def _prefetched_batches(
    paths: Sequence[Path], batch_size: int, channels: int, workers: int
) -> Iterator[tuple[int, list[np.ndarray], list[str]]]:
    """Yield ``(start, arrays, sha256s)`` per batch while the next batch is already being read."""
    if not paths:
        return
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:

        def submit(start: int) -> list[Future]:
            return [pool.submit(_read_one, p, channels) for p in paths[start : start + batch_size]]

        pending = submit(0)
        for start in range(0, len(paths), batch_size):
            current = pending
            if start + batch_size < len(paths):
                pending = submit(start + batch_size)
            results = [f.result() for f in current]
            yield start, [r[0] for r in results], [r[1] for r in results]


def _encode_files(
    checkpoint: Any, paths: Sequence[Path], *, batch_size: int, progress: bool, desc: str, workers: int
) -> Iterator[tuple[int, np.ndarray, list[str]]]:
    """Yield ``(start, z (b, d), sha256s)`` per batch of files."""
    import torch

    from models import to_model_input

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model, spec = checkpoint.model, checkpoint.preprocess
    model.eval()
    device = _model_device(model)
    channels = spec_channels(spec) or 1
    with _tqdm(len(paths), desc, progress) as bar, torch.inference_mode():
        for start, arrays, shas in _prefetched_batches(paths, batch_size, channels, workers):
            if getattr(model, "uses_features", False):
                z = _encode_from_features(model, arrays, device, start)
            else:
                z = _checked_z(model.encode(to_model_input(arrays, spec).to(device)), start)
            bar.update(len(arrays))
            yield start, z, shas


# --- files → table ---------------------------------------------------------------------------------------------
def encode_paths(
    checkpoint: Any,
    paths: Sequence[str | os.PathLike[str]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    workers: int = _READ_WORKERS,
) -> pd.DataFrame:
    """Encode image files.

    Args:
        checkpoint: A loaded ``models.Checkpoint`` or a checkpoint folder.
        paths: Image files (at least one).
        batch_size: Images per forward pass.
        progress: Show a tqdm bar (only on a TTY).
        workers: Reader threads.

    Returns:
        DataFrame with columns ``path`` (str, as given), ``sha256`` (of the file bytes), ``model_id``, and
        ``z_0..z_{d-1}`` (float32), one row per path in input order.

    Raises:
        ValueError: No paths, an undecodable image (the message names it), or a checkpoint without a model id.
    """
    ckpt = resolve_checkpoint(checkpoint)
    model_id = model_id_of(ckpt)
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("encode_paths: no image paths given")
    zs, shas = [], []
    for _, z, s in _encode_files(ckpt, paths, batch_size=batch_size, progress=progress, desc="encode", workers=workers):
        zs.append(z)
        shas.extend(s)
    z_all = np.concatenate(zs, axis=0)
    df = pd.DataFrame({PATH: [str(p) for p in paths], SHA256: shas, MODEL_ID: model_id})
    return pd.concat([df, pd.DataFrame(z_all, columns=latent_columns(z_all.shape[1]))], axis=1)


def paths_table_schema(d: int) -> pa.Schema:
    """Arrow schema of the :func:`encode_paths` table (``path, sha256, model_id, z_*``)."""
    fields = [pa.field(PATH, pa.string(), nullable=False), pa.field(SHA256, pa.string(), nullable=False)]
    fields.append(pa.field(MODEL_ID, pa.string(), nullable=False))
    fields += [pa.field(c, pa.float32(), nullable=False) for c in latent_columns(d)]
    return with_version(pa.schema(fields), "encoded_paths")


# --- Parquet I/O -----------------------------------------------------------------------------------------------
def write_parquet_atomic(df: pd.DataFrame, out_path: str | os.PathLike[str], schema: pa.Schema | None = None) -> Path:
    """Write ``df`` to ``out_path`` via a temp file in the same folder and ``os.replace`` (atomic on POSIX)."""
    return atomic.write_parquet(out_path, pa.Table.from_pandas(df, schema=schema, preserve_index=False))


def read_latents(path: str | os.PathLike[str], *, model_id: str | None = None) -> pd.DataFrame:
    """Read a latents Parquet file (either table kind); optionally check/filter to one ``model_id``.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not a latents table, or no rows of ``model_id`` (the message lists the ids present).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"latents file {str(path)!r} does not exist")
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for non-Parquet input
        raise ValueError(f"cannot read {str(path)!r} as Parquet: {exc}") from exc
    z_columns(df)
    if model_id is not None:
        if MODEL_ID not in df.columns:
            raise ValueError(f"{str(path)!r} has no model_id column")
        present = sorted(df[MODEL_ID].astype(str).unique())
        df = df[df[MODEL_ID] == model_id].reset_index(drop=True)
        if df.empty:
            raise ValueError(
                f"{str(path)!r} holds no latents of model {model_id!r} (it has {present}); "
                "latents of different models are not comparable: re-encode with this model"
            )
    return df


# --- catalog → resumable latents table -------------------------------------------------------------------------
def encode_catalog(
    checkpoint: Any, catalog_df: pd.DataFrame, out_path: str | os.PathLike[str], *,
    batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True, image_path_col: str = "store_path",
    id_col: str = IMAGE_ID, root: str | os.PathLike[str] | None = None, flush_every: int = 4096,
    workers: int = _READ_WORKERS,
) -> pd.DataFrame:
    """Encode catalog images into the resumable latents table at ``out_path`` (a Parquet file).

    Rows already present for ``(image_id, model_id)`` are skipped, so rerunning after a crash, or after new images
    arrived, encodes only what is missing. Part files written by :func:`encode_part` (parallel workers) are merged
    in first, so what they encoded is not encoded again. Latents of other models in the same file are kept untouched. New rows are
    flushed every ``flush_every`` images (temp file + ``os.replace``).

    Args:
        checkpoint: A loaded ``models.Checkpoint`` or a checkpoint folder.
        catalog_df: Catalog rows; needs ``id_col`` and ``image_path_col``. Duplicate ids are encoded once.
        out_path: The latents Parquet file (created if missing).
        batch_size: Images per forward pass.
        progress: Show a tqdm bar (only on a TTY).
        image_path_col: Column with the image file path.
        id_col: Column with the image id.
        root: Folder that relative paths in ``image_path_col`` are relative to (e.g. the content store).
        flush_every: Images between two atomic writes.
        workers: Reader threads.

    Returns:
        The full latents table (existing rows of every model plus the new ones), columns
        ``image_id, model_id, z_0..z_{d-1}[, score columns]``.

    Raises:
        ValueError: Missing columns, an existing file with another latent dimension, or an undecodable image.
    """
    ckpt = resolve_checkpoint(checkpoint)
    model_id = model_id_of(ckpt)
    for col in (id_col, image_path_col):
        if col not in catalog_df.columns:
            raise ValueError(f"catalog has no column {col!r} (columns: {list(catalog_df.columns)})")
    out_path = Path(out_path)
    merge_parts(out_path)
    existing = _read_existing(out_path)
    keep = [id_col, image_path_col] + ([SHA256] if SHA256 in catalog_df.columns else [])
    todo = catalog_df[keep].drop_duplicates(subset=id_col)
    if not existing.empty:
        done = set(existing.loc[existing[MODEL_ID] == model_id, IMAGE_ID].astype(str))
        todo = todo[~todo[id_col].astype(str).isin(done)]
    if todo.empty:
        return existing
    base = Path(root) if root is not None else None
    paths = [Path(p) if base is None or Path(p).is_absolute() else base / p for p in todo[image_path_col]]
    ids = todo[id_col].astype(str).tolist()
    if getattr(ckpt.model, "uses_features", False) and base is not None and SHA256 in todo.columns:
        batches = _encode_stored_features(ckpt, todo, base, image_path_col, flush_every)
    else:
        batches = _encode_files(ckpt, paths, batch_size=batch_size, progress=progress, desc="encode", workers=workers)
    return _append_batches(batches, existing, out_path, ids, model_id, flush_every)


def _append_batches(batches: Iterable[tuple[int, np.ndarray, Any]], table: pd.DataFrame, out_path: Path,
                    ids: list[str], model_id: str, flush_every: int) -> pd.DataFrame:
    """Appends the encoded ``batches`` (rows ``ids[start:]``) to ``table``, written every ``flush_every`` rows."""
    score_cols = _score_columns(table)
    pending: list[pd.DataFrame] = []
    n_pending = 0
    for start, z, _ in batches:
        chunk = pd.DataFrame({IMAGE_ID: ids[start : start + len(z)], MODEL_ID: model_id})
        chunk = pd.concat([chunk, pd.DataFrame(z, columns=latent_columns(z.shape[1]))], axis=1)
        for col in score_cols:
            chunk[col] = np.nan
        pending.append(chunk)
        n_pending += len(chunk)
        if n_pending >= flush_every:
            table = _flush(table, pending, out_path, score_cols)
            pending, n_pending = [], 0
    if pending:
        table = _flush(table, pending, out_path, score_cols)
    return table


def _flush(table: pd.DataFrame, pending: list[pd.DataFrame], out_path: Path, score_cols: list[str]) -> pd.DataFrame:
    """``table`` with the ``pending`` chunks appended, written atomically to ``out_path``."""
    new = pd.concat(pending, ignore_index=True)
    d = len(z_columns(new))
    if not table.empty and len(z_columns(table)) != d:
        raise ValueError(
            f"{str(out_path)!r} holds {len(z_columns(table))}-d latents, this model gives {d}-d; "
            "use a separate latents file per latent dimension"
        )
    full = pd.concat([table, new], ignore_index=True) if not table.empty else new
    write_parquet_atomic(full, out_path, latents_schema(d, score_cols))
    return full


def _encode_stored_features(ckpt: Any, rows: pd.DataFrame, root: Path, path_col: str, chunk: int
                            ) -> Iterator[tuple[int, np.ndarray, list[str]]]:
    """Yield ``(start, z, sha256s)`` per chunk of catalog rows for a ``"pretrained"`` encoder (:func:`stored_latents`)."""
    for start in range(0, len(rows), chunk):
        part = rows.iloc[start : start + chunk]
        z = stored_latents(ckpt.model, root, part, path_col=path_col, offset=start)
        yield start, z, part[SHA256].astype(str).tolist()


def parts_dir(out_path: str | os.PathLike[str]) -> Path:
    """Folder of the part files that parallel :func:`encode_part` calls write next to the latents table."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".parts")


def part_file(folder: str | os.PathLike[str], model_id: str, image_ids: Sequence[str]) -> Path:
    """``<folder>/<model_id>-<digest of the sorted ids>.parquet``: a retried chunk maps to the same part file."""
    digest = hashlib.sha256("\n".join(sorted(map(str, image_ids))).encode()).hexdigest()[:16]
    return Path(folder) / f"{model_id}-{digest}.parquet"


def pending_images(
    checkpoint: Any, catalog_df: pd.DataFrame, out_path: str | os.PathLike[str], *, id_col: str = IMAGE_ID
) -> pd.DataFrame:
    """Catalog rows (duplicates dropped) that the latents table and its part files do not hold for this model."""
    model_id = model_id_of(resolve_checkpoint(checkpoint))
    done: set[str] = set()
    existing = _read_existing(Path(out_path))
    if not existing.empty:
        done |= set(existing.loc[existing[MODEL_ID] == model_id, IMAGE_ID].astype(str))
    for part in sorted(parts_dir(out_path).glob(f"{model_id}-*.parquet")):
        done |= set(pd.read_parquet(part, columns=[IMAGE_ID])[IMAGE_ID].astype(str))
    rows = catalog_df.drop_duplicates(subset=id_col)
    return rows[~rows[id_col].astype(str).isin(done)]


def encode_part(
    checkpoint: Any,
    rows: pd.DataFrame,
    out_path: str | os.PathLike[str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    image_path_col: str = "store_path",
    id_col: str = IMAGE_ID,
    root: str | os.PathLike[str] | None = None,
    progress: bool = False,
    workers: int = _READ_WORKERS,
) -> Path:
    """Encode one chunk of catalog rows into its own part file (for many workers; one writer merges them later).

    The part is named by the model id and a digest of the chunk's image ids, and written atomically, so a retried
    or repeated chunk rewrites the same file instead of duplicating rows. :func:`encode_catalog` (or
    :func:`merge_parts`) folds the parts into the table.

    Returns:
        The part file.
    """
    ckpt = resolve_checkpoint(checkpoint)
    model_id = model_id_of(ckpt)
    for col in (id_col, image_path_col):
        if col not in rows.columns:
            raise ValueError(f"rows have no column {col!r} (columns: {list(rows.columns)})")
    rows = rows.drop_duplicates(subset=id_col)
    ids = rows[id_col].astype(str).tolist()
    if not ids:
        raise ValueError("encode_part got an empty chunk")
    base = Path(root) if root is not None else None
    paths = [Path(p) if base is None or Path(p).is_absolute() else base / p for p in rows[image_path_col]]
    chunks = []
    if getattr(ckpt.model, "uses_features", False) and base is not None and SHA256 in rows.columns:
        batches = _encode_stored_features(ckpt, rows, base, image_path_col, len(rows))
    else:
        batches = _encode_files(ckpt, paths, batch_size=batch_size, progress=progress, desc="encode part",
                                workers=workers)
    for start, z, _ in batches:
        chunk = pd.DataFrame({IMAGE_ID: ids[start : start + len(z)], MODEL_ID: model_id})
        chunks.append(pd.concat([chunk, pd.DataFrame(z, columns=latent_columns(z.shape[1]))], axis=1))
    df = pd.concat(chunks, ignore_index=True)
    out = part_file(parts_dir(out_path), model_id, ids)
    return write_parquet_atomic(df, out, latents_schema(len(z_columns(df))))


def merge_parts(out_path: str | os.PathLike[str]) -> int:
    """Fold the part files of :func:`encode_part` into the latents table (single writer), then delete them.

    Rows already in the table for the same ``(image_id, model_id)`` win; the parts are removed only after the
    table was replaced atomically, so a crash in between loses nothing (the next merge sees the same parts).

    Returns:
        Rows added to the table.
    """
    out_path = Path(out_path)
    parts = sorted(parts_dir(out_path).glob("*.parquet"))
    if not parts:
        return 0
    table = _read_existing(out_path)
    new = pd.concat([read_latents(p) for p in parts], ignore_index=True)
    d = len(z_columns(new))
    if not table.empty and len(z_columns(table)) != d:
        raise ValueError(f"{str(out_path)!r} holds {len(z_columns(table))}-d latents, the parts hold {d}-d")
    score_cols = _score_columns(table)
    for col in score_cols:
        new[col] = np.nan
    full = pd.concat([table, new], ignore_index=True) if not table.empty else new
    before = len(table)
    full = full.drop_duplicates([IMAGE_ID, MODEL_ID], keep="first", ignore_index=True)
    write_parquet_atomic(full, out_path, latents_schema(d, score_cols))
    for p in parts:
        p.unlink(missing_ok=True)
    return len(full) - before


def _read_existing(out_path: Path) -> pd.DataFrame:
    if not out_path.exists():
        return pd.DataFrame()
    df = read_latents(out_path)
    for col in (IMAGE_ID, MODEL_ID):
        if col not in df.columns:
            raise ValueError(f"{str(out_path)!r} is not a catalog latents table (no {col!r} column)")
    return df


def _score_columns(df: pd.DataFrame) -> list[str]:
    if df.empty:
        return []
    zs = set(z_columns(df))
    return [c for c in df.columns if c not in zs and c not in (IMAGE_ID, MODEL_ID)]


def add_scores(latents_df: pd.DataFrame, scores: Mapping[str, Sequence[float] | np.ndarray]) -> pd.DataFrame:
    """Return a copy of a latents table with per-image score columns (float64) added or replaced.

    Args:
        latents_df: A latents table.
        scores: Column name → one value per row (same order as ``latents_df``).

    Raises:
        ValueError: A length mismatch, or a name that clashes with an id or latent column.
    """
    out = latents_df.copy()
    protected = {IMAGE_ID, MODEL_ID, PATH, SHA256, *z_columns(latents_df)}
    for name, values in scores.items():
        if name in protected:
            raise ValueError(f"score column {name!r} clashes with a latents column")
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
        if arr.shape[0] != len(out):
            raise ValueError(f"score {name!r} has {arr.shape[0]} values for {len(out)} rows")
        out[name] = arr
    return out
