"""Generation over a context sharded across P processes (context / sequence parallelism).

    torchrun --nproc-per-node 2 examples/sharded_generation.py --prompt 8192 --new 16
    torchrun --nproc-per-node 2 examples/sharded_generation.py --prompt 8192 --translate

``lm.generate(prompt, ..., group=dist.group.WORLD)`` on every rank, with the same prompt:
rank r feeds its share of the prompt (ring attention across the ranks) into its own
``ShardedKVCache`` per layer, then every rank decodes the same tokens, the last rank storing
their keys and values, attention merging every rank's run. A random model (RoPE, grouped
heads), the same on every rank. Prints the time to the first token and per new token (the
best of ``--repeat`` runs), and on rank 0 whether the tokens are those ``lm.generate`` picks
in one process holding the whole cache (timed there too).

``--translate``: an encoder-decoder ``Transformer`` instead, its source ``--prompt`` tokens
long. ``model.generate(src, ..., group=)``: rank r encodes its share of the source (ring
attention in the encoder) and keeps that part of the memory and of every decoder layer's
cross-attention keys and values; every rank decodes the same tokens, cross-attention merging
every rank's part.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from _torchrun import join  # (this folder's; torchrun puts it on sys.path)
from attnkit.nn import CausalLM, Transformer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=8192, help="prompt tokens (any length)")
    ap.add_argument("--new", type=int, default=16, help="tokens to generate (at least 2)")
    ap.add_argument("--beams", type=int, default=1, help="beam search with this many beams")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4, help="layers (encoder and decoder each)")
    ap.add_argument("--repeat", type=int, default=3, help="timings: the best of this many runs")
    ap.add_argument(
        "--translate", action="store_true", help="a Transformer with a --prompt-token source"
    )
    args = ap.parse_args()
    if args.new < 2:
        raise SystemExit("--new must be at least 2 (the first token is timed apart)")

    backend, rank, world, device = join()

    torch.manual_seed(0)  # the same model and prompt on every rank
    sizes = {"d_model": args.d_model, "nhead": 8, "num_kv_heads": 2, "positions": "rope"}
    max_len = args.prompt + args.new
    model: CausalLM | Transformer
    if args.translate:
        layers = {"num_encoder_layers": args.layers, "num_decoder_layers": args.layers}
        model = Transformer(1000, 1000, **sizes, **layers, max_len=max_len)
    else:
        model = CausalLM(1000, **sizes, num_layers=args.layers, max_len=max_len)
    model = model.to(device).eval()
    prompt = torch.randint(3, 1000, (1, args.prompt), device=device)  # (0-2: pad, bos, eos)

    def generate(text: torch.Tensor, new: int, group: dist.ProcessGroup | None) -> torch.Tensor:
        if isinstance(model, Transformer):  # the translation, bos first, without the source
            return model.generate(
                text, bos_id=1, eos_id=2, max_len=new, num_beams=args.beams, group=group
            )
        return model.generate(
            text, max_new_tokens=new, temperature=0, num_beams=args.beams, group=group
        )

    def timed(
        new: int, group: dist.ProcessGroup | None, text: torch.Tensor = prompt, repeat: int = 1
    ) -> tuple[torch.Tensor, float]:
        best = float("inf")
        for _ in range(repeat):
            if group is not None:
                dist.barrier()
            begin = time.perf_counter()
            out = generate(text, new, group)
            if device is not None:
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - begin)
        return out, best

    warm_up = prompt[:, : 64 * world]  # loads the kernels, starts the thread pools
    timed(2, dist.group.WORLD, warm_up)
    _, first = timed(1, dist.group.WORLD, repeat=args.repeat)
    tokens, whole = timed(args.new, dist.group.WORLD, repeat=args.repeat)
    if rank == 0:
        timed(2, None, warm_up)
        alone, one = timed(args.new, None, repeat=args.repeat)
        kind = "translation (source" if args.translate else "generation (prompt"
        made = tokens.shape[1] - (0 if args.translate else args.prompt)  # (an end token stops)
        print(
            f"sharded {kind}={args.prompt}), P={world} ({backend}), "
            f"new={args.new} (made {made}), beams={args.beams}, d_model={args.d_model}, "
            f"layers={args.layers}, heads=8/2"
        )
        per_token = (whole - first) / max(made - 1, 1)
        print(f"  first token: {first:.2f} s; then {per_token * 1e3:.1f} ms per token")
        print(f"  one process, model.generate: {one:.2f} s in all ({whole:.2f} s sharded)")
        print(f"  tokens match one process: {torch.equal(tokens, alone)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
