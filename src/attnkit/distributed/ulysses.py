"""Ulysses attention (DeepSpeed-Ulysses): a sequence split over P ranks, attended head by head.

Each rank holds every head of its shard of the sequence. One all-to-all swaps that for every
position of a 1/P share of the heads; attention then runs locally over the whole sequence, on
any backend, under any mask or score_mod; a second all-to-all swaps the output back. Where ring
attention passes key/value blocks P - 1 times, this sends each of q, k, v and out once
(3 + 1 all-to-alls of 1/P of them per rank), at the price of holding the whole sequence for
H/P heads, and of needing the heads to split: Hq % P == 0, and Hkv % P == 0 or P % Hkv == 0
(then each kv head is repeated to the P / Hkv ranks whose query heads read it).

Masks and score_mods are given for the whole sequence and every head, as to ``attention``;
those that depend on the head (per-head layouts and tensors, ALiBi slopes, predicates reading
``h``) are cut to the rank's heads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from attnkit import _validation as check
from attnkit import score_mods as mods
from attnkit._types import ScoreModFn
from attnkit.backends._common import MaskLike
from attnkit.block_mask import BlockMask
from attnkit.distributed.layout import check_layout, check_shards, shard_sequence, unshard_sequence
from attnkit.functional import BackendName, _check_score_mod, attention
from attnkit.masks import BoundMask, Mask
from attnkit.score_mods import ScoreMod
from attnkit.sinks import check_sinks


@dataclass(frozen=True)
class _Setup:
    group: dist.ProcessGroup | None
    world: int
    layout: str


def _sequence_to_heads(x: Tensor, s: _Setup) -> Tensor:
    """(B, H, L/P, ·) every head of this rank's shard -> (B, H/P, L, ·) its heads, in order."""
    send = [part.contiguous() for part in x.chunk(s.world, dim=1)]
    recv = [torch.empty_like(send[0]) for _ in range(s.world)]
    dist.all_to_all(recv, send, group=s.group)  # recv[j]: rank j's shard of this rank's heads
    return unshard_sequence(recv, s.layout)


def _heads_to_sequence(x: Tensor, s: _Setup) -> Tensor:
    """(B, H/P, L, ·) this rank's heads -> (B, H, L/P, ·) every head of its shard."""
    send = [shard_sequence(x, s.world, j, s.layout).contiguous() for j in range(s.world)]
    recv = [torch.empty_like(send[0]) for _ in range(s.world)]
    dist.all_to_all(recv, send, group=s.group)  # recv[j]: rank j's heads of this shard
    return torch.cat(recv, dim=1)


class _AllToAll(torch.autograd.Function):
    """One all-to-all, from sequence shards to head groups or back; its gradient is the other.

    The backward applies this Function again, so derivatives of any order pass through it
    (as far as the attention backend gives them).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, s: _Setup, to_heads: bool) -> Tensor:
        ctx.setup, ctx.to_heads = s, to_heads
        return _sequence_to_heads(x, s) if to_heads else _heads_to_sequence(x, s)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        return _swap(grad, ctx.setup, not ctx.to_heads), None, None


def _swap(x: Tensor, s: _Setup, to_heads: bool) -> Tensor:
    """``_AllToAll``, typed."""
    out: Tensor = _AllToAll.apply(x, s, to_heads)  # type: ignore[no-untyped-call]
    return out


def mask_for_heads(mask: MaskLike, first: int, heads: int, Hq: int) -> MaskLike:
    """``mask`` (for all Hq heads) as it applies to heads first .. first + heads - 1."""
    if mask is None:
        return None
    if isinstance(mask, Tensor):
        if mask.dim() == 4 and mask.shape[1] == Hq and Hq > 1:
            return mask[:, first : first + heads]
        return mask
    if isinstance(mask, BlockMask):
        if mask.kinds.shape[1] > 1:
            raise ValueError(
                f"ulysses_attention takes a BlockMask only when it is the same for every head; "
                f"this one has {mask.kinds.shape[1]} heads: pass the Mask it was made from"
            )
        return mask
    if not isinstance(mask, Mask) or (mask.heads is None and mask.spec is not None):
        return mask  # a built-in pattern that reads no head (or not a mask: attention says so)

    def bind(Lq: int, Lk: int) -> BoundMask:
        whole = mask.bind(Lq, Lk)

        def fn(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return whole.fn(b, h + first, q, kv)

        def tiles(*args: Any) -> tuple[Tensor, Tensor]:
            *ranges, B, _ = args  # (q_lo, q_hi, k_lo, k_hi, B, H): asked for every head
            found = whole.tiles(*ranges, B, Hq)  # type: ignore[call-arg]
            return tuple(  # type: ignore[return-value]
                t[:, first : first + heads] if t.dim() == 4 and t.shape[1] > 1 else t for t in found
            )

        return BoundMask(fn, tiles, whole.exact, whole.any_ranges)

    last = first + heads - 1
    return Mask(
        f"{mask.name}[heads {first}..{last}]",
        bind,
        batch=mask.batch,
        heads=None if mask.heads is None else heads,
    )


def score_mod_for_heads(
    score_mod: ScoreMod | ScoreModFn | None, first: int, heads: int, L: int
) -> ScoreMod | ScoreModFn | None:
    """``score_mod`` (for all query heads) as it applies to heads first .. first + heads - 1.

    ALiBi (and ALiBi then a softcap) keeps its in-kernel form, its slopes cut to the heads;
    any other mod that may read ``h`` is called with the global head index.
    """
    if score_mod is None or (isinstance(score_mod, ScoreMod) and score_mod.kind == "softcap"):
        return score_mod
    kernel = mods.kernel_mods(score_mod)
    if kernel is not None and kernel.slopes is not None:
        slopes = kernel.slopes
        cut = slopes if slopes.numel() == 1 else slopes[first : first + heads]
        return replace(kernel, slopes=cut).score_mod()
    whole = mods.resolve(score_mod, L, L)
    assert whole is not None

    def fn(score: Tensor, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return whole(score, b, h + first, q, kv)

    return fn


def ulysses_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskLike = None,
    score_mod: ScoreMod | ScoreModFn | None = None,
    scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    layout: str = "contiguous",
    sinks: Tensor | None = None,
    backend: BackendName = "auto",
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Self-attention over a sequence sharded along dim 2 across the ranks of ``group``.

    Args:
        q: this rank's queries (B, Hq, L/P, D), sharded by ``layout`` (see ``shard_sequence``);
            Hq % P == 0.
        k: this rank's keys (B, Hkv, L/P, D); Hkv % P == 0 or P % Hkv == 0.
        v: this rank's values (B, Hkv, L/P, Dv).
        mask: as ``attention``'s, over the whole sequence (L, L) and every head: any ``Mask``,
            a bool tensor, or a BlockMask that is the same for every head.
        score_mod: as ``attention``'s, for every head.
        scale: default 1/sqrt(D).
        group: the process group (default: the world).
        layout: "contiguous" or "zigzag": how the sequence is sharded.
        sinks: attention-sink logits (Hq,), the same on every rank. Each rank's gradient
            covers its own heads: sum it over ranks, as for any replicated parameter.
        backend: what computes each rank's attention (``attention``'s choices).
        return_lse: also return the LSE (B, Hq, L/P) of this rank's queries.

    Returns:
        this rank's output (B, Hq, L/P, Dv) (and LSE). Gradients flow to q, k, v, sinks and
        learnable score_mod parameters.
    """
    shapes = check_shards(q, k, v, "ulysses_attention")
    check.check_flag("return_lse", return_lse)
    _check_score_mod(score_mod, shapes)
    if sinks is not None:
        check_sinks(sinks, shapes.Hq, q.device)
    world = dist.get_world_size(group)

    def attend(qh: Tensor, kh: Tensor, vh: Tensor, first: int, heads: int) -> tuple[Tensor, Tensor]:
        length = qh.shape[2]
        out, lse = attention(
            qh,
            kh,
            vh,
            mask=mask_for_heads(mask, first, heads, shapes.Hq),
            score_mod=score_mod_for_heads(score_mod, first, heads, length),
            scale=scale,
            sinks=None if sinks is None else sinks[first : first + heads],
            backend=backend,
            return_lse=True,
        )
        return out, lse

    out, lse = over_heads(
        q, k, v, attend, group, layout, lambda length: check_layout(layout, length, world)
    )
    return (out, lse) if return_lse else out


def over_heads(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attend: Callable[[Tensor, Tensor, Tensor, int, int], tuple[Tensor, Tensor]],
    group: dist.ProcessGroup | None,
    layout: str,
    check_length: Callable[[int], None],
    caller: str = "ulysses_attention",
) -> tuple[Tensor, Tensor]:
    """Ulysses' exchange around ``attend``: sequence shards to head shards over ``group``, back.

    Args:
        q: this rank's shard (B, Hq, L/P, D) of every query head (checked by the caller).
        k: (B, Hkv, L/P, D).
        v: (B, Hkv, L/P, Dv).
        attend: (q, k, v) (B, H/P, L, ·) of heads first .. first + heads - 1 over the whole
            sequence, and first, heads -> out (B, Hq/P, L, Dv) and LSE (B, Hq/P, L).
        group: the ranks that swap shards.
        layout: how the sequence is sharded over ``group``.
        check_length: raises unless the whole sequence's length L splits under ``layout``.
        caller: the function named in errors.

    Returns:
        this rank's out (B, Hq, L/P, Dv) and LSE (B, Hq, L/P).
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    Hq, Hkv, Lq = q.shape[1], k.shape[1], q.shape[2]
    if Hq % world or (Hkv % world and world % Hkv):
        raise ValueError(
            f"{caller} splits the heads over the {world} ranks: Hq must be a multiple "
            f"of {world} and Hkv a multiple or a divisor of it, got Hq={Hq}, "
            f"Hkv={Hkv} (ring_attention splits the sequence instead)"
        )
    # every rank must send and receive alike (on q's device: NCCL takes no CPU tensor)
    agreed = torch.tensor([Lq, -Lq], device=q.device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=group)
    if int(agreed[0]) != -int(agreed[1]):
        raise ValueError(
            f"every rank must hold the same shard length; lengths range from {-int(agreed[1])} "
            f"to {int(agreed[0])} (rank {rank} has {Lq})"
        )
    check_length(Lq * world)
    s = _Setup(group, world, layout)
    heads = Hq // world
    if Hkv % world:  # each kv head to the P / Hkv ranks whose query heads read it
        k, v = (t.repeat_interleave(world // Hkv, dim=1) for t in (k, v))
    qh, kh, vh = (_swap(t, s, to_heads=True) for t in (q, k, v))
    out, lse = attend(qh, kh, vh, rank * heads, heads)
    return _swap(out, s, to_heads=False), _swap(lse[..., None], s, to_heads=False)[..., 0]
