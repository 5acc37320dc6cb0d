"""The tiled backend: flash attention (online softmax), forward and backward, any device.

Never materialises the Lq×Lk matrix. Queries are processed in tiles of ``block_q`` rows; for
each, the BlockMask lists the kv tiles that are not empty, consecutive ones are merged into
chunks of up to ``max_chunk`` keys, and each chunk is one batched matmul. Empty tiles are never
touched, full tiles never evaluate the mask, partial tiles evaluate it on their columns only.

Forward (FlashAttention-2): running max m, sum l and output accumulator in float32 (float64 for
float64 inputs), rescaled by exp(m_old - m_new); divided by l once at the end; only the LSE is
saved. Backward recomputes P = exp(S - LSE) tile by tile: dV += Pᵀ·dO, dP = dO·Vᵀ,
dS = P∘(dP - rowsum(dO∘O)), dQ += dS·K, dK += dSᵀ·Q. Saved state is O(Lq + Lk) rows.

On CPU, float32/bfloat16/float16 requests whose score_mod is absent, ALiBi, softcap or both
(with fixed slopes) run the same algorithm as compiled C++, dropout included (``cpu_kernel``:
csrc/tiled_forward_cpu.cpp, csrc/tiled_backward_cpu.cpp); the PyTorch loops below serve
everything else (float64, other score_mods, trainable slopes, other devices) and are the
readable statement of what the kernels compute.

GQA: q is viewed as (B, Hkv, G·tq, D) so each kv head multiplies all G query heads that share
it in one matmul, and dK/dV sum over them for free: k and v are never repeated.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from attnkit import _dropout
from attnkit._symbolic import surely
from attnkit._types import EMPTY, FULL, MaskFn, ScoreModFn
from attnkit.backends import cpu_kernel, tile_heights
from attnkit.backends._common import (
    Request,
    compute_dtype,
    first_order_only,
    inside_torch_func,
)
from attnkit.backends.tensor_masks import tensor_block_mask
from attnkit.block_mask import BlockMask
from attnkit.masks import Mask, full, padded_band, padded_ranges
from attnkit.score_mods import KernelMods, ScoreMod, kernel_mods

NAME = "tiled"

# Scores are kept in log2 units (q pre-scaled by scale·log2(e)) so softmax uses exp2, which is
# ~2.5x faster than exp on CPUs (and native on GPUs); LSE is converted back to natural log.
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes of the tiled backend.

    ``block_q`` query rows per step; kv tiles of ``block_k`` keys, merged into chunks of at
    most ``max_chunk`` keys per matmul.
    """

    block_q: int = 64
    block_k: int = 64
    max_chunk: int = 1024
    use_kernel: bool = True  #: use the compiled CPU kernels where they apply


#: Query tiles that visit at least this many keys get 128 rows instead of 64 (a band's middle
#: query tile; a BlockMask's on average).
#: Taller tiles make bigger GEMMs but widen a band's masked edge by block_q/2 keys per row;
#: measured with benchmarks/cpu_tile_sizes.py (README "Performance"): causal at 8192 tokens
#: runs 3 % (D=64) to 8 % (D=128) faster with 128 rows, a 512-key window 10 % slower.
WIDE_ROW_KEYS = 1024


def default_config(Lq: int) -> TileConfig:
    """Base tile sizes for ``Lq`` queries: 64 query rows (fewer for short queries)."""
    block_q = 16 if surely(Lq <= 16) else 32 if surely(Lq <= 32) else 64
    return TileConfig(block_q=block_q, block_k=64, max_chunk=1024)


def tuned_config(req: Request) -> TileConfig:
    """``default_config``, with 128-row query tiles where rows are wide (``WIDE_ROW_KEYS``).

    Under key ranges (packed sequences), shorter tiles where ``tile_heights`` models them
    cheaper: many short sequences (whether the kernels read the ranges or walk their tile
    map, ``BAND_IN_KERNEL``); long ones keep the rule for wide rows.
    """
    s = req.shapes
    cfg = default_config(s.Lq)
    if (found := mask_ranges(req)) is not None and _kernel_mods(req, cfg) is not None:
        ranges = tile_heights.host_ranges(found[0])
        rows = tile_heights.cheapest_tile_height(ranges, cfg.block_k, cfg.block_q)
        if rows < cfg.block_q:
            return replace(cfg, block_q=rows)
    if cfg.block_q < 64 or not surely(s.Lq >= 2 * WIDE_ROW_KEYS):
        return cfg
    # a band's counts follow from its bounds: no map built; nor a map refined at a height
    # that may not be kept
    tiles = kernel_tiles(req, cfg, refine=False)
    if isinstance(tiles, cpu_kernel.Band):  # its middle query tile's (compile: no loop over Lq)
        visited: float = tiles.kv_tiles(s.Lq // 2 // cfg.block_q * cfg.block_q, s.Lq, s.Lk)
    elif isinstance(tiles, cpu_kernel.KeyRanges):  # a row's keys on average
        kept = (tiles.ranges[:, 1] - tiles.ranges[:, 0] + 1).clamp(min=0)
        visited = float(kept.double().mean()) / cfg.block_k
    else:
        visited = float((tiles.kinds != EMPTY).sum(dim=-1).float().mean())
    if visited * cfg.block_k >= WIDE_ROW_KEYS:
        return replace(cfg, block_q=128)
    return cfg


@dataclass(frozen=True)
class Chunk:
    """Keys [start, end) processed in one matmul.

    ``partial`` lists sub-ranges [a, b) (absolute key indices) whose tiles need the predicate.
    """

    start: int
    end: int
    partial: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Plan:
    """Which kv chunks each query tile visits."""

    block_q: int
    rows: tuple[tuple[Chunk, ...], ...]
    mask_fn: MaskFn | None


_NO_MASK = full()


def block_mask_for(req: Request, cfg: TileConfig, *, refine: bool = True) -> BlockMask:
    """The request's mask as a BlockMask (all tiles full when there is no mask).

    ``refine``: as ``Mask.blocks``' (False: a combination's undecided tiles stay partial).
    """
    s, mask = req.shapes, req.mask
    if isinstance(mask, BlockMask):
        return mask
    if mask is None:
        mask = _NO_MASK  # one shared Mask, so its BlockMasks are cached across calls
    if isinstance(mask, Tensor):  # kept per tensor: a model passes one to every layer
        return tensor_block_mask(mask, s.Lq, s.Lk, cfg.block_q, cfg.block_k, s.B, s.Hq)
    # the request's B and Hq: a custom predicate's result shows which of them it varies over
    # (tiles for each head where it depends on h); built-in patterns' rules ignore them
    return mask.blocks(s.Lq, s.Lk, cfg.block_q, cfg.block_k, B=s.B, H=s.Hq, refine=refine)


#: Set False to have the compiled kernels walk a BlockMask for causal and window masks and key
#: ranges too (``benchmarks/cpu_decoding.py``, ``cpu_padding.py``, ``cpu_varlen.py`` compare).
BAND_IN_KERNEL = True


def kernel_tiles(req: Request, cfg: TileConfig, *, refine: bool = True) -> cpu_kernel.Tiles:
    """The mask as the compiled kernels take it: a band they compute, else a BlockMask.

    No mask, causal and sliding-window masks (any alignment, and ``&`` of them) keep the band
    lo <= j - i <= hi (``masks.band``): the kernels find each tile's kind from its bounds, so
    no tile map is built for a new length (a window over a growing cache built one per
    decoding step: ``benchmarks/cpu_decoding.py`` measured 3.40-3.46 ms per step of 6 layers
    with maps, 1.94-2.08 ms without). ``&`` padding masks too (``masks.padded_band``): the
    kernels take the kept keys (B, Lk) beside the band. ``refine``: ``block_mask_for``'s.
    """
    found = _kernel_band(req)
    if found is not None:
        lo, hi, keys = found
        return cpu_kernel.Band(lo, hi, cfg.block_q, cfg.block_k, keys)
    if (in_ranges := _kernel_ranges(req)) is not None:
        return cpu_kernel.KeyRanges(in_ranges[0], cfg.block_q, cfg.block_k, in_ranges[1])
    return block_mask_for(req, cfg, refine=refine)


def computed_fraction(req: Request, cfg: TileConfig) -> float:
    """Fraction of the Lq×Lk scores the kernels compute for ``req``: the tiles not skipped.

    A band's from its bounds and key ranges' from their lengths (no tile map built); padding
    beside them is not counted (an upper bound).
    """
    s = req.shapes
    tiles = kernel_tiles(req, cfg)
    if isinstance(tiles, cpu_kernel.Band):
        bk, pairs = cfg.block_k, 0
        for row in range(0, s.Lq, cfg.block_q):  # each query tile: its rows × its kv tiles' keys
            if (keys := tiles.kv_keys(row, s.Lq, s.Lk)) is not None:
                first, last = keys[0] // bk * bk, min((keys[1] // bk + 1) * bk, s.Lk)
                pairs += min(cfg.block_q, s.Lq - row) * (last - first)
        return pairs / (s.Lq * s.Lk)
    if isinstance(tiles, cpu_kernel.KeyRanges):
        kept = (tiles.ranges[:, 1] - tiles.ranges[:, 0] + 1).clamp(min=0)
        return float(kept.double().mean()) / s.Lk
    return tiles.density


def _kernel_band(req: Request) -> tuple[int, int, Tensor | None] | None:
    """The band and kept keys the kernels compute for ``req``'s mask, or None (``kernel_tiles``)."""
    mask = _NO_MASK if req.mask is None else req.mask
    Lq, Lk = req.shapes.Lq, req.shapes.Lk
    if not BAND_IN_KERNEL:
        return None
    if isinstance(mask, Tensor):  # every query of a sequence keeps the same keys: no band
        keys = kept_keys(mask, Lk)
        return None if keys is None else (1 - Lq, Lk - 1, keys)
    if not isinstance(mask, Mask):
        return None
    if torch.compiler.is_compiling():  # (symbolic lengths: nothing to key a cache by)
        return padded_band(mask, Lq, Lk)
    last = mask._band_cache
    if last is None or last[0] != (Lq, Lk):
        last = mask._band_cache = ((Lq, Lk), padded_band(mask, Lq, Lk))
    found: tuple[int, int, Tensor | None] | None = last[1]
    return found


def _kernel_ranges(req: Request) -> tuple[Tensor, Tensor | None] | None:
    """The key ranges and kept keys the kernels compute for ``req``'s mask, or None."""
    return mask_ranges(req) if BAND_IN_KERNEL else None


def mask_ranges(req: Request) -> tuple[Tensor, Tensor | None] | None:
    """``req``'s mask as key ranges and kept keys, or None (``_kernel_ranges``).

    ``masks.padded_ranges``, found once per mask object and lengths: a model's layers share
    one mask, and dispatch, the tile height and the kernels' arguments all ask. Eager only:
    the ranges and tile height are read from data (documents' ids), so torch.compile and
    torch.export keep the BlockMask path (export refuses it: ``unsupported_reason``).
    """
    mask, s = req.mask, req.shapes
    if not isinstance(mask, Mask) or mask.spec is None or torch.compiler.is_compiling():
        return None
    key = (s.Lq, s.Lk)
    cached = mask._ranges_cache
    if key not in cached:
        cached.clear()  # the lengths of the calls sharing this mask (and what triton made)
        cached[key] = padded_ranges(mask, s.Lq, s.Lk)
    found: tuple[Tensor, Tensor | None] | None = cached[key]
    return found


def kept_keys(mask: Tensor, Lk: int) -> Tensor | None:
    """The keys each sequence keeps (B|1, Lk), of a bool mask varying by neither head nor query.

    A decoding step's mask (one query) or a padding mask (B, 1, 1, Lk): the kernels read it
    as they read ``masks.padded_band``'s keys, with no tile map. Only its shape is looked at;
    None for any other mask (…, Lq|1, Lk).
    """
    if (mask.dim() >= 2 and mask.shape[-2] != 1) or (mask.dim() >= 3 and mask.shape[-3] != 1):
        return None
    rows = mask.shape[0] if mask.dim() == 4 else 1
    return mask.expand(*mask.shape[:-1], Lk).reshape(rows, Lk)


def make_plan(req: Request, cfg: TileConfig) -> Plan:
    """Turn the request's mask into per-query-tile lists of kv chunks."""
    return plan_from_block_mask(block_mask_for(req, cfg), cfg.max_chunk)


def plan_from_block_mask(bm: BlockMask, max_chunk: int) -> Plan:
    """Per query tile, the runs of non-empty kv tiles, cut into chunks of <= max_chunk keys."""
    kinds = bm.kinds.to("cpu")
    visit = (kinds != EMPTY).flatten(0, 1).any(0)  # (nQ, nK): non-empty for some (b, h)
    exact = (kinds == FULL).flatten(0, 1).all(0)  # full for every (b, h): no predicate
    tiles_per_chunk = max(1, max_chunk // bm.block_k)
    rows = []
    for v_row, f_row in zip(visit.tolist(), exact.tolist(), strict=True):
        chunks: list[Chunk] = []
        run: list[int] = []
        for kt, needed in enumerate([*v_row, False]):
            if needed and (not run or (kt == run[-1] + 1 and len(run) < tiles_per_chunk)):
                run.append(kt)
                continue
            if run:
                chunks.append(_chunk(run, f_row, bm.block_k, bm.kv_len))
            run = [kt] if needed else []
        rows.append(tuple(chunks))
    return Plan(bm.block_q, tuple(rows), bm.mask_fn)


def _chunk(tiles: list[int], full_row: list[bool], block_k: int, Lk: int) -> Chunk:
    partial: list[tuple[int, int]] = []
    for t in tiles:
        if not full_row[t]:
            a, b = t * block_k, min((t + 1) * block_k, Lk)
            if partial and partial[-1][1] == a:  # merge neighbouring partial tiles
                a = partial.pop()[0]
            partial.append((a, b))
    return Chunk(tiles[0] * block_k, min((tiles[-1] + 1) * block_k, Lk), tuple(partial))


# ---- the per-chunk score computation shared by forward and backward ------------------------


@dataclass(frozen=True)
class _Ctx:
    """Everything a chunk needs besides the tensors."""

    B: int
    Hkv: int
    G: int
    scale: float
    score_mod: ScoreModFn | None
    mask_fn: MaskFn | None
    seed: int | None
    dropout_p: float


def _ctx_for(req: Request, mask_fn: MaskFn | None) -> _Ctx:
    """The PyTorch loops' view of a request and its BlockMask's predicate."""
    s = req.shapes
    return _Ctx(
        B=s.B,
        Hkv=s.Hkv,
        G=s.Hq // s.Hkv,
        scale=req.scale,
        score_mod=req.score_mod,
        mask_fn=mask_fn,
        seed=req.seed,
        dropout_p=req.dropout_p,
    )


def _indices(
    c: _Ctx, q0: int, tq: int, k0: int, k1: int, device: torch.device
) -> tuple[Tensor, ...]:
    """Index tensors broadcasting over the 5-D view (B, Hkv, G, tq, keys)."""
    return (
        torch.arange(c.B, device=device).view(-1, 1, 1, 1, 1),
        torch.arange(c.Hkv * c.G, device=device).view(1, c.Hkv, c.G, 1, 1),
        torch.arange(q0, q0 + tq, device=device).view(1, 1, 1, -1, 1),
        torch.arange(k0, k1, device=device).view(1, 1, 1, 1, -1),
    )


def _scores(c: _Ctx, raw: Tensor, q0: int, tq: int, chunk: Chunk) -> Tensor:
    """Apply score_mod and the partial tiles' mask to raw scores (B, Hkv, G·tq, keys).

    ``raw`` and the result are in log2 units; the score_mod sees natural units.
    """
    s = raw
    if c.score_mod is not None:
        b, h, qi, ki = _indices(c, q0, tq, chunk.start, chunk.end, raw.device)
        s5 = c.score_mod((raw * LN2).view(c.B, c.Hkv, c.G, tq, -1), b, h, qi, ki) * LOG2E
        s = s5.expand(c.B, c.Hkv, c.G, tq, raw.shape[-1]).reshape(raw.shape)
    if chunk.partial and c.mask_fn is not None:
        if s.requires_grad:  # in backward: keep autograd's copy of the scores intact
            s = s.clone()
        s5 = s.view(c.B, c.Hkv, c.G, tq, -1)
        for a, z in chunk.partial:
            b, h, qi, ki = _indices(c, q0, tq, a, z, raw.device)
            keep = torch.as_tensor(c.mask_fn(b, h, qi, ki), device=raw.device)
            cols = s5[..., a - chunk.start : z - chunk.start]
            cols.masked_fill_(~keep.expand_as(cols), -math.inf)
    return s


def _dropout_scale(c: _Ctx, q0: int, tq: int, chunk: Chunk, like: Tensor) -> Tensor | None:
    if c.seed is None:
        return None
    b, h, qi, ki = _indices(c, q0, tq, chunk.start, chunk.end, like.device)
    keep = _dropout.keep_mask(c.seed, c.dropout_p, b, h, qi, ki)
    z = keep.to(like.dtype) / (1.0 - c.dropout_p)
    return z.expand(c.B, c.Hkv, c.G, tq, chunk.end - chunk.start).reshape(like.shape)


def _q_tile(x: Tensor, c: _Ctx, q0: int, q1: int) -> Tensor:
    """(B, Hq, Lq, X) -> rows q0..q1 as (B, Hkv, G·tq, X)."""
    t = x[:, :, q0:q1]
    return t.reshape(c.B, c.Hkv, c.G * (q1 - q0), t.shape[-1])


def _untile(t: Tensor, c: _Ctx, tq: int) -> Tensor:
    """(B, Hkv, G·tq, ...) -> (B, Hq, tq, ...)."""
    return t.reshape(c.B, c.Hkv * c.G, tq, *t.shape[3:])


def forward(q: Tensor, k: Tensor, v: Tensor, plan: Plan, c: _Ctx) -> tuple[Tensor, Tensor]:
    """Tiled forward in the compute dtype. Returns out (B, Hq, Lq, Dv), lse (B, Hq, Lq)."""
    B, Hq, Lq, _ = q.shape
    out = torch.zeros(B, Hq, Lq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hq, Lq), -math.inf, dtype=q.dtype, device=q.device)
    for qt_index, chunks in enumerate(plan.rows):
        if not chunks:
            continue  # every key masked: zeros and -inf, already there
        q0 = qt_index * plan.block_q
        q1 = min(q0 + plan.block_q, Lq)
        tq = q1 - q0
        qs = _q_tile(q, c, q0, q1) * (c.scale * LOG2E)
        m = torch.full(qs.shape[:-1], -math.inf, dtype=q.dtype, device=q.device)
        row_sum = torch.zeros_like(m)
        acc = torch.zeros(*qs.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        for chunk in chunks:
            s = _scores(c, qs @ k[:, :, chunk.start : chunk.end].transpose(-1, -2), q0, tq, chunk)
            m_new = torch.maximum(m, s.amax(dim=-1))
            # rows with no key yet keep m = -inf; shift by 0 there so exp() gives exact zeros
            shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = s.sub_(shift.unsqueeze(-1)).exp2_()  # s is ours: reuse its memory
            alpha = torch.exp2(m - shift)
            row_sum = row_sum * alpha + p.sum(dim=-1)
            z = _dropout_scale(c, q0, tq, chunk, p)
            if z is not None:
                p = p * z
            acc = acc * alpha.unsqueeze(-1) + p @ v[:, :, chunk.start : chunk.end]
            m = m_new
        shift = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        out[:, :, q0:q1] = _untile(
            acc / torch.where(row_sum == 0, torch.ones_like(row_sum), row_sum).unsqueeze(-1), c, tq
        )
        lse[:, :, q0:q1] = _untile((shift + torch.log2(row_sum)) * LN2, c, tq)
    return out, lse


def backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    plan: Plan,
    c: _Ctx,
    captured: tuple[Tensor, ...],
    dlse: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor | None]]:
    """Gradients for q, k, v and the score_mod's captured tensors (compute dtype).

    ``dlse`` (B, Hq, Lq) is the gradient reaching the returned LSE; since dLSE/dS = P it
    enters as dS = P∘(dP - rowsum(dO∘O) + dLSE).
    """
    Lq = q.shape[2]
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    d_captured: list[Tensor | None] = [None] * len(captured)
    delta = (dout * out).sum(dim=-1)  # rowsum(dO ∘ O), (B, Hq, Lq)
    if dlse is not None:
        delta = delta - dlse
    # a fully masked row has lse = -inf and only -inf scores: shift by 0 to get P = 0
    lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse) * LOG2E
    use_autograd = c.score_mod is not None
    for qt_index, chunks in enumerate(plan.rows):
        if not chunks:
            continue
        q0 = qt_index * plan.block_q
        q1 = min(q0 + plan.block_q, Lq)
        tq = q1 - q0
        qs = _q_tile(q, c, q0, q1) * (c.scale * LOG2E)
        do = _q_tile(dout, c, q0, q1)
        do_ln2 = do * LN2  # gradients w.r.t. log2-unit scores carry a factor ln 2
        lse_t = _q_tile(lse.unsqueeze(-1), c, q0, q1)
        delta_t = _q_tile(delta.unsqueeze(-1), c, q0, q1) * LN2
        dqs = torch.zeros_like(qs)
        for chunk in chunks:
            k_c = k[:, :, chunk.start : chunk.end]
            v_c = v[:, :, chunk.start : chunk.end]
            raw = qs @ k_c.transpose(-1, -2)
            with torch.set_grad_enabled(use_autograd):
                if use_autograd:
                    raw.requires_grad_(True)
                s = _scores(c, raw, q0, tq, chunk)
            p = torch.exp2(s.detach() - lse_t)
            dp = do_ln2 @ v_c.transpose(-1, -2)
            z = _dropout_scale(c, q0, tq, chunk, p)
            if z is not None:
                dv[:, :, chunk.start : chunk.end] += (p * z).transpose(-1, -2) @ do
                dp = dp * z
            else:
                dv[:, :, chunk.start : chunk.end] += p.transpose(-1, -2) @ do
            ds = p * (dp - delta_t)
            if use_autograd:
                grads = torch.autograd.grad(s, (raw, *captured), ds, allow_unused=True)
                ds = grads[0]
                for i, g in enumerate(grads[1:]):
                    prev = d_captured[i]
                    if g is not None:
                        d_captured[i] = g if prev is None else prev + g
            dqs += ds @ k_c
            dk[:, :, chunk.start : chunk.end] += ds.transpose(-1, -2) @ qs
        dq[:, :, q0:q1] = _untile(dqs * (c.scale * LOG2E), c, tq)
    return dq, dk, dv, d_captured


@dataclass(frozen=True)
class _Kernel:
    """What the compiled CPU kernels need besides the tensors."""

    tiles: cpu_kernel.Tiles
    max_chunk: int  # keys per chunk in the forward, query rows per step in the backward
    mods: KernelMods
    dropout: tuple[int, int, float]  # _dropout.kernel_args(seed, p)


class _TiledAttention(torch.autograd.Function):
    """Thin autograd wrapper over ``forward``/``backward``.

    Its extra inputs are the tensors a score_mod captures, so their gradients flow.
    """

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        plan: Plan | None,
        c: _Ctx,
        kernel: _Kernel | None,
        *captured: Tensor,
    ) -> tuple[Tensor, Tensor]:
        ctx.plan, ctx.c, ctx.kernel, ctx.dtype = plan, c, kernel, q.dtype
        # q, k, v are saved as given (16-bit stays 16-bit) and widened in backward, if it runs
        if kernel is not None:  # compiled CPU forward: widens 16-bit tiles itself, out in q.dtype
            out, lse = cpu_kernel.forward(
                q,
                k,
                v,
                kernel.tiles,
                kernel.max_chunk,
                c.scale,
                kernel.mods,
                kernel.dropout,
                for_backward=True,
            )
            ctx.save_for_backward(q, k, v, out, lse)
            return out, lse
        assert plan is not None
        compute = compute_dtype(q.dtype)
        out, lse = forward(q.to(compute), k.to(compute), v.to(compute), plan, c)
        ctx.save_for_backward(q, k, v, out, lse, *captured)
        return out.to(q.dtype), lse

    @staticmethod
    @first_order_only("the tiled backend")
    def backward(ctx: Any, dout: Tensor, dlse: Tensor | None) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse, *captured = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout
        d_cap: list[Tensor | None] = []
        if ctx.kernel is not None:  # compiled CPU backward (ALiBi/softcap at most, dropout)
            kn: _Kernel = ctx.kernel
            dq, dk, dv = cpu_kernel.backward(  # widens 16-bit tensors itself, where it must
                dout,
                q,
                k,
                v,
                out,
                lse,
                None if dlse is None else dlse.float(),
                kn.tiles,
                kn.max_chunk,
                ctx.c.scale,
                kn.mods,
                kn.dropout,
            )
        else:
            compute = compute_dtype(ctx.dtype)
            qc, kc, vc, out, dout = (t.to(compute) for t in (q, k, v, out, dout))
            dlse = None if dlse is None else dlse.to(compute)
            dq, dk, dv, d_cap = backward(
                dout, qc, kc, vc, out, lse, ctx.plan, ctx.c, tuple(captured), dlse
            )
        dt = ctx.dtype
        return (dq.to(dt), dk.to(dt), dv.to(dt), None, None, None, *d_cap)


def captured_tensors(c: _Ctx, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """The tensors requiring grad that the score_mod reads besides its arguments (none without).

    The backward computes their gradients, so every way of reaching one must count: a
    closure's, a global, a bound method's module (``self.table``), a partial's argument. The
    score_mod runs once on a 1 × 1 tile of the call's form while a torch function mode
    records the tensors each torch call receives, but those the call itself made.
    """
    if c.score_mod is None:
        return ()
    score = torch.zeros(c.B, c.Hkv, c.G, 1, 1, device=device, dtype=dtype)
    with torch.no_grad(), _TensorsRead() as reads:
        c.score_mod(score, *_indices(c, 0, 1, 0, 1, device))
    return tuple(reads.found.values())


class _TensorsRead(TorchFunctionMode):
    """Records the tensors requiring grad that torch calls receive, other than their outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.found: dict[int, Tensor] = {}
        self._made: dict[int, Tensor] = {}  # held, so that no id is reused while recording

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        for t in _tensors_in((args, kwargs)):
            if t.requires_grad and id(t) not in self._made:
                self.found.setdefault(id(t), t)
        out = func(*args, **kwargs)
        self._made.update((id(t), t) for t in _tensors_in(out))
        return out


def _tensors_in(obj: object) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, list | tuple):
        for item in obj:
            yield from _tensors_in(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors_in(item)


def unsupported_reason(req: Request) -> str | None:
    """Why tiled cannot serve ``req``, or None: it serves every request but two.

    Inside torch.func transforms; and under torch.export where it would build a tile map.
    """
    if (why := inside_torch_func()) is not None:
        return why
    if torch.compiler.is_exporting() and builds_tile_map(req):
        return (
            "under torch.export, tiled serves only what the compiled CPU kernels compute without "
            "a tile map (no mask, causal and sliding-window masks, & padding; ALiBi, softcap): "
            "a BlockMask is built from data for each length, which an exported graph cannot "
            "hold (sdpa and reference serve the rest)"
        )
    return None


def _kernel_mods(req: Request, cfg: TileConfig) -> KernelMods | None:
    """The score mods the compiled CPU kernels apply to ``req``, or None if they do not serve it.

    ALiBi and softcap run inside the kernels; other mods, float64, other devices and trainable
    slopes run the PyTorch loops.
    """
    mods = kernel_mods(req.score_mod_source)
    runs_kernels = (
        cfg.use_kernel
        and req.q.is_cpu
        and req.q.dtype != torch.float64
        and mods is not None
        and not mods.learns_slopes
        and cpu_kernel.available()
    )
    return mods if runs_kernels else None


def builds_tile_map(req: Request) -> bool:
    """Whether a call builds a BlockMask: all but bands or key ranges, & padding (kernel_tiles)."""
    if _kernel_mods(req, TileConfig()) is None:
        return True
    return _kernel_band(req) is None and _kernel_ranges(req) is None


def run(req: Request, config: TileConfig | None = None) -> tuple[Tensor, Tensor]:
    """Output (B, Hq, Lq, Dv) in q's dtype and LSE (B, Hq, Lq) float32 (float64 for float64)."""
    cfg = config or tuned_config(req)
    if (mods := _kernel_mods(req, cfg)) is None:
        return _run_loops(req, cfg)
    tiles = kernel_tiles(req, cfg)
    dropout = _dropout.kernel_args(req.seed, req.dropout_p)
    if not req.needs_grad:  # inference (decoding): no autograd node
        return cpu_kernel.forward(
            req.q, req.k, req.v, tiles, cfg.max_chunk, req.scale, mods, dropout
        )
    kernel = _Kernel(tiles, cfg.max_chunk, mods, dropout)
    c = _ctx_for(req, None)  # the kernels need neither the predicate nor a chunk plan
    out, lse = _TiledAttention.apply(req.q, req.k, req.v, None, c, kernel)  # type: ignore[no-untyped-call]
    return out, lse


def _run_loops(req: Request, cfg: TileConfig) -> tuple[Tensor, Tensor]:
    """``run`` in PyTorch loops over the tiles of a BlockMask (what the kernels do not serve)."""
    bm = block_mask_for(req, cfg)
    c = _ctx_for(req, bm.mask_fn)
    captured = captured_tensors(c, req.q.device, compute_dtype(req.q.dtype))
    plan = plan_from_block_mask(bm, cfg.max_chunk)  # drives the PyTorch forward, backward
    out, lse = _TiledAttention.apply(req.q, req.k, req.v, plan, c, None, *captured)  # type: ignore[no-untyped-call]
    return out, lse


# The marks ``torch.compiler.disable(_run_loops, reason=...)`` sets, set without importing
# torch._dynamo (0.8 s of ``import attnkit``): torch.compile breaks its graph at the call, as
# neither the loops' tile plan (read from data) nor ``captured_tensors`` (a torch function
# mode) traces, and under fullgraph=True it says why instead of failing inside them
_run_loops._torchdynamo_disable = True  # type: ignore[attr-defined]
_run_loops._torchdynamo_disable_msg = (  # type: ignore[attr-defined]
    "attnkit's tiled backend runs this request in PyTorch loops over a tile plan read from "
    "data (a custom score_mod, ALiBi slopes that learn, float64 or a non-CPU device), between "
    "graphs; with fullgraph=True use backend='reference' (it materialises the scores) or, on "
    "CPU in float32/16/bf16, ALiBi with fixed slopes or softcap, which the compiled kernels apply"
)


def block_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    *,
    mask: Mask | None,
    scale: float,
    dlse: Tensor | None = None,
    score_mod: ScoreMod | ScoreModFn | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients that one block of keys contributes, given the *global* out and LSE.

    FlashAttention-2's backward needs only P = exp(S - LSE) and rowsum(dO∘O), so a block of
    keys can be differentiated on its own once the output over all blocks is known.

    Args:
        dout: (B, Hq, Lq, Dv) gradient of the whole attention's output.
        q: (B, Hq, Lq, D).
        k: (B, Hkv, Lk, D), this block's keys.
        v: (B, Hkv, Lk, Dv), this block's values.
        out: (B, Hq, Lq, Dv) output of the whole attention (all blocks).
        lse: (B, Hq, Lq) log-sum-exp over all blocks.
        mask: which (query, key) pairs of this block attend (None: all).
        scale: the softmax scale.
        dlse: gradient reaching ``lse``, if any.
        score_mod: the block's score mod (its parameters get no gradient).

    Returns:
        dq (B, Hq, Lq, D), dk (B, Hkv, Lk, D), dv (B, Hkv, Lk, Dv), float32 (float64 in).
    """
    from attnkit.functional import _request

    req = _request(q, k, v, mask, score_mod, scale, 0.0, None, False)
    cfg = default_config(req.shapes.Lq)
    ct = compute_dtype(q.dtype)
    dout_c, q_c, k_c, v_c, out_c, lse_c = (t.to(ct) for t in (dout, q, k, v, out, lse))
    dlse_c = None if dlse is None else dlse.to(ct)
    if (mods := _kernel_mods(req, cfg)) is not None:
        tiles = kernel_tiles(req, cfg)
        return cpu_kernel.backward(
            dout_c, q_c, k_c, v_c, out_c, lse_c, dlse_c, tiles, cfg.max_chunk, req.scale, mods
        )
    bm = block_mask_for(req, cfg)
    plan = plan_from_block_mask(bm, cfg.max_chunk)
    c = _ctx_for(req, bm.mask_fn)
    dq, dk, dv, _ = backward(dout_c, q_c, k_c, v_c, out_c, lse_c, plan, c, (), dlse_c)
    return dq, dk, dv
