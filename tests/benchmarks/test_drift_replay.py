"""benchmarks.drift_replay: a soak's windows tested again offline give the verdicts the monitor recorded."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from benchmarks import common as C
from benchmarks.drift_replay import compare, main, mlflow_family_p, recorded_windows, replay


def _files(home: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``home`` with its size and modification time."""
    return {str(p.relative_to(home)): (p.stat().st_size, p.stat().st_mtime_ns) for p in home.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_the_first_models_verdicts_replay_to_the_logged_p_values_and_nothing_is_written(fast_soak, tmp_path):
    cfg, _records, _summary = fast_soak
    first = recorded_windows(cfg.home, original=True)
    logged = mlflow_family_p(cfg.home)
    before = _files(cfg.home)
    replayed = []
    for version in sorted(set(first["model_version"]), key=int)[:2]:  # the first model's days, then the fault's
        mine = first[first["model_version"] == version]
        wanted = list(zip(mine["line"], mine["window_id"], strict=True))
        run = replay(cfg.home, version, wanted, scratch=tmp_path / f"v{version}")
        assert run["missing"] == [] and [(r["line"], r["window_id"]) for r in run["windows"]] == wanted
        replayed += [compare(r, recorded_windows(cfg.home, version), logged) for r in run["windows"]]
    assert _files(cfg.home) == before  # the soak's home is only read
    assert len(replayed) >= 3 and any(r["detected"] for r in replayed)  # healthy days and the fault's
    for r in replayed:
        assert r["match"] and r["summary_identical"], (r["summary"], r["recorded"])
        assert r["mlflow_max_abs_diff"] == 0.0, r  # the full-precision family p-values, exactly


def test_a_missing_soak_or_a_bad_argument_is_one_line_and_a_non_zero_exit(tmp_path, monkeypatch, capsys):
    assert main(["--name", "no_such_soak"]) == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no_such_soak" in out and "run the soak first" in out
    monkeypatch.setattr(C, "OUT", tmp_path)
    state = tmp_path / "soak" / "s" / "state"
    state.mkdir(parents=True)
    pd.DataFrame({"line": ["L1"], "window_id": ["2026-01-08"], "model_version": ["1"], "original": [True]}) \
        .to_parquet(state / "windows.parquet")
    for argv, said in ((["--name", "s"], "--version is required"),
                       (["--name", "s", "--version", "1", "--windows", "L1-2026-01-08"], "bad window"),
                       (["--name", "s", "--version", "1", "--windows", "L1:2026-01-08", "--set", "nope=1"], "nope"),
                       (["--name", "s", "--version", "2", "--windows", "L1:2026-01-08"], "no model version 2"),
                       (["--name", "s", "--nonsense"], "unrecognized arguments")):
        assert main(argv) == 2, argv
        out = capsys.readouterr().out
        assert out.count("\n") == 1 and out.startswith("drift_replay: ") and said in out, (argv, out)
