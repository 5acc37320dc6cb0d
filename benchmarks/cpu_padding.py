"""Padding masks made anew at every call, on CPU: tiled's kernels reading the kept keys, against
the same kernels walking a tile map built for the call, and SDPA with a bool mask.

A model makes its padding mask at every call (``key_padding_mask``, ``attention_mask``), so
no tile map can be kept for it. Since the compiled kernels take a band ``&`` padding as the
band's bounds and the kept keys (B, Lk), they build none; ``tiled.BAND_IN_KERNEL = False``
makes them walk a BlockMask built for each call instead, as tiled ran padding before. Tables
(``--tables``), ms (µs for decoding) per call, median of ``torch.utils.benchmark``:

- encoder: B = 8 sequences right-padded to L, lengths L/4 … L, 12 heads of 32 (MiniLM's
  shape), bidirectional, fp32, forward and forward+backward;
- decoding: 1, 4 and 16 queries over L cached keys under causal & left padding (a ragged
  batch of 4, 8 heads of 64, fp32), forward; one query also under the bool tensor
  (B, 1, 1, L) of its kept keys, made anew each call, as transformers passes it;
- model: the pretrained all-MiniLM-L6-v2 encoding a batch of 32 token sequences of 8 … L
  tokens (right-padded), without gradients: attention, linear layers and all.

    python benchmarks/cpu_padding.py [--lengths 128 512 2048] [--tables encoder decoding model]
        [--min-time 1.0]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from typing import Any
from unittest import mock

import torch
from rich.console import Console
from rich.table import Table

import attnkit
from attnkit import masks
from attnkit.backends import tiled
from attnkit.bench import seconds

#: (column, backend, whether the kernels walk a tile map)
WAYS = (("tiled", "tiled", False), ("walking a map", "tiled", True), ("SDPA", "sdpa", False))


def timed(fn: Callable[[str], object], min_time: float) -> list[float]:
    """Seconds per call of ``fn(backend)`` for each of ``WAYS`` (each timed ``min_time`` s)."""
    times = []
    for _, backend, walks in WAYS:
        with mock.patch.object(tiled, "BAND_IN_KERNEL", not walks):
            times.append(seconds(partial(fn, backend), min_time))
    return times


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    causal: bool,
    as_tensor: bool,
    backend: str,
) -> None:
    """Attention under a padding mask made anew, as a model makes it (& causal), backward
    too where q requires grad. ``as_tensor``: a new bool tensor (B, 1, 1, L) of the keys kept,
    as transformers passes one query's mask (equal to causal & the padding there)."""
    if as_tensor:
        mask: masks.Mask | torch.Tensor = valid[:, None, None, :].clone()
    else:
        padding = masks.from_padding_mask(valid)
        mask = masks.causal() & padding if causal else padding
    out = attnkit.attention(q, k, v, mask=mask, backend=backend)
    if q.requires_grad:
        out.sum().backward()


def cells(times: list[float], unit: float, auto: str) -> list[str]:
    t_tiled, t_map, t_sdpa = times
    return [
        *(f"{t * unit:.2f}" for t in times),
        f"{t_map / t_tiled:.2f}x",
        f"{t_sdpa / t_tiled:.2f}x",
        auto,
    ]


def new_table(title: str, first: list[str], unit: str) -> Table:
    table = Table(title=title)
    for col in [*first, *(f"{name} {unit}" for name, _, _ in WAYS)]:
        table.add_column(col, justify="right")
    for col in ("map / tiled", "SDPA / tiled", "auto picks"):
        table.add_column(col, justify="right")
    return table


def ragged(B: int, L: int, shortest: int) -> torch.Tensor:
    """Keys kept (B, L): sequence b keeps its first lengths[b], shortest … L."""
    lengths = torch.linspace(shortest, L, B).long()
    return torch.arange(L)[None, :] < lengths[:, None]


def encoder_table(lengths: list[int], min_time: float) -> Table:
    table = new_table(
        "bidirectional attention, 8 sequences right-padded to L (L/4 … L), 12 heads of 32, fp32",
        ["L", "pass"],
        "ms",
    )
    torch.manual_seed(0)
    for L in lengths:
        valid = ragged(8, L, L // 4)
        for grad in (False, True):
            q, k, v = (torch.randn(8, 12, L, 32, requires_grad=grad) for _ in range(3))
            auto = attnkit.dispatch(q, k, v, mask=masks.from_padding_mask(valid)).backend
            row = cells(timed(partial(attend, q, k, v, valid, False, False), min_time), 1e3, auto)
            table.add_row(str(L), "fwd+bwd" if grad else "fwd", *row)
    return table


def decoding_table(lengths: list[int], min_time: float) -> Table:
    table = new_table(
        "Lq queries over L cached keys, causal & left padding of a ragged batch of 4, "
        "8 heads of 64, fp32",
        ["L", "Lq", "mask"],
        "µs",
    )
    torch.manual_seed(0)
    for L in lengths:
        valid = ragged(4, L, L // 4).flip(-1)  # left padding: the prompts end together
        for Lq, as_tensor in ((1, False), (1, True), (4, False), (16, False)):
            q = torch.randn(4, 8, Lq, 64)
            k, v = (torch.randn(4, 8, L, 64) for _ in range(2))
            if as_tensor:
                mask: masks.Mask | torch.Tensor = valid[:, None, None, :]
            else:
                mask = masks.causal() & masks.from_padding_mask(valid)
            auto = attnkit.dispatch(q, k, v, mask=mask).backend
            row = cells(
                timed(partial(attend, q, k, v, valid, True, as_tensor), min_time), 1e6, auto
            )
            table.add_row(str(L), str(Lq), "bool tensor" if as_tensor else "Mask", *row)
    return table


def encode(models: dict[str, Any], ids: torch.Tensor, keep: torch.Tensor, backend: str) -> None:
    models[backend](ids, keep)


def model_table(lengths: list[int], min_time: float) -> Table:
    from attnkit.models import load_pretrained

    table = new_table(
        "all-MiniLM-L6-v2 (pretrained) encoding 32 sequences of 8 … L tokens, no gradients",
        ["L"],
        "ms",
    )
    models = {b: load_pretrained("all-MiniLM-L6-v2", backend=b).encoder for b in ("tiled", "sdpa")}
    auto_model = load_pretrained("all-MiniLM-L6-v2", backend="auto").encoder
    torch.manual_seed(0)
    for L in lengths:
        if L > 512:  # the model's positions
            continue
        keep = ragged(32, L, 8).long()
        ids = torch.randint(1000, 20000, (32, L)) * keep
        with torch.no_grad():
            want = auto_model(ids, keep).last_hidden_state
            for model in models.values():  # the same embeddings
                got = model(ids, keep).last_hidden_state
                torch.testing.assert_close(got * keep[..., None], want * keep[..., None])
            row = cells(timed(partial(encode, models, ids, keep), min_time), 1e3, "—")
        table.add_row(str(L), *row)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=[128, 512, 2048])
    ap.add_argument(
        "--tables", nargs="*", default=["encoder", "decoding", "model"], help="which tables"
    )
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds to time each cell")
    args = ap.parse_args()
    console = Console(width=120)  # whole cells in a file too
    tables = {"encoder": encoder_table, "decoding": decoding_table, "model": model_table}
    for name in args.tables:
        console.print(tables[name](args.lengths, args.min_time))


if __name__ == "__main__":
    main()
