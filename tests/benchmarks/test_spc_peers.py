"""spc_peers: run lengths and delays of an online detector (a stand-in detector; alibi-detect lives elsewhere)."""

from __future__ import annotations

import numpy as np

from benchmarks import spc_peers as P


class Threshold:
    """Flags when the running sum since the last reset exceeds 3 (alibi-detect's online predict/reset shape)."""

    def __init__(self) -> None:
        self.total = 0.0

    def reset_state(self) -> None:
        self.total = 0.0

    def predict(self, x: np.ndarray) -> dict:
        self.total += float(x[0])
        return {"data": {"is_drift": int(self.total > 3)}}


def test_run_lengths_reset_after_each_detection():
    X = np.ones((10, 1), np.float32)
    assert P.run_lengths(Threshold(), X) == [3, 7]


def test_first_detection_after_the_onset():
    X = np.r_[np.full((6, 1), 1.0), np.full((4, 1), 5.0)].astype(np.float32)
    assert P.first_after(Threshold(), X, onset=6) == 1  # the alarm at window 3 came before the onset: reset
    assert P.first_after(Threshold(), np.zeros((5, 1), np.float32), onset=2) is None
