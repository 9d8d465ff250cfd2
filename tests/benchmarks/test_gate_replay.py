"""benchmarks.gate_replay: a soak's gate comparisons reconstructed again give the recorded reconstruction errors."""

from __future__ import annotations

import pytest

from benchmarks.gate_replay import main, nightly_pairs, replay_gate


@pytest.mark.slow
def test_the_fast_soaks_gate_comparisons_replay_to_the_recorded_errors(fast_soak):
    cfg, _records, _summary = fast_soak
    pairs = nightly_pairs(cfg.home)
    assert pairs and all(p["candidate_dir"].is_dir() and p["champion_dir"].is_dir() for p in pairs)
    run = replay_gate(cfg.home, n_images=8)
    assert [r["version"] for r in run["nightlies"]] == [p["version"] for p in pairs]
    assert run["recon_images"] == 4  # the fast soak's gate setting, not the default
    for r in run["nightlies"]:
        assert r["max_rel_diff"] < 1e-4, r  # both models' recorded recon_mse, reproduced
        assert r["gate_ratio"] == pytest.approx(r["recorded_ratio"], rel=1e-4) and r["ratio"] > 0
    assert run["gate_ratio_log_sd"] >= 0 or len(run["nightlies"]) == 1


def test_a_missing_soak_or_a_bad_argument_is_one_line_and_a_non_zero_exit(capsys):
    assert main(["--name", "no_such_soak"]) == 2
    assert capsys.readouterr().out.strip().startswith("gate_replay: no soak log under")
    assert main(["--name", "no_such_soak", "--images", "0"]) == 2
    assert capsys.readouterr().out.strip() == "gate_replay: --images must be >= 1"
