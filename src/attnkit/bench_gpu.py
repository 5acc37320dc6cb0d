"""GPU benchmark behind ``attnkit bench --device cuda`` and ``benchmarks/gpu.py``.

attnkit's Triton kernels against torch SDPA (flash; a dense bool mask where the mask is not
causal) and compiled FlexAttention, in one run: TFLOP/s counted on the FLOPs each mask needs
(4·B·H·D per attended pair forward, 3.5x that forward+backward), bf16, B=1, H=16 (so the GPU
is busy at short N too), D = 64 and 128, N = 1k … 32k, dense, causal, sliding window
(left 1024), block-sparse (128-token cells, a quarter of them plus the diagonal) and 8 packed
documents, causal within each. Causal, the window and the documents are also timed as the
kernels ran them before they computed those masks themselves (``BAND_IN_KERNEL = False``:
tile lists and bitmaps of a BlockMask), the "in-kernel gain". A second table times decoding
(``attnkit.bench_gpu_decode``); ``only`` picks tables.

``ATTNKIT_TRITON_AUTOTUNE=1`` times tile variants in each case's untimed first call (the
title says so). ``smoke=True`` runs every code path once on tiny shapes; on CPU tensors that needs
``TRITON_INTERPRET=1`` and is how the test suite checks this file without a GPU.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F

import attnkit
from attnkit import masks
from attnkit.backends import triton as triton_backend
from attnkit.backends.triton import AUTOTUNE_ENV
from attnkit.functional import _request
from attnkit.masks import Mask

H = 16
#: heads in ``smoke`` runs: they check code paths under the Triton interpreter, which runs
#: every program of the grid in Python, so each head costs seconds
SMOKE_HEADS = 2
WINDOW = 1024
BLOCK = 128
COLUMNS = (
    "case",
    "N",
    "D",
    "pass",
    "triton TFLOP/s",
    "tile lists TFLOP/s",
    "SDPA TFLOP/s",
    "Flex TFLOP/s",
    "in-kernel gain",
    "triton / SDPA",
    "triton / Flex",
)
#: columns of words, not figures (left-aligned)
LEFT = ("case", "pass")


@dataclass(frozen=True)
class GpuCase:
    """One benchmark point: a mask at N tokens and head dim D, forward or forward+backward."""

    name: str
    mask: Mask | None
    N: int
    D: int
    backward: bool
    heads: int = H


def block_sparse_mask(block: int, max_len: int) -> Mask:
    """A fixed random layout of block×block cells: a quarter kept, plus the diagonal (seed 0).

    Shorter sequences use its top-left corner.
    """
    n = -(-max_len // block)
    keep = torch.rand(n, n, generator=torch.Generator().manual_seed(0)) < 0.25
    return masks.block_sparse(keep | torch.eye(n, dtype=torch.bool), block)


def documents_mask(N: int, count: int = 8) -> Mask:
    """``count`` documents packed into N tokens, causal within each (packed training)."""
    return masks.document(torch.arange(N) * count // N) & masks.causal()


def cases(
    quick: bool = False,
    smoke: bool = False,
    dims: Sequence[int] | None = None,
    lengths: Sequence[int] | None = None,
) -> list[GpuCase]:
    """Every (mask, D, N, pass) of the table.

    ``quick`` stops at 8k tokens and D=64; ``dims`` / ``lengths`` pick head dims / token
    counts instead. Ordered by D, then N, then mask: a run cut short (a GPU lent for
    minutes) still has every mask at the sizes it reached.
    """
    window = 16 if smoke else WINDOW
    block = 16 if smoke else BLOCK
    fixed = {
        "dense": None,
        "causal": masks.causal(),
        f"sliding_window({window})": masks.sliding_window(window),
        f"block_sparse({block}, 25 %)": block_sparse_mask(block, 64 if smoke else 32768),
    }

    def kinds(N: int) -> dict[str, Mask | None]:
        return {**fixed, "8 documents & causal": documents_mask(N)}

    if smoke:
        default_lengths, default_dims = [64], [32]
    elif quick:
        default_lengths, default_dims = [1024, 2048, 4096, 8192], [64]
    else:
        default_lengths, default_dims = [1024, 2048, 4096, 8192, 16384, 32768], [128, 64]
    dims = default_dims if dims is None else dims
    lengths = default_lengths if lengths is None else lengths
    return [
        GpuCase(name, mask, N, D, backward, SMOKE_HEADS if smoke else H)
        for D in dims
        for N in lengths
        for name, mask in kinds(N).items()
        for backward in (False, True)
    ]


def seconds(fn: Callable[[], object], smoke: bool) -> float:
    """Median seconds per call (torch's Timer synchronises CUDA around each measurement)."""
    from torch.utils import benchmark as tb

    if smoke:  # one call: the code path, not a figure (Timer.timeit would add two warm-ups)
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    timer = tb.Timer("fn()", globals={"fn": fn})
    fn()  # compile / autotune outside the timing
    # 0.25 s holds tens to thousands of calls at these sizes, enough for a stable median
    return float(timer.blocked_autorange(min_run_time=0.25).median)


@contextmanager
def tile_lists() -> Iterator[None]:
    """The Triton backend walking every mask through a BlockMask's tile lists and bitmaps.

    Causal, window and document masks are otherwise computed in the kernels.
    """
    with mock.patch.object(triton_backend.walks, "BAND_IN_KERNEL", False):
        yield


def flex(mask: Mask | None, Lq: int, Lk: int, device: str) -> Callable[..., torch.Tensor]:
    """Compiled FlexAttention under ``mask``'s block mask; grouped query heads allowed.

    A mask that differs by sequence (padding) gets a block mask per sequence.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block = None
    if mask is not None:
        fn = mask.bind(Lq, Lk).fn
        block = create_block_mask(fn, mask.batch, None, Lq, Lk, device=device)
    compiled = torch.compile(flex_attention)

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return compiled(q, k, v, block_mask=block, enable_gqa=q.shape[1] != k.shape[1])

    return call


def flex_compile_limits(limit: int) -> Any:
    """torch.compile settings for timing FlexAttention: up to ``limit`` recompiles, then fail.

    Each new mask function or shape recompiles flex_attention, and past dynamo's limit (8)
    it silently runs the unfused version that materialises every score (0.3 s against 7 s
    to compile, on CPU), which would have made every later Flex figure meaningless. ``run``
    raises the limit to cover its table, and hitting it fails the row (noted) instead.
    """
    return torch._dynamo.config.patch(
        recompile_limit=limit,
        accumulated_recompile_limit=4 * limit,
        fail_on_recompile_limit_hit=True,
    )


def measure(case: GpuCase, device: str, dtype: torch.dtype, smoke: bool = False) -> dict[str, Any]:
    """One row: seconds and TFLOP/s of triton, SDPA and FlexAttention (None if it fails)."""
    N, D = case.N, case.D
    qkv = [
        torch.randn(1, case.heads, N, D, device=device, dtype=dtype, requires_grad=case.backward)
        for _ in range(3)
    ]
    density = 1.0 if case.mask is None else case.mask.density(N, N)
    flops = 4 * case.heads * D * density * N * N * (3.5 if case.backward else 1.0)
    causal = case.name == "causal"
    dense = None if case.mask is None or causal else case.mask.dense(N, N, device=device)

    def timed(f: Callable[..., torch.Tensor]) -> float:
        def step() -> None:
            out = f(*qkv)
            if case.backward:
                torch.autograd.backward(out.sum())

        if case.backward:
            return seconds(step, smoke)
        with torch.no_grad():
            return seconds(step, smoke)

    row: dict[str, Any] = {"case": case.name, "N": N, "D": D}
    row["pass"] = "fwd+bwd" if case.backward else "fwd"
    row["flops"] = flops

    def triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attnkit.attention(q, k, v, mask=case.mask, backend="triton")

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, is_causal=causal)

    # built inside the try: FlexAttention may fail already while making its block mask
    contenders: dict[str, tuple[Callable[[], Callable[..., torch.Tensor]], Any]] = {
        "triton": (lambda: triton, nullcontext()),
        "tile_lists": (lambda: triton, tile_lists()),
        "sdpa": (lambda: sdpa, nullcontext()),
        "flex": (lambda: flex(case.mask, N, N, device), nullcontext()),
    }
    q, k, v = qkv
    req = _request(q, k, v, case.mask, None, None, 0.0, None, False)
    walks = triton_backend.walks
    if not (walks.kernel_band(req) or walks.kernel_ranges(req) is not None):
        del contenders["tile_lists"]  # the kernels walk a BlockMask either way
    notes = []
    for name, (make, context) in contenders.items():
        row[f"{name}_s"] = None
        try:
            with context:
                row[f"{name}_s"] = timed(make())
        except Exception as exc:  # e.g. FlexAttention cannot compile here: noted, not fatal
            notes.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}")
    row["note"] = "; ".join(notes)
    return row


def cells(row: dict[str, Any]) -> list[str]:
    """The table cells of one measured row, in ``COLUMNS`` order."""

    def tflops(s: float | None) -> str:
        return "—" if s is None else f"{row['flops'] / s / 1e12:.1f}"

    def ratio(other: float | None) -> str:
        ours = row["triton_s"]
        return "—" if other is None or ours is None else f"{other / ours:.2f}x"

    walked = row.get("tile_lists_s")
    return [
        row["case"],
        str(row["N"]),
        str(row["D"]),
        row["pass"],
        tflops(row["triton_s"]),
        tflops(walked),
        tflops(row["sdpa_s"]),
        tflops(row["flex_s"]),
        ratio(walked),
        ratio(row["sdpa_s"]),
        ratio(row["flex_s"]),
    ]


@dataclass(frozen=True)
class BenchTable:
    """One table of the run: its cases, how a case is measured, and how a row is shown."""

    name: str
    heading: str
    columns: Sequence[str]
    cases: Sequence[Any]
    measure: Callable[..., dict[str, Any]]
    cells: Callable[[dict[str, Any]], list[str]]

    def markdown(self, rows: list[dict[str, Any]]) -> str:
        """The rows as a Markdown table under the table's heading."""
        lines = [f"## {self.heading}\n", "| " + " | ".join(self.columns) + " |"]
        lines.append("|" + "|".join("---" if c in LEFT else "---:" for c in self.columns) + "|")
        lines += ["| " + " | ".join(self.cells(r)) + " |" for r in rows]
        return "\n".join(lines) + "\n"


def tables(
    quick: bool = False,
    smoke: bool = False,
    dims: Sequence[int] | None = None,
    lengths: Sequence[int] | None = None,
    only: Sequence[str] = ("attention", "decode"),
) -> list[BenchTable]:
    """The run's tables: ``attention`` (TFLOP/s, above) and ``decode`` (``bench_gpu_decode``)."""
    from attnkit import bench_gpu_decode as decode

    kinds = {
        "attention": BenchTable(
            "attention",
            f"Attention: TFLOP/s, B=1, H={SMOKE_HEADS if smoke else H}",
            COLUMNS,
            cases(quick, smoke, dims, lengths),
            measure,
            cells,
        ),
        "decode": BenchTable(
            "decode",
            "Decoding: one query over a KV cache, µs per call",
            decode.COLUMNS,
            decode.cases(quick, smoke),
            decode.measure,
            decode.cells,
        ),
    }
    unknown = set(only) - set(kinds)
    if unknown:
        raise ValueError(f"only: unknown tables {sorted(unknown)}; choose from {sorted(kinds)}")
    return [kinds[name] for name in only]


def describe(where: str, dtype: torch.dtype) -> str:
    """The run's title: device, torch, dtype, and whether triton's tiles were tuned."""
    dtype_name = str(dtype).removeprefix("torch.")
    title = f"{where}, torch {torch.__version__}, {dtype_name}"
    if os.environ.get(AUTOTUNE_ENV) == "1":
        title += ", triton tiles autotuned"
    return title


def run(
    device: str = "cuda",
    quick: bool = False,
    json_path: str | None = None,
    markdown_path: str | None = None,
    smoke: bool = False,
    dims: Sequence[int] | None = None,
    lengths: Sequence[int] | None = None,
    only: Sequence[str] = ("attention", "decode"),
) -> int:
    """``attnkit bench --device cuda``: the tables above, with a progress bar; the exit code."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    todo = tables(quick, smoke, dims, lengths, only)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the interpreter: fp32
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU, TRITON_INTERPRET=1"
    title = describe(where, dtype)
    console = Console(width=150)
    rows: dict[str, list[dict[str, Any]]] = {t.name: [] for t in todo}

    def save() -> None:  # after every row: a run stopped part way keeps what it measured
        if json_path:
            Path(json_path).write_text(json.dumps({"device": where, **rows}, indent=1))
        if markdown_path:
            Path(markdown_path).parent.mkdir(parents=True, exist_ok=True)
            parts = [f"# Triton backend benchmark\n\n{title}\n"]
            parts += [t.markdown(rows[t.name]) for t in todo if rows[t.name]]
            Path(markdown_path).write_text("\n".join(parts))

    # every case may compile FlexAttention forward and backward
    limits = flex_compile_limits(2 * sum(len(t.cases) for t in todo) + 8)
    with Progress(console=console, transient=True) as progress, limits:
        task = progress.add_task("", total=sum(len(t.cases) for t in todo))
        for table in todo:
            for case in table.cases:
                progress.update(task, description=f"{table.name}: {case}")
                rows[table.name].append(table.measure(case, device, dtype, smoke))
                save()
                row = rows[table.name][-1]
                console.log(" | ".join(table.cells(row)), row["note"])  # logs show progress
                progress.advance(task)
    for table in todo:
        shown = Table(title=f"attnkit triton vs torch, {table.heading}: {title}")
        for col in table.columns:
            shown.add_column(col, justify="left" if col in LEFT else "right")
        for r in rows[table.name]:
            shown.add_row(*table.cells(r))
        console.print(shown)
        for r in rows[table.name]:
            if r["note"]:
                console.print(f"  {' '.join(table.cells(r)[:3])}: {r['note']}")
    for path in (json_path, markdown_path):
        if path:
            console.print(f"wrote {path}", soft_wrap=True)
    return 0
