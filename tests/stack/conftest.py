"""Fixtures for tests against the native production stack (deploy/native_stack.sh).

* ``stack``: the URLs of a running stack. Skips with the reason when none is reachable, unless
  ``LINEWATCH_STACK=1`` (then the fixture starts it with ``deploy/native_stack.sh start`` and stops it afterwards)
  or ``LINEWATCH_REQUIRE_STACK=1`` (CI: a missing stack FAILS instead of skipping).
  A stack started elsewhere (docker compose) can be named with ``LINEWATCH_STACK_MLFLOW_URL`` and
  ``LINEWATCH_STACK_PREFECT_URL``.
* ``webhook_server``: a local HTTP server on 127.0.0.1 that records every POST (alert webhooks).
* ``stack_env``: sets ``MLFLOW_TRACKING_URI`` / ``PREFECT_API_URL`` / ``LINEWATCH_HOME`` for the test process and a
  unique registered-model name, so tests can call ``pipeline.tracking`` against the stack.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "native_stack.sh"


@dataclass(frozen=True)
class StackURLs:
    """Where the stack's services listen."""

    mlflow_url: str
    prefect_api_url: str
    work_pool: str
    stack_dir: Path
    repo_dir: Path = REPO


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status == 200
    except OSError:
        return False


def _locate() -> tuple[str | None, str | None, str, Path]:
    stack_dir = Path(os.environ.get("LINEWATCH_STACK_DIR", "/tmp/linewatch-stack"))
    env: dict[str, str] = {}
    env_file = stack_dir / "stack.env"
    if env_file.is_file():
        for line in env_file.read_text().splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                env[k.strip()] = v.strip()
    mlflow = os.environ.get("LINEWATCH_STACK_MLFLOW_URL") or env.get("MLFLOW_TRACKING_URI")
    prefect = os.environ.get("LINEWATCH_STACK_PREFECT_URL") or env.get("PREFECT_API_URL")
    pool = env.get("LINEWATCH_WORK_POOL", "linewatch-process")
    return mlflow, prefect, pool, stack_dir


def _up(mlflow: str | None, prefect: str | None) -> bool:
    return bool(mlflow and prefect and _healthy(f"{mlflow}/health") and _healthy(f"{prefect}/health"))


@pytest.fixture(scope="session")
def stack() -> Iterator[StackURLs]:
    mlflow, prefect, pool, stack_dir = _locate()
    started = False
    if not _up(mlflow, prefect) and os.environ.get("LINEWATCH_STACK") == "1":
        subprocess.run([str(SCRIPT), "start"], check=True, timeout=900)
        started = True
        mlflow, prefect, pool, stack_dir = _locate()
    if not _up(mlflow, prefect):
        reason = (f"native stack not reachable (stack dir {stack_dir}, mlflow={mlflow}, prefect={prefect}); "
                  "start it with `deploy/native_stack.sh start` or run with LINEWATCH_STACK=1")
        if os.environ.get("LINEWATCH_REQUIRE_STACK") == "1":
            pytest.fail(f"LINEWATCH_REQUIRE_STACK=1 but {reason}")
        pytest.skip(reason)
    assert mlflow and prefect
    yield StackURLs(mlflow_url=mlflow, prefect_api_url=prefect, work_pool=pool, stack_dir=stack_dir)
    if started and os.environ.get("LINEWATCH_STACK_KEEP") != "1":
        subprocess.run([str(SCRIPT), "stop"], check=False, timeout=120)


@pytest.fixture
def stack_env(stack: StackURLs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StackURLs]:
    from pipeline import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow_url)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("PREFECT_API_URL", stack.prefect_api_url)
    monkeypatch.setenv("LINEWATCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LINEWATCH_MODEL_NAME", f"lw-stack-{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("LINEWATCH_MLFLOW_BACKOFF_S", "0.5")
    tracking.reset()
    yield stack
    tracking.reset()


@dataclass
class WebhookServer:
    """Records the JSON (or text) bodies POSTed to it."""

    url: str
    received: list[dict] = field(default_factory=list)

    def wait_for(self, n: int = 1, timeout: float = 90.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.received) < n and time.monotonic() < deadline:
            time.sleep(0.25)
        return list(self.received)


@pytest.fixture
def webhook_server() -> Iterator[WebhookServer]:
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server API
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                received.append(json.loads(body or b"{}"))
            except ValueError:
                received.append({"raw": body.decode(errors="replace")})
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield WebhookServer(url=f"http://127.0.0.1:{server.server_address[1]}/hook", received=received)
    finally:
        server.shutdown()
        server.server_close()
