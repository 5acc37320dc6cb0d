"""The forward kernel: flash attention over a query tile's non-empty kv tiles (FlashAttention-2).

Online softmax in fp32 (running max, sum and accumulator; O rescaled only by exp2(m_old - m_new),
divided by the sum once at the end); writes the output and the LSE the backward pass needs.
Block sparsity: a program walks only the kv tiles that its BlockMask row lists as non-empty
(or, for a causal or sliding-window mask, the band's tiles found from its own bounds); partial
tiles are masked (from their bitmaps, the band, or each query's range of keys), full tiles are
not. ALiBi and softcap apply in-kernel, before the mask.
"""

from __future__ import annotations

import triton
import triton.language as tl

from attnkit.backends.triton.kernel_parts import (
    LN2,
    at_slice,
    cast,
    dot,
    kv_tile,
    kv_tile_count,
    tile_scores,
    wide,
)


@triton.jit
def attention_forward_kernel(
    Q,
    K,
    V,
    Out,
    LSE,
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
    sob,
    soh,
    som,
    sos,
    HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr,  # 64-bit offsets past the (batch, head) slice
    BAND: tl.constexpr,  # the mask is the band band_lo <= j - i <= band_hi: no tile lists
    RANGES: tl.constexpr,  # partial tiles are masked from key ranges, not bitmaps
    SPLIT_KV: tl.constexpr,
    PACK_GQA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """One program per (q tile, batch, query head, split): online softmax over its kv tiles.

    With SPLIT_KV, S splits (grid axis 2; FlashDecoding): each program takes an S-th of its
    row's non-empty kv tiles and writes a partial output (split stride ``sos``) and LSE, which
    the launcher merges. Without, one program takes the whole row (a compile of its own: the
    split's indexing cost registers that some large tiles do not have to spare).
    With PACK_GQA (decoding; grid axis 1 is batch × kv head) one tile holds the Lq queries of
    all G query heads of a kv head, row g·Lq + i for head g's query i: their keys and values
    are read once, not G times, and a decoding step's tile has 16 rows, not the forward's 128.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    dq = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    if PACK_GQA:
        b = pid_bh // (H // G)
        hk = pid_bh % (H // G)
        packed = tl.arange(0, BLOCK_M)
        row_ok = packed < G * Lq
        h = tl.where(row_ok, hk * G + packed // Lq, hk * G)  # each row's query head
        rows = packed % Lq
        row_lo = 0  # the tile's first and last query
        row_hi = Lq - 1
        q_ptrs = at_slice(Q, b, h[:, None], sqb, sqh, WIDE_OFFSETS)  # each row's head
    else:
        b = pid_bh // H
        h = pid_bh % H
        hk = h // G
        row_lo = pid_m * BLOCK_M
        row_hi = tl.minimum(row_lo + BLOCK_M, Lq) - 1
        rows = row_lo + tl.arange(0, BLOCK_M)
        row_ok = rows < Lq
        q_ptrs = at_slice(Q, b, h, sqb, sqh, WIDE_OFFSETS)
    q = tl.load(
        q_ptrs + rows[:, None] * sqm + dq[None, :],
        mask=row_ok[:, None] & (dq[None, :] < D),
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    mb = tl.where(Bm > 1, b, 0)
    seq_ranges = KEY_RANGES + mb * 2 * Lq  # RANGES: the sequence's first and last keys
    seq_keys = KEPT_KEYS + mb * Lk
    # the launcher packs heads only under a mask that is the same for every head
    mh = 0 if PACK_GQA else tl.where(Hm > 1, h, 0)
    row_base = wide(mb * Hm + mh, WIDE_OFFSETS) * nQ + pid_m
    band_start, n_tiles = kv_tile_count(
        row_lo, row_hi, row_base, KV_NUM, Lk, band_lo, band_hi, BAND, BLOCK_N
    )
    first = 0
    if SPLIT_KV:
        pid_s = tl.program_id(2)
        per_split = tl.cdiv(n_tiles, tl.num_programs(2))  # from the row's own count: balanced
        first = pid_s * per_split
        n_tiles = tl.minimum(first + per_split, n_tiles)
        Out += wide(pid_s, WIDE_OFFSETS) * sos
        LSE += wide(pid_s, WIDE_OFFSETS) * (tl.num_programs(1) * (G if PACK_GQA else 1)) * Lq
    for it in range(first, n_tiles):
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
            at_slice(K, b, hk, skb, skh, WIDE_OFFSETS) + cols[:, None] * skn + dq[None, :],
            mask=(cols[:, None] < Lk) & (dq[None, :] < D),
            other=0.0,
        )
        v = tl.load(
            at_slice(V, b, hk, svb, svh, WIDE_OFFSETS) + cols[:, None] * svn + dv[None, :],
            mask=(cols[:, None] < Lk) & (dv[None, :] < DV),
            other=0.0,
        )
        s, _t = tile_scores(
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
            PACK_GQA,
            BAND,
            RANGES,
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        p = tl.exp2(s - shift[:, None])
        alpha = tl.exp2(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(cast(p, v.dtype, DOT_PRECISION), v, DOT_PRECISION)
        m_i = m_new
    shift = tl.where(m_i == float("-inf"), 0.0, m_i)
    # l_i is 0 only for rows with no key; NaN scores make it NaN, and out and LSE with it
    has_key = l_i != 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, (shift + tl.log2(tl.where(has_key, l_i, 1.0))) * LN2, float("-inf"))
    heads = h[:, None] if PACK_GQA else h
    tl.store(
        at_slice(Out, b, heads, sob, soh, WIDE_OFFSETS) + rows[:, None] * som + dv[None, :],
        cast(out, Out.dtype.element_ty, DOT_PRECISION),
        mask=row_ok[:, None] & (dv[None, :] < DV),
    )
    lse_row = b * H + h if PACK_GQA else pid_bh
    tl.store(LSE + wide(lse_row, WIDE_OFFSETS) * Lq + rows, lse, mask=row_ok)
