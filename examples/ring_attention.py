"""Ring attention across processes: a sequence split over P ranks (gloo on CPU, NCCL on GPU).

    torchrun --nproc-per-node 4 examples/ring_attention.py --seq 65536
    torchrun --nproc-per-node 4 examples/ring_attention.py --seq 65536 --ulysses

``--ulysses`` runs ``ulysses_attention`` instead (all-to-all to a split of the heads), and
``--hybrid U`` runs ``hybrid_attention`` on a grid of P/U x U ranks (Ulysses within groups of U
consecutive ranks, the ring across them).
``--mask`` adds a sparse pattern over the whole sequence, as ``attnkit patterns --mask`` takes
it (e.g. ``sliding_window:256,256+global:0``); ``--alibi`` and ``--softcap C`` score mods.
``--kv-seq N`` makes it cross-attention: the --seq queries over keys and values of another
sequence of N tokens (the ring only; --check-seq scales with it).

Prints the time per call, each rank's peak memory, the bytes each rank sends per ring step,
and the max error against a single-process float32 run at --check-seq tokens. ``--backend``
picks what computes each block (default: Triton's kernels on GPUs, tiled's on CPUs).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import torch
import torch.distributed as dist

import attnkit
from _torchrun import join  # (this folder's; torchrun puts it on sys.path)
from attnkit import _memory, masks, score_mods
from attnkit.distributed import (
    hybrid_attention,
    hybrid_groups,
    ring_attention,
    shard_hybrid,
    shard_sequence,
    ulysses_attention,
)
from attnkit.distributed.ulysses import head_bounds, kv_heads_for
from attnkit.explain import parse_mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=65536, help="global sequence length to time")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--window", type=int, default=None, help="causal sliding window (keys back)")
    ap.add_argument("--full", action="store_true", help="non-causal attention")
    ap.add_argument("--documents", type=int, default=None, help="pack N documents of equal length")
    ap.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    ap.add_argument("--backward", action="store_true", help="time forward + backward")
    ap.add_argument("--check-seq", type=int, default=2048, help="length for the error check")
    ap.add_argument("--backend", default="auto", choices=["auto", "tiled", "triton"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--ulysses", action="store_true", help="ulysses_attention, not the ring")
    ap.add_argument("--hybrid", type=int, default=None, metavar="U", help="hybrid, U-rank heads")
    ap.add_argument("--mask", default=None, help="a sparse pattern, e.g. dilated:64,4+global:0")
    ap.add_argument("--softcap", type=float, default=None, help="logit soft-capping at this cap")
    ap.add_argument("--alibi", action="store_true", help="ALiBi biases (global positions)")
    ap.add_argument("--kv-seq", type=int, default=None, help="cross-attention over N keys")
    args = ap.parse_args()
    kv_seq = args.seq if args.kv_seq is None else args.kv_seq
    if args.kv_seq is not None and (args.ulysses or args.hybrid):
        ap.error("--kv-seq (cross-attention) runs on the ring alone")
    if (args.check_seq * kv_seq) % args.seq:
        ap.error(f"--check-seq {args.check_seq} must scale to a whole number of keys")

    backend, rank, world, device = join()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    causal = not args.full
    pattern = None if args.mask is None else parse_mask(args.mask, "--mask")
    found = [score_mods.alibi(score_mods.alibi_slopes(args.heads))] if args.alibi else []
    found += [] if args.softcap is None else [score_mods.softcap(args.softcap)]
    score_mod = None if not found else found[0] if len(found) == 1 else score_mods.compose(*found)
    groups = None if args.hybrid is None else hybrid_groups(args.hybrid)
    dtype = getattr(torch, args.dtype)

    def peak_mb(reset: bool = False) -> float:
        """Peak memory in MB since the last reset (resetting it first): the GPU's, else RSS."""
        if device is not None:
            if reset:
                torch.cuda.reset_peak_memory_stats(device)
            return torch.cuda.max_memory_allocated(device) / 2**20
        return (_memory.reset_peak() if reset else _memory.peak_kb()) / 1024

    def documents(length: int) -> torch.Tensor:
        """Document ids of ``length`` positions: --documents of equal length, shifted by half
        a document (one more, cut in two at the ends) so that they straddle the shards."""
        shift = length // (2 * args.documents)
        return (torch.arange(length, device=device) + shift) * args.documents // length

    def shard(x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """This rank's shard of the whole sequence ``x``."""
        if groups is not None:
            return shard_hybrid(x, *groups, args.layout, dim)
        return shard_sequence(x, world, rank, args.layout, dim)

    def shard_of_documents(length: int) -> torch.Tensor | None:
        """This rank's shard of ``documents(length)``, or None without --documents."""
        return None if args.documents is None else shard(documents(length), dim=0)

    def whole_mask(length: int, kv_length: int | None = None) -> masks.Mask:
        """The mask over the whole sequence (over the ``kv_length`` keys: cross-attention,
        document i of the queries with document i of the keys)."""
        if args.window is not None:
            mask = masks.sliding_window(args.window, 0 if causal else args.window)
        else:
            mask = masks.causal() if causal else masks.full()
        if pattern is not None:
            mask = mask & pattern
        if args.documents is None:
            return mask
        kv_ids = None if kv_length is None else documents(kv_length)
        return mask & masks.document(documents(length), kv_ids=kv_ids)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention over every rank's shard of q, k, v (B, H, L/P, D)."""
        length, kv_length = q.shape[2] * world, k.shape[2] * world
        if args.ulysses:
            out = ulysses_attention(
                q, k, v, mask=whole_mask(length), score_mod=score_mod, layout=args.layout,
                backend=args.backend,
            )  # fmt: skip
        else:
            method, grid = ring_attention, {"kv_document_ids": shard_of_documents(kv_length)}
            if groups is not None:
                method, grid = hybrid_attention, {"head_group": groups[0], "ring_group": groups[1]}
            out = method(
                q, k, v, **grid, causal=causal, window=args.window, mask=pattern,
                score_mod=score_mod, layout=args.layout, document_ids=shard_of_documents(length),
                backend=args.backend,
            )  # fmt: skip
        assert isinstance(out, torch.Tensor)
        return out

    def qkv(Lq: int, Lk: int, grad: bool = False) -> tuple[torch.Tensor, ...]:
        return tuple(
            torch.randn(1, h, n, args.dim, device=device, dtype=dtype, requires_grad=grad)
            for h, n in ((args.heads, Lq), (args.kv_heads, Lk), (args.kv_heads, Lk))
        )

    # 1. correctness: the same global tensors on every rank, compared with one process
    torch.manual_seed(0)
    L = args.check_seq
    q, k, v = qkv(L, L * kv_seq // args.seq)
    whole = attnkit.attention(
        q.float(), k.float(), v.float(), mask=whole_mask(L, k.shape[2]), score_mod=score_mod,
        backend="tiled",
    )  # fmt: skip
    local = attend(*(shard(t) for t in (q, k, v)))
    err = (local.float() - shard(whole)).abs().max().reshape(1)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)

    # 2. time and memory at --seq tokens: each rank makes only its own shard
    torch.manual_seed(rank)
    n = kv_seq // world  # keys per rank
    q, k, v = qkv(args.seq // world, n, args.backward)
    attend(q[:, :, :64], k[:, :, :64], v[:, :, :64])  # warm-up
    dist.barrier()
    base_mb = peak_mb(reset=True)
    start = time.perf_counter()
    out = attend(q, k, v)
    if args.backward:
        out.sum().backward()
    dist.barrier()
    seconds = time.perf_counter() - start
    peak = torch.tensor([peak_mb() - base_mb], device=device)
    peaks = [torch.zeros(1, device=device) for _ in range(world)]  # (NCCL takes no CPU tensor)
    dist.all_gather(peaks, peak)
    if rank == 0:
        method = "ulysses" if args.ulysses else "ring" if groups is None else "hybrid"
        grid = "" if args.hybrid is None else f" as {world // args.hybrid} x {args.hybrid}"
        what = "forward+backward" if args.backward else "forward"
        print(
            f"{method} attention, P={world}{grid} ({backend}), seq={args.seq}"
            f"{'' if args.kv_seq is None else f' over kv_seq={kv_seq}'}, heads={args.heads}/"
            f"{args.kv_heads}, dim={args.dim}, causal={causal}, window={args.window}, "
            f"layout={args.layout}, documents={args.documents}, mask={args.mask}, "
            f"score_mod={score_mod!r}, "
            f"{args.dtype}, on {args.backend}"
        )
        print(f"  {what}: {seconds:.2f} s")
        print(f"  peak extra memory per rank: {', '.join(f'{p.item():.0f}' for p in peaks)} MB")

        def all_to_all_mib(ranks: int) -> float:
            """MiB rank 0 sends in Ulysses' 4 all-to-alls over ``ranks``: to each other rank
            its query heads and the kv heads they read, and its own heads of their output."""
            bounds = head_bounds(args.heads, ranks)
            group = args.heads // args.kv_heads
            heads = 0
            for a, b in itertools.pairwise(bounds[1:]):  # the other ranks' shares
                heads += (b - a) + 2 * len(kv_heads_for(a, b - a, group)) + bounds[1]
            return heads * n * args.dim * q.element_size() / 2**20

        if args.ulysses:
            sent = f"{all_to_all_mib(world):.1f} MiB in 4 all-to-alls forward"
        elif groups is None:
            shards = 2 * args.kv_heads * n * args.dim * q.element_size()  # k and v
            sent = f"{shards / 2**20:.1f} MiB per ring step ({world - 1} steps forward)"
        else:  # Ulysses over U ranks, then k and v of U shards (rank 0's heads) around R
            U, R = args.hybrid, world // args.hybrid
            bounds = head_bounds(args.heads, U)  # rank 0's kv heads, over U shards
            kv = len(kv_heads_for(0, bounds[1], args.heads // args.kv_heads))
            block = 2 * kv * U * n * args.dim * q.element_size()
            sent = (
                f"{all_to_all_mib(U):.1f} MiB in 4 all-to-alls and "
                f"{block / 2**20:.1f} MiB per ring step ({R - 1} steps) forward"
            )
        print(f"  bytes sent per rank: {sent}")
        print(f"  max |{method} - single process| at seq={args.check_seq}: {err.item():.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
