"""The measurements behind ``backend="auto"`` on CPU: tiled vs SDPA (bool mask) per mask kind.

    python benchmarks/cpu_dispatch_rule.py

For N = 256, 1024, 4096 (B=1, H=8, D=64, float32, forward) and masks from fully dense to
sparse, as Mask objects and as a bool tensor; prints what ``attnkit.dispatch`` picks.
"""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

import attnkit
from attnkit import masks
from attnkit.bench import seconds


def cases(N: int) -> dict[str, object]:
    return {
        "key_padding (N-7 keys)": masks.key_padding([N - 7]),
        "sliding_window(3N/4)": masks.sliding_window(3 * N // 4),
        "prefix_lm(N/2)": masks.prefix_lm(N // 2),
        "document(2 docs) & causal": masks.document(torch.arange(N) * 2 // N) & masks.causal(),
        "bool tensor, random 90 %": torch.rand(N, N) < 0.9,
        "bool tensor, sliding_window(N/8)": masks.sliding_window(N // 8).dense(N, N)[0, 0],
    }


def time_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: object, backend: str
) -> float:
    with torch.no_grad():
        return seconds(lambda: attnkit.attention(q, k, v, mask=mask, backend=backend))


def main() -> None:
    table = Table(title="tiled vs SDPA with a bool mask, forward ms (B=1, H=8, D=64, fp32)")
    for col in ("N", "mask", "density", "tiled", "SDPA", "SDPA / tiled", "auto picks"):
        table.add_column(col, justify="left" if col == "mask" else "right")
    torch.manual_seed(0)
    for N in (256, 1024, 4096):
        q, k, v = (torch.randn(1, 8, N, 64) for _ in range(3))
        for name, mask in cases(N).items():
            dense = mask if isinstance(mask, torch.Tensor) else mask.dense(N, N)
            t_tiled, t_sdpa = (time_forward(q, k, v, mask, b) for b in ("tiled", "sdpa"))
            table.add_row(
                str(N),
                name,
                f"{float(dense.float().mean()):.2f}",
                f"{t_tiled * 1e3:.2f}",
                f"{t_sdpa * 1e3:.2f}",
                f"{t_sdpa / t_tiled:.2f}x",
                attnkit.dispatch(q, k, v, mask=mask).backend,
            )
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
