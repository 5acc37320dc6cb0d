"""Variable-length batches without padding: FlashAttention's ``flash_attn_varlen_func`` layout.

Sequences of different lengths are packed one after another along the token dim and
described by cumulative lengths: sequence i owns queries ``cu_seqlens_q[i] ..
cu_seqlens_q[i + 1] - 1`` and keys ``cu_seqlens_k[i] .. cu_seqlens_k[i + 1] - 1``. attnkit
runs them as one batch row where each query attends one range of keys, its own sequence's
(``masks.key_ranges``), so no padding is computed and tiles between sequences are skipped.
``causal`` and ``window`` align each sequence bottom-right by its own lengths, as
FlashAttention does: a sequence's last query lines up with its last key (chunked prefill,
decoding a batch of different lengths).

Shape legend: q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv),
cu_seqlens (n + 1,) int, out (total_q, Hq, Dv), lse (Hq, total_q).
"""

from __future__ import annotations

from functools import partial
from typing import Literal, overload

import numpy as np
import torch
from torch import Tensor

from attnkit import _validation as check
from attnkit import masks
from attnkit._types import ScoreModFn
from attnkit.backends import tile_heights
from attnkit.functional import BackendName, attention
from attnkit.masks import Mask
from attnkit.score_mods import ScoreMod


def _check_cu_seqlens(name: str, cu: object, total: int) -> Tensor:
    """(n + 1,) integers from 0, non-decreasing, ending at ``total``."""
    if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be a 1-D tensor of n + 1 >= 2 offsets, got {cu!r}")
    if cu.dtype.is_floating_point or cu.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {cu.dtype}")
    cu = _host_cu(cu)
    host = cu.numpy()  # numpy: checked at every call, on a few values (torch ops cost more)
    if host[0] != 0 or host[-1] != total or (host[1:] < host[:-1]).any():
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
    queries' end), and attends one range of keys (``masks.key_ranges``): its sequence's,
    cut to ``window`` around its aligned key (``causal``: up to it). The CPU kernels read
    the ranges as they are, so a new batch builds no tile map (a decoding batch's lengths
    change at every step).
    """
    first, last = _key_ranges(cu_seqlens_q, cu_seqlens_k, causal, window)
    return masks.key_ranges(first, last)


def _key_ranges(
    cu_q: Tensor, cu_k: Tensor, causal: bool, window: tuple[int, int] | None
) -> tuple[Tensor, Tensor]:
    """Each packed query's first and last key (total_q,) for ``varlen_mask``."""
    n = cu_q.numel() - 1
    if cu_k.numel() - 1 != n:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k describe {n} and {cu_k.numel() - 1} "
            "sequences; they must describe the same ones"
        )
    if window is not None and (not isinstance(window, tuple | list) or len(window) != 2):
        raise ValueError(f"window must be a (left, right) pair, -1 = unbounded; got {window!r}")
    left, right = (-1, -1) if window is None else window
    left, right = check.check_window("window left", left), check.check_window("window right", right)
    if causal:
        right = 0
    # numpy: this runs every call on a few small arrays, where torch's per-op cost dominates
    cq, ck = _host_cu(cu_q).numpy(), _host_cu(cu_k).numpy()
    seq = np.repeat(np.arange(n), np.diff(cq))  # each query's sequence
    first, last = ck[:-1][seq], ck[1:][seq] - 1
    aligned = np.arange(seq.size) + (ck[1:] - cq[1:])[seq]  # each query's own key
    if left >= 0:
        first = np.maximum(first, aligned - left)
    if right >= 0:
        last = np.minimum(last, aligned + right)
    return torch.from_numpy(first), torch.from_numpy(last)


def tile_visits(
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    rows: int,
    block_k: int = 64,
    *,
    causal: bool = False,
    window: tuple[int, int] | None = None,
) -> int:
    """How many kv tiles ``rows``-row query tiles visit under the packed batch's mask.

    A query tile that straddles sequences visits every kv tile between its rows' first and
    last keys (``backends.tile_heights``).
    """
    return tile_heights.tile_visits(
        _host_ranges(cu_seqlens_q, cu_seqlens_k, causal, window), rows, block_k
    )


def query_tile_costs(
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    *,
    block_k: int = 64,
    causal: bool = False,
    window: tuple[int, int] | None = None,
) -> dict[int, int]:
    """The modelled cost of each query-tile height, 64 rows down to 1, tallest first.

    Tiles much taller than the sequences compute mostly masked pairs (32 sequences of 16
    queries in 64-row tiles: 4x the pairs), while short tiles pay each kv tile's load for few
    rows: height b costs ``tile_visits`` · (``tile_heights.KV_TILE_COST_ROWS`` + b).
    """
    ranges = _host_ranges(cu_seqlens_q, cu_seqlens_k, causal, window)
    return tile_heights.tile_height_costs(ranges, block_k)


def query_tile_rows(
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    *,
    block_k: int = 64,
    causal: bool = False,
    window: tuple[int, int] | None = None,
) -> int:
    """Query rows per tile for a packed batch (a power of two, 1-64).

    The cheapest height of ``query_tile_costs``, ties going to the taller. The tiled backend
    runs it on CPU, capped at its default height for the packed length (16 rows up to 16
    queries, 32 up to 32).
    """
    ranges = _host_ranges(cu_seqlens_q, cu_seqlens_k, causal, window)
    return tile_heights.cheapest_tile_height(ranges, block_k)


def _host_ranges(
    cu_q: Tensor, cu_k: Tensor, causal: bool, window: tuple[int, int] | None
) -> np.ndarray:
    first, last = _key_ranges(cu_q, cu_k, causal, window)
    return torch.stack((first, last))[None].numpy()


def _host_cu(cu_seqlens: Tensor) -> Tensor:
    return cu_seqlens.detach().to(device="cpu", dtype=torch.int64)


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
        backend: as ``attnkit.attention`` ("auto" picks tiled on CPU). On CPU, tiled reads
            each query's range of keys in its kernels (no tile map) and runs many short
            sequences at query tiles sized to them (``query_tile_rows``).
        sinks: attention-sink logits (Hq,), as ``attnkit.attention``.
        return_lse: also return the LSE (Hq, total_q), FlashAttention's varlen layout.

    Returns:
        out (total_q, Hq, Dv) in q's dtype (and lse (Hq, total_q)).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be (total, H, D) for varlen_attention, got {shape}")
    cu_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    cu_k = cu_q
    if cu_seqlens_k is not None:
        cu_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    run = partial(
        attention,
        *(t.transpose(0, 1)[None] for t in (q, k, v)),  # one batch row (1, H, total, D)
        mask=varlen_mask(cu_q, cu_k, causal=causal, window=window),
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
