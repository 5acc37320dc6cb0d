"""What the triton kernels cost on each GPU arch, compiled here without a GPU.

    python benchmarks/triton_resources.py [--out benchmarks/results/triton_resources.md]
    python benchmarks/triton_resources.py --arch 80 --dtype bfloat16 --head-dim 128 \
        --launch 64,64,8,3          # try other tiles: block_m,block_n,num_warps,num_stages
    python benchmarks/triton_resources.py --pack-gqa --gqa-group 4 --kv-splits 8 \
        --dtype bfloat16 --out benchmarks/results/triton_resources_decoding.md
                                    # a decoding step's forward: heads packed, kv split
    python benchmarks/triton_resources.py --band --alibi --gqa-group 4 --dtype bfloat16 \
        --out benchmarks/results/triton_resources_band.md
                                    # kernels computing a causal/window mask (one stage fewer)
    python benchmarks/triton_resources.py --ranges --alibi --gqa-group 4 --dtype bfloat16 \
        --out benchmarks/results/triton_resources_ranges.md
                                    # kernels masking from key ranges (documents, padding)

For each arch, dtype and head dim, per kernel: the tiles ``choose_launches`` picks, the
registers per thread, spilled bytes per thread, shared memory per block and the instruction
its dots became (tcgen05 / wgmma / mma.sync / fma), from Triton's NVIDIA backend and ptxas
(``attnkit.backends.triton.aot``). Not timings: a GPU is needed for those
(``attnkit bench --device cuda``). Takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from attnkit.backends.triton import Launch
from attnkit.backends.triton.aot import ARCH_NAMES, SHARED_MEMORY_LIMIT, launcher_resources

COLUMNS = [
    "arch",
    "dtype",
    "D",
    "tiles (m, n, warps, stages)",
    "kernel",
    "regs",
    "spill B",
    "smem KB",
    "dots",
]


def rows(
    archs: list[int],
    dtypes: list[torch.dtype],
    head_dims: list[int],
    launch: Launch | None,
    gqa_group: int,
    kv_splits: int = 1,
    pack_gqa: bool = False,
    band: bool = False,
    alibi: bool = False,
    ranges: bool = False,
):
    """One row per compiled kernel."""
    options = {"launch": launch, "gqa_group": gqa_group, "kv_splits": kv_splits}
    options |= {"band": band, "alibi": alibi, "ranges": ranges}
    for arch in archs:
        for dtype in dtypes:
            for D in head_dims:
                for r in launcher_resources(arch, dtype, D, **options, pack_gqa=pack_gqa):
                    limit = SHARED_MEMORY_LIMIT[arch] / 1024
                    smem = f"{r.shared_bytes / 1024:.0f}" + ("" if r.fits else f" > {limit:.0f}!")
                    yield [
                        ARCH_NAMES[arch],
                        str(dtype).removeprefix("torch."),
                        str(D),
                        ", ".join(map(str, vars(r.launch).values())),
                        r.kernel.removeprefix("attention_").removesuffix("_kernel"),
                        str(r.registers),
                        str(r.stack_bytes),
                        smem,
                        r.matmul,
                    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the table as Markdown here")
    ap.add_argument("--arch", type=int, nargs="*", default=sorted(SHARED_MEMORY_LIMIT))
    ap.add_argument("--dtype", nargs="*", default=["bfloat16", "float16", "float32"])
    ap.add_argument("--head-dim", type=int, nargs="*", default=[64, 128, 256])
    ap.add_argument("--gqa-group", type=int, default=1, help="query heads per kv head")
    ap.add_argument(
        "--launch", help="block_m,block_n,num_warps,num_stages instead of the launcher's"
    )
    ap.add_argument("--kv-splits", type=int, default=1, help="> 1: the split forward only")
    ap.add_argument(
        "--pack-gqa", action="store_true", help="a decoding step's forward, heads packed"
    )
    ap.add_argument("--band", action="store_true", help="kernels computing a causal/window mask")
    ap.add_argument("--alibi", action="store_true", help="with ALiBi in-kernel")
    ap.add_argument("--ranges", action="store_true", help="kernels masking from key ranges")
    args = ap.parse_args()
    launch = Launch(*map(int, args.launch.split(","))) if args.launch else None
    dtypes = [getattr(torch, d) for d in args.dtype]
    table = Table(title="triton kernels compiled per GPU arch (registers/spills per thread)")
    for c in COLUMNS:
        table.add_column(c, justify="left" if c in ("arch", "dtype", "kernel") else "right")
    found = []
    for row in rows(
        args.arch,
        dtypes,
        args.head_dim,
        launch,
        args.gqa_group,
        args.kv_splits,
        args.pack_gqa,
        args.band,
        args.alibi,
        args.ranges,
    ):
        table.add_row(*row)
        found.append(row)
    Console(width=140).print(table)
    if args.out:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(r) + " |" for r in found]
        command = " ".join(["python benchmarks/triton_resources.py", *sys.argv[1:]])
        head = f"Written by `{command}`.\n\n"
        Path(args.out).write_text(head + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
