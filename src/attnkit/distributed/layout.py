"""How a sequence is split over P ranks, and how to put it back together.

``contiguous``: rank r holds positions [r·L/P, (r+1)·L/P).
``zigzag``: the sequence is cut into 2P chunks and rank r holds chunks r and 2P-1-r, so under a
causal mask every rank does the same amount of work (an early chunk is cheap, its partner late
chunk expensive).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from attnkit import _validation as check
from attnkit._types import Shapes

LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout: str, length: int, world_size: int) -> None:
    """ValueError unless ``length`` splits evenly into the layout's chunks."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'zigzag' or 'contiguous', got {layout!r}")
    parts = 2 * world_size if layout == "zigzag" else world_size
    if length % parts:
        raise ValueError(
            f"sequence length {length} does not split into {parts} equal chunks "
            f"(layout={layout!r}, world_size={world_size}); pad it to a multiple of {parts}"
        )


def check_initialised(caller: str) -> None:
    """RuntimeError naming ``caller`` unless torch.distributed is initialised."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{caller} needs torch.distributed to be initialised")


def check_shards(q: Tensor, k: Tensor, v: Tensor, caller: str, cross: bool = False) -> Shapes:
    """The shapes of this rank's q, k, v shards; errors name ``caller``.

    RuntimeError unless torch.distributed is initialised; ValueError unless q, k and v hold
    the same positions (self-attention: every rank holds a shard of one sequence), where
    ``caller`` does not take ``cross``-attention.
    """
    check_initialised(caller)
    shapes = check.check_qkv(q, k, v)
    if not cross and shapes.Lq != shapes.Lk:
        raise ValueError(f"{caller} is self-attention: q has {shapes.Lq} positions, k {shapes.Lk}")
    return shapes


def chunks_of(rank: int, world_size: int, length: int, layout: str) -> list[tuple[int, int]]:
    """The global [start, end) ranges rank ``rank`` holds, in local order."""
    check_layout(layout, length, world_size)
    if layout == "contiguous":
        c = length // world_size
        return [(rank * c, (rank + 1) * c)]
    c = length // (2 * world_size)
    return [
        (rank * c, (rank + 1) * c),
        ((2 * world_size - 1 - rank) * c, (2 * world_size - rank) * c),
    ]


def shard_sequence(
    x: Tensor, world_size: int, rank: int, layout: str = "zigzag", dim: int = 2
) -> Tensor:
    """This rank's shard of ``x`` along ``dim`` (the sequence dim; 2 for (B, H, L, D))."""
    parts = [x.narrow(dim, a, b - a) for a, b in chunks_of(rank, world_size, x.shape[dim], layout)]
    return torch.cat(parts, dim=dim)


def unshard_sequence(shards: list[Tensor], layout: str = "zigzag", dim: int = 2) -> Tensor:
    """Undo ``shard_sequence`` given every rank's shard, in rank order."""
    P = len(shards)
    length = shards[0].shape[dim] * P
    pieces: list[tuple[int, Tensor]] = []
    for rank, shard in enumerate(shards):
        offset = 0
        for a, b in chunks_of(rank, P, length, layout):
            pieces.append((a, shard.narrow(dim, offset, b - a)))
            offset += b - a
    return torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])], dim=dim)


def gather_sequence(
    local: Tensor, group: dist.ProcessGroup | None = None, layout: str = "zigzag", dim: int = 2
) -> Tensor:
    """All-gather every rank's shard and undo the layout: the whole sequence on every rank."""
    shards = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, local.contiguous(), group=group)
    return unshard_sequence(shards, layout, dim)
