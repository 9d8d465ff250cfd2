"""InfoDiffusion under DistributedDataParallel: 2 CPU processes, gloo backend, tiny preset, a few steps.

Each rank sees different data; after the steps both ranks must hold identical weights (gradients were averaged) that
differ from the initial ones (training happened). ``models.train`` has no DDP mode of its own (yet); this checks that
the model is DDP-compatible the way ``torchrun`` would run it (the loss computed through the DDP wrapper).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _LossModule(torch.nn.Module):
    """DDP needs the loss computed in ``forward`` so its reducer sees the backward pass."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.model.loss(x, generator=generator).total


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from models import InfoDiffusion, get_preset

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        preset = get_preset("tiny")
        torch.manual_seed(100 + rank)  # different init per rank: DDP must broadcast rank 0's weights
        model = InfoDiffusion(preset.model)
        local = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        ddp = DDP(_LossModule(model), find_unused_parameters=True)  # broadcasts rank 0's weights
        init = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(rank)
        size = preset.model.image_size
        for _ in range(STEPS):
            x = torch.rand(4, preset.model.in_channels, size, size, generator=gen) * 2 - 1  # rank-specific data
            loss = ddp(x, gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
        final = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.save({"local": local, "init": init, "final": final}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    assert not torch.equal(r0["local"], r1["local"])  # different seeds per rank ...
    assert torch.equal(r0["init"], r1["init"])  # ... DDP broadcast rank 0's weights
    assert torch.equal(r0["final"], r1["final"]), "ranks diverged: gradients were not synchronised"
    assert not torch.allclose(r0["final"], r0["init"]), "no training happened"
