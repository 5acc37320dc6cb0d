"""Kernel launches built from tensors, tile walks and scalars: what the custom ops run.

Also how tensors reach the kernels: read through their strides, with 64-bit offsets only where
a tensor reaches 2^31 elements, and fp32 tiles multiplied in TF32 only where torch allows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnkit.backends.triton.launches import Launch, interpreting, pow2
from attnkit.backends.triton.walks import TileWalk


def kernel_input(x: Tensor) -> Tensor:
    """``x`` as the kernels read it: through its strides, only the head dim contiguous.

    A KV cache's keys (a prefix of a longer buffer) or heads transposed out of (B, L, H, D)
    go in without a copy.
    """
    return x if x.stride(-1) == 1 else x.contiguous()


def slice_extent(x: Tensor) -> int:
    """How far the kernels' offsets reach within one (batch, head) slice of x (B, H, L, D).

    x is read in place when its head dim is contiguous, so the span of a row stride counts
    (heads transposed out of (B, L, H, D): rows H·D apart); otherwise its copy is, as are a
    non-dense layout's gradients (``with_gradient``).
    """
    L, D = x.shape[-2:]
    if x.stride(-1) != 1:
        return L * D
    return max(L * D, 1 + (L - 1) * x.stride(-2) + (D - 1))


def _reaches_2_31(x: Tensor) -> bool:
    """Whether a kernel's offsets into x reach 2^31 elements (an expanded dim adds none)."""
    if x.untyped_storage().nbytes() < 2**31 * x.element_size():
        return False  # offsets stay within x's storage; cheap, and this runs at every launch
    return sum((n - 1) * st for n, st in zip(x.shape, x.stride(), strict=True)) >= 2**31 - 1


def wide_offsets(tensors: tuple[Tensor, ...], walk: TileWalk) -> bool:
    """Whether a kernel needs 64-bit offsets: one of its tensors reaches 2^31 elements.

    ``tensors``: its q, k, v, output and gradient tensors (LSE and delta are no larger than
    the output); of the walk only the lists and bitmaps can be that large.
    """
    return any(_reaches_2_31(t) for t in (*tensors, walk.idx, walk.bits))


def with_gradient(x: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``x`` and an empty gradient of the same strides (a kernel stores it through x's).

    The gradient is in ``dtype`` (default x's). A layout that is not dense (a view into a
    longer buffer, an expanded tensor) has no gradient of its strides; it is copied to a
    contiguous one first.
    """
    grad = torch.empty_like(x, dtype=dtype)  # keeps x's strides exactly when x is dense
    if grad.stride() != x.stride():
        x = x.contiguous()
        grad = torch.empty_like(x, dtype=dtype)
    return x, grad


def dot_precision(dtype: torch.dtype) -> str:
    """How tl.dot multiplies fp32 tiles: TF32 only where torch allows it for matmuls too.

    fp16/bf16 tiles are multiplied exactly either way; this matters for fp32 inputs, which would
    otherwise silently run in TF32 (10-bit mantissa) on Ampere and newer. Under the interpreter
    bf16 tiles are "widen"ed to fp32 first: it would multiply their bit patterns (kernel_parts.dot).
    """
    if dtype == torch.bfloat16 and interpreting():
        return "widen"
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@dataclass(frozen=True)
class KernelCall:
    """One kernel launch: what the custom ops run, and what ``aot.py`` compiles for a GPU arch."""

    kernel: Any  # a triton.JITFunction
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    meta: dict[str, Any]  # constexprs, num_warps, num_stages

    def launch(self) -> None:
        """Run the kernel on the tensors in ``args``."""
        self.kernel[self.grid](*self.args, **self.meta)


@dataclass(frozen=True)
class Scalars:
    """Everything besides tensors and tiles that a launch needs."""

    scale: float
    softcap: float
    q_off: int  # Lk - Lq: where the queries sit among the keys (ALiBi's distance)
    has_alibi: bool
    band: Sequence[int] = ()  # (lo, hi): the kernels compute the mask (``kernel_band``)


def walk_tensors(walk: TileWalk) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The walk's tensors in the order every kernel and custom op takes them."""
    return walk.num, walk.idx, walk.tile, walk.bits, walk.ranges, walk.keys


def _common_args(
    q: Tensor, k: Tensor, v: Tensor, o_like: Tensor, walk: TileWalk, sc: Scalars, launch: Launch
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The scalar and stride arguments every kernel takes, and the compile-time ones.

    ``o_like`` is the output (forward) or dO (backward): its strides come last.
    """
    H, Lq, D = q.shape[1:]
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    Bm, Hm, nQ, nK = walk.tile.shape
    band_lo, band_hi = sc.band or (0, 0)
    scalars = (
        sc.scale,
        sc.softcap,
        Lq,
        Lk,
        sc.q_off,
        band_lo,
        band_hi,
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
        "BAND": bool(sc.band),
        "RANGES": walk.in_ranges,
        "BLOCK_M": launch.block_m,
        "BLOCK_N": launch.block_n,
        "BLOCK_D": pow2(D),
        "BLOCK_DV": pow2(Dv),
        "num_warps": launch.num_warps,
        "num_stages": launch.num_stages,
    }
    return scalars, meta


def forward_calls(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    walk: TileWalk,
    slopes: Tensor,
    sc: Scalars,
    launch: Launch,
    pack_gqa: bool = False,
) -> list[KernelCall]:
    """The forward launch, writing ``out`` (S, B, Hq, Lq, Dv) and ``lse`` (S, B, Hq, Lq).

    S is the number of splits of each row's kv tiles (``kv_splits``): with S > 1 these are
    partial results for ``merge_stacked``. ``walk``: the query-tile rows at ``launch``'s tiles.
    ``pack_gqa``: one program per (batch, kv head) over all its query heads' queries, in a
    ``decoding_launch`` tile; the walk's mask must be the same for every head.
    """
    from attnkit.backends.triton.forward_kernel import attention_forward_kernel

    B, H, Lq = q.shape[:3]
    scalars, meta = _common_args(q, k, v, out[0], walk, sc, launch)
    tensors = (q, k, v, out, lse, *walk_tensors(walk), slopes)
    splits = out.shape[0]
    # packed: one program per (batch, kv head); else per (query tile, batch, query head)
    programs = (1, B * k.shape[1]) if pack_gqa else (-(-Lq // launch.block_m), B * H)
    grid = (*programs, splits)
    args = (*tensors, *scalars, out.stride(0))
    meta |= {
        "SPLIT_KV": splits > 1,
        "PACK_GQA": pack_gqa,
        "WIDE_OFFSETS": wide_offsets((q, k, v, out), walk),
    }
    return [KernelCall(attention_forward_kernel, grid, args, meta)]


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
    dkdv_walk: TileWalk,
    dq_walk: TileWalk,
    slopes: Tensor,
    sc: Scalars,
    dkdv_launch: Launch,
    dq_launch: Launch,
) -> list[KernelCall]:
    """The two backward launches, no atomics.

    dK/dV per key tile (``dkdv_walk``: key-tile columns), then dQ per query tile (``dq_walk``:
    query-tile rows).
    """
    from attnkit.backends.triton.backward_dkdv_kernel import attention_backward_dkdv_kernel
    from attnkit.backends.triton.backward_dq_kernel import attention_backward_dq_kernel

    B, H, Lq = q.shape[:3]
    Hkv, Lk = k.shape[1], k.shape[2]
    dkdv_scalars, dkdv_meta = _common_args(q, k, v, dout, dkdv_walk, sc, dkdv_launch)
    dq_scalars, dq_meta = _common_args(q, k, v, dout, dq_walk, sc, dq_launch)
    w1, w2 = dkdv_walk, dq_walk
    dkdv = (q, k, v, dout, lse, delta, dk, dv, *walk_tensors(w1), slopes)
    dq_ = (q, k, v, dout, lse, delta, dq, *walk_tensors(w2), slopes)
    return [
        KernelCall(
            attention_backward_dkdv_kernel,
            (-(-Lk // dkdv_launch.block_n), B * Hkv),
            (*dkdv, *dkdv_scalars),
            {**dkdv_meta, "WIDE_OFFSETS": wide_offsets((q, k, v, dout, dk, dv), w1)},
        ),
        KernelCall(
            attention_backward_dq_kernel,
            (-(-Lq // dq_launch.block_m), B * H),
            (*dq_, *dq_scalars),
            {**dq_meta, "WIDE_OFFSETS": wide_offsets((q, k, v, dout, dq), w2)},
        ),
    ]
