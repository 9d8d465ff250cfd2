"""benchmarks.common: which stored checkpoint a benchmark reuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import common as C


def _checkpoint(folder: Path, steps: int, lam: float = 0.1, zeta: float = 1.0) -> Path:
    folder.mkdir(parents=True)
    (folder / "weights.safetensors").write_bytes(b"")
    doc = {"model": {"image_size": 32, "loss": {"lambda_mmd": lam, "zeta": zeta}}, "meta": {"step": steps}}
    (folder / "config.json").write_text(json.dumps(doc))
    return folder


def test_find_checkpoint_prefers_the_longest_trained_and_never_a_soak_model(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(C, "OUT", tmp_path)
    assert C.find_checkpoint("InfoDiffusion") is None
    _checkpoint(tmp_path / "soak" / "s1" / "checkpoints" / "candidate" / "model", 9000)  # trained on line days
    assert C.find_checkpoint("InfoDiffusion") is None
    short = _checkpoint(tmp_path / "evidence" / "cpu_s1000", 1000)
    long = _checkpoint(tmp_path / "evidence" / "cpu_s3000", 3000)
    _checkpoint(tmp_path / "evidence" / "ablation_s5000", 5000, lam=0.0, zeta=0.0)
    assert C.find_checkpoint("InfoDiffusion") == long
    assert C.find_checkpoint("DiffAE ablation") == tmp_path / "evidence" / "ablation_s5000" != short
