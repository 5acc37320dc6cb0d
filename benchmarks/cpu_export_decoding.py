"""A decoding step on CPU: eager over KVCaches, and DecodingStep eager, exported, AOTInductor.

One token over caches holding ``--contexts`` tokens, batch 1, under no_grad, a CausalLM with
rotary positions and grouped heads. ``KVCache`` writes the token into preallocated buffers
(cropped back after each step); ``DecodingStep`` takes the caches as tensors and returns them
one position longer, copying them (what lets one exported graph serve every step). Variants
take turns for ``--rounds`` rounds and each keeps its best median; every variant's logits are
checked against eager's first. AOTInductor's compile time is reported apart.

With ``--translation``, a Transformer's decoder and ``TranslationStep`` instead: one target
token over 32 cached ones and sources of ``--contexts`` tokens, whose cross-attention keys and
values the step is given (``TranslationStep.encode``); "memory re-projected" is eager decoding
that projects the source's keys and values at every step instead (no cross-attention cache).

    python benchmarks/cpu_export_decoding.py [--contexts 512 4096] [--layers 2] [--width 256]
    python benchmarks/cpu_export_decoding.py --translation --contexts 32 256 1000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils import benchmark

from attnkit.nn import CausalLM, DecodingStep, Transformer, TranslationStep

VOCAB = 512
TARGETS = 32  # cached target tokens in --translation
Variants = dict[str, Callable[[], torch.Tensor]]


def ms(fn: Callable[[], object]) -> float:
    return (
        benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=1.0).median * 1e3
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--translation", action="store_true", help="a Transformer's decoder")
    args = ap.parse_args()
    torch.manual_seed(0)
    most = max(args.contexts) + TARGETS + 1
    dims = {"d_model": args.width, "nhead": args.heads, "num_kv_heads": args.kv_heads}
    step: DecodingStep | TranslationStep
    if args.translation:
        model = Transformer(
            VOCAB, VOCAB, **dims, num_encoder_layers=args.layers,
            num_decoder_layers=args.layers, max_len=most,
        ).eval()  # fmt: skip
        step = TranslationStep(model)
    else:
        lm = CausalLM(VOCAB, **dims, num_layers=args.layers, positions="rope", max_len=most).eval()
        step = DecodingStep(lm)
    start = time.perf_counter()
    graph = step.export(max_len=most)
    if isinstance(graph, tuple):  # (the encoder's, the step's)
        graph = graph[1]
    exported_s = time.perf_counter() - start
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        package = torch._inductor.aoti_compile_and_package(
            graph, package_path=str(Path(tmp) / "step.pt2")
        )
        compiled = torch._inductor.aoti_load_package(package)
    compiled_s = time.perf_counter() - start
    exported = graph.module()

    def lm_variants(P: int) -> tuple[Variants, tuple[torch.Tensor, ...]]:
        """One token over P cached ones: eager over KVCaches, and the step's inputs."""
        context = torch.randint(0, VOCAB, (1, P))
        token = context[:, -1:]
        caches = lm.new_caches(1, P + 1)
        lm(context, caches=caches)
        keys = torch.stack([cache.keys for cache in caches])
        values = torch.stack([cache.values for cache in caches])

        def eager() -> torch.Tensor:
            logits, _ = lm(token, start=P, caches=caches)
            for cache in caches:
                cache.crop(P)
            return logits

        return {"eager, KVCache": eager}, (token, keys, values)

    def translation_variants(S: int) -> tuple[Variants, tuple[torch.Tensor, ...]]:
        """One target token over TARGETS cached ones, a source of S tokens: eager over
        KVCaches (and re-projecting the memory), and the step's inputs."""
        assert isinstance(step, TranslationStep)
        src = torch.randint(3, VOCAB, (1, S))
        tgt = torch.randint(3, VOCAB, (1, TARGETS + 1))
        token = tgt[:, -1:]
        memory, padding = model.encode(src)
        caches = model.new_caches(1, S, TARGETS + 1)
        model.decode(tgt[:, :-1], memory, padding, caches=caches)
        source = step.encode(src)
        _, keys, values = step(tgt[:, :-1], *step.empty_caches(1), *source)

        def eager(reprojected: bool = False) -> torch.Tensor:
            pairs = [(own, None if reprojected else cross) for own, cross in caches]
            logits, _ = model.decode(token, memory, padding, start=TARGETS, caches=pairs)
            for own, _ in caches:
                own.crop(TARGETS)
            return logits

        variants = {
            "eager, KVCache": eager,
            "eager, memory re-projected": lambda: eager(reprojected=True),
        }
        return variants, (token, keys, values, *source)

    def best_at(n: int) -> dict[str, float]:
        """Each variant's best median (ms) at n cached tokens (source tokens: --translation)."""
        variants, inputs = (translation_variants if args.translation else lm_variants)(n)
        variants |= {
            f"{type(step).__name__}, eager": lambda: step(*inputs)[0],
            "exported graph": lambda: exported(*inputs)[0],
            "AOTInductor": lambda: compiled(*inputs)[0],
        }
        want = variants["eager, KVCache"]()
        for name, fn in variants.items():
            torch.testing.assert_close(fn(), want, rtol=1e-4, atol=1e-4, msg=name)
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(args.rounds):
            for name, fn in variants.items():
                best[name] = min(best[name], ms(fn))
        return best

    with torch.no_grad():
        rows = [(n, best_at(n)) for n in args.contexts]

    what = f"a translation's, {TARGETS} targets cached" if args.translation else "a CausalLM's"
    table = Table(
        title=f"one decoding step ({what}), batch 1, {args.layers} layers, width {args.width}, "
        f"{args.heads}/{args.kv_heads} heads, {torch.get_num_threads()} threads, ms "
        f"(export {exported_s:.1f} s, AOTInductor compile {compiled_s:.0f} s)"
    )
    table.add_column("source tokens" if args.translation else "cached tokens", justify="right")
    for name in rows[0][1]:
        table.add_column(name, justify="right")
    for P, best in rows:
        eager_ms = best["eager, KVCache"]
        table.add_row(
            str(P),
            *(
                f"{t:.2f}" + ("" if t == eager_ms else f" ({eager_ms / t:.2f}x)")
                for t in best.values()
            ),
        )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
