"""The second backward kernel: dQ of one query tile over its non-empty kv tiles.

Recomputes P from the saved LSE and dS = P∘(dP − delta) as the dK/dV kernel does, walking the
kv tiles as the forward does; dQ accumulates in fp32 in the program that owns the query tile.
"""

from __future__ import annotations

import triton
import triton.language as tl

from attnkit.backends.triton.kernel_parts import (
    LOG2E,
    at_slice,
    cast,
    dot,
    kv_tile,
    kv_tile_count,
    tile_scores,
    wide,
)


@triton.jit
def attention_backward_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    KV_NUM,
    KV_IDX,
    TILE,
    BITS,
    KEY_RANGES,
    KEPT_KEYS,
    SLOPES,
    sm_scale,
    softcap,
    Lq,
    Lk,
    q_off,
    band_lo,
    band_hi,
    H,
    G: tl.constexpr,  # query heads per kv head: one compile per GQA group size
    D,
    DV,
    Bm,
    Hm,
    nQ,
    nK,
    sqb,
    sqh,
    sqm,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    sdob,
    sdoh,
    sdom,
    HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr,
    BAND: tl.constexpr,
    RANGES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """One program per (q tile, batch, query head), walking the same kv tiles as forward."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    row_lo = pid_m * BLOCK_M
    row_hi = tl.minimum(row_lo + BLOCK_M, Lq) - 1
    rows = row_lo + tl.arange(0, BLOCK_M)
    rmask = rows < Lq
    dq_ = tl.arange(0, BLOCK_D)
    dv_ = tl.arange(0, BLOCK_DV)
    q = tl.load(
        at_slice(Q, b, h, sqb, sqh, WIDE_OFFSETS) + rows[:, None] * sqm + dq_[None, :],
        mask=rmask[:, None] & (dq_[None, :] < D),
        other=0.0,
    )
    do = tl.load(
        at_slice(DO, b, h, sdob, sdoh, WIDE_OFFSETS) + rows[:, None] * sdom + dv_[None, :],
        mask=rmask[:, None] & (dv_[None, :] < DV),
        other=0.0,
    )
    lse = tl.load(LSE + wide(pid_bh, WIDE_OFFSETS) * Lq + rows, mask=rmask, other=0.0)
    delta = tl.load(DELTA + wide(pid_bh, WIDE_OFFSETS) * Lq + rows, mask=rmask, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse) * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    mb = tl.where(Bm > 1, b, 0)
    seq_ranges = KEY_RANGES + mb * 2 * Lq  # RANGES: the sequence's first and last keys
    seq_keys = KEPT_KEYS + mb * Lk
    mh = tl.where(Hm > 1, h, 0)
    row_base = wide(mb * Hm + mh, WIDE_OFFSETS) * nQ + pid_m
    band_start, n_tiles = kv_tile_count(
        row_lo, row_hi, row_base, KV_NUM, Lk, band_lo, band_hi, BAND, BLOCK_N
    )
    for it in range(0, n_tiles):
        kt, masked, tile_bits = kv_tile(
            it,
            band_start,
            row_base,
            row_lo,
            row_hi,
            KV_IDX,
            TILE,
            BITS,
            nK,
            Lk,
            band_lo,
            band_hi,
            WIDE_OFFSETS,
            BAND,
            BLOCK_M,
            BLOCK_N,
        )
        cols = kt * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.load(
            at_slice(K, b, hk, skb, skh, WIDE_OFFSETS) + cols[:, None] * skn + dq_[None, :],
            mask=(cols[:, None] < Lk) & (dq_[None, :] < D),
            other=0.0,
        )
        v = tl.load(
            at_slice(V, b, hk, svb, svh, WIDE_OFFSETS) + cols[:, None] * svn + dv_[None, :],
            mask=(cols[:, None] < Lk) & (dv_[None, :] < DV),
            other=0.0,
        )
        s, t = tile_scores(
            q,
            k,
            rows,
            cols,
            h,
            Lq,
            Lk,
            q_off,
            sm_scale,
            SLOPES,
            softcap,
            tile_bits,
            seq_ranges,
            seq_keys,
            masked,
            band_lo,
            band_hi,
            HAS_ALIBI,
            HAS_SOFTCAP,
            DOT_PRECISION,
            False,
            BLOCK_M,
            BLOCK_N,
            False,
            BAND,
            RANGES,
        )
        p = tl.exp2(s - lse2[:, None])
        dp = dot(do, tl.trans(v), DOT_PRECISION).to(tl.float32)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += dot(cast(ds, k.dtype, DOT_PRECISION), k, DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(
        at_slice(DQ, b, h, sqb, sqh, WIDE_OFFSETS) + rows[:, None] * sqm + dq_[None, :],
        cast(dq, DQ.dtype.element_ty, DOT_PRECISION),
        mask=rmask[:, None] & (dq_[None, :] < D),
    )
