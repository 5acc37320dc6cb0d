"""Resolve MKL's vector-math dispatch before any threaded use (pytorch/pytorch#188792).

oneMKL 2024.2, which torch's CPU wheels link, picks each VML function's kernel on its first
call. When torch's intra-op threads make that first call together (a tensor of more than
2048 elements, so two chunks), one thread's chunk can run the low-accuracy kernel although
torch asks for high accuracy: here ``torch.exp`` of a (2, 2, 24, 24) float64 tensor came out
up to 3.3e-9 off (relative) in fresh processes on a busy 2-core VM, seen as a rare float64
mismatch in the ring-attention test (the reference's softmax). A call on one element per
function and precision resolves the dispatch on one thread: unwarmed, 4 of 60 spawns of 4
such processes went wrong; with ``import attnkit`` first, 0 of 100. torch's own proposed fix
does the same (pytorch/pytorch#188791).
"""

from __future__ import annotations

import torch

#: torch's unary ops on MKL's VML (the vs*/vd* functions libtorch_cpu links); attnkit uses
#: exp and log (softmax, LSE), tanh (softcap), sin and cos (RoPE), sqrt; the rest are cheap
_VML_OPS = (
    torch.exp,
    torch.log,
    torch.log2,
    torch.log10,
    torch.sqrt,
    torch.tanh,
    torch.sin,
    torch.cos,
    torch.tan,
    torch.asin,
    torch.acos,
    torch.atan,
    torch.erf,
    torch.erfc,
    torch.erfinv,
    torch.trunc,
)


def warm_vml() -> None:
    """Call each VML-backed op once on one float32 and one float64 element (~0.1 ms)."""
    if not torch.backends.mkl.is_available():  # type: ignore[no-untyped-call]
        return
    for dtype in (torch.float32, torch.float64):
        one = torch.full((1,), 0.5, dtype=dtype)
        for op in _VML_OPS:
            op(one)
