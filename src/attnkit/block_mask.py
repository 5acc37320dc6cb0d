"""BlockMask: which (q-tile, kv-tile) pairs of a mask are empty, partial or full.

A tiled kernel skips empty tiles, computes full tiles without evaluating the mask and
evaluates the mask predicate only on partial tiles. ``Mask.blocks()`` builds one.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor

from attnkit._types import EMPTY, FULL, PARTIAL, MaskFn

_T = TypeVar("_T")

# Upper bound on predicate evaluations held in memory at once while refining tiles: on CPUs
# few enough that a predicate's int64 temporaries stay in cache (2-core AMX VM, 16k x 16k
# `full & (window | global)` on one thread: 0.30 s in chunks of 2^23, 0.10 s of 2^19, 0.18 s
# of 2^14), on GPUs enough to keep launches few.
_REFINE_CHUNK_ELEMENTS = {"cpu": 1 << 19, "other": 1 << 23}


class BlockMask:
    """Per-tile map of a mask: 0 empty, 1 partial, 2 full.

    Attributes:
        kinds: int8 tensor (B|1, H|1, nQ, nK), nQ = ceil(q_len / block_q), nK likewise.
        block_q, block_k: tile sizes along queries and keys.
        q_len, kv_len: the lengths the mask was built for (Lq, Lk).
        mask_fn: the bound predicate ``fn(b, h, q_idx, kv_idx)``, evaluated on partial tiles.
        name: readable description of the mask it came from.
    """

    def __init__(
        self,
        kinds: Tensor,
        block_q: int,
        block_k: int,
        q_len: int,
        kv_len: int,
        mask_fn: MaskFn | None,
        name: str = "mask",
    ) -> None:
        n_q, n_k = -(-q_len // block_q), -(-kv_len // block_k)
        if kinds.dim() != 4 or tuple(kinds.shape[2:]) != (n_q, n_k):
            raise ValueError(
                f"kinds must have shape (B|1, H|1, {n_q}, {n_k}) for q_len={q_len}, "
                f"kv_len={kv_len}, blocks ({block_q}, {block_k}); got {tuple(kinds.shape)}"
            )
        if mask_fn is None and bool((kinds == PARTIAL).any()):
            raise ValueError("a BlockMask with partial tiles needs mask_fn to evaluate them")
        self.kinds = kinds.to(torch.int8)
        self.block_q, self.block_k = block_q, block_k
        self.q_len, self.kv_len = q_len, kv_len
        self.mask_fn = mask_fn
        self.name = name
        # what kernels derive from the tile map (bitmaps, per-device tile lists), by key
        self._derived: dict[Hashable, Any] = {}

    def derived(self, key: Hashable, build: Callable[[], _T]) -> _T:
        """``build()``, computed once per ``key`` and kept on this BlockMask.

        For data a kernel derives from the tile map (partial-tile bitmaps, tile lists on a
        device): masks cache their BlockMasks, so every layer and step that reuses a mask
        reuses these too.
        """
        if key not in self._derived:
            self._derived[key] = build()
        value: _T = self._derived[key]
        return value

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B|1, H|1, nQ, nK)."""
        b, h, n_q, n_k = self.kinds.shape
        return (b, h, n_q, n_k)

    def tile_areas(self) -> Tensor:
        """(nQ, nK) int64: number of score entries in each tile (edge tiles are smaller)."""
        dev = self.kinds.device
        rows = (self.q_len - torch.arange(0, self.q_len, self.block_q, device=dev)).clamp(
            max=self.block_q
        )
        cols = (self.kv_len - torch.arange(0, self.kv_len, self.block_k, device=dev)).clamp(
            max=self.block_k
        )
        return rows[:, None] * cols[None, :]

    def area_fraction(self, kind: int) -> float:
        """Fraction of the Lq×Lk scores in tiles of ``kind`` (EMPTY/PARTIAL/FULL), mean of b, h."""
        covered = ((self.kinds == kind) * self.tile_areas()).sum(dim=(-1, -2)).double()
        return float((covered / (self.q_len * self.kv_len)).mean())

    @property
    def density(self) -> float:
        """Fraction of the Lq×Lk score matrix a tiled kernel computes (non-empty tiles)."""
        return 1.0 - self.area_fraction(EMPTY)

    def counts(self) -> dict[str, int]:
        """Number of empty, partial and full tiles over all (b, h)."""
        return {
            "empty": int((self.kinds == EMPTY).sum()),
            "partial": int((self.kinds == PARTIAL).sum()),
            "full": int((self.kinds == FULL).sum()),
        }

    def to_dense(self) -> Tensor:
        """Bool tensor (B|1, H|1, Lq, Lk): full tiles True, partial tiles by the predicate."""
        _b_n, _h_n, _, _ = self.shape
        out = (self.kinds == FULL).repeat_interleave(self.block_q, dim=2)
        out = out.repeat_interleave(self.block_k, dim=3)[..., : self.q_len, : self.kv_len]
        out = out.contiguous()
        if self.mask_fn is not None:
            for tiles, b, h, q, kv, valid in iter_partial_tiles(self):
                vals = _eval(self.mask_fn, b, h, q, kv, valid)
                for t in range(tiles.shape[0]):
                    bi, hi, qi, ki = (int(x) for x in tiles[t])
                    q0, k0 = qi * self.block_q, ki * self.block_k
                    q1 = min(q0 + self.block_q, self.q_len)
                    k1 = min(k0 + self.block_k, self.kv_len)
                    out[bi, hi, q0:q1, k0:k1] = vals[t, : q1 - q0, : k1 - k0]
        return out

    def __repr__(self) -> str:
        b, h, n_q, n_k = self.shape
        c = self.counts()
        return (
            f"BlockMask({self.name}, B={b}, H={h}, q_len={self.q_len}, kv_len={self.kv_len}, "
            f"block=({self.block_q}, {self.block_k}), tiles={n_q}x{n_k}, full={c['full']}, "
            f"partial={c['partial']}, empty={c['empty']}, density={self.density:.3f})"
        )

    def __str__(self) -> str:
        """Draw the tile map of (b=0, h=0): '#' full, '+' partial, '.' empty."""
        limit = 96
        grid = self.kinds[0, 0].tolist()
        chars = {EMPTY: ".", PARTIAL: "+", FULL: "#"}
        lines = [repr(self)]
        for row in grid[:limit]:
            line = "".join(chars[int(x)] for x in row[:limit])
            lines.append(line + (" …" if len(row) > limit else ""))
        if len(grid) > limit:
            lines.append(f"… ({len(grid) - limit} more rows)")
        return "\n".join(lines)


def iter_partial_tiles(
    bm: BlockMask,
) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]]:
    """Yield partial tiles in chunks as broadcasting index tensors.

    Yields:
        tiles (n, 4) [b, h, q_tile, kv_tile]; b, h (n, 1, 1); q (n, bq, 1); kv (n, 1, bk)
        clamped into range; valid (n, bq, bk) False where a padded edge tile runs past Lq or Lk.
    """
    tiles = (bm.kinds == PARTIAL).nonzero()
    dev = bm.kinds.device
    elements = _REFINE_CHUNK_ELEMENTS["cpu" if dev.type == "cpu" else "other"]
    per_chunk = max(1, elements // (bm.block_q * bm.block_k))
    ar_q = torch.arange(bm.block_q, device=dev)
    ar_k = torch.arange(bm.block_k, device=dev)
    for start in range(0, tiles.shape[0], per_chunk):
        t = tiles[start : start + per_chunk]
        b = t[:, 0].view(-1, 1, 1)
        h = t[:, 1].view(-1, 1, 1)
        q = t[:, 2].view(-1, 1, 1) * bm.block_q + ar_q.view(1, -1, 1)
        kv = t[:, 3].view(-1, 1, 1) * bm.block_k + ar_k.view(1, 1, -1)
        valid = (q < bm.q_len) & (kv < bm.kv_len)
        yield t, b, h, q.clamp(max=bm.q_len - 1), kv.clamp(max=bm.kv_len - 1), valid


def _eval(fn: MaskFn, b: Tensor, h: Tensor, q: Tensor, kv: Tensor, valid: Tensor) -> Tensor:
    return torch.as_tensor(fn(b, h, q, kv), device=valid.device).expand_as(valid) & valid


#: the key under which a BlockMask keeps ``partial_bitmaps``' result
_PARTIAL_BITMAPS = "partial_bitmaps"


def refine_partial_tiles(bm: BlockMask) -> BlockMask:
    """Evaluate the predicate on every partial tile and reclassify it exactly (in place).

    The tiles left partial keep their evaluated bitmaps as ``partial_bitmaps``' result, so
    the kernels that read them do not evaluate the predicate a second time.
    """
    assert bm.mask_fn is not None
    kinds = bm.kinds
    bm._derived.clear()  # tile kinds change: anything derived from them before is stale
    still_partial: list[Tensor] = []  # in row-major tile order, as partial_tile_index numbers
    for tiles, b, h, q, kv, valid in iter_partial_tiles(bm):
        vals = _eval(bm.mask_fn, b, h, q, kv, valid)
        any_ = vals.flatten(1).any(1)
        all_ = (vals | ~valid).flatten(1).all(1)
        new = torch.where(all_, FULL, torch.where(any_, PARTIAL, EMPTY)).to(torch.int8)
        kinds[tiles[:, 0], tiles[:, 1], tiles[:, 2], tiles[:, 3]] = new
        still_partial.append(vals[new == PARTIAL])
    empty = kinds.new_zeros(0, bm.block_q, bm.block_k, dtype=torch.bool)
    bitmaps = torch.cat(still_partial) if still_partial else empty
    bm._derived[_PARTIAL_BITMAPS] = (partial_tile_index(kinds), bitmaps)
    return bm


def count_attended(bm: BlockMask) -> Tensor:
    """(B|1, H|1) int64: exact number of attended (q, kv) pairs, evaluating only partial tiles."""
    total = ((bm.kinds == FULL) * bm.tile_areas()).sum(dim=(-1, -2))
    if bm.mask_fn is not None:
        for tiles, b, h, q, kv, valid in iter_partial_tiles(bm):
            per_tile = _eval(bm.mask_fn, b, h, q, kv, valid).flatten(1).sum(1)
            total.index_put_((tiles[:, 0], tiles[:, 1]), per_tile, accumulate=True)
    return total


def partial_bitmaps(bm: BlockMask) -> tuple[Tensor, Tensor]:
    """Evaluate the predicate on every partial tile.

    Returns:
        tile_index int64 (B|1, H|1, nQ, nK): row in ``bitmaps`` of each partial tile, else -1;
        bitmaps bool (nPartial, block_q, block_k): True = attend (False past Lq / Lk).
        Computed once per BlockMask and kept on it.
    """
    return bm.derived(_PARTIAL_BITMAPS, lambda: _evaluate_partial_tiles(bm))


def partial_tile_index(kinds: Tensor) -> Tensor:
    """(B|1, H|1, nQ, nK) int64: each partial tile's row in the bitmaps (row-major), else -1."""
    tile_index = torch.full(kinds.shape, -1, dtype=torch.int64, device=kinds.device)
    partial = kinds == PARTIAL
    tile_index[partial] = torch.arange(int(partial.sum()), device=kinds.device)
    return tile_index


def _evaluate_partial_tiles(bm: BlockMask) -> tuple[Tensor, Tensor]:
    dev = bm.kinds.device
    tile_index = partial_tile_index(bm.kinds)
    n = int((tile_index >= 0).sum())
    bitmaps = torch.zeros(n, bm.block_q, bm.block_k, dtype=torch.bool, device=dev)
    if n == 0:  # e.g. causal decoding (one query sees every key): nothing to evaluate
        return tile_index, bitmaps
    if bm.mask_fn is not None:
        done = 0
        for tiles, b, h, q, kv, valid in iter_partial_tiles(bm):
            vals = _eval(bm.mask_fn, b, h, q, kv, valid)
            bitmaps[done : done + tiles.shape[0]] = vals
            done += tiles.shape[0]
    return tile_index, bitmaps


def retile(bm: BlockMask, block_q: int, block_k: int) -> BlockMask:
    """The same mask as a BlockMask with other tile sizes (cached on ``bm``).

    Kernels that walk the mask at their own tile sizes take a BlockMask built at any other:
    a new tile is empty where every old tile it overlaps is empty, full where every one is
    full, and partial otherwise, then partial tiles are classified exactly by the predicate
    (the old tile map, deferring to the old predicate inside old partial tiles).
    """
    if (block_q, block_k) == (bm.block_q, bm.block_k):
        return bm
    return bm.derived(("retile", block_q, block_k), lambda: _retile(bm, block_q, block_k))


def _retile(bm: BlockMask, block_q: int, block_k: int) -> BlockMask:
    old = bm.kinds
    dev = old.device

    def overlapped(length: int, new: int, old_block: int) -> tuple[Tensor, Tensor]:
        # first and one-past-last old tile overlapped by each new tile along one axis
        start = torch.arange(0, length, new, device=dev)
        end = (start + new).clamp(max=length)
        return start // old_block, (end - 1) // old_block + 1

    q0, q1 = overlapped(bm.q_len, block_q, bm.block_q)
    k0, k1 = overlapped(bm.kv_len, block_k, bm.block_k)

    def count(tiles: Tensor) -> Tensor:
        # number of set old tiles in each new tile's rectangle, by 2-D prefix sums
        p = torch.nn.functional.pad(tiles.long().cumsum(-2).cumsum(-1), (1, 0, 1, 0))
        a, b = q0.view(-1, 1), k0.view(1, -1)
        c, d = q1.view(-1, 1), k1.view(1, -1)
        return p[..., c, d] - p[..., a, d] - p[..., c, b] + p[..., a, b]

    nonempty, nonfull = count(old != EMPTY), count(old != FULL)
    kinds = torch.where(nonempty == 0, EMPTY, torch.where(nonfull == 0, FULL, PARTIAL))
    old_fn = bm.mask_fn
    n_b, n_h = old.shape[:2]

    def predicate(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        b_i, h_i = torch.as_tensor(b) * (n_b > 1), torch.as_tensor(h) * (n_h > 1)
        kind = old[b_i, h_i, torch.as_tensor(q) // bm.block_q, torch.as_tensor(kv) // bm.block_k]
        attend = kind == FULL
        if old_fn is not None:
            attend = attend | ((kind == PARTIAL) & torch.as_tensor(old_fn(b, h, q, kv)))
        return attend

    new = BlockMask(kinds.to(torch.int8), block_q, block_k, bm.q_len, bm.kv_len, predicate, bm.name)
    return refine_partial_tiles(new)
