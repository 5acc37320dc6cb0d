"""GPU benchmark: attnkit's Triton kernels vs torch SDPA (flash) and FlexAttention, in one run.

    python benchmarks/gpu.py [--out benchmarks/results/gpu.md]     # on a CUDA machine
    TRITON_INTERPRET=1 python benchmarks/gpu.py --smoke             # code paths only, on CPU

TFLOP/s counted on the FLOPs each mask needs (4·B·H·D per attended pair forward, 2.5x that
for the backward pass), bf16, B=1, H=16 (so the GPU is busy at short N too), D = 64 and 128,
N = 1k … 32k, for dense, causal and sliding-window (left 1024) attention.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import attnkit
from attnkit import masks


def cuda_seconds(fn: Callable[[], object], reps: int = 20) -> float:
    """Median seconds per call, timed with CUDA events (wall clock on CPU)."""
    from torch.utils import benchmark as tb

    if not torch.cuda.is_available():
        return float(tb.Timer("fn()", globals={"fn": fn}).timeit(1).median)
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def flex_call(mask: attnkit.Mask | None, N: int, device: str) -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block = None
    if mask is not None:
        block = create_block_mask(mask.bind(N, N).fn, None, None, N, N, device=device)
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=block)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/gpu.md")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, every code path once")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    H = 16 if not args.smoke else 2
    lengths = [1024, 2048, 4096, 8192, 16384, 32768] if not args.smoke else [64]
    dims = [64, 128] if not args.smoke else [32]
    cases = {
        "dense": None,
        "causal": masks.causal(),
        "sliding_window(1024)": masks.sliding_window(1024 if not args.smoke else 16),
    }
    rows = [
        "| case | N | D | pass | triton TFLOP/s | SDPA TFLOP/s | Flex TFLOP/s | "
        "triton / SDPA | triton / Flex |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name, mask in cases.items():
        for D in dims:
            for N in lengths:
                q, k, v = (
                    torch.randn(1, H, N, D, device=device, dtype=dtype, requires_grad=True)
                    for _ in range(3)
                )
                density = 1.0 if mask is None else mask.density(N, N)
                for backward in (False, True):
                    flops = 4 * H * D * density * N * N * (3.5 if backward else 1.0)
                    sdpa_mask = (
                        None
                        if mask is None or name == "causal"
                        else mask.dense(N, N, device=device)
                    )

                    def run(
                        f: Callable[..., torch.Tensor],
                        bwd: bool = backward,
                        qkv: tuple[torch.Tensor, ...] = (q, k, v),
                    ) -> float:
                        def step() -> None:
                            out = f(*qkv)
                            if bwd:
                                out.sum().backward()

                        return cuda_seconds(step, 3 if args.smoke else 20)

                    t_tr = run(
                        lambda q, k, v, m=mask: attnkit.attention(q, k, v, mask=m, backend="triton")
                    )
                    t_sd = run(
                        lambda q, k, v, m=sdpa_mask, c=name == "causal": (
                            F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=c)
                        )
                    )
                    try:
                        t_fx: float | None = run(flex_call(mask, N, device))
                    except Exception:  # FlexAttention may not compile here (e.g. CPU backward)
                        t_fx = None
                    tf = [flops / t / 1e12 for t in (t_tr, t_sd)]
                    fx = "—" if t_fx is None else f"{flops / t_fx / 1e12:.1f}"
                    ratio_fx = "—" if t_fx is None else f"{t_fx / t_tr:.2f}x"
                    rows.append(
                        f"| {name} | {N} | {D} | {'fwd+bwd' if backward else 'fwd'} | "
                        f"{tf[0]:.1f} | {tf[1]:.1f} | {fx} | {t_sd / t_tr:.2f}x | "
                        f"{ratio_fx} |"
                    )
                    print(rows[-1], flush=True)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU (TRITON_INTERPRET smoke run)"
    text = f"# Triton backend benchmark\n\n{gpu}, torch {torch.__version__}, {dtype}\n\n"
    text += "\n".join(rows) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
