"""``models.train`` under torchrun: 2 CPU processes, gloo backend, tiny preset, real ELPV cells, a few steps.

The test launches this very module with ``python -m torch.distributed.run --nproc_per_node 2 -m tests.test_ddp`` (``train`` initialises
the process group itself from the variables torchrun sets). Each worker trains, then writes its final step, its
in-memory training weights and whether the process group is still up to ``<out>/rank<r>.pt``. Rank 0 alone writes
the checkpoint; rank 1's weights must equal the checkpoint's (gradients were averaged, rank 0's init broadcast).
A second 2-process launch with ``resume`` must continue the step count from the checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORLD = 2
BATCH = 8  # global: 4 images per rank
N_CELLS = 16
ROOT = Path(__file__).resolve().parents[1]


def _worker(data_path: str, out_dir: str, steps: int, resume: bool, report_dir: str) -> None:
    """Body of one torchrun process (``__main__`` below)."""
    import torch.distributed as dist

    from models import get_preset, train

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    data = torch.load(data_path)
    p = get_preset("tiny")
    preset = p.__class__(p.name, p.model, p.train.replace(checkpoint_every=2, log_every=1), p.preprocess)
    bad_batch = ""
    if not resume:  # a global batch the world size does not divide is refused on every rank
        try:
            train(preset, data, None, steps=1, batch_size=7, progress=False, device="cpu")
        except ValueError as e:
            bad_batch = str(e)
    res = train(
        preset, data, out_dir, steps=steps, batch_size=BATCH, resume=resume, progress=False, device="cpu"
    )
    trained = res.model if rank != 0 else None  # rank 0 returns its EMA; the others their training weights
    torch.save(
        {
            "step": res.step,
            "history_steps": [h["step"] for h in res.history],
            "weights": None if trained is None else {k: v.clone() for k, v in trained.state_dict().items()},
            "group_left_up": dist.is_initialized(),
            "bad_batch": bad_batch,
        },
        Path(report_dir) / f"rank{rank}.pt",
    )


def _launch(tmp_path: Path, steps: int, resume: bool, report: str) -> None:
    (tmp_path / report).mkdir()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD}",
        "-m",  # as a module from the repo root: run as a script, tests/models would shadow the models package
        "tests.test_ddp",
        str(tmp_path / "cells.pt"),
        str(tmp_path / "ckpt"),
        str(steps),
        str(int(resume)),
        str(tmp_path / report),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _reports(tmp_path: Path, report: str) -> list[dict]:
    return [torch.load(tmp_path / report / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_batch_shards_partition_the_global_batch():
    from models.train import _batches

    data = torch.arange(40, dtype=torch.float32).view(40, 1, 1, 1).expand(40, 1, 2, 2).contiguous()
    dev = torch.device("cpu")
    single = _batches(data, BATCH, torch.Generator().manual_seed(0), dev)
    shards = [
        _batches(data, BATCH, torch.Generator().manual_seed(0), dev, rank=r, world=WORLD) for r in range(2)
    ]
    for _ in range(3):  # tensor data: the ranks' slices concatenate to the single-process batch
        parts = [next(s) for s in shards]
        assert all(p.shape[0] == BATCH // WORLD for p in parts)
        assert torch.equal(torch.cat(parts), next(single))
    ds = torch.utils.data.TensorDataset(data)
    single = _batches(ds, BATCH, torch.Generator().manual_seed(0), dev)
    shards = [
        _batches(ds, BATCH, torch.Generator().manual_seed(0), dev, rank=r, world=WORLD) for r in range(2)
    ]
    # a Dataset: disjoint slices of the single-process batch (12 steps span several shuffled epochs)
    for _ in range(12):
        parts = [next(s) for s in shards]
        assert not set(parts[0][:, 0, 0, 0].tolist()) & set(parts[1][:, 0, 0, 0].tolist())
        assert torch.equal(torch.cat(parts), next(single))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_two_cpu_processes_train_resume_and_agree(tmp_path):
    from elpv_dataset.utils import load_dataset

    from models import get_preset, to_model_input
    from models.checkpoint import load_train_state

    images, _, _ = load_dataset()
    idx = torch.linspace(0, len(images) - 1, N_CELLS).round().long().numpy()
    torch.save(to_model_input(images[idx], get_preset("tiny").preprocess), tmp_path / "cells.pt")

    _launch(tmp_path, steps=3, resume=False, report="first")
    r0, r1 = _reports(tmp_path, "first")
    assert "divisible by the world size 2" in r0["bad_batch"] and "divisible" in r1["bad_batch"]
    assert r0["step"] == r1["step"] == 3
    assert r0["history_steps"] == [1, 2, 3] and r1["history_steps"] == []  # rank 0 logs
    assert r0["group_left_up"] and r1["group_left_up"]  # the group train created is reused by later calls
    state = load_train_state(tmp_path / "ckpt")
    assert state["step"] == 3 and state["world_size"] == WORLD
    # each rank's noise generator, saved for resume, seeded apart
    noise_states = state["rng"]["loss_per_rank"]
    assert len(noise_states) == WORLD and not torch.equal(noise_states[0], noise_states[1])
    init = _fresh_tiny_weights()
    for k, v in r1["weights"].items():  # rank 1 (in memory) == rank 0 (checkpoint), and training happened
        assert torch.equal(v, state["model"][k]), f"ranks diverged at {k}: gradients were not synchronised"
    assert any(not torch.equal(v, init[k]) for k, v in r1["weights"].items()), "no training happened"

    _launch(tmp_path, steps=5, resume=True, report="resumed")
    r0, r1 = _reports(tmp_path, "resumed")
    assert r0["step"] == r1["step"] == 5
    assert r0["history_steps"] == [1, 2, 3, 4, 5]  # the checkpoint's history, continued
    state = load_train_state(tmp_path / "ckpt")
    assert state["step"] == 5
    for k, v in r1["weights"].items():
        assert torch.equal(v, state["model"][k]), k


def _fresh_tiny_weights() -> dict[str, torch.Tensor]:
    from models import InfoDiffusion, get_preset

    p = get_preset("tiny")
    torch.manual_seed(p.train.seed)
    return InfoDiffusion(p.model).state_dict()


if __name__ == "__main__":  # one torchrun worker
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), bool(int(sys.argv[4])), sys.argv[5])
