"""Issue 14, item 13: ``linewatch retrain`` / ``monitor`` / ``nightly`` with MLflow down answer with one message, fast.

The commands run as real subprocesses against a tracking URI nobody listens on, with the default retry settings.
The documented bound (docs/deployment.md, "When MLflow is down") is the client's bounded retries: 3 tries with
1 s and 2 s back-off, each request at most ``LINEWATCH_MLFLOW_TIMEOUT_S`` (30 s); a refused connection costs ~3 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("command", [["monitor"], ["retrain", "--preset", "tiny"], ["nightly", "--no-ingest"]])
def test_13_mlflow_down_one_message_no_traceback_within_the_documented_time(tmp_path: Path, command: list[str]):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LINEWATCH_", "MLFLOW_", "PREFECT_"))}
    env.update(LINEWATCH_HOME=str(tmp_path / "home"), MLFLOW_TRACKING_URI="http://127.0.0.1:9",
               PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *command], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    seconds = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert out.count("Traceback") == 0, out
    errors = [ln for ln in out.splitlines() if ln.startswith(f"linewatch {command[0]}:")]
    assert len(errors) == 1 and "unreachable" in errors[0] and "http://127.0.0.1:9" in errors[0], out
    assert "WARNING" not in out, out  # no retry chatter before the one message
    assert seconds < 60, seconds  # 3 tries, 1 + 2 s back-off, plus start-up; was 3 min (Prefect task retries)
