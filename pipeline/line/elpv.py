"""ELPV loading, lots, and the deterministic train / calibration / held-out pools.

The ELPV data set (Buerhop-Lutz et al. 2018; Deitsch et al. 2019) holds 2,624 electroluminescence (EL) images of solar
cells, 300 x 300 px, 8-bit, cut from 44 photovoltaic modules, each with a defect probability in {0, 1/3, 2/3, 1} and a
cell type ("mono" or "poly"). It ships in the ``elpv-dataset`` package; it is never copied into this repository.

**Lots.** The file order follows the source module: the mean intensities of adjacent cells correlate at about 0.75,
those of random pairs at about 0.01. A module is our "lot". ELPV does not publish module ids, so they are derived
from the file order: the type column changes 9 times (10 single-type runs, each a whole number of modules); each run
is cut into blocks of ``LOT_SIZE`` = 60 consecutive cells (a 60-cell module) from its start, and a remainder shorter
than half a block joins the last block. This yields exactly 44 lots (sizes 48 to 72), matching the 44 modules of the
paper; boundaries inside a run are approximate (some modules have 72 cells or lost cells), which is fine for
everything a lot is used for here: replaying cells in a realistic order and keeping near-duplicate neighbours in
one pool.

**Pools.** :func:`split_pools` assigns *whole lots* to ``train`` / ``calibration`` / ``heldout`` (60 / 20 / 20 % of
cells by default), stratified by type and by the lot's mean defect probability, so no pool evaluates on a
near-duplicate neighbour of a training cell and every pool holds mono and poly cells of all four defect levels.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

POOLS: tuple[str, str, str] = ("train", "calibration", "heldout")
"""Pool names, in the order of the ``fractions`` of :func:`split_pools`."""

LOT_SIZE = 60
"""Nominal number of cells per lot (a 60-cell module)."""

PROB_LEVELS: tuple[float, ...] = (0.0, 1 / 3, 2 / 3, 1.0)
"""The defect-probability levels of ELPV."""


@dataclass(frozen=True)
class ElpvData:
    """The ELPV data set in file order (arrays are read-only).

    Attributes:
        images: uint8 array (N, 300, 300).
        probs: float array (N,) of defect probabilities in {0, 1/3, 2/3, 1}.
        types: str array (N,) of "mono" / "poly".
        index: int array (N,), the position in ELPV's ``labels.csv`` (0-based).
        lot: int array (N,), the derived lot (module) id, 0..43, in file order.
    """

    images: np.ndarray
    probs: np.ndarray
    types: np.ndarray
    index: np.ndarray
    lot: np.ndarray

    def __len__(self) -> int:
        return int(self.index.shape[0])


def derive_lots(types: Sequence[str] | np.ndarray, lot_size: int = LOT_SIZE) -> np.ndarray:
    """Derive lot (module) ids from the file order of a sequence of cell types.

    Each maximal run of equal types is cut into blocks of ``lot_size`` cells from its start; a remainder shorter than
    half a block joins the previous block (or forms the run's only lot when the run is shorter than a block).

    Args:
        types: the cell types in file order.
        lot_size: nominal cells per lot.

    Returns:
        int array (N,) of lot ids, consecutive and non-decreasing from 0.
    """
    if lot_size < 1:
        raise ValueError(f"lot_size must be >= 1, got {lot_size}")
    types = np.asarray(types)
    n = types.shape[0]
    lot = np.empty(n, dtype=np.int64)
    if n == 0:
        return lot
    starts = np.concatenate([[0], np.nonzero(types[1:] != types[:-1])[0] + 1, [n]])
    next_id = 0
    for s, e in zip(starts[:-1], starts[1:], strict=True):
        length = int(e - s)
        n_blocks = max(1, length // lot_size + (1 if length % lot_size >= lot_size / 2 else 0))
        block = np.minimum(np.arange(length) // lot_size, n_blocks - 1)
        lot[s:e] = next_id + block
        next_id += n_blocks
    return lot


@functools.lru_cache(maxsize=1)
def load_elpv() -> ElpvData:
    """Load ELPV from the installed ``elpv-dataset`` package (cached for the process, ~3 s the first time).

    Returns:
        The data set in file order, with derived lots. Arrays are read-only: copy before modifying.
    """
    from elpv_dataset.utils import load_dataset

    images, probs, types = load_dataset()
    images = np.ascontiguousarray(images, dtype=np.uint8)
    probs = np.asarray(probs, dtype=np.float64)
    types = np.asarray(types).astype(str)
    index = np.arange(images.shape[0], dtype=np.int64)
    lot = derive_lots(types)
    for arr in (images, probs, types, index, lot):
        arr.setflags(write=False)
    return ElpvData(images=images, probs=probs, types=types, index=index, lot=lot)


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != len(POOLS):
        raise ValueError(f"fractions must have {len(POOLS)} values (for {POOLS}), got {tuple(fractions)}")
    fr = tuple(float(f) for f in fractions)
    if any(f <= 0 for f in fr) or not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must be positive and sum to 1, got {fr}")
    return fr  # type: ignore[return-value]


def assign_lots(
    lot: np.ndarray,
    probs: np.ndarray,
    types: np.ndarray,
    *,
    seed: int = 0,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
) -> dict[int, str]:
    """Assign whole lots to pools, stratified by type and mean defect probability (pure function).

    Within each type, lots are sorted by mean defect probability, cut into chunks of ``ceil(1 / min(fractions))``
    lots, shuffled inside each chunk (seeded), then assigned one by one to the pool whose share of cells lags its
    target fraction the most. Because lots arrive sorted by defect level, every pool receives lots from the whole
    range of defect levels.

    Args:
        lot: int array (N,) of lot ids.
        probs: float array (N,) of defect probabilities.
        types: str array (N,) of cell types.
        seed: seed of the within-chunk shuffle.
        fractions: target share of cells for each of :data:`POOLS`.

    Returns:
        A mapping lot id -> pool name.
    """
    fr = np.asarray(_check_fractions(fractions))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5E1]))
    chunk = max(1, math.ceil(1.0 / fr.min() - 1e-9))
    frame = pd.DataFrame({"lot": lot, "prob": probs, "type": types})
    per_lot = frame.groupby("lot").agg(n=("prob", "size"), mean_prob=("prob", "mean"), type=("type", "first"))
    out: dict[int, str] = {}
    for _, lots in sorted(per_lot.groupby("type"), key=lambda kv: kv[0]):
        order = lots.sort_values(["mean_prob"], kind="stable").index.to_numpy()
        shuffled = np.concatenate([rng.permutation(order[i : i + chunk]) for i in range(0, len(order), chunk)])
        assigned = np.zeros(len(POOLS))
        for lot_id in shuffled:
            n = float(lots.loc[lot_id, "n"])
            deficit = fr * (assigned.sum() + n) - assigned
            k = int(np.argmax(deficit))
            assigned[k] += n
            out[int(lot_id)] = POOLS[k]
    return out


@functools.lru_cache(maxsize=8)
def _split_pools_cached(seed: int, fractions: tuple[float, float, float]) -> pd.DataFrame:
    data = load_elpv()
    mapping = assign_lots(data.lot, data.probs, data.types, seed=seed, fractions=fractions)
    return pd.DataFrame(
        {
            "index": data.index.copy(),
            "prob": data.probs.copy(),
            "type": data.types.copy(),
            "lot": data.lot.copy(),
            "pool": pd.Categorical([mapping[int(lt)] for lt in data.lot], categories=list(POOLS)),
        }
    )


def split_pools(seed: int = 0, fractions: Sequence[float] = (0.6, 0.2, 0.2)) -> pd.DataFrame:
    """Deterministic split of ELPV into train / calibration / held-out pools by whole lots.

    Args:
        seed: split seed (the documented split is ``seed=0``).
        fractions: target share of cells for ``train``, ``calibration``, ``heldout``.

    Returns:
        A DataFrame with one row per ELPV cell in file order and columns ``index``, ``prob``, ``type``, ``lot``,
        ``pool`` (a copy: safe to modify).
    """
    return _split_pools_cached(int(seed), _check_fractions(fractions)).copy()


def resolve_pools(pool: str | Iterable[str]) -> tuple[str, ...]:
    """Normalise a pool selector (a name, ``"all"``, a comma-separated string, or names) to a tuple of pools."""
    names = [p.strip() for p in pool.split(",")] if isinstance(pool, str) else [str(p).strip() for p in pool]
    if names == ["all"]:
        return POOLS
    bad = [p for p in names if p not in POOLS]
    if bad or not names:
        raise ValueError(f"unknown pool {bad or names!r}: choose from {POOLS} or 'all'")
    return tuple(dict.fromkeys(names))


def pool_indices(
    pool: str | Iterable[str],
    *,
    functional_only: bool = False,
    probs: float | Iterable[float] | None = None,
    types: str | Iterable[str] | None = None,
    seed: int = 0,
) -> np.ndarray:
    """ELPV indices (file order) of the cells in one or more pools, optionally filtered.

    Args:
        pool: a pool name, ``"all"``, a comma-separated string, or an iterable of names.
        functional_only: keep only cells with defect probability 0.
        probs: keep only cells whose probability is this or one of these (matched to 1e-6).
        types: keep only cells of this type or these types ("mono", "poly").
        seed: split seed.

    Returns:
        Sorted int64 array of ELPV indices.
    """
    table = _split_pools_cached(int(seed), (0.6, 0.2, 0.2))
    keep = table["pool"].isin(resolve_pools(pool)).to_numpy().copy()
    p = table["prob"].to_numpy()
    if functional_only:
        keep &= p == 0.0
    if probs is not None:
        wanted = np.atleast_1d(np.asarray(list(probs) if not np.isscalar(probs) else probs, dtype=float))
        keep &= np.any(np.abs(p[:, None] - wanted[None, :]) < 1e-6, axis=1)
    if types is not None:
        wanted_t = [types] if isinstance(types, str) else list(types)
        bad = [t for t in wanted_t if t not in ("mono", "poly")]
        if bad:
            raise ValueError(f"unknown cell type(s) {bad}: choose from 'mono', 'poly'")
        keep &= table["type"].isin(wanted_t).to_numpy()
    return table["index"].to_numpy()[keep].astype(np.int64)
