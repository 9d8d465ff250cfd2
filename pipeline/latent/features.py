"""Backbone features of catalog images, computed once per image and kept in the catalog's feature store.

The ``"pretrained"`` encoder and the patch-level detector read a frozen backbone's features (``models.backbone``):
a pooled vector per image (the encoder head's input) and a patch map (what the patch detector compares). The
backbone is the expensive part, so its features are computed once per image and stored; nightly training and
scoring then read them.

Store layout (next to the catalog tables)::

    <catalog root>/features/<backbone folder>/part-<digest of the chunk's image digests>.parquet

one row per image: ``sha256`` (the image's content digest, its key), ``pooled`` (float32 list) and ``patches``
(float16 bytes of the (C, h, w) map). Each part records its backbone id in the Parquet metadata; features of
another backbone are refused (:class:`FeatureMismatch`), as latents of another model are.

Public API: :func:`compute_features` (images in memory) and :func:`load_or_compute_features` (catalog rows or image
digests, computing and storing what is missing), both returning a :class:`FeatureSet`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from models.backbone import BACKBONE_ID

__all__ = [
    "FEATURES_DIR",
    "FeatureMismatch",
    "FeatureSet",
    "compute_features",
    "default_workers",
    "feature_dir",
    "load_features",
    "load_or_compute_features",
    "parse_backbone_id",
    "image_features",
    "pooled_features",
    "store_features",
]

FEATURES_DIR = "features"
SHA = "sha256"
_META_ID = b"linewatch.backbone_id"
_META_SHAPE = b"linewatch.patch_shape"
_BATCH = 32
_PARALLEL_MIN = 256
"""Below this many images one in-process worker is used (two worker processes cost a few seconds to start)."""


class FeatureMismatch(ValueError):
    """Features come from another backbone (network, resolution, taps or weights) than the one asked for."""


@dataclass(frozen=True)
class FeatureSet:
    """Backbone features of N images, in the order they were asked for.

    Attributes:
        pooled: float32 (N, F) pooled multi-level features (the ``"pretrained"`` encoder head's input).
        patches: float16 (N, C, h, w) patch maps (the patch detector's input).
        backbone_id: ``models.backbone.backbone_id`` of the backbone that computed them.
    """

    pooled: np.ndarray
    patches: np.ndarray
    backbone_id: str

    def __post_init__(self) -> None:
        if self.pooled.ndim != 2 or self.patches.ndim != 4 or len(self.pooled) != len(self.patches):
            raise ValueError(f"FeatureSet needs pooled (N, F) and patches (N, C, h, w), got "
                             f"{self.pooled.shape} and {self.patches.shape}")

    def __len__(self) -> int:
        return len(self.pooled)

    def require(self, backbone_id: str) -> FeatureSet:
        """This set if it was computed by ``backbone_id``; :class:`FeatureMismatch` otherwise."""
        if self.backbone_id != backbone_id:
            raise FeatureMismatch(f"features of backbone {self.backbone_id!r} cannot be used where "
                                  f"{backbone_id!r} is expected; recompute them with that backbone")
        return self

    def take(self, index: Sequence[int] | np.ndarray) -> FeatureSet:
        """The features of the images at ``index`` (a new set)."""
        idx = np.asarray(index, dtype=np.int64)
        return FeatureSet(self.pooled[idx], self.patches[idx], self.backbone_id)


def parse_backbone_id(backbone_id: str) -> tuple[str, int]:
    """``(name, image_size)`` of a backbone id (``<name>@<size>px-...``); ``ValueError`` if it is not one."""
    m = re.fullmatch(r"(?P<name>[\w.-]+)@(?P<size>\d+)px-.+", backbone_id)
    if m is None:
        raise ValueError(f"not a backbone id: {backbone_id!r} (expected e.g. {BACKBONE_ID!r})")
    return m["name"], int(m["size"])


# --- computing -------------------------------------------------------------------------------------------------
def _compute_chunk(images: Any, backbone_id: str, batch_size: int, float_range: tuple[float, float]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Features of one chunk of raw images with one thread (what each worker process runs)."""
    import torch

    from models.backbone import backbone_input, load_backbone

    name, size = parse_backbone_id(backbone_id)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = load_backbone(name, size, expected_id=backbone_id)
        pooled, patches = [], []
        for s in range(0, len(images), batch_size):
            out = net(backbone_input(images[s:s + batch_size], size, float_range=float_range))
            pooled.append(out.pooled.numpy())
            patches.append(out.patches.numpy().astype(np.float16))
    finally:
        torch.set_num_threads(before)
    return np.concatenate(pooled), np.concatenate(patches)


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def default_workers(n_images: int) -> int:
    """Worker processes for ``n_images``: one per core (at most 2) for large sets, else 1 (in process)."""
    return 1 if n_images < _PARALLEL_MIN else max(1, min(2, os.cpu_count() or 1))


def compute_features(
    images: Any,
    *,
    backbone_id: str = BACKBONE_ID,
    workers: int | None = None,
    batch_size: int = _BATCH,
    float_range: tuple[float, float] = (0.0, 1.0),
) -> FeatureSet:
    """Backbone features of raw gray cells.

    Each worker runs the backbone with one thread on a contiguous slice (two 1-thread processes use two cores
    better than one process with two threads); ``workers=1`` computes in this process.

    Args:
        images: (N, H, W) array or a list of (H, W) arrays, uint8 / uint16 or floats in ``float_range``; cells are
            scaled by the fixed range of their bit depth (no per-image normalisation) and resized to the
            backbone's input size.
        backbone_id: which backbone (``models.backbone.backbone_id``).
        workers: worker processes (default :func:`default_workers`).
        batch_size: images per forward pass.
        float_range: value range of float images.

    Returns:
        The features, in input order.
    """
    n = len(images)
    if n == 0:
        raise ValueError("compute_features got no images")
    workers = default_workers(n) if workers is None else max(1, int(workers))
    if workers == 1:
        return FeatureSet(*_compute_chunk(images, backbone_id, batch_size, float_range), backbone_id)
    chunks = _split(n, workers)
    # fork, as torch's DataLoader workers do (each worker then runs torch with one thread); spawn would re-import
    # the caller's main module.
    with ProcessPoolExecutor(len(chunks), mp_context=get_context("fork")) as pool:
        futures = [pool.submit(_compute_chunk, images[a:b], backbone_id, batch_size, float_range) for a, b in chunks]
        parts = [f.result() for f in futures]
    return FeatureSet(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), backbone_id)


# --- the store -------------------------------------------------------------------------------------------------
def feature_dir(catalog_root: str | os.PathLike[str], backbone_id: str = BACKBONE_ID) -> Path:
    """Folder of one backbone's features in a catalog root."""
    parse_backbone_id(backbone_id)
    return Path(catalog_root) / FEATURES_DIR / re.sub(r"[^\w.@-]", "_", backbone_id)


def _part_table(digests: Sequence[str], fs: FeatureSet) -> pa.Table:
    pooled = pa.FixedSizeListArray.from_arrays(pa.array(fs.pooled.astype(np.float32).ravel()), fs.pooled.shape[1])
    patches = pa.array([row.tobytes() for row in fs.patches.astype(np.float16)], type=pa.binary())
    table = pa.table({SHA: pa.array(list(digests), pa.string()), "pooled": pooled, "patches": patches})
    meta = {_META_ID: fs.backbone_id.encode(), _META_SHAPE: ",".join(map(str, fs.patches.shape[1:])).encode()}
    return table.replace_schema_metadata(meta)


def store_features(catalog_root: str | os.PathLike[str], digests: Sequence[str], fs: FeatureSet) -> Path:
    """Write features of the images with content digests ``digests`` as one part of the store (atomic)."""
    from pipeline.catalog.tables import publish_parquet

    if len(digests) != len(fs):
        raise ValueError(f"{len(digests)} digests for {len(fs)} feature rows")
    name = hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()[:16]
    return publish_parquet(_part_table(digests, fs), feature_dir(catalog_root, fs.backbone_id) / f"part-{name}.parquet")


def _read_part(path: Path, backbone_id: str, want: set[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    meta = pq.read_schema(path).metadata or {}
    got = meta.get(_META_ID, b"").decode() or None
    if got != backbone_id:
        raise FeatureMismatch(f"{path}: features of backbone {got!r}, not {backbone_id!r}; they are refused "
                              "(remove the file or recompute with the right backbone)")
    shape = tuple(int(v) for v in meta[_META_SHAPE].decode().split(","))
    table = pq.read_table(path)
    sha = table.column(SHA).to_pylist()
    keep = [i for i, s in enumerate(sha) if s in want]
    if not keep:
        return [], np.zeros((0, 0), np.float32), np.zeros((0, *shape), np.float16)
    table = table.take(pa.array(keep))
    pooled = np.stack(table.column("pooled").to_numpy(zero_copy_only=False)).astype(np.float32)
    patches = np.frombuffer(b"".join(table.column("patches").to_pylist()), np.float16).reshape(len(keep), *shape)
    return [sha[i] for i in keep], pooled, patches


def load_features(catalog_root: str | os.PathLike[str], digests: Sequence[str], *, backbone_id: str = BACKBONE_ID
                  ) -> tuple[FeatureSet | None, list[str]]:
    """Stored features of ``digests`` (in order) and the digests the store does not hold.

    Returns:
        ``(features of the held digests in the order asked, or None if none is held; missing digests)``.

    Raises:
        FeatureMismatch: a part in this backbone's folder records another backbone.
    """
    want = set(digests)
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    folder = feature_dir(catalog_root, backbone_id)
    for path in sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []:
        sha, pooled, patches = _read_part(path, backbone_id, want - set(found))
        found.update({s: (pooled[i], patches[i]) for i, s in enumerate(sha)})
    held = [d for d in digests if d in found]
    missing = list(dict.fromkeys(d for d in digests if d not in found))
    if not held:
        return None, missing
    fs = FeatureSet(np.stack([found[d][0] for d in held]), np.stack([found[d][1] for d in held]), backbone_id)
    return fs, missing


def _rows_frame(rows: pd.DataFrame | Sequence[str], sha_col: str, path_col: str) -> pd.DataFrame:
    if isinstance(rows, pd.DataFrame):
        if sha_col not in rows.columns:
            raise ValueError(f"rows have no column {sha_col!r} (columns: {list(rows.columns)})")
        return rows
    return pd.DataFrame({sha_col: [str(d) for d in rows]})


def _compute_missing(catalog_root: Path, todo: pd.DataFrame, sha_col: str, path_col: str, backbone_id: str,
                     chunk_size: int, workers: int | None) -> None:
    """Read and featurise the images of ``todo`` chunk by chunk, storing each chunk as it finishes."""
    from pipeline.catalog.tables import resolve_store_path
    from pipeline.common.images import read_images

    for s in range(0, len(todo), chunk_size):
        part = todo.iloc[s:s + chunk_size]
        images = read_images([resolve_store_path(catalog_root, p) for p in part[path_col]], channels=1)
        fs = compute_features(images, backbone_id=backbone_id, workers=workers)
        store_features(catalog_root, part[sha_col].astype(str).tolist(), fs)


def load_or_compute_features(
    catalog_root: str | os.PathLike[str],
    rows: pd.DataFrame | Sequence[str],
    *,
    backbone_id: str = BACKBONE_ID,
    sha_col: str = SHA,
    path_col: str = "store_path",
    chunk_size: int = 512,
    workers: int | None = None,
) -> FeatureSet:
    """Features of catalog images from the feature store, computing (and storing) the missing ones.

    Args:
        catalog_root: the catalog root (features live under ``<root>/features``).
        rows: catalog rows (``sha_col`` and ``path_col`` = the image's path relative to the root) or bare image
            digests (then every digest must already be stored).
        backbone_id: which backbone's features; parts recorded by another backbone are refused.
        sha_col: the column with the image content digest (the key).
        path_col: the column with the image path relative to ``catalog_root``.
        chunk_size: images computed and stored per part (a crash keeps finished parts).
        workers: worker processes for the backbone (default :func:`default_workers`).

    Returns:
        One feature row per requested row, in order (duplicated digests repeat).

    Raises:
        FeatureMismatch: stored features of another backbone.
        KeyError: bare digests that the store does not hold.
    """
    root = Path(catalog_root)
    frame = _rows_frame(rows, sha_col, path_col)
    digests = frame[sha_col].astype(str).tolist()
    _, missing = load_features(root, digests, backbone_id=backbone_id)
    if missing:
        if path_col not in frame.columns:
            raise KeyError(f"{len(missing)} images have no stored {backbone_id} features (e.g. {missing[0]}); "
                           f"pass catalog rows with {path_col!r} to compute them")
        todo = frame.drop_duplicates(sha_col)
        todo = todo[todo[sha_col].astype(str).isin(set(missing))]
        _compute_missing(root, todo, sha_col, path_col, backbone_id, chunk_size, workers)
    fs, missing = load_features(root, digests, backbone_id=backbone_id)
    if fs is None or missing:
        raise RuntimeError(f"features of {len(missing)} images are still missing after computing them")
    return fs


def pooled_features(model_cfg: Any, catalog_root: str | os.PathLike[str], rows: pd.DataFrame, *,
                    path_col: str = "store_path", workers: int | None = None) -> Any:
    """Pooled backbone features (N, F) of catalog rows for a model whose encoder reads them, from the store.

    What the ``"pretrained"`` encoder trains and encodes from: each image is featurised once (missing ones are
    computed and stored), so a nightly retrain touches only the head and the decoder.

    Args:
        model_cfg: the model's ``InfoDiffusionConfig`` (its encoder names the backbone).
        catalog_root: the catalog root of the feature store.
        rows: catalog rows (``sha256`` and ``path_col``).
        path_col: the column with the image path relative to ``catalog_root``.
        workers: worker processes for the backbone.

    Returns:
        A float32 torch tensor (N, F) in row order, or None when the encoder reads images.
    """
    import torch

    from models.checkpoint import backbone_record

    if model_cfg.encoder.kind != "pretrained":
        return None
    fs = load_or_compute_features(catalog_root, rows, backbone_id=backbone_record(model_cfg)["id"],
                                  path_col=path_col, workers=workers)
    return torch.from_numpy(np.ascontiguousarray(fs.pooled, dtype=np.float32))


def image_features(model_cfg: Any, images: Sequence[Any], *, workers: int | None = None) -> Any:
    """Pooled backbone features (N, F) of images in memory for a model whose encoder reads them (not stored).

    :func:`pooled_features` for images outside a catalog (a folder given to ``linewatch train``, a sweep's images).

    Returns:
        A float32 torch tensor (N, F) in image order, or None when the encoder reads images.
    """
    import torch

    from models.checkpoint import backbone_record

    if model_cfg.encoder.kind != "pretrained":
        return None
    fs = compute_features(list(images), backbone_id=backbone_record(model_cfg)["id"], workers=workers)
    return torch.from_numpy(np.ascontiguousarray(fs.pooled, dtype=np.float32))
