"""Fixtures shared by the benchmark tests: the fast soak, run once per session."""

from __future__ import annotations

import pytest

from benchmarks.soak import environment, fast_config


@pytest.fixture(scope="session")
def fast_soak(tmp_path_factory):
    """The fast soak run once (eight days of one line, tiny preset, camera gain on days 5-6), scored.

    Session-scoped so that the soak's own tests (``test_soak.py``) and the drift replay's share one run.
    """
    from benchmarks.soak import run_soak
    from benchmarks.soak_eval import evaluate

    cfg = fast_config(tmp_path_factory.mktemp("fast") / "soak")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in environment(cfg).items():
            mp.setenv(key, value)  # restored after the soak (the local driver sets them)
        records = run_soak(cfg)
        return cfg, records, evaluate(cfg)
