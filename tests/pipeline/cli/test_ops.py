"""`linewatch promote / rollback / models / ui` through pipeline.cli on a local SQLite store."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from pipeline import tracking
from pipeline.cli import main


@pytest.fixture
def lw_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    home = tmp_path / "home"
    monkeypatch.setenv("LINEWATCH_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.delenv("LINEWATCH_MODEL_NAME", raising=False)
    monkeypatch.setenv("LINEWATCH_MLFLOW_BACKOFF_S", "0")
    monkeypatch.setenv("USER", "alice")
    monkeypatch.chdir(tmp_path)
    tracking.reset()
    yield home
    tracking.reset()
    assert not (tmp_path / "mlruns").exists()


def _register(tmp_path: Path, n: int) -> None:
    for i in range(n):
        ck = tmp_path / f"ck{i}"
        ck.mkdir()
        (ck / "weights.safetensors").write_bytes(bytes([i]) * 10)
        (ck / "config.json").write_text("{}")
        with tracking.start_training_run(f"train-{i}"):
            tracking.log_checkpoint_and_register(ck, tags=tracking.lineage_tags(
                data_digest=f"{i}" * 64, parent_version=i or None, code_version="git:abc", gates={"passed": True}))


def test_promote_rollback_models(lw_env, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _register(tmp_path, 2)
    assert main(["promote", "--version", "1", "--reason", "first"]) == 0
    assert "linewatch-infodiffusion@champion: (unset) -> v1  by alice" in capsys.readouterr().out
    assert main(["promote", "--version", "2", "--reason", "better"]) == 0
    out = capsys.readouterr().out
    assert "v1 -> v2" in out and "v1 is tagged champion.event=demoted" in out
    assert main(["promote", "--version", "2", "--alias", "challenger"]) == 0
    capsys.readouterr()

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "challenger,champion" in out and "champion: set by alice" in out and "reason: better" in out
    assert "champion until" in out and "demoted, replaced by v2 (better)" in out
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["version"] for r in rows] == [1, 2]
    assert rows[1]["aliases"] == ["challenger", "champion"]
    assert rows[1]["tags"]["lineage.parent_version"] == "1" and rows[1]["tags"]["champion.set_by"] == "alice"

    assert main(["rollback", "--reason", "false alarms"]) == 0
    assert "rolled back v2 -> v1" in capsys.readouterr().out
    assert tracking.get_alias_version("champion") == 1
    tags = tracking.get_model_version(2).tags
    assert tags["champion.rolled_back_by"] == "alice" and tags["champion.rollback_reason"] == "false alarms"


def test_clear_errors(lw_env, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                      monkeypatch: pytest.MonkeyPatch) -> None:
    _register(tmp_path, 1)
    assert main(["promote", "--version", "9"]) == 2
    assert "has no version 9; known versions: [1]" in capsys.readouterr().err
    assert main(["rollback"]) == 2
    assert "no 'champion' alias" in capsys.readouterr().err

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(tracking.client, "_sleep", lambda s: None)
    tracking.reset()
    assert main(["promote", "--version", "1"]) == 2
    assert f"MLflow at http://127.0.0.1:{port} is unreachable after 3 tries" in capsys.readouterr().err


def test_models_on_empty_registry(lw_env, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    assert "no registered versions yet" in capsys.readouterr().out


def test_ui_print_command_and_run(lw_env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["ui", "--print-command", "--port", "5001"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"mlflow ui --backend-store-uri sqlite:///{lw_env / 'mlflow.db'} ")
    assert f"--default-artifact-root {(lw_env / 'mlartifacts').as_uri()}" in line
    assert line.endswith("--host 127.0.0.1 --port 5001 --workers 1")

    import subprocess

    seen = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: seen.append(cmd) or 0)
    assert main(["ui", "--port", "5002"]) == 0
    assert "http://127.0.0.1:5002/#/experiments?workflowType=machine_learning" in capsys.readouterr().out
    assert seen[0][1:4] == ["-m", "mlflow", "ui"] and seen[0][-3] == "5002"
    assert (lw_env / "mlartifacts").is_dir()


def test_golden_shows_and_restarts_a_lines_baselines(lw_env: Path, capsys: pytest.CaptureFixture) -> None:
    from pipeline.analysis.golden import GoldenCapture, GoldenCheck
    from pipeline.monitoring.monitor import default_alert_manager
    from pipeline.settings import ensure_dirs, get_settings

    assert main(["golden", "--line", "L1"]) == 2
    assert "no golden-sample state" in capsys.readouterr().err
    folder = default_alert_manager(ensure_dirs(get_settings())).state_dir
    chk = GoldenCheck("L1", ["G01", "G02"])
    for r in range(3):
        chk.update(f"r{r}", [GoldenCapture(c, {"mean_intensity": 0.5 + 0.001 * r, "detail_ratio": 0.2,
                                               "noise_level": 0.01, "rotation_deg": 0.0}) for c in chk.cells])
    chk.save(folder / "golden" / "L1.json")
    assert main(["golden", "--line", "L1"]) == 0
    assert "G01 3, G02 3" in capsys.readouterr().out
    assert main(["golden", "--line", "L1", "--rebaseline", "G02"]) == 0
    assert "G02" in capsys.readouterr().out
    assert GoldenCheck.load(folder / "golden" / "L1.json", line="L1", model_id=None).baseline_size("G02") == 0
    assert main(["golden", "--line", "L1", "--rebaseline", "G09"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["golden", "--line", "L1", "--rebaseline"]) == 0
    assert GoldenCheck.load(folder / "golden" / "L1.json", line="L1", model_id=None).baseline_size("G01") == 0
