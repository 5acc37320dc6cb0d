"""A CausalLM generating over a KV cache sharded across P processes (context parallelism).

    torchrun --nproc-per-node 2 examples/sharded_generation.py --prompt 8192 --new 16

Each rank feeds its equal chunk of the prompt (ring attention across the ranks) into its own
``ShardedKVCache`` per layer; then every rank decodes the same greedy tokens, the last rank
storing their keys and values, attention merging every rank's run. A random model (RoPE,
grouped heads), the same on every rank. Prints the time to the first token and per new token,
each rank's cache memory, whether the tokens are those ``lm.generate`` picks in one process
holding the whole cache (timed there too), and the last step's logits' error against the
model's full pass.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from attnkit.nn import CausalLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=8192, help="prompt tokens (split over ranks)")
    ap.add_argument("--new", type=int, default=16, help="tokens to generate")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = None
    if backend == "nccl":  # one GPU per rank
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if args.prompt % world:
        raise SystemExit(f"--prompt {args.prompt} must split into {world} equal chunks")
    n = args.prompt // world

    torch.manual_seed(0)  # the same model and prompt on every rank
    lm = CausalLM(
        1000, d_model=args.d_model, nhead=8, num_kv_heads=2, num_layers=args.layers,
        positions="rope", max_len=args.prompt + args.new,
    ).to(device).eval()  # fmt: skip
    prompt = torch.randint(0, 1000, (1, args.prompt), device=device)

    def sync() -> None:
        if device is not None:
            torch.cuda.synchronize(device)

    with torch.no_grad():
        dist.barrier()
        begin = time.perf_counter()
        caches = lm.new_sharded_caches(1, n + args.new, kv_start=rank * n)
        logits, _ = lm(prompt[:, rank * n : (rank + 1) * n], start=rank * n, caches=caches)
        token = logits[:, -1:].argmax(-1)
        dist.broadcast(token, src=world - 1)  # the last chunk's logits choose the first token
        for cache in caches:
            cache.start_decoding()
        sync()
        first = time.perf_counter() - begin
        tokens = [token]
        begin = time.perf_counter()
        for _ in range(args.new - 1):
            logits, _ = lm(token, start=caches[0].position, caches=caches)
            token = logits[:, -1:].argmax(-1)
            tokens.append(token)
        sync()
        per_token = (time.perf_counter() - begin) / max(args.new - 1, 1)
        held = torch.tensor([sum(c.keys.nbytes + c.values.nbytes for c in caches)], device=device)
        everyone = [torch.zeros_like(held) for _ in range(world)]
        dist.all_gather(everyone, held)
        if rank == 0:
            begin = time.perf_counter()
            alone = lm.generate(prompt, max_new_tokens=args.new, temperature=0)
            sync()
            one = time.perf_counter() - begin
            same = torch.equal(alone[:, args.prompt :], torch.cat(tokens, dim=1))
            # the last step's logits against the model's full pass over the same text
            text = torch.cat([prompt, *tokens[:-1]], dim=1)
            err = (logits[:, -1] - lm(text)[0][:, -1]).abs().max().item()
            mib = ", ".join(f"{int(x) / 2**20:.1f}" for x in everyone)
            print(
                f"sharded generation, P={world} ({backend}), prompt={args.prompt}, "
                f"new={args.new}, d_model={args.d_model}, layers={args.layers}, heads=8/2"
            )
            print(f"  first token: {first:.2f} s; then {per_token * 1e3:.1f} ms per token")
            print(f"  one process, lm.generate: {one:.2f} s in all")
            print(f"  cache per rank: {mib} MiB")
            print(f"  tokens match one process: {same}")
            print(f"  max |last logits - one process's full pass|: {err:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
