"""What every backend receives: one validated request, plus helpers shared by backends."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit._types import ScoreModFn, Shapes
from attnkit.block_mask import BlockMask
from attnkit.masks import Mask

MaskLike = Mask | BlockMask | Tensor | None


@dataclass(frozen=True)
class Request:
    """One validated attention call.

    q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv); ``score_mod`` is already bound
    to (Lq, Lk) and ``score_mod_source`` is what the caller passed (kernels recognise built-in
    ScoreMods by it); ``seed`` is the dropout seed (None when dropout_p == 0).
    """

    q: Tensor
    k: Tensor
    v: Tensor
    shapes: Shapes
    mask: MaskLike
    score_mod: ScoreModFn | None
    score_mod_source: object
    scale: float
    dropout_p: float
    seed: int | None
    return_lse: bool


def index_grid(s: Shapes, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Broadcasting index tensors b (B,1,1,1), h (1,Hq,1,1), q (1,1,Lq,1), kv (1,1,1,Lk)."""
    return (
        torch.arange(s.B, device=device).view(-1, 1, 1, 1),
        torch.arange(s.Hq, device=device).view(1, -1, 1, 1),
        torch.arange(s.Lq, device=device).view(1, 1, -1, 1),
        torch.arange(s.Lk, device=device).view(1, 1, 1, -1),
    )


def dense_mask(mask: MaskLike, s: Shapes, device: torch.device) -> Tensor | None:
    """The mask as a bool tensor (B|1, H|1, Lq, Lk), True = attend; None for no mask."""
    if mask is None:
        return None
    if isinstance(mask, Mask):
        return mask.dense(
            s.Lq, s.Lk, B=s.B if mask.batch else None, H=s.Hq if mask.heads else None, device=device
        )
    if isinstance(mask, BlockMask):
        return mask.to_dense().to(device)
    return mask.to(device)


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """(B, Hkv, L, D) -> (B, Hkv·groups, L, D): each kv head serves ``groups`` query heads."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)
