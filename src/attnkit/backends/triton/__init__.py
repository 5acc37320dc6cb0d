"""The triton backend: flash attention on GPUs (and on CPUs under TRITON_INTERPRET=1).

Forward and backward kernels in ``kernels.py``; this module validates the request, picks tile
sizes, turns the BlockMask into per-row and per-column lists of non-empty tiles (or, for a
causal or sliding-window mask, hands the kernels its band of diagonals instead), and wraps the
kernels in torch custom ops (``attnkit::triton_forward`` / ``attnkit::triton_backward``) with
autograd, so they work under torch.compile.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from attnkit._types import EMPTY
from attnkit.backends._common import Request, first_order_only, inside_torch_func
from attnkit.backends.sdpa import attends_every_key
from attnkit.backends.tiled import TileConfig, block_mask_for
from attnkit.block_mask import BlockMask, partial_bitmaps, retile
from attnkit.masks import Mask, band
from attnkit.score_mods import KernelMods, kernel_mods

NAME = "triton"
#: Set to 1 to time a few tile variants per kernel on first use (``autotune.py``).
AUTOTUNE_ENV = "ATTNKIT_TRITON_AUTOTUNE"


#: whether the triton package can be imported (looked up once: it is asked at every call)
_INSTALLED = importlib.util.find_spec("triton") is not None


def installed() -> bool:
    """Whether the triton package can be imported."""
    return _INSTALLED


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
    if (why := inside_torch_func()) is not None:
        return why
    # (batch, head) slices are reached in 64-bit arithmetic, offsets within one are 32-bit
    largest = max(*(_slice_extent(t) for t in (req.q, req.k, req.v)), s.Lq * s.Dv)  # + out
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


def kernel_input(x: Tensor) -> Tensor:
    """``x`` as the kernels read it: through its strides, only the head dim contiguous.

    A KV cache's keys (a prefix of a longer buffer) or heads transposed out of (B, L, H, D)
    go in without a copy.
    """
    return x if x.stride(-1) == 1 else x.contiguous()


def _slice_extent(x: Tensor) -> int:
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


def with_gradient(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` and an empty gradient of the same strides (a kernel stores it through x's).

    A layout that is not dense (a view into a longer buffer, an expanded tensor) has no
    gradient of its strides; it is copied to a contiguous one first.
    """
    grad = torch.empty_like(x)  # keeps x's strides exactly when x is dense
    if grad.stride() != x.stride():
        x = x.contiguous()
        grad = torch.empty_like(x)
    return x, grad


@dataclass(frozen=True)
class Launch:
    """One kernel's tile sizes and launch parameters."""

    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class Launches:
    """Tiles per kernel: each walks the BlockMask at its own tile sizes.

    The forward and dQ kernels run one program per query tile and loop over key tiles; dK/dV
    runs one per key tile and loops over query tiles, so it wants the opposite shape.
    """

    forward: Launch
    dkdv: Launch
    dq: Launch


def gpu_arch(device: torch.device) -> int | None:
    """Compute capability as one number (sm_90 → 90), None off CUDA (the interpreter)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def _same(launch: Launch) -> Launches:
    return Launches(launch, launch, launch)


# Tiles per arch family, head-dim bucket and kernel: the largest whose kernel spills at most
# 16 B per thread (with and without GQA, ALiBi and softcap) and fits the arch's shared
# memory; on sm_90 / sm_100 also those whose dots become wgmma / tcgen05 (their tensor-core
# instructions; wgmma needs 64 rows per warpgroup). Among equal areas, forward and dQ take
# more query rows (the tile they keep), dK/dV more key rows. Compiled by `python -m
# attnkit.backends.triton.aot --launch ...` over 32/64/128-row tiles, 4/8 warps, 1-3 stages
# (benchmarks/results/triton_resources.md lists the chosen ones). Compiler figures, not
# timings: no GPU was at hand to time them. sm_86/89/120 have 99 KB of shared memory (sm_80
# 163, sm_90/100 227). sm_89 takes sm_86's tiles, sm_103 sm_100's.
_TILES = {
    90: {
        64: Launches(Launch(128, 128, 8, 3), Launch(32, 128, 8, 3), Launch(128, 128, 8, 3)),
        128: Launches(Launch(128, 128, 8, 3), Launch(32, 128, 8, 3), Launch(128, 64, 8, 3)),
        # no dK/dV tiling tried kept wgmma without spilling at D=256
        256: Launches(Launch(128, 64, 8, 3), Launch(64, 32, 8, 1), Launch(128, 32, 8, 3)),
    },
    100: {  # Hopper's largest tiles spill here (80-144 B) or overflow shared memory
        64: Launches(Launch(128, 64, 8, 3), Launch(64, 128, 8, 3), Launch(128, 64, 8, 3)),
        128: Launches(Launch(128, 64, 8, 3), Launch(32, 128, 8, 3), Launch(128, 64, 8, 3)),
        256: Launches(Launch(128, 32, 8, 3), Launch(32, 64, 8, 3), Launch(128, 32, 8, 3)),
    },
    80: {
        64: Launches(Launch(128, 64, 8, 3), Launch(128, 32, 8, 3), Launch(128, 64, 8, 3)),
        128: Launches(Launch(64, 128, 8, 3), Launch(64, 64, 8, 3), Launch(64, 128, 8, 3)),
        256: Launches(Launch(128, 32, 8, 3), Launch(64, 32, 8, 2), Launch(64, 64, 8, 3)),
    },
    86: {
        64: Launches(Launch(128, 64, 8, 3), Launch(32, 128, 8, 3), Launch(128, 64, 8, 3)),
        128: Launches(Launch(128, 32, 8, 3), Launch(64, 64, 8, 3), Launch(64, 64, 8, 3)),
        256: Launches(Launch(64, 32, 8, 2), Launch(32, 32, 8, 2), Launch(64, 32, 8, 1)),
    },
    120: {
        64: Launches(Launch(128, 64, 8, 3), Launch(128, 32, 8, 3), Launch(128, 32, 8, 3)),
        128: Launches(Launch(64, 128, 8, 3), Launch(32, 64, 8, 3), Launch(64, 64, 8, 3)),
        256: Launches(Launch(64, 32, 8, 2), Launch(32, 32, 8, 2), Launch(64, 32, 8, 1)),
    },
}
# fp32 multiplies exactly on CUDA cores (FMA dots), which spill at every tile size tried;
# small tiles keep it within shared memory. `auto` sends fp32 to SDPA where SDPA can serve it.
_FP32 = {
    64: _same(Launch(32, 32, 4, 2)),
    128: _same(Launch(32, 32, 4, 2)),
    256: _same(Launch(16, 16, 2, 1)),
}


def choose_launches(D: int, dtype: torch.dtype, arch: int | None) -> Launches:
    """Tiles per kernel for a head dim, dtype and GPU arch.

    ``arch`` None is the interpreter, where small tiles keep it quick.
    ``tests/test_triton_aot.py`` compiles the choices for sm_80/86/90/100/120 and checks they
    fit and (in 16 bits) do not spill.
    """
    if arch is None:
        return _same(Launch(16, 16, 1, 1))
    bucket = 64 if D <= 64 else 128 if D <= 128 else 256
    if dtype == torch.float32:
        return _FP32[bucket]
    # sm_90/100/103 have 227 KB of shared memory per block, sm_80/87 163 KB, the rest 99 KB
    if arch >= 90:
        family = 120 if arch >= 120 else 100 if arch >= 100 else 90
    else:
        family = 80 if arch in (80, 87) else 86
    return _TILES[family][bucket]


#: Streaming multiprocessors the interpreter pretends to have, so that its small test shapes
#: take the split path too (a GPU reports its own).
INTERPRETER_SMS = 4
#: at most this many splits of a row's kv tiles (FlashAttention-2's limit)
MAX_KV_SPLITS = 128


#: Set False to run decoding with one program per query head and query tile, unpacked
#: (``decoding_launch``); the GPU benchmark's decoding table times both.
PACK_GQA = True


def decoding_launch(forward: Launch, group: int, Lq: int) -> Launch | None:
    """The forward tile of an inference call whose queries are few, or None when they are not.

    When the Lq queries of all ``group`` (G) query heads that share a kv head fit in one
    forward tile, one program per (batch, kv head) takes them all in a tile of G·Lq rows
    rounded up to a power of two, at least 16 (FlashAttention-3's PackGQA): the kv head's
    keys and values are read once instead of G times, and a decoding step (Lq = 1) does not
    multiply a forward tile of 128 rows of which one is used. The tile is never larger than
    the forward one, so no program does more work. At most four warps up to 64 rows: there
    is no work for eight.
    """
    rows = group * Lq
    if not PACK_GQA or rows > forward.block_m:
        return None
    tile = _pow2(rows)
    warps = min(4, forward.num_warps) if tile <= 64 else forward.num_warps
    return Launch(tile, forward.block_n, warps, forward.num_stages)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def kv_splits(programs: int, kv_tiles: int, sm_count: int) -> int:
    """How many programs share each row's kv tiles in an inference forward (FlashDecoding).

    Decoding runs one query tile per (batch, head): B·H programs, too few to fill a GPU's
    SMs, each walking the whole cache. Split, each takes a part of the row's non-empty tiles
    and the partial results are merged by their LSEs. This is FlashAttention-2's
    ``num_splits_heuristic``: no split where ``programs`` fill 80 % of the SMs; otherwise the
    fewest splits whose waves of programs are at least 85 % as full as the best count's,
    skipping counts that give the same tiles per split as one fewer. ``kv_tiles``: the kv tiles
    of a row (the sequence's, an upper bound on the non-empty ones).
    """
    if programs >= 0.8 * sm_count:
        return 1
    largest = max(1, min(MAX_KV_SPLITS, sm_count, kv_tiles))

    def eligible(n: int) -> bool:
        return n == 1 or -(-kv_tiles // n) != -(-kv_tiles // (n - 1))

    def fullness(n: int) -> float:
        waves = programs * n / sm_count
        return waves / math.ceil(waves)

    counts = [n for n in range(1, largest + 1) if eligible(n)]
    best = max(fullness(n) for n in counts)
    return next(n for n in counts if fullness(n) >= 0.85 * best)


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


@dataclass(frozen=True)
class TileWalk:
    """The BlockMask as one kernel walks it, at that kernel's tile sizes.

    Per program (a query-tile row, or a key-tile column for dK/dV): ``num`` (B|1, H|1, n) the
    number of non-empty tiles and ``idx`` (B|1, H|1, n, m) their indices, non-empty first;
    ``tile`` (B|1, H|1, nQ, nK) each partial tile's row in ``bits`` (nPartial, block_m,
    block_n), else -1.
    """

    num: Tensor
    idx: Tensor
    tile: Tensor
    bits: Tensor


def tile_walk(req: Request, launch: Launch, by_columns: bool = False) -> TileWalk:
    """The request's mask as a kernel with ``launch``'s tiles reads it, on q's device.

    A BlockMask given at other tile sizes is re-tiled exactly. Built once per BlockMask, tile
    size and device (masks cache their BlockMasks, so every layer and step reuses it). Where
    every key is kept, no BlockMask is built (``keeps_every_key``); nor where the kernels
    compute the mask themselves (``kernel_band``): they are given a walk they do not read.
    """
    s = req.shapes
    if keeps_every_key(req.mask, s.Lq, s.Lk):
        return _full_walk(s.Lq, s.Lk, launch, by_columns, req.q.device)
    if kernel_band(req):
        return _unread_walk(req.q.device)
    bm = block_mask_for(req, TileConfig(launch.block_m, launch.block_n, launch.block_n))
    bm = retile(bm, launch.block_m, launch.block_n)
    dev = req.q.device
    return bm.derived(
        ("triton_tile_walk", by_columns, str(dev)), lambda: _build_walk(bm, by_columns, dev)
    )


def keeps_every_key(mask: object, Lq: int, Lk: int) -> bool:
    """No mask, or one whose spec hides no key (``sdpa.attends_every_key``).

    ``full()``, and a decoding step under bottom-right causal or under a window that reaches
    the cache's first key (a windowed ``KVCache``).
    """
    return mask is None or attends_every_key(mask, Lq, Lk)


#: Set False to walk causal and sliding-window masks through tile lists and bitmaps like any
#: other mask (``kernel_band``); the GPU benchmark's tables time both.
BAND_IN_KERNEL = True


def kernel_band(req: Request) -> tuple[int, ...]:
    """(lo, hi) where the kernels compute the request's mask themselves, else ().

    A causal or sliding-window mask keeps the band lo <= j - i <= hi (``masks.band``): each
    program finds the tiles its band reaches from its own bounds and masks only those that
    the band's edge crosses (every tile with ALiBi), by comparing indices. No BlockMask, tile
    lists or bitmaps are built, read or sent to the GPU, so a decoding step under a window
    costs the host what one without a mask does (a window over a growing cache built a tile
    map at every step).

    Not where every key is kept (``keeps_every_key``: nothing to compare), nor where the
    band's indices would pass 2^30 (32-bit arithmetic in the kernels), nor with softcap: with
    it the band's kernels spilled registers where the walked ones do not (32-192 B: sm_90's
    D=64 dQ and sm_100's D=64 dK/dV with GQA, ``python -m attnkit.backends.triton.aot
    --band --softcap 30 --gqa-group 4``).
    """
    mask, s = req.mask, req.shapes
    if not BAND_IN_KERNEL or not isinstance(mask, Mask) or keeps_every_key(mask, s.Lq, s.Lk):
        return ()
    mods = kernel_mods(req.score_mod_source)
    if mods is None or mods.softcap > 0:
        return ()
    found = band(mask, s.Lq, s.Lk)
    if found is None or max(map(abs, found)) + s.Lq + s.Lk >= 2**30:
        return ()
    return found


def band_launches(launches: Launches) -> Launches:
    """The tiles of kernels that compute a band mask (``kernel_band``): one stage fewer.

    Their loops' key (or query) tiles follow from the loop counter, not from a tile list
    loaded in the loop, so Triton's pipeliner buffers every stage of them where the walked
    kernels' loads wait a stage on their index. At the table's stages they took up to 64 KB
    more shared memory, past the limits of sm_80/86/120 at D=128 and of sm_90/100 at D=256.
    One stage fewer buffers about as many tiles as the walked kernels do: every arch and head
    dim then fits and spills at most 16 B (``tests/test_triton_aot.py`` compiles them).
    """
    return Launches(
        *(
            replace(x, num_stages=max(1, x.num_stages - 1))
            for x in (launches.forward, launches.dkdv, launches.dq)
        )
    )


#: Per device, the walk handed to kernels that compute their mask (``kernel_band``): unread
_UNREAD_WALKS: dict[torch.device, TileWalk] = {}


def _unread_walk(dev: torch.device) -> TileWalk:
    if dev not in _UNREAD_WALKS:
        one = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=dev)
        _UNREAD_WALKS[dev] = TileWalk(one, one, one, torch.zeros(1, dtype=torch.int8, device=dev))
    return _UNREAD_WALKS[dev]


def row_kv_tiles(req: Request, launch: Launch) -> int:
    """At most how many kv tiles of ``launch`` a program of the forward visits.

    The sequence's tiles; under a ``kernel_band``, those the band of a query tile reaches.
    """
    Lq, Lk = req.shapes.Lq, req.shapes.Lk
    tiles = -(-Lk // launch.block_n)
    if found := kernel_band(req):
        # keys of one tile of rows span its height plus the band's width, over at most one
        # more tile than they fill
        width = min(launch.block_m, Lq) - 1 + max(0, found[1] - found[0] + 1)
        tiles = min(tiles, -(-width // launch.block_n) + 1)
    return tiles


#: walks of every tile full, by tile counts: the same for every cache length of nK tiles
_FULL_WALKS: dict[tuple[Any, ...], TileWalk] = {}


def _full_walk(Lq: int, Lk: int, launch: Launch, by_columns: bool, dev: torch.device) -> TileWalk:
    """The walk of a mask that keeps every key, made once per tile counts and device.

    A decoding loop's cache grows by a key per step: building a BlockMask and its tile lists
    anew at each step took 0.5-0.6 ms of host time more (ad hoc, on the README's 2-core VM),
    many times a decoding step's kernel on a GPU.
    """
    nQ, nK = -(-Lq // launch.block_m), -(-Lk // launch.block_n)
    key = (nQ, nK, launch.block_m, launch.block_n, by_columns, str(dev))
    if (walk := _FULL_WALKS.get(key)) is None:
        rows, cols = (nK, nQ) if by_columns else (nQ, nK)
        walk = TileWalk(
            num=torch.full((1, 1, rows), cols, dtype=torch.int32, device=dev),
            idx=torch.arange(cols, dtype=torch.int32, device=dev).repeat(1, 1, rows, 1),
            tile=torch.full((1, 1, nQ, nK), -1, dtype=torch.int32, device=dev),
            bits=torch.zeros(0, launch.block_m, launch.block_n, dtype=torch.int8, device=dev),
        )
        if len(_FULL_WALKS) >= 1024:  # lengths up to 128k keys in 128-key tiles, and more
            _FULL_WALKS.clear()
        _FULL_WALKS[key] = walk
    return walk


def _build_walk(bm: BlockMask, by_columns: bool, dev: torch.device) -> TileWalk:
    empty = (bm.kinds.cpu() == EMPTY).to(torch.int8)
    if by_columns:
        empty = empty.transpose(-1, -2).contiguous()
    tile, bits = bm.derived(("triton_bitmaps", str(dev)), lambda: _bitmaps_on(bm, dev))
    return TileWalk(
        num=(1 - empty).sum(-1).to(torch.int32).contiguous().to(dev),
        idx=torch.argsort(empty, dim=-1, stable=True).to(torch.int32).contiguous().to(dev),
        tile=tile,
        bits=bits,
    )


def _bitmaps_on(bm: BlockMask, dev: torch.device) -> tuple[Tensor, Tensor]:
    tile_index, bitmaps = partial_bitmaps(bm)
    return (
        tile_index.to(torch.int32).contiguous().to(dev),
        bitmaps.to(torch.int8).contiguous().to(dev),
    )


def dot_precision(dtype: torch.dtype) -> str:
    """How tl.dot multiplies fp32 tiles: TF32 only where torch allows it for matmuls too.

    fp16/bf16 tiles are multiplied exactly either way; this matters for fp32 inputs, which would
    otherwise silently run in TF32 (10-bit mantissa) on Ampere and newer. Under the interpreter
    bf16 tiles are "widen"ed to fp32 first: it would multiply their bit patterns (kernels._dot).
    """
    if dtype == torch.bfloat16 and _interpreting():
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
        "BLOCK_M": launch.block_m,
        "BLOCK_N": launch.block_n,
        "BLOCK_D": _pow2(D),
        "BLOCK_DV": _pow2(Dv),
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
    from attnkit.backends.triton.kernels import attention_forward_kernel

    B, H, Lq = q.shape[:3]
    scalars, meta = _common_args(q, k, v, out[0], walk, sc, launch)
    tensors = (q, k, v, out, lse, walk.num, walk.idx, walk.tile, walk.bits, slopes)
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
    from attnkit.backends.triton.kernels import (
        attention_backward_dkdv_kernel,
        attention_backward_dq_kernel,
    )

    B, H, Lq = q.shape[:3]
    Hkv, Lk = k.shape[1], k.shape[2]
    dkdv_scalars, dkdv_meta = _common_args(q, k, v, dout, dkdv_walk, sc, dkdv_launch)
    dq_scalars, dq_meta = _common_args(q, k, v, dout, dq_walk, sc, dq_launch)
    w1, w2 = dkdv_walk, dq_walk
    dkdv = (q, k, v, dout, lse, delta, dk, dv, w1.num, w1.idx, w1.tile, w1.bits, slopes)
    dq_ = (q, k, v, dout, lse, delta, dq, w2.num, w2.idx, w2.tile, w2.bits, slopes)
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


# Custom-op schemas take tensors, scalars and int lists: a TileWalk travels as its four
# tensors and a Launch as [block_m, block_n, num_warps, num_stages].


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
    walk = TileWalk(num, idx, tile, bits)
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
    dq_num: Tensor,
    dq_idx: Tensor,
    dq_tile: Tensor,
    dq_bits: Tensor,
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
    dout = dout.contiguous()
    delta = ((dout.float() * out.float()).sum(-1) - dlse.float()).contiguous()
    (q, dq), (k, dk), (v, dv) = (with_gradient(x) for x in (q, k, v))
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
        TileWalk(dkdv_num, dkdv_idx, dkdv_tile, dkdv_bits),
        TileWalk(dq_num, dq_idx, dq_tile, dq_bits),
        slopes,
        Scalars(scale, softcap, q_off, has_alibi, tuple(band)),
        Launch(*dkdv_launch),
        Launch(*dq_launch),
    ):
        call.launch()
    return dq, dk, dv


triton_backward = torch.library.custom_op("attnkit::triton_backward", _backward, mutates_args=())


@triton_backward.register_fake
def _(
    dout: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, *args: Any
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _walk_args(walk: TileWalk) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return walk.num, walk.idx, walk.tile, walk.bits


def _launch_args(launch: Launch) -> list[int]:
    return [launch.block_m, launch.block_n, launch.num_warps, launch.num_stages]


def run(req: Request) -> tuple[Tensor, Tensor]:
    """Output (B, Hq, Lq, Dv) in q's dtype and LSE (B, Hq, Lq) float32."""
    mods = kernel_mods(req.score_mod_source) or KernelMods()
    s = req.shapes
    launches = choose_launches(max(s.D, s.Dv), req.q.dtype, gpu_arch(req.q.device))
    slopes = _slopes(mods, s.Hq, req.q.device)
    q, k, v = (kernel_input(x) for x in (req.q, req.k, req.v))
    band = list(kernel_band(req))
    scalars = (req.scale, mods.softcap, s.Lk - s.Lq, mods.slopes is not None, band)
    if band:
        launches = band_launches(launches)
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
        *_walk_args(tile_walk(req, launches.forward)),
        *_walk_args(tile_walk(req, launches.dkdv, by_columns=True)),
        *_walk_args(tile_walk(req, launches.dq)),
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
    splits = kv_splits(programs, row_kv_tiles(req, launch), _sm_count(req.q.device))
    args = (*_walk_args(walk), slopes, *scalars, _launch_args(launch), splits, packed)
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

    After q, k, v and slopes come the forward's, dK/dV's and dQ's tile walks (four tensors
    each), the scalars, then the three launches.
    """

    @staticmethod
    def forward(
        ctx: Any, q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, *rest: Any
    ) -> tuple[Tensor, Tensor]:
        walks, params = rest[:12], rest[12:]
        scalars, (forward_launch, dkdv_launch, dq_launch) = params[:5], params[5:]
        forward: Any = _forward if _eager() else triton_forward
        out, lse = forward(q, k, v, *walks[:4], slopes, *scalars, forward_launch)
        ctx.save_for_backward(q, k, v, out, lse, slopes, *walks[4:])
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
