"""Decoding over a KV cache sharded along the sequence (context parallelism), P processes.

    torchrun --nproc-per-node 2 examples/sharded_decoding.py --context 262144

Each rank holds a contiguous run of a long cache's positions (the last rank the tail, into
which each step's new key and value go, through a ``KVCache``); every rank computes the same
new query's attention over its own run, and ``sharded_cache_attention`` merges the ranks'
parts exactly. Prints the time per decoding step, against one process holding the whole cache
with every core, each rank's cache memory, what the ranks exchange per step, and the max
error against that one process.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import attnkit
from _torchrun import join  # (this folder's; torchrun puts it on sys.path)
from attnkit import masks, score_mods
from attnkit.distributed import sharded_cache_attention
from attnkit.nn import KVCache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=262144, help="cached positions to start from")
    ap.add_argument("--steps", type=int, default=20, help="decoding steps to time")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--window", type=int, default=None, help="causal sliding window (keys back)")
    ap.add_argument("--alibi", action="store_true", help="ALiBi biases (global positions)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()

    backend, rank, world, device = join()
    dtype = getattr(torch, args.dtype)
    slopes = score_mods.alibi_slopes(args.heads)
    score_mod = score_mods.alibi(slopes) if args.alibi else None
    H, Hkv, D, L = args.heads, args.kv_heads, args.dim, args.context

    def token(step: int) -> tuple[torch.Tensor, ...]:
        """Step ``step``'s query, key and value (1, H, 1, D): the same on every rank."""
        g = torch.Generator(device or "cpu").manual_seed(1000 + step)
        return tuple(
            torch.randn(1, h, 1, D, generator=g, dtype=dtype, device=device) for h in (H, Hkv, Hkv)
        )

    # rank r holds positions [r·L/P, (r+1)·L/P) of the starting cache (the last rank also
    # every new position), made from seed r: no rank makes or holds the whole
    bounds = [r * L // world for r in range(world + 1)]
    start = bounds[rank]

    def shard(r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank r's keys and values of the starting cache (1, Hkv, L/P, D)."""
        g = torch.Generator(device or "cpu").manual_seed(r)  # (made where it is used)
        n = bounds[r + 1] - bounds[r]
        k, v = (torch.randn(1, Hkv, n, D, generator=g, dtype=dtype, device=device) for _ in "kv")
        return k, v

    keys, values = shard(rank)
    if rank == world - 1:
        cache = KVCache(1, Hkv, keys.shape[2] + args.steps + 1, D, dtype, device)
        cache.append(keys, values)
    else:
        cache = KVCache.holding(keys, values)

    def step(n: int) -> torch.Tensor:
        """Decoding step n: the new token's key and value go to the tail; every rank attends."""
        q, k, v = token(n)
        if rank == world - 1:
            cache.append(k, v)
        out = sharded_cache_attention(
            q, cache.keys, cache.values, kv_start=start, causal=True, window=args.window,
            score_mod=score_mod,
        )  # fmt: skip
        assert isinstance(out, torch.Tensor)
        return out

    def sync() -> None:
        if device is not None:
            torch.cuda.synchronize(device)

    step(0)  # warm-up (and the first new position)
    dist.barrier()
    sync()
    begin = time.perf_counter()
    for n in range(1, args.steps + 1):
        out = step(n)
    sync()
    per_step = (time.perf_counter() - begin) / args.steps

    # one process over the whole cache, with every core: the same last step
    if rank == 0:
        news = [token(n) for n in range(args.steps + 1)]
        parts = [shard(r) for r in range(world)]
        whole_k = torch.cat([k for k, _ in parts] + [k for _, k, _ in news], dim=2)
        whole_v = torch.cat([v for _, v in parts] + [v for _, _, v in news], dim=2)
        q = token(args.steps)[0]
        mask = masks.causal() if args.window is None else masks.sliding_window(args.window)
        torch.set_num_threads(os.cpu_count() or 1)

        def alone() -> torch.Tensor:
            return attnkit.attention(q, whole_k, whole_v, mask=mask, score_mod=score_mod)

        want = alone()
        sync()
        begin = time.perf_counter()
        for _ in range(args.steps):
            alone()
        sync()
        one = (time.perf_counter() - begin) / args.steps
        err = (out.float() - want.float()).abs().max().item()
        size = torch.finfo(dtype).bits // 8
        per_rank = 2 * Hkv * D * (L // world) * size / 2**20
        gathered = world * H * (D + 1) * 4 / 2**10  # each rank's output and LSE, float32
        print(
            f"sharded-cache decoding, P={world} ({backend}), context={L}, heads={H}/{Hkv}, "
            f"dim={D}, window={args.window}, score_mod={score_mod!r}, {args.dtype}"
        )
        print(f"  per step: {per_step * 1e3:.2f} ms; one process, whole cache: {one * 1e3:.2f} ms")
        print(f"  cache per rank: {per_rank:.0f} MiB (one process: {per_rank * world:.0f} MiB)")
        print(f"  gathered per step: {gathered:.1f} KiB (every rank's output and LSE)")
        print(f"  max |sharded - one process|: {err:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
