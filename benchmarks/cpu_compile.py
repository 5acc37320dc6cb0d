"""An attnkit CausalLM's training step on CPU, eager against torch.compile, per backend.

A step is forward, cross-entropy over the next tokens, and backward (no optimizer), at fp32,
batch 1; rotary positions, causal attention (the tiled kernels compute the band: one graph
per length). Each of ``--backends`` runs eager and compiled (inductor); compiling happens
before timing and is reported apart. The variants take turns for ``--rounds`` rounds and each
keeps its best median; the compiled loss is checked against the eager one first.

    python benchmarks/cpu_compile.py [--lengths 512 2048] [--backends tiled sdpa]
        [--layers 2] [--width 256] [--heads 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.utils import benchmark

from attnkit.nn import CausalLM

VOCAB = 512


def ms(fn: Callable[[], object]) -> float:
    return (
        benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=1.0).median * 1e3
    )


def step_of(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One training step (forward, loss, backward); returns the loss."""

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        logits, _ = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.detach()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--backends", nargs="+", default=["tiled", "sdpa"])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best counts")
    args = ap.parse_args()
    table = Table(
        title=(
            f"CausalLM training step: {args.layers} layers, width {args.width}, {args.heads} "
            f"heads, rope, causal, fp32, batch 1, {torch.get_num_threads()} threads; ms"
        )
    )
    for column in ("tokens", "backend", "eager", "compiled", "eager / compiled", "compile s"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    for L in args.lengths:
        ids = torch.randint(0, VOCAB, (1, L + 1), generator=torch.Generator().manual_seed(L))
        steps: dict[tuple[str, str], Callable[[], torch.Tensor]] = {}
        compile_seconds = {}
        for backend in args.backends:
            torch.manual_seed(0)
            model = CausalLM(
                VOCAB,
                d_model=args.width,
                nhead=args.heads,
                num_layers=args.layers,
                max_len=L,
                positions="rope",
                backend=backend,
            )
            eager = step_of(model, ids)
            compiled = step_of(torch.compile(model), ids)
            start = time.perf_counter()
            loss = compiled()  # compiles forward and backward
            compile_seconds[backend] = time.perf_counter() - start
            torch.testing.assert_close(loss, eager(), rtol=1e-4, atol=1e-4)
            steps[backend, "eager"], steps[backend, "compiled"] = eager, compiled
        best: dict[tuple[str, str], float] = {}
        for _ in range(args.rounds):
            for key, fn in steps.items():
                best[key] = min(best.get(key, float("inf")), ms(fn))
        for backend in args.backends:
            eager_ms, compiled_ms = best[backend, "eager"], best[backend, "compiled"]
            table.add_row(
                str(L),
                backend,
                f"{eager_ms:.1f}",
                f"{compiled_ms:.1f}",
                f"{eager_ms / compiled_ms:.2f}x",
                f"{compile_seconds[backend]:.0f}",
            )
    Console().print(table)


if __name__ == "__main__":
    main()
