"""pipeline.tracking.runs: artifacts readable by the group (0644 files, 0755 folders), tables, descriptions."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pandas as pd

from pipeline import tracking
from tests.pipeline.tracking.conftest import client


def _modes(root: Path) -> set[tuple[str, int]]:
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in root.rglob("*")}


def test_artifacts_are_group_readable_even_from_private_files(lw_env, tmp_path: Path) -> None:
    cards = tmp_path / "cards"
    (cards / "sub").mkdir(parents=True)
    fd, private = tempfile.mkstemp(dir=cards, suffix=".png")  # how the axis cards used to be written: 0600
    os.close(fd)
    Path(private).write_bytes(b"png")
    (cards / "sub" / "axis_03.json").write_text("{}")
    (cards / ".axis_03.json.tmp").write_text("half-written")
    os.chmod(cards / "sub", 0o700)
    assert stat.S_IMODE(Path(private).stat().st_mode) == 0o600
    with tracking.start_monitoring_run("artifacts") as rid:
        tracking.log_artifacts(cards, "axis_cards")
        tracking.log_artifact(private, "reports", name="drift_L1_2026-01-13.png")
        tracking.log_table(pd.DataFrame({"axis": [3], "effect": [1.2]}), "drift/windows.json")
        tracking.set_description("Drift on line L1.")
    root = Path(tracking.run_summary(rid).artifact_uri.removeprefix("file://"))
    assert _modes(root) == {("dir", 0o755), ("file", 0o644)}
    names = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert names == {f"axis_cards/{Path(private).name}", "axis_cards/sub/axis_03.json",
                     "reports/drift_L1_2026-01-13.png", "drift/windows.json"}  # hidden temp files stay home
    assert client(lw_env).get_run(rid).data.tags["mlflow.note.content"] == "Drift on line L1."
