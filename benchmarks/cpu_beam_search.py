"""Beam search's steps after a long prompt: beams sharing the prompt's caches, or copies.

A CausalLM (rotary positions, grouped heads, float32, batch 1) is fed a prompt of each
``--prompts`` length; then ``--steps`` beam-search steps of ``--beams`` beams are timed, each a
reorder of the caches' rows (the beams moved among themselves, as beam search does) and one
token. "shared": ``BeamKVCache``, the prompt's keys and values held once and read once for
every beam, the beams' own positions reordered; "copies": the prompt's caches copied to every
beam, every held position reordered at every step. Each variant keeps its best of
``--rounds``; the two variants' logits are checked against each other.

``--translation``: a Transformer (as many encoder and decoder layers) over sources of each
length instead: "shared", the beams read their source's cross-attention keys and values as K
times the heads; "copies", the memory and its keys and values copied to every beam (the
cache column counts both).

    python benchmarks/cpu_beam_search.py [--prompts 1024 8192] [--beams 4] [--steps 16]
    python benchmarks/cpu_beam_search.py --translation
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from attnkit.nn import CausalLM, Transformer, beam_kv_cache


def timed_steps(
    model: CausalLM | Transformer, prompt: torch.Tensor, beams: int, steps: int
) -> tuple[float, torch.Tensor]:
    """(seconds per step, the last logits) of ``steps`` reorders and tokens after the prompt."""
    # (the decoding beam_search drives, so that the prompt's feeding stays out of the timing)
    if isinstance(model, Transformer):
        logits, step, reorder = model._decoding(prompt, 1, steps + 1, beams)
    else:
        logits, step, reorder = model._decoding(prompt, None, steps, beams)
    moved = torch.arange(logits.shape[0]).roll(1)  # one prompt: every beam takes another's row
    tokens = logits.argmax(-1)
    begin = time.perf_counter()
    for t in range(steps):
        reorder(moved)
        logits = step(tokens, t)
    return (time.perf_counter() - begin) / steps, logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--translation", action="store_true", help="a Transformer over sources")
    args = ap.parse_args()
    torch.manual_seed(0)
    sizes = {"d_model": args.width, "nhead": 8, "num_kv_heads": 2, "positions": "rope"}
    model: CausalLM | Transformer
    if args.translation:
        layers = {"num_encoder_layers": args.layers, "num_decoder_layers": args.layers}
        model = Transformer(1000, 1000, **sizes, **layers, max_len=max(args.prompts) + 1)
    else:
        model = CausalLM(1000, **sizes, num_layers=args.layers, max_len=max(args.prompts) + 1)
    model.eval()
    head_dim = args.width // 8
    what = "translation" if args.translation else "beam search"
    table = Table(
        title=f"{what}, {args.beams} beams, {args.steps} steps, {args.layers} layers, "
        f"width {args.width}, 8/2 heads, float32, {torch.get_num_threads()} threads"
    )
    first = "source" if args.translation else "prompt"
    for column in (first, "copies ms/step", "shared ms/step", "speed-up", "cache MiB"):
        table.add_column(column, justify="right")
    for length in args.prompts:
        prompt = torch.randint(3, 1000, (1, length))  # (0: a source's pad)
        best, last = {}, {}
        with torch.no_grad():
            for _ in range(args.rounds):
                for share in (False, True):
                    beam_kv_cache.SHARE_PROMPTS = share
                    seconds, last[share] = timed_steps(model, prompt, args.beams, args.steps)
                    best[share] = min(best.get(share, float("inf")), seconds)
        beam_kv_cache.SHARE_PROMPTS = True
        torch.testing.assert_close(last[True], last[False], rtol=1e-4, atol=1e-4)
        # keys and values of every layer: the prompt per beam, or once and the beams' own (a
        # translation's cross-attention keys and values and its memory, the beams' own apart)
        per_position = 2 * 2 * head_dim * 4 * args.layers / 2**20
        if args.translation:
            per_position += args.width * 4 / 2**20
        own = 0 if args.translation else args.steps
        copies = args.beams * (length + own) * per_position
        shared = (length + args.beams * own) * per_position
        table.add_row(
            f"{length:,}",
            f"{best[False] * 1e3:.1f}",
            f"{best[True] * 1e3:.1f}",
            f"{best[False] / best[True]:.2f}x",
            f"{copies:.1f} -> {shared:.1f}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
