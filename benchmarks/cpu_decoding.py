"""Token-by-token decoding with a KV cache on CPU: milliseconds per generated token.

Decoding is where per-step costs show: the cache's keys and values are a strided prefix of a
longer buffer, the key length grows by one each step (so tile maps are new each step), and
each layer has its own mask object. Three cases: causal; ``sliding_window(256)`` over a
cache of every position; the same window over ``KVCache(window=256)``, which keeps only the
window (bounded memory, and a key length that stops growing). Two tables:

- attention alone: one query per step over 6 layers' ``KVCache`` (8 heads, D = 64), each
  layer with its own mask object, as a model calls it;
- a whole model: ``attnkit.nn.CausalLM`` (d_model 512, 8 heads, 6 layers), whose linear
  layers take much of each step.

Every (prompt length, mask) runs each backend in turn, ``--repeats`` times over (the same
steps from the same cache state each time), and reports the fastest repeat: on a shared
machine, interference only ever adds time.

    python benchmarks/cpu_decoding.py [--prompts 512 2048] [--steps 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import functools
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

import attnkit
from attnkit import masks
from attnkit.masks import Mask
from attnkit.nn import CausalLM
from attnkit.nn.kv_cache import KVCache

WINDOW = 256
#: case name -> (mask factory, the KVCache's window or None)
CASES: dict[str, tuple[Callable[[], Mask], int | None]] = {
    "causal": (masks.causal, None),
    f"sliding_window({WINDOW})": (lambda: masks.sliding_window(WINDOW), None),
    f"sliding_window({WINDOW}), windowed cache": (lambda: masks.sliding_window(WINDOW), WINDOW),
}
LAYERS, HEADS, D = 6, 8, 64


def new_cache(P: int, steps: int, window: int | None) -> KVCache:
    """Room for the prompt and the steps, or for 2 windows when the cache keeps one."""
    size = P + steps if window is None else 2 * window
    return KVCache(1, HEADS, size, D, window=window)


def attention_ms(backend: str, case: str, P: int, steps: int) -> float:
    """Milliseconds per step of ``steps`` decoding steps of LAYERS attention calls."""
    mask, window = CASES[case]
    g = torch.Generator().manual_seed(0)
    caches = [new_cache(P, steps, window) for _ in range(LAYERS)]
    for cache in caches:
        for chunk in range(0, P, WINDOW):  # a windowed cache takes a window at a time
            n = min(WINDOW, P - chunk)
            cache.append(*(torch.randn(1, HEADS, n, D, generator=g) for _ in range(2)))
    layer_masks = [mask() for _ in range(LAYERS)]  # as each layer holds its own
    new = [torch.randn(3, 1, HEADS, 1, D, generator=g) for _ in range(steps)]
    t0 = time.perf_counter()
    with torch.no_grad():
        for qkv in new:
            for cache, m in zip(caches, layer_masks, strict=True):
                k, v = cache.append(qkv[1], qkv[2])
                attnkit.attention(qkv[0], k, v, mask=m, backend=backend)
    return (time.perf_counter() - t0) / steps * 1e3


def decode_ms(model: CausalLM, filled: list[KVCache], start: int, steps: int) -> float:
    """Milliseconds per token for ``steps`` greedy steps from caches filled to ``start``."""
    caches = copy.deepcopy(filled)  # every repeat starts from the same state
    token = torch.zeros(1, 1, dtype=torch.long)
    t0 = time.perf_counter()
    with torch.no_grad():
        for t in range(steps):
            logits, _ = model(token, start=start + t, caches=caches)
            token = logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) / steps * 1e3


def best_of(repeats: int, runs: dict[str, Callable[[], float]]) -> dict[str, float]:
    """The fastest of ``repeats`` interleaved runs of each backend's timing function."""
    times: dict[str, list[float]] = {b: [] for b in runs}
    for _ in range(repeats):
        for backend, run in runs.items():
            times[backend].append(run())
    return {b: min(ts) for b, ts in times.items()}


def add_row(table: Table, P: int, name: str, ms: dict[str, float]) -> None:
    ratio = f"{ms['sdpa'] / ms['tiled']:.2f}x" if "sdpa" in ms else "—"
    cells = [f"{ms[b]:.2f}" if b in ms else "—" for b in ("tiled", "sdpa", "auto")]
    table.add_row(str(P), name, *cells, ratio)


def new_table(title: str) -> Table:
    table = Table(title=title)
    for col in ("prompt", "mask", "tiled", "sdpa", "auto", "sdpa / tiled"):
        table.add_column(col, justify="left" if col == "mask" else "right")
    return table


def backends_for(case: str) -> list[str]:
    """SDPA only where one query sees every key it is given, so it runs unmasked: causal, and
    a window over a cache that holds just the window."""
    sees_all = case == "causal" or CASES[case][1] is not None
    return ["tiled", "sdpa", "auto"] if sees_all else ["tiled", "auto"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, nargs="*", default=[512, 2048])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    console = Console(width=140)
    where = f"{torch.get_num_threads()} threads, fp32, best of {args.repeats}"
    table = new_table(
        f"attention per decoding step, ms ({LAYERS} layers, {HEADS} heads, D={D}; {where} "
        f"x {args.steps} steps)"
    )
    for P in args.prompts:
        for case in CASES:
            runs = {
                b: functools.partial(attention_ms, b, case, P, args.steps)
                for b in backends_for(case)
            }
            add_row(table, P, case, best_of(args.repeats, runs))
    console.print(table)
    table = new_table(
        f"CausalLM decoding, ms per token (d_model 512, {HEADS} heads, {LAYERS} layers; "
        f"{where} x {args.steps} steps)"
    )
    for P in args.prompts:
        for case, (mask, window) in CASES.items():
            runs = {}
            for backend in backends_for(case):
                torch.manual_seed(0)
                model = CausalLM(
                    1000, d_model=512, nhead=HEADS, num_layers=LAYERS,
                    max_len=P + args.steps + 1, mask=mask(), backend=backend,
                ).eval()  # fmt: skip
                size = P + args.steps if window is None else 2 * window
                caches = model.new_caches(1, size, window=window)
                prompt = torch.randint(0, 1000, (1, P))
                chunk = P if window is None else window  # as CausalLM.generate feeds it
                with torch.no_grad():
                    for c in range(0, P, chunk):
                        model(prompt[:, c : c + chunk], start=c, caches=caches)
                runs[backend] = functools.partial(decode_ms, model, caches, P, args.steps)
            add_row(table, P, case, best_of(args.repeats, runs))
    console.print(table)


if __name__ == "__main__":
    main()
