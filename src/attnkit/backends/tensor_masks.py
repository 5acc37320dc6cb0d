"""Tile maps of bool tensor masks, built once per tensor while it lives.

A model makes one mask tensor per forward and passes it to every layer (transformers does),
and dispatch, tile sizing and the kernel each need its tile map: classifying a 4096² mask and
evaluating its partial tiles costs tens of milliseconds, every call. Here the BlockMask is kept
per tensor object and tile shape, and is self-contained: its predicate reads the partial
tiles' bitmaps, not the tensor, so holding it (in the cache, in an autograd graph) keeps no
mask tensor alive, and an entry goes when its tensor is freed. An in-place change to the
tensor bumps its version counter, which makes its entries stale.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit._types import FULL, PARTIAL, MaskFn
from attnkit.block_mask import BlockMask, partial_tile_index
from attnkit.masks import _select, from_dense


@dataclass
class _Entry:
    """What was made from one tensor at one version.

    Its BlockMasks by (Lq, Lk, block_q, block_k, B, H), and the Triton backend's key ranges
    and tile walks (keys that start with a name).
    """

    tensor: weakref.ref[Tensor]
    version: int
    shape: tuple[tuple[int, ...], tuple[int, ...]]  # the tensor's sizes and strides
    maps: dict[tuple[Any, ...], Any] = field(default_factory=dict)


_ENTRIES: dict[int, _Entry] = {}  # by id() of the mask tensor


def tensor_block_mask(
    mask: Tensor, Lq: int, Lk: int, block_q: int, block_k: int, B: int, H: int
) -> BlockMask:
    """The BlockMask of a bool mask (…, Lq|1, Lk) broadcast to (B|1, H|1, Lq, Lk).

    Equal to ``from_dense(mask).blocks(Lq, Lk, block_q, block_k, B=B, H=H)`` (the tiles'
    kinds, and the predicate on partial tiles), cached on the tensor's identity and version.
    """
    key = (Lq, Lk, block_q, block_k, B, H)
    bm: BlockMask = tensor_cached(mask, key, lambda: _build(mask, *key))
    return bm


def tensor_cached(mask: Tensor, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
    """``make()``, kept under ``key`` while ``mask`` lives and is not written in place."""
    version = _version(mask)
    if version is None:  # inference tensors have no version counter: nothing to trust
        return make()
    entry = _ENTRIES.get(id(mask))
    shape = (tuple(mask.shape), mask.stride())
    if entry is None or entry.tensor() is not mask:
        entry = _Entry(weakref.ref(mask), version, shape)
        _ENTRIES[id(mask)] = entry
        weakref.finalize(mask, _ENTRIES.pop, id(mask), None).atexit = False
    elif (entry.version, entry.shape) != (version, shape):  # written in place since
        entry.version, entry.shape, entry.maps = version, shape, {}
    if key not in entry.maps:
        entry.maps[key] = make()
    return entry.maps[key]


def _version(mask: Tensor) -> int | None:
    if torch.compiler.is_compiling() or mask.is_inference():
        return None
    return int(mask._version)


def _build(mask: Tensor, Lq: int, Lk: int, block_q: int, block_k: int, B: int, H: int) -> BlockMask:
    # tile maps live on the CPU: copy a device's mask once
    m4 = mask.cpu().view((1,) * (4 - mask.dim()) + tuple(mask.shape))
    dense = m4.expand(m4.shape[0], m4.shape[1], Lq, Lk)
    kinds = from_dense(dense).blocks(Lq, Lk, block_q, block_k, B=B, H=H).kinds
    tile_index, bitmaps = _partial_tiles(dense, kinds, block_q, block_k)
    fn = _bitmap_predicate(kinds, tile_index, bitmaps, block_q, block_k)
    bm = BlockMask(
        kinds, block_q, block_k, Lq, Lk, fn, name=f"from_dense(shape={tuple(mask.shape)})"
    )
    bm.derived("partial_bitmaps", lambda: (tile_index, bitmaps))
    return bm


def _partial_tiles(dense: Tensor, kinds: Tensor, bq: int, bk: int) -> tuple[Tensor, Tensor]:
    """``block_mask.partial_bitmaps`` of the mask, cut straight out of the tensor.

    Returns tile_index (B|1, H|1, nQ, nK), the row of each partial tile in bitmaps (else -1),
    and bitmaps (nPartial, bq, bk), False past Lq / Lk.
    """
    Bk, Hk, nQ, nK = kinds.shape
    Lq, Lk = dense.shape[-2:]
    padded = F.pad(dense.expand(Bk, Hk, Lq, Lk), (0, nK * bk - Lk, 0, nQ * bq - Lq))
    tiles = padded.view(Bk, Hk, nQ, bq, nK, bk).transpose(3, 4)  # (Bk, Hk, nQ, nK, bq, bk)
    return partial_tile_index(kinds), tiles[kinds == PARTIAL]  # both row-major


def _bitmap_predicate(
    kinds: Tensor, tile_index: Tensor, bitmaps: Tensor, bq: int, bk: int
) -> MaskFn:
    """The mask at (b, h, q, kv), from the tile kinds and partial bitmaps, not the tensor."""
    # a tile full for one head and empty for another is read here too, even with no partial
    # tile anywhere: keep a row to index
    bitmaps = bitmaps if bitmaps.shape[0] else bitmaps.new_zeros(1, bq, bk)
    maps = (tile_index, bitmaps, kinds == FULL)
    on_device: dict[torch.device, tuple[Tensor, ...]] = {}  # moved once per device

    def fn(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        if q.device not in on_device:
            on_device[q.device] = tuple(t.to(q.device) for t in maps)
        index, bits, full = on_device[q.device]
        b, h = _select(b, full.shape[0]), _select(h, full.shape[1])
        qt, kt = q // bq, kv // bk
        tile = index[b, h, qt, kt]
        inside = bits[tile.clamp(min=0), q % bq, kv % bk]
        return torch.where(tile >= 0, inside, full[b, h, qt, kt])

    return fn
