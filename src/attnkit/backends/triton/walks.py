"""The mask as a kernel walks it: per-row (or per-column) lists of non-empty tiles and bitmaps.

Or none at all: where every key is kept, one shared walk of full tiles; for a causal or
sliding-window mask, the band of diagonals that the kernels compute themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnkit._types import EMPTY
from attnkit.backends._common import Request
from attnkit.backends.sdpa import attends_every_key
from attnkit.backends.tiled import TileConfig, block_mask_for
from attnkit.backends.triton.launches import Launch
from attnkit.block_mask import BlockMask, partial_bitmaps, retile
from attnkit.masks import Mask, band
from attnkit.score_mods import kernel_mods


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
