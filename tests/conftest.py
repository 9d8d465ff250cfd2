"""Shared test fixtures: seeded RNG, a few real ELPV cells, a folder of them as PNGs, a tiny trained checkpoint.

ELPV images are read from the installed ``elpv_dataset`` package at test time (never copied into the repository).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ELPV_SMALL_PER_GROUP = 6  # 4 groups (mono/poly x functional/defective) -> 24 cells
TINY_TRAIN_STEPS = 40


@dataclass(frozen=True)
class ElpvSmall:
    """A small, fixed, mixed subset of ELPV.

    Attributes:
        images: uint8 (N, 300, 300).
        probs: defect probability per cell (0, 1/3, 2/3, 1).
        types: "mono" or "poly".
        indices: row numbers in the ELPV labels file.
    """

    images: np.ndarray
    probs: np.ndarray
    types: np.ndarray
    indices: np.ndarray


def load_elpv_subset(per_group: int = ELPV_SMALL_PER_GROUP, seed: int = 0) -> ElpvSmall:
    """Read ``per_group`` cells of each (type, functional p=0 / defective p>=2/3) group from the installed package."""
    import elpv_dataset
    from PIL import Image

    data_dir = Path(elpv_dataset.__file__).parent / "data"
    labels = np.genfromtxt(
        data_dir / "labels.csv", dtype=["|S19", "<f8", "|S4"], names=["path", "probability", "type"]
    )
    paths = np.char.decode(labels["path"])
    probs = labels["probability"]
    types = np.char.decode(labels["type"])
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for cell_type in ("mono", "poly"):
        for defective in (False, True):
            mask = (types == cell_type) & ((probs >= 2 / 3) if defective else (probs == 0))
            chosen.extend(rng.choice(np.flatnonzero(mask), size=per_group, replace=False).tolist())
    idx = np.array(sorted(chosen))
    images = []
    for i in idx:
        with Image.open(data_dir / paths[i]) as im:
            images.append(np.asarray(im))
    return ElpvSmall(images=np.stack(images), probs=probs[idx], types=types[idx], indices=idx)


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded numpy generator (fresh per test)."""
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def elpv_small() -> ElpvSmall:
    """24 real ELPV cells: 6 each of mono/poly x functional (p=0)/defective (p>=2/3)."""
    return load_elpv_subset()


def write_pngs(images: np.ndarray, folder: Path, prefix: str = "cell") -> list[Path]:
    """Write uint8/uint16 arrays as PNG files ``<prefix>_<i>.png`` into ``folder`` (created)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, img in enumerate(images):
        path = folder / f"{prefix}_{i:04d}.png"
        Image.fromarray(img).save(path)
        out.append(path)
    return out


@pytest.fixture(scope="session")
def png_writer():
    """The ``write_pngs(images, folder, prefix="cell") -> list[Path]`` helper, as a fixture."""
    return write_pngs


@pytest.fixture
def image_dir(tmp_path: Path, elpv_small: ElpvSmall) -> Path:
    """A folder holding the ``elpv_small`` cells as 8-bit PNGs (``cell_0000.png`` ...)."""
    folder = tmp_path / "images"
    write_pngs(elpv_small.images, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, elpv_small: ElpvSmall) -> Path:
    """A checkpoint folder of the ``tiny`` preset trained briefly (``TINY_TRAIN_STEPS``) on the ``elpv_small`` cells.

    Trained once per session; the model is not good, only real (weights, config, preprocess spec, model id).
    """
    import torch

    from models import get_preset, to_model_input, train

    preset = get_preset("tiny")
    data = to_model_input(list(elpv_small.images), preset.preprocess)
    out = tmp_path_factory.mktemp("tiny") / "ckpt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast, and never spins on oversubscribed CI cores
    try:
        train(preset, data, out, steps=TINY_TRAIN_STEPS, batch_size=8, progress=False, seed=0, device="cpu")
    finally:
        torch.set_num_threads(threads)
    return out


def build_bundle(ckpt_dir: Path, images: np.ndarray, out_dir: Path) -> Path:
    """A registered-model folder as the retrain writes it: the checkpoint plus a ``linewatch/`` bundle whose
    calibration rows are ``images`` (latents, diffusion residuals of a cheap scoring recipe, gate report)."""
    import shutil

    import pandas as pd

    from models import load_checkpoint, to_model_input
    from pipeline.handoff.bundle import ScoringConfig
    from pipeline.latent.encode import encode_images
    from pipeline.training.retrain import GateResult, write_bundle

    out_dir.mkdir(parents=True)
    for name in ("weights.safetensors", "config.json"):
        shutil.copy2(ckpt_dir / name, out_dir / name)
    ckpt = load_checkpoint(out_dir)
    scoring = ScoringConfig(t_stars=(100,), steps=2, seeds=(0,), k=3)
    z = encode_images(ckpt.model, ckpt.preprocess, list(images))
    residuals = scoring.residual_detector(ckpt.model).residuals(to_model_input(list(images), ckpt.preprocess))
    calib = pd.DataFrame({"image_id": [f"img{i:03d}" for i in range(len(images))],
                          "captured_at": pd.date_range("2026-01-05", periods=len(images), freq="h", tz="UTC")})
    gate = GateResult(True, {"eps_mse": (0.1, 0.2, True)}, "all checks passed")
    write_bundle(out_dir, calib, z, gate, {"eps_mse": 0.1}, None, {}, {}, residuals=residuals,
                 scoring={"t_stars": [100], "steps": 2, "seeds": [0], "k": 3}, detector_seed=0, fpr_target=0.1,
                 model_id=str(ckpt.meta.get("model_id", "")))
    return out_dir


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, elpv_small: ElpvSmall) -> Path:
    """``tiny_checkpoint`` as a registered-model folder: the checkpoint plus a ``linewatch/`` bundle calibrated on
    the ``elpv_small`` cells (what ``pipeline.handoff.serving`` and the pyfunc model load)."""
    return build_bundle(tiny_checkpoint, elpv_small.images, tmp_path_factory.mktemp("bundle") / "model")
