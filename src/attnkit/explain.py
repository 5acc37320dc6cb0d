"""``attnkit explain``: which words each head of a real model attends to, and how Q, K, V get there.

The model is all-MiniLM-L6-v2 (6 layers × 12 heads, width 384), run through attnkit's own
modules, or a checkpoint of one's own (``--checkpoint``): a CausalLM's self-attention (e.g.
from examples/tiny_lm.py), or a Transformer's cross-attention while it translates (its
decoder's queries over the source, e.g. from examples/translate_dates.py).
Output goes through rich; pictures through ``attnkit.viz``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeGuard, cast

import torch
from torch import Tensor

from attnkit import masks
from attnkit.masks import Mask
from attnkit.models.bert import BertLayer, EncoderOutput
from attnkit.models.pretrained import Encoding, PretrainedEncoder
from attnkit.nn import CausalLM, MultiHeadAttention, Transformer
from attnkit.nn.checkpoint import Checkpoint

DEFAULT_TEXT = "The skilled surgeon operated on the patient with a"


class UsageError(ValueError):
    """Bad input from the command line: reported on stderr with exit code 2."""


# ---- sparse pattern specs -----------------------------------------------------------------

_PATTERNS: dict[str, Any] = {
    "causal": lambda: masks.causal(),
    "sliding_window": lambda left, right=0: masks.sliding_window(left, right),
    "dilated": lambda window, dilation: masks.dilated(window, dilation),
    "strided": lambda stride: masks.strided(stride),
    "fixed": lambda block, summary=1: masks.fixed(block, summary),
    "global": lambda *idx: masks.global_tokens(list(idx)),
    "bigbird": lambda block, window=3, glob=1, rand=1: masks.bigbird(block, window, glob, rand),
    "prefix_lm": lambda n: masks.prefix_lm(n),
}


def parse_mask(spec: str, option: str = "--sparse") -> Mask:
    """Parse ``name[:a,b]`` terms joined by ``+`` (union), e.g. ``sliding_window:2,2+global:0``.

    Arguments are those of the ``attnkit.masks`` function of that name (``global`` is
    ``global_tokens``). Errors name the command-line ``option`` the spec came from.
    """
    result: Mask | None = None
    for term in spec.split("+"):
        name, _, args = term.strip().partition(":")
        if name not in _PATTERNS:
            raise UsageError(f"unknown pattern {name!r} in {option}; known: {', '.join(_PATTERNS)}")
        try:
            values = [int(a) for a in args.split(",")] if args else []
            mask: Mask = _PATTERNS[name](*values)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"bad arguments in {option} {term!r}: {exc}") from exc
        result = mask if result is None else result | mask
    assert result is not None
    return result


# ---- running the model ----------------------------------------------------------------------


@dataclass
class Run:
    """One pass of the model over a text.

    ``text`` and ``char_level`` matter for character-level checkpoints, where a word is found
    in the text rather than among the tokens; ``next_tokens`` is a language model's top
    predictions for the token after the text, [(token, probability), ...]; ``sinks`` says the
    model has attention sinks, so a row's weights sum to 1 minus the sink's share;
    ``differential`` that its weights are differential maps A1 − λ·A2, rows summing to 1 − λ.
    ``query_tokens``: a translation's cross-attention, the decoder's tokens (each the one it
    wrote at that step) attending over ``tokens``, the source; None: self-attention.
    ``ended``: the translation's last query token is its end token (whatever it is called).
    ``vectors``: the queries, keys and values the maps came from (and a causal LM's mask),
    where the run keeps them (a checkpoint's), for the neuron view and ``--steps``.
    """

    encoding: Encoding
    output: EncoderOutput
    text: str = ""
    char_level: bool = False
    next_tokens: list[tuple[str, float]] = field(default_factory=list)
    sinks: bool = False
    differential: bool = False
    query_tokens: list[str] | None = None
    ended: bool = False
    vectors: dict[str, Tensor] | None = None

    @property
    def tokens(self) -> list[str]:
        """Readable tokens, [CLS] ... [SEP] (the keys; a translation's source)."""
        return self.encoding.tokens

    @property
    def queries(self) -> list[str]:
        """The tokens whose rows the maps are: ``query_tokens``, else ``tokens``."""
        return self.tokens if self.query_tokens is None else self.query_tokens

    def attention(self, layer: int) -> Tensor:
        """(H, Lq, Lk) probabilities of ``layer``."""
        return self.output.attentions[layer][0]


def run(
    model: PretrainedEncoder, text: str, *, mask: Mask | None = None, truncate: bool = False
) -> Run:
    """Tokenise ``text`` and run the model with attentions (optionally under a sparse mask)."""
    try:
        enc = model.tokenize(text, truncate=truncate)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    with torch.no_grad():
        out = model(enc.ids, mask=mask, output_attentions=True)
    return Run(enc, out)


def run_checkpoint(ckpt: Checkpoint, text: str, *, truncate: bool = False) -> Run:
    """Tokenise ``text`` with a checkpoint's vocabulary and run it with attentions.

    A CausalLM reads the text (self-attention); a Transformer translates it, and the run is its
    decoder's cross-attention over the text while it writes the translation (greedy). A
    vocabulary of single characters (besides a Transformer's ``<pad>``, ``<bos>`` and
    ``<eos>``) tokenises by character, any other by whitespace.
    """
    model, vocab = ckpt.model, ckpt.vocab
    if not vocab:
        raise UsageError(
            "explain --checkpoint takes a checkpoint saved with its vocabulary "
            "(save_checkpoint(..., vocab=...), as examples/tiny_lm.py and translate_dates.py do)"
        )
    if isinstance(model, Transformer):
        return _run_translation(model, vocab, ckpt.meta, text, truncate)
    ids, pieces, encoding, char_level = _tokenise(vocab, set(), text, model.max_len, truncate)
    with torch.no_grad():
        logits, weights = model(ids, need_weights=True)
    probs, top = logits[0, -1].softmax(-1).topk(min(5, len(vocab)))
    return Run(
        encoding,
        EncoderOutput(logits, attentions=list(weights)),
        text="".join(pieces) if char_level else " ".join(pieces),
        char_level=char_level,
        next_tokens=[(_show(vocab[i]), float(w)) for i, w in zip(top, probs, strict=True)],
        sinks=bool(model.config.get("sinks")),
        differential=bool(model.config.get("differential")),
    )


def _tokenise(
    vocab: list[str], special: set[str], text: str, max_len: int, truncate: bool
) -> tuple[Tensor, list[str], Encoding, bool]:
    """ids (1, L), the pieces, their Encoding and whether by character (``special`` aside)."""
    char_level = all(len(t) == 1 for t in vocab if t not in special)
    pieces = list(text) if char_level else text.split()
    index = {t: i for i, t in enumerate(vocab) if t not in special}
    unknown = sorted({p for p in pieces if p not in index})
    if unknown:
        raise UsageError(f"not in the checkpoint's vocabulary: {' '.join(map(repr, unknown))}")
    if not pieces:
        raise UsageError("the text is empty")
    truncated = len(pieces) > max_len
    if truncated and not truncate:
        raise UsageError(
            f"the text has {len(pieces)} tokens, the model at most {max_len}; "
            "pass --truncate to cut it"
        )
    pieces = pieces[:max_len]
    words: list[int | None] = []
    n = 0
    for p in pieces:  # a word index per token; spaces belong to no word
        if char_level and p.isspace():
            words.append(None)
            n += 1
        else:
            words.append(n if char_level else len(words))
    ids = torch.tensor([[index[p] for p in pieces]])
    encoding = Encoding(ids, [_show(p) for p in pieces], words, truncated)
    return ids, pieces, encoding, char_level


#: a Transformer checkpoint's special tokens, by name in its vocabulary (or ``meta``'s ids)
_SPECIAL = {"bos_id": "<bos>", "eos_id": "<eos>"}


def _run_translation(
    model: Transformer, vocab: list[str], meta: dict[str, Any], text: str, truncate: bool
) -> Run:
    """Translate ``text`` greedily; the run is the cross-attention of every decoder step."""
    ids_of = {}
    for key, name in _SPECIAL.items():
        found = meta.get(key, vocab.index(name) if name in vocab else None)
        if not isinstance(found, int) or not 0 <= found < len(vocab):
            raise UsageError(
                f"a Transformer checkpoint's vocabulary must hold {name!r} (or its meta "
                f"{key!r}): explain starts the translation with <bos> and ends it at <eos>"
            )
        ids_of[key] = found
    bos, eos = ids_of["bos_id"], ids_of["eos_id"]
    special = {vocab[bos], vocab[eos], vocab[model.pad_id]}
    max_len = int(model.config["max_len"])
    src, pieces, encoding, char_level = _tokenise(vocab, special, text, max_len, truncate)
    with torch.no_grad():
        written = model.generate(src, bos_id=bos, eos_id=eos, max_len=max_len)[0].tolist()
    if eos in written:
        written = written[: written.index(eos) + 1]
    decoder_input = torch.tensor([[bos, *written[:-1]]])  # step t reads token t - 1
    found = decoder_cross_attention(model, src, decoder_input)
    plain = all(_plain_softmax(layer.cross_attn) for layer in model.decoder)
    return Run(
        encoding,
        EncoderOutput(found.logits, attentions=[w[None] for w in found.weights]),
        text="".join(pieces) if char_level else " ".join(pieces),
        char_level=char_level,
        sinks=bool(model.config.get("sinks")),
        query_tokens=[_show(vocab[t]) for t in written],
        ended=written[-1] == eos,
        vectors=found.vectors if plain else None,
    )


def _plain_softmax(attention: object) -> TypeGuard[MultiHeadAttention]:
    """Whether ``attention`` computes softmax(q·kᵀ/√d)·v, as the neuron view draws it.

    A ``MultiHeadAttention`` without score mods (ALiBi), sinks or another scale: its
    ``heads`` then give its weights, which ``--steps`` checks.
    """
    return (
        isinstance(attention, MultiHeadAttention)
        and attention.score_mod is None
        and attention.sinks is None
        and attention.scale is None
    )


class CrossAttention(NamedTuple):
    """A decoder's pass over one source: what ``decoder_cross_attention`` returns."""

    logits: Tensor  # (1, T, V)
    weights: list[Tensor]  # per layer (H, T, S)
    vectors: dict[str, Tensor]  # "q" (layers, H, T, d), "k" (layers, H, S, d), "v" (..., dv)


def decoder_cross_attention(
    model: Transformer, src: Tensor, decoder_input: Tensor
) -> CrossAttention:
    """Each decoder layer's cross-attention and the vectors it came from, for one source.

    Args:
        model: the encoder–decoder.
        src: (1, S) source ids.
        decoder_input: (1, T) what the decoder reads: <bos>, then the tokens written so far.

    Returns:
        the logits, the weights (H, T, S) per layer, and the queries, keys and values (kv
        heads repeated) that give them, for the neuron view.
    """
    attns = [cast(MultiHeadAttention, layer.cross_attn) for layer in model.decoder]
    inputs: list[tuple[Tensor, Tensor]] = []  # each cross-attention's queries' input, memory
    hooks = [a.register_forward_pre_hook(lambda _, args: inputs.append(args[:2])) for a in attns]
    try:
        with torch.no_grad():
            memory, padding = model.encode(src)
            logits, weights = model.decode(decoder_input, memory, padding, need_weights=True)
            heads = [a.heads(*args) for a, args in zip(attns, inputs, strict=True)]
    finally:
        for hook in hooks:
            hook.remove()
    return CrossAttention(logits, [w[0] for w in weights], _stacked(heads, attns[0]))


def _stacked(
    per_layer: list[tuple[Tensor, Tensor, Tensor]], attn: MultiHeadAttention
) -> dict[str, Tensor]:
    """Every layer's (q, k, v) of batch row 0 as {"q", "k", "v"}: (layers, H, L, d).

    Kv heads are repeated (``attn``'s grouping), as the neuron view takes them.
    """
    groups = attn.num_heads // attn.num_kv_heads
    return {
        name: torch.stack([t[n][0] if name == "q" else t[n][0].repeat_interleave(groups, 0)
                           for t in per_layer])
        for n, name in enumerate("qkv")
    }  # fmt: skip


def _show(token: str) -> str:
    return {" ": "␣", "\n": "⏎"}.get(token, token)


def choose_token(r: Run, word: str | None) -> int:
    """Index of the token to explain: the last occurrence of ``word``, or the last word.

    In a character-level run, a word's last character stands for it. In a translation the
    token is one the decoder wrote (default: the last before the end token).
    """
    if r.query_tokens is not None:
        written = r.query_tokens
        if word is None:
            return max(len(written) - 2, 0) if r.ended else len(written) - 1
        matches = [i for i, t in enumerate(written) if t.lower() == word.lower()]
        if not matches:
            raise UsageError(
                f"{word!r} is not a token of the translation; it wrote: {' '.join(written)}"
            )
        return matches[-1]
    tokens = r.tokens
    if word is None:
        candidates = [i for i, w in enumerate(r.encoding.words) if w is not None]
        return candidates[-1]
    if r.char_level and len(word) > 1:
        found = [m.end() - 1 for m in re.finditer(rf"\b{re.escape(word)}\b", r.text, re.I)]
        if not found:
            raise UsageError(f"word {word!r} is not in the text {r.text!r}")
        return found[-1]
    wanted = word.lower()
    matches = [i for i, t in enumerate(tokens) if t.lower() == wanted]
    if not matches:
        raise UsageError(f"word {word!r} is not a token of the text; tokens: {' '.join(tokens)}")
    return matches[-1]


def check_layer_head(r: Run, layer: int | None, head: int | None) -> None:
    """UsageError when a layer (negative: from the end) or head index is out of range."""
    n_layers, n_heads = len(r.output.attentions), r.attention(0).shape[0]
    if layer is not None and not -n_layers <= layer < n_layers:
        raise UsageError(
            f"layer {layer} is out of range: the model has layers 0..{n_layers - 1} "
            f"(-{n_layers}..-1 from the end)"
        )
    if head is not None and not 0 <= head < n_heads:
        raise UsageError(f"head {head} is out of range: the model has heads 0..{n_heads - 1}")


def top_attended(att: Tensor, i: int, k: int) -> list[list[tuple[int, float]]]:
    """Per head, the ``k`` keys token ``i`` attends to most: [(key index, weight), ...]."""
    weights, idx = att[:, i].topk(min(k, att.shape[-1]), dim=-1)
    return [
        list(zip(ix.tolist(), w.tolist(), strict=True)) for ix, w in zip(idx, weights, strict=True)
    ]


# ---- rich rendering -----------------------------------------------------------------------


def _fmt(t: Tensor, n: int = 6) -> str:
    vals = ", ".join(f"{x:+.2f}" for x in t[:n].tolist())
    return f"[{vals}{', …' if t.numel() > n else ''}]"


def render_tokens(r: Run, i: int) -> Any:
    """The tokens with their indexes; the explained one highlighted."""
    from rich.text import Text

    text = Text()
    if r.query_tokens is not None:
        text.append("source:      ", style="dim")
        for j, tok in enumerate(r.tokens):
            text.append(f"{j}:{tok}  ")
        text.append("\ntranslation: ", style="dim")  # each step labelled by the token it writes
    for j, tok in enumerate(r.queries):
        style = "bold reverse" if j == i else ("dim" if tok in ("[CLS]", "[SEP]") else "")
        text.append(f"{j}:{tok}", style=style)
        text.append("  ")
    return text


def render_heads(r: Run, i: int, layers: list[int], k: int, title: str = "") -> Any:
    """A table per layer: for each head, the words token ``i`` attends to most."""
    from rich.table import Table

    maps = ", differential maps A1 − λ·A2" if r.differential else ""
    what = (
        f"what {r.tokens[i]!r} (token {i}) attends to"
        if r.query_tokens is None
        else f"what {r.queries[i]!r} (output token {i}) attends to in the source"
    )
    table = Table(title=title or f"{what}, per head{maps}", show_lines=False)
    table.add_column("layer", justify="right")
    table.add_column("head", justify="right")
    for n in range(k):
        table.add_column(f"#{n + 1}")
    if r.sinks:
        table.add_column("sink")  # the weight that went to no key
    if r.differential:
        table.add_column("1 − λ")  # what a row of A1 − λ·A2 sums to
    for layer in layers:
        att = r.attention(layer)
        for h, tops in enumerate(top_attended(att, i, k)):
            # characters repeat: name them by position too
            where = [f"@{j}" if r.char_level else "" for j, _ in tops]
            cells = [
                f"{r.tokens[j]}{at} [dim]{w:.2f}[/dim]"
                for (j, w), at in zip(tops, where, strict=True)
            ]
            if r.sinks:
                cells.append(f"[dim]{1 - float(att[h, i].sum()):.2f}[/dim]")
            if r.differential:
                cells.append(f"[dim]{float(att[h, i].sum()):.2f}[/dim]")
            table.add_row(str(layer), str(h), *cells)
    return table


def layer_qkv(model: PretrainedEncoder, r: Run, layer: int) -> tuple[Tensor, Tensor, Tensor]:
    """Every head's queries, keys and values at ``layer``, each (H, L, d).

    Recomputed from the layer's input by its attention module (``MultiHeadAttention.heads``).
    """
    block = model.encoder.layers[layer]
    assert isinstance(block, BertLayer)
    with torch.no_grad():
        q, k, v = block.attention.heads(r.output.hidden_states[layer])  # input (1, L, E)
    return q[0], k[0], v[0]


def head_vectors(model: PretrainedEncoder, r: Run) -> dict[str, Tensor]:
    """``layer_qkv`` of every layer: {"q", "k", "v"}, each (layers, H, L, d) float32."""
    per_layer = [layer_qkv(model, r, n) for n in range(len(model.encoder.layers))]
    return {name: torch.stack([t[n] for t in per_layer]) for n, name in enumerate("qkv")}


def causal_lm_vectors(model: CausalLM, r: Run) -> dict[str, Tensor] | None:
    """A CausalLM's vectors for the neuron view of ``r`` (``run_checkpoint``'s).

    {"q", "k", "v"}: every layer's, (layers, H, L, d), kv heads repeated; "mask": its (L, L)
    mask. None where the view would not be the model's arithmetic: attention other than
    ``MultiHeadAttention`` (latent, differential), score mods (ALiBi), sinks, a scale other
    than 1/√d, or layers under different masks.
    """
    attns = [layer.self_attn for layer in model.layers]
    plain = [a for a in attns if _plain_softmax(a)]
    L = r.encoding.ids.shape[1]
    dense = [masks.causal().dense(L, L) if a.mask is None else a.mask.dense(L, L) for a in plain]
    if len(plain) < len(attns) or any(not torch.equal(m, dense[0]) for m in dense):
        return None
    inputs: list[Tensor] = []  # each layer's attention input
    hooks = [a.register_forward_pre_hook(lambda _, args: inputs.append(args[0])) for a in plain]
    try:
        with torch.no_grad():
            model(r.encoding.ids)
            per_layer = [a.heads(x) for a, x in zip(plain, inputs, strict=True)]
    finally:
        for hook in hooks:
            hook.remove()
    vectors = _stacked(per_layer, plain[0])
    vectors["mask"] = dense[0][0, 0]
    return vectors


def head_steps(
    model: PretrainedEncoder | None, r: Run, i: int, layer: int, head: int
) -> dict[str, Any]:
    """Recompute one head's output for query ``i`` by hand.

    From the layer's input and weights (the pretrained encoder), or from the run's own
    queries, keys and values (``r.vectors``: a checkpoint's, with its mask where it has one).
    """
    if r.vectors is not None:
        q, k, v = (r.vectors[name][layer, head] for name in "qkv")
        allowed = r.vectors.get("mask")
    else:
        assert model is not None
        q, k, v = (t[head] for t in layer_qkv(model, r, layer))
        allowed = None
    d = q.shape[-1]
    with torch.no_grad():
        dots = k @ q[i]
        scaled = dots / math.sqrt(d)
        if allowed is not None:  # keys the mask hides get no weight
            scaled = scaled.masked_fill(~allowed[i], -math.inf)
        weights = scaled.softmax(-1)
        out = weights @ v
    return {
        "q": q[i],
        "k": k,
        "v": v,
        "dots": dots,
        "scaled": scaled,
        "weights": weights,
        "out": out,
        "d": d,
        "model_weights": r.attention(layer)[head, i],
    }


def render_steps(
    model: PretrainedEncoder | None, r: Run, i: int, layer: int, head: int
) -> list[Any]:
    """Step-by-step walkthrough of one head with the real numbers, in plain words."""
    from rich.markdown import Markdown
    from rich.table import Table

    s = head_steps(model, r, i, layer, head)
    tok = r.queries[i]
    width = "" if model is None else f" (width {model.config.hidden_size})"
    cross = r.query_tokens is not None
    keys = "every source token's key" if cross else "every token's key"
    masked = "" if r.vectors is None or "mask" not in r.vectors else " (keys the mask hides: -∞)"
    parts: list[Any] = [
        Markdown(
            f"### Layer {layer}, head {head}: how **{tok}** decides where to look\n"
            f"1. Each token's vector{width} is multiplied by this head's three learned "
            f"matrices, giving a **query**, a **key** and a **value** of {s['d']} numbers each"
            f"{' (the query from the decoder, keys and values from the encoder)' if cross else ''}"
            f". The query of **{tok}** (first dims): `{_fmt(s['q'])}`\n"
            f"2. The query is compared with {keys} by a **dot product**: a large value "
            f"means the key answers the query well.\n"
            f"3. The dot products are divided by √{s['d']} = {math.sqrt(s['d']):.2f} so they stay "
            f"in a range where softmax does not saturate{masked}.\n"
            f"4. **Softmax** turns them into weights that are positive and sum to 1.\n"
            f"5. The head's output is the **weighted sum of the values**."
        )
    ]
    table = Table(title=f"{tok!r} · every key")
    for col in ("token", "key (first dims)", "q·k", "÷√d", "weight", "", "value (first dims)"):
        table.add_column(col, justify="right" if col in ("q·k", "÷√d", "weight") else "left")
    for j, t in enumerate(r.tokens):
        w = float(s["weights"][j])
        table.add_row(
            t,
            _fmt(s["k"][j], 4),
            f"{s['dots'][j]:.2f}",
            f"{s['scaled'][j]:.2f}",
            f"{w:.3f}",
            "█" * round(w * 30),
            _fmt(s["v"][j], 4),
        )
    parts.append(table)
    agree = torch.allclose(s["weights"], s["model_weights"], atol=1e-5)
    heads = r.attention(layer).shape[0]
    parts.append(
        Markdown(
            f"Output of this head for **{tok}** = Σ weight·value = `{_fmt(s['out'])}`.\n\n"
            f"These weights {'match' if agree else 'DO NOT match'} the model's own attention "
            f"(max difference {(s['weights'] - s['model_weights']).abs().max():.1e}). The "
            f"{heads} heads' outputs are concatenated and mixed by the output matrix W0 into "
            "the next layer."
        )
    )
    return parts


def render_sparse(full: Run, sparse: Run, mask: Mask, i: int, layer: int, k: int) -> list[Any]:
    """What a sparse pattern changes: where the heads may look, and the outputs."""
    from rich.table import Table

    L = len(full.tokens)
    allowed = mask.dense(L, L)[0, 0, i]
    seen = " ".join(t for t, a in zip(full.tokens, allowed.tolist(), strict=True) if a)
    parts: list[Any] = [
        f"[bold]{mask!r}[/bold]: density {mask.density(L, L):.2f}; "
        f"{full.tokens[i]!r} may look at: {seen}",
        render_heads(sparse, i, [layer], k, title=f"layer {layer} under {mask!r}"),
    ]
    parts.append(
        f"How the outputs change: cosine similarity to full attention, per layer, for "
        f"{full.tokens[i]!r} and for the mean of all tokens (1.000 = unchanged)."
    )
    table = Table()
    table.add_column("layer", justify="right")
    table.add_column(f"token {i}", justify="right")
    table.add_column("mean of all tokens", justify="right")
    cos = torch.nn.functional.cosine_similarity
    for n, (a, b) in enumerate(
        zip(full.output.hidden_states[1:], sparse.output.hidden_states[1:], strict=True)
    ):
        table.add_row(
            str(n),
            f"{cos(a[0, i], b[0, i], dim=0):.3f}",
            f"{cos(a[0].mean(0), b[0].mean(0), dim=0):.3f}",
        )
    parts.append(table)
    return parts


def rollout(r: Run, residual: float = 0.5) -> Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): how far attention has mixed the tokens.

    Each layer's map averaged over heads, with the residual connection around it as an
    identity: Â = residual·I + (1 − residual)·mean_h(A), rows renormalised to sum to 1 (a
    row's share that went to a sink is thus spread over the rest). Rolled out layer by layer,
    R_n = Â_n ··· Â_0. Row i of R_n: the input tokens that token i's representation after
    layer n traces back to, through attention alone (MLPs and value norms ignored: a picture
    of the mixing, not an attribution).

    Returns:
        (layers, L, L) float64: R_0 (the first layer's Â) to R_last, rows summing to 1.
    """
    if r.query_tokens is not None:
        raise UsageError(
            "rollout follows one sequence through its self-attention; a translation's "
            "cross-attention mixes the output tokens with the source"
        )
    if r.differential:
        raise UsageError("rollout needs maps of weights ≥ 0; differential maps A1 − λ·A2 are not")
    if not 0 <= residual <= 1:
        raise UsageError(f"rollout's residual share must be in [0, 1], got {residual}")
    L = len(r.tokens)
    eye = torch.eye(L, dtype=torch.float64)
    rolled, found = eye, []
    for n in range(len(r.output.attentions)):
        mixed = residual * eye + (1 - residual) * r.attention(n).double().mean(0)
        rolled = (mixed / mixed.sum(-1, keepdim=True)) @ rolled
        found.append(rolled)
    return torch.stack(found)


def render_rollout(r: Run, i: int, k: int, what: str = "") -> Any:
    """A table: the input tokens token ``i`` traces back to after each layer (``rollout``).

    ``what`` names the run in the title (e.g. the sparse pattern it ran under).
    """
    from rich.table import Table

    rolled = rollout(r)
    table = Table(
        title=f"what {r.tokens[i]!r} (token {i}) is made of after each layer"
        f"{' ' + what if what else ''}: attention rollout (heads averaged, residual as ½·I)"
    )
    table.add_column("after layer", justify="right")
    for n in range(k):
        table.add_column(f"#{n + 1}")
    table.add_column(f"{r.tokens[i]!r} itself", justify="right")
    for n, tops in enumerate(top_attended(rolled, i, k)):  # layers in place of heads
        where = [f"@{j}" if r.char_level else "" for j, _ in tops]
        cells = [  # (a token it has no share of yet, under a sparse pattern: none)
            f"{r.tokens[j]}{at} [dim]{w:.2f}[/dim]" if w > 0 else "·"
            for (j, w), at in zip(tops, where, strict=True)
        ]
        table.add_row(str(n), *cells, f"{float(rolled[n, i, i]):.2f}")
    return table


class HeadRole(NamedTuple):
    """What one head does, averaged over its queries (``head_roles``)."""

    layer: int
    head: int
    role: str  # ``pattern``, or "mixed" where it takes too little weight
    pattern: str  # the pattern that takes most weight ("previous token", "itself", ...)
    share: float  # the mean weight a query gives that pattern
    entropy: float  # the mean entropy of a query's weights, bits: 0 = one key
    distance: float  # the mean |i − j| between a query and the keys, under its weights


def head_roles(r: Run, threshold: float = 0.5) -> list[HeadRole]:
    """Each head's role, as Clark et al. (2019) sorted BERT's heads.

    Its queries' mean weight on the previous token, the next one, themselves, the first token
    ([CLS]) and the last ([SEP]); the largest names the head where it is at least
    ``threshold``, else "mixed". The previous (next) token's share averages the queries that
    have one.
    """
    if r.query_tokens is not None:
        raise UsageError(
            "head roles compare a query's position with its keys'; a translation's "
            "cross-attention has its queries in another sequence"
        )
    if r.differential:
        raise UsageError("head roles need maps of weights ≥ 0; differential maps are not")
    L = len(r.tokens)
    i = torch.arange(L)
    distance = (i[:, None] - i[None, :]).abs().double()
    found = []
    for layer in range(len(r.output.attentions)):
        maps = r.attention(layer).double()  # (H, L, L)
        shares = {
            "previous token": maps[:, i[1:], i[1:] - 1].mean(-1) if L > 1 else None,
            "next token": maps[:, i[:-1], i[:-1] + 1].mean(-1) if L > 1 else None,
            "itself": maps[:, i, i].mean(-1),
            f"first token {r.tokens[0]!r}": maps[:, :, 0].mean(-1),
            f"last token {r.tokens[-1]!r}": maps[:, :, -1].mean(-1),
        }
        entropy = -(maps * maps.clamp_min(1e-30).log2()).sum(-1).mean(-1)
        reach = (maps * distance).sum(-1).mean(-1)
        for h in range(maps.shape[0]):
            pattern, share = max(
                ((name, float(s[h])) for name, s in shares.items() if s is not None),
                key=lambda pair: pair[1],
            )
            found.append(
                HeadRole(
                    layer,
                    h,
                    pattern if share >= threshold else "mixed",
                    pattern,
                    share,
                    float(entropy[h]),
                    float(reach[h]),
                )
            )
    return found


def _described(found: HeadRole) -> str:
    """A head's role in words: "previous token", or "mixed (most: itself)"."""
    return f"mixed (most: {found.pattern})" if found.role == "mixed" else found.role


def role_words(r: Run) -> list[list[str]]:
    """``head_roles`` as words per [layer][head], e.g. "previous token 1.00" (the HTML page's)."""
    words: list[list[str]] = [[] for _ in r.output.attentions]
    for found in head_roles(r):
        words[found.layer].append(f"{_described(found)} {found.share:.2f}")
    return words


def render_roles(r: Run, threshold: float = 0.5, what: str = "") -> Any:
    """A table of ``head_roles``: each head's role, share, entropy and reach.

    ``what`` names the run in the title (e.g. the sparse pattern it ran under).
    """
    from rich.table import Table

    table = Table(
        title=f"what each head does{' ' + what if what else ''}, over the {len(r.tokens)} "
        f"tokens (the pattern taking ≥ {threshold:.0%} of a query's weight on average, else "
        "mixed)"
    )
    for name in ("layer", "head", "role", "its share", "entropy (bits)", "mean distance"):
        table.add_column(name, justify="left" if name == "role" else "right")
    for found in head_roles(r, threshold):
        described = _described(found)
        table.add_row(
            str(found.layer),
            str(found.head),
            f"[dim]{described}[/dim]" if found.role == "mixed" else described,
            f"{found.share:.2f}",
            f"{found.entropy:.2f}",
            f"{found.distance:.1f}",
        )
    return table
