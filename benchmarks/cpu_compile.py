"""An attnkit CausalLM on CPU, eager against torch.compile, per backend: training and decoding.

A training step is forward, cross-entropy over the next tokens, and backward (no optimizer),
at fp32, batch 1; rotary positions, causal attention. A decoding step is one token over KV
caches holding ``--contexts`` tokens (cropped back after each step), under no_grad, the step
compiled with ``fullgraph=True`` (lengths stay symbolic: one graph for every step). Each of
``--backends`` runs eager and compiled (inductor); compiling happens before timing and is
reported apart. The variants take turns for ``--rounds`` rounds and each keeps its best median;
compiled results are checked against eager ones first.

    python benchmarks/cpu_compile.py [--lengths 512 2048] [--contexts 512 4096]
        [--backends tiled sdpa] [--layers 2] [--width 256] [--heads 4] [--rounds 3]
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


def decode_step_of(
    step: Callable[..., torch.Tensor], model: CausalLM, context: torch.Tensor
) -> Callable[[], torch.Tensor]:
    """One token over caches holding ``context`` (B, P); the caches are cropped back after."""
    P = context.shape[1]
    caches = model.new_caches(1, P + 1)
    with torch.no_grad():
        model(context, caches=caches)
    token = context[:, -1:]

    def decode() -> torch.Tensor:
        with torch.no_grad():
            logits = step(token, P, caches)
        for cache in caches:
            cache.crop(P)
        return logits

    return decode


def time_variants(
    variants: dict[tuple[str, str], Callable[[], torch.Tensor]], rounds: int
) -> dict[tuple[str, str], float]:
    """Best median ms of each variant over ``rounds`` interleaved rounds."""
    best: dict[tuple[str, str], float] = {}
    for _ in range(rounds):
        for key, fn in variants.items():
            best[key] = min(best.get(key, float("inf")), ms(fn))
    return best


def new_table(title: str, size: str) -> Table:
    table = Table(title=title)
    for column in (size, "backend", "eager", "compiled", "eager / compiled", "compile s"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    return table


Step = Callable[[], torch.Tensor]


def add_row(
    table: Table,
    size: int,
    args: argparse.Namespace,
    variants_of: Callable[[str], tuple[Step, Step]],
) -> None:
    """Per backend, an (eager, compiled) pair of steps: the first compiled call is timed as
    compiling and checked against eager; then both are timed, interleaved."""
    steps: dict[tuple[str, str], Step] = {}
    compile_seconds = {}
    for backend in args.backends:
        eager, compiled = variants_of(backend)
        start = time.perf_counter()
        result = compiled()  # compiles
        compile_seconds[backend] = time.perf_counter() - start
        torch.testing.assert_close(result, eager(), rtol=1e-4, atol=1e-4)
        steps[backend, "eager"], steps[backend, "compiled"] = eager, compiled
    best = time_variants(steps, args.rounds)
    for backend in args.backends:
        eager_ms, compiled_ms = best[backend, "eager"], best[backend, "compiled"]
        table.add_row(
            str(size),
            backend,
            f"{eager_ms:.2f}" if eager_ms < 10 else f"{eager_ms:.1f}",
            f"{compiled_ms:.2f}" if compiled_ms < 10 else f"{compiled_ms:.1f}",
            f"{eager_ms / compiled_ms:.2f}x",
            f"{compile_seconds[backend]:.0f}",
        )


def make_model(args: argparse.Namespace, backend: str, max_len: int) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(
        VOCAB,
        d_model=args.width,
        nhead=args.heads,
        num_layers=args.layers,
        max_len=max_len,
        positions="rope",
        backend=backend,
    )


def training_table(args: argparse.Namespace, shape: str) -> Table:
    table = new_table(f"CausalLM training step: {shape}; ms", "tokens")
    for L in args.lengths:
        ids = torch.randint(0, VOCAB, (1, L + 1), generator=torch.Generator().manual_seed(L))

        def training(backend: str, L: int = L, ids: torch.Tensor = ids) -> tuple[Step, Step]:
            model = make_model(args, backend, L)
            return step_of(model, ids), step_of(torch.compile(model), ids)

        add_row(table, L, args, training)
    return table


def decoding_table(args: argparse.Namespace, shape: str) -> Table:
    table = new_table(f"CausalLM decoding step (one token): {shape}; ms", "cached tokens")
    for P in args.contexts:
        context = torch.randint(0, VOCAB, (1, P), generator=torch.Generator().manual_seed(P))

        def decoding(
            backend: str, P: int = P, context: torch.Tensor = context
        ) -> tuple[Step, Step]:
            model = make_model(args, backend, P + 1).eval()

            def step(ids: torch.Tensor, start: int, caches: list) -> torch.Tensor:
                return model(ids, start=start, caches=caches)[0]

            compiled = torch.compile(step, fullgraph=True)
            return decode_step_of(step, model, context), decode_step_of(compiled, model, context)

        add_row(table, P, args, decoding)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=[512, 2048])
    ap.add_argument("--contexts", type=int, nargs="*", default=[512, 4096])
    ap.add_argument("--backends", nargs="+", default=["tiled", "sdpa"])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best counts")
    args = ap.parse_args()
    shape = (
        f"{args.layers} layers, width {args.width}, {args.heads} heads, rope, causal, fp32, "
        f"batch 1, {torch.get_num_threads()} threads"
    )
    console = Console()
    if args.lengths:
        console.print(training_table(args, shape))
    if args.contexts:
        console.print(decoding_table(args, shape))


if __name__ == "__main__":
    main()
