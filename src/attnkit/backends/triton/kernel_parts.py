"""The @triton.jit helpers the three kernels share: offsets, dots, tile walks, one tile's scores.

Follows the Triton fused-attention tutorial: scores in log2 units (exp2 with log2(e) folded into
the scale), fp32 statistics. DOT_PRECISION is "ieee" for fp32 inputs unless torch allows TF32
matmuls (``calls.dot_precision``), and "widen" for bf16 under the interpreter (see ``dot``).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def wide(x, WIDE: tl.constexpr):
    """x in 64 bits where a tensor's offsets pass 2^31 elements (``WIDE``), else as it is.

    Only large tensors pay for 64-bit arithmetic: it costs registers that the dK/dV kernel's
    largest tiles do not have to spare (16 B more spill on sm_90 at D=128 with ALiBi+softcap).
    """
    if WIDE:  # one return: the compiler types the returns of both branches alike
        x = x.to(tl.int64)
    return x


@triton.jit
def dot(a, b, DOT_PRECISION: tl.constexpr):
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
def cast(x, dtype: tl.constexpr, DOT_PRECISION: tl.constexpr):
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
def at_slice(ptr, b, h, stride_b, stride_h, WIDE: tl.constexpr):
    """``ptr`` moved to the (b, h) slice; ``h`` (BLOCK_M, 1) moves each row to its head's.

    Offsets within one slice stay 32-bit: the launcher refuses slices that reach 2^31 elements.
    """
    return ptr + wide(b, WIDE) * stride_b + wide(h, WIDE) * stride_h


@triton.jit
def band_tile_span(first, last, length, BLOCK: tl.constexpr):
    """The first tile of ``BLOCK`` indices, and how many, that hold ``first`` … ``last``.

    Clamped to the axis of ``length``; no tile where nothing of it is left.
    """
    first = tl.maximum(first, 0)
    last = tl.minimum(last, length - 1)
    start = first // BLOCK
    return start, tl.where(first <= last, tl.maximum(last, 0) // BLOCK - start + 1, 0)


@triton.jit
def on_band_edge(row_lo, row_hi, col_lo, col_hi, band_lo, band_hi):
    """Whether the band lo <= j - i <= hi leaves out a pair of the tile: it needs masking.

    The tile holds queries i in row_lo … row_hi and keys j in col_lo … col_hi.
    """
    return (col_lo - row_hi < band_lo) | (col_hi - row_lo > band_hi)


@triton.jit
def kv_tile_count(
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

    The tiles of the keys its rows' band reaches (BAND; the first is ``kv_tile``'s
    ``band_start``), else the count of its tile list at ``row_base``.
    """
    start = 0
    if BAND:
        start, count = band_tile_span(row_lo + band_lo, row_hi + band_hi, Lk, BLOCK_N)
    else:
        count = tl.load(KV_NUM + row_base)
    return start, count


@triton.jit
def kv_tile(
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
        masked = on_band_edge(row_lo, row_hi, kt * BLOCK_N, col_hi, band_lo, band_hi)
        tile_bits = BITS
    else:
        kt = tl.load(KV_IDX + row_base * nK + it)
        tile = tl.load(TILE + row_base * nK + kt)
        masked = tile >= 0
        tile_bits = BITS + wide(tl.maximum(tile, 0), WIDE) * BLOCK_M * BLOCK_N
    return kt, masked, tile_bits


@triton.jit
def in_band(s, qi, ki, band_lo, band_hi):
    """Scores ``s`` with -inf where key ki lies outside the band of query qi."""
    d = ki - qi
    return tl.where((d >= band_lo) & (d <= band_hi), s, float("-inf"))


@triton.jit
def in_ranges(s, rows, cols, ranges_ptr, keys_ptr, Lq, Lk, TRANSPOSED: tl.constexpr):
    """Scores ``s`` with -inf where a key lies outside its query's range or is not kept.

    ``ranges_ptr``: the sequence's first keys (Lq) then last keys (Lq); ``keys_ptr``: its
    kept keys (Lk). Rows past Lq keep none, columns past Lk are not kept.
    """
    first = tl.load(ranges_ptr + rows, mask=rows < Lq, other=1)
    last = tl.load(ranges_ptr + Lq + rows, mask=rows < Lq, other=0)
    kept = tl.load(keys_ptr + cols, mask=cols < Lk, other=0) != 0
    if TRANSPOSED:  # s is (keys, queries)
        keep = (cols[:, None] >= first[None, :]) & (cols[:, None] <= last[None, :])
        keep = keep & kept[:, None]
    else:
        keep = (cols[None, :] >= first[:, None]) & (cols[None, :] <= last[:, None])
        keep = keep & kept[None, :]
    return tl.where(keep, s, float("-inf"))


@triton.jit
def tile_scores(
    q,
    k,
    rows,
    cols,
    h,
    Lq,
    Lk,
    q_off,
    sm_scale,
    slope_ptr,
    softcap,
    tile_bits_ptr,
    ranges_ptr,
    keys_ptr,
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
    RANGES: tl.constexpr,
):
    """Scores of one tile in log2 units, and tanh(s/c) for the softcap gradient.

    q (BLOCK_M, D), k (BLOCK_N, D); rows/cols: absolute query/key indices. Gives S (BLOCK_M,
    BLOCK_N), or with TRANSPOSED Sᵀ (BLOCK_N, BLOCK_M) computed as k·qᵀ: the dK/dV kernel
    multiplies Pᵀ and dSᵀ as they come, instead of transposing register tiles.
    With PACKED_GQA the tile's rows are several query heads' queries 0 … Lq-1 (the forward's
    packed decoding tile): ``h`` holds each row's head, and a row's bitmap row is its query's.
    ``masked``: whether the tile needs its mask: the band band_lo <= j - i <= band_hi (BAND),
    the sequence's key ranges and kept keys at ``ranges_ptr`` / ``keys_ptr`` (RANGES), or its
    bitmap at ``tile_bits_ptr``.
    """
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    if TRANSPOSED:
        s = dot(k, tl.trans(q), DOT_PRECISION)
        qi, ki = rows[None, :], cols[:, None]
        bit_offsets = r[None, :] * BLOCK_N + c[:, None]
    else:
        s = dot(q, tl.trans(k), DOT_PRECISION)
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
    s = tl.where(ki < Lk, s * LOG2E, float("-inf"))
    if BAND:
        # With ALiBi, which already computes a distance per score, every tile is masked: the
        # branch kept another tile live across it and spilled up to 128 B (sm_90's D=64 dQ,
        # with softcap and GQA too). Without, only the band's edge tiles are.
        if HAS_ALIBI:  # noqa: SIM114 (a compile-time choice: no branch, unlike `or masked`)
            s = in_band(s, qi, ki, band_lo, band_hi)
        elif masked:
            s = in_band(s, qi, ki, band_lo, band_hi)
    elif RANGES:
        if masked:
            s = in_ranges(s, rows, cols, ranges_ptr, keys_ptr, Lq, Lk, TRANSPOSED)
    elif masked:
        bits = tl.load(tile_bits_ptr + bit_offsets).to(tl.float32)
        s = tl.where(bits != 0.0, s, float("-inf"))
    return s, t
