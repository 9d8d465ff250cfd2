"""The commands' stderr: quiet by default (linewatch's messages and warnings), Prefect's internals with --verbose."""

from __future__ import annotations

import logging

import pytest

from pipeline.cli import _QuietFilter


def _record(name: str, message: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, (), None)


@pytest.mark.parametrize("message", [
    "Beginning flow run 'tasteful-cockatoo' for flow 'linewatch-nightly'",
    "Beginning subflow run 'strict-mosquito' for flow 'linewatch-retrain'",
    "Finished in state Completed()",
    "Starting temporary server on http://127.0.0.1:8333",
    "Stopping temporary server on http://127.0.0.1:8333",
])
def test_prefect_run_bookkeeping_is_dropped(message):
    assert not _QuietFilter().filter(_record("prefect.flow_runs", message))


def test_linewatch_messages_and_prefect_problems_stay():
    quiet = _QuietFilter()
    kept = _record("prefect.flow_runs", "nightly: model v3 not promoted, the champion stays (failed: recon_mse)")
    assert quiet.filter(kept)  # what a step printed (log_prints)
    assert quiet.filter(_record("pipeline.training.retrain", "Finished in state Completed()"))  # not Prefect's
    failed = _record("prefect.flow_runs", "Finished in state Failed('boom')\nTraceback ...", logging.ERROR)
    assert quiet.filter(failed) and failed.msg == "Finished in state Failed('boom')"  # an error: one line
    assert not quiet.filter(_record("prefect.task_runs", "Task run is running in a worker thread", logging.WARNING))
