"""How tall the query tiles of a mask of key ranges should be (packed sequences, varlen).

A query tile visits every kv tile between its rows' first and last keys: a tile that straddles
sequences visits every kv tile of all of them, so tall tiles over many short sequences
(decoding batches, short chunks) compute mostly masked pairs (32 sequences of 16 queries in
64-row tiles: 4x the pairs), while short tiles pay each kv tile's load for few rows. Height
b costs ``tile_visits`` · (KV_TILE_COST_ROWS + b); the tiled backend runs the cheapest.

Shape legend: ranges (B|1, 2, Lq) int, each query's first and last key (``masks.key_ranges``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

#: What one visit of a kv tile costs beyond its query rows' arithmetic, in query rows: loading
#: the tile's keys and values and the per-tile bookkeeping. Fitted to the CPU kernels' times
#: at query tiles of 1-64 rows (``benchmarks/cpu_varlen.py --tiles``, 2-core Zen 3, D=64); at
#: D=128 the height it picks was the fastest too (16 and 4 new queries per sequence, ``--dim 128``).
KV_TILE_COST_ROWS = 6
#: The heights considered, tallest first (ties go to the taller).
HEIGHTS = (64, 32, 16, 8, 4, 2, 1)


def host_ranges(ranges: Tensor) -> np.ndarray:
    """``ranges`` as numpy int64 (the model runs at every call; torch's per-op cost dominates)."""
    return ranges.detach().to(device="cpu", dtype=torch.int64).numpy()


def tile_visits(ranges: np.ndarray, rows: int, block_k: int) -> int:
    """How many kv tiles ``rows``-row query tiles visit, summed over sequences.

    Those between each tile's least first key and greatest last key (``tile_mask.h``).
    """
    starts = np.arange(0, ranges.shape[-1], rows)  # each tile's first row (the last: fewer)
    lo = np.maximum(np.minimum.reduceat(ranges[:, 0], starts, axis=1), 0)
    hi = np.maximum.reduceat(ranges[:, 1], starts, axis=1)
    return int(np.where(hi >= lo, hi // block_k - lo // block_k + 1, 0).sum())


def tile_height_costs(ranges: np.ndarray, block_k: int, tallest: int = 64) -> dict[int, int]:
    """The modelled cost of each query-tile height up to ``tallest``, tallest first."""
    Lq = ranges.shape[-1]
    visits: dict[int, int] = {}  # by the rows a tile holds: every height from Lq holds all
    costs = {}
    for rows in (r for r in HEIGHTS if r <= tallest):
        held = min(rows, Lq)
        if held not in visits:
            visits[held] = tile_visits(ranges, held, block_k)
        costs[rows] = visits[held] * (KV_TILE_COST_ROWS + held)
    return costs


def cheapest_tile_height(ranges: np.ndarray, block_k: int, tallest: int = 64) -> int:
    """The height of ``tile_height_costs`` that costs least, ties going to the taller."""
    costs = tile_height_costs(ranges, block_k, tallest)
    return min(costs, key=costs.__getitem__)  # the first (tallest) of equal costs
