"""Beam search's steps after a long prompt: beams sharing the prompt's caches, or copies.

A CausalLM (rotary positions, grouped heads, float32, batch 1) is fed a prompt of each
``--prompts`` length; then ``--steps`` beam-search steps of ``--beams`` beams are timed, each a
reorder of the caches' rows (the beams moved among themselves, as beam search does) and one
token. "shared": ``BeamKVCache``, the prompt's keys and values held once and read once for
every beam, the beams' own positions reordered; "copies": the prompt's caches copied to every
beam, every held position reordered at every step. Each variant keeps its best of
``--rounds``; the two variants' logits are checked against each other.

    python benchmarks/cpu_beam_search.py [--prompts 1024 8192] [--beams 4] [--steps 16]
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from attnkit.nn import CausalLM, beam_kv_cache


def timed_steps(
    lm: CausalLM, prompt: torch.Tensor, beams: int, steps: int
) -> tuple[float, torch.Tensor]:
    """(seconds per step, the last logits) of ``steps`` reorders and tokens after the prompt."""
    # (the decoding beam_search drives, so that the prompt's feeding stays out of the timing)
    logits, step, reorder = lm._decoding(prompt, None, steps, beams)
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
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = CausalLM(
        1000, d_model=args.width, nhead=8, num_kv_heads=2, num_layers=args.layers,
        positions="rope", max_len=max(args.prompts) + args.steps,
    ).eval()  # fmt: skip
    head_dim = args.width // 8
    table = Table(
        title=f"beam search, {args.beams} beams, {args.steps} steps, {args.layers} layers, "
        f"width {args.width}, 8/2 heads, float32, {torch.get_num_threads()} threads"
    )
    for column in ("prompt", "copies ms/step", "shared ms/step", "speed-up", "cache MiB"):
        table.add_column(column, justify="right")
    for length in args.prompts:
        prompt = torch.randint(0, 1000, (1, length))
        best, last = {}, {}
        with torch.no_grad():
            for _ in range(args.rounds):
                for share in (False, True):
                    beam_kv_cache.SHARE_PROMPTS = share
                    seconds, last[share] = timed_steps(lm, prompt, args.beams, args.steps)
                    best[share] = min(best.get(share, float("inf")), seconds)
        beam_kv_cache.SHARE_PROMPTS = True
        torch.testing.assert_close(last[True], last[False], rtol=1e-4, atol=1e-4)
        # keys and values of every layer: the prompt per beam, or once and the beams' own
        per_position = 2 * 2 * head_dim * 4 * args.layers / 2**20
        copies = args.beams * (length + args.steps) * per_position
        shared = (length + args.beams * args.steps) * per_position
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
