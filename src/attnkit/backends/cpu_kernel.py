"""The compiled CPU forward kernel of the tiled backend (csrc/tiled_forward_cpu.cpp).

Built on first use with torch's C++ extension tooling (needs a C++ compiler; cached by torch
under TORCH_EXTENSIONS_DIR) and registered as the custom op ``torch.ops.attnkit.tiled_forward``.
Where it cannot be built, the tiled backend runs its PyTorch loop instead and logs why once.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from attnkit.block_mask import BlockMask, partial_bitmaps

log = logging.getLogger("attnkit")
SOURCE = Path(__file__).parent / "csrc" / "tiled_forward_cpu.cpp"


@functools.cache
def available() -> bool:
    """Build (once) and load the kernel; False, with a logged reason, where that fails."""
    try:
        build("attnkit_tiled_forward_cpu")
    except Exception as exc:  # compiler missing, headers missing, ...
        log.warning("attnkit: compiled CPU kernel unavailable (%s); using the PyTorch loop", exc)
        return False
    return True


def build(name: str, defines: Sequence[str] = ()) -> None:
    """Compile and load the kernel as extension ``name`` (``-D`` flags in ``defines``).

    The default op is ``torch.ops.attnkit.tiled_forward``; tests build a second copy with
    ``ATTNKIT_OP_NAMESPACE=...`` and ``ATTNKIT_PORTABLE_SIMD`` to check the portable loops too.
    """
    from torch.utils.cpp_extension import load

    _put_ninja_on_path()
    load(
        name=name,
        sources=[str(SOURCE)],
        # -fopenmp: at::parallel_for is inline OpenMP; without it the loop runs serially
        extra_cflags=["-O3", "-march=native", "-fopenmp", *(f"-D{d}" for d in defines)],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )


def _put_ninja_on_path() -> None:
    """Make the pip-installed ``ninja`` of this venv visible to torch's extension builder.

    torch runs ``ninja`` from PATH, which lacks the venv's scripts folder unless the venv is
    activated.
    """
    scripts = sysconfig.get_path("scripts")
    if shutil.which("ninja") is None and shutil.which("ninja", path=scripts):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")


def forward(
    q: Tensor, k: Tensor, v: Tensor, bm: BlockMask, max_chunk: int, scale: float
) -> tuple[Tensor, Tensor]:
    """Out (B, Hq, Lq, Dv) and lse (B, Hq, Lq), float32, from float32 q/k/v on the CPU."""
    tile_index, bitmaps = partial_bitmaps(bm)
    out, lse = torch.ops.attnkit.tiled_forward(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        bm.kinds.contiguous(),
        tile_index,
        bitmaps,
        bm.block_q,
        bm.block_k,
        max_chunk,
        scale,
    )
    return out, lse
