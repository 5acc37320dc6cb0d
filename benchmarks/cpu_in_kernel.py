"""ALiBi, softcap and dropout on CPU: inside the compiled kernels vs the tiled backend's loops.

    python benchmarks/cpu_in_kernel.py

Causal, N = 4096, B=1, H=8, D=64, float32, forward and forward+backward, one run. For ALiBi,
also SDPA with the bias (and the causal mask) as a dense float tensor, the way to get ALiBi
from torch's SDPA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import attnkit
from attnkit import masks, score_mods
from attnkit.backends import tiled
from attnkit.backends.tiled import TileConfig
from attnkit.bench import seconds

N, H, D = 4096, 8, 64


def timed(fn: Callable[..., torch.Tensor], qkv: list[torch.Tensor], backward: bool) -> float:
    if backward:
        return seconds(lambda: torch.autograd.backward(fn(*qkv).sum()))
    with torch.no_grad():
        return seconds(lambda: fn(*qkv))


def main() -> None:
    slopes = score_mods.alibi_slopes(H)
    cases: dict[str, tuple[score_mods.ScoreMod | None, float]] = {  # (score_mod, dropout_p)
        "alibi": (score_mods.alibi(slopes), 0.0),
        "softcap(30)": (score_mods.softcap(30.0), 0.0),
        "alibi, softcap(30)": (
            score_mods.compose(score_mods.alibi(slopes), score_mods.softcap(30.0)),
            0.0,
        ),
        "dropout 0.1": (None, 0.1),
    }
    mask = masks.causal()
    pos = torch.arange(N)
    bias = -slopes.view(H, 1, 1) * (pos.view(-1, 1) - pos.view(1, -1)).abs()
    bias = bias.masked_fill(pos.view(-1, 1) < pos.view(1, -1), float("-inf"))
    table = Table(title=f"causal, N={N}, B=1, H={H}, D={D}, fp32: ms")
    for col in (
        "feature",
        "pass",
        "compiled kernel",
        "PyTorch loops",
        "loops / kernel",
        "SDPA + dense bias",
    ):
        table.add_column(col, justify="left" if col in ("feature", "pass") else "right")
    for backward in (False, True):
        qkv = [torch.randn(1, H, N, D, requires_grad=backward) for _ in range(3)]

        def tiled_call(
            mod: score_mods.ScoreMod | None, p: float, use_kernel: bool
        ) -> Callable[..., torch.Tensor]:
            def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                req = attnkit.functional._request(q, k, v, mask, mod, None, p, None, False)
                return tiled.run(req, TileConfig(64, 64, 1024, use_kernel=use_kernel))[0]

            return fn

        for name, (mod, p) in cases.items():
            t_kernel = timed(tiled_call(mod, p, True), qkv, backward)
            t_loops = timed(tiled_call(mod, p, False), qkv, backward)
            sdpa = "—"
            if name == "alibi":
                t_sdpa = timed(
                    lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
                    qkv,
                    backward,
                )
                sdpa = f"{t_sdpa * 1e3:.0f}"
            table.add_row(
                name,
                "fwd+bwd" if backward else "fwd",
                f"{t_kernel * 1e3:.0f}",
                f"{t_loops * 1e3:.0f}",
                f"{t_loops / t_kernel:.2f}x",
                sdpa,
            )
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
