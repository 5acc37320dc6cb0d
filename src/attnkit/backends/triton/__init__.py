"""The triton backend: flash attention on GPUs (and on CPUs under TRITON_INTERPRET=1).

One kernel per file: ``forward_kernel.py``, ``backward_dkdv_kernel.py`` and
``backward_dq_kernel.py`` (their shared helpers in ``kernel_parts.py``). ``launches.py`` picks
tile sizes, ``walks.py`` turns the mask into the tiles each program visits, ``calls.py``
builds the launches. This module decides whether the backend can serve a request and wraps the
kernels in torch custom ops (``attnkit::triton_forward`` / ``attnkit::triton_backward``) with
autograd, so they work under torch.compile.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from attnkit._types import ScoreModFn
from attnkit.backends._common import Request, first_order_only, inside_torch_func
from attnkit.backends.triton.calls import (
    Scalars,
    backward_calls,
    forward_calls,
    kernel_input,
    slice_extent,
    walk_tensors,
    with_gradient,
)
from attnkit.backends.triton.launches import (
    Launch,
    Launches,
    band_launches,
    choose_launches,
    decoding_launch,
    gpu_arch,
    interpreting,
    kv_splits,
    sm_count,
)
from attnkit.backends.triton.walks import (
    TileWalk,
    kernel_band,
    kernel_ranges,
    row_kv_tiles,
    tile_walk,
)
from attnkit.masks import Mask
from attnkit.score_mods import KernelMods, ScoreMod, kernel_mods

NAME = "triton"
#: Set to 1 to time a few tile variants per kernel on first use (``autotune.py``).
AUTOTUNE_ENV = "ATTNKIT_TRITON_AUTOTUNE"


#: whether the triton package can be imported (looked up once: it is asked at every call)
_INSTALLED = importlib.util.find_spec("triton") is not None


def installed() -> bool:
    """Whether the triton package can be imported."""
    return _INSTALLED


def unsupported_reason(req: Request) -> str | None:
    """Why the triton kernels cannot serve ``req``, or None when they can."""
    if not installed():
        return "triton is not installed (pip install 'attnkit[triton]')"
    dev = req.q.device.type
    if dev != "cuda" and not (dev == "cpu" and interpreting()):
        return f"triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {dev}"
    if req.q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"triton kernels take float16, bfloat16 or float32, got {req.q.dtype}"
    s = req.shapes
    if max(s.D, s.Dv) > 256:
        return f"head dims up to 256 are supported, got D={s.D}, Dv={s.Dv}"
    if (why := inside_torch_func()) is not None:
        return why
    if torch.compiler.is_exporting():
        return (
            "not under torch.export: the launcher picks tiles, GQA packing and kv splits from "
            "concrete sizes and keeps tile lists in host-side caches (sdpa serves exported graphs)"
        )
    # (batch, head) slices are reached in 64-bit arithmetic, offsets within one are 32-bit
    largest = max(*(slice_extent(t) for t in (req.q, req.k, req.v)), s.Lq * s.Dv)  # + out
    if largest >= 2**31:
        return (
            "the kernels index within one (batch, head) slice with 32-bit offsets; "
            f"a slice here spans {largest} >= 2^31 elements"
        )
    if req.seed is not None:
        return "dropout is not implemented in the triton kernels (use tiled)"
    mods = kernel_mods(req.score_mod_source)
    if mods is None:
        return "only alibi, softcap and compose(alibi, softcap) score_mods run in-kernel"
    if mods.learns_slopes:
        return "ALiBi slopes that require grad get their gradient from reference or tiled only"
    return None


# Custom-op schemas take tensors, scalars and int lists: a TileWalk travels as its six
# tensors and a Launch as [block_m, block_n, num_warps, num_stages].
_WALK = len(dataclasses.fields(TileWalk))  # tensors per walk


def _eager() -> bool:
    """Whether a call may run the kernels directly, not through their custom ops.

    The ops are what torch.compile, export and fake tensors must see; eager calls skip their
    Python dispatch, which with the host work below took a decoding step's launcher from
    260-315 µs to 160-175 µs (ad hoc timeit, kernel launch stubbed out, on the README's
    2-core VM) — more than a decoding step's kernel takes on a GPU either way.
    """
    return not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None


def _forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    num: Tensor,
    idx: Tensor,
    tile: Tensor,
    bits: Tensor,
    ranges: Tensor,
    keys: Tensor,
    slopes: Tensor,
    scale: float,
    softcap: float,
    q_off: int,
    has_alibi: bool,
    band: list[int],
    launch: list[int],
    splits: int = 1,
    pack_gqa: bool = False,
) -> tuple[Tensor, Tensor]:
    """Flash-attention forward: out (B, Hq, Lq, Dv) in q's dtype, lse (B, Hq, Lq) float32.

    ``splits`` > 1 splits each row's kv tiles over that many programs (FlashDecoding) whose
    float32 partial results are merged by their LSEs. ``pack_gqa``: see ``forward_calls``.
    """
    B, H, Lq, _ = q.shape
    parts = q.dtype if splits == 1 else torch.float32
    out = torch.empty(splits, B, H, Lq, v.shape[3], dtype=parts, device=q.device)
    lse = torch.empty(splits, B, H, Lq, dtype=torch.float32, device=q.device)
    sc = Scalars(scale, softcap, q_off, has_alibi, tuple(band))
    walk = TileWalk(num, idx, tile, bits, ranges, keys)
    for call in forward_calls(q, k, v, out, lse, walk, slopes, sc, Launch(*launch), pack_gqa):
        call.launch()
    if splits == 1:
        return out[0], lse[0]
    from attnkit.distributed.merge import merge_stacked

    merged, merged_lse = merge_stacked(out, lse)
    return merged.to(q.dtype), merged_lse


triton_forward = torch.library.custom_op("attnkit::triton_forward", _forward, mutates_args=())


@triton_forward.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, *args: Any) -> tuple[Tensor, Tensor]:
    B, H, Lq, _ = q.shape
    return q.new_empty(B, H, Lq, v.shape[3]), q.new_empty(B, H, Lq, dtype=torch.float32)


def _backward(
    dout: Tensor,
    dlse: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dkdv_num: Tensor,
    dkdv_idx: Tensor,
    dkdv_tile: Tensor,
    dkdv_bits: Tensor,
    dkdv_ranges: Tensor,
    dkdv_keys: Tensor,
    dq_num: Tensor,
    dq_idx: Tensor,
    dq_tile: Tensor,
    dq_bits: Tensor,
    dq_ranges: Tensor,
    dq_keys: Tensor,
    slopes: Tensor,
    scale: float,
    softcap: float,
    q_off: int,
    has_alibi: bool,
    band: list[int],
    dkdv_launch: list[int],
    dq_launch: list[int],
) -> tuple[Tensor, Tensor, Tensor]:
    """FlashAttention-2 backward: (dq, dk, dv).

    Preprocess: delta = rowsum(dO ∘ O) - dLSE (the LSE's own gradient enters as dS += P·dLSE).
    """
    return _launch_backward(
        dout,
        dlse,
        q,
        k,
        v,
        out,
        lse,
        TileWalk(dkdv_num, dkdv_idx, dkdv_tile, dkdv_bits, dkdv_ranges, dkdv_keys),
        TileWalk(dq_num, dq_idx, dq_tile, dq_bits, dq_ranges, dq_keys),
        slopes,
        Scalars(scale, softcap, q_off, has_alibi, tuple(band)),
        Launch(*dkdv_launch),
        Launch(*dq_launch),
    )


def _launch_backward(
    dout: Tensor,
    dlse: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dkdv_walk: TileWalk,
    dq_walk: TileWalk,
    slopes: Tensor,
    sc: Scalars,
    dkdv_launch: Launch,
    dq_launch: Launch,
    grad_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward's preprocess and launches: gradients in ``grad_dtype`` (default: q's)."""
    dout, lse = dout.contiguous(), lse.contiguous()  # (a ring's blocks pass slices of them)
    delta = ((dout.float() * out.float()).sum(-1) - dlse.float()).contiguous()
    (q, dq), (k, dk), (v, dv) = (with_gradient(x, grad_dtype) for x in (q, k, v))
    for call in backward_calls(
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dq,
        dk,
        dv,
        dkdv_walk,
        dq_walk,
        slopes,
        sc,
        dkdv_launch,
        dq_launch,
    ):
        call.launch()
    return dq, dk, dv


triton_backward = torch.library.custom_op("attnkit::triton_backward", _backward, mutates_args=())


@triton_backward.register_fake
def _(
    dout: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, *args: Any
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _launch_args(launch: Launch) -> list[int]:
    return [launch.block_m, launch.block_n, launch.num_warps, launch.num_stages]


def _setup(req: Request) -> tuple[Launches, Tensor, tuple[float, float, int, bool, list[int]]]:
    """The request's launches, ALiBi slopes and kernel scalars."""
    mods = kernel_mods(req.score_mod_source) or KernelMods()
    s = req.shapes
    launches = choose_launches(max(s.D, s.Dv), req.q.dtype, gpu_arch(req.q.device))
    band = list(kernel_band(req))
    if band or kernel_ranges(req) is not None:
        launches = band_launches(launches)
    scalars = (req.scale, mods.softcap, mods.offset_for(s.Lq, s.Lk), mods.slopes is not None, band)
    return launches, _slopes(mods, s.Hq, req.q.device), scalars


def run(req: Request) -> tuple[Tensor, Tensor]:
    """Output (B, Hq, Lq, Dv) in q's dtype and LSE (B, Hq, Lq) float32."""
    launches, slopes, scalars = _setup(req)
    q, k, v = (kernel_input(x) for x in (req.q, req.k, req.v))
    grads = req.needs_grad
    if os.environ.get(AUTOTUNE_ENV) == "1" and not torch.compiler.is_compiling():
        from attnkit.backends.triton import autotune

        launches = autotune.tune(req, launches, Scalars(*scalars), slopes, grads)
    if not grads:
        return _inference(req, q, k, v, slopes, scalars, launches.forward)
    out, lse = _TritonAttention.apply(  # type: ignore[no-untyped-call]
        q,
        k,
        v,
        slopes,
        *walk_tensors(tile_walk(req, launches.forward)),
        *walk_tensors(tile_walk(req, launches.dkdv, by_columns=True)),
        *walk_tensors(tile_walk(req, launches.dq)),
        *scalars,
        *(_launch_args(x) for x in (launches.forward, launches.dkdv, launches.dq)),
    )
    return out, lse


def _inference(
    req: Request,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slopes: Tensor,
    scalars: tuple[float, float, int, bool, list[int]],
    launch: Launch,
) -> tuple[Tensor, Tensor]:
    """A forward without autograd (inference, decoding).

    Query heads are packed by kv head where the queries are few (``decoding_launch``), and
    each row's kv tiles split where the programs cannot fill the GPU (``kv_splits``).
    """
    s = req.shapes
    launch, walk, packed = _inference_tiles(req, launch)
    programs = s.B * s.Hkv if packed else -(-s.Lq // launch.block_m) * s.B * s.Hq
    splits = kv_splits(programs, row_kv_tiles(req, launch), sm_count(req.q.device))
    args = (*walk_tensors(walk), slopes, *scalars, _launch_args(launch), splits, packed)
    out, lse = (_forward if _eager() else triton_forward)(q, k, v, *args)
    return out, lse


def _inference_tiles(req: Request, launch: Launch) -> tuple[Launch, TileWalk, bool]:
    """The inference forward's tiles, their walk, and whether query heads are packed."""
    packed = decoding_launch(launch, req.shapes.Hq // req.shapes.Hkv, req.shapes.Lq)
    if packed is not None:
        walk = tile_walk(req, packed)
        if walk.tile.shape[1] == 1:  # packed rows are of several heads: one mask for all
            return packed, walk, True
    return launch, tile_walk(req, launch), False


#: Per device, the slopes argument of kernels without ALiBi (which never read it): made once,
#: not at every decoding step (a host-to-device copy each time on a GPU)
_UNREAD_SLOPES: dict[torch.device, Tensor] = {}


def _slopes(mods: KernelMods, heads: int, device: torch.device) -> Tensor:
    """ALiBi slope h for query head h (a single shared slope repeated), float32 on device."""
    if mods.slopes is None:
        if device not in _UNREAD_SLOPES:
            _UNREAD_SLOPES[device] = torch.zeros(1, device=device)
        return _UNREAD_SLOPES[device]
    return mods.slopes.detach().float().to(device).expand(heads).contiguous()


class _TritonAttention(torch.autograd.Function):
    """Autograd over the forward and backward kernels (through their custom ops when compiled).

    After q, k, v and slopes come the forward's, dK/dV's and dQ's tile walks (six tensors
    each), the scalars, then the three launches.
    """

    @staticmethod
    def forward(
        ctx: Any, q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, *rest: Any
    ) -> tuple[Tensor, Tensor]:
        walks, params = rest[: 3 * _WALK], rest[3 * _WALK :]
        scalars, (forward_launch, dkdv_launch, dq_launch) = params[:5], params[5:]
        forward: Any = _forward if _eager() else triton_forward
        out, lse = forward(q, k, v, *walks[:_WALK], slopes, *scalars, forward_launch)
        ctx.save_for_backward(q, k, v, out, lse, slopes, *walks[_WALK:])
        ctx.params = (*scalars, dkdv_launch, dq_launch)
        ctx.n_inputs = 4 + len(rest)
        return out, lse

    @staticmethod
    @first_order_only("the triton backend")
    def backward(ctx: Any, dout: Tensor | None, dlse: Tensor | None) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse, slopes, *walks = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout
        dlse = torch.zeros_like(lse) if dlse is None else dlse
        backward: Any = _backward if _eager() else triton_backward
        dq, dk, dv = backward(dout, dlse, q, k, v, out, lse, *walks, slopes, *ctx.params)
        return (dq, dk, dv, *([None] * (ctx.n_inputs - 3)))


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

    Ring attention's backward on the kernels, as ``tiled.block_backward`` on CPU.

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
        score_mod: the block's score mod, one the kernels apply (ALiBi, softcap).

    Returns:
        dq (B, Hq, Lq, D), dk (B, Hkv, Lk, D), dv (B, Hkv, Lk, Dv), float32: the kernels
        store them unrounded, so that summing blocks' parts adds no 16-bit rounding per block.
    """
    from attnkit.functional import _request

    req = _request(q, k, v, mask, score_mod, scale, 0.0, None, False)
    launches, slopes, scalars = _setup(req)
    q, k, v = (kernel_input(x) for x in (req.q, req.k, req.v))
    return _launch_backward(
        dout,
        torch.zeros_like(lse) if dlse is None else dlse,
        q,
        k,
        v,
        out,
        lse,
        tile_walk(req, launches.dkdv, by_columns=True),
        tile_walk(req, launches.dq),
        slopes,
        Scalars(*scalars),
        launches.dkdv,
        launches.dq,
        grad_dtype=torch.float32,
    )
