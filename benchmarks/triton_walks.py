"""Host-side cost of the Triton backend's tile walks for packed documents, per training step.

A packed training step (varlen, causal within each document) makes a new mask at every call,
so the Triton backend makes the three walks of a step (forward, dK/dV, dQ) anew each time.
Two ways, in milliseconds per step, the kernels not run (they would be the same work):

- ``key ranges``: the walks found from each query tile's first and last keys (``walks.
  kernel_ranges``), on the device the tensors are on; partial tiles masked in-kernel;
- ``BlockMask``: the mask's BlockMask, its partial tiles' bitmaps and tile lists
  (``walks.BAND_IN_KERNEL = False``: how the backend ran documents before), which is built on
  the CPU whatever the device, then copied to it.

Tiles are those the launcher picks for sm_90 at D=128 in bf16 (the walks do not depend on
the arch otherwise). Only shapes matter: q, k, v are never read.

    python benchmarks/triton_walks.py [--device cpu|cuda] [--lengths 4096 16384 32768]
        [--documents 8] [--min-time 0.5]
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch
from rich.console import Console
from rich.table import Table
from torch.utils import benchmark

from attnkit.backends import triton as triton_backend
from attnkit.functional import _request
from attnkit.varlen import varlen_mask


def step_ms(N: int, documents: int, device: str, in_kernel: bool, min_time: float) -> float:
    """Median milliseconds to make a step's three walks for ``documents`` of N/documents."""
    launches = triton_backend.choose_launches(128, torch.bfloat16, 90)
    cu = (torch.arange(documents + 1) * (N // documents)).to(device)
    q = torch.empty(1, 1, N, 128, dtype=torch.bfloat16, device=device)

    def step() -> None:
        req = _request(q, q, q, varlen_mask(cu, cu, causal=True), None, None, 0.0, None, False)
        triton_backend.tile_walk(req, launches.forward)
        triton_backend.tile_walk(req, launches.dkdv, by_columns=True)
        triton_backend.tile_walk(req, launches.dq)
        if device == "cuda":
            torch.cuda.synchronize()

    with mock.patch.object(triton_backend.walks, "BAND_IN_KERNEL", in_kernel):
        step()  # warm-up
        timer = benchmark.Timer("step()", globals={"step": step})
        return float(timer.blocked_autorange(min_run_time=min_time).median) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--documents", type=int, default=8)
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds per measurement")
    args = ap.parse_args()
    table = Table(
        title=f"tile walks of a packed step, {args.documents} documents, causal, "
        f"ms per step on {args.device} (torch threads: {torch.get_num_threads()})"
    )
    for column in ("tokens", "key ranges", "BlockMask", "BlockMask / key ranges"):
        table.add_column(column, justify="right")
    for N in args.lengths:
        ranges, walked = (
            step_ms(N, args.documents, args.device, in_kernel, args.min_time)
            for in_kernel in (True, False)
        )
        table.add_row(str(N), f"{ranges:.2f}", f"{walked:.2f}", f"{walked / ranges:.1f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
