"""The compiled CPU kernels of the tiled backend (csrc/: forward, backward, op registration).

Built on first use with torch's C++ extension tooling (needs a C++ compiler; cached by torch
under TORCH_EXTENSIONS_DIR) and registered as the custom ops ``torch.ops.attnkit.tiled_forward``
and ``tiled_backward``. Where they cannot be built, the tiled backend runs its PyTorch loops
instead and logs why once.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar, cast

import torch
from torch import Tensor

from attnkit import _dropout
from attnkit._symbolic import surely
from attnkit.block_mask import BlockMask, partial_bitmaps
from attnkit.score_mods import KernelMods

T = TypeVar("T")

log = logging.getLogger("attnkit")
LOG2E = 1.4426950408889634
CSRC = Path(__file__).parent / "csrc"
NO_MODS = KernelMods()
NO_DROPOUT = _dropout.kernel_args(None, 0.0)
SOURCES = [CSRC / name for name in ("ops.cpp", "tiled_forward_cpu.cpp", "tiled_backward_cpu.cpp")]


@dataclass(frozen=True)
class Band:
    """A mask the kernels compute themselves: query i attends key j where lo <= j - i <= hi.

    Causal and sliding-window masks and no mask (``masks.band``). The kernels find each tile's
    kind from its bounds and mask the band's edge tiles by comparing indices (``tile_mask.h``),
    so no BlockMask, tile map or bitmap is built: a new length costs nothing (decoding under a
    window over a growing cache built a map per step). Tiles of block_q × block_k, as a
    BlockMask's.

    ``keys`` (B or 1, Lk) bool, where given, also masks the keys each sequence pads
    (``masks.padded_band``): the kernels count each kv tile's kept keys once per call, so a
    padding mask made anew at every call builds no tile map either. The counts below are the
    band's (an upper bound), and ``==`` compares the band alone.
    """

    lo: int
    hi: int
    block_q: int
    block_k: int
    keys: Tensor | None = field(default=None, compare=False)

    def __repr__(self) -> str:
        keys = "" if self.keys is None else f", keys={tuple(self.keys.shape)}"
        return f"Band(lo={self.lo}, hi={self.hi}, tiles={self.block_q}×{self.block_k}{keys})"

    def kv_tiles(self, first_row: int, Lq: int, Lk: int) -> int:
        """How many kv tiles the query tile from ``first_row`` visits (``tile_mask.h``'s kv_tiles).

        Python ints: decoding asks for one query tile, where torch ops cost ~10x more.
        """
        keys = self.kv_keys(first_row, Lq, Lk)
        return 0 if keys is None else keys[1] // self.block_k - keys[0] // self.block_k + 1

    def kv_keys(self, first_row: int, Lq: int, Lk: int) -> tuple[int, int] | None:
        """The first and last key the query tile from ``first_row`` attends, or None."""
        first = max(first_row + self.lo, 0)
        last = min(min(first_row + self.block_q, Lq) - 1 + self.hi, Lk - 1)
        if first > last or self.lo > self.hi:
            return None
        return first, last

    def kv_tile_counts(self, Lq: int, Lk: int) -> list[int]:
        """``kv_tiles`` of every query tile."""
        return [self.kv_tiles(row, Lq, Lk) for row in range(0, Lq, self.block_q)]

    def most_kv_tiles(self, Lq: int, Lk: int) -> int:
        """``max(kv_tile_counts(Lq, Lk))`` from a few query tiles, not all of them.

        Under torch.compile the lengths may be symbolic, and a loop over every query tile
        would fix them. Where query tiles span whole kv tiles, the count rises while the
        band's first key is clamped at 0 and its last is not at Lk - 1, stays level, then
        falls: the most is at the first or last query tile or beside one of those two turns.
        """
        bq = self.block_q
        last_tile = (Lq - 1) // bq
        if bq % self.block_k:  # (default_config gives such tiles to <= 32 queries: one tile)
            return max(self.kv_tile_counts(Lq, Lk))
        # the query tiles where the first key leaves 0 and where the last one reaches Lk - 1
        turns = (-self.lo // bq, (Lk - self.hi - bq) // bq)
        tiles = [0, last_tile, *(t + d for t in turns for d in (-1, 0, 1))]
        return max(self.kv_tiles(t * bq, Lq, Lk) for t in tiles if 0 <= t <= last_tile)


@dataclass(frozen=True)
class KeyRanges:
    """A mask the kernels compute themselves: query i attends keys first[i] … last[i].

    ``ranges`` (B or 1, 2, Lq) int64 holds each query's first and last key (``masks.key_ranges``
    of packed documents, varlen batches, prefix-LM). The kernels find each query tile's least
    and greatest first and last key once per call, a tile's kind from those bounds, and mask
    the partial tiles by comparing indices (``tile_mask.h``): no BlockMask is built (a varlen
    decoding batch built one at every step). ``keys`` (B or 1, Lk) bool, where given, also
    masks the keys each sequence pads, as ``Band``'s.
    """

    ranges: Tensor = field(compare=False)
    block_q: int
    block_k: int
    keys: Tensor | None = field(default=None, compare=False)

    def __repr__(self) -> str:
        keys = "" if self.keys is None else f", keys={tuple(self.keys.shape)}"
        shape = tuple(self.ranges.shape)
        return f"KeyRanges(ranges={shape}, tiles={self.block_q}×{self.block_k}{keys})"


#: The mask of a kernel call: a BlockMask, or a band or key ranges the kernels compute.
Tiles = BlockMask | Band | KeyRanges
_NO_MAP = (  # a band's or key ranges' kinds, tile_index and bitmaps: unused
    torch.empty(0, dtype=torch.int8),
    torch.empty(0, dtype=torch.int64),
    torch.empty(0, dtype=torch.bool),
)


def _mask_args(tiles: Tiles) -> tuple[tuple[Tensor, Tensor, Tensor], dict[str, object]]:
    """The ops' (kinds, tile_index, bitmaps) and their band or ranges keywords for ``tiles``."""
    if isinstance(tiles, Band | KeyRanges):
        keys = None if tiles.keys is None else tiles.keys.to("cpu").contiguous()
        if isinstance(tiles, KeyRanges):
            ranges = tiles.ranges.to(device="cpu", dtype=torch.int64).contiguous()
            return _NO_MAP, {"ranges": ranges, "keys": keys}
        return _NO_MAP, {"band": True, "band_lo": tiles.lo, "band_hi": tiles.hi, "keys": keys}
    tile_index, bitmaps = partial_bitmaps(tiles)
    return (tiles.kinds.contiguous(), tile_index, bitmaps), {}


def _traced_as_constant(fn: Callable[[], T]) -> Callable[[], T]:
    """torch.compile calls ``fn`` once while tracing and keeps its result as a constant.

    The mark ``torch.compiler.assume_constant_result`` sets, set here: that function imports
    torch._dynamo, ~0.8 s of ``import attnkit`` (test_compile checks the two agree).
    """
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


@_traced_as_constant
def available() -> bool:
    """Build (once) and load the kernel; False, with a logged reason, where that fails."""
    return _load()


@functools.cache  # (apart from available(): dynamo traces into functools.cache wrappers)
def _load() -> bool:
    try:
        build("attnkit_tiled_forward_cpu")
    except Exception as exc:  # compiler missing, headers missing, ...
        log.warning("attnkit: compiled CPU kernel unavailable (%s); using the PyTorch loop", exc)
        return False
    _register_fakes()
    return True


def _register_fakes() -> None:
    """Shapes and dtypes of the ops' results, for torch.compile's fake tensors."""
    torch.library.register_fake("attnkit::tiled_forward", _fake_forward)
    torch.library.register_fake("attnkit::tiled_backward", _fake_backward)


def _fake_forward(
    q: Tensor, k: Tensor, v: Tensor, *args: object, **kw: object
) -> tuple[Tensor, Tensor]:
    B, H, Lq, _ = q.shape
    return q.new_empty(B, H, Lq, v.shape[3]), q.new_empty(B, H, Lq, dtype=torch.float32)


def _fake_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, *args: object, **kw: object
) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = (torch.empty_like(x, dtype=torch.float32) for x in (q, k, v))
    return dq, dk, dv


def build(name: str, defines: Sequence[str] = ()) -> None:
    """Compile and load the kernels as extension ``name`` (``-D`` flags in ``defines``).

    The default ops are ``torch.ops.attnkit.*``; tests build a second copy with
    ``ATTNKIT_OP_NAMESPACE=...`` and ``ATTNKIT_PORTABLE_SIMD`` to check the portable loops too.
    """
    from torch.utils.cpp_extension import load

    _put_ninja_on_path()
    load(
        name=name,
        sources=[str(p) for p in SOURCES],
        # -fopenmp: at::parallel_for is inline OpenMP; without it the loop runs serially.
        # -fno-trapping-math: g++ may then turn the exp2 clamp's branch into a select, so the
        # portable row loops vectorise (they ran at scalar speed, 2-3 ns per element on AVX2);
        # nothing reads floating-point exception flags, and NaN/inf semantics are unchanged.
        extra_cflags=[
            "-O3",
            "-march=native",
            "-fopenmp",
            "-fno-trapping-math",
            *(f"-D{d}" for d in defines),
        ],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )


def _put_ninja_on_path() -> None:
    """Make the pip-installed ``ninja`` of this venv visible to torch's extension builder.

    torch runs ``ninja`` from PATH, which lacks the venv's scripts folder unless the venv is
    activated.
    """
    scripts = sysconfig.get_path("scripts")
    if shutil.which("ninja") is None and shutil.which("ninja", path=scripts):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")


_NO_SLOPES = torch.empty(0)


def _slopes(mods: KernelMods, Hq: int) -> Tensor:
    """The kernels' slopes argument: float32 (Hq,) (one shared slope repeated), or empty."""
    if mods.slopes is None:
        return _NO_SLOPES
    return mods.slopes.detach().to(device="cpu", dtype=torch.float32).expand(Hq).contiguous()


def _rows_contiguous(t: Tensor) -> Tensor:
    """``t`` if its last dim is contiguous and its rows do not overlap, else a contiguous copy.

    The forward kernel reads batch, head and row through strides, so a KV cache's slice or a
    (B, L, H, D) projection's transpose goes in as it is.
    """
    if t.is_contiguous():  # the common case, in one call
        return t
    D = t.shape[-1]
    if (t.stride(-1) == 1 or D == 1) and (t.shape[-2] == 1 or t.stride(-2) >= D):
        return t
    return t.contiguous()


#: Stacked rows a packed forward unit holds at most (the kernel's kMaxPackedRows).
MAX_PACKED_ROWS = 64
#: Set False to run each query head as its own unit (``benchmarks/cpu_decoding.py`` compares).
PACK_GQA = True


def packs_gqa(q: Tensor, k: Tensor, tiles: Tiles) -> bool:
    """Whether the forward stacks each kv head's G query heads as rows of one unit (PackGQA).

    Where G times a query tile's rows (the queries, or the tile's height) is at most
    ``MAX_PACKED_ROWS``, under a tile map shared by every head (decoding, GQA; a varlen
    decoding batch's one-row tiles): the kv head's keys and values are read once instead of
    G times. ``benchmarks/cpu_decoding.py --tables gqa`` (32 query heads over 8 kv heads,
    D=128, fp32, one query, causal): 1.61x faster over 4,096 cached keys, 2.37x over 16,384;
    1.01-1.03x where the keys read fit the CPU's caches (1,024 of them).
    """
    Lq, G = q.shape[2], q.shape[1] // k.shape[1]
    shared_by_heads = isinstance(tiles, Band | KeyRanges) or tiles.kinds.shape[1] == 1
    fits = surely(G * Lq <= MAX_PACKED_ROWS) or G * tiles.block_q <= MAX_PACKED_ROWS
    return PACK_GQA and G > 1 and shared_by_heads and fits


#: Whether the CPU has AMX tile units (torch's own check, made once: torch.compile does not
#: trace into it; False where torch lacks it).
HAS_AMX = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
#: bfloat16 q, k, v (and dO) go to MKL's bfloat16 GEMM as they are, P and dS as two
#: bfloat16 parts each (float32-like accuracy), instead of being widened to float32 for
#: sgemm: on by default where torch links MKL and the CPU has AMX, whose tile units ran that
#: GEMM at 2.7-3.6x sgemm's speed on the kernels' tiles. Set False to widen
#: (``benchmarks/cpu_dispatch_rule.py --no-bf16-gemm`` compares).
BF16_GEMM = torch.backends.mkl.is_available() and HAS_AMX  # type: ignore[no-untyped-call]


#: Keys a forward part takes at least when a unit's keys are split over threads (``kv_splits``).
MIN_SPLIT_KEYS = 1024
#: Set False to run each unit's keys on one thread (``benchmarks/cpu_decoding.py`` compares).
SPLIT_KV = True


@_traced_as_constant  # a compiled graph keeps the count it was traced with
def _threads() -> int:
    return int(torch.get_num_threads())


def kv_splits(q: Tensor, k: Tensor, tiles: Tiles, packed: bool) -> int:
    """How many parts the forward splits each unit's kv tiles into (FlashDecoding, on CPU).

    The forward runs one unit per (batch, query head or packed kv head, query tile) on each
    thread; decoding one sequence has fewer units than threads (one, for MQA or MLA's packed
    heads), so each unit's keys are split into parts of at least ``MIN_SPLIT_KEYS``, enough
    to give every thread work, and the parts' outputs merged by their LSEs.
    """
    threads = _threads()
    heads = k.shape[1] if packed else q.shape[1]
    units = q.shape[0] * heads * -(-q.shape[2] // tiles.block_q)
    if not SPLIT_KV or not surely(units < threads):
        return 1
    keys = k.shape[2]  # a BlockMask's or ranges': at most all (parts may differ in their tiles)
    if isinstance(tiles, Band):  # the most its query tiles visit
        keys = tiles.most_kv_tiles(q.shape[2], k.shape[2]) * tiles.block_k
    # sym_max / sym_min: a symbolic cache length stays symbolic (``_symbolic``)
    most = torch.sym_min(-(-threads // units), keys // MIN_SPLIT_KEYS)  # type: ignore[no-untyped-call]
    return cast(int, torch.sym_max(1, most))  # type: ignore[no-untyped-call]


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tiles: Tiles,
    max_chunk: int,
    scale: float,
    mods: KernelMods = NO_MODS,
    dropout: tuple[int, int, float] = NO_DROPOUT,
    for_backward: bool = False,
) -> tuple[Tensor, Tensor]:
    """Out (B, Hq, Lq, Dv) in q's dtype and lse (B, Hq, Lq) float32, on the CPU.

    q, k, v: float32, bfloat16 or float16 (16-bit tiles are widened inside the kernel); any
    strides with a contiguous last dim (others are copied first).

    ``dropout`` is ``attnkit._dropout.kernel_args(seed, p)``. ``for_backward``: the backward
    will recompute P = 2^(S - LSE), so S is made with the GEMM calls it makes (one per query
    tile and kv tile, no PackGQA): MKL's sgemm rounds alike only within one call shape, and
    S made otherwise left float32 gradients up to 7x the reference's error at large logits
    (``benchmarks/cpu_gradient_accuracy.py``).
    """
    mask_tensors, mask_kw = _mask_args(tiles)
    packed = not for_backward and packs_gqa(q, k, tiles)
    out, lse = torch.ops.attnkit.tiled_forward(
        _rows_contiguous(q),
        _rows_contiguous(k),
        _rows_contiguous(v),
        *mask_tensors,
        _slopes(mods, q.shape[1]),
        tiles.block_q,
        tiles.block_k,
        max_chunk,
        scale,
        mods.softcap,
        mods.offset_for(q.shape[2], k.shape[2]),
        *dropout,
        pack_gqa=packed,
        kv_splits=kv_splits(q, k, tiles, packed),
        bf16_gemm=BF16_GEMM,
        tile_scores=for_backward,
        **mask_kw,
    )
    return out, lse


def backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dlse: Tensor | None,
    tiles: Tiles,
    max_rows: int,
    scale: float,
    mods: KernelMods = NO_MODS,
    dropout: tuple[int, int, float] = NO_DROPOUT,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (float32) on the CPU; ``dlse`` is the LSE's gradient.

    dout, q, k, v: float32, or 16-bit, widened here to float32 unless bfloat16 goes to the
    bfloat16 GEMM as it is (``BF16_GEMM``). dQ rows take the kv tiles' parts as threads finish
    them (last-bit differences between runs, as FlashAttention's atomics); under
    ``torch.use_deterministic_algorithms(True)`` in kv-tile order: the same bits on every run
    and thread count.
    """
    delta = (dout.float() * out.float()).sum(dim=-1)  # rowsum(dO ∘ O), (B, Hq, Lq)
    if dlse is not None:
        delta = delta - dlse
    # rows with no key have lse = -inf and only masked scores: any finite shift gives P = 0
    lse2 = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse) * LOG2E
    mask_tensors, mask_kw = _mask_args(tiles)
    kept = torch.bfloat16 if BF16_GEMM and q.dtype == torch.bfloat16 else torch.float32
    dout, q, k, v = (t.to(kept).contiguous() for t in (dout, q, k, v))
    dq, dk, dv = torch.ops.attnkit.tiled_backward(
        dout,
        q,
        k,
        v,
        lse2.contiguous(),
        delta.contiguous(),
        *mask_tensors,
        _slopes(mods, q.shape[1]),
        tiles.block_q,
        tiles.block_k,
        max_rows,
        scale,
        mods.softcap,
        mods.offset_for(q.shape[2], k.shape[2]),
        *dropout,
        **mask_kw,
        deterministic=torch.are_deterministic_algorithms_enabled(),
    )
    return dq, dk, dv
