"""Token-by-token decoding with a KV cache on CPU: milliseconds per generated token.

Decoding is where per-step costs show: the cache's keys and values are a strided prefix of a
longer buffer, the key length grows by one each step (so tile maps, where a mask needs one,
are new each step), and
each layer has its own mask object. Three cases: causal; ``sliding_window(256)`` over a
cache of every position; the same window over ``KVCache(window=256)``, which keeps only the
window (bounded memory, and a key length that stops growing). Five tables (``--tables``):

- attention: one query per step over 6 layers' ``KVCache`` (8 heads, D = 64), each
  layer with its own mask object, as a model calls it; tiled also with the kernels walking
  a tile map built for each new length (``tiled.BAND_IN_KERNEL = False``: how causal and
  window masks ran before the kernels computed them);
- model: ``attnkit.nn.CausalLM`` (d_model 512, 8 heads, 6 layers), whose linear layers take
  much of each step;
- ragged: ``CausalLM.generate`` on a batch of 4 prompts, of equal lengths or left-padded to
  the longest (each step then makes a padding mask anew), tiled against ``auto``;
- latent: one decoding step of ``MultiHeadAttention`` against ``MultiHeadLatentAttention``
  (absorbed, over its latent cache) at DeepSeek-V2-Lite's attention sizes (E = 2048, 16
  heads of 128; MLA: kv_rank 512, rope_dim 64), projections included, ``auto``; MLA also
  with its one kernel unit (MQA, heads packed) on one thread (``cpu_kernel.SPLIT_KV``);
- gqa: one query over a growing cache at Llama-3-8B's attention shapes (32 query heads over
  8 kv heads, D = 128), causal and ``sliding_window(1024)``: tiled with the query heads of a
  kv head packed as rows of one kernel unit (``cpu_kernel.PACK_GQA``), without, and walking
  tile maps, SDPA and ``auto``.

Every (prompt length, mask) runs each backend in turn, ``--repeats`` times over (the same
steps from the same cache state each time), and reports the fastest repeat: on a shared
machine, interference only ever adds time. Each repeat of the attention, model and gqa
tables starts without the tile maps an earlier one built (``fresh_tile_maps``), as a
generation meets each cache length once.

    python benchmarks/cpu_decoding.py [--prompts 512 2048] [--steps 32] [--repeats 5]
        [--tables attention model ragged latent gqa]
"""

from __future__ import annotations

import argparse
import copy
import functools
import time
from collections.abc import Callable
from unittest import mock

import torch
from rich.console import Console
from rich.table import Table

import attnkit
from attnkit import masks
from attnkit.backends import cpu_kernel, tiled
from attnkit.masks import Mask
from attnkit.nn import CausalLM, MultiHeadAttention, MultiHeadLatentAttention, RotaryEmbedding
from attnkit.nn.kv_cache import KVCache

WINDOW = 256
#: case name -> (mask factory, the KVCache's window or None)
CASES: dict[str, tuple[Callable[[], Mask], int | None]] = {
    "causal": (masks.causal, None),
    f"sliding_window({WINDOW})": (lambda: masks.sliding_window(WINDOW), None),
    f"sliding_window({WINDOW}), windowed cache": (lambda: masks.sliding_window(WINDOW), WINDOW),
}
LAYERS, HEADS, D = 6, 8, 64


def cache_slots(P: int, steps: int, window: int | None) -> int:
    """Room for the prompt and the steps, or for 2 windows when the cache keeps one."""
    return P + steps if window is None else 2 * window


#: the attention table's extra backend: tiled, with the kernels walking tile maps
TILE_MAPS = "tiled, tile maps"


def fresh_tile_maps() -> None:
    """Forget the tile maps that masks of equal specs share (64 kept): each decoding step's
    new length then builds its map, as in one generation, not in a repeat of its steps."""
    masks._SHARED_BLOCKS.clear()


def attention_ms(backend: str, case: str, P: int, steps: int) -> float:
    """Milliseconds per step of ``steps`` decoding steps of LAYERS attention calls."""
    if backend == TILE_MAPS:
        with mock.patch.object(tiled, "BAND_IN_KERNEL", False):
            return attention_ms("tiled", case, P, steps)
    mask, window = CASES[case]
    g = torch.Generator().manual_seed(0)
    caches = [KVCache(1, HEADS, cache_slots(P, steps, window), D, window=window)
              for _ in range(LAYERS)]  # fmt: skip
    for cache in caches:
        for chunk in range(0, P, WINDOW):  # a windowed cache takes a window at a time
            n = min(WINDOW, P - chunk)
            cache.append(*(torch.randn(1, HEADS, n, D, generator=g) for _ in range(2)))
    layer_masks = [mask() for _ in range(LAYERS)]  # as each layer holds its own
    new = [torch.randn(3, 1, HEADS, 1, D, generator=g) for _ in range(steps)]
    fresh_tile_maps()
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
    fresh_tile_maps()
    t0 = time.perf_counter()
    with torch.no_grad():
        for t in range(steps):
            logits, _ = model(token, start=start + t, caches=caches)
            token = logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) / steps * 1e3


def batch_decode_ms(model: CausalLM, prompt: torch.Tensor, padding: torch.Tensor | None,
                    steps: int, repeats: int) -> float:  # fmt: skip
    """ms per decoding step of ``generate`` on a batch: the best time for steps + 1 new tokens
    minus the best for 1 (which is the prompt's pass and the first token)."""

    def best(n: int) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.generate(prompt, max_new_tokens=n, temperature=0.0, prompt_padding=padding)
            times.append(time.perf_counter() - t0)
        return min(times)

    return (best(steps + 1) - best(1)) / steps * 1e3


def ragged_table(prompts: list[int], steps: int, repeats: int, where: str) -> Table:
    """A batch of 4 prompts, equal or of lengths P, 3P/4, P/2, P/4 (left-padded)."""
    table = Table(
        title=f"CausalLM batch of 4, ms per decoding step (d_model 512, {HEADS} heads, "
        f"{LAYERS} layers, rope, causal; {where} x {steps} steps)"
    )
    for col in ("prompt", "batch", "tiled", "auto", "tiled / auto"):
        table.add_column(col, justify="left" if col == "batch" else "right")
    for P in prompts:
        padding = torch.zeros(4, P, dtype=torch.bool)
        for b in range(1, 4):
            padding[b, : P * b // 4] = True
        for name, pads in (("equal lengths", None), ("ragged, left-padded", padding)):
            ms = {}
            for backend in ("tiled", "auto"):
                torch.manual_seed(0)
                model = CausalLM(
                    1000, d_model=512, nhead=HEADS, num_layers=LAYERS, max_len=P + steps + 1,
                    positions="rope", backend=backend,
                ).eval()  # fmt: skip
                prompt = torch.randint(0, 1000, (4, P))
                ms[backend] = batch_decode_ms(model, prompt, pads, steps, repeats)
            ratio = f"{ms['tiled'] / ms['auto']:.2f}x"
            table.add_row(str(P), name, f"{ms['tiled']:.2f}", f"{ms['auto']:.2f}", ratio)
    return table


def module_step_ms(module: torch.nn.Module, filled: KVCache, steps: int) -> float:
    """Milliseconds per step of ``steps`` one-token calls from a cache filled to the prompt."""
    cache = copy.deepcopy(filled)
    x = torch.randn(steps, 1, 1, module.embed_dim, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    with torch.no_grad():
        for t in range(steps):
            module(x[t], cache=cache)
    return (time.perf_counter() - t0) / steps * 1e3


def unsplit_ms(module: torch.nn.Module, filled: KVCache, steps: int) -> float:
    """``module_step_ms`` with each forward unit's keys on one thread (no ``kv_splits``)."""
    with mock.patch.object(cpu_kernel, "SPLIT_KV", False):
        return module_step_ms(module, filled, steps)


def latent_table(prompts: list[int], steps: int, repeats: int, where: str) -> Table:
    """MHA against MLA, one layer, B = 1, caches filled with random keys (no prefill)."""
    E, H, R, ROPE = 2048, 16, 512, 64
    table = Table(
        title=f"one attention layer per decoding step, ms (E={E}, {H} heads; MLA kv_rank {R}, "
        f"rope_dim {ROPE}; {where} x {steps} steps)"
    )
    columns = ("prompt", "cached floats/token", "MHA", "MLA", "MLA unsplit", "MHA / MLA")
    for col in (*columns, "split gain"):
        table.add_column(col, justify="right")
    torch.manual_seed(0)
    mha = MultiHeadAttention(E, H, mask=masks.causal(), rope=RotaryEmbedding(E // H)).eval()
    mla = MultiHeadLatentAttention(E, H, kv_rank=R, nope_dim=128, rope_dim=ROPE, v_dim=128)
    g = torch.Generator().manual_seed(0)
    for P in prompts:
        mha_cache = KVCache(1, H, P + steps, E // H)
        mha_cache.append(*(torch.randn(1, H, P, E // H, generator=g) for _ in range(2)))
        mla_cache = mla.new_cache(1, P + steps)
        mla_cache.append(torch.randn(1, 1, P, R + ROPE, generator=g), torch.empty(1, 1, P, 0))
        runs = {
            "MHA": functools.partial(module_step_ms, mha, mha_cache, steps),
            "MLA": functools.partial(module_step_ms, mla.eval(), mla_cache, steps),
            "MLA unsplit": functools.partial(unsplit_ms, mla.eval(), mla_cache, steps),
        }
        ms = best_of(repeats, runs)
        floats = f"{2 * E} vs {R + ROPE}"
        cells = [f"{ms[b]:.2f}" for b in ("MHA", "MLA", "MLA unsplit")]
        ratios = (ms["MHA"] / ms["MLA"], ms["MLA unsplit"] / ms["MLA"])
        table.add_row(str(P), floats, *cells, *(f"{r:.2f}x" for r in ratios))
    return table


def best_of(repeats: int, runs: dict[str, Callable[[], float]]) -> dict[str, float]:
    """The fastest of ``repeats`` interleaved runs of each backend's timing function."""
    times: dict[str, list[float]] = {b: [] for b in runs}
    for _ in range(repeats):
        for backend, run in runs.items():
            times[backend].append(run())
    return {b: min(ts) for b, ts in times.items()}


def add_row(table: Table, P: int, name: str, ms: dict[str, float]) -> None:
    """A row of ``new_table``: its backends' ms, then each one's time / tiled's."""
    backends = [c.header for c in table.columns[2:] if "/" not in str(c.header)]
    cells = [f"{ms[b]:.2f}" if b in ms else "—" for b in backends]
    ratios = [f"{ms[b] / ms['tiled']:.2f}x" if b in ms else "—" for b in backends[1:]]
    table.add_row(str(P), name, *cells, *ratios)


def new_table(title: str, backends: tuple[str, ...] = ("tiled", "sdpa", "auto")) -> Table:
    """Columns prompt, mask, ms per backend (tiled first), and each other's time / tiled's."""
    table = Table(title=title)
    ratios = [f"{b} / tiled" for b in backends[1:]]
    for col in ("prompt", "mask", *backends, *ratios):
        table.add_column(col, justify="left" if col == "mask" else "right")
    return table


def backends_for(case: str, extra: tuple[str, ...] = ()) -> list[str]:
    """SDPA only where one query sees every key it is given, so it runs unmasked: causal, and
    a window over a cache that holds just the window."""
    sees_all = case == "causal" or CASES[case][1] is not None
    return ["tiled", *extra, "sdpa", "auto"] if sees_all else ["tiled", *extra, "auto"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, nargs="*", default=[512, 2048])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--tables",
        nargs="*",
        default=["attention", "model", "ragged", "latent", "gqa"],
        help="which to run",
    )
    args = ap.parse_args()
    console = Console(width=140)
    where = f"{torch.get_num_threads()} threads, fp32, best of {args.repeats}"
    if "attention" in args.tables:
        console.print(attention_table(args.prompts, args.steps, args.repeats, where))
    if "model" in args.tables:
        console.print(model_table(args.prompts, args.steps, args.repeats, where))
    if "ragged" in args.tables:
        console.print(ragged_table(args.prompts, args.steps, args.repeats, where))
    if "latent" in args.tables:
        console.print(latent_table(args.prompts, args.steps, args.repeats, where))
    if "gqa" in args.tables:
        console.print(gqa_table(args.prompts, args.steps, args.repeats, where))


def attention_table(prompts: list[int], steps: int, repeats: int, where: str) -> Table:
    """Attention alone over LAYERS caches, every case and backend."""
    table = new_table(
        f"attention per decoding step, ms ({LAYERS} layers, {HEADS} heads, D={D}; {where} "
        f"x {steps} steps)",
        ("tiled", TILE_MAPS, "sdpa", "auto"),
    )
    for P in prompts:
        for case in CASES:
            runs = {
                b: functools.partial(attention_ms, b, case, P, steps)
                for b in backends_for(case, (TILE_MAPS,))
            }
            add_row(table, P, case, best_of(repeats, runs))
    return table


def model_table(prompts: list[int], steps: int, repeats: int, where: str) -> Table:
    """A whole CausalLM (B = 1), every case and backend."""
    table = new_table(
        f"CausalLM decoding, ms per token (d_model 512, {HEADS} heads, {LAYERS} layers; "
        f"{where} x {steps} steps)"
    )
    for P in prompts:
        for case, (mask, window) in CASES.items():
            runs = {}
            for backend in backends_for(case):
                torch.manual_seed(0)
                model = CausalLM(
                    1000, d_model=512, nhead=HEADS, num_layers=LAYERS,
                    max_len=P + steps + 1, mask=mask(), backend=backend,
                ).eval()  # fmt: skip
                caches = model.new_caches(1, cache_slots(P, steps, window), window=window)
                prompt = torch.randint(0, 1000, (1, P))
                chunk = P if window is None else window  # as CausalLM.generate feeds it
                with torch.no_grad():
                    for c in range(0, P, chunk):
                        model(prompt[:, c : c + chunk], start=c, caches=caches)
                runs[backend] = functools.partial(decode_ms, model, caches, P, steps)
            add_row(table, P, case, best_of(repeats, runs))
    return table


GQA_HQ, GQA_HKV, GQA_D, GQA_WINDOW = 32, 8, 128, 1024


def gqa_step_ms(
    backend: str, mask: Mask, L: int, steps: int, pack: bool = True, band: bool = True
) -> float:
    """ms per call of one query over caches of L - steps + 1 … L keys in turn.

    ``pack``: ``cpu_kernel.PACK_GQA``; ``band``: ``tiled.BAND_IN_KERNEL`` (without, each new
    length builds a tile map).
    """
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, GQA_HQ, 1, GQA_D, generator=gen)
    k, v = (torch.randn(1, GQA_HKV, L, GQA_D, generator=gen) for _ in range(2))
    lengths = range(L - steps + 1, L + 1)
    with (
        mock.patch.object(cpu_kernel, "PACK_GQA", pack),
        mock.patch.object(tiled, "BAND_IN_KERNEL", band),
        torch.no_grad(),
    ):
        attnkit.attention(q, k, v, mask=mask, backend=backend)  # warm-up
        fresh_tile_maps()
        start = time.perf_counter()
        for n in lengths:
            attnkit.attention(q, k[:, :, :n], v[:, :, :n], mask=mask, backend=backend)
        return (time.perf_counter() - start) / len(lengths) * 1e3


def gqa_table(prompts: list[int], steps: int, repeats: int, where: str) -> Table:
    """GQA decoding: tiled packed, unpacked and walking tile maps, SDPA, auto (ms per call)."""
    table = Table(
        title=f"GQA decoding, {GQA_HQ} query / {GQA_HKV} kv heads, D={GQA_D}, ms per call, {where}"
    )
    columns = ("cache", "mask", "tiled", "tiled unpacked", "tiled, tile maps", "sdpa", "auto")
    columns = (*columns, "pack gain", "band gain")
    for col in (*columns, "sdpa / tiled"):
        table.add_column(col, justify="left" if col == "mask" else "right")
    for L in prompts:
        for name, make in (("causal", masks.causal), ("sliding_window(1024)", _gqa_window)):
            run = functools.partial(gqa_step_ms, mask=make(), L=L, steps=steps)
            ms = best_of(
                repeats,
                {
                    "tiled": functools.partial(run, "tiled"),
                    "unpacked": functools.partial(run, "tiled", pack=False),
                    "maps": functools.partial(run, "tiled", band=False),
                    "sdpa": functools.partial(run, "sdpa"),
                    "auto": functools.partial(run, "auto"),
                },
            )
            cells = [f"{ms[b]:.2f}" for b in ("tiled", "unpacked", "maps", "sdpa", "auto")]
            gains = [ms[b] / ms["tiled"] for b in ("unpacked", "maps", "sdpa")]
            table.add_row(str(L), name, *cells, *(f"{g:.2f}x" for g in gains))
    return table


def _gqa_window() -> Mask:
    return masks.sliding_window(GQA_WINDOW)


if __name__ == "__main__":
    main()
