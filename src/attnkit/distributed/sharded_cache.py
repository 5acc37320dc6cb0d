"""Decoding over a KV cache sharded along the sequence (context-parallel decoding).

When one device cannot hold a long context's keys and values, each rank holds a contiguous
run of the cache's positions (any lengths, empty ones too) and every rank holds the same new
queries. Each rank attends its queries over its own keys, with the mask and score mod at the
keys' global positions; the ranks all-gather their small partial outputs and log-sum-exps
and merge them exactly (``merge_stacked``), so every rank ends with the whole attention. What
travels is a few integers (the shards' layout, checked) and (B, Hq, T, Dv + 1) per rank in
the LSE's dtype (float32; float64 for float64 inputs), whatever the cache length: made for
decoding, where T is a handful of tokens (a long prompt is ``ring_attention``'s work).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from attnkit import _validation as check
from attnkit import masks, score_mods
from attnkit._types import ScoreModFn
from attnkit.backends._common import compute_dtype
from attnkit.distributed.layout import check_initialised
from attnkit.distributed.merge import merge_stacked
from attnkit.distributed.ring import (
    _pair_mask,
    _pair_score_mod,
    _Setup,
    _whole_sequence_mask,
    window_sides,
)
from attnkit.functional import BackendName, _check_score_mod, attention
from attnkit.masks import Mask
from attnkit.score_mods import ScoreMod
from attnkit.sinks import apply_sinks, check_sinks


def sharded_cache_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    kv_start: int,
    q_start: int | None = None,
    causal: bool = False,
    window: int | tuple[int, int] | None = None,
    mask: Mask | None = None,
    padding: Tensor | None = None,
    score_mod: ScoreMod | ScoreModFn | None = None,
    scale: float | None = None,
    sinks: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    backend: BackendName = "auto",
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of the same queries on every rank over keys sharded along the sequence.

    The ranks' shards, put in order of ``kv_start``, must tile the positions 0 .. L - 1 of
    the whole cache (rank order is free: the shard that takes new tokens may be any rank's).

    Args:
        q: (B, Hq, T, D), the same on every rank: queries at global positions
            q_start .. q_start + T - 1.
        k: this rank's keys (B, Hkv, S, D), global positions kv_start .. kv_start + S - 1;
            S may be 0 and may differ between ranks. GQA allowed.
        v: this rank's values (B, Hkv, S, Dv).
        kv_start: the global position of this rank's first key.
        q_start: the global position of the first query; None: L - T (the queries are the
            cache's last T positions, as after ``KVCache.append`` of their keys). Only
            ``causal``, ``window``, ``mask`` and a ``score_mod`` other than ALiBi and softcap
            bound it; without them the queries may sit past L (a decoder's cross-attention
            over an encoder memory sharded over ranks; beams past their prompt's end).
        causal: query at global position i sees keys j <= i.
        window: FlashAttention's window_size: (left, right), or an int w for (w, 0) when
            causal and (w, w) otherwise; -1 leaves a side unbounded.
        mask: any ``Mask`` over the whole sequence (L, L), its positions global, on top of
            ``causal`` and ``window``; a rank whose part it leaves empty computes nothing.
        padding: (B, S) bool, True where this rank's key is padding (a left-padded batch's
            pads, say), as ``CausalLM``'s ``padding`` marks them; none attends to them.
        score_mod: as ``attention``'s, at global positions (ALiBi in the kernels at each
            shard's offset, as ``ring_attention`` does).
        scale: default 1/sqrt(D).
        sinks: attention-sink logits (Hq,), the same on every rank, applied after merging.
        group: the process group (default: the world).
        backend: what computes each rank's part (``attention``'s choices).
        return_lse: also return the LSE (B, Hq, T).

    Returns:
        the whole attention's output (B, Hq, T, Dv) on every rank (and LSE). Gradients reach
        this rank's k and v exactly; q's (and a score mod's parameters') cover this rank's
        keys only: sum them over ranks, as for any replicated input (sinks' are whole).
    """
    check_initialised("sharded_cache_attention")
    # what each rank can check alone first: a rank that raises leaves the others waiting
    shapes = check.check_qkv(q, k, v)
    kv_start = check.check_int("kv_start", kv_start, least=0)
    if q_start is not None:
        check.check_int("q_start", q_start, least=0)
    check.check_flag("return_lse", return_lse)
    _check_score_mod(score_mod, shapes)
    if sinks is not None:
        check_sinks(sinks, shapes.Hq, q.device)
    win = window_sides(window, causal)
    if padding is not None and (
        not isinstance(padding, Tensor)
        or padding.dtype != torch.bool
        or tuple(padding.shape) != (shapes.B, shapes.Lk)
    ):
        got = f"{padding.dtype} {tuple(padding.shape)}" if isinstance(padding, Tensor) else padding
        raise ValueError(
            f"padding must be a bool tensor (B, S) = ({shapes.B}, {shapes.Lk}) over this rank's "
            f"keys, True = padding; got {got}"
        )
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    length, first_query = _agreed_layout(q, k, v, kv_start, group, world, rank)
    T = shapes.Lq
    first_query = first_query if q_start is None else q_start
    # only masks, windows and score mods over the whole sequence bound the queries' positions
    # (a decoder's cross-attention over a sharded memory has none and may have more queries
    # than memory positions; ALiBi and softcap run at any offset: beams past a prompt's end)
    whole_mod = score_mod is not None and score_mods.kernel_mods(score_mod) is None
    placed = causal or win is not None or mask is not None or whole_mod
    if placed and first_query + T > length:
        raise ValueError(
            f"the queries' positions {first_query} .. {first_query + T - 1} run past the "
            f"cache's {length} positions (q_start={q_start}, T={T})"
        )
    setup = _Setup(
        group,
        rank,
        world,
        length,
        length,
        "contiguous",
        causal,
        win,
        check.check_scale(scale, shapes.D),
        "tiled",  # (unused: the part runs on ``backend`` through attention)
        _whole_sequence_mask(mask, length, "sharded_cache_attention"),
        score_mod,
    )
    queries, keys = (first_query, first_query + T), (kv_start, kv_start + shapes.Lk)
    visit, part_mask = _pair_mask(setup, queries, keys, None) if shapes.Lk else (False, None)
    if visit and padding is not None:
        kept = masks.from_padding_mask(~padding.to(q.device))
        part_mask = kept if part_mask is None else part_mask & kept
    if visit:
        out, lse = attention(
            q,
            k,
            v,
            mask=part_mask,
            score_mod=_pair_score_mod(setup, (first_query, kv_start)),
            scale=setup.scale,
            backend=backend,
            return_lse=True,
        )
    else:
        out, lse = _no_keys(q, k, v)
    # one all_gather of each rank's output with its LSE as one more column (compute dtype)
    part = torch.cat([out.to(lse.dtype), lse[..., None]], dim=-1)
    parts = _GatherReplicas.apply(part, group, world, rank)  # type: ignore[no-untyped-call]
    out, lse = merge_stacked(parts[..., :-1], parts[..., -1])
    out = out.to(q.dtype)
    if sinks is not None:
        out, lse = apply_sinks(out, lse, sinks)
    return (out, lse) if return_lse else out


def _no_keys(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The part of a shard no query sees: out (B, Hq, T, Dv) zeros and LSE -inf (weight 0).

    Joined to q, k and v by an empty sum (exactly 0, whatever they hold), so that this rank's
    output needs a gradient where the other ranks' do, and its k and v get zeros.
    """
    nothing = sum(t.flatten()[:0].sum() for t in (q, k, v))
    out = q.new_zeros(*q.shape[:3], v.shape[-1]) + nothing
    lse = torch.full(q.shape[:3], -torch.inf, dtype=compute_dtype(q.dtype), device=q.device)
    return out, lse


def _agreed_layout(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_start: int,
    group: dist.ProcessGroup | None,
    world: int,
    rank: int,
) -> tuple[int, int]:
    """(L, L - T): the whole cache's length and the default first query position.

    ValueError unless every rank's q has the same shape, its k and v the same heads and head
    dims, and the shards tile 0 .. L - 1 (one all_gather of a few integers, on q's device).
    """
    B, Hq, T, D = q.shape
    mine = [kv_start, k.shape[2], B, Hq, T, D, k.shape[1], v.shape[-1]]
    found = [torch.empty(len(mine), dtype=torch.int64, device=q.device) for _ in range(world)]
    dist.all_gather(found, torch.tensor(mine, device=q.device), group=group)
    rows = [[int(x) for x in t] for t in found]
    shapes = {tuple(row[2:]) for row in rows}
    if len(shapes) > 1:
        raise ValueError(
            "every rank must hold the same queries (B, Hq, T, D) and keys and values of the "
            "same heads and dims (Hkv, Dv); ranks have (B, Hq, T, D, Hkv, Dv) = "
            f"{sorted(shapes)} (rank {rank}: {tuple(mine[2:])})"
        )
    runs = sorted((start, start + n) for start, n, *_ in rows if n > 0)
    end = 0
    for start, stop in runs:
        if start != end:
            what = "overlap" if start < end else "leave a gap"
            raise ValueError(
                f"the ranks' shards must tile the cache's positions from 0; they {what} at "
                f"position {min(start, end)} (shards (kv_start, S) by rank: "
                f"{[(row[0], row[1]) for row in rows]})"
            )
        end = stop
    return end, end - T


class _GatherReplicas(torch.autograd.Function):
    """Every rank's x stacked (P, ...); its gradient is this rank's slice, not a sum.

    Every rank merges the same parts into the same output: a loss on it is one loss held P
    times, so the gradient reaching this rank's part is its slice of the output's gradient
    (summing over ranks would count it P times).
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, group: dist.ProcessGroup | None, world: int, rank: int
    ) -> Tensor:
        ctx.rank = rank
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return grad[ctx.rank], None, None, None
