"""pipeline.handoff.patch_family: the patch family fitted on the calibration cells, stored in the bundle, read back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.handoff.patch_family import PATCH_FILE, fit_patch_family, read_patch_family, write_patch_family


def maps(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 6, 3, 3)).astype(np.float32)


def test_the_family_round_trips_through_its_file(tmp_path: Path) -> None:
    P = maps(20)
    groups = np.repeat(np.arange(4), 5)
    fam = fit_patch_family(P, [f"c{i}" for i in range(20)], "bb-1", groups=groups)
    assert fam.ref_scores.shape == (20,) and np.isfinite(fam.ref_scores).all()
    assert read_patch_family(tmp_path) is None  # a bundle without it
    path = write_patch_family(tmp_path, fam)
    assert path == tmp_path / PATCH_FILE
    back = read_patch_family(tmp_path)
    assert back is not None and back.backbone_id == "bb-1" and list(back.image_ids) == [f"c{i}" for i in range(20)]
    np.testing.assert_array_equal(back.ref_scores, fam.ref_scores)
    new = maps(5, seed=1)
    # stored in float16: the scores of new cells move by about 1e-3 of their value
    np.testing.assert_allclose(back.detector.score(new), fam.detector.score(new), rtol=1e-2)
    assert back.matches([f"c{i}" for i in range(20)], "bb-1")
    assert not back.matches([f"c{i}" for i in range(19)], "bb-1") and not back.matches(back.image_ids, "bb-2")


def test_a_broken_file_is_refused_with_its_path(tmp_path: Path) -> None:
    (tmp_path / PATCH_FILE).write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="not a readable patch family"):
        read_patch_family(tmp_path)
    with pytest.raises(ValueError, match="20 patch maps but 3 image ids"):
        fit_patch_family(maps(20), ["a", "b", "c"], "bb-1")
