"""CPU benchmark: the tiled backend vs torch SDPA and FlexAttention, measured in one run.

    python benchmarks/cpu.py [--quick] [--json benchmarks/results/cpu.json]

Efficiency = FLOPs the mask needs (4·B·H·D per attended pair) ÷ time ÷ this machine's fp32
matmul throughput (torch.mm of 4096², timed in the same run).
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils import benchmark as tb

import attnkit
from attnkit import masks

B, H, D = 1, 8, 64


def seconds(fn: Callable[[], object]) -> float:
    timer = tb.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=1.0).median


def matmul_flops() -> float:
    a = torch.randn(4096, 4096)
    return 2 * 4096**3 / seconds(lambda: a @ a)


def flex_fn(mask: attnkit.Mask, N: int):
    """Compiled FlexAttention for ``mask``, or None with the reason it cannot run here."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        bound = mask.bind(N, N)
        bm = create_block_mask(
            lambda b, h, q, kv: bound.fn(b, h, q, kv), None, None, N, N, device="cpu"
        )
        compiled = torch.compile(flex_attention)
        return lambda q, k, v: compiled(q, k, v, block_mask=bm), None
    except Exception as exc:  # report whatever stops it: the table says why
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"


def case(name, N, mask, dtype, peak, backward=False, with_flex=True):
    q, k, v = (torch.randn(B, H, N, D, dtype=dtype, requires_grad=backward) for _ in range(3))
    pairs = attnkit.masks.full().density(N, N) if mask is None else mask.density(N, N)
    flops = 4 * B * H * D * pairs * N * N * (3.5 if backward else 1.0)  # bwd ≈ 2.5x fwd
    dense = None if mask is None else mask.dense(N, N)
    is_causal = mask is not None and mask.spec == ("causal", "bottom_right")

    def timed(fwd):
        if not backward:
            with torch.no_grad():
                return seconds(lambda: fwd(q, k, v))
        return seconds(lambda: fwd(q, k, v).sum().backward())

    row = {"case": name, "N": N, "dtype": str(dtype).split(".")[-1], "backward": backward}
    row["tiled_s"] = timed(lambda q, k, v: attnkit.attention(q, k, v, mask=mask, backend="tiled"))
    if is_causal:
        row["sdpa_s"] = timed(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        )
    else:
        row["sdpa_s"] = timed(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        )
    row["flex_s"], row["flex_note"] = None, "not run"
    if with_flex and not backward and mask is not None:
        fn, why = flex_fn(mask, N)
        if fn is None:
            row["flex_note"] = why
        else:
            try:
                fn(q, k, v)
                row["flex_s"], row["flex_note"] = timed(fn), ""
            except Exception as exc:  # compile errors surface on the first call
                row["flex_note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    elif backward:
        row["flex_note"] = "FlexAttention has no CPU backward"
    row["tiled_eff"] = flops / row["tiled_s"] / peak
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    peak = matmul_flops()
    s = 4 if args.quick else 1
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        rows.append(case("sliding_window(512)", 16384 // s, masks.sliding_window(512), dtype, peak))
        rows.append(case("causal", 8192 // s, masks.causal(), dtype, peak, with_flex=False))
        rows.append(case("dense", 4096 // s, None, dtype, peak))
    rows.append(
        case(
            "sliding_window(512)",
            16384 // s,
            masks.sliding_window(512),
            torch.float32,
            peak,
            backward=True,
        )
    )
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"attnkit tiled vs torch on CPU — fp32 matmul {peak / 1e9:.0f} GFLOP/s, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    for col in (
        "case",
        "N",
        "dtype",
        "pass",
        "tiled ms",
        "SDPA ms",
        "SDPA/tiled",
        "Flex ms",
        "Flex/tiled",
        "tiled % of matmul",
    ):
        table.add_column(col)
    for r in rows:
        flex = "—" if r["flex_s"] is None else f"{r['flex_s'] * 1e3:.0f}"
        flex_ratio = "—" if r["flex_s"] is None else f"{r['flex_s'] / r['tiled_s']:.2f}x"
        table.add_row(
            r["case"],
            str(r["N"]),
            r["dtype"],
            "fwd+bwd" if r["backward"] else "fwd",
            f"{r['tiled_s'] * 1e3:.0f}",
            f"{r['sdpa_s'] * 1e3:.0f}",
            f"{r['sdpa_s'] / r['tiled_s']:.2f}x",
            flex,
            flex_ratio,
            f"{r['tiled_eff']:.0%}",
        )
    Console(width=150).print(table)
    for r in rows:
        if r["flex_note"] and r["flex_note"] != "not run":
            print(f"FlexAttention, {r['case']} {r['dtype']}: {r['flex_note']}")
    if args.json:
        meta = {
            "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "matmul_flops": peak,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
