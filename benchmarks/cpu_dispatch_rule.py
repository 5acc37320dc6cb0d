"""The measurements behind ``backend="auto"`` on CPU: tiled vs SDPA (bool mask) per mask kind.

    python benchmarks/cpu_dispatch_rule.py
    python benchmarks/cpu_dispatch_rule.py --tables unmasked --dtype float16 float64
    python benchmarks/cpu_dispatch_rule.py --tables bf16_training
    python benchmarks/cpu_dispatch_rule.py --tables unmasked masked --masked-dtype bfloat16 \
        [--no-bf16-gemm]
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 MKL_ENABLE_INSTRUCTIONS=AVX512 \
        python benchmarks/cpu_dispatch_rule.py --no-amx --tables unmasked --dtype bfloat16

For N = 64 … 4096 (B=1, H=8, D=64): first no mask and causal (SDPA's fused kernels,
no mask tensor) in float32/bfloat16, forward and forward+backward (bfloat16 training also
over batch, heads and head dims up to N = 1024); then, in float32 forward,
masks from fully dense to sparse, as Mask objects and as a bool tensor; one query over a
KV cache (also with grouped / multi-query heads); a few queries under a padding mask made
anew at every call; and key and value head dims that differ (D != Dv, as MLA's 192 / 128).
Prints what ``attnkit.dispatch`` picks.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import attnkit
from attnkit import masks
from attnkit.backends import cpu_kernel, sdpa
from attnkit.backends._common import MaskLike
from attnkit.bench import seconds
from attnkit.functional import BackendName

LENGTHS = (64, 128, 256, 1024, 4096)


def cases(N: int) -> dict[str, masks.Mask | torch.Tensor]:
    return {
        "key_padding (N-7 keys)": masks.key_padding([N - 7]),
        "sliding_window(3N/4)": masks.sliding_window(3 * N // 4),
        "prefix_lm(N/2)": masks.prefix_lm(N // 2),
        "document(2 docs) & causal": masks.document(torch.arange(N) * 2 // N) & masks.causal(),
        "bool tensor, key_padding (N-7 keys)": masks.key_padding([N - 7]).dense(N, N)[0, 0],
        "bool tensor, random 90 %": torch.rand(N, N) < 0.9,
        "bool tensor, sliding_window(N/8)": masks.sliding_window(N // 8).dense(N, N)[0, 0],
    }


def time_pass(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskLike, backend: BackendName
) -> float:
    """Seconds for forward+backward (inputs that require grad) or forward."""
    if not q.requires_grad:
        return time_forward(q, k, v, mask, backend)
    return seconds(
        lambda: torch.autograd.backward(
            attnkit.attention(q, k, v, mask=mask, backend=backend).sum()
        )
    )


def compared(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: MaskLike,
    timer: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, MaskLike, BackendName], float],
    unit: float = 1e3,
    digits: int = 2,
) -> list[str]:
    """The cells every table ends with: tiled and SDPA times (seconds × ``unit``: ms by
    default), SDPA / tiled, and what ``auto`` picks."""
    t_tiled, t_sdpa = (timer(q, k, v, mask, b) for b in ("tiled", "sdpa"))
    return [
        f"{t_tiled * unit:.{digits}f}",
        f"{t_sdpa * unit:.{digits}f}",
        f"{t_sdpa / t_tiled:.2f}x",
        attnkit.dispatch(q, k, v, mask=mask).backend,
    ]


def unmasked_table(dtypes: list[torch.dtype]) -> Table:
    """No mask and causal: where SDPA runs its fused kernels without a mask tensor."""
    table = Table(title="no mask / causal: tiled vs SDPA's fused kernels, ms (B=1, H=8, D=64)")
    for col in ("N", "mask", "dtype", "pass", "tiled", "SDPA", "SDPA / tiled", "auto picks"):
        table.add_column(col, justify="left" if col in ("mask", "dtype", "pass") else "right")
    for N in LENGTHS:
        for dtype in dtypes:
            for backward in (False, True):
                q, k, v = (
                    torch.randn(1, 8, N, 64, dtype=dtype, requires_grad=backward) for _ in range(3)
                )
                for name, mask in (("none", None), ("causal", masks.causal())):
                    table.add_row(
                        str(N),
                        name,
                        str(dtype).removeprefix("torch."),
                        "fwd+bwd" if backward else "fwd",
                        *compared(q, k, v, mask, time_pass),
                    )
    return table


def bf16_training_table() -> Table:
    """bfloat16 forward+backward, no mask and causal, over batch, heads and head dims: where
    SDPA's fused kernels overtake tiled on a CPU with AMX as sequences grow."""
    table = Table(title="bfloat16 forward+backward: tiled vs SDPA's fused kernels, ms")
    for col in ("B", "H", "D", "N", "mask", "tiled", "SDPA", "SDPA / tiled", "auto picks"):
        table.add_column(col, justify="left" if col == "mask" else "right")
    for B, H, D in ((1, 8, 64), (4, 8, 64), (1, 32, 64), (1, 8, 128)):
        for N in (128, 256, 384, 512, 768, 1024):
            q, k, v = (
                torch.randn(B, H, N, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
            )
            for name, mask in (("none", None), ("causal", masks.causal())):
                cells = compared(q, k, v, mask, time_pass)
                table.add_row(str(B), str(H), str(D), str(N), name, *cells)
    return table


def decoding_table() -> Table:
    """One query over a KV cache (Lq = 1): bottom-right masks are general masks here."""
    table = Table(title="decoding, Lq = 1 over Lk cached keys, forward µs (B=1, H=8, D=64, fp32)")
    for col in ("Lk", "mask", "kv heads", "tiled", "SDPA", "SDPA / tiled", "auto picks"):
        table.add_column(col, justify="left" if col == "mask" else "right")
    for Lk in (64, 1024, 4096):
        q = torch.randn(1, 8, 1, 64)
        for name, mask, Hkv in (
            ("none", None, 8),
            ("causal", masks.causal(), 8),
            ("sliding_window(256)", masks.sliding_window(256), 8),
            ("causal", masks.causal(), 2),  # GQA: 4 query heads per kv head
            ("causal", masks.causal(), 1),  # MQA
        ):
            k, v = (torch.randn(1, Hkv, Lk, 64) for _ in range(2))
            cells = compared(q, k, v, mask, time_forward, 1e6, 0)
            table.add_row(str(Lk), name, str(Hkv), *cells)
    return table


def fold_cells(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> tuple[str, str, str]:
    """µs of SDPA's enable_gqa and of attnkit's sdpa backend, and their ratio."""
    sdpa_gqa = partial(F.scaled_dot_product_attention, attn_mask=mask, enable_gqa=True)
    with torch.no_grad():
        plain = seconds(partial(sdpa_gqa, q, k, v))
        ours = seconds(partial(attnkit.attention, q, k, v, mask=mask, backend="sdpa"))
    return f"{plain * 1e6:.0f}", f"{ours * 1e6:.0f}", f"{plain / ours:.2f}x"


def gqa_fold_table() -> Table:
    """attnkit's SDPA backend folds one query of grouped heads into rows (``sdpa._sdpa``):
    against torch SDPA's own enable_gqa on the same tensors, without a mask and under a
    ragged batch's padding mask; where it does not fold, the difference is attnkit's cost per
    call."""
    table = Table(
        title="grouped heads, forward µs: SDPA enable_gqa vs attnkit's sdpa backend (B=1 "
        "without a mask, B=4 under padding; 8 query heads, fp32)"
    )
    columns = ("mask", "Lk", "Lq", "kv heads", "D", "folded", "enable_gqa", "attnkit sdpa", "x")
    for col in columns:
        table.add_column(col, justify="left" if col == "mask" else "right")
    for name in ("none", "padding"):
        B = 1 if name == "none" else 4
        for Lk in (1024, 4096):
            padding = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
            padding[1:, ..., : Lk // 4] = False  # left padding of rows 1.. (B = 4)
            for Lq in (1, 4, 64) if name == "none" else (1,):
                for Hkv in (1, 2, 4):
                    for D in (64, 128):
                        q = torch.randn(B, 8, Lq, D)
                        k, v = (torch.randn(B, Hkv, Lk, D) for _ in range(2))
                        cells = fold_cells(q, k, v, None if name == "none" else padding)
                        folded = "yes" if Lq == 1 and 8 // Hkv >= sdpa.FOLD_MIN_GROUP else "no"
                        sizes = (str(Lk), str(Lq), str(Hkv), str(D))
                        table.add_row(name, *sizes, folded, *cells)
    return table


def head_dims_table() -> Table:
    """Keys and values of different widths (D != Dv): SDPA's fused CPU kernel needs D == Dv."""
    table = Table(title="D != Dv: tiled vs SDPA, ms (B=1, H=8, fp32)")
    for col in ("N", "D / Dv", "mask", "pass", "tiled", "SDPA", "SDPA / tiled", "auto picks"):
        table.add_column(col, justify="left" if col in ("mask", "pass") else "right")
    for D, Dv in ((192, 128), (64, 32)):
        for N in (128, 512, 2048):
            for backward in (False, True):
                q, k = (torch.randn(1, 8, N, D, requires_grad=backward) for _ in range(2))
                v = torch.randn(1, 8, N, Dv, requires_grad=backward)
                for name, mask in (("none", None), ("causal", masks.causal())):
                    pass_name = "fwd+bwd" if backward else "fwd"
                    cells = compared(q, k, v, mask, time_pass)
                    table.add_row(str(N), f"{D} / {Dv}", name, pass_name, *cells)
    return table


def few_queries_table() -> Table:
    """A few queries under a mask held in tensors, made anew for every call, as a model makes
    a ragged batch's padding mask at each decoding step: no spec to share a tile map by."""
    table = Table(
        title="Lq queries under causal & padding (a new mask each call), forward µs "
        "(B=4 rows of a ragged batch, H=8, D=64, fp32)"
    )
    for col in ("Lk", "Lq", "mask", "tiled", "SDPA", "SDPA / tiled", "auto picks"):
        table.add_column(col, justify="right")
    torch.manual_seed(0)
    for Lk in (512, 2048):
        valid = torch.ones(4, Lk, dtype=torch.bool)
        valid[1, :100], valid[2, : Lk // 2] = False, False  # left padding of rows 1 and 2
        mask = masks.causal() & masks.from_padding_mask(valid)
        for Lq in (1, 4, 16, 64, 256):
            q = torch.randn(4, 8, Lq, 64)
            k, v = (torch.randn(4, 8, Lk, 64) for _ in range(2))
            # as a Mask, and as the (B, 1, Lq, Lk) bool tensor transformers would pass
            for kind, m in (("Mask", mask), ("bool tensor", mask.dense(Lq, Lk, B=4))):
                cells = compared(q, k, v, m, time_fresh, 1e6, 0)
                table.add_row(str(Lk), str(Lq), kind, *cells)
    return table


def time_fresh(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskLike, backend: BackendName
) -> float:
    """Forward seconds with an equal but new mask at every call (its tile maps not built): a
    Mask rebuilt from its spec, or a copy of a bool tensor (the copy timed for both)."""
    if isinstance(mask, torch.Tensor):
        with torch.no_grad():
            return seconds(lambda: attnkit.attention(q, k, v, mask=mask.clone(), backend=backend))
    assert isinstance(mask, masks.Mask)
    assert mask.spec is not None
    spec = mask.spec
    with torch.no_grad():
        return seconds(
            lambda: attnkit.attention(q, k, v, mask=masks.from_spec(spec), backend=backend)
        )


def time_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskLike, backend: BackendName
) -> float:
    with torch.no_grad():
        return seconds(lambda: attnkit.attention(q, k, v, mask=mask, backend=backend))


def masked_table(dtype: torch.dtype = torch.float32) -> Table:
    """Masks from dense to sparse, as Mask objects and as bool tensors, forward."""
    title = f"tiled vs SDPA with a bool mask, forward ms (B=1, H=8, D=64, {dtype})"
    table = Table(title=title)
    for col in ("N", "mask", "density", "tiled", "SDPA", "SDPA / tiled", "auto picks"):
        table.add_column(col, justify="left" if col == "mask" else "right")
    torch.manual_seed(0)
    for N in LENGTHS:
        q, k, v = (torch.randn(1, 8, N, 64, dtype=dtype) for _ in range(3))
        for name, mask in cases(N).items():
            if isinstance(mask, torch.Tensor):
                density = float(mask.float().mean())
            else:
                density = mask.density(N, N)
            table.add_row(str(N), name, f"{density:.2f}", *compared(q, k, v, mask, time_forward))
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", nargs="*", default=["float32", "bfloat16"], help="unmasked table")
    ap.add_argument("--masked-dtype", default="float32", help="masked table")
    ap.add_argument(
        "--no-bf16-gemm",
        action="store_true",
        help="widen bfloat16 tiles to float32 (cpu_kernel.BF16_GEMM = False)",
    )
    ap.add_argument(
        "--no-amx",
        action="store_true",
        help="as on an AVX-512 CPU without AMX (Zen 4, Cooper Lake): attnkit's AMX rules and "
        "bf16 GEMM off; run with ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 and "
        "MKL_ENABLE_INSTRUCTIONS=AVX512 set, so torch's kernels leave the tile units too",
    )
    ap.add_argument(
        "--tables",
        nargs="*",
        default=[
            "unmasked",
            "bf16_training",
            "decoding",
            "few_queries",
            "masked",
            "head_dims",
            "gqa_fold",
        ],
        help="which to run",
    )
    args = ap.parse_args()
    console = Console(width=140)
    cpu_kernel.BF16_GEMM = cpu_kernel.BF16_GEMM and not args.no_bf16_gemm
    if args.no_amx:
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
        if "AMX" in isa.upper() or not isa or "MKL_ENABLE_INSTRUCTIONS" not in os.environ:
            ap.error("--no-amx needs ONEDNN_MAX_CPU_ISA (without AMX) and MKL_ENABLE_INSTRUCTIONS")
        cpu_kernel.HAS_AMX = cpu_kernel.BF16_GEMM = False
        console.print(f"as without AMX: ONEDNN_MAX_CPU_ISA={isa}")
    console.print(f"cpu_kernel.BF16_GEMM = {cpu_kernel.BF16_GEMM}")
    if "unmasked" in args.tables:
        console.print(unmasked_table([getattr(torch, d) for d in args.dtype]))
    if "bf16_training" in args.tables:
        console.print(bf16_training_table())
    if "decoding" in args.tables:
        console.print(decoding_table())
    if "few_queries" in args.tables:
        console.print(few_queries_table())
    if "masked" in args.tables:
        console.print(masked_table(getattr(torch, args.masked_dtype)))
    if "head_dims" in args.tables:
        console.print(head_dims_table())
    if "gqa_fold" in args.tables:
        console.print(gqa_fold_table())


if __name__ == "__main__":
    main()
