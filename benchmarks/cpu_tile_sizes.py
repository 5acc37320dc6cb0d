"""Tile sizes of the tiled backend's CPU kernels: time per (block_q, max_chunk) on the bench cases.

    python benchmarks/cpu_tile_sizes.py [--json benchmarks/results/cpu_tile_sizes.json]

Each row is one case, each column one tile configuration (block_k is 64 throughout), all timed
in one run; the fastest is marked. ``attnkit.backends.tiled.tuned_config`` follows the result.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import attnkit
from attnkit import masks
from attnkit.backends import tiled
from attnkit.bench import seconds

CONFIGS = [(32, 1024), (64, 512), (64, 1024), (128, 512), (128, 1024)]
CASES = [  # name, N, D, dtype, mask
    ("sliding_window(512)", 16384, 64, torch.float32, masks.sliding_window(512)),
    ("sliding_window(512)", 16384, 64, torch.bfloat16, masks.sliding_window(512)),
    ("sliding_window(512)", 16384, 128, torch.float32, masks.sliding_window(512)),
    ("causal", 8192, 64, torch.float32, masks.causal()),
    ("causal", 8192, 128, torch.float32, masks.causal()),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="save the timings here")
    args = ap.parse_args()
    table = Table(title="tiled forward ms by (block_q, max_chunk), B=1, H=8; * = fastest")
    table.add_column("case")
    for bq, mc in CONFIGS:
        table.add_column(f"{bq}, {mc}", justify="right")
    results = []
    for name, N, D, dtype, mask in CASES:
        q, k, v = (torch.randn(1, 8, N, D, dtype=dtype) for _ in range(3))
        times = []
        for bq, mc in CONFIGS:
            req = attnkit.functional._request(q, k, v, mask, None, None, 0.0, None, False)
            cfg = tiled.TileConfig(block_q=bq, block_k=64, max_chunk=mc)
            with torch.no_grad():
                times.append(seconds(lambda req=req, cfg=cfg: tiled.run(req, cfg)))
        best = min(times)
        label = f"{name} N={N} D={D} {str(dtype).removeprefix('torch.')}"
        table.add_row(label, *(f"{t * 1e3:.0f}{' *' if t == best else ''}" for t in times))
        results.append({"case": label, "configs": CONFIGS, "seconds": times})
    Console(width=140).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
