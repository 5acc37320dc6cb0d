"""A transformers model on CPU run with attn_implementation="attnkit" against its own "sdpa".

A Llama-shaped causal LM (random weights, fp32, batch 1), or Mistral with ``--window`` (a
sliding window on every layer, which transformers hands its attention as a bool mask), or
with ``--encoder`` BERT on a right-padded batch of 4 (a bool padding mask), timed as a whole:
attention, MLPs, norms and embeddings, so the ratio is the one a user of the model sees.
Three steps per length, in milliseconds: a prefill forward without gradients, a training step
(forward, then backward of the mean output), and a decoding step (one new token over the
prompt's cache, dropped again after the step; Mistral's windowed cache keeps just its window,
so each step there costs the same; none for the encoder). The implementations:

- ``sdpa``: transformers' SDPA path (torch's fused kernels; a bool mask where there is one);
- ``attnkit``: ``register()``'s function with ``backend="auto"`` (what a user gets);
- ``attnkit tiled``: the same forced onto the tiled flash kernels.

The logits of each are checked against sdpa's before timing; the implementations take turns
for ``--rounds`` rounds and each keeps its best median.

    python benchmarks/cpu_transformers.py [--lengths 1024 2048 4096] [--window 0] [--encoder]
        [--layers 2] [--width 512] [--heads 8] [--kv-heads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

import torch
import transformers
from rich.console import Console
from rich.table import Table
from torch.utils import benchmark

from attnkit.integrations.transformers import register

IMPLEMENTATIONS = {
    "sdpa": "sdpa",
    "attnkit": register("attnkit"),
    "attnkit tiled": register("attnkit_tiled", backend="tiled"),
}


def model_for(args: argparse.Namespace) -> Any:  # a transformers PreTrainedModel
    """A causal LM of the requested shape; Mistral with a sliding window when one is asked;
    BERT for ``--encoder``."""
    if args.encoder:
        bert = transformers.BertConfig(
            vocab_size=1024,
            hidden_size=args.width,
            intermediate_size=2 * args.width,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            max_position_embeddings=max(args.lengths),
        )
        torch.manual_seed(0)
        encoder: Any = transformers.BertModel(bert)
        return encoder.eval()
    sizes = {
        "vocab_size": 1024,
        "hidden_size": args.width,
        "intermediate_size": 2 * args.width,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "max_position_embeddings": max(args.lengths),
    }
    config = (
        transformers.MistralConfig(sliding_window=args.window, **sizes)
        if args.window
        else transformers.LlamaConfig(**sizes)
    )
    torch.manual_seed(0)
    model: Any = transformers.AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    return model.eval()


def ms(fn: Callable[[], object]) -> float:
    return (
        benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=1.0).median * 1e3
    )


def best_of_rounds(
    model: Any, steps: dict[str, Callable[[], Any]], rounds: int
) -> dict[str, dict[str, float]]:
    """ms of each step by implementation: the best of ``rounds`` rounds, implementations taking
    turns within each (interleaved: this VM's speed drifts between runs)."""
    times: dict[str, dict[str, float]] = {step: {} for step in steps}
    for _ in range(rounds):
        for name, implementation in IMPLEMENTATIONS.items():
            model.set_attn_implementation(implementation)
            for step, fn in steps.items():
                times[step][name] = min(times[step].get(name, float("inf")), ms(fn))
    return times


def timings(model: Any, ids: torch.Tensor, rounds: int) -> dict[str, dict[str, float]]:
    """ms per prefill and per training step, by implementation, the best of ``rounds`` rounds;
    the logits are checked against sdpa's first."""

    def prefill() -> torch.Tensor:
        with torch.no_grad():
            logits: torch.Tensor = model(ids).logits
        return logits

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        model(ids).logits.mean().backward()

    with torch.no_grad():
        prompt = model(ids, use_cache=True)
    prompt_cache, next_id = prompt.past_key_values, prompt.logits[:, -1:].argmax(-1)
    cache = copy.deepcopy(prompt_cache)  # the one the timed steps use
    windowed = bool(getattr(model.config, "sliding_window", None))

    def decode(cache: Any) -> torch.Tensor:
        with torch.no_grad():
            logits: torch.Tensor = model(next_id, cache=cache).logits
        if not windowed:  # a windowed cache cannot drop a step, but keeps just its window
            cache.crop(-1)
        return logits

    steps: dict[str, Callable[[], Any]] = {
        "prefill": prefill,
        "train step": train_step,
        "decode": lambda: decode(cache),
    }
    expected = None
    for implementation in IMPLEMENTATIONS.values():
        model.set_attn_implementation(implementation)
        logits = torch.cat([prefill(), decode(copy.deepcopy(prompt_cache))], dim=1)
        expected = logits if expected is None else expected
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    return best_of_rounds(model, steps, rounds)


def encoder_timings(
    model: Any, ids: torch.Tensor, attention_mask: torch.Tensor, rounds: int
) -> dict[str, dict[str, float]]:
    """ms per forward and per training step of an encoder on a padded batch, as ``timings``;
    the hidden states of real tokens are checked against sdpa's first."""
    real = attention_mask.bool()

    def forward() -> torch.Tensor:
        with torch.no_grad():
            hidden: torch.Tensor = model(ids, attention_mask=attention_mask).last_hidden_state
        return hidden[real]

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        model(ids, attention_mask=attention_mask).last_hidden_state[real].mean().backward()

    expected = None
    for implementation in IMPLEMENTATIONS.values():
        model.set_attn_implementation(implementation)
        hidden = forward()
        expected = hidden if expected is None else expected
        torch.testing.assert_close(hidden, expected, rtol=1e-4, atol=1e-4)
    steps = {"forward": forward, "train step": train_step}
    return best_of_rounds(model, steps, rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--window", type=int, default=0, help="Mistral's sliding window; 0: Llama")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best counts")
    ap.add_argument(
        "--encoder", action="store_true", help="BERT on a batch of 4 padded to 1, 3/4, 1/2, 1/4"
    )
    args = ap.parse_args()
    model = model_for(args)
    if args.encoder:
        kind, heads, batch = "BERT, bidirectional, padded", f"{args.heads} heads", "batch 4"
    else:
        kind = f"Mistral, sliding window {args.window}" if args.window else "Llama, causal"
        heads, batch = f"{args.heads} heads ({args.kv_heads} kv)", "batch 1"
    table = Table(
        title=(
            f"{kind}: {args.layers} layers, width {args.width}, {heads} of "
            f"{args.width // args.heads}, fp32, {batch}, {torch.get_num_threads()} threads; "
            "ms per call"
        )
    )
    table.add_column("tokens", justify="right")
    table.add_column("step")
    for name in IMPLEMENTATIONS:
        table.add_column(name, justify="right")
    for name in list(IMPLEMENTATIONS)[1:]:
        table.add_column(f"sdpa / {name}", justify="right")
    for L in args.lengths:
        g = torch.Generator().manual_seed(L)
        if args.encoder:  # right padding, as BERT's tokenizers pad
            ids = torch.randint(0, 1024, (4, L), generator=g)
            lengths = torch.tensor([L, 3 * L // 4, L // 2, L // 4])
            attention_mask = (torch.arange(L) < lengths[:, None]).long()
            results = encoder_timings(model, ids, attention_mask, args.rounds)
        else:
            ids = torch.randint(0, 1024, (1, L), generator=g)
            results = timings(model, ids, args.rounds)
        for step, by_name in results.items():
            table.add_row(
                str(L),
                step,
                *(f"{t:.1f}" for t in by_name.values()),
                *(f"{by_name['sdpa'] / t:.2f}x" for t in list(by_name.values())[1:]),
            )
    Console().print(table)


if __name__ == "__main__":
    main()
