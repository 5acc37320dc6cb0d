"""GPU benchmark: attnkit's Triton kernels vs torch SDPA (flash) and FlexAttention, in one run.

    python benchmarks/gpu.py [--quick] [--out benchmarks/results/gpu.md]   # on a CUDA machine
    python benchmarks/gpu.py --dims 128 --lengths 4096 16384               # part of the table
    python benchmarks/gpu.py --only decode --out benchmarks/results/gpu_decode.md
    TRITON_INTERPRET=1 python benchmarks/gpu.py --smoke                    # code paths, on CPU

The same as ``attnkit bench --device cuda --markdown F``; what is measured and how is in
``attnkit.bench_gpu``.
"""

from __future__ import annotations

import argparse

import torch

from attnkit import bench_gpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/gpu.md", help="Markdown table")
    ap.add_argument("--json", help="also save every figure as JSON")
    ap.add_argument("--quick", action="store_true", help="N up to 8k, D=64 only")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, every code path once")
    ap.add_argument("--dims", type=int, nargs="+", help="head dims (default 128 64)")
    ap.add_argument("--lengths", type=int, nargs="+", help="token counts (default 1k ... 32k)")
    ap.add_argument(
        "--only",
        nargs="+",
        choices=("attention", "decode"),
        default=("attention", "decode"),
        help="tables to run: attention (TFLOP/s) and decode (one query over a KV cache)",
    )
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        ap.error("no CUDA device here; on CPU only --smoke runs (with TRITON_INTERPRET=1)")
    bench_gpu.run(
        device,
        args.quick,
        args.json,
        args.out,
        args.smoke,
        dims=args.dims,
        lengths=args.lengths,
        only=args.only,
    )


if __name__ == "__main__":
    main()
