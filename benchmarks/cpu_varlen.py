"""Packed variable-length attention on CPU: varlen_attention against a padded SDPA batch.

A serving step with chunked prefill: n sequences, each with its own number of cached keys,
each adding ``--queries`` new tokens, causal (each aligned bottom-right by its own lengths,
so the sequences' offsets differ). Three ways to run it, forward only, in milliseconds per
call, building the mask every call as a server would (the lengths change every step):

- ``varlen``: ``attnkit.varlen_attention`` (one packed row; the CPU kernels read each
  query's range of keys, skipping the tiles of other sequences and beyond each causal edge,
  with no tile map);
- ``varlen, tile map``: the same call with the kernels walking a tile map of those ranges
  built at every call (``tiled.BAND_IN_KERNEL = False``: how attnkit ran it before);
- ``varlen, predicate``: the same packed call with the window as a plain predicate, which
  classifies tiles by evaluating every (query, key) pair (how attnkit ran it before);
- ``SDPA padded``: torch SDPA on the batch padded to the longest sequence, with a boolean
  mask of each sequence's causal edge and padding.

``--tiles`` adds the packed call on tiled at every query-tile height from 1 to 64 rows, beside
the cost ``attnkit.varlen.query_tile_costs`` gives each (what ``KV_TILE_COST_ROWS`` was fitted
to). ``--decode`` times instead one decoding query per sequence for 2-16 sequences: SDPA with
a dense mask, tiled on the key ranges and tiled walking a tile map built at every step, and
names the one "auto" runs.

    python benchmarks/cpu_varlen.py [--queries 256] [--cached 0 256 512 1024 2048 3072]
        [--heads 8] [--kv-heads 8] [--dim 64] [--tiles] [--decode] [--min-time 1.0]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from unittest import mock

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import Tensor
from torch.utils import benchmark

import attnkit
from attnkit import masks
from attnkit.backends import cpu_kernel, tiled
from attnkit.functional import _request, dispatch
from attnkit.varlen import query_tile_costs, query_tile_rows, tile_visits, varlen_mask


def packed(
    queries: int, cached: list[int], H: int, D: int, Hkv: int | None = None
) -> tuple[Tensor, ...]:
    """q (total_q, H, D), k, v (total_k, Hkv, D), cu_seqlens_q, cu_seqlens_k."""
    g = torch.Generator().manual_seed(0)
    lengths_k = [c + queries for c in cached]
    total_q, total_k = queries * len(cached), sum(lengths_k)
    q = torch.randn(total_q, H, D, generator=g)
    k, v = (torch.randn(total_k, Hkv or H, D, generator=g) for _ in range(2))
    cu_q = torch.arange(len(cached) + 1) * queries
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()])
    return q, k, v, cu_q, cu_k


def by_predicate(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor) -> Tensor:
    """The packed call with its causal part as a predicate over every pair."""
    n = cu_q.numel() - 1
    q_ids = torch.arange(n).repeat_interleave(cu_q.diff())
    k_ids = torch.arange(n).repeat_interleave(cu_k.diff())
    aligned = torch.arange(q_ids.numel()) + (cu_k[1:] - cu_q[1:])[q_ids]
    causal = masks.custom(lambda b, h, qi, kv: kv <= aligned[qi], name="varlen_causal")
    mask = masks.document(q_ids, k_ids) & causal
    out: Tensor = attnkit.attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), mask=mask)
    return out


def padded_sdpa(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor) -> Tensor:
    """Every sequence padded to the longest: (n, H, Lq, D) and (n, H, Lk, D), a bool mask."""
    n = cu_q.numel() - 1
    Lq, Lk = int(cu_q.diff().max()), int(cu_k.diff().max())
    H, D = q.shape[1:]
    qp, kp, vp = (torch.zeros(n, H, L, D) for L in (Lq, Lk, Lk))
    allowed = torch.zeros(n, 1, Lq, Lk, dtype=torch.bool)
    for i in range(n):
        lq, lk = int(cu_q[i + 1] - cu_q[i]), int(cu_k[i + 1] - cu_k[i])
        qp[i, :, :lq] = q[cu_q[i] : cu_q[i + 1]].transpose(0, 1)
        kp[i, :, :lk] = k[cu_k[i] : cu_k[i + 1]].transpose(0, 1)
        vp[i, :, :lk] = v[cu_k[i] : cu_k[i + 1]].transpose(0, 1)
        allowed[i, 0, :lq, :lk] = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    allowed[:, :, :, 0] |= ~allowed.any(-1)  # padding rows: one key, so no NaN
    out: Tensor = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=allowed)
    return out


#: Seconds each way is timed for at least (``--min-time``; the smoke test runs it short).
MIN_TIME = 1.0


def ms(fn: Callable[..., Tensor], *args: Tensor) -> float:
    timer = benchmark.Timer(stmt="fn(*args)", globals={"fn": fn, "args": args})
    return timer.blocked_autorange(min_run_time=MIN_TIME).median * 1e3


def at_tile_height(rows: int) -> Callable[..., Tensor]:
    """The packed causal call on tiled's kernels at ``rows``-row query tiles (key ranges)."""

    def run(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor) -> Tensor:
        packed_qkv = [t.transpose(0, 1)[None] for t in (q, k, v)]
        mask = varlen_mask(cu_q, cu_k, causal=True)
        req = _request(*packed_qkv, mask, None, None, 0.0, None, False)
        return tiled.run(req, tiled.TileConfig(block_q=rows))[0]

    return run


def with_tile_map(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor) -> Tensor:
    """``varlen_attention`` on tiled, its kernels walking a tile map built at every call."""
    with mock.patch.object(tiled, "BAND_IN_KERNEL", False):
        out: Tensor = attnkit.varlen_attention(q, k, v, cu_q, cu_k, causal=True, backend="tiled")
    return out


def height_table(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor) -> Table:
    """The packed causal call on tiled at each query-tile height, beside its modelled cost."""
    chosen = query_tile_rows(cu_q, cu_k, causal=True)
    table = Table(title=f"tiled at each query-tile height (query_tile_rows picks {chosen})")
    for col in ("rows", "ms per call", "kv tiles visited", "modelled cost (relative)"):
        table.add_column(col, justify="right")
    costs = query_tile_costs(cu_q, cu_k, causal=True)
    for rows, cost in reversed(costs.items()):  # 1 row up to 64
        table.add_row(
            f"{rows}{' (picked)' if rows == chosen else ''}",
            f"{ms(at_tile_height(rows), q, k, v, cu_q, cu_k):.2f}",
            str(tile_visits(cu_q, cu_k, rows, causal=True)),
            f"{cost / costs[chosen]:.2f}",
        )
    return table


def decode_table(H: int, D: int, Hkv: int) -> Table:
    """One query per sequence: SDPA with a dense mask against tiled, with and without a map
    (and, for GQA, without stacking each kv head's query heads: ``cpu_kernel.PACK_GQA``)."""
    table = Table(
        title=f"decoding: 1 query per sequence, causal, {H} heads over {Hkv}, D={D}, fp32"
    )
    columns = ["sequences", "keys each (mean)", "sdpa ms", "tiled ms", "tiled, tile map ms"]
    if Hkv < H:
        columns.append("tiled, heads unpacked ms")
    for col in columns:
        table.add_column(col, justify="right")
    table.add_column("auto runs")

    def run_on(backend: str, pack: bool = True) -> Callable[..., Tensor]:
        def run(*a: Tensor) -> Tensor:
            with mock.patch.object(cpu_kernel, "PACK_GQA", pack):
                out: Tensor = attnkit.varlen_attention(*a, causal=True, backend=backend)
            return out

        return run

    ways = [run_on("sdpa"), run_on("tiled"), with_tile_map]
    if Hkv < H:
        ways.append(run_on("tiled", pack=False))
    for n in (2, 4, 8, 16):
        for base in (256, 2048):
            args = packed(1, [base * (i % 4 + 1) for i in range(n)], H, D, Hkv)
            q, k, v, cu_q, cu_k = args
            torch.testing.assert_close(run_on("tiled")(*args), run_on("sdpa")(*args))
            packed_qkv = (t.transpose(0, 1)[None] for t in (q, k, v))
            auto = dispatch(*packed_qkv, mask=varlen_mask(cu_q, cu_k, causal=True)).backend
            table.add_row(
                str(n), str(k.shape[0] // n), *(f"{ms(fn, *args):.2f}" for fn in ways), auto
            )
    return table


def main() -> None:
    global MIN_TIME
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=256, help="new tokens per sequence")
    ap.add_argument("--cached", type=int, nargs="+", default=[0, 256, 512, 1024, 2048, 3072])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument(
        "--kv-heads", type=int, help="key/value heads (GQA) of --decode; default --heads"
    )
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--tiles", action="store_true", help="also time every query-tile height")
    ap.add_argument("--decode", action="store_true", help="time decoding batches instead")
    ap.add_argument("--min-time", type=float, default=MIN_TIME, help="seconds per timing")
    args = ap.parse_args()
    MIN_TIME = args.min_time
    torch.manual_seed(0)
    if args.decode:
        Console().print(decode_table(args.heads, args.dim, args.kv_heads or args.heads))
        return
    q, k, v, cu_q, cu_k = packed(args.queries, args.cached, args.heads, args.dim)

    def varlen(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor) -> Tensor:
        out: Tensor = attnkit.varlen_attention(q, k, v, cu_q, cu_k, causal=True)
        return out

    expected = varlen(q, k, v, cu_q, cu_k)
    torch.testing.assert_close(by_predicate(q, k, v, cu_q, cu_k)[0].transpose(0, 1), expected)
    torch.testing.assert_close(with_tile_map(q, k, v, cu_q, cu_k), expected)
    mask = varlen_mask(cu_q, cu_k, causal=True)
    default_rows = tiled.default_config(q.shape[0]).block_q
    rows = min(query_tile_rows(cu_q, cu_k, causal=True), default_rows)  # the height varlen runs
    blocks = mask.blocks(q.shape[0], k.shape[0], rows, 64)
    runs = {
        "varlen": varlen,
        "varlen, tile map": with_tile_map,
        "varlen, predicate": by_predicate,
        "SDPA padded": padded_sdpa,
    }
    times = {name: ms(fn, q, k, v, cu_q, cu_k) for name, fn in runs.items()}
    table = Table(
        title=(
            f"{len(args.cached)} sequences x {args.queries} new queries over "
            f"{args.cached} cached keys, causal, H={args.heads}, D={args.dim}, fp32, "
            f"{torch.get_num_threads()} threads; tiles computed at {rows}-row query tiles: "
            f"{blocks.density:.0%} of the packed pairs"
        )
    )
    for col in ("way", "ms per call", "varlen's speedup"):
        table.add_column(col, justify="right")
    for name, t in times.items():
        table.add_row(name, f"{t:.2f}", f"{t / times['varlen']:.2f}x")
    Console().print(table)
    if args.tiles:
        Console().print(height_table(q, k, v, cu_q, cu_k))


if __name__ == "__main__":
    main()
