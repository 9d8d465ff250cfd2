"""Fixtures shared by the drift tests: an i.i.d. reference and its anomaly scores."""

from __future__ import annotations

import numpy as np
import pytest

from tests.pipeline.analysis.drift.synthetic import D


@pytest.fixture(scope="module")
def ref():
    return np.random.default_rng(0).normal(size=(600, D))


@pytest.fixture(scope="module")
def ref_scores():
    return np.random.default_rng(1).normal(size=600)
