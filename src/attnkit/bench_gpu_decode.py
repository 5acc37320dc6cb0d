"""The decoding table of the GPU benchmark: one query over a KV cache, microseconds per call.

Decoding reads the whole cache for a single query, so it is bound by memory bandwidth, not
by matrix products: the table reports microseconds per call and the bandwidth that reading
the attended keys and values once represents (GB/s; an H200's HBM peaks at 4.8 TB/s).
Llama-3-8B's attention shapes (32 query heads over 8 kv heads, D = 128), bf16, batch 1
and 8, caches of 1k … 32k tokens, attending the whole cache and a ``sliding_window(4096)``;
at batch 8 also a padded batch, sequence b keeping the first (b + 1)/8 of the cache
(``key_padding``, as batched generation pads prompts of different lengths).

Contenders in one run: attnkit's Triton backend as ``auto`` runs it on CUDA (the 4 query
heads of a kv head packed in one 16-row tile, PackGQA; each (batch, kv head)'s kv tiles
shared by several programs, split-KV / FlashDecoding), the same kernel unsplit
(``MAX_KV_SPLITS = 1``: one program per (batch, kv head), which is what splitting buys) and
unpacked (``PACK_GQA = False``: one program per (batch, query head) over a forward tile, which
is what packing buys), torch SDPA (``enable_gqa``; a bool mask for the window) and compiled
FlexAttention (its decoding kernel; a block mask for the window). Every mask is built outside
the timed calls, as at a fixed cache length; "growing" is attnkit's Triton call over caches of
128 lengths in turn (L, L-1, … L-127), as a decoding loop whose cache grows by one key per
step makes it. No mask here needs a tile map (the whole cache keeps every key; the kernels
compute the window themselves, ``kernel_band``, and read the padded batch's kept keys,
``kernel_ranges``), so "growing" shows what a new length still costs the host; a mask with a
tile map would build one at every length (attnkit keeps 64 shared by the built-in masks, fewer
than these 128).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F

import attnkit
from attnkit import masks
from attnkit.backends import triton as triton_backend
from attnkit.bench_gpu import flex, seconds
from attnkit.masks import Mask

#: Llama-3-8B: 32 query heads share 8 kv heads of 128
HQ, HKV, D = 32, 8, 128
#: smoke runs under the interpreter, which pretends to have 4 SMs: 2 programs split
SMOKE_HQ, SMOKE_HKV, SMOKE_D = 2, 1, 32
WINDOW = 4096
COLUMNS = (
    "case",
    "B",
    "cache",
    "triton µs",
    "unsplit µs",
    "unpacked µs",
    "growing µs",
    "SDPA µs",
    "Flex µs",
    "triton GB/s",
    "split gain",
    "pack gain",
    "triton / SDPA",
    "triton / Flex",
)
CONTENDERS = ("triton", "unsplit", "unpacked", "growing", "sdpa", "flex")
#: cache lengths the "growing" contender cycles through: more than masks keep tile maps for
GROWING_LENGTHS = 128


@dataclass(frozen=True)
class DecodeCase:
    """One query per sequence over a cache of ``L`` keys, under ``mask`` (None: every key)."""

    name: str
    mask: Mask | None
    B: int
    L: int
    Hq: int = HQ
    Hkv: int = HKV
    D: int = D


def cases(quick: bool = False, smoke: bool = False) -> list[DecodeCase]:
    """Every (mask, batch, cache length) of the table, by batch, then length, then mask."""
    if smoke:
        window = 16
        kinds = {"whole cache": None, f"sliding_window({window})": masks.sliding_window(window)}
        smoke_cases = [
            DecodeCase(n, m, 1, 64, SMOKE_HQ, SMOKE_HKV, SMOKE_D) for n, m in kinds.items()
        ]
        padded = DecodeCase(PADDED, padded_batch(2, 64), 2, 64, SMOKE_HQ, SMOKE_HKV, SMOKE_D)
        return [*smoke_cases, padded]
    kinds = {"whole cache": None, f"sliding_window({WINDOW})": masks.sliding_window(WINDOW)}
    lengths = [1024, 4096, 16384] if quick else [1024, 4096, 16384, 32768]
    return [
        DecodeCase(name, mask, B, L)
        for B in (1, 8)
        for L in lengths
        for name, mask in [*kinds.items(), *([(PADDED, padded_batch(B, L))] if B > 1 else [])]
    ]


PADDED = "padded batch"


def padded_batch(B: int, L: int) -> Mask:
    """Sequence b keeps the first (b + 1)/B of a cache of L keys."""
    return masks.key_padding([L * (b + 1) // B for b in range(B)])


def growing_lengths(L: int) -> Iterator[int]:
    """L, L-1, … L-127 (down to 1), and again: the "growing" contender's cache lengths."""
    return itertools.cycle(range(L, max(0, L - GROWING_LENGTHS), -1))


@contextmanager
def unsplit() -> Iterator[None]:
    """The Triton backend without split-KV: one program per (batch, kv head)."""
    with mock.patch.object(triton_backend.launches, "MAX_KV_SPLITS", 1):
        yield


@contextmanager
def unpacked() -> Iterator[None]:
    """The Triton backend without PackGQA: one program per (batch, query head)."""
    with mock.patch.object(triton_backend.launches, "PACK_GQA", False):
        yield


def measure(
    case: DecodeCase, device: str, dtype: torch.dtype, smoke: bool = False
) -> dict[str, Any]:
    """One row: seconds per call of every contender (None if it fails) and the bytes read."""
    B, L = case.B, case.L
    q = torch.randn(B, case.Hq, 1, case.D, device=device, dtype=dtype)
    k, v = (torch.randn(B, case.Hkv, L, case.D, device=device, dtype=dtype) for _ in range(2))
    allowed = None if case.mask is None else case.mask.dense(1, L, device=device)
    # keys attended over the batch (a padded batch's sequences keep different numbers)
    attended = B * L if allowed is None else int(allowed.expand(B, -1, -1, -1).sum())
    row: dict[str, Any] = {"case": case.name, "B": B, "L": L}
    row["bytes"] = 2 * case.Hkv * attended * case.D * k.element_size()  # keys and values

    def triton() -> torch.Tensor:
        return attnkit.attention(q, k, v, mask=case.mask, backend="triton")

    lengths = growing_lengths(L)

    def growing() -> torch.Tensor:
        n = next(lengths)
        return attnkit.attention(q, k[:, :, :n], v[:, :, :n], mask=case.mask, backend="triton")

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)

    def make_flex() -> Callable[[], torch.Tensor]:
        compiled = flex(case.mask, 1, L, device)
        return lambda: compiled(q, k, v)

    # the makers run inside the try: FlexAttention may fail already while compiling
    contenders: dict[str, tuple[Callable[[], Callable[[], object]], Any]] = {
        "triton": (lambda: triton, nullcontext()),
        "unsplit": (lambda: triton, unsplit()),
        "unpacked": (lambda: triton, unpacked()),
        "growing": (lambda: growing, nullcontext()),
        "sdpa": (lambda: sdpa, nullcontext()),
        "flex": (make_flex, nullcontext()),
    }
    notes = []
    for name, (make, context) in contenders.items():
        row[f"{name}_s"] = None
        try:
            with torch.no_grad(), context:
                row[f"{name}_s"] = seconds(make(), smoke)
        except Exception as exc:  # e.g. FlexAttention cannot compile here: noted, not fatal
            notes.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}")
    row["note"] = "; ".join(notes)
    return row


def cells(row: dict[str, Any]) -> list[str]:
    """The table cells of one measured row, in ``COLUMNS`` order."""
    ours = row["triton_s"]

    def micros(s: float | None) -> str:
        return "—" if s is None else f"{s * 1e6:.1f}"

    def ratio(other: float | None) -> str:
        return "—" if other is None or ours is None else f"{other / ours:.2f}x"

    bandwidth = "—" if ours is None else f"{row['bytes'] / ours / 1e9:.0f}"
    return [
        row["case"],
        str(row["B"]),
        str(row["L"]),
        *(micros(row[f"{name}_s"]) for name in CONTENDERS),
        bandwidth,
        ratio(row["unsplit_s"]),
        ratio(row["unpacked_s"]),
        ratio(row["sdpa_s"]),
        ratio(row["flex_s"]),
    ]
