"""Compile the triton kernels for a GPU architecture on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) checks the kernels' math but never lowers them: it cannot
tell whether a kernel compiles for sm_90, how many registers it needs, whether it spills, or
whether its pipelined tiles fit the GPU's shared memory (a launch beyond that fails with "out of
resource: shared memory"). This module builds the launches exactly as the launcher would
(``forward_calls`` / ``backward_calls`` with the tiles ``choose_launches`` picks for that arch),
specialises the arguments the way a real launch does (16-byte alignment, ints equal to 1), and
compiles them through Triton's NVIDIA backend down to a cubin with the bundled ptxas. Registers
and stack come from ``cuobjdump -res-usage`` on that cubin; shared memory from Triton's metadata.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from attnkit.backends.triton.calls import KernelCall, Scalars, backward_calls, forward_calls
from attnkit.backends.triton.launches import (
    Launch,
    Launches,
    band_launches,
    choose_launches,
    decoding_launch,
)
from attnkit.backends.triton.walks import TileWalk

# Largest dynamic shared memory one block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
ARCH_NAMES = {
    80: "A100 (sm_80)",
    86: "RTX 30xx/A10 (sm_86)",
    89: "L4/RTX 40xx (sm_89)",
    90: "H100 (sm_90)",
    100: "B200 (sm_100)",
    120: "RTX 50xx (sm_120)",
}


@dataclass(frozen=True)
class KernelResources:
    """What one compiled kernel needs per block of ``launch.num_warps`` warps."""

    kernel: str
    arch: int
    dtype: torch.dtype
    head_dim: int
    launch: Launch
    registers: int  # per thread; 255 is the hardware maximum
    stack_bytes: int  # per thread; these kernels keep no local arrays, so this is register spills
    shared_bytes: int
    matmul: str  # what its tl.dots became in PTX: "tcgen05", "wgmma", "mma" (joined by "+"), "fma"

    @property
    def fits(self) -> bool:
        """Whether a launch stays within the arch's shared memory."""
        return self.shared_bytes <= SHARED_MEMORY_LIMIT[self.arch]

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (dtype as its name), as ``python -m ...aot`` prints them."""
        return {**asdict(self), "dtype": str(self.dtype).removeprefix("torch.")}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KernelResources:
        """The inverse of ``to_json``."""
        return cls(**{**d, "dtype": getattr(torch, d["dtype"]), "launch": Launch(**d["launch"])})


def compile_call(call: KernelCall, arch: int) -> KernelResources:
    """Compile one launch for ``arch`` (e.g. 90) and read back its resources.

    The specialisation mirrors ``triton.runtime.jit``'s binder: tensors and ints get the
    divisibility-by-16 hint when it holds, ints equal to 1 become constants, floats and bools
    are not specialised.
    """
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction

    fn = call.kernel
    if not isinstance(fn, JITFunction):
        # triton.language's own jit helpers were made interpreted functions at import, and
        # calling one patches triton.language for good: this process cannot compile.
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set when triton was imported; compile in a process without "
            "it: python -m attnkit.backends.triton.aot --arch 90 ... (see --help)"
        )
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    names = list(inspect.signature(fn.fn).parameters)
    values = {**dict(zip(names, call.args, strict=False)), **call.meta}
    constexprs: dict[str, Any] = {}
    signature: dict[str, str] = {}  # in parameter order
    attrs = {}
    for i, name in enumerate(names):
        arg = values[name]
        if fn.params[i].is_constexpr:
            ty, attr = "constexpr", arg
        else:
            specialize = not isinstance(arg, float | bool)
            ty, attr = native_specialize_impl(type(backend), arg, False, specialize, True)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = attr
        elif isinstance(attr, str) and attr:
            attrs[(i,)] = backend.parse_attr(attr)
    options = {"num_warps": call.meta["num_warps"], "num_stages": call.meta["num_stages"]}
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs, attrs), target=target, options=options
    )
    registers, stack = _resource_usage(compiled.asm["cubin"])
    q = call.args[0]
    return KernelResources(
        kernel=fn.fn.__name__,
        arch=arch,
        dtype=q.dtype,
        head_dim=q.shape[-1],
        launch=Launch(
            constexprs["BLOCK_M"],
            constexprs["BLOCK_N"],
            options["num_warps"],
            options["num_stages"],
        ),
        registers=registers,
        stack_bytes=stack,
        shared_bytes=compiled.metadata.shared,
        matmul=_matmul_instruction(compiled.asm["ptx"]),
    )


def _matmul_instruction(ptx: str) -> str:
    """Which instructions the dots use: tcgen05, wgmma, mma.sync, or plain FMAs.

    tcgen05 is sm_100's tensor-core instruction, wgmma sm_90's (it needs 64 result rows per
    warpgroup), mma.sync the one from sm_80 on.
    """
    found = [name for name in ("tcgen05.mma", "wgmma.mma_async", "mma.sync") if name in ptx]
    return "+".join(n.split(".")[0] for n in found) or "fma"


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) per thread, as cuobjdump reports them for the cubin."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "-res-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", report)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{report}")
    return int(found[1]), int(found[2])


def launcher_resources(
    arch: int,
    dtype: torch.dtype,
    head_dim: int,
    alibi: bool = False,
    softcap: float = 0.0,
    seq_len: int = 4096,
    launch: Launch | None = None,
    gqa_group: int = 1,
    kv_splits: int = 1,
    wide_offsets: bool = False,
    pack_gqa: bool = False,
    band: bool = False,
    ranges: bool = False,
) -> list[KernelResources]:
    """Compile forward, dK/dV and dQ as the launcher would run them on ``arch``.

    Shapes: B=1, Hkv=2, Hq=2·gqa_group, Lq=Lk=seq_len, D=Dv=head_dim (only alignment, the
    tiles and which ints are 1 matter to the compiler). ``launch`` overrides
    ``choose_launches`` for all three kernels, to try other tiles. ``kv_splits`` > 1 compiles
    only the forward an inference call splits over that many programs per row (FlashDecoding;
    its float32 partial outputs), the backward kernels being the same either way.
    ``wide_offsets`` compiles the 64-bit-offset variants that tensors past 2^31 elements take.
    ``pack_gqa`` compiles only a decoding step's forward (one query per head over ``seq_len``
    keys), a kv head's ``gqa_group`` query heads packed in one ``decoding_launch`` tile.
    ``band`` compiles the kernels that compute a causal or sliding-window mask themselves (a
    window of 1024 keys back, ``kernel_band``) instead of walking tile lists and bitmaps;
    ``ranges`` those that walk tile lists but mask partial tiles from key ranges
    (``kernel_ranges``: documents, padding).
    """
    launches = (
        Launches(launch, launch, launch) if launch else choose_launches(head_dim, dtype, arch)
    )
    if (band or ranges) and launch is None:
        launches = band_launches(launches)
    hq, lq = 2 * gqa_group, 1 if pack_gqa else seq_len
    q, out, dout, dq = (torch.zeros(1, hq, lq, head_dim, dtype=dtype) for _ in range(4))
    k, v, dk, dv = (torch.zeros(1, 2, seq_len, head_dim, dtype=dtype) for _ in range(4))
    lse, delta = torch.zeros(1, hq, lq), torch.zeros(1, hq, lq)
    slopes = torch.zeros(hq)
    sc = Scalars(head_dim**-0.5, softcap, seq_len - lq, alibi, (-1024, 0) if band else ())

    def walk(tiles: Launch) -> TileWalk:
        n_q, n_k = -(-lq // tiles.block_m), -(-seq_len // tiles.block_n)
        ints = torch.zeros(1, 1, n_q, n_k, dtype=torch.int32)
        if ranges:
            key_ranges = torch.zeros(1, 2, lq, dtype=torch.int32)
            kept = torch.zeros(1, seq_len, dtype=torch.int8)
        else:
            key_ranges, kept = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int8)
        return TileWalk(ints, ints, ints, torch.zeros(16, dtype=torch.int8), key_ranges, kept)

    fwd, dkdv, dq_ = launches.forward, launches.dkdv, launches.dq
    packed = decoding_launch(fwd, gqa_group, lq) if pack_gqa else None
    if pack_gqa and packed is None:
        raise ValueError(f"one query of {gqa_group} heads fills no decoding tile of {fwd}")
    if kv_splits > 1 or packed:  # the forward only: inference
        parts = out[None] if kv_splits == 1 else torch.zeros(kv_splits, 1, hq, lq, head_dim)
        part_lse = torch.zeros(kv_splits, 1, hq, lq)
        tiles = packed or fwd
        calls = forward_calls(q, k, v, parts, part_lse, walk(tiles), slopes, sc, tiles, pack_gqa)
    else:
        calls = forward_calls(q, k, v, out[None], lse[None], walk(fwd), slopes, sc, fwd)
        calls += backward_calls(
            q, k, v, dout, lse, delta, dq, dk, dv, walk(dkdv), walk(dq_), slopes, sc, dkdv, dq_
        )
    if wide_offsets:  # as if a tensor reached 2^31 elements
        calls = [replace(c, meta={**c.meta, "WIDE_OFFSETS": True}) for c in calls]
    return [compile_call(call, arch) for call in calls]


def main(argv: list[str] | None = None) -> None:
    """Print the launcher's kernels compiled for one arch / dtype / head dim, as JSON lines."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--arch", type=int, required=True, help="80, 86, 89, 90, ...")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--head-dim", type=int, required=True)
    ap.add_argument("--gqa-group", type=int, default=1)
    ap.add_argument("--alibi", action="store_true")
    ap.add_argument("--softcap", type=float, default=0.0)
    ap.add_argument("--launch", help="block_m,block_n,num_warps,num_stages")
    ap.add_argument("--kv-splits", type=int, default=1, help="> 1: the split forward only")
    ap.add_argument("--wide-offsets", action="store_true", help="the 64-bit-offset variants")
    ap.add_argument(
        "--pack-gqa", action="store_true", help="a decoding step's forward, heads packed"
    )
    ap.add_argument("--band", action="store_true", help="a causal window computed in-kernel")
    ap.add_argument("--ranges", action="store_true", help="partial tiles masked from key ranges")
    args = ap.parse_args(argv)
    launch = Launch(*map(int, args.launch.split(","))) if args.launch else None
    for r in launcher_resources(
        args.arch,
        getattr(torch, args.dtype),
        args.head_dim,
        alibi=args.alibi,
        softcap=args.softcap,
        launch=launch,
        gqa_group=args.gqa_group,
        kv_splits=args.kv_splits,
        wide_offsets=args.wide_offsets,
        pack_gqa=args.pack_gqa,
        band=args.band,
        ranges=args.ranges,
    ):
        print(json.dumps(r.to_json()))


if __name__ == "__main__":
    main()
