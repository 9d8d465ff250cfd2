"""``linewatch ingest`` and ``linewatch catalog``."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.catalog import tables as C
from pipeline.cli import catalog as cli_line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="linewatch")
    cli_line.register(p.add_subparsers(dest="command"))
    return p


def run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


@pytest.fixture
def drop(tmp_path: Path) -> Path:
    folder = tmp_path / "drop" / "L1" / "2026-11-27"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(buf, "PNG")
        (folder / f"S{i}.png").write_bytes(buf.getvalue())
    (folder / "empty.png").write_bytes(b"")
    return tmp_path / "drop"


def test_ingest_json_then_stats(drop: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    assert run(["ingest", str(drop), "--root", str(root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["registered"] == 3 and out["quarantined"] == {"zero_byte": 1} and out["seconds"] > 0
    assert run(["ingest", str(drop), "--root", str(root)]) == 0
    text = capsys.readouterr().out
    assert "registered  0" in text and "3 already registered" in text
    assert run(["catalog", "stats", "--root", str(root), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["n_images"] == 3 and stats["quarantine_by_reason"] == {"zero_byte": 1}
    assert stats["per_line_day"][0]["line"] == "L1" and stats["storage_bytes"]["store"] > 0
    assert run(["catalog", "stats", "--root", str(root)]) == 0
    text = capsys.readouterr().out
    assert "zero_byte" in text and "L1" in text and "storage:" in text


def test_env_root_and_snapshot(
    drop: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LINEWATCH_HOME", str(tmp_path / "home"))
    assert run(["ingest", str(drop), "--line", "L1", "--no-progress"]) == 0
    assert (tmp_path / "home" / "catalog").is_dir()
    capsys.readouterr()
    assert run(["catalog", "snapshot", "--name", "t1", "--line", "L1", "--json"]) == 0
    snap = json.loads(capsys.readouterr().out)
    assert snap["n_images"] == 3
    assert len(C.load_snapshot(tmp_path / "home", snap["digest"])) == 3
    assert run(["catalog", "compact"]) == 0


def test_lock_busy_exit_code(drop: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    import subprocess
    import sys

    code = (
        "import sys, time\nfrom pipeline.catalog.tables import catalog_lock\n"
        "with catalog_lock(sys.argv[1], purpose='busy-test'):\n    print('held', flush=True)\n    time.sleep(30)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(root)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[3],
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        assert run(["ingest", str(drop), "--root", str(root), "--lock-timeout", "0.2"]) == 3
        assert "busy-test" in capsys.readouterr().err
    finally:
        proc.kill()
        proc.wait()


def test_through_main_user_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import main

    assert main(["ingest", str(tmp_path / "missing"), "--root", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["catalog", "snapshot", "--name", "x", "--root", str(tmp_path / "r")]) == 2
    assert "zero images" in capsys.readouterr().err


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["ingest", "--help"])
    assert "examples:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser().parse_args(["catalog", "--help"])
    assert "catalog stats" in capsys.readouterr().out


def test_stats_and_naive_mes_times_use_the_configured_zone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cell made at 00:30 plant time (Berlin) belongs to that plant day, as in the monitor's day windows."""
    folder = tmp_path / "drop" / "L1" / "2026-11-27"
    folder.mkdir(parents=True)
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40), 90, np.uint8)).save(buf, "PNG")
    (folder / "SN-1.png").write_bytes(buf.getvalue())
    (folder / "mes_export.csv").write_text("serial,timestamp,line,station,product_type\n"
                                           "SN-1,2026-11-27T00:30:00,L1,S1,mono\n")  # naive: plant time
    monkeypatch.setenv("LINEWATCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LINEWATCH_TIMEZONE", "Europe/Berlin")
    assert run(["ingest", str(tmp_path / "drop"), "--no-progress"]) == 0
    capsys.readouterr()
    cat = C.read_catalog(tmp_path / "home")
    assert cat["captured_at"].iloc[0] == pd.Timestamp("2026-11-26T23:30:00Z")  # 00:30 CET
    assert C.serial_of(cat["source_path"].iloc[0]) == "SN-1"
    assert run(["catalog", "stats", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["timezone"] == "Europe/Berlin"
    assert stats["per_line_day"] == [{"line": "L1", "date": "2026-11-27", "images": 1}]  # the plant day, not UTC's
    assert C.catalog_stats(tmp_path / "home").per_line_day[0]["date"] == "2026-11-26"  # the UTC partition
    assert run(["catalog", "stats"]) == 0
    assert "plant days in Europe/Berlin" in capsys.readouterr().out


def test_python_dash_m_answers_a_bad_argument_with_one_line(tmp_path: Path) -> None:
    """``python -m pipeline.cli`` catches the sub-commands' CLIError like the console script does."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[3]
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "encode", "--model", str(tmp_path / "none"),
                           "--images", str(tmp_path), "--out", str(tmp_path / "z.csv")],
                          cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and ".parquet" in proc.stderr
