"""Benchmarks behind ``attnkit bench`` and ``benchmarks/cpu.py``.

Every figure is a ratio measured in one run: the tiled backend against torch SDPA and
FlexAttention (compiled), and efficiency = FLOPs the mask needs (4·B·H·D per attended pair)
÷ time ÷ this machine's fp32 matmul throughput (torch.mm of 4096², timed in the same run).
Peak memory is measured per point in a fresh subprocess (growth of its peak RSS).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils import benchmark as tb

import attnkit
from attnkit import masks
from attnkit.masks import Mask

B, H, D = 1, 8, 64
WINDOW = 512


def seconds(fn: Callable[[], object], min_run_time: float = 1.0) -> float:
    """Median seconds per call, with all of torch's threads (Timer defaults to one)."""
    timer = tb.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return float(timer.blocked_autorange(min_run_time=min_run_time).median)


def matmul_flops() -> float:
    """fp32 FLOP/s of torch.mm on 4096x4096 matrices."""
    a = torch.randn(4096, 4096)
    return 2 * 4096**3 / seconds(lambda: a @ a)


def _flex(mask: Mask, N: int) -> tuple[Callable[..., Any] | None, str]:
    """Compiled FlexAttention for ``mask``, or None with the reason it cannot run here."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        fn = mask.bind(N, N).fn
        block_mask = create_block_mask(fn, None, None, N, N, device="cpu")
        compiled = torch.compile(flex_attention)
        return lambda q, k, v: compiled(q, k, v, block_mask=block_mask), ""
    except Exception as exc:  # whatever stops it is reported in the table's notes
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"


def _inputs(N: int, dtype: torch.dtype, backward: bool) -> list[torch.Tensor]:
    return [torch.randn(B, H, N, D, dtype=dtype, requires_grad=backward) for _ in range(3)]


def _timed(fwd: Callable[..., torch.Tensor], qkv: list[torch.Tensor], backward: bool) -> float:
    if backward:
        return seconds(lambda: torch.autograd.backward(fwd(*qkv).sum()))
    with torch.no_grad():
        return seconds(lambda: fwd(*qkv))


def compare_case(
    name: str, N: int, mask: Mask | None, dtype: torch.dtype, peak: float, backward: bool = False
) -> dict[str, Any]:
    """Time tiled and SDPA (is_causal, or the mask as a dense bool tensor) on one case."""
    qkv = _inputs(N, dtype, backward)
    density = 1.0 if mask is None else mask.density(N, N)
    flops = 4 * B * H * D * density * N * N * (3.5 if backward else 1.0)  # bwd ≈ 2.5x fwd
    causal = mask is not None and mask.spec == ("causal", "bottom_right")
    dense = None if mask is None or causal else mask.dense(N, N)
    row: dict[str, Any] = {"case": name, "N": N, "dtype": str(dtype).removeprefix("torch.")}
    row["pass"] = "fwd+bwd" if backward else "fwd"
    row["tiled_s"] = _timed(
        lambda q, k, v: attnkit.attention(q, k, v, mask=mask, backend="tiled"), qkv, backward
    )
    row["sdpa_s"] = _timed(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, is_causal=causal),
        qkv,
        backward,
    )
    row["tiled_efficiency"] = flops / row["tiled_s"] / peak
    row["flex_s"], row["note"] = None, ""
    return row


def add_flex(row: dict[str, Any], mask: Mask | None, dtype: torch.dtype, backward: bool) -> None:
    """Time compiled FlexAttention on a row's case.

    Run it after every other timing: torch.compile's worker processes disturb later timings.
    """
    if backward:
        row["note"] = "FlexAttention has no CPU backward"
        return
    if mask is None or mask.spec == ("causal", "bottom_right"):
        return  # the table's targets compare these against SDPA only
    fn, why = _flex(mask, row["N"])
    try:
        row["flex_s"] = None if fn is None else _timed(fn, _inputs(row["N"], dtype, False), False)
        row["note"] = why
    except Exception as exc:  # compile errors surface on the first call
        row["note"] = f"FlexAttention: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}"


def comparison_cases(quick: bool) -> list[tuple[str, int, Mask | None, torch.dtype, bool]]:
    """(name, N, mask, dtype, backward) for the ratio table of the tiled-backend issue."""
    s = 4 if quick else 1
    cases: list[tuple[str, int, Mask | None, torch.dtype, bool]] = []
    for dtype in (torch.float32, torch.bfloat16):
        cases.append(
            (f"sliding_window({WINDOW})", 16384 // s, masks.sliding_window(WINDOW), dtype, False)
        )
        cases.append(("causal", 8192 // s, masks.causal(), dtype, False))
        cases.append(("dense", 4096 // s, None, dtype, False))
    cases.append(
        (f"sliding_window({WINDOW})", 16384 // s, masks.sliding_window(WINDOW), torch.float32, True)
    )
    cases.append(("causal", 8192 // s, masks.causal(), torch.float32, True))
    return cases


_MEMORY_PROBE = textwrap.dedent(
    """
    import sys, torch, attnkit
    from attnkit import _memory, masks
    N, backend, backward = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
    q, k, v = (torch.randn(1, 8, N, 64, requires_grad=backward) for _ in range(3))
    mask = masks.sliding_window(512)
    if backend == "sdpa":
        mask = mask.dense(N, N)
    attnkit.attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], backend=backend)  # warm up
    before = _memory.reset_peak()
    out = attnkit.attention(q, k, v, mask=mask, backend=backend)
    if backward:
        out.sum().backward()
    print((_memory.peak_kb() - before) / 1024)
    """
)


def peak_memory_mb(N: int, backend: str, backward: bool) -> float:
    """Growth of peak RSS (MB) for one sliding-window call at N tokens, in a fresh process."""
    res = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(N), backend, "1" if backward else "0"],
        capture_output=True,
        text=True,
        timeout=1800,
        check=True,
    )
    return float(res.stdout.strip().splitlines()[-1])


def _time_tiled_forward(N: int, mask: Mask) -> float:
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    with torch.no_grad():
        return seconds(lambda: attnkit.attention(q, k, v, mask=mask, backend="tiled"), 0.5)


def scaling_rows(ns: Sequence[int], sdpa_max_n: int = 16384) -> Iterable[dict[str, Any]]:
    """Time and peak memory of sliding-window attention vs N.

    Tiled at every N; SDPA with a dense bool mask up to ``sdpa_max_n``, beyond which its N²
    mask no longer fits comfortably.
    """
    mask = masks.sliding_window(WINDOW)
    for N in ns:
        t = _time_tiled_forward(N, mask)
        row: dict[str, Any] = {"N": N, "tiled_fwd_s": t}
        row["tiled_fwd_mb"] = peak_memory_mb(N, "tiled", False)
        row["tiled_fwdbwd_mb"] = peak_memory_mb(N, "tiled", True)
        row["sdpa_fwd_mb"] = peak_memory_mb(N, "sdpa", False) if sdpa_max_n >= N else None
        row["inputs_mb"] = 3 * B * H * N * D * 4 / 2**20
        yield row


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
    }


def save_plot(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Time and peak memory vs N, log-log, tiled vs SDPA (dense mask)."""
    from attnkit.viz.patterns import _pyplot

    plt = _pyplot()
    ns = [r["N"] for r in rows]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    ax_t.loglog(ns, [r["tiled_fwd_s"] * 1e3 for r in rows], "o-", label="tiled forward")
    ax_t.loglog(ns, [rows[0]["tiled_fwd_s"] * 1e3 * n / ns[0] for n in ns], "k:", label="linear")
    ax_t.set(xlabel="sequence length N", ylabel="ms", title=f"sliding_window({WINDOW}), time")
    for key, label in (
        ("tiled_fwd_mb", "tiled forward"),
        ("tiled_fwdbwd_mb", "tiled fwd+bwd"),
        ("sdpa_fwd_mb", "SDPA forward, dense bool mask"),
        ("inputs_mb", "q, k, v"),
    ):
        pts = [(r["N"], r[key]) for r in rows if r[key] is not None]
        ax_m.loglog(*zip(*pts, strict=True), "o-" if key != "inputs_mb" else "k:", label=label)
    ax_m.set(xlabel="sequence length N", ylabel="peak extra MB", title="memory")
    for ax in (ax_t, ax_m):
        ax.set_xticks(ns, [f"{n // 1024}k" if n >= 1024 else str(n) for n in ns])
        ax.xaxis.set_minor_locator(plt.NullLocator())  # log-axis minor labels would overlap
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"B={B}, H={H}, D={D}, fp32, {torch.get_num_threads()} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def run(
    quick: bool,
    json_path: str | None,
    png_path: str | None,
    scaling: bool,
    flex: bool = True,
    cases: list[tuple[str, int, Mask | None, torch.dtype, bool]] | None = None,
    ns: Sequence[int] | None = None,
) -> int:
    """The ``attnkit bench`` command: ratio table, then the N sweep; returns the exit code.

    ``cases`` and ``ns`` replace the standard ratio cases and sweep lengths (tests use tiny ones).
    """
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    console = Console(width=150)
    cases = comparison_cases(quick) if cases is None else cases
    if ns is None:
        ns = [1024, 2048, 4096, 8192] if quick else [4096, 8192, 16384, 32768, 65536]
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("matmul peak", total=len(cases) + (len(ns) if scaling else 0) + 1)
        peak = matmul_flops()
        progress.advance(task)
        rows = []
        for name, N, mask, dtype, backward in cases:
            label = f"{name} N={N} {dtype} {'fwd+bwd' if backward else 'fwd'}"
            progress.update(task, description=label)
            rows.append(compare_case(name, N, mask, dtype, peak, backward))
            progress.advance(task)
        sweep = []
        if scaling:
            for row in scaling_rows(ns):
                sweep.append(row)
                progress.update(task, description=f"scaling N={row['N']}")
                progress.advance(task)

    if flex:
        console.print("timing FlexAttention (torch.compile first)…")
        for row, (_, _, mask, dtype, backward) in zip(rows, cases, strict=True):
            add_flex(row, mask, dtype, backward)
    info = machine()
    table = Table(
        title=f"attnkit tiled vs torch, {info['processor']} ({info['cpu_capability']}), "
        f"{info['threads']} threads, fp32 matmul {peak / 1e9:.0f} GFLOP/s, "
        f"torch {info['torch']}"
    )
    for col in (
        "case",
        "N",
        "dtype",
        "pass",
        "tiled ms",
        "SDPA ms",
        "SDPA / tiled",
        "Flex ms",
        "Flex / tiled",
        "tiled % of matmul",
    ):
        table.add_column(col, justify="right" if col not in ("case", "dtype", "pass") else "left")
    for r in rows:
        flex = r["flex_s"]
        table.add_row(
            r["case"],
            str(r["N"]),
            r["dtype"],
            r["pass"],
            f"{r['tiled_s'] * 1e3:.0f}",
            f"{r['sdpa_s'] * 1e3:.0f}",
            f"{r['sdpa_s'] / r['tiled_s']:.2f}x",
            "—" if flex is None else f"{flex * 1e3:.0f}",
            "—" if flex is None else f"{flex / r['tiled_s']:.2f}x",
            f"{r['tiled_efficiency']:.0%}",
        )
    console.print(table)
    for r in rows:
        if r["note"]:
            console.print(f"  {r['case']} {r['dtype']} {r['pass']}: {r['note']}")
    if sweep:
        st = Table(title=f"sliding_window({WINDOW}) vs N: time and peak extra memory")
        for col in (
            "N",
            "tiled fwd ms",
            "ms per 1k tokens",
            "tiled fwd MB",
            "tiled fwd+bwd MB",
            "SDPA fwd MB (dense mask)",
            "q,k,v MB",
        ):
            st.add_column(col, justify="right")
        for r in sweep:
            sd = r["sdpa_fwd_mb"]
            st.add_row(
                str(r["N"]),
                f"{r['tiled_fwd_s'] * 1e3:.0f}",
                f"{r['tiled_fwd_s'] * 1e6 / r['N']:.2f}",
                f"{r['tiled_fwd_mb']:.0f}",
                f"{r['tiled_fwdbwd_mb']:.0f}",
                "—" if sd is None else f"{sd:.0f}",
                f"{r['inputs_mb']:.0f}",
            )
        console.print(st)
    if json_path:
        data = {"machine": info, "matmul_flops": peak, "rows": rows, "scaling": sweep}
        Path(json_path).write_text(json.dumps(data, indent=1))
        console.print(f"wrote {json_path}", soft_wrap=True)
    if png_path and sweep:
        save_plot(sweep, png_path)
        console.print(f"wrote {png_path}", soft_wrap=True)
    return 0
