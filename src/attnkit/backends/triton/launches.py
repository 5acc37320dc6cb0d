"""Tile sizes and launch parameters per kernel, GPU arch, head dim and dtype.

Also the decoding-time choices: packing a kv head's query heads into one tile
(``decoding_launch``) and splitting a row's kv tiles over programs (``kv_splits``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch


def interpreting() -> bool:
    """Whether Triton runs its interpreter (TRITON_INTERPRET=1): kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


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
    tile = pow2(rows)
    warps = min(4, forward.num_warps) if tile <= 64 else forward.num_warps
    return Launch(tile, forward.block_n, warps, forward.num_stages)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a GPU (``INTERPRETER_SMS`` under the interpreter)."""
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


def pow2(n: int) -> int:
    """n rounded up to a power of two, at least 16 (the smallest tile a tl.dot takes)."""
    return max(16, 1 << (n - 1).bit_length())


def band_launches(launches: Launches) -> Launches:
    """The tiles of kernels that compute a band mask (``kernel_band``): one stage fewer.

    Those that mask partial tiles from key ranges (``kernel_ranges``) too: without bitmaps to
    load, their loops pipeline like the band's (sm_90's D=128 forward took 229 KB of shared
    memory at 3 stages, against 180 KB walking bitmaps; 164 KB at 2).

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
