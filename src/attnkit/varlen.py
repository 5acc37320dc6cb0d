"""Variable-length batches without padding: FlashAttention's ``flash_attn_varlen_func`` layout.

Sequences of different lengths are packed one after another along the token dim and
described by cumulative lengths: sequence i owns queries ``cu_seqlens_q[i] ..
cu_seqlens_q[i + 1] - 1`` and keys ``cu_seqlens_k[i] .. cu_seqlens_k[i + 1] - 1``. attnkit
runs them as one batch row under ``masks.document`` (a query sees only its own sequence's
keys), so no padding is computed and tiles between sequences are skipped. ``causal`` and
``window`` align each sequence bottom-right by its own lengths, as FlashAttention does: a
sequence's last query lines up with its last key (chunked prefill, decoding a batch of
different lengths).

Shape legend: q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv),
cu_seqlens (n + 1,) int, out (total_q, Hq, Dv), lse (Hq, total_q).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal, overload

import numpy as np
import torch
from torch import Tensor

from attnkit import _validation as check
from attnkit import masks
from attnkit._types import ScoreModFn
from attnkit.backends import tiled
from attnkit.block_mask import BlockMask
from attnkit.functional import BackendName, attention
from attnkit.masks import Mask, _tile_min_max
from attnkit.score_mods import ScoreMod


def _check_cu_seqlens(name: str, cu: object, total: int) -> Tensor:
    """(n + 1,) integers from 0, non-decreasing, ending at ``total``."""
    if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be a 1-D tensor of n + 1 >= 2 offsets, got {cu!r}")
    if cu.dtype.is_floating_point or cu.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {cu.dtype}")
    cu = cu.long().cpu()
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"{name} must rise from 0 to the packed length {total}, got {cu.tolist()}")
    return cu


def varlen_mask(
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    *,
    causal: bool = False,
    window: tuple[int, int] | None = None,
) -> Mask:
    """The mask of packed sequences: own sequence only, causal / window per sequence.

    Query i of sequence s lines up with key i + delta_s, delta_s = (its keys' end) − (its
    queries' end). When every sequence has the same delta (self-attention packing: 0) the
    causal or window part is the built-in pattern with that offset; otherwise a window
    around each query's aligned key, its tiles classified from per-tile bounds. Either way
    only the tiles an edge cuts through are evaluated.
    """
    n = cu_seqlens_q.numel() - 1
    if cu_seqlens_k.numel() - 1 != n:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k describe {n} and {cu_seqlens_k.numel() - 1} "
            "sequences; they must describe the same ones"
        )
    seqs = torch.arange(n)
    q_ids = seqs.repeat_interleave(cu_seqlens_q.diff())
    k_ids = seqs.repeat_interleave(cu_seqlens_k.diff())
    mask = masks.document(q_ids, k_ids)
    if not causal and window is None:
        return mask
    if window is not None and (not isinstance(window, tuple | list) or len(window) != 2):
        raise ValueError(f"window must be a (left, right) pair, -1 = unbounded; got {window!r}")
    left, right = (-1, -1) if window is None else window
    left, right = check.check_window("window left", left), check.check_window("window right", right)
    if causal:
        right = 0
    delta = (cu_seqlens_k[1:] - cu_seqlens_q[1:])[q_ids]  # per query
    offsets = torch.unique(delta)
    if offsets.numel() <= 1:  # one offset for all: a built-in pattern
        offset = int(offsets[0]) if offsets.numel() else 0
        return mask & masks.sliding_window(left, right, align=offset)
    return mask & _aligned_window(torch.arange(delta.numel()) + delta, left, right)


def _aligned_window(aligned: Tensor, left: int, right: int) -> Mask:
    """Query q sees keys aligned[q] - left .. aligned[q] + right (-1: unbounded that side).

    ``aligned`` (Lq,) is each query's aligned key position. A tile of queries whose aligned
    positions span [a_min, a_max] sees keys in [a_min - left, a_max + right] at most and every
    key in [a_max - left, a_min + right] for sure, so tiles are classified from those bounds
    in O(tiles); the ones left undecided (the window's edges, and wherever the document mask
    it is combined with cuts through) are evaluated, not all Lq·Lk pairs.
    """
    lo_reach = -math.inf if left < 0 else -left
    hi_reach = math.inf if right < 0 else right

    def bind(Lq: int, Lk: int) -> masks.BoundMask:
        if aligned.numel() != Lq:
            raise ValueError(f"varlen window for {aligned.numel()} queries, but Lq={Lq}")

        def fn(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            a = aligned.to(q.device)[q]  # shaped as q: the bounds cost O(queries), the
            if left < 0:  # comparisons O(pairs) on every partial tile
                return kv <= a + right
            return kv >= a - left if right < 0 else (kv >= a - left) & (kv <= a + right)

        def tiles(
            q_lo: Tensor, q_hi: Tensor, k_lo: Tensor, k_hi: Tensor, B: int, H: int
        ) -> tuple[Tensor, Tensor]:
            block = int(q_hi[0, 0] - q_lo[0, 0]) + 1
            a_min, a_max = (x[0, :, None] for x in _tile_min_max(aligned[None].to(q_lo), block))
            any_ = (k_hi - a_min >= lo_reach) & (k_lo - a_max <= hi_reach)
            all_ = (k_lo - a_max >= lo_reach) & (k_hi - a_min <= hi_reach)
            return any_, all_

        return masks.BoundMask(fn, tiles, exact=False)

    return masks.Mask(f"varlen_window({left}, {right})", bind)


#: What one visit of a kv tile costs beyond its query rows' arithmetic, in query rows: loading
#: the tile's keys and values and the per-tile bookkeeping. Fitted to the CPU kernels' times
#: at query tiles of 1-64 rows (``benchmarks/cpu_varlen.py --tiles``, 2-core Zen 3, D=64); at
#: D=128 the height it picks was the fastest too (16 and 4 new queries per sequence, ``--dim 128``).
KV_TILE_COST_ROWS = 6


def tile_visits(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, rows: int, block_k: int = 64) -> int:
    """How many kv tiles ``rows``-row query tiles visit under the packed batch's document mask.

    A query tile that straddles sequences visits every kv tile of all of them. Causal edges
    are ignored: they prune tiles of every height alike.
    """
    return _visits(_host(cu_seqlens_q), _host(cu_seqlens_k), rows, block_k)


def query_tile_costs(
    cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, *, block_k: int = 64
) -> dict[int, int]:
    """The modelled cost of each query-tile height, 64 rows down to 1, tallest first.

    Tiles much taller than the sequences compute mostly masked pairs (32 sequences of 16
    queries in 64-row tiles: 4x the pairs), while short tiles pay each kv tile's load for few
    rows: height b costs ``tile_visits`` · (KV_TILE_COST_ROWS + b).
    """
    cu_q, cu_k = _host(cu_seqlens_q), _host(cu_seqlens_k)
    return {
        rows: _visits(cu_q, cu_k, rows, block_k) * (KV_TILE_COST_ROWS + rows)
        for rows in (64, 32, 16, 8, 4, 2, 1)
    }


def query_tile_rows(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, *, block_k: int = 64) -> int:
    """Query rows per tile for a packed batch on the tiled backend (a power of two, 1-64).

    The cheapest height of ``query_tile_costs``, ties going to the taller.
    """
    costs = query_tile_costs(cu_seqlens_q, cu_seqlens_k, block_k=block_k)
    return min(costs, key=costs.__getitem__)  # the first (tallest) of equal costs


def _host(cu_seqlens: Tensor) -> np.ndarray:
    # numpy: this runs every call on a few small arrays, where torch's per-op cost dominates
    return cu_seqlens.detach().cpu().numpy().astype(np.int64)


def _visits(cu_q: np.ndarray, cu_k: np.ndarray, rows: int, block_k: int) -> int:
    total_q = int(cu_q[-1])
    lo = np.arange(0, total_q, rows)
    hi = np.minimum(lo + rows, total_q) - 1
    first = np.searchsorted(cu_q[1:], lo, side="right")  # the sequence of each tile's first row
    last = np.searchsorted(cu_q[1:], hi, side="right")
    k0, k1 = cu_k[first], cu_k[last + 1]
    return int(np.where(k1 > k0, (k1 - 1) // block_k - k0 // block_k + 1, 0).sum())


#: From this many query·key pairs, a packed call on CPU runs tiled at ``query_tile_rows``;
#: below, the choice itself (about 0.25 ms) weighs on calls of a few ms, and "auto" keeps its
#: own rule (SDPA with a dense mask up to ``FEW_QUERIES`` queries). One decoding query per
#: sequence (``benchmarks/cpu_varlen.py --decode``, nine runs), tiled at 1-row tiles ran at
#: 0.35-0.89x SDPA's speed at 1.5k-10k pairs, 0.62-1.36x at 12k-82k, 1.23-2.25x from 164k.
SIZED_TILES_MIN_PAIRS = 131072


def _packed_mask(
    mask: Mask, cu_q: Tensor, cu_k: Tensor, q: Tensor, backend: BackendName
) -> Mask | BlockMask:
    """The mask, or its BlockMask at ``query_tile_rows`` where tiled runs it on CPU.

    Only from ``SIZED_TILES_MIN_PAIRS`` pairs and where those tiles are shorter than tiled's
    default for this length (many short sequences: decoding, short chunks or documents); a
    BlockMask sends "auto" to tiled.
    """
    total_q, total_k = int(cu_q[-1]), int(cu_k[-1])
    if q.device.type != "cpu" or backend not in ("tiled", "auto"):
        return mask
    if total_q * total_k < SIZED_TILES_MIN_PAIRS:
        return mask
    cfg = tiled.default_config(total_q)
    rows = query_tile_rows(cu_q, cu_k, block_k=cfg.block_k)
    if rows >= cfg.block_q:
        return mask  # the default tiles (and tiled's own choice of taller ones) serve it
    return mask.blocks(total_q, total_k, rows, cfg.block_k)


@overload
def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor | None = ...,
    *,
    causal: bool = ...,
    window: tuple[int, int] | None = ...,
    score_mod: ScoreMod | ScoreModFn | None = ...,
    scale: float | None = ...,
    dropout_p: float = ...,
    generator: torch.Generator | None = ...,
    backend: BackendName = ...,
    sinks: Tensor | None = ...,
    return_lse: Literal[False] = ...,
) -> Tensor: ...
@overload
def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor | None = ...,
    *,
    causal: bool = ...,
    window: tuple[int, int] | None = ...,
    score_mod: ScoreMod | ScoreModFn | None = ...,
    scale: float | None = ...,
    dropout_p: float = ...,
    generator: torch.Generator | None = ...,
    backend: BackendName = ...,
    sinks: Tensor | None = ...,
    return_lse: Literal[True],
) -> tuple[Tensor, Tensor]: ...
def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor | None = None,
    *,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    score_mod: ScoreMod | ScoreModFn | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    backend: BackendName = "auto",
    sinks: Tensor | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over packed sequences of different lengths (no padding).

    Args:
        q: (total_q, Hq, D), every sequence's queries one after another.
        k: (total_k, Hkv, D).
        v: (total_k, Hkv, Dv).
        cu_seqlens_q: (n + 1,) cumulative query lengths, from 0 to total_q.
        cu_seqlens_k: (n + 1,) cumulative key lengths; default ``cu_seqlens_q``.
        causal: each query sees its sequence's keys up to its own, aligned bottom-right.
        window: (left, right) keys around the aligned one, -1 = unbounded (FlashAttention's
            window_size); with ``causal`` the right side is at most 0.
        score_mod: as ``attnkit.attention``; its indices are positions in the packed
            sequence.
        scale: multiplies q·kᵀ; default 1/sqrt(D).
        dropout_p: attention-weight dropout probability.
        generator: draws the dropout seed.
        backend: as ``attnkit.attention`` ("auto" picks tiled for the document mask on CPU,
            except SDPA for decoding batches under ``SIZED_TILES_MIN_PAIRS`` pairs). On CPU,
            tiled runs many short sequences at query tiles sized to them
            (``query_tile_rows``).
        sinks: attention-sink logits (Hq,), as ``attnkit.attention``.
        return_lse: also return the LSE (Hq, total_q), FlashAttention's varlen layout.

    Returns:
        out (total_q, Hq, Dv) in q's dtype (and lse (Hq, total_q)).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be (total, H, D) for varlen_attention, got {shape}")
    if q.shape[0] == 0 or k.shape[0] == 0:  # as attention refuses an empty length
        raise ValueError(
            f"varlen_attention needs at least one query and one key in the batch, got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)} (sequences may be empty, not all of them)"
        )
    cu_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    cu_k = cu_q
    if cu_seqlens_k is not None:
        cu_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    run = partial(
        attention,
        *(t.transpose(0, 1)[None] for t in (q, k, v)),  # one batch row (1, H, total, D)
        mask=_packed_mask(
            varlen_mask(cu_q, cu_k, causal=causal, window=window), cu_q, cu_k, q, backend
        ),
        score_mod=score_mod,
        scale=scale,
        dropout_p=dropout_p,
        generator=generator,
        backend=backend,
        sinks=sinks,
    )
    if return_lse:
        out, lse = run(return_lse=True)
        return out[0].transpose(0, 1), lse[0]
    out = run()
    return out[0].transpose(0, 1)
