"""Hybrid (2-D) sequence parallelism: Ulysses inside groups of ranks, the ring across them.

P = R x U ranks form a grid. Within a head group of U ranks (the GPUs of one machine, whose
all-to-alls are fast) Ulysses' all-to-all swaps sequence shards for head shards; across the R
ranks of a ring group (one per head group) ring attention then runs over the whole sequence,
each rank holding 1/R of it for about Hq/U heads (USP: Fang & Zhao, 2024). Ulysses alone needs
Hq >= P and sends everything through all-to-alls of every rank; the ring alone passes P - 1
key/value blocks; the hybrid needs Hq >= U and passes R - 1 blocks U times as large.

The whole sequence is sharded twice (``shard_hybrid``): by ``layout`` over the ring, then each
ring shard contiguously over its head group. ``hybrid_groups`` makes the two groups.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from attnkit import _validation as check
from attnkit._types import ScoreModFn
from attnkit.distributed.layout import (
    check_initialised,
    check_layout,
    check_shards,
    shard_sequence,
)
from attnkit.distributed.ring import _whole_sequence_mask, ring_attention
from attnkit.distributed.ulysses import mask_for_heads, over_heads, score_mod_for_heads
from attnkit.functional import _check_score_mod
from attnkit.masks import Mask
from attnkit.score_mods import ScoreMod
from attnkit.sinks import check_sinks


def hybrid_groups(head_ranks: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """This rank's head group and ring group, the world's P ranks as R x U = head_ranks.

    Head groups are U consecutive ranks (r·U .. r·U + U - 1: one machine's GPUs under
    torchrun), ring groups the ranks alike mod U. Every rank must call it (it makes every
    group, as ``dist.new_group`` requires).
    """
    check_initialised("hybrid_groups")
    world, rank = dist.get_world_size(), dist.get_rank()
    if isinstance(head_ranks, bool) or not isinstance(head_ranks, int) or head_ranks < 1:
        raise ValueError(f"head_ranks must be a positive int, got {head_ranks!r}")
    if world % head_ranks:
        raise ValueError(
            f"head_ranks={head_ranks} does not divide the world's {world} ranks into a grid"
        )
    found: dict[str, dist.ProcessGroup] = {}
    for first in range(0, world, head_ranks):
        group = dist.new_group(list(range(first, first + head_ranks)))
        if rank // head_ranks == first // head_ranks:
            found["heads"] = group
    for column in range(head_ranks):
        group = dist.new_group(list(range(column, world, head_ranks)))
        if rank % head_ranks == column:
            found["ring"] = group
    return found["heads"], found["ring"]


def shard_hybrid(
    x: Tensor,
    head_group: dist.ProcessGroup,
    ring_group: dist.ProcessGroup,
    layout: str = "zigzag",
    dim: int = 2,
) -> Tensor:
    """This rank's shard of the whole sequence ``x`` along ``dim`` (2 for (B, H, L, D)).

    ``layout``'s shard over the ring group, cut contiguously over the head group.
    """
    ring = shard_sequence(
        x, dist.get_world_size(ring_group), dist.get_rank(ring_group), layout, dim
    )
    size, rank = dist.get_world_size(head_group), dist.get_rank(head_group)
    return shard_sequence(ring, size, rank, "contiguous", dim)


def hybrid_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    head_group: dist.ProcessGroup,
    ring_group: dist.ProcessGroup,
    causal: bool = False,
    window: int | tuple[int, int] | None = None,
    mask: Mask | None = None,
    score_mod: ScoreMod | ScoreModFn | None = None,
    scale: float | None = None,
    layout: str = "zigzag",
    sinks: Tensor | None = None,
    document_ids: Tensor | None = None,
    backend: str = "auto",
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Self-attention over a sequence sharded over a grid of ranks (``shard_hybrid``).

    Args:
        q: this rank's queries (B, Hq, L/P, D); Hq >= U (U: the head group's size).
        k: this rank's keys (B, Hkv, L/P, D); GQA allowed.
        v: this rank's values (B, Hkv, L/P, Dv).
        head_group: the U ranks that swap sequence shards for head shards (``hybrid_groups``).
        ring_group: the R ranks that pass key/value blocks around (``hybrid_groups``).
        causal: query at global position i sees keys j <= i.
        window: as ``ring_attention``'s (FlashAttention's window_size).
        mask: any ``Mask`` over the whole sequence (L, L) and every head, on top of
            ``causal``, ``window`` and ``document_ids`` (those that read the head are cut to
            the rank's heads).
        score_mod: as ``ring_attention``'s (those that read the head are cut to the rank's
            heads).
        scale: default 1/sqrt(D).
        layout: how the ring's shards are cut, "zigzag" or "contiguous" (``shard_hybrid``).
        sinks: attention-sink logits (Hq,), the same on every rank. Each rank's gradient
            covers its heads and queries: sum it over all ranks.
        document_ids: packed documents: this rank's shard (as ``shard_hybrid`` cuts q, along
            its last dim) of the global sequence's document ids, (L/P,) or (B, L/P).
        backend: what computes each block of the ring (``ring_attention``'s choices).
        return_lse: also return the LSE (B, Hq, L/P) of this rank's queries.

    Returns:
        this rank's output (B, Hq, L/P, Dv) (and LSE). Gradients flow to q, k, v and sinks.
    """
    shapes = check_shards(q, k, v, "hybrid_attention")
    check.check_flag("return_lse", return_lse)
    rings = dist.get_world_size(ring_group)
    length = shapes.Lq * dist.get_world_size(head_group) * rings
    mask = _whole_sequence_mask(mask, length, "hybrid_attention")  # before any exchange
    if document_ids is not None and (
        document_ids.dim() not in (1, 2) or document_ids.shape[-1] != shapes.Lq
    ):
        raise ValueError(
            f"document_ids must be this rank's shard, (L/P,) or (B, L/P) with L/P = "
            f"{shapes.Lq}, got {tuple(document_ids.shape)}"
        )
    _check_score_mod(score_mod, shapes)  # (before it is cut to each rank's heads)
    if sinks is not None:
        check_sinks(sinks, shapes.Hq, q.device)

    def attend(qh: Tensor, kh: Tensor, vh: Tensor, first: int, heads: int) -> tuple[Tensor, Tensor]:
        # (over_heads has checked that every rank's shards are alike: the ids gather evenly)
        ids = None if document_ids is None else _ring_shard(document_ids.to(q.device), head_group)
        cut = mask_for_heads(mask, first, heads, shapes.Hq)
        assert cut is None or isinstance(cut, Mask)
        mod = score_mod_for_heads(score_mod, first, heads, qh.shape[2] * rings)
        found = ring_attention(
            qh,
            kh,
            vh,
            causal=causal,
            window=window,
            mask=cut,
            score_mod=mod,
            scale=scale,
            group=ring_group,
            layout=layout,
            sinks=None if sinks is None else sinks[first : first + heads],
            document_ids=ids,
            backend=backend,
            return_lse=True,
        )
        assert isinstance(found, tuple)
        return found

    out, lse = over_heads(
        q,
        k,
        v,
        attend,
        head_group,
        "contiguous",
        lambda length: check_layout(layout, length * rings, rings),
        "hybrid_attention",
    )
    return (out, lse) if return_lse else out


def _ring_shard(ids: Tensor, head_group: dist.ProcessGroup) -> Tensor:
    """The ring shard's document ids: every head-group rank's shard, in order (last dim)."""
    parts = [torch.empty_like(ids) for _ in range(dist.get_world_size(head_group))]
    dist.all_gather(parts, ids.contiguous(), group=head_group)
    return torch.cat(parts, dim=-1)
