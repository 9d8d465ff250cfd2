"""Prefect fixtures: one temporary Prefect API (SQLite, subprocess server) for the whole session, on request."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory):
    """A session-scoped ``prefect_test_harness`` (started only by tests that run flows through the engine)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch):
    """Make the flows' retry back-off instant (the number of retries is unchanged)."""
    from flows.ingest import ingest_task
    from flows.monitor import monitor_task
    from flows.retrain import retrain_task

    for t in (ingest_task, retrain_task, monitor_task):
        monkeypatch.setattr(t, "retry_delay_seconds", [0.0] * (t.retries or 1))
        monkeypatch.setattr(t, "retry_jitter_factor", None)
