"""The triton backend: flash attention on GPUs (and on CPUs under TRITON_INTERPRET=1).

Forward and backward kernels in ``kernels.py``; this module validates the request, picks tile
sizes, turns the BlockMask into per-row and per-column lists of non-empty tiles, and wraps the
kernels in torch custom ops (``attnkit::triton_forward`` / ``attnkit::triton_backward``) with
autograd, so they work under torch.compile.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnkit._types import EMPTY
from attnkit.backends._common import Request
from attnkit.backends.tiled import TileConfig, block_mask_for
from attnkit.block_mask import BlockMask, partial_bitmaps
from attnkit.score_mods import KernelMods, kernel_mods

NAME = "triton"


def installed() -> bool:
    """Whether the triton package can be imported."""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unsupported_reason(req: Request) -> str | None:
    """Why the triton kernels cannot serve ``req``, or None when they can."""
    if not installed():
        return "triton is not installed (pip install 'attnkit[triton]')"
    dev = req.q.device.type
    if dev != "cuda" and not (dev == "cpu" and _interpreting()):
        return f"triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {dev}"
    if req.q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"triton kernels take float16, bfloat16 or float32, got {req.q.dtype}"
    s = req.shapes
    if max(s.D, s.Dv) > 256:
        return f"head dims up to 256 are supported, got D={s.D}, Dv={s.Dv}"
    largest = max(s.B * s.Hq * s.Lq * max(s.D, s.Dv), s.B * s.Hkv * s.Lk * max(s.D, s.Dv))
    if largest >= 2**31:
        return (
            f"the kernels index with 32-bit offsets; a tensor here has {largest} >= 2^31 elements"
        )
    if req.seed is not None:
        return "dropout is not implemented in the triton kernels (use tiled)"
    mods = kernel_mods(req.score_mod_source)
    if mods is None:
        return "only alibi, softcap and compose(alibi, softcap) score_mods run in-kernel"
    if mods.learns_slopes:
        return "ALiBi slopes that require grad get their gradient from reference or tiled only"
    return None


@dataclass(frozen=True)
class Launch:
    """Tile sizes and launch parameters."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def gpu_arch(device: torch.device) -> int | None:
    """Compute capability as one number (sm_90 → 90), None off CUDA (the interpreter)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


# Tiles (block_m, block_n, num_warps, num_stages) per arch family and head-dim bucket: the
# largest whose three kernels spill at most 16 B per thread, with and without GQA, and fit the
# arch's shared memory; on sm_90 also those whose dots all become wgmma (Hopper's tensor-core
# instruction; 128x32 tiles left dK/dV on the older mma.sync). Compiled for each arch by
# `python benchmarks/triton_resources.py --launch ...` over 32/64/128-row tiles and 4/8 warps
# (benchmarks/results/triton_resources.md has the chosen ones). Compiler figures, not timings:
# no GPU was at hand to time them. sm_86/89/120 have 99 KB of shared memory (sm_80 163,
# sm_90/100 227).
_TILES = {
    90: {64: Launch(64, 128, 8, 3), 128: Launch(64, 64, 8, 3), 256: Launch(64, 32, 8, 1)},
    80: {64: Launch(128, 32, 8, 3), 128: Launch(128, 32, 8, 3), 256: Launch(64, 32, 8, 2)},
    86: {64: Launch(128, 32, 8, 3), 128: Launch(128, 32, 8, 3), 256: Launch(32, 32, 8, 2)},
    120: {64: Launch(128, 32, 8, 3), 128: Launch(64, 32, 8, 3), 256: Launch(32, 32, 8, 2)},
}
# fp32 multiplies exactly on CUDA cores (FMA dots), which spill at every tile size tried;
# small tiles keep it within shared memory. `auto` sends fp32 to SDPA where SDPA can serve it.
_FP32 = {64: Launch(32, 32, 4, 2), 128: Launch(32, 32, 4, 2), 256: Launch(16, 16, 2, 1)}


def choose_launch(D: int, dtype: torch.dtype, arch: int | None) -> Launch:
    """Tiles per head dim, dtype and GPU arch (None: the interpreter, small tiles keep it quick).

    ``tests/test_triton_aot.py`` compiles the choices for sm_80/86/90/100/120 and checks they
    fit and (in 16 bits) do not spill.
    """
    if arch is None:
        return Launch(16, 16, 1, 1)
    bucket = 64 if D <= 64 else 128 if D <= 128 else 256
    if dtype == torch.float32:
        return _FP32[bucket]
    # sm_90/100/103 have 227 KB of shared memory per block, sm_80/87 163 KB, the rest 99 KB
    family = 120 if arch >= 120 else 90 if arch >= 90 else 80 if arch in (80, 87) else 86
    return _TILES[family][bucket]


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


@dataclass(frozen=True)
class TileLists:
    """The BlockMask as the kernels walk it (see ``tile_lists``)."""

    kv_num: Tensor
    kv_idx: Tensor
    q_num: Tensor
    q_idx: Tensor
    tile: Tensor
    bits: Tensor


def tile_lists(req: Request, launch: Launch) -> TileLists:
    """The BlockMask as the kernels read it, on the request's device.

    Per q-tile row and per kv-tile column: the count of non-empty tiles and their indices
    (non-empty first); and the partial tiles' bitmaps. Built once per BlockMask and device.
    """
    bm = block_mask_for(req, TileConfig(launch.block_m, launch.block_n, launch.block_n))
    if (bm.block_q, bm.block_k) != (launch.block_m, launch.block_n):
        raise ValueError(
            f"triton needs a BlockMask with tiles ({launch.block_m}, {launch.block_n}), got "
            f"({bm.block_q}, {bm.block_k}); build it with mask.blocks(..., "
            f"{launch.block_m}, {launch.block_n})"
        )
    dev = req.q.device
    return bm.derived(("triton_tile_lists", str(dev)), lambda: _build_tile_lists(bm, dev))


def _build_tile_lists(bm: BlockMask, dev: torch.device) -> TileLists:
    kinds = bm.kinds.cpu()
    empty = (kinds == EMPTY).to(torch.int8)
    rows_idx = torch.argsort(empty, dim=-1, stable=True)  # non-empty kv tiles first
    cols = empty.transpose(-1, -2).contiguous()
    cols_idx = torch.argsort(cols, dim=-1, stable=True)
    tile_index, bitmaps = partial_bitmaps(bm)
    return TileLists(
        kv_num=(1 - empty).sum(-1).to(torch.int32).contiguous().to(dev),
        kv_idx=rows_idx.to(torch.int32).contiguous().to(dev),
        q_num=(1 - cols).sum(-1).to(torch.int32).contiguous().to(dev),
        q_idx=cols_idx.to(torch.int32).contiguous().to(dev),
        tile=tile_index.to(torch.int32).contiguous().to(dev),
        bits=bitmaps.to(torch.int8).contiguous().to(dev),
    )


def dot_precision(dtype: torch.dtype) -> str:
    """How tl.dot multiplies fp32 tiles: TF32 only where torch allows it for matmuls too.

    fp16/bf16 tiles are multiplied exactly either way; this matters for fp32 inputs, which would
    otherwise silently run in TF32 (10-bit mantissa) on Ampere and newer.
    """
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@dataclass(frozen=True)
class KernelCall:
    """One kernel launch: what the custom ops run, and what ``aot.py`` compiles for a GPU arch."""

    kernel: Any  # a triton.JITFunction
    grid: tuple[int, int]
    args: tuple[Any, ...]
    meta: dict[str, Any]  # constexprs, num_warps, num_stages

    def launch(self) -> None:
        """Run the kernel on the tensors in ``args``."""
        self.kernel[self.grid](*self.args, **self.meta)


@dataclass(frozen=True)
class Scalars:
    """Everything besides tensors that a launch needs."""

    scale: float
    softcap: float
    q_off: int  # Lk - Lq: where the queries sit among the keys (ALiBi distance, masks)
    has_alibi: bool
    launch: Launch


def _common_args(
    q: Tensor, k: Tensor, v: Tensor, o_like: Tensor, lists: TileLists, sc: Scalars
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The scalar and stride arguments every kernel takes, and the compile-time ones.

    ``o_like`` is the output (forward) or dO (backward): its strides come last.
    """
    H, Lq, D = q.shape[1:]
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    Bm, Hm, nQ, nK = lists.tile.shape
    scalars = (
        sc.scale,
        sc.softcap,
        Lq,
        Lk,
        sc.q_off,
        H,
        H // Hkv,
        D,
        Dv,
        Bm,
        Hm,
        nQ,
        nK,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *o_like.stride()[:3],
    )
    meta = {
        "HAS_ALIBI": sc.has_alibi,
        "HAS_SOFTCAP": sc.softcap > 0,
        "DOT_PRECISION": dot_precision(q.dtype),
        "BLOCK_M": sc.launch.block_m,
        "BLOCK_N": sc.launch.block_n,
        "BLOCK_D": _pow2(D),
        "BLOCK_DV": _pow2(Dv),
        "num_warps": sc.launch.num_warps,
        "num_stages": sc.launch.num_stages,
    }
    return scalars, meta


def forward_calls(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    lists: TileLists,
    slopes: Tensor,
    sc: Scalars,
) -> list[KernelCall]:
    """The forward launch, writing ``out`` (B, Hq, Lq, Dv) and ``lse`` (B, Hq, Lq)."""
    from attnkit.backends.triton.kernels import attention_forward_kernel

    B, H, Lq = q.shape[:3]
    scalars, meta = _common_args(q, k, v, out, lists, sc)
    tensors = (q, k, v, out, lse, lists.kv_num, lists.kv_idx, lists.tile, lists.bits, slopes)
    grid = (-(-Lq // sc.launch.block_m), B * H)
    return [KernelCall(attention_forward_kernel, grid, (*tensors, *scalars), meta)]


def backward_calls(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
    lse: Tensor,
    delta: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    lists: TileLists,
    slopes: Tensor,
    sc: Scalars,
) -> list[KernelCall]:
    """The two backward launches: dK/dV per kv tile, then dQ per q tile (no atomics)."""
    from attnkit.backends.triton.kernels import (
        attention_backward_dkdv_kernel,
        attention_backward_dq_kernel,
    )

    B, H, Lq = q.shape[:3]
    Hkv, Lk = k.shape[1], k.shape[2]
    scalars, meta = _common_args(q, k, v, dout, lists, sc)
    dkdv = (q, k, v, dout, lse, delta, dk, dv, lists.q_num, lists.q_idx, lists.tile, lists.bits)
    dq_ = (q, k, v, dout, lse, delta, dq, lists.kv_num, lists.kv_idx, lists.tile, lists.bits)
    return [
        KernelCall(
            attention_backward_dkdv_kernel,
            (-(-Lk // sc.launch.block_n), B * Hkv),
            (*dkdv, slopes, *scalars),
            meta,
        ),
        KernelCall(
            attention_backward_dq_kernel,
            (-(-Lq // sc.launch.block_m), B * H),
            (*dq_, slopes, *scalars),
            meta,
        ),
    ]


@torch.library.custom_op("attnkit::triton_forward", mutates_args=())
def triton_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_num: Tensor,
    kv_idx: Tensor,
    tile: Tensor,
    bits: Tensor,
    slopes: Tensor,
    scale: float,
    softcap: float,
    q_off: int,
    has_alibi: bool,
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
) -> tuple[Tensor, Tensor]:
    """Flash-attention forward: out (B, Hq, Lq, Dv) in q's dtype, lse (B, Hq, Lq) float32."""
    B, H, Lq, _ = q.shape
    out = torch.empty(B, H, Lq, v.shape[3], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    lists = TileLists(kv_num, kv_idx, kv_num, kv_idx, tile, bits)  # the column lists go unused
    sc = Scalars(scale, softcap, q_off, has_alibi, Launch(block_m, block_n, num_warps, num_stages))
    for call in forward_calls(q, k, v, out, lse, lists, slopes, sc):
        call.launch()
    return out, lse


@triton_forward.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, *args: Any) -> tuple[Tensor, Tensor]:
    B, H, Lq, _ = q.shape
    return q.new_empty(B, H, Lq, v.shape[3]), q.new_empty(B, H, Lq, dtype=torch.float32)


@torch.library.custom_op("attnkit::triton_backward", mutates_args=())
def triton_backward(
    dout: Tensor,
    dlse: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    kv_num: Tensor,
    kv_idx: Tensor,
    q_num: Tensor,
    q_idx: Tensor,
    tile: Tensor,
    bits: Tensor,
    slopes: Tensor,
    scale: float,
    softcap: float,
    q_off: int,
    has_alibi: bool,
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """FlashAttention-2 backward: (dq, dk, dv).

    Preprocess: delta = rowsum(dO ∘ O) - dLSE (the LSE's own gradient enters as dS += P·dLSE).
    """
    dout = dout.contiguous()
    delta = ((dout.float() * out.float()).sum(-1) - dlse.float()).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    lists = TileLists(kv_num, kv_idx, q_num, q_idx, tile, bits)
    sc = Scalars(scale, softcap, q_off, has_alibi, Launch(block_m, block_n, num_warps, num_stages))
    for call in backward_calls(q, k, v, dout, lse, delta, dq, dk, dv, lists, slopes, sc):
        call.launch()
    return dq, dk, dv


@triton_backward.register_fake
def _(
    dout: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, *args: Any
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def run(req: Request) -> tuple[Tensor, Tensor]:
    """Output (B, Hq, Lq, Dv) in q's dtype and LSE (B, Hq, Lq) float32."""
    mods = kernel_mods(req.score_mod_source) or KernelMods()
    s = req.shapes
    launch = choose_launch(max(s.D, s.Dv), req.q.dtype, gpu_arch(req.q.device))
    lists = tile_lists(req, launch)
    slopes = (mods.slopes if mods.slopes is not None else torch.zeros(1)).float().to(req.q.device)
    q, k, v = req.q.contiguous(), req.k.contiguous(), req.v.contiguous()
    args = (
        q,
        k,
        v,
        lists.kv_num,
        lists.kv_idx,
        lists.tile,
        lists.bits,
        slopes,
        req.scale,
        mods.softcap,
        s.Lk - s.Lq,
        mods.slopes is not None,
        launch.block_m,
        launch.block_n,
        launch.num_warps,
        launch.num_stages,
    )
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        out, lse = _TritonAttention.apply(  # type: ignore[no-untyped-call]
            lists.q_num, lists.q_idx, *args
        )
    else:
        out, lse = triton_forward(*args)
    return out, lse


class _TritonAttention(torch.autograd.Function):
    """Autograd over the two custom ops; carries the column lists the dK/dV kernel walks."""

    @staticmethod
    def forward(ctx: Any, q_num: Tensor, q_idx: Tensor, *args: Any) -> tuple[Tensor, Tensor]:
        out, lse = triton_forward(*args)
        q, k, v, kv_num, kv_idx, tile, bits, slopes = args[:8]
        ctx.save_for_backward(q, k, v, out, lse, kv_num, kv_idx, q_num, q_idx, tile, bits, slopes)
        ctx.params = args[8:]
        return out, lse

    @staticmethod
    def backward(ctx: Any, dout: Tensor | None, dlse: Tensor | None) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse, kv_num, kv_idx, q_num, q_idx, tile, bits, slopes = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout
        dlse = torch.zeros_like(lse) if dlse is None else dlse
        dq, dk, dv = triton_backward(
            dout,
            dlse,
            q,
            k,
            v,
            out,
            lse,
            kv_num,
            kv_idx,
            q_num,
            q_idx,
            tile,
            bits,
            slopes,
            *ctx.params,
        )
        return (None, None, dq, dk, dv, *([None] * (len(ctx.params) + 5)))
