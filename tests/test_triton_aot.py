"""The triton kernels compile for real GPUs, on a machine without one.

The interpreter tests (test_triton.py) check the kernels' math; these lower the launches the
launcher would make on sm_80 / 86 / 90 / 100 / 120 through Triton's NVIDIA backend and ptxas
(``attnkit.backends.triton.aot``) and check what only the compiler knows: that they compile
at all (fp32 once did not on sm_80), that the pipelined tiles fit the arch's shared memory,
that the 16-bit kernels do not spill registers to local memory, and that their dots become
the arch's newest tensor-core instruction (wgmma on sm_90, tcgen05 on sm_100).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'attnkit[triton]')")

from attnkit.backends.triton.aot import SHARED_MEMORY_LIMIT, KernelResources

pytestmark = pytest.mark.slow

#: Spilled bytes per thread the 16-bit kernels may have (ptxas stack frame); measured with
#: ``python benchmarks/triton_resources.py``, the launcher's choices spill at most this much.
SPILL_BUDGET_16BIT = 16
#: The tensor-core instruction each arch's 16-bit dots should become (older ones run slower).
NEWEST_MATMUL = {90: "wgmma", 100: "tcgen05"}


def compiled(arch: int, dtype: torch.dtype, head_dim: int, *options: str) -> list[KernelResources]:
    """The launcher's three kernels compiled for ``arch``, in a fresh process: this one may
    have imported triton under TRITON_INTERPRET=1 (test_triton.py), which cannot compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    dt = str(dtype).removeprefix("torch.")
    cmd = [sys.executable, "-m", "attnkit.backends.triton.aot", "--arch", str(arch)]
    cmd += ["--dtype", dt, "--head-dim", str(head_dim), *options]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return [KernelResources.from_json(json.loads(line)) for line in out.splitlines()]


def check(arch: int, dtype: torch.dtype, head_dim: int, *options: str) -> list[KernelResources]:
    """The compiled kernels, each checked to fit, not spill (16-bit) and use the newest dots."""
    results = compiled(arch, dtype, head_dim, *options)
    for r in results:
        where = f"{r.kernel} sm_{arch} {dtype} D={head_dim} {r.launch}"
        assert r.fits, f"{where}: {r.shared_bytes} B shared > {SHARED_MEMORY_LIMIT[arch]}"
        if dtype != torch.float32:  # fp32 runs exact FMA dots, which spill (see the launcher)
            assert r.stack_bytes <= SPILL_BUDGET_16BIT, f"{where}: spills {r.stack_bytes} B"
            older_allowed = arch == 90 and head_dim > 128 and "dkdv" in r.kernel
            # a decoding tile of 16 rows is below wgmma's 64 per warpgroup (and tcgen05's)
            older_allowed |= "--pack-gqa" in options
            if arch in NEWEST_MATMUL and not older_allowed:
                assert r.matmul == NEWEST_MATMUL[arch], f"{where}: dots became {r.matmul}"
    return results


@pytest.mark.parametrize("arch", [80, 90, 100])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_bf16_launches_compile_fit_and_do_not_spill(arch, head_dim):
    """Each kernel has its own tiles; on sm_90 every dot but D=256 dK/dV's is on wgmma (no
    tiling tried kept that one on wgmma without spilling), on sm_100 every dot on tcgen05."""
    check(arch, torch.bfloat16, head_dim)


@pytest.mark.parametrize("arch", [80, 90, 100])
@pytest.mark.parametrize("head_dim", [128, 256])
def test_split_kv_forward_compiles_fits_and_does_not_spill(arch, head_dim):
    """Decoding's forward, each row's kv tiles split over programs (float32 partial outputs),
    is a compile of its own: it too fits and keeps within the spill budget."""
    (forward,) = check(arch, torch.bfloat16, head_dim, "--kv-splits", "4")
    assert forward.kernel == "attention_forward_kernel"


@pytest.mark.parametrize("arch", [80, 90, 100])
@pytest.mark.parametrize(
    ("head_dim", "options"),
    [
        (64, ("--gqa-group", "4")),
        (128, ("--gqa-group", "8", "--kv-splits", "4", "--alibi", "--softcap", "30")),
        (256, ("--gqa-group", "4", "--kv-splits", "8")),
        (128, ("--gqa-group", "1", "--kv-splits", "4", "--wide-offsets")),
    ],
    ids=["D64", "D128-split-mods", "D256-split", "D128-mha-wide"],
)
def test_packed_decoding_forward_compiles_fits_and_does_not_spill(arch, head_dim, options):
    """A decoding step's forward with a kv head's query heads packed in one 16-row tile (a
    compile of its own) fits and keeps within the spill budget, split or not."""
    (forward,) = check(arch, torch.bfloat16, head_dim, "--pack-gqa", *options)
    assert (forward.kernel, forward.launch.block_m) == ("attention_forward_kernel", 16)


@pytest.mark.parametrize("arch", [80, 86, 90, 100, 120])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gqa_launches(arch, head_dim):
    """A GQA group compiles another dK/dV kernel (unrolled over the group's query heads)."""
    check(arch, torch.bfloat16, head_dim, "--gqa-group", "4")


@pytest.mark.parametrize(
    ("arch", "dtype", "head_dim"),
    [
        (80, torch.float32, 64),  # fp32 once did not compile for sm_80
        (86, torch.float32, 256),  # the tightest fit: 99 KB
        (90, torch.float32, 128),
        (86, torch.bfloat16, 256),
        (90, torch.float16, 128),
        (90, torch.bfloat16, 40),
        (120, torch.bfloat16, 128),  # RTX 50xx: its own tiles (99 KB, other spills)
        (120, torch.bfloat16, 256),  # 99 KB of shared memory, like sm_86
    ],
)
def test_other_archs_dtypes_and_head_dims(arch, dtype, head_dim):
    """sm_86/89/120 have 99 KB of shared memory, not 163 (sm_80) or 227 KB (sm_90/100); D=40
    pads to 64 and its rows are not 16-element aligned, which compiles other loads."""
    check(arch, dtype, head_dim)


@pytest.mark.parametrize("arch", [80, 90, 100])
@pytest.mark.parametrize(("head_dim", "kv_splits"), [(128, 1), (256, 1), (128, 4)])
def test_64_bit_offset_variants_compile_fit_and_do_not_spill(arch, head_dim, kv_splits):
    """Tensors past 2^31 elements take kernels compiled with 64-bit slice offsets; without
    score mods they keep the same tiles within the spill budget (with ALiBi, softcap and GQA
    sm_90's D=128 dK/dV spills 32 B, against 16 B in 32 bits: left, for such sizes only)."""
    options = ("--wide-offsets", "--kv-splits", str(kv_splits))
    check(arch, torch.bfloat16, head_dim, *options)


@pytest.mark.parametrize(
    ("arch", "head_dim"), [(90, 64), (90, 128), (100, 128), (80, 256), (86, 128), (120, 128)]
)
def test_score_mods_compile_in_kernel(arch, head_dim):
    """ALiBi and softcap add registers: where the plain kernels' largest tiles spilled with
    them (24-160 B), the launcher takes the next."""
    check(arch, torch.bfloat16, head_dim, "--alibi", "--softcap", "30", "--gqa-group", "4")


@pytest.mark.parametrize(
    ("computed", "arch", "head_dim", "options"),
    [
        ("--band", 80, 128, ()),
        ("--band", 86, 128, ()),
        ("--band", 90, 128, ()),
        ("--band", 90, 256, ()),
        ("--band", 100, 64, ()),
        ("--band", 120, 128, ()),
        ("--band", 90, 64, ("--alibi", "--gqa-group", "4")),
        ("--band", 100, 128, ("--alibi", "--gqa-group", "4")),
        ("--band", 90, 128, ("--pack-gqa", "--gqa-group", "4", "--kv-splits", "8")),
        ("--ranges", 80, 128, ()),
        ("--ranges", 86, 128, ()),
        ("--ranges", 90, 256, ()),
        ("--ranges", 100, 128, ()),
        ("--ranges", 90, 64, ("--alibi", "--gqa-group", "4")),
        ("--ranges", 90, 128, ("--pack-gqa", "--gqa-group", "4", "--kv-splits", "8")),
    ],
)
def test_kernels_computing_their_mask_compile_fit_and_do_not_spill(
    computed, arch, head_dim, options
):
    """Kernels that compute a causal or window mask themselves (``--band``, ``kernel_band``),
    or mask partial tiles from key ranges (``--ranges``, ``kernel_ranges``), pipeline every
    stage of their loops' tiles: at the table's stages they overflowed shared memory (sm_80's
    D=128 band dQ, 176 KB of 163; sm_90's D=128 ranges forward took 229 KB, 180 KB walking
    bitmaps), so they take one stage fewer (``band_launches``)."""
    found = check(arch, torch.bfloat16, head_dim, computed, *options)
    assert len(found) == (1 if "--pack-gqa" in options else 3)


def test_oversized_tiles_are_reported_not_hidden():
    """The check can fail: 128x128 tiles of D=256 in 4 stages overflow sm_86's 99 KB."""
    found = compiled(86, torch.bfloat16, 256, "--launch", "128,128,8,4")
    assert not all(r.fits for r in found)
