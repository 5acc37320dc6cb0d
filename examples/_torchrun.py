"""How the distributed examples join torchrun's processes (imported from their folder)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def join() -> tuple[str, int, int, torch.device | None]:
    """Join the process group torchrun set up: NCCL with one GPU per rank, else gloo.

    Returns (backend, rank, world size, this rank's GPU or None on CPUs).
    """
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = None
    if backend == "nccl":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return backend, rank, world, device
