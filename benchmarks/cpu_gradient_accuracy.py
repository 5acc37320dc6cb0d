"""float32 accuracy on CPU: each way's error against float64, as a multiple of the reference's.

DESIGN §7 bounds a fast path's error by 2x (outputs) and 4x (gradients) the error of the
reference backend run in the same dtype. This prints those multiples, on random inputs, for
tiled's compiled kernels, tiled's PyTorch loops and torch SDPA, with the softmax scale
swept: a larger scale (or larger q, k) makes larger logits, and a flash backward recomputes
P = exp(S - LSE) from scores whose rounding grows with them. Tile sizes are ``auto``'s.

    python benchmarks/cpu_gradient_accuracy.py [--lengths 100 512 2048] [--scales 0.125 0.5 1]
        [--heads 2] [--head-dim 64] [--causal]
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch
from rich.console import Console
from rich.table import Table

import attnkit
from attnkit import masks
from attnkit.backends import cpu_kernel

#: (column, backend, whether tiled may use its compiled kernels)
WAYS = (("tiled kernels", "tiled", True), ("tiled loops", "tiled", False), ("SDPA", "sdpa", True))
PARTS = ("out", "dq", "dk", "dv")


def results(inputs: list[torch.Tensor], dtype: torch.dtype, backend: str, **kw: object):
    """Output and the gradients of q, k, v (seeded with the last input) in ``dtype``."""
    q, k, v, dout = (t.to(dtype) for t in inputs)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = attnkit.attention(q, k, v, backend=backend, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def max_error(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> list[float]:
    return [(g.double() - w).abs().max().item() for g, w in zip(got, want, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 512, 2048])
    parser.add_argument("--scales", type=float, nargs="+", default=[0.125, 0.5, 1.0])
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args()
    mask = masks.causal() if args.causal else None
    if not cpu_kernel.available():  # builds and loads them: the mock below only hides them
        raise SystemExit("tiled's compiled kernels are unavailable here")
    table = Table(
        title=f"float32 error / the reference's, B=1, H={args.heads}, D={args.head_dim}, "
        f"{'causal' if args.causal else 'no mask'} (first row: the reference's own error)"
    )
    for column in ("N", "scale", "way", *PARTS):
        table.add_column(column, justify="right")
    gen = torch.Generator().manual_seed(0)
    for n in args.lengths:
        shape = (1, args.heads, n, args.head_dim)
        inputs = [torch.randn(shape, dtype=torch.float64, generator=gen) for _ in range(4)]
        for scale in args.scales:
            kw = {"scale": scale, "mask": mask}
            exact = results(inputs, torch.float64, "reference", **kw)
            ref = max_error(results(inputs, torch.float32, "reference", **kw), exact)
            table.add_row(str(n), str(scale), "reference", *(f"{r:.1e}" for r in ref))
            for name, backend, kernels in WAYS:
                with mock.patch.object(cpu_kernel, "available", lambda k=kernels: k):
                    errors = max_error(results(inputs, torch.float32, backend, **kw), exact)
                ratios = (f"{e / r:.1f}x" for e, r in zip(errors, ref, strict=True))
                table.add_row("", "", name, *ratios)
            table.add_section()
    Console().print(table)


if __name__ == "__main__":
    main()
