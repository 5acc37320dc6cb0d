"""The first backward kernel: dK and dV of one key tile over its non-empty query tiles.

FlashAttention-2's backward without atomics: P is recomputed from the saved LSE, dS = P∘(dP −
delta) with delta = rowsum(dO∘O) from the launcher's preprocess; dK, dV accumulate in fp32 in
the program that owns the key tile. Sᵀ is computed as K·Qᵀ so Pᵀ and dSᵀ multiply as they come.
"""

from __future__ import annotations

import triton
import triton.language as tl

from attnkit.backends.triton.kernel_parts import (
    LOG2E,
    at_slice,
    band_tile_span,
    cast,
    dot,
    on_band_edge,
    tile_scores,
    wide,
)


@triton.jit
def attention_backward_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV_,
    Q_NUM,
    Q_IDX,
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
    """One program per (kv tile, batch, kv head): sums over its G query heads and q tiles."""
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    Hkv = H // G
    b = pid_bk // Hkv
    hk = pid_bk % Hkv
    col_lo = pid_n * BLOCK_N
    col_hi = tl.minimum(col_lo + BLOCK_N, Lk) - 1
    cols = col_lo + tl.arange(0, BLOCK_N)
    dq_ = tl.arange(0, BLOCK_D)
    dv_ = tl.arange(0, BLOCK_DV)
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
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    mb = tl.where(Bm > 1, b, 0)
    seq_ranges = KEY_RANGES + mb * 2 * Lq  # RANGES: the sequence's first and last keys
    seq_keys = KEPT_KEYS + mb * Lk
    if BAND:  # the tiles of the queries whose band reaches these keys, the same for every head
        band_start, band_tiles = band_tile_span(col_lo - band_hi, col_hi - band_lo, Lq, BLOCK_M)
    for g in tl.static_range(G):  # unrolled: a runtime outer loop spilled registers
        h = hk * G + g
        mh = tl.where(Hm > 1, h, 0)
        col_base = wide(mb * Hm + mh, WIDE_OFFSETS) * nK + pid_n
        n_tiles = band_tiles if BAND else tl.load(Q_NUM + col_base)
        for it in range(0, n_tiles):
            if BAND:
                qt = band_start + it
                row_hi = tl.minimum(qt * BLOCK_M + BLOCK_M, Lq) - 1
                masked = on_band_edge(qt * BLOCK_M, row_hi, col_lo, col_hi, band_lo, band_hi)
                tile_bits = BITS
            else:
                qt = tl.load(Q_IDX + col_base * nQ + it)
                tile = tl.load(TILE + (wide(mb * Hm + mh, WIDE_OFFSETS) * nQ + qt) * nK + pid_n)
                masked = tile >= 0
                tile_bits = BITS + wide(tl.maximum(tile, 0), WIDE_OFFSETS) * BLOCK_M * BLOCK_N
            rows = qt * BLOCK_M + tl.arange(0, BLOCK_M)
            rmask = rows < Lq
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
            lse = tl.load(LSE + wide(b * H + h, WIDE_OFFSETS) * Lq + rows, mask=rmask, other=0.0)
            delta = tl.load(
                DELTA + wide(b * H + h, WIDE_OFFSETS) * Lq + rows, mask=rmask, other=0.0
            )
            s_t, t_t = tile_scores(
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
                True,
                BLOCK_M,
                BLOCK_N,
                False,
                BAND,
                RANGES,
            )
            lse2 = tl.where(lse == float("-inf"), 0.0, lse) * LOG2E
            p_t = tl.exp2(s_t - lse2[None, :])  # Pᵀ (BLOCK_N, BLOCK_M)
            dv += dot(cast(p_t, do.dtype, DOT_PRECISION), do, DOT_PRECISION)
            dp_t = dot(v, tl.trans(do), DOT_PRECISION).to(tl.float32)
            ds_t = p_t * (dp_t - delta[None, :])
            if HAS_SOFTCAP:
                ds_t = ds_t * (1.0 - t_t * t_t)
            dk += dot(cast(ds_t, q.dtype, DOT_PRECISION), q, DOT_PRECISION)
    dk = dk * sm_scale
    tl.store(
        at_slice(DK, b, hk, skb, skh, WIDE_OFFSETS) + cols[:, None] * skn + dq_[None, :],
        cast(dk, DK.dtype.element_ty, DOT_PRECISION),
        mask=(cols[:, None] < Lk) & (dq_[None, :] < D),
    )
    tl.store(
        at_slice(DV_, b, hk, svb, svh, WIDE_OFFSETS) + cols[:, None] * svn + dv_[None, :],
        cast(dv, DV_.dtype.element_ty, DOT_PRECISION),
        mask=(cols[:, None] < Lk) & (dv_[None, :] < DV),
    )
