"""Ulysses attention (DeepSpeed-Ulysses): a sequence split over P ranks, attended head by head.

Each rank holds every head of its shard of the sequence. One all-to-all swaps that for every
position of a 1/P share of the heads; attention then runs locally over the whole sequence, on
any backend, under any mask or score_mod; a second all-to-all swaps the output back. Where ring
attention passes key/value blocks P - 1 times, this sends each of q, k, v and out once
(3 + 1 all-to-alls of 1/P of them per rank), at the price of holding the whole sequence for
about H/P heads, and of needing at least one query head per rank (Hq >= P). Heads that do not
divide go as evenly as they can (12 over 8 ranks: 1 or 2 each); each rank gets the kv heads
its query heads read, once each where they read them in equal groups (grouped attention),
else one per query head (a cut through a group).

Masks and score_mods are given for the whole sequence and every head, as to ``attention``;
those that depend on the head (per-head layouts and tensors, ALiBi slopes, predicates reading
``h``) are cut to the rank's heads.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import replace
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


class _Exchange(torch.autograd.Function):
    """One all-to-all of tensors of any shapes; its gradient is the exchange back.

    ``sends[j]`` goes to rank j; what comes from rank j has ``shapes[j]``. Packed into one
    flat ``all_to_all_single`` (gloo's list all_to_all takes equal shapes only). The
    backward applies this Function again, so derivatives of any order pass through it (as
    far as the attention backend gives them).
    """

    @staticmethod
    def forward(
        ctx: Any, group: dist.ProcessGroup | None, shapes: list[torch.Size], *sends: Tensor
    ) -> tuple[Tensor, ...]:
        ctx.group, ctx.shapes = group, [t.shape for t in sends]
        sizes, sent = [shape.numel() for shape in shapes], [t.numel() for t in sends]
        flat = sends[0].new_empty(sum(sent))
        for t, part in zip(sends, flat.split_with_sizes(sent), strict=True):
            part.view(t.shape).copy_(t)  # the one copy of a (strided) slice of heads
        out = flat.new_empty(sum(sizes))
        dist.all_to_all_single(out, flat, sizes, sent, group=group)
        return tuple(
            part.view(shape)
            for part, shape in zip(out.split_with_sizes(sizes), shapes, strict=True)
        )

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        return None, None, *_exchange(list(grads), ctx.shapes, ctx.group)


def _exchange(
    sends: list[Tensor], shapes: list[torch.Size], group: dist.ProcessGroup | None
) -> list[Tensor]:
    """``_Exchange``, typed."""
    return list(_Exchange.apply(group, shapes, *sends))  # type: ignore[no-untyped-call]


def head_bounds(heads: int, world: int) -> list[int]:
    """Where each rank's share of ``heads`` starts (and, last, ends): as even as they go.

    Rank r takes heads bounds[r] .. bounds[r + 1] - 1: 12 heads over 8 ranks, 1 or 2 each.
    """
    return [r * heads // world for r in range(world + 1)]


def kv_heads_for(first: int, count: int, group_size: int) -> list[int]:
    """The kv heads a rank holding query heads first .. first + count - 1 receives.

    Each kv head once when its query heads read the same number of kv heads each (grouped
    attention on that rank); otherwise one kv head per query head (``h // group_size``),
    repeats included: an uneven cut through a group leaves no common group size.
    """
    read = [h // group_size for h in range(first, first + count)]
    distinct = sorted(set(read))
    if read and all(read.count(kv) * len(distinct) == count for kv in distinct):
        return distinct  # each read by count / len(distinct) query heads
    return read


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
            Hq >= P (``head_bounds`` says which heads each rank attends).
        k: this rank's keys (B, Hkv, L/P, D); GQA allowed.
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

    Rank r attends query heads ``head_bounds(Hq, P)[r]`` on, as many as the next bound
    leaves (Hq >= P; with Hq % P != 0 some ranks take one more), with the kv heads
    ``kv_heads_for`` gives it.

    Args:
        q: this rank's shard (B, Hq, L/P, D) of every query head (checked by the caller).
        k: (B, Hkv, L/P, D).
        v: (B, Hkv, L/P, Dv).
        attend: (q, k, v) (B, ·, L, ·) of heads first .. first + heads - 1 over the whole
            sequence, and first, heads -> out (B, heads, L, Dv) and LSE (B, heads, L).
        group: the ranks that swap shards.
        layout: how the sequence is sharded over ``group``.
        check_length: raises unless the whole sequence's length L splits under ``layout``.
        caller: the function named in errors.

    Returns:
        this rank's out (B, Hq, L/P, Dv) and LSE (B, Hq, L/P).
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    B, Hq, Lq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    # every rank must send and receive alike (on q's device: NCCL takes no CPU tensor)
    mine = torch.tensor([B, Hq, Hkv, Lq, D, Dv], device=q.device)
    agreed = torch.cat([mine, -mine])
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(agreed[:6], -agreed[6:]):
        raise ValueError(
            f"{caller}: every rank must hold shards of the same shape (B, Hq, Hkv, L/P, D, "
            f"Dv); they range from {(-agreed[6:]).tolist()} to {agreed[:6].tolist()} "
            f"(rank {rank} has {mine.tolist()})"
        )
    if Hq < world:  # (a rank without heads would leave its backward's exchanges unmatched)
        raise ValueError(
            f"{caller} gives each of its {world} ranks at least one query head, got Hq={Hq} "
            "(ring_attention splits the sequence instead)"
        )
    check_length(Lq * world)
    bounds = head_bounds(Hq, world)
    first, heads = bounds[rank], bounds[rank + 1] - bounds[rank]
    kv_for = [kv_heads_for(a, b - a, Hq // Hkv) for a, b in itertools.pairwise(bounds)]

    def to_heads(x: Tensor, picks: list[list[int]]) -> Tensor:
        """(B, H, L/P, ·) every head of this shard -> (B, picks[rank], L, ·) over all L."""
        sends = [_heads(x, pick) for pick in picks]
        shapes = [torch.Size((B, len(picks[rank]), Lq, x.shape[3]))] * world
        return unshard_sequence(_exchange(sends, shapes, group), layout)

    def to_sequence(x: Tensor) -> Tensor:
        """(B, heads, L, ·) this rank's heads over all L -> (B, Hq, L/P, ·) of its shard."""
        sends = [shard_sequence(x, world, j, layout) for j in range(world)]
        shapes = [torch.Size((B, b - a, Lq, x.shape[3])) for a, b in itertools.pairwise(bounds)]
        return torch.cat(_exchange(sends, shapes, group), dim=1)

    qs = [list(range(a, b)) for a, b in itertools.pairwise(bounds)]
    qh, kh, vh = to_heads(q, qs), to_heads(k, kv_for), to_heads(v, kv_for)
    out, lse = attend(qh, kh, vh, first, heads)
    return to_sequence(out), to_sequence(lse[..., None])[..., 0]


def _heads(x: Tensor, picks: list[int]) -> Tensor:
    """Heads ``picks`` of x (B, H, ·, ·): a slice where they run on, else a gather."""
    if picks and picks == list(range(picks[0], picks[-1] + 1)):
        return x[:, picks[0] : picks[-1] + 1]
    return x.index_select(1, torch.tensor(picks, dtype=torch.long, device=x.device))
