"""What attnkit adds to each call where the kernel itself is cheap: µs per call on CPU.

Decoding a small model calls attention once per layer per token over a short cache, where a
call's fixed cost (checking the inputs, choosing a backend) is a visible share of the step.
One query of 4 heads (2 kv heads, D = 32) over L cached keys, fp32, no gradients:

- ``attnkit.attention`` with ``backend="auto"`` (which picks SDPA here), ``"sdpa"`` and
  ``"tiled"``, against ``torch.nn.functional.scaled_dot_product_attention`` on the same
  tensors (``enable_gqa``); the "added" column is auto's time less SDPA's;
- "hf attnkit", the transformers integration's attention function, against "hf sdpa",
  transformers' own SDPA one: the call a model's layer makes (with transformers installed).

Every way's output is checked against torch SDPA's first. Median of ``torch.utils.benchmark``
over ``--min-time`` seconds per cell, all threads.

    python benchmarks/cpu_call_overhead.py [--lengths 16 64 256] [--min-time 1.0]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import attnkit
from attnkit.bench import seconds

HQ, HKV, D = 4, 2, 32


def calls_for(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Each way of computing the same attention, by column name."""
    return {
        "torch SDPA": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "auto": lambda: attnkit.attention(q, k, v),
        "sdpa": lambda: attnkit.attention(q, k, v, backend="sdpa"),
        "tiled": lambda: attnkit.attention(q, k, v, backend="tiled"),
        **transformers_calls(q, k, v),
    }


def transformers_calls(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> dict[str, Callable[[], object]]:
    """transformers' SDPA attention function and attnkit's, as a Llama layer calls them."""
    try:
        import transformers
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except ImportError:
        return {}
    from attnkit.integrations.transformers import attention_forward

    config = transformers.LlamaConfig(
        hidden_size=HQ * D, num_attention_heads=HQ, num_key_value_heads=HKV, num_hidden_layers=1
    )
    layer = transformers.models.llama.modeling_llama.LlamaAttention(config, layer_idx=0).eval()
    scale = D**-0.5
    return {
        "hf sdpa": lambda: sdpa_attention_forward(layer, q, k, v, None, scaling=scale),
        "hf attnkit": lambda: attention_forward(layer, q, k, v, None, scaling=scale),
    }


def check_agree(calls: dict[str, Callable[[], object]]) -> None:
    """Every way computes torch SDPA's output (transformers' functions return (B, L, H, D))."""
    want = calls["torch SDPA"]()
    assert isinstance(want, torch.Tensor)
    for name, fn in calls.items():
        got = fn()
        got = got[0].transpose(1, 2) if isinstance(got, tuple) else got
        torch.testing.assert_close(
            got, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--min-time", type=float, default=1.0)
    args = parser.parse_args()
    table = Table(
        title=f"One query, {HQ} heads ({HKV} kv) of {D}, fp32, {torch.get_num_threads()} "
        "threads: µs per call"
    )
    columns: list[str] = []
    rows: list[tuple[int, dict[str, float]]] = []
    with torch.no_grad():
        for L in args.lengths:
            q = torch.randn(1, HQ, 1, D)
            k, v = torch.randn(1, HKV, L, D), torch.randn(1, HKV, L, D)
            calls = calls_for(q, k, v)
            check_agree(calls)
            us = {name: seconds(fn, args.min_time) * 1e6 for name, fn in calls.items()}
            us["added"] = us["auto"] - us["torch SDPA"]
            columns = list(us)
            rows.append((L, us))
    table.add_column("keys", justify="right")
    for name in columns:
        table.add_column(name, justify="right")
    for L, us in rows:
        table.add_row(str(L), *(f"{us[name]:.1f}" for name in columns))
    Console().print(table)


if __name__ == "__main__":
    main()
