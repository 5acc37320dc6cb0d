"""Checking that every rank of a group passed the same arguments, before any rank acts on them.

A collective whose ranks disagree (different prompts, lengths or beam counts) does not fail:
it hangs, or returns what no rank asked for. One all_gather of a few integers per argument
turns that into the same ValueError on every rank, naming what each rank passed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

#: a tensor is summarised by its shape, padded to this many dims with -1, and a checksum
_DIMS = 4
_NONE, _INT, _TENSOR, _FLOAT = 0, 1, 2, 3


def check_ranks_agree(
    group: dist.ProcessGroup | None,
    what: str,
    device: torch.device,
    **given: Tensor | int | float | None,
) -> None:
    """ValueError on every rank of ``group`` unless each passed the same ``given`` values.

    Tensors (up to 4 dims) agree by shape and an order-weighted checksum of their values,
    ints and floats by value (floats bit for bit), None only with None. ``what`` names the
    operation in the message. A collective: every rank calls it with the same names, in the
    same order.
    """
    mine = torch.stack([_summary(value, device) for value in given.values()])
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    if any(not torch.equal(theirs, mine) for theirs in everyone):
        per_rank = "; ".join(
            f"rank {r}: "
            + ", ".join(f"{name} {_described(row)}" for name, row in zip(given, t, strict=True))
            for r, t in enumerate(everyone)
        )
        raise ValueError(
            f"{what} needs the same {', '.join(given)} on every rank of the group; {per_rank}"
        )


def _summary(value: Tensor | int | float | None, device: torch.device) -> Tensor:
    """(kind, dims padded with -1, checksum or the int) as int64 (2 + _DIMS,)."""
    if isinstance(value, Tensor):
        if value.dim() > _DIMS:
            raise ValueError(f"check_ranks_agree summarises tensors of <= {_DIMS} dims")
        flat = value.reshape(-1).long()  # int64 wraps: equal tensors, equal sums
        checksum = (flat * torch.arange(1, flat.numel() + 1, device=flat.device)).sum()
        shape = [_TENSOR, *value.shape, *[-1] * (_DIMS - value.dim())]
        return torch.cat([torch.tensor(shape, device=device), checksum.to(device)[None]])
    if isinstance(value, float):  # its float64 bits
        bits = torch.tensor(value, dtype=torch.float64).view(torch.int64)
        return torch.tensor([_FLOAT] + [-1] * _DIMS + [int(bits)], device=device)
    row = [_NONE] + [-1] * _DIMS + [0] if value is None else [_INT] + [-1] * _DIMS + [value]
    return torch.tensor(row, dtype=torch.int64, device=device)


def _described(row: Tensor) -> str:
    """What ``_summary`` summarised: None, the int, or the tensor's shape and checksum."""
    kind, *dims, last = (int(x) for x in row)
    if kind == _NONE:
        return "None"
    if kind == _INT:
        return str(last)
    if kind == _FLOAT:
        return repr(float(torch.tensor(last, dtype=torch.int64).view(torch.float64)))
    return f"{tuple(d for d in dims if d >= 0)} checksum {last}"
