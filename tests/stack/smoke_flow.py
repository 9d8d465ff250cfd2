"""A trivial flow the stack test deploys to the process work pool (stands in for flows/ until they are wired)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefect import flow


@flow(name="linewatch-stack-smoke", log_prints=True)
def smoke(path: str, text: str = "ran") -> str:
    """Write ``text`` and the worker's MLflow URI to ``path`` (proves a worker ran it with the stack's env)."""
    Path(path).write_text(json.dumps({"text": text, "mlflow": os.environ.get("MLFLOW_TRACKING_URI"),
                                      "pid": os.getpid()}))
    print(f"smoke flow wrote {path}")
    return text
