"""Triton kernels of the triton backend: flash-attention forward and backward (dK/dV, dQ).

Follows the Triton fused-attention tutorial: exp2 with log2(e) folded into the scale, fp32
running max / sum / accumulator, LSE saved for the backward pass. Block sparsity: each
program walks only the kv tiles (forward, dQ) or q tiles (dK/dV) that its BlockMask row or
column lists as non-empty; partial tiles are masked by a precomputed bitmap, full tiles are
not masked at all. A causal or sliding-window mask (BAND) needs no lists: a program's
tiles are the band's, found from its own bounds, and only tiles that the band's edge
crosses are masked, by comparing indices. ALiBi and softcap are applied in-kernel (natural
units, before masking).
DOT_PRECISION is "ieee" for fp32 inputs unless torch allows TF32 matmuls (see the launcher),
and "widen" for bf16 under the interpreter (see ``_dot``).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _wide(x, WIDE: tl.constexpr):
    """x in 64 bits where a tensor's offsets pass 2^31 elements (``WIDE``), else as it is.

    Only large tensors pay for 64-bit arithmetic: it costs registers that the dK/dV kernel's
    largest tiles do not have to spare (16 B more spill on sm_90 at D=128 with ALiBi+softcap).
    """
    if WIDE:  # one return: the compiler types the returns of both branches alike
        x = x.to(tl.int64)
    return x


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    """a @ b in fp32. "widen" multiplies fp32 copies of 16-bit tiles, still rounded as they were.

    Triton's interpreter keeps bf16 as its bit patterns and multiplies those in tl.dot
    (triton-lang/triton#11584), so bf16 tiles are widened first there; on a GPU this never runs.
    """
    if DOT_PRECISION == "widen":
        s = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        s = tl.dot(a, b, input_precision=DOT_PRECISION)
    return s


@triton.jit
def _to(x, dtype: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """fp32 x rounded to ``dtype`` (a tile for tl.dot, or a result to store), to nearest even.

    A GPU rounds so. The interpreter truncates casts to bf16, which biases every P and output
    it rounds, so there ("widen") x is first rounded in its bits, as c10::BFloat16 does: the
    truncation that follows is then exact.
    """
    if DOT_PRECISION == "widen":
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _slice(ptr, b, h, stride_b, stride_h, WIDE: tl.constexpr):
    """``ptr`` moved to the (b, h) slice; ``h`` (BLOCK_M, 1) moves each row to its head's.

    Offsets within one slice stay 32-bit: the launcher refuses slices that reach 2^31 elements.
    """
    return ptr + _wide(b, WIDE) * stride_b + _wide(h, WIDE) * stride_h


@triton.jit
def _band_tiles(first, last, length, BLOCK: tl.constexpr):
    """The first tile of ``BLOCK`` indices, and how many, that hold ``first`` … ``last``.

    Clamped to the axis of ``length``; no tile where nothing of it is left.
    """
    first = tl.maximum(first, 0)
    last = tl.minimum(last, length - 1)
    start = first // BLOCK
    return start, tl.where(first <= last, tl.maximum(last, 0) // BLOCK - start + 1, 0)


@triton.jit
def _on_band_edge(row_lo, row_hi, col_lo, col_hi, band_lo, band_hi):
    """Whether the band lo <= j - i <= hi leaves out a pair of the tile: it needs masking.

    The tile holds queries i in row_lo … row_hi and keys j in col_lo … col_hi.
    """
    return (col_lo - row_hi < band_lo) | (col_hi - row_lo > band_hi)


@triton.jit
def _kv_tile_count(
    row_lo,
    row_hi,
    row_base,
    KV_NUM,
    Lk,
    band_lo,
    band_hi,
    BAND: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The first kv tile and how many a query tile visits (forward, dQ).

    The tiles of the keys its rows' band reaches (BAND; the first is ``_kv_tile``'s
    ``band_start``), else the count of its tile list at ``row_base``.
    """
    start = 0
    if BAND:
        start, count = _band_tiles(row_lo + band_lo, row_hi + band_hi, Lk, BLOCK_N)
    else:
        count = tl.load(KV_NUM + row_base)
    return start, count


@triton.jit
def _kv_tile(
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
    WIDE: tl.constexpr,
    BAND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The ``it``-th kv tile of a query tile (forward, dQ), whether it is masked, its bitmap.

    The band's tiles count from ``band_start`` (BAND); else the tile list at ``row_base``
    names them.
    """
    if BAND:
        kt = band_start + it
        col_hi = tl.minimum(kt * BLOCK_N + BLOCK_N, Lk) - 1
        masked = _on_band_edge(row_lo, row_hi, kt * BLOCK_N, col_hi, band_lo, band_hi)
        tile_bits = BITS
    else:
        kt = tl.load(KV_IDX + row_base * nK + it)
        tile = tl.load(TILE + row_base * nK + kt)
        masked = tile >= 0
        tile_bits = BITS + _wide(tl.maximum(tile, 0), WIDE) * BLOCK_M * BLOCK_N
    return kt, masked, tile_bits


@triton.jit
def _in_band(s, qi, ki, band_lo, band_hi):
    """Scores ``s`` with -inf where key ki lies outside the band of query qi."""
    d = ki - qi
    return tl.where((d >= band_lo) & (d <= band_hi), s, float("-inf"))


@triton.jit
def _scores(
    q,
    k,
    rows,
    cols,
    h,
    Lk,
    q_off,
    sm_scale,
    slope_ptr,
    softcap,
    tile_bits_ptr,
    masked,
    band_lo,
    band_hi,
    HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PACKED_GQA: tl.constexpr,
    BAND: tl.constexpr,
):
    """Scores of one tile in log2 units, and tanh(s/c) for the softcap gradient.

    q (BLOCK_M, D), k (BLOCK_N, D); rows/cols: absolute query/key indices. Gives S (BLOCK_M,
    BLOCK_N), or with TRANSPOSED Sᵀ (BLOCK_N, BLOCK_M) computed as k·qᵀ: the dK/dV kernel
    multiplies Pᵀ and dSᵀ as they come, instead of transposing register tiles.
    With PACKED_GQA the tile's rows are several query heads' queries 0 … Lq-1 (the forward's
    packed decoding tile): ``h`` holds each row's head, and a row's bitmap row is its query's.
    ``masked``: whether the tile needs its mask, the band band_lo <= j - i <= band_hi (BAND)
    or its bitmap at ``tile_bits_ptr``.
    """
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    if TRANSPOSED:
        s = _dot(k, tl.trans(q), DOT_PRECISION)
        qi, ki = rows[None, :], cols[:, None]
        bit_offsets = r[None, :] * BLOCK_N + c[:, None]
    else:
        s = _dot(q, tl.trans(k), DOT_PRECISION)
        qi, ki = rows[:, None], cols[None, :]
        if PACKED_GQA:  # the packed tile is the first query tile: bitmap row = query index
            r = rows
        bit_offsets = r[:, None] * BLOCK_N + c[None, :]
    s = s * sm_scale  # natural units: score_mods see these
    if HAS_ALIBI:
        slope = tl.load(slope_ptr + h)
        if PACKED_GQA:
            slope = slope[:, None]
        s = s - slope * tl.abs(qi + q_off - ki).to(tl.float32)
    t = s
    if HAS_SOFTCAP:
        t = 2.0 / (1.0 + tl.exp(-2.0 * s / softcap)) - 1.0  # tanh(s / c)
        s = softcap * t
    # Padding rows (past Lq) need no mask: they are never stored and carry zero dO. The
    # bitmap is widened to fp32 before the select: an i1 tile would have to pass through
    # shared memory in the FMA (fp32 "ieee") dot layouts, which does not compile for sm_80.
    s = tl.where(ki < Lk, s * 1.4426950408889634, float("-inf"))
    if BAND:
        # With ALiBi, which already computes a distance per score, every tile is masked: the
        # branch kept another tile live across it and spilled up to 128 B (sm_90's D=64 dQ,
        # with softcap and GQA too). Without, only the band's edge tiles are.
        if HAS_ALIBI:  # noqa: SIM114 (a compile-time choice: no branch, unlike `or masked`)
            s = _in_band(s, qi, ki, band_lo, band_hi)
        elif masked:
            s = _in_band(s, qi, ki, band_lo, band_hi)
    elif masked:
        bits = tl.load(tile_bits_ptr + bit_offsets).to(tl.float32)
        s = tl.where(bits != 0.0, s, float("-inf"))
    return s, t


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
        q_ptrs = _slice(Q, b, h[:, None], sqb, sqh, WIDE_OFFSETS)  # each row's head
    else:
        b = pid_bh // H
        h = pid_bh % H
        hk = h // G
        row_lo = pid_m * BLOCK_M
        row_hi = tl.minimum(row_lo + BLOCK_M, Lq) - 1
        rows = row_lo + tl.arange(0, BLOCK_M)
        row_ok = rows < Lq
        q_ptrs = _slice(Q, b, h, sqb, sqh, WIDE_OFFSETS)
    q = tl.load(
        q_ptrs + rows[:, None] * sqm + dq[None, :],
        mask=row_ok[:, None] & (dq[None, :] < D),
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    mb = tl.where(Bm > 1, b, 0)
    # the launcher packs heads only under a mask that is the same for every head
    mh = 0 if PACK_GQA else tl.where(Hm > 1, h, 0)
    row_base = _wide(mb * Hm + mh, WIDE_OFFSETS) * nQ + pid_m
    band_start, n_tiles = _kv_tile_count(
        row_lo, row_hi, row_base, KV_NUM, Lk, band_lo, band_hi, BAND, BLOCK_N
    )
    first = 0
    if SPLIT_KV:
        pid_s = tl.program_id(2)
        per_split = tl.cdiv(n_tiles, tl.num_programs(2))  # from the row's own count: balanced
        first = pid_s * per_split
        n_tiles = tl.minimum(first + per_split, n_tiles)
        Out += _wide(pid_s, WIDE_OFFSETS) * sos
        LSE += _wide(pid_s, WIDE_OFFSETS) * (tl.num_programs(1) * (G if PACK_GQA else 1)) * Lq
    for it in range(first, n_tiles):
        kt, masked, tile_bits = _kv_tile(
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
            _slice(K, b, hk, skb, skh, WIDE_OFFSETS) + cols[:, None] * skn + dq[None, :],
            mask=(cols[:, None] < Lk) & (dq[None, :] < D),
            other=0.0,
        )
        v = tl.load(
            _slice(V, b, hk, svb, svh, WIDE_OFFSETS) + cols[:, None] * svn + dv[None, :],
            mask=(cols[:, None] < Lk) & (dv[None, :] < DV),
            other=0.0,
        )
        s, _t = _scores(
            q,
            k,
            rows,
            cols,
            h,
            Lk,
            q_off,
            sm_scale,
            SLOPES,
            softcap,
            tile_bits,
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
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        p = tl.exp2(s - shift[:, None])
        alpha = tl.exp2(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(_to(p, v.dtype, DOT_PRECISION), v, DOT_PRECISION)
        m_i = m_new
    shift = tl.where(m_i == float("-inf"), 0.0, m_i)
    # l_i is 0 only for rows with no key; NaN scores make it NaN, and out and LSE with it
    has_key = l_i != 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(
        has_key, (shift + tl.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453, float("-inf")
    )
    heads = h[:, None] if PACK_GQA else h
    tl.store(
        _slice(Out, b, heads, sob, soh, WIDE_OFFSETS) + rows[:, None] * som + dv[None, :],
        _to(out, Out.dtype.element_ty, DOT_PRECISION),
        mask=row_ok[:, None] & (dv[None, :] < DV),
    )
    lse_row = b * H + h if PACK_GQA else pid_bh
    tl.store(LSE + _wide(lse_row, WIDE_OFFSETS) * Lq + rows, lse, mask=row_ok)


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
        _slice(K, b, hk, skb, skh, WIDE_OFFSETS) + cols[:, None] * skn + dq_[None, :],
        mask=(cols[:, None] < Lk) & (dq_[None, :] < D),
        other=0.0,
    )
    v = tl.load(
        _slice(V, b, hk, svb, svh, WIDE_OFFSETS) + cols[:, None] * svn + dv_[None, :],
        mask=(cols[:, None] < Lk) & (dv_[None, :] < DV),
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    mb = tl.where(Bm > 1, b, 0)
    if BAND:  # the tiles of the queries whose band reaches these keys, the same for every head
        band_start, band_tiles = _band_tiles(col_lo - band_hi, col_hi - band_lo, Lq, BLOCK_M)
    for g in tl.static_range(G):  # unrolled: a runtime outer loop spilled registers
        h = hk * G + g
        mh = tl.where(Hm > 1, h, 0)
        col_base = _wide(mb * Hm + mh, WIDE_OFFSETS) * nK + pid_n
        n_tiles = band_tiles if BAND else tl.load(Q_NUM + col_base)
        for it in range(0, n_tiles):
            if BAND:
                qt = band_start + it
                row_hi = tl.minimum(qt * BLOCK_M + BLOCK_M, Lq) - 1
                masked = _on_band_edge(qt * BLOCK_M, row_hi, col_lo, col_hi, band_lo, band_hi)
                tile_bits = BITS
            else:
                qt = tl.load(Q_IDX + col_base * nQ + it)
                tile = tl.load(TILE + (_wide(mb * Hm + mh, WIDE_OFFSETS) * nQ + qt) * nK + pid_n)
                masked = tile >= 0
                tile_bits = BITS + _wide(tl.maximum(tile, 0), WIDE_OFFSETS) * BLOCK_M * BLOCK_N
            rows = qt * BLOCK_M + tl.arange(0, BLOCK_M)
            rmask = rows < Lq
            q = tl.load(
                _slice(Q, b, h, sqb, sqh, WIDE_OFFSETS) + rows[:, None] * sqm + dq_[None, :],
                mask=rmask[:, None] & (dq_[None, :] < D),
                other=0.0,
            )
            do = tl.load(
                _slice(DO, b, h, sdob, sdoh, WIDE_OFFSETS) + rows[:, None] * sdom + dv_[None, :],
                mask=rmask[:, None] & (dv_[None, :] < DV),
                other=0.0,
            )
            lse = tl.load(LSE + _wide(b * H + h, WIDE_OFFSETS) * Lq + rows, mask=rmask, other=0.0)
            delta = tl.load(
                DELTA + _wide(b * H + h, WIDE_OFFSETS) * Lq + rows, mask=rmask, other=0.0
            )
            s_t, t_t = _scores(
                q,
                k,
                rows,
                cols,
                h,
                Lk,
                q_off,
                sm_scale,
                SLOPES,
                softcap,
                tile_bits,
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
            )
            lse2 = tl.where(lse == float("-inf"), 0.0, lse) * 1.4426950408889634
            p_t = tl.exp2(s_t - lse2[None, :])  # Pᵀ (BLOCK_N, BLOCK_M)
            dv += _dot(_to(p_t, do.dtype, DOT_PRECISION), do, DOT_PRECISION)
            dp_t = _dot(v, tl.trans(do), DOT_PRECISION).to(tl.float32)
            ds_t = p_t * (dp_t - delta[None, :])
            if HAS_SOFTCAP:
                ds_t = ds_t * (1.0 - t_t * t_t)
            dk += _dot(_to(ds_t, q.dtype, DOT_PRECISION), q, DOT_PRECISION)
    dk = dk * sm_scale
    tl.store(
        _slice(DK, b, hk, skb, skh, WIDE_OFFSETS) + cols[:, None] * skn + dq_[None, :],
        _to(dk, DK.dtype.element_ty, DOT_PRECISION),
        mask=(cols[:, None] < Lk) & (dq_[None, :] < D),
    )
    tl.store(
        _slice(DV_, b, hk, svb, svh, WIDE_OFFSETS) + cols[:, None] * svn + dv_[None, :],
        _to(dv, DV_.dtype.element_ty, DOT_PRECISION),
        mask=(cols[:, None] < Lk) & (dv_[None, :] < DV),
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
        _slice(Q, b, h, sqb, sqh, WIDE_OFFSETS) + rows[:, None] * sqm + dq_[None, :],
        mask=rmask[:, None] & (dq_[None, :] < D),
        other=0.0,
    )
    do = tl.load(
        _slice(DO, b, h, sdob, sdoh, WIDE_OFFSETS) + rows[:, None] * sdom + dv_[None, :],
        mask=rmask[:, None] & (dv_[None, :] < DV),
        other=0.0,
    )
    lse = tl.load(LSE + _wide(pid_bh, WIDE_OFFSETS) * Lq + rows, mask=rmask, other=0.0)
    delta = tl.load(DELTA + _wide(pid_bh, WIDE_OFFSETS) * Lq + rows, mask=rmask, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse) * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    mb = tl.where(Bm > 1, b, 0)
    mh = tl.where(Hm > 1, h, 0)
    row_base = _wide(mb * Hm + mh, WIDE_OFFSETS) * nQ + pid_m
    band_start, n_tiles = _kv_tile_count(
        row_lo, row_hi, row_base, KV_NUM, Lk, band_lo, band_hi, BAND, BLOCK_N
    )
    for it in range(0, n_tiles):
        kt, masked, tile_bits = _kv_tile(
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
            _slice(K, b, hk, skb, skh, WIDE_OFFSETS) + cols[:, None] * skn + dq_[None, :],
            mask=(cols[:, None] < Lk) & (dq_[None, :] < D),
            other=0.0,
        )
        v = tl.load(
            _slice(V, b, hk, svb, svh, WIDE_OFFSETS) + cols[:, None] * svn + dv_[None, :],
            mask=(cols[:, None] < Lk) & (dv_[None, :] < DV),
            other=0.0,
        )
        s, t = _scores(
            q,
            k,
            rows,
            cols,
            h,
            Lk,
            q_off,
            sm_scale,
            SLOPES,
            softcap,
            tile_bits,
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
        )
        p = tl.exp2(s - lse2[:, None])
        dp = _dot(do, tl.trans(v), DOT_PRECISION).to(tl.float32)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += _dot(_to(ds, k.dtype, DOT_PRECISION), k, DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(
        _slice(DQ, b, h, sqb, sqh, WIDE_OFFSETS) + rows[:, None] * sqm + dq_[None, :],
        _to(dq, DQ.dtype.element_ty, DOT_PRECISION),
        mask=rmask[:, None] & (dq_[None, :] < D),
    )
