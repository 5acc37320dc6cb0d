"""The mask as a kernel walks it: per-row (or per-column) lists of non-empty tiles and bitmaps.

Or none at all: where every key is kept, one shared walk of full tiles; for a causal or
sliding-window mask, the band of diagonals that the kernels compute themselves. Between the
two, key ranges: tile lists found from each query's first and last key, partial tiles masked
by comparing indices instead of reading bitmaps (documents, padding, prefix LM, varlen).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnkit._types import EMPTY
from attnkit.backends._common import Request
from attnkit.backends.sdpa import attends_every_key
from attnkit.backends.tensor_masks import tensor_cached
from attnkit.backends.tiled import TileConfig, block_mask_for, kept_keys, mask_ranges
from attnkit.backends.triton.launches import Launch
from attnkit.block_mask import BlockMask, partial_bitmaps, retile
from attnkit.masks import Mask, band, padded_band
from attnkit.score_mods import kernel_mods


@dataclass(frozen=True)
class TileWalk:
    """The BlockMask as one kernel walks it, at that kernel's tile sizes.

    Per program (a query-tile row, or a key-tile column for dK/dV): ``num`` (B|1, H|1, n) the
    number of non-empty tiles and ``idx`` (B|1, H|1, n, m) their indices, non-empty first;
    ``tile`` (B|1, H|1, nQ, nK) each partial tile's row in ``bits`` (nPartial, block_m,
    block_n), else -1.

    Under key ranges (``kernel_ranges``) partial tiles have ``tile`` 0 and no bitmap: the
    kernels mask them from ``ranges`` (B|1, 2, Lq) int32, query i's first and last key, and
    ``keys`` (B|1, Lk) int8, the keys each sequence keeps. Other walks hold one-element
    stand-ins that no kernel reads.
    """

    num: Tensor
    idx: Tensor
    tile: Tensor
    bits: Tensor
    ranges: Tensor
    keys: Tensor

    @property
    def in_ranges(self) -> bool:
        """Whether partial tiles are masked from ``ranges`` and ``keys``, not bitmaps."""
        return self.ranges.dim() == 3


def tile_walk(req: Request, launch: Launch, by_columns: bool = False) -> TileWalk:
    """The request's mask as a kernel with ``launch``'s tiles reads it, on q's device.

    A BlockMask given at other tile sizes is re-tiled exactly. Built once per BlockMask, tile
    size and device (masks cache their BlockMasks, so every layer and step reuses it). Where
    every key is kept, no BlockMask is built (``keeps_every_key``); nor where the kernels
    compute the mask themselves (``kernel_band``): they are given a walk they do not read; nor
    for key ranges (``kernel_ranges``), whose walk is found from the ranges on the device.
    """
    s = req.shapes
    if keeps_every_key(req.mask, s.Lq, s.Lk):
        return _full_walk(s.Lq, s.Lk, launch, by_columns, req.q.device)
    if kernel_band(req):
        return _unread_walk(req.q.device)
    if (found := kernel_ranges(req)) is not None:
        tiles = (s.Lq, s.Lk, launch.block_m, launch.block_n, by_columns, str(req.q.device))
        walk: TileWalk = _cached(
            req.mask, ("triton_range_walk", *tiles), lambda: _range_walk(*found, launch, by_columns)
        )
        return walk
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


def kernel_ranges(req: Request) -> tuple[Tensor, Tensor] | None:
    """(ranges, keys) on q's device where the kernels mask from key ranges, else None.

    ``ranges`` (B|1, 2, Lq) int32: query i keeps keys ranges[b, 0, i] … ranges[b, 1, i];
    ``keys`` (B|1, Lk) int8: the keys sequence b keeps. For ``masks.padded_ranges``' masks
    (documents whose keys lie side by side, ``key_ranges``, ``prefix_lm``, and ``&`` of them with
    bands and padding), ``masks.padded_band``'s that are not bands alone (a band ``&``
    padding), and bool tensors of kept keys (B|1, 1, 1, Lk) (``tiled.kept_keys``: a model's
    padding mask, a decoding step's). The tile lists are then found from each query tile's
    bounds on the device (``_range_walk``), with no BlockMask evaluated and no bitmap made:
    varlen's packed sequences make a new mask at every call, a decoding loop a new padding
    mask at every step.

    Not with softcap, as ``kernel_band``: with ALiBi too, sm_90's D=64 dQ kernel spilled 152 B
    masking from ranges (``python -m attnkit.backends.triton.aot --arch 90 --head-dim 64
    --ranges --alibi --softcap 30``).

    Found once per mask object (or tensor) and lengths (a model's layers share one). Eager only,
    as the tiled backend's ranges: they are read from data (documents' ids), which
    torch.compile would bake into its graph; such masks walk a BlockMask there.
    """
    mask, s = req.mask, req.shapes
    if (
        not BAND_IN_KERNEL
        or not isinstance(mask, Mask | Tensor)
        or keeps_every_key(mask, s.Lq, s.Lk)
        or torch.compiler.is_compiling()
        or kernel_band(req)
    ):
        return None
    mods = kernel_mods(req.score_mod_source)
    if mods is None or mods.softcap > 0:
        return None
    dev = req.q.device
    if isinstance(mask, Tensor):  # a padding mask (B|1, 1, 1, Lk): every key, those kept
        if (kept := kept_keys(mask, s.Lk)) is None:
            return None
        found: Any = (None, kept)
    else:
        found = mask_ranges(req)  # cached on the mask; clears its entries for other lengths
    ranges: tuple[Tensor, Tensor] | None = _cached(
        mask,
        ("triton_ranges", s.Lq, s.Lk, str(dev)),
        lambda: _device_ranges(found, mask, s.Lq, s.Lk, dev),
    )
    return ranges


def _cached(mask: object, key: tuple[Any, ...], make: Any) -> Any:
    """``make()``, kept with the mask object or tensor.

    On a mask beside its ranges (cleared when its lengths change); for a tensor while it
    lives unchanged (``tensor_masks.tensor_cached``).
    """
    if isinstance(mask, Tensor):
        return tensor_cached(mask, key, make)
    cache = mask._ranges_cache  # type: ignore[attr-defined]
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _device_ranges(
    found: tuple[Tensor | None, Tensor | None] | None,
    mask: Mask | Tensor,
    Lq: int,
    Lk: int,
    dev: torch.device,
) -> tuple[Tensor, Tensor] | None:
    """``padded_ranges``' result ``found`` as the kernels read it, on ``dev``.

    Else the mask's ``padded_band`` as ranges; ranges None: every key. int32 ranges and int8
    keys of one batch size.
    """
    ranges: Tensor | None
    if found is None:
        banded = padded_band(mask, Lq, Lk) if isinstance(mask, Mask) else None
        if banded is None:
            return None
        lo, hi, kept = banded
        i = torch.arange(Lq)
        ranges = torch.stack(((i + lo).clamp(min=0), (i + hi).clamp(max=Lk - 1)))[None]
    else:
        ranges, kept = found
    if ranges is None:
        ranges = torch.tensor([[[0], [Lk - 1]]]).expand(1, 2, Lq)
    if kept is None:
        kept = torch.ones(1, Lk, dtype=torch.bool)
    B = max(ranges.shape[0], kept.shape[0])
    return (
        ranges.to(dev, torch.int32).expand(B, 2, Lq).contiguous(),
        kept.to(dev, torch.int8).expand(B, Lk).contiguous(),
    )


def _range_walk(ranges: Tensor, keys: Tensor, launch: Launch, by_columns: bool) -> TileWalk:
    """The walk of key ranges at ``launch``'s tiles, found on their device (``kernel_ranges``).

    A tile is non-empty where its rows' keys (from the least first key to the greatest last
    one of the rows that keep any) reach it and the sequence keeps one of its keys; full
    where every row keeps all of its keys. Rows past Lq are never stored: they count as
    keeping every key, and none. Some tiles between two rows' ranges may be listed though no
    row keeps a key there (key_ranges with gaps): the kernels mask them like any partial tile.
    """
    Bm, _, Lq = ranges.shape
    Lk = keys.shape[1]
    bm, bn = launch.block_m, launch.block_n
    nQ, nK = -(-Lq // bm), -(-Lk // bn)
    dev = ranges.device
    first, last = ranges[:, 0], ranges[:, 1]
    keeps = first <= last

    def per_query_tile(x: Tensor, past_lq: int) -> Tensor:
        return torch.nn.functional.pad(x, (0, nQ * bm - Lq), value=past_lq).view(Bm, nQ, bm)

    def per_key_tile(past_lk: int) -> Tensor:
        return torch.nn.functional.pad(keys, (0, nK * bn - Lk), value=past_lk).view(Bm, nK, bn)

    reach_lo = per_query_tile(torch.where(keeps, first, Lk), Lk).amin(-1)[..., None]
    reach_hi = per_query_tile(torch.where(keeps, last, -1), -1).amax(-1)[..., None]
    all_lo = per_query_tile(first, 0).amax(-1)[..., None]
    all_hi = per_query_tile(last, Lk - 1).amin(-1)[..., None]
    col_lo = torch.arange(nK, device=dev, dtype=torch.int32) * bn
    col_hi = (col_lo + bn).clamp(max=Lk) - 1
    any_kept = per_key_tile(0).amax(-1)[:, None] > 0
    all_kept = per_key_tile(1).amin(-1)[:, None] > 0
    nonempty = (reach_lo <= col_hi) & (reach_hi >= col_lo) & any_kept
    full = (all_lo <= col_lo) & (all_hi >= col_hi) & all_kept
    empty = (~nonempty).to(torch.int8)[:, None]  # (Bm, 1, nQ, nK)
    num, idx = _tile_lists(empty.transpose(-1, -2) if by_columns else empty)
    return TileWalk(
        num=num,
        idx=idx,
        tile=torch.where(full, -1, 0).to(torch.int32)[:, None].contiguous(),
        bits=_no_ranges(dev)[1],
        ranges=ranges,
        keys=keys,
    )


def _tile_lists(empty: Tensor) -> tuple[Tensor, Tensor]:
    """How many tiles of each row of ``empty`` (…, n) int8 are non-empty, and their order.

    int32 (…) counts, and int32 (…, n) tile indices, non-empty ones first, each part in order.
    """
    num = (1 - empty).sum(-1, dtype=torch.int32)
    return num, torch.argsort(empty, dim=-1, stable=True).to(torch.int32).contiguous()


#: Per device, the one-element ranges and keys of walks that are not of key ranges: unread
_NO_RANGES: dict[torch.device, tuple[Tensor, Tensor]] = {}


def _no_ranges(dev: torch.device) -> tuple[Tensor, Tensor]:
    if dev not in _NO_RANGES:
        _NO_RANGES[dev] = (
            torch.zeros(1, dtype=torch.int32, device=dev),
            torch.zeros(1, dtype=torch.int8, device=dev),
        )
    return _NO_RANGES[dev]


#: Per device, the walk handed to kernels that compute their mask (``kernel_band``): unread
_UNREAD_WALKS: dict[torch.device, TileWalk] = {}


def _unread_walk(dev: torch.device) -> TileWalk:
    if dev not in _UNREAD_WALKS:
        one = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=dev)
        no_ranges = _no_ranges(dev)
        _UNREAD_WALKS[dev] = TileWalk(one, one, one, no_ranges[1], *no_ranges)
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
            ranges=_no_ranges(dev)[0],
            keys=_no_ranges(dev)[1],
        )
        if len(_FULL_WALKS) >= 1024:  # lengths up to 128k keys in 128-key tiles, and more
            _FULL_WALKS.clear()
        _FULL_WALKS[key] = walk
    return walk


def _build_walk(bm: BlockMask, by_columns: bool, dev: torch.device) -> TileWalk:
    empty = (bm.kinds.cpu() == EMPTY).to(torch.int8)
    num, idx = _tile_lists(empty.transpose(-1, -2) if by_columns else empty)
    tile, bits = bm.derived(("triton_bitmaps", str(dev)), lambda: _bitmaps_on(bm, dev))
    return TileWalk(
        num=num.to(dev),
        idx=idx.to(dev),
        tile=tile,
        bits=bits,
        ranges=_no_ranges(dev)[0],
        keys=_no_ranges(dev)[1],
    )


def _bitmaps_on(bm: BlockMask, dev: torch.device) -> tuple[Tensor, Tensor]:
    tile_index, bitmaps = partial_bitmaps(bm)
    return (
        tile_index.to(torch.int32).contiguous().to(dev),
        bitmaps.to(torch.int8).contiguous().to(dev),
    )
