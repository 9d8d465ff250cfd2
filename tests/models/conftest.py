"""Shared fixtures for the models tests: a few real ELPV cells at 16 px and one briefly trained tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import TrainResult, get_preset, to_model_input, train

N_CELLS = 32


@pytest.fixture(scope="package", autouse=True)
def _threads():
    # 1 thread: on a shared 2-core box OpenMP barriers under oversubscription are ~100x slower than 1 thread.
    # Package scope: restored when the tests/models package is done, so other packages keep their setting.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def elpv_cells_uint8() -> np.ndarray:
    """N_CELLS real ELPV cells (uint8, 300x300), spread over the dataset (loaded from the installed package)."""
    from elpv_dataset.utils import load_dataset

    images, _, _ = load_dataset()
    idx = np.linspace(0, len(images) - 1, N_CELLS).round().astype(int)
    return np.ascontiguousarray(images[idx])


@pytest.fixture(scope="session")
def elpv16(elpv_cells_uint8: np.ndarray) -> torch.Tensor:
    """(N_CELLS, 1, 16, 16) float32 in [-1, 1]."""
    return to_model_input(elpv_cells_uint8, get_preset("tiny").preprocess)


@pytest.fixture(scope="session")
def trained_tiny(elpv16: torch.Tensor, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """The tiny preset trained for 300 steps on the cells (a few seconds), checkpointed."""
    out = tmp_path_factory.mktemp("tiny_ckpt") / "ckpt"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # session fixtures run before the package-scoped _threads fixture
    try:
        return train(get_preset("tiny"), elpv16, out, steps=300, progress=False, device="cpu")
    finally:
        torch.set_num_threads(before)
