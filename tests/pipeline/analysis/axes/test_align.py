"""Axis alignment across model versions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.analysis.axes.align import align_axes, apply_alignment


def test_align_axes_recovers_permutation_and_sign() -> None:
    rng = np.random.default_rng(1)
    Z_prev = rng.standard_normal((300, 6))
    perm = np.array([3, 0, 5, 1, 4, 2])  # new axis j holds previous axis perm[j]
    sign = np.array([1, -1, 1, 1, -1, 1])
    Z_new = Z_prev[:, perm] * sign + 0.05 * rng.standard_normal((300, 6))
    al = align_axes(Z_prev, Z_new)
    for j in range(6):
        k = perm[j]
        assert al.permutation[k] == j and al.signs[k] == sign[j]
    assert al.mean_abs_corr > 0.99 and al.min_abs_corr > 0.98 and al.n_weak == 0
    np.testing.assert_allclose(apply_alignment(Z_new, al), Z_prev, atol=0.25)
    assert al.new_to_prev() == {j: int(perm[j]) for j in range(6)}
    assert "mean |r| = 1.00" in al.text or "mean |r| = 0.99" in al.text
    json.dumps(al.to_dict())


def test_align_axes_reports_poor_quality_for_unrelated_latents() -> None:
    rng = np.random.default_rng(2)
    al = align_axes(rng.standard_normal((300, 6)), rng.standard_normal((300, 6)))
    assert al.mean_abs_corr < 0.2 and al.n_weak == 6


def test_align_axes_with_different_dimensions() -> None:
    rng = np.random.default_rng(3)
    Z_prev = rng.standard_normal((200, 4))
    Z_new = np.column_stack(
        [rng.standard_normal(200), -Z_prev[:, 2], Z_prev[:, 0], Z_prev[:, 1], Z_prev[:, 3]]
    )
    al = align_axes(Z_prev, Z_new)
    assert al.unmatched == {"prev": [], "new": [0]}
    assert al.permutation == (2, 3, 1, 4) and al.signs == (1, 1, -1, 1)
    out = apply_alignment(Z_new, al)
    assert out.shape == (200, 5)
    np.testing.assert_allclose(out[:, :4], Z_prev)
    assert apply_alignment(Z_new, al, keep_unmatched=False).shape == (200, 4)
    with pytest.raises(ValueError, match="same fixed probe"):
        align_axes(Z_prev[:10], Z_new)
